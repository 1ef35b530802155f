"""Training: the pure train step and the loop around it.

  python -m mmjax.train --config configs/coca.py:size=tiny --workdir DIR [--config.KEY=VALUE ...]

Reads top to bottom: validate the config against the devices, build the mesh,
tokenizer, model and optimizer, create (or restore) the sharded state, compile
the step ahead of time, then loop: step, log, checkpoint, evaluate. Running
the same command on an existing workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from mmjax import cli, distributed, paths, run_record
from mmjax import sharding as shd
from mmjax.checkpoint import Checkpointer, CheckpointError
from mmjax.config_loading import (
    ConfigError,
    from_json_file,
    load_config,
    split_config_flags,
    to_json,
)
from mmjax.data.pipeline import require_usable, train_batches
from mmjax.data.preprocess import ImageOptions
from mmjax.data.sources import make_source, parse_mixture
from mmjax.data.stats import DataError, DataStats
from mmjax.evals.suite import EvalSuite, named_blocks
from mmjax.flops import peak_flops, train_flops_per_step
from mmjax.host_memory import tune_host_memory
from mmjax.losses import caption_loss
from mmjax.metric_writer import MetricWriter
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.models.video import input_frames, input_shape
from mmjax.optimizer import learning_rate_schedule, make_optimizer
from mmjax.preemption import StopRequests
from mmjax.sharded_losses import sharded_contrastive_loss
from mmjax.tokenizer import Tokenizer, load_or_train_tokenizer, load_tokenizer, read_captions
from mmjax.train_state import (
    HOST_MEMORY,
    TrainState,
    create_train_state,
    data_seed,
    state_shardings,
)

PAD_ID = 0


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


def loss_and_grads(
    params,
    batch: dict[str, jax.Array],
    *,
    model: CoCa,
    loss_config: ml_collections.ConfigDict,
    microbatches: int = 1,
    batch_axes: tuple[str, ...] = (),
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(loss, aux metrics, gradients) of the weighted CoCa loss on a global batch.

    With `microbatches` > 1 the batch is processed in that many slices, holding
    the activations of one slice at a time, and the result equals the one-batch
    computation: the embeddings of the whole batch are computed first (no
    gradient, as open_clip's accumulation does), then each slice is recomputed
    with gradient and its fresh embeddings replace their cached copies, so every
    slice's contrastive loss sees all the batch's negatives. The caption loss is
    a sum over tokens divided by the whole batch's token count.

    `batch_axes`: the mesh axes the batch is split over (under the current mesh).
    The contrastive loss then runs sharded (mmjax.sharded_losses: a ring for
    sigmoid, local logits for softmax), never holding B x B logits on a device.
    """
    images, tokens = batch["images"], batch["tokens"]
    caption_weight = loss_config.caption_weight
    contrastive_weight = loss_config.contrastive_weight
    with_captioning = caption_weight > 0
    num_tokens = jnp.maximum(jnp.sum(tokens[:, 1:] != PAD_ID), 1).astype(jnp.float32)

    def weighted_loss(params, images, tokens, embeddings=None):
        """The loss given the pairs' embeddings (None: this batch's own)."""
        out = model.apply({"params": params}, images, tokens, with_captioning=with_captioning)
        image_emb, text_emb, scale, bias = (
            out["image_emb"],
            out["text_emb"],
            out["scale"],
            out["bias"],
        )
        if embeddings is not None:
            image_emb, text_emb, scale, bias = embeddings(image_emb, text_emb, scale, bias)
        con = sharded_contrastive_loss(
            loss_config.contrastive, image_emb, text_emb, scale, bias, batch_axes=batch_axes
        )
        if with_captioning:
            mean, count = caption_loss(out["logits"], tokens[:, 1:], PAD_ID)
            cap = mean * count.astype(jnp.float32) / num_tokens
        else:  # CLIP-only ablation: the decoder is not run at all.
            cap = jnp.zeros((), jnp.float32)
        loss = contrastive_weight * con + caption_weight * cap
        return loss, dict(
            contrastive_loss=con, caption_loss=cap, temperature=1.0 / scale, logit_bias=bias
        )

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    if microbatches == 1:
        (loss, aux), grads = grad_fn(params, images, tokens)
        return loss, aux, grads

    batch_size = images.shape[0]
    if batch_size % microbatches:
        raise ValueError(f"batch {batch_size} is not divisible by {microbatches} micro-batches")

    def split(x):
        # Slice m is rows m, m+M, m+2M, ...: every device keeps an equal share of
        # every slice (the batch dim is sharded in contiguous blocks).
        return x.reshape(batch_size // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    def merge(x):  # [M, B/M, ...] -> [B, ...] in the original row order.
        return x.swapaxes(0, 1).reshape(batch_size, *x.shape[2:])

    def embed(slice_):
        slice_images, slice_tokens = slice_
        image_emb, _ = model.apply({"params": params}, slice_images, method=CoCa.encode_image)
        text_emb, _ = model.apply({"params": params}, slice_tokens, method=CoCa.encode_text)
        return image_emb, text_emb

    slices = (split(images), split(tokens))
    cached_images, cached_texts = jax.lax.stop_gradient(jax.lax.map(embed, slices))

    def accumulate(grads, xs):
        m, slice_images, slice_tokens = xs

        def embeddings(image_emb, text_emb, scale, bias):
            # The temperature and bias enter every slice's loss: only slice 0
            # passes their gradient, so it is counted once.
            first = m == 0
            scale = jnp.where(first, scale, jax.lax.stop_gradient(scale))
            bias = jnp.where(first, bias, jax.lax.stop_gradient(bias))
            image_all = merge(cached_images.at[m].set(image_emb.astype(cached_images.dtype)))
            text_all = merge(cached_texts.at[m].set(text_emb.astype(cached_texts.dtype)))
            return image_all, text_all, scale, bias

        (loss, aux), slice_grads = grad_fn(params, slice_images, slice_tokens, embeddings)
        grads = jax.tree.map(jnp.add, grads, slice_grads)
        return grads, (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, auxes) = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), *slices))
    # Every slice saw the same contrastive loss; caption losses are shares of the total.
    con = auxes["contrastive_loss"][0]
    cap = jnp.sum(auxes["caption_loss"])
    aux = dict(
        contrastive_loss=con,
        caption_loss=cap,
        temperature=auxes["temperature"][0],
        logit_bias=auxes["logit_bias"][0],
    )
    return contrastive_weight * con + caption_weight * cap, aux, grads


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: CoCa,
    tx: optax.GradientTransformation,
    loss_config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    microbatches: int = 1,
    batch_axes: tuple[str, ...] = (),
    offload: tuple[Any, Any] | None = None,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. Pure: no side effects, no host sync.

    `offload`: (device, host) shardings of the optimizer state when it lives in
    host memory between steps (optimizer.offload_state). `skip_nonfinite`
    (train.on_nan='skip'): a step whose loss or gradient norm is NaN/Inf keeps
    the old parameters and optimizer state (the step counter and data position
    still advance) and reports skipped_update=1.
    """
    loss, aux, grads = loss_and_grads(
        state.params,
        batch,
        model=model,
        loss_config=loss_config,
        microbatches=microbatches,
        batch_axes=batch_axes,
    )
    old_opt_state = state.opt_state
    if offload is not None:
        old_opt_state = jax.device_put(old_opt_state, offload[0])
    updates, opt_state = tx.update(grads, old_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step), **aux)
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), params, state.params)
        opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), opt_state, old_opt_state)
        metrics["skipped_update"] = 1.0 - finite.astype(jnp.float32)
    if offload is not None:
        opt_state = jax.device_put(opt_state, offload[1])
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        rng=jax.random.fold_in(state.rng, state.step),
    )
    return new_state, metrics


def check_devices(
    config: ml_collections.ConfigDict,
    num_devices: int,
    granules: tuple[str, int] | None = None,
) -> tuple[int, ...]:
    """Mesh, rules and batch checks that need the devices; raise ConfigError.

    `granules` is (kind, count) of the units the DCN mesh axes span (TPU slices,
    else processes); by default read from `jax.devices()`.
    """
    kind, count = granules if granules is not None else shd.granules(jax.devices())
    try:
        layout = shd.resolve_mesh(dict(config.mesh), num_devices, count, kind)
        rules = shd.rules_from_config(config.sharding_rules)
    except shd.MeshError as e:
        raise ConfigError(str(e)) from None
    sizes = dict(zip(shd.MESH_AXES, layout.shape))
    data_parallel = shd.data_parallel_size(sizes, rules)
    dcn = dict(zip(shd.MESH_AXES, layout.dcn))
    split = (
        " x ".join(
            f"mesh.dcn_{a}={dcn[a]} x mesh.{a}={sizes[a] // dcn[a]}"
            if dcn[a] > 1
            else f"mesh.{a}={sizes[a]}"
            for a in shd.batch_mesh_axes(rules)
        )
        or "no axis"
    )
    batch_sizes = [("batch_size", config.batch_size), ("eval.batch_size", config.eval.batch_size)]
    for name, block in named_blocks(config).items():
        if block.get("batch_size"):
            batch_sizes.append((f"evals.{name}.batch_size", block["batch_size"]))
    for key, value in batch_sizes:
        if value % data_parallel:
            raise ConfigError(
                f"{key}={value} is not divisible by the data-parallel size "
                f"{data_parallel} ({split})"
            )
        if value % jax.process_count():
            raise ConfigError(
                f"{key}={value} is not divisible by the {jax.process_count()} processes"
            )
    return layout.shape


def batch_shardings(mesh, rules, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Rows over the batch axes: images [B, S, S, 3], or clips [B, T, S, S, 3] for video."""
    image_ndim = 1 + len(input_shape(model_cfg)) if model_cfg is not None else 4
    return {
        "images": shd.batch_sharding(mesh, rules, image_ndim),
        "tokens": shd.batch_sharding(mesh, rules, 2),
    }


