"""Captions for image files from a trained workdir, one `path<TAB>caption` line per image.

  python -m mmjax.tools.caption --workdir runs/coca_tiny a.jpg b.png
  python -m mmjax.tools.caption --workdir runs/coca_tiny --method beam --beam-size 4 images/*.jpg
  python -m mmjax.tools.caption --workdir runs/coca_tiny --method sample --top-p 0.9 --seed 1 a.jpg

Lines come in input order, written as each batch finishes. Files that do not exist or
cannot be opened are all named in one line before the model loads (exit status 2); an
image that cannot be decoded gets an `error: cannot read image PATH: REASON` line, the
others are still captioned, and the command ends with a line counting them (exit status
2). Decoding options are those of `mmjax.inference.generate.GenerateOptions`; --seed fixes sampling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmjax.inference.generate import METHODS, GenerateOptions
from mmjax.inference.predictor import BadImage, Predictor, unreadable_files
from mmjax.runtime import cli, log
from mmjax.runtime.checkpoint import CheckpointError

# Flag -> GenerateOptions field; a flag left out keeps the field's default.
OPTION_FLAGS = {
    "method": str,
    "beam_size": int,
    "length_penalty": float,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_length": int,
    "max_length": int,
    "repetition_penalty": float,
}


def one_line(text: str) -> str:
    """Keeps the one-line-per-image contract whatever the tokenizer decodes."""
    return " ".join(text.split())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.caption", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="training workdir (config.json, ...)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: latest)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--method", choices=METHODS, default=None, help="default: greedy")
    for name, kind in OPTION_FLAGS.items():
        if name != "method":
            flag = "--" + name.replace("_", "-")
            parser.add_argument(flag, type=kind, default=None, help="see GenerateOptions")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    with log.to_stderr():  # Standard output holds the captions.
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    chosen = {name: getattr(args, name) for name in OPTION_FLAGS}
    try:
        options = GenerateOptions.from_mapping({k: v for k, v in chosen.items() if v is not None})
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = unreadable_files(args.images)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    bad: list[BadImage] = []
    try:
        predictor = Predictor.from_workdir(args.workdir, args.step)
        for batch, texts in predictor.caption_batches(
            args.images, options, seed=args.seed, batch_size=args.batch_size
        ):
            for _, error in batch.bad:  # The others are still captioned.
                print(f"error: {error}", file=sys.stderr, flush=True)
                bad.append(error)
            for position, text in zip(batch.positions, texts):
                print(f"{args.images[position]}\t{one_line(text)}")
            sys.stdout.flush()
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bad:
        print(
            f"error: {len(bad)} of {len(args.images)} images could not be read "
            f"({', '.join(e.name for e in bad[:10])}{', ...' if len(bad) > 10 else ''}); "
            "the others are captioned",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
