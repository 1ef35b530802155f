"""One run set-up for training, evaluation, the dry run and the benchmarks.

`build_run(config)` checks the config against the devices and builds, in this order, the
mesh, the logical sharding rules, the model, the optimizer and the abstract sharded train
state: everything a run needs before it touches data or real arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax

from mmjax import storage
from mmjax.models import attention
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError, from_json_file
from mmjax.text.registry import load_tokenizer, tokenizer_path
from mmjax.text.tokenizer import TextTokenizer
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import TrainState, create_train_state, state_shardings
from mmjax.training.step import compile_train_step


def check_devices(
    config: ml_collections.ConfigDict,
    num_devices: int,
    granules: tuple[str, int] | None = None,
) -> tuple[int, ...]:
    """Mesh, rules and batch checks that need the devices; raise ConfigError.

    `granules` is (kind, count) of the units the DCN mesh axes span (TPU slices,
    else processes); by default read from `jax.devices()`. Every batch the run shards is
    checked: training, the default evaluation and each named evaluator's (config.evals).
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
    batch_sizes = [
        ("batch_size", config.batch_size),
        ("eval.batch_size", config.eval.batch_size),
    ]
    for name, block in (config.get("evals") or {}).items():
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


# Model fields a run starting from init_from may set itself (numerics and memory only).
INIT_FROM_RUN_KEYS = ("dtype", "remat", "vision.remat", "text.remat", "decoder.remat")


def adopt_init_from(config: ml_collections.ConfigDict) -> None:
    """Takes model.* (and the tokenizer, unless data.tokenizer is set) from init_from's
    config.json, since the parameters must fit them; raises ConfigError in one line."""
    source = storage.path(config.init_from) / "config.json"
    if not storage.retry(source.is_file, f"init_from={config.init_from}"):
        raise ConfigError(f"init_from={config.init_from}: {source} not found")
    saved = from_json_file(source)
    model = saved.model.to_dict()
    for key in INIT_FROM_RUN_KEYS:
        *groups, name = key.split(".")
        mine, theirs = config.model, model
        for group in groups:
            mine, theirs = mine.get(group, {}), theirs.setdefault(group, {})
        if name in mine:
            theirs[name] = mine[name]
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


def check_vocabulary(tokenizer: TextTokenizer, model_cfg: ModelConfig, path: Path) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}, {path})"
        )


def existing_tokenizer(
    config: ml_collections.ConfigDict, workdir: Path, model_cfg: ModelConfig
) -> TextTokenizer:
    """The run's tokenizer, which must exist; FileNotFoundError or ConfigError in one line."""
    path = tokenizer_path(config.data, workdir)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found (data.tokenizer)")
    try:
        tokenizer = load_tokenizer(path, config.data.get("tokenizer_type", "sentencepiece"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_vocabulary(tokenizer, model_cfg, path)
    return tokenizer


@dataclasses.dataclass
class Run:
    """What `build_run` decides: the mesh and rules, the model and optimizer, the state layout."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: Any
    model_cfg: ModelConfig
    model: CoCa
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs, each with its sharding.
    state_shardings: TrainState
    offload: bool  # optimizer.offload_state: the optimizer state lives in host memory.

    @property
    def abstract_params(self) -> Any:
        """The parameters' ShapeDtypeStructs with their shardings (what a restore reads into)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state.params,
            self.state_shardings.params,
        )

    def create_state(self) -> TrainState:
        """The freshly initialised state, created directly sharded."""
        return create_train_state(
            self.model,
            self.tx,
            self.mesh,
            self.rules,
            self.config.seed,
            offload_opt_state=self.offload,
        )

    def compile_step(self):
        """The train step compiled ahead of time for this run's shardings."""
        return compile_train_step(
            self.config,
            self.model,
            self.tx,
            self.mesh,
            self.rules,
            self.abstract_state,
            self.state_shardings,
        )


def build_run(
    config: ml_collections.ConfigDict,
    *,
    devices: Sequence[Any] | None = None,
    granule_of: Callable[[Any], int] | None = None,
    granules: tuple[str, int] | None = None,
    adopt_init_from_model: bool = True,
) -> Run:
    """The run `config` describes, on `devices` (default: all); ConfigError in one line.

    `granule_of`/`granules` stand in for slices or processes when one process simulates a
    multi-slice mesh (mmjax dryrun). A config with init_from takes that run's model first,
    unless `adopt_init_from_model` is False (a saved config.json, which holds it already).
    """
    if adopt_init_from_model and config.get("init_from", ""):
        adopt_init_from(config)
    devices = list(devices) if devices is not None else jax.devices()
    # The slices or processes of these devices (a TPU topology's, in a dry run).
    check_devices(config, len(devices), granules or shd.granules(devices))
    mesh = shd.make_mesh(dict(config.mesh), devices, granule_of)
    rules = shd.rules_from_config(config.sharding_rules)
    model_cfg = ModelConfig.from_mapping(config.model.to_dict())
    try:
        attention.check_available(model_cfg.attention, devices[0].platform)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = CoCa(model_cfg)
    tx = make_optimizer(config)
    offload = bool(config.optimizer.get("offload_state", False))
    try:
        abstract, shardings = state_shardings(model, tx, mesh, rules, offload_opt_state=offload)
    except ValueError as e:  # No host memory space on this backend.
        raise ConfigError(str(e)) from None
    return Run(config, mesh, rules, model_cfg, model, tx, abstract, shardings, offload)