def _offload_shardings(state_shardings) -> tuple[Any, Any] | None:
    """(device, host) shardings of the optimizer state if it is kept in host memory."""
    host = state_shardings.opt_state
    if not any(s.memory_kind == HOST_MEMORY for s in jax.tree.leaves(host)):
        return None
    return jax.tree.map(lambda s: s.with_memory_kind("device"), host), host


def bind_train_step(config, model: CoCa, tx, rules, state_shardings=None):
    """`train_step` with everything the config decides bound: (state, batch) -> (state,
    metrics). `state_shardings` (optional) tell it where the optimizer state lives."""
    offload = _offload_shardings(state_shardings) if state_shardings is not None else None
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_config=config.loss,
        schedule=learning_rate_schedule(config),
        microbatches=config.train.microbatches,
        batch_axes=shd.batch_mesh_axes(rules),
        offload=offload,
        skip_nonfinite=config.train.on_nan == "skip",
    )


def compile_train_step(config, model: CoCa, tx, mesh, rules, abstract_state, state_shardings):
    """Ahead-of-time compiled train step with explicit in/out shardings, donated state.

    The same signature serves training, the benchmark and sharding tests.
    """
    step = bind_train_step(config, model, tx, rules, state_shardings)
    in_batch = batch_shardings(mesh, rules, model.cfg)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, in_batch),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    m = model.cfg
    abstract_batch = {
        "images": jax.ShapeDtypeStruct(
            (config.batch_size, *input_shape(m)), jnp.uint8, sharding=in_batch["images"]
        ),
        "tokens": jax.ShapeDtypeStruct(
            (config.batch_size, m.context_length), jnp.int32, sharding=in_batch["tokens"]
        ),
    }
    with shd.activate(mesh, rules):
        return jitted.lower(abstract_state, abstract_batch).compile()


