"""The training loop: `Trainer.fit()` steps, logs, checkpoints, evaluates and resumes.

Reads top to bottom: the run set-up (mmjax.training.setup: mesh, rules, model, optimizer,
sharded state layout), the training sources and tokenizer, then `fit()`: create or restore
the state, compile the step ahead of time, loop (step, log, checkpoint, evaluate) and stop
on a signal with a checkpoint. Running again on an existing workdir resumes from its latest
readable checkpoint. The evaluator is handed in (mmjax.tools.train wires mmjax.evals), so
training depends on no evaluation or inference code.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from mmjax import storage
from mmjax.data.pipeline import require_usable, train_batches
from mmjax.data.preprocess import ImageOptions
from mmjax.data.sources import make_source, parse_mixture, read_captions
from mmjax.data.stats import DataError, DataStats
from mmjax.models.flops import peak_flops, train_flops_per_step
from mmjax.models.video import input_frames
from mmjax.runtime import distributed, log, paths, run_record
from mmjax.runtime import sharding as shd
from mmjax.runtime.checkpoint import Checkpointer, CheckpointError, read_params
from mmjax.runtime.config import ConfigError, to_json
from mmjax.runtime.metric_writer import MetricWriter
from mmjax.runtime.preemption import StopRequests
from mmjax.text.registry import tokenizer_path
from mmjax.text.sentencepiece import load_or_train_tokenizer
from mmjax.text.tokenizer import TextTokenizer
from mmjax.training.setup import (
    Run,
    build_run,
    check_vocabulary,
    existing_tokenizer,
)
from mmjax.training.state import TrainState, data_seed
from mmjax.training.step import batch_shardings

# The eval metrics printed under the progress bar (all are in metrics.jsonl).
HEADLINE_EVAL_KEYS = (
    "eval/i2t_r1",
    "eval/t2i_r1",
    "eval/i2t_r1_samecap",
    "eval/caption_exact",
    "eval/caption_bleu4",
)
HEADLINE_EVAL_SUFFIXES = ("/accuracy", "/cider", "/i2t_r1")


class TrainingDiverged(RuntimeError):
    """A NaN/Inf loss: the run stops; earlier checkpoints stay as they are."""


class Evaluator(Protocol):
    """What the loop needs of an evaluator (mmjax.evals.suite.EvalSuite is one)."""

    def due(self, step: int) -> bool: ...

    def run(self, params: Any, step: int, *, everything: bool = False) -> dict[str, float]: ...


# Builds the run's evaluator once the trainer has its model, mesh and tokenizer.
EvaluatorFactory = Callable[["Trainer"], Evaluator]


def _finite_mean(values: list[float]) -> float:
    """Mean over the finite values (skipped NaN steps must not poison a log window)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclasses.dataclass
class _Loop:
    """What the step loop carries from step to step."""

    writer: MetricWriter
    bar: Any  # tqdm
    flops_per_step: float
    peak: float
    last_read: int  # The last step whose metrics were read.
    window: list[dict[str, float]] = dataclasses.field(default_factory=list)
    window_start: float = dataclasses.field(default_factory=time.perf_counter)
    window_steps: int = 0
    pending: tuple | None = None  # (step, device metrics, device data counts), read a step late.
    warned: set[str] = dataclasses.field(default_factory=set)
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)


