"""Input-pipeline benchmark: the grain pipeline against a plain PIL loop, in one run.

  python -m mmjax.benchmarks.data SPEC [SPEC ...] [--workers 1,2] [--examples 1024]
  python -m mmjax.benchmarks.data --make-corpus DIR [--corpus-examples 2048]   # 256 px JPEGs
  mmjax bench data --make-corpus DIR --against open_clip   # the wds shards, both pipelines

For each SPEC it prints one JSON line: examples/s of a single-process loop
that reads, decodes (PIL), random-resized-crops to --image-size, normalises
to float32, tokenises and batches, and of `train_batches` doing the same
work (normalisation happens on the device there, so the pipeline ships
uint8) with each worker count; plus the ratios between them. Each worker
decodes with one thread, so N workers use N cores.

--against open_clip times open_clip's own training pipeline (open_clip_train's
get_wds_dataset: webdataset, its training transform to float tensors, CLIP BPE, a torch
DataLoader; mmjax.benchmarks.open_clip_data) on the same webdataset shards with the same
crop, at the same worker counts, alternating with mmjax's pipeline for --rounds rounds;
it adds each side's median examples/s and workersN_vs_open_clip (above 1: mmjax faster).
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from mmjax.data.arrayrecord_source import write_arrayrecord_shards
from mmjax.data.image_corpus import write_image_corpus, write_wds_shards
from mmjax.data.pipeline import train_batches
from mmjax.data.preprocess import ImageOptions, random_resized_crop_box
from mmjax.data.sources import make_source, read_captions
from mmjax.interop.torch_import import MissingExtra
from mmjax.runtime import cli
from mmjax.text.sentencepiece import Tokenizer, train_tokenizer

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32) * 255
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32) * 255


def plain_loop(source, tokenizer: Tokenizer, options: ImageOptions, *, examples, batch_size, seed):
    """Examples/s of the straightforward loop most training scripts start with."""
    rng = np.random.default_rng(seed)
    size = options.image_size
    start = time.perf_counter()
    done = 0
    while done < examples:
        images, tokens = [], []
        for i in range(done, done + batch_size):
            record = source[i % len(source)]
            image = Image.open(io.BytesIO(record["image"])).convert("RGB")
            box = random_resized_crop_box(rng, *image.size, options.crop_scale, options.crop_ratio)
            image = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
            images.append((np.asarray(image, np.float32) - MEAN) / STD)
            caption = record["caption"]
            caption = caption.decode() if isinstance(caption, bytes) else caption
            tokens.append(tokenizer.encode(caption, 32)[0])
        np.stack(images), np.stack(tokens)
        done += batch_size
    return done / (time.perf_counter() - start)


def pipeline(source, tokenizer, options, *, examples, batch_size, workers, seed):
    """Examples/s of train_batches, after its first batch (worker start-up excluded)."""
    batches = train_batches(
        [source],
        tokenizer,
        global_batch_size=batch_size,
        context_length=32,
        seed=seed,
        image_options=options,
        workers=workers,
        num_threads=1,
        prefetch=2,
    )
    next(batches)
    steps = max(1, examples // batch_size)
    start = time.perf_counter()
    for _ in itertools.islice(batches, steps):
        pass
    return steps * batch_size / (time.perf_counter() - start)


def against_open_clip(spec, source, tokenizer, options, workers, rounds, kwargs):
    """(mmjax's, open_clip's) median examples/s over `rounds` alternations, the first side
    to run swapping each round so that neither always meets the busier moment."""
    from mmjax.benchmarks.open_clip_data import open_clip_rate

    mine, theirs = [], []
    for r in range(rounds):
        runs = [
            lambda: mine.append(pipeline(source, tokenizer, options, workers=workers, **kwargs)),
            lambda: theirs.append(
                open_clip_rate(
                    spec.removeprefix("wds:"),
                    examples=kwargs["examples"],
                    batch_size=kwargs["batch_size"],
                    workers=workers,
                    image_size=options.image_size,
                    crop_scale=options.crop_scale,
                    context_length=32,
                    seed=kwargs["seed"],
                )
            ),
        ]
        for run in runs if r % 2 == 0 else runs[::-1]:
            run()
    return float(np.median(mine)), float(np.median(theirs))


def make_corpus(out_dir: Path, num_examples: int) -> list[str]:
    """256 px JPEGs as CSV, webdataset shards and ArrayRecord; returns their specs."""

    csv_path = write_image_corpus(out_dir, num_examples=num_examples, image_size=256, progress=True)
    wds = write_wds_shards(csv_path, out_dir / "wds", shard_size=512)
    source = make_source(f"csv:{csv_path}", split="train", data=_data_config(), image_size=256)
    write_arrayrecord_shards(source, out_dir / "arrayrecord", 4)
    return [f"csv:{csv_path}", f"wds:{wds}", f"arrayrecord:{out_dir}/arrayrecord/*.array_record"]


def _data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(seed=0, train_examples=0, eval_examples=0, image_key="filepath", caption_key="caption")
    )


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m mmjax.benchmarks.data")
    parser.add_argument("specs", nargs="*", help="source specs, e.g. csv:/data/train.csv")
    parser.add_argument("--make-corpus", type=Path, help="write a 256 px JPEG corpus here first")
    parser.add_argument("--corpus-examples", type=int, default=2048)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--examples", type=int, default=1024, help="examples timed per variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--against", choices=("open_clip",), help="time its pipeline too (wds)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per worker count")
    args = parser.parse_args(argv)
    specs = list(args.specs)
    if args.make_corpus:
        made = make_corpus(args.make_corpus, args.corpus_examples)
        specs += [s for s in made if s.startswith("wds:")] if args.against else made
    if not specs:
        parser.error("give a SPEC or --make-corpus DIR")
    if args.against and not all(s.startswith("wds:") for s in specs):
        bad = next(s for s in specs if not s.startswith("wds:"))
        print(f"error: --against open_clip reads webdataset shards only; {bad} is not wds:",
              file=sys.stderr)  # fmt: skip
        return 2
    workers = [int(w) for w in args.workers.split(",") if w]
    options = ImageOptions(image_size=args.image_size, train=True)
    results = []
    for spec in specs:
        try:
            source = make_source(spec, split="train", data=_data_config(), image_size=224)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tok_path = Path(f"/tmp/mmjax_data_bench_{abs(hash(spec))}.model")
        tokenizer = train_tokenizer(read_captions([source], 5000), tok_path, 256)
        kwargs = dict(examples=args.examples, batch_size=args.batch_size, seed=0)
        result = {"spec": spec, "examples": args.examples, "image_size": args.image_size}
        result["plain_examples_per_sec"] = plain_loop(source, tokenizer, options, **kwargs)
        for count in workers:
            if args.against:
                try:
                    rate, peer = against_open_clip(spec, source, tokenizer, options, count,
                                                   args.rounds, kwargs)  # fmt: skip
                except MissingExtra as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                result[f"open_clip_workers{count}_examples_per_sec"] = peer
                result[f"workers{count}_vs_open_clip"] = rate / peer
            else:
                rate = pipeline(source, tokenizer, options, workers=count, **kwargs)
            result[f"workers{count}_examples_per_sec"] = rate
            result[f"workers{count}_vs_plain"] = rate / result["plain_examples_per_sec"]
        if 1 in workers and len(workers) > 1:
            for count in workers[1:]:
                result[f"workers{count}_vs_workers1"] = (
                    result[f"workers{count}_examples_per_sec"] / result["workers1_examples_per_sec"]
                )
        results.append(result)
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
        )
    if len(results) > 1:  # Reading speed of each form against the first spec's.
        base = results[0][f"workers{workers[0]}_examples_per_sec"]
        ratios = {
            r["spec"]: round(r[f"workers{workers[0]}_examples_per_sec"] / base, 3) for r in results
        }
        print(json.dumps({"vs_first_spec": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