def _finite_mean(values: list[float]) -> float:
    """Mean over the finite values (skipped NaN steps must not poison a log window)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# Model fields a run starting from init_from may set itself (numerics and memory only).
INIT_FROM_RUN_KEYS = ("dtype", "remat", "remat_vision", "remat_text", "remat_decoder")


def adopt_init_from(config: ml_collections.ConfigDict) -> None:
    """Takes model.* (and the tokenizer, unless data.tokenizer is set) from init_from's
    config.json, since the parameters must fit them; raises ConfigError in one line."""
    source = Path(config.init_from) / "config.json"
    if not source.is_file():
        raise ConfigError(f"init_from={config.init_from}: {source} not found")
    saved = from_json_file(source)
    model = saved.model.to_dict()
    for key in INIT_FROM_RUN_KEYS:
        if key in config.model:
            model[key] = config.model[key]
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
        if not config.data.tokenizer and saved.data.get("tokenizer", ""):
            config.data.tokenizer = saved.data.tokenizer
            config.data.tokenizer_type = saved.data.get("tokenizer_type", "sentencepiece")
    try:
        cfg = ModelConfig.from_mapping(model)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"init_from={config.init_from}: model: {e}") from None
    if not cfg.captioning and config.loss.caption_weight > 0:
        raise ConfigError(
            f"init_from={config.init_from} is a CLIP model without decoder: set "
            "--config.loss.caption_weight=0 (or use configs/clip.py)"
        )


class Trainer:
    """Owns everything a run needs; `fit()` trains, `restore()` loads a checkpoint."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str | Path, *, for_eval: bool = False
    ):
        self.config = config
        self.workdir = paths.absolute(workdir)
        self.is_chief = jax.process_index() == 0
        if config.get("init_from", ""):
            adopt_init_from(config)
        check_devices(config, jax.device_count())
        self.mesh = shd.make_mesh(dict(config.mesh))
        self.rules = shd.rules_from_config(config.sharding_rules)
        self.model_cfg = ModelConfig.from_mapping(config.model.to_dict())
        self.model = CoCa(self.model_cfg)
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
        self.tokenizer = self._tokenizer(for_eval)
        self.tx = make_optimizer(config)
        self.offload = bool(config.optimizer.get("offload_state", False))
        try:
            self.abstract_state, self.state_shardings = state_shardings(
                self.model, self.tx, self.mesh, self.rules, offload_opt_state=self.offload
            )
        except ValueError as e:  # No host memory space on this backend.
            raise ConfigError(str(e)) from None
        self.checkpointer = Checkpointer(
            self.workdir / "checkpoints", max_to_keep=config.keep_checkpoints
        )
        self._sum_counts = jax.jit(
            lambda rows: jnp.sum(rows, axis=0), out_shardings=shd.replicated(self.mesh)
        )
        self.evaluator = EvalSuite(
            config, self.model, self.mesh, self.rules, self.tokenizer, workdir=self.workdir
        )
        self.state: TrainState | None = None
        self.skipped_checkpoints: list[int] = []  # Unreadable ones newer than the restored one.
        self.preempted_at: int | None = None  # The step fit() stopped at on SIGTERM/SIGINT.
        self.nan_skipped_steps = 0  # train.on_nan='skip': updates skipped so far.

    def _tokenizer(self, for_eval: bool) -> Tokenizer:
        path = Path(self.config.data.tokenizer or self.workdir / "tokenizer.model")
        if for_eval or self.config.data.tokenizer:
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer {path} not found (data.tokenizer)")
            try:
                tok = load_tokenizer(path, self.config.data.get("tokenizer_type", "sentencepiece"))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        else:  # Trained once from the training captions, then cached in the workdir.
            tok = load_or_train_tokenizer(
                path,
                lambda: read_captions(
                    self.train_sources, self.config.data.tokenizer_captions, progress=self.is_chief
                ),
                self.config.data.tokenizer_vocab_size,
            )
        if tok.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the "
                f"tokenizer's vocabulary ({tok.vocab_size}, {path})"
            )
        return tok

    def _init_from(self, directory: str) -> TrainState:
        """The fresh state with its params replaced by DIR's newest readable checkpoint's
        (a training workdir or mmjax.convert's output); the optimizer state stays fresh."""
        from mmjax.predict import restore_params

        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state.params,
            self.state_shardings.params,
        )
        try:
            step, params = restore_params(Path(directory) / "checkpoints", abstract, warn=self._log)
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
        return compile_train_step(
            self.config,
            self.model,
            self.tx,
            self.mesh,
            self.rules,
            self.abstract_state,
            self.state_shardings,
        )

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
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Workdir lock, config vs config.json on resume, runs.jsonl: mmjax/run_record.py.
        run_record.start(
            self.workdir, cfg, self.mesh, checkpoint_step=self.checkpointer.latest_step()
        )
        if self.is_chief:
            (self.workdir / "config.json").write_text(to_json(cfg))
        # Tmp directories of saves a killed run never committed (safe under the workdir lock).
        for name in self.checkpointer.remove_incomplete():
            self._log(f"removed the unfinished save {self.checkpointer.directory}/{name}")
        latest = self.checkpointer.latest_step()
        if latest is not None:
            latest = self.restore()
            for bad in self.skipped_checkpoints:  # Out of the way: this run saves them again.
                moved = self.checkpointer.set_aside(bad)
                self._log(f"moved the unreadable checkpoint {bad} to {moved}")
            self._log(f"resumed from {self.checkpointer.directory}/{latest}")
        else:
            self.state = create_train_state(
                self.model, self.tx, self.mesh, self.rules, cfg.seed, offload_opt_state=self.offload
            )
            if cfg.get("init_from", ""):
                self.state = self._init_from(cfg.init_from)
        start_step = int(jax.device_get(self.state.step))

        t0 = time.perf_counter()
        step_fn = self.compile_step()
        compile_seconds = time.perf_counter() - t0
        distributed.align_processes("compiled")  # First step's collectives start together.
        with_captioning = cfg.loss.caption_weight > 0
        flops_per_step = train_flops_per_step(
            self.model_cfg, cfg.batch_size, with_captioning=with_captioning
        )
        peak, peak_source = peak_flops(self.model_cfg.dtype)
        self._log(
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
            f"devices; compiled in {compile_seconds:.1f}s; {flops_per_step / 1e9:.2f} GFLOP/step; "
            f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})"
        )

        batches = train_batches(
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
        writer = MetricWriter(
            self.workdir,
            enabled=self.is_chief,
            resume_step=start_step if latest is not None else None,
        )
        # In logs (no terminal) redraw rarely instead of filling them with bars.
        bar = tqdm(
            total=cfg.total_steps,
            initial=start_step,
            disable=not self.is_chief,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        window: list[dict[str, float]] = []
        pending = None  # (step, device metrics, device data counts), read one step late.
        window_start, window_steps = time.perf_counter(), 0
        last_eval: dict[str, float] = {}

        def read_pending():
            """Appends the pending step's metrics to the window; checks its loss (NaN) and
            the data counters (too many bad samples), raising to stop the run."""
            nonlocal pending, last_read
            step, metrics, counts = pending
            pending, last_read = None, step
            window.append(self._checked(step, metrics))
            self.data_stats.add(np.asarray(jax.device_get(counts)))
            for warning in self.data_stats.check(
                cfg.data.max_skip_fraction, cfg.data.min_samples_for_skip_check
            ):
                source = warning.split(":", 1)[0]
                if source not in warned:  # Loud once per source; metrics.jsonl keeps it.
                    warned.add(source)
                    self._log(f"WARNING: {warning}")

        def write_window(step):
            nonlocal window
            elapsed = time.perf_counter() - window_start
            summary = {k: _finite_mean([m[k] for m in window]) for k in window[0]}
            if cfg.train.on_nan == "skip":
                summary["nan_skipped_steps"] = float(self.nan_skipped_steps)
            summary["examples_per_sec"] = window_steps * cfg.batch_size / elapsed
            summary["step_seconds"] = elapsed / window_steps
            summary["mfu"] = flops_per_step * window_steps / elapsed / peak
            summary.update(self.data_stats.metrics())
            over = self.data_stats.over_limit(cfg.data.max_skip_fraction)
            if over:  # Below min_samples_for_skip_check (above it the run has stopped).
                summary["data/over_skip_fraction"] = max(bad / seen for _, bad, seen, _ in over)
            writer.write(step, summary)
            bar.set_postfix(
                loss=f"{summary['loss']:.3f}",
                ex_s=f"{summary['examples_per_sec']:.0f}",
                mfu=f"{summary['mfu']:.2f}",
            )
            window = []

        warned: set[str] = set()
        last_read = start_step
        end = cfg.total_steps
        if start_step < end and stop.should_stop(start_step):  # Signalled while starting up.
            self.preempted_at = end = start_step
        try:
            for step in range(start_step + 1, end + 1):
                batch = next(batches)
                counts = self._sum_counts(self._to_global(batch.pop("counts")))
                batch = self._to_device(batch)
                self.state, metrics = step_fn(self.state, batch)
                if pending is not None:  # Reading the previous step keeps the device queue full.
                    read_pending()
                pending = (step, metrics, counts)
                window_steps += 1
                bar.update(1)
                stopping = stop.should_stop(step) and step < cfg.total_steps
                boundary = step == cfg.total_steps or stopping
                do_log = step % cfg.log_every == 0 or boundary
                do_ckpt = step % cfg.checkpoint_every == 0 or boundary
                # A preempted run saves first and skips the evaluation (its grace time is short).
                do_eval = (self.evaluator.due(step) or boundary) and not stopping
                if not (do_log or do_ckpt or do_eval):
                    continue
                read_pending()  # Never save a state whose loss is NaN.
                if do_log:
                    write_window(step)
                if do_ckpt:
                    self.checkpointer.save(
                        step,
                        self.state,
                        batch_size=cfg.batch_size,
                        extra_meta={
                            "data_counts": self.data_stats.to_json(),
                            "nan_skipped_steps": self.nan_skipped_steps,
                        },
                    )
                if do_eval:
                    last_eval = self.evaluator.run(self.state.params, step, everything=boundary)
                    writer.write(step, last_eval)
                    if self.is_chief:  # A disabled bar still writes.
                        bar.write(
                            f"step {step}: "
                            + ", ".join(
                                f"{k[5:]}={v:.3f}"
                                for k, v in last_eval.items()
                                if k in HEADLINE_EVAL_KEYS or k.endswith(HEADLINE_EVAL_SUFFIXES)
                            )
                        )
                window_start, window_steps = time.perf_counter(), 0  # Exclude eval/ckpt time.
                if stopping:
                    self.preempted_at = step
                    break
        except DataError:
            if window:  # The steps trained up to the one whose counters stopped the run.
                write_window(last_read)
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
        return last_eval

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
            print(f"[mmjax] {message}", flush=True)

    def close(self) -> None:
        self.checkpointer.close()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    rest, overrides = split_config_flags(argv)
    parser = cli.ArgumentParser(prog="python -m mmjax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="where checkpoints and metrics go")
    return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        workdir = paths.workdir(args.workdir)
        distributed.initialize()  # Before anything touches the devices.
        config = load_config(args.config, overrides)
        trainer = Trainer(config, workdir)
    except (ConfigError, paths.PathError, FileNotFoundError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # A source with no usable sample.
        print(f"error: {e}", file=sys.stderr)
        return 4
    try:
        trainer.fit()
    except (run_record.RunRefused, CheckpointError) as e:  # Workdir in use, config changed,
        print(f"error: {e}", file=sys.stderr)  # or no checkpoint that restores.
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    finally:
        trainer.close()
    if trainer.is_chief and trainer.preempted_at is not None:
        saved = trainer.checkpointer.directory / str(trainer.preempted_at)
        print(
            f"[mmjax] preempted at step {trainer.preempted_at}"
            + (f", checkpoint saved in {saved}" if saved.is_dir() else "")
            + "; to resume, rerun the same command: python -m mmjax.train "
            + shlex.join(argv),
            flush=True,
        )
    elif trainer.is_chief:
        print(
            f"[mmjax] done: metrics in {Path(args.workdir) / 'metrics.jsonl'}, checkpoints in "
            f"{Path(args.workdir) / 'checkpoints'}, TensorBoard logs in "
            f"{Path(args.workdir) / 'tensorboard'}"
        )
        for warning in trainer.data_warnings():
            print(f"[mmjax] {warning}", flush=True)
    return 0


if __name__ == "__main__":
    tune_host_memory()
    sys.exit(main())
