"""Evaluation: image-text retrieval and greedy captioning on the held-out split.

Used by the trainer every `eval_every` steps and on its own:

  python -m mmjax.evaluate --workdir DIR [--config.eval.caption_examples=N ...]

which restores the latest checkpoint of DIR and writes DIR/eval.json.
Eval batches are sharded over the mesh like training batches; padding rows
(the last batch is filled up) are dropped, so every example counts once on
any number of devices or processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax import distributed
from mmjax import sharding as shd
from mmjax.config_loading import ConfigError
from mmjax.data.pipeline import eval_batches
from mmjax.data.preprocess import ImageOptions, decode_caption
from mmjax.data.sources import make_source
from mmjax.data.stats import DataStats
from mmjax.eval_metrics import caption_metrics, retrieval_metrics
from mmjax.generate import greedy_generate
from mmjax.models.coca import CoCa
from mmjax.tokenizer import Tokenizer


class Evaluator:
    """Compiles the eval functions once; `run(params)` returns `eval/...` metrics."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: CoCa,
        mesh,
        rules,
        tokenizer: Tokenizer,
        *,
        workdir: str | Path | None = None,
    ):
        self.config, self.model, self.mesh, self.rules = config, model, mesh, rules
        self.tokenizer = tokenizer
        try:
            self.source = make_source(
                config.data.eval,
                split="eval",
                data=config.data,
                image_size=model.cfg.image_size,
                cache_dir=Path(workdir) / "data_index" if workdir else None,
            )
        except (ValueError, OSError) as e:
            raise ConfigError(f"data.eval: {e}") from None
        self.image_options = ImageOptions(
            image_size=model.cfg.image_size, train=False, max_pixels=config.data.max_image_pixels
        )
        rows = lambda ndim: shd.batch_sharding(mesh, rules, ndim)
        everywhere = shd.replicated(mesh)

        def embed(params, images, tokens):
            image_emb, _ = model.apply({"params": params}, images, method=CoCa.encode_image)
            text_emb, _ = model.apply({"params": params}, tokens, method=CoCa.encode_text)
            return image_emb, text_emb

        def caption(params, images):
            return greedy_generate(
                model,
                params,
                images,
                bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
            )

        # Outputs replicated: every process ends up with the whole eval set.
        self._embed = jax.jit(
            embed, in_shardings=(None, rows(4), rows(2)), out_shardings=(everywhere, everywhere)
        )
        self._caption = jax.jit(caption, in_shardings=(None, rows(4)), out_shardings=everywhere)

    def _global(self, local: np.ndarray) -> jax.Array:
        sharding = shd.batch_sharding(self.mesh, self.rules, local.ndim)
        return jax.make_array_from_process_local_data(sharding, local)

    def run(self, params) -> dict[str, float]:
        cfg = self.config
        start = time.perf_counter()
        image_embs, text_embs, indices, predictions = [], [], [], []
        want_captions = min(cfg.eval.caption_examples, len(self.source))
        stats = DataStats([self.source.name])
        batches = eval_batches(
            self.source,
            self.tokenizer,
            global_batch_size=cfg.eval.batch_size,
            context_length=self.model.cfg.context_length,
            image_options=self.image_options,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=cfg.data.workers,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )
        with shd.activate(self.mesh, self.rules):
            for batch in batches:
                stats.add(batch["counts"])
                images, tokens = self._global(batch["images"]), self._global(batch["tokens"])
                index = (
                    np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True))
                    if jax.process_count() > 1
                    else batch["index"]
                )
                image_emb, text_emb = self._embed(params, images, tokens)
                image_embs.append(np.asarray(image_emb))
                text_embs.append(np.asarray(text_emb))
                indices.append(index)
                if sum(len(p) for p in predictions) < want_captions:
                    predictions.append(np.asarray(self._caption(params, images)))
        index = np.concatenate(indices)
        keep = index >= 0  # Padding rows and bad samples carry index -1.
        index = index[keep]
        references = [decode_caption(self.source.caption(int(i))) for i in index]
        image_emb = np.concatenate(image_embs)[keep]
        text_emb = np.concatenate(text_embs)[keep]
        if np.all(np.isfinite(image_emb)) and np.all(np.isfinite(text_emb)):
            metrics = retrieval_metrics(image_emb, text_emb, captions=references)
        else:  # Diverged weights (train.on_nan='skip' keeps going): report, do not crash.
            if jax.process_index() == 0:
                print("[mmjax] eval: embeddings are not finite; retrieval metrics are NaN")
            probe = retrieval_metrics(
                np.eye(2, 2, dtype=np.float32), np.eye(2, 2, dtype=np.float32)
            )
            metrics = {key: float("nan") for key in probe}
        generated = np.concatenate(predictions)[keep[: sum(len(p) for p in predictions)]]
        generated = generated[:want_captions]
        texts = self.tokenizer.decode_batch(generated)
        metrics.update(caption_metrics(texts, references[: len(texts)]))
        out = {f"eval/{k}": float(v) for k, v in metrics.items()}
        out["eval/num_examples"] = float(len(index))
        counts = stats.counts
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts[None], tiled=True)).sum(0)
        out["eval/skipped"] = stats.metrics(counts)["data/skipped"]
        out["eval/seconds"] = time.perf_counter() - start
        self.last_samples = list(zip(references[: len(texts)], texts))
        return out


def main(argv=None) -> int:
    from mmjax.checkpoint import CheckpointError
    from mmjax.config_loading import apply_override, from_json_file, split_config_flags
    from mmjax.train import Trainer  # Same restore path as training.

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_config_flags(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m mmjax.evaluate", allow_abbrev=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(rest)
    try:  # Before anything touches the devices.
        distributed.initialize()
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    if not (workdir / "config.json").is_file():
        print(
            f"error: {workdir}/config.json not found: is --workdir a training directory?",
            file=sys.stderr,
        )
        return 2
    config = from_json_file(workdir / "config.json")
    try:
        for item in overrides:
            key, _, value = item.partition("=")
            apply_override(config, key, value)
        trainer = Trainer(config, workdir, for_eval=True)
        step = trainer.restore(args.step)
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = trainer.evaluator.run(trainer.state.params)
    metrics["step"] = step
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        for key, value in sorted(metrics.items()):
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        for ref, hyp in trainer.evaluator.last_samples[:5]:
            print(f"  reference: {ref!r}\n  generated: {hyp!r}")
        print(f"wrote {workdir / 'eval.json'}")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