class Trainer:
    """Owns everything a run needs; `fit()` trains, `restore()` loads a checkpoint."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | Path,
        *,
        evaluator: EvaluatorFactory | None = None,
        existing_tokenizer: bool = False,
    ):
        """`evaluator`: builds the run's evaluator (None: the run never evaluates).
        `existing_tokenizer`: the tokenizer must already exist (data.tokenizer or the
        workdir's), as when only restoring; otherwise one is trained on first use."""
        self.config = config
        self.workdir = paths.absolute(workdir)
        self.is_chief = jax.process_index() == 0
        self.run: Run = build_run(config)
        self.mesh, self.rules = self.run.mesh, self.run.rules
        self.model_cfg, self.model, self.tx = self.run.model_cfg, self.run.model, self.run.tx
        self.abstract_state = self.run.abstract_state
        self.state_shardings = self.run.state_shardings
        mixture = parse_mixture(config.data.train)
        try:
            self.train_sources = [
                make_source(
                    spec,
                    split="train",
                    data=config.data,
                    image_size=self.model_cfg.image_size,
                    frames=input_frames(self.model_cfg),
                    cache_dir=self.workdir / "data_index",
                )
                for spec, _ in mixture
            ]
        except (ValueError, OSError) as e:  # Missing file, missing column, bad shard...
            raise ConfigError(f"data.train: {e}") from None
        for source in self.train_sources:  # Before the tokenizer trains on their captions.
            require_usable(source, self.image_options(train=False), "data.train")
        self.train_weights = [weight for _, weight in mixture]
        # Global counts on every process: every step's rows are summed on the devices
        # (`_sum_counts`, read with the step's metrics), so all processes judge the same.
        self.data_stats = DataStats([source.name for source in self.train_sources])
        self.tokenizer = self._tokenizer(existing_tokenizer)
        self.checkpointer = Checkpointer(
            self.workdir / "checkpoints", max_to_keep=config.keep_checkpoints
        )
        self._sum_counts = jax.jit(
            lambda rows: jnp.sum(rows, axis=0), out_shardings=shd.replicated(self.mesh)
        )
        self.evaluator = evaluator(self) if evaluator is not None else None
        self.state: TrainState | None = None
        self.skipped_checkpoints: list[int] = []  # Unreadable ones newer than the restored one.
        self.preempted_at: int | None = None  # The step fit() stopped at on SIGTERM/SIGINT.
        self.nan_skipped_steps = 0  # train.on_nan='skip': updates skipped so far.

    def _tokenizer(self, existing: bool) -> TextTokenizer:
        if existing or self.config.data.tokenizer:
            return existing_tokenizer(self.config, self.workdir, self.model_cfg)
        # Trained once from the training captions, then cached in the workdir.
        path = tokenizer_path(self.config.data, self.workdir)
        tokenizer = load_or_train_tokenizer(
            path,
            lambda: read_captions(
                self.train_sources, self.config.data.tokenizer_captions, progress=self.is_chief
            ),
            self.config.data.tokenizer_vocab_size,
        )
        check_vocabulary(tokenizer, self.model_cfg, path)
        return tokenizer

    def _init_from(self, directory: str) -> TrainState:
        """The fresh state with its params replaced by DIR's newest readable checkpoint's
        (a training workdir or mmjax.interop.open_clip's output); the optimizer state is
        fresh."""
        try:
            step, params = read_params(
                storage.path(directory) / "checkpoints", self.run.abstract_params, warn=self._log
            )
        except CheckpointError as e:
            raise CheckpointError(f"init_from={directory}: {e}") from None
        self._log(f"initialised the parameters from {directory} (its step {step})")
        return self.state.replace(params=params)

    def restore(self, step: int | None = None) -> int:
        """Restores `step` (default: the newest readable) onto this mesh; returns the step.

        Unreadable newer checkpoints are reported in one line each and listed in
        `skipped_checkpoints`; raises CheckpointError when none is readable.
        """
        if step is None:
            step, self.state, meta, self.skipped_checkpoints = self.checkpointer.restore_latest(
                self.abstract_state, warn=self._log
            )
        else:
            self.state = self.checkpointer.restore(step, self.abstract_state)
            meta = self.checkpointer.restore_meta(step)
        self.nan_skipped_steps = int(meta.get("nan_skipped_steps", 0))
        saved = meta.get("data_counts")
        if saved is not None:  # Global sums, as every process keeps them.
            try:
                self.data_stats.load_json(saved)
            except ValueError as e:
                self._log(f"data counters start from zero: {e}")
        return step

    def compile_step(self):
        return self.run.compile_step()

    def _to_global(self, counts: np.ndarray) -> jax.Array:
        """This process's per-row data counters [b, S, C] as rows of one global array."""
        sharding = shd.batch_sharding(self.mesh, self.rules, counts.ndim)
        return jax.make_array_from_process_local_data(sharding, counts)

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        shardings = batch_shardings(self.mesh, self.rules, self.model_cfg)
        return {
            k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in shardings
        }

    def fit(self) -> dict[str, float]:
        """Trains to config.total_steps, resuming from the newest readable checkpoint.

        SIGTERM or SIGINT stops the run at the end of a step (the same step on
        every process) with a checkpoint of it: `preempted_at` is then that step.
        """
        latest = self.checkpointer.latest_step()
        with StopRequests(
            self.checkpointer.reached_preemption, first_step=latest or 0, verbose=self.is_chief
        ) as stop:
            return self._fit(stop)

    def _fit(self, stop: StopRequests) -> dict[str, float]:
        start_step, resumed = self._start()
        step_fn, flops_per_step, peak = self._compile()
        batches = self._train_batches(start_step)
        writer = MetricWriter(
            self.workdir, enabled=self.is_chief, resume_step=start_step if resumed else None
        )
        # In logs (no terminal) redraw rarely instead of filling them with bars.
        bar = tqdm(
            total=self.config.total_steps,
            initial=start_step,
            disable=not self.is_chief,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        loop = _Loop(writer, bar, flops_per_step, peak, last_read=start_step)
        try:
            self._step_loop(step_fn, batches, stop, loop, start_step)
        except DataError:
            if loop.window:  # The steps trained up to the one whose counters stopped the run.
                self._write_window(loop, loop.last_read)
            self.checkpointer.wait()  # Let saves of earlier, good states complete.
            raise
        except TrainingDiverged:
            self.checkpointer.wait()
            raise
        finally:
            bar.close()
            writer.close()
            batches.close()  # grain's workers exit now, not at interpreter shutdown.
        self.checkpointer.wait()  # Still under the stop handlers: a second signal waits too.
        self._log("data: " + self.data_stats.summary())
        return loop.last_eval

    # --- start-up ---------------------------------------------------------------------------

    def _start(self) -> tuple[int, bool]:
        """Claims the workdir and restores (or creates) the state: (start step, resumed)."""
        cfg = self.config
        storage.mkdir(self.workdir)
        # Workdir lock, config vs config.json on resume, runs.jsonl: mmjax/runtime/run_record.py.
        run_record.start(
            self.workdir, cfg, self.mesh, checkpoint_step=self.checkpointer.latest_step()
        )
        if self.is_chief:
            storage.write_text(self.workdir / "config.json", to_json(cfg))
        # Tmp directories of saves a killed run never committed (safe under the workdir lock).
        for name in self.checkpointer.remove_incomplete():
            self._log(f"removed the unfinished save {self.checkpointer.directory}/{name}")
        resumed = self.checkpointer.latest_step() is not None
        if resumed:
            latest = self.restore()
            for bad in self.skipped_checkpoints:  # Out of the way: this run saves them again.
                moved = self.checkpointer.set_aside(bad)
                self._log(f"moved the unreadable checkpoint {bad} to {moved}")
            self._log(f"resumed from {self.checkpointer.directory}/{latest}")
        else:
            self.state = self.run.create_state()
            if cfg.get("init_from", ""):
                self.state = self._init_from(cfg.init_from)
        return int(jax.device_get(self.state.step)), resumed

    def _compile(self):
        """(compiled step, model FLOPs per step, peak FLOP/s of a device), logged."""
        cfg = self.config
        t0 = time.perf_counter()
        step_fn = self.compile_step()
        compile_seconds = time.perf_counter() - t0
        distributed.align_processes("compiled")  # First step's collectives start together.
        flops_per_step = train_flops_per_step(
            self.model_cfg, cfg.batch_size, with_captioning=cfg.loss.caption_weight > 0
        )
        peak, peak_source = peak_flops(self.model_cfg.dtype)
        self._log(
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
            f"devices; compiled in {compile_seconds:.1f}s; {flops_per_step / 1e9:.2f} GFLOP/step; "
            f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})"
        )
        return step_fn, flops_per_step, peak

    def _train_batches(self, start_step: int):
        cfg = self.config
        return train_batches(
            self.train_sources,
            self.tokenizer,
            weights=self.train_weights,
            global_batch_size=cfg.batch_size,
            context_length=self.model_cfg.context_length,
            seed=data_seed(cfg.seed),
            image_options=self.image_options(train=True),
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=cfg.data.workers,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )

    # --- the step loop ----------------------------------------------------------------------

    def _step_loop(
        self, step_fn, batches, stop: StopRequests, loop: _Loop, start_step: int
    ) -> None:
        cfg = self.config
        end = cfg.total_steps
        if start_step < end and stop.should_stop(start_step):  # Signalled while starting up.
            self.preempted_at = end = start_step
        for step in range(start_step + 1, end + 1):
            batch = next(batches)
            counts = self._sum_counts(self._to_global(batch.pop("counts")))
            self.state, metrics = step_fn(self.state, self._to_device(batch))
            if loop.pending is not None:  # Reading the previous step keeps the device queue full.
                self._read_pending(loop)
            loop.pending = (step, metrics, counts)
            loop.window_steps += 1
            loop.bar.update(1)
            stopping = stop.should_stop(step) and step < cfg.total_steps
            boundary = step == cfg.total_steps or stopping
            do_log = step % cfg.log_every == 0 or boundary
            do_ckpt = step % cfg.checkpoint_every == 0 or boundary
            # A preempted run saves first and skips the evaluation (its grace time is short).
            do_eval = (
                self.evaluator is not None
                and (self.evaluator.due(step) or boundary)
                and not stopping
            )
            if not (do_log or do_ckpt or do_eval):
                continue
            self._read_pending(loop)  # Never save a state whose loss is NaN.
            if do_log:
                self._write_window(loop, step)
            if do_ckpt:
                loop.writer.flush()  # Object storage: lines up to this checkpoint are stored.
                self._save(step)
            if do_eval:
                self._evaluate(loop, step, everything=boundary)
                loop.writer.flush()
            loop.window_start, loop.window_steps = time.perf_counter(), 0  # Exclude eval/ckpt.
            if stopping:
                self.preempted_at = step
                break

    # --- what a step boundary does: read, log, checkpoint, evaluate --------------------------

    def _read_pending(self, loop: _Loop) -> None:
        """Appends the pending step's metrics to the window; checks its loss (NaN) and the
        data counters (too many bad samples), raising to stop the run."""
        cfg = self.config
        step, metrics, counts = loop.pending
        loop.pending, loop.last_read = None, step
        loop.window.append(self._checked(step, metrics))
        self.data_stats.add(np.asarray(jax.device_get(counts)))
        for warning in self.data_stats.check(
            cfg.data.max_skip_fraction, cfg.data.min_samples_for_skip_check
        ):
            source = warning.split(":", 1)[0]
            if source not in loop.warned:  # Loud once per source; metrics.jsonl keeps it.
                loop.warned.add(source)
                self._log(f"WARNING: {warning}")

    def _write_window(self, loop: _Loop, step: int) -> None:
        cfg = self.config
        elapsed = time.perf_counter() - loop.window_start
        window, steps = loop.window, loop.window_steps
        summary = {k: _finite_mean([m[k] for m in window]) for k in window[0]}
        if cfg.train.on_nan == "skip":
            summary["nan_skipped_steps"] = float(self.nan_skipped_steps)
        summary["examples_per_sec"] = steps * cfg.batch_size / elapsed
        if storage.is_remote(self.workdir) or storage.retries():
            summary["storage_retries"] = float(storage.retries())
        summary["step_seconds"] = elapsed / steps
        summary["mfu"] = loop.flops_per_step * steps / elapsed / loop.peak
        summary.update(self.data_stats.metrics())
        over = self.data_stats.over_limit(cfg.data.max_skip_fraction)
        if over:  # Below min_samples_for_skip_check (above it the run has stopped).
            summary["data/over_skip_fraction"] = max(bad / seen for _, bad, seen, _ in over)
        loop.writer.write(step, summary)
        loop.bar.set_postfix(
            loss=f"{summary['loss']:.3f}",
            ex_s=f"{summary['examples_per_sec']:.0f}",
            mfu=f"{summary['mfu']:.2f}",
        )
        loop.window = []

    def _save(self, step: int) -> None:
        self.checkpointer.save(
            step,
            self.state,
            batch_size=self.config.batch_size,
            extra_meta={
                "data_counts": self.data_stats.to_json(),
                "nan_skipped_steps": self.nan_skipped_steps,
            },
        )

    def _evaluate(self, loop: _Loop, step: int, *, everything: bool) -> None:
        loop.last_eval = self.evaluator.run(self.state.params, step, everything=everything)
        loop.writer.write(step, loop.last_eval)
        if self.is_chief:  # A disabled bar still writes.
            loop.bar.write(
                f"step {step}: "
                + ", ".join(
                    f"{k[5:]}={v:.3f}"
                    for k, v in loop.last_eval.items()
                    if k in HEADLINE_EVAL_KEYS or k.endswith(HEADLINE_EVAL_SUFFIXES)
                )
            )

    # --- the rest ---------------------------------------------------------------------------

    def data_warnings(self) -> list[str]:
        """One line per source whose bad fraction ended over data.max_skip_fraction (a run
        too short to be stopped for it): main prints them last."""
        limit = self.config.data.max_skip_fraction
        return [
            f"WARNING: source {source}: {bad} of {seen} samples were bad "
            f"({bad / seen:.1%} > data.max_skip_fraction={limit})"
            for source, bad, seen, _ in self.data_stats.over_limit(limit)
        ]

    def image_options(self, *, train: bool) -> ImageOptions:
        data = self.config.data
        return ImageOptions(
            image_size=self.model_cfg.image_size,
            train=train,
            crop_scale=tuple(data.crop_scale),
            crop_ratio=tuple(data.crop_ratio),
            color_jitter=data.color_jitter,
            max_pixels=data.max_image_pixels,
            frames=input_frames(self.model_cfg),
        )

    def _checked(self, step: int, metrics) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [
            k
            for k in ("loss", "contrastive_loss", "caption_loss", "grad_norm")
            if not math.isfinite(host[k])
        ]
        if bad and self.config.train.on_nan == "skip":  # The step kept the old state.
            self.nan_skipped_steps += 1
            if self.nan_skipped_steps <= 10 or self.nan_skipped_steps % 100 == 0:
                self._log(
                    f"step {step}: non-finite {', '.join(f'{k}={host[k]}' for k in bad)}; "
                    f"update skipped (train.on_nan='skip', {self.nan_skipped_steps} so far)"
                )
        elif bad:
            good = self.checkpointer.latest_step()
            where = f"step {good} in {self.checkpointer.directory}" if good else "none saved yet"
            raise TrainingDiverged(
                f"step {step}: non-finite {', '.join(f'{k}={host[k]}' for k in bad)}; "
                f"stopped without saving. Last good checkpoint: {where}"
            )
        return host

    def _log(self, message: str) -> None:
        if self.is_chief:
            (log.warning if message.startswith("WARNING") else log.info)(message)

    def close(self) -> None:
        self.checkpointer.close()
