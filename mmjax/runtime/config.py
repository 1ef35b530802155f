"""Experiment configs: `path.py:arg` files plus `--config.KEY=VALUE` overrides.

Configs are ml_collections ConfigDicts returned by `get_config(arg)` in a
Python file (big_vision style). Every mistake a user can make here ends in a
ConfigError whose message is one line naming the key and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from mmjax.models.config import SIZES, ModelConfig

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
ON_NAN = ("halt", "skip")
_SPEC_KEYS = ("data.train", "data.eval")  # data source specs, see mmjax.data.sources


class ConfigError(ValueError):
    """A config problem, explained in one line."""


def load_module(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config file {str(path)!r} does not exist")
    name = f"mmjax_config_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str):
    """Imports another config file from the same folder (variants build on coca.py)."""
    return load_module(Path(file).with_name(f"{name}.py"))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'size=tiny,steps=100' -> ConfigDict; keys must be among `defaults`."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config argument {item!r} is not KEY=VALUE")
        if key not in defaults:
            raise ConfigError(f"config argument {key!r} is unknown; allowed: {sorted(defaults)}")
        values[key] = _convert(value, defaults[key], f"config argument {key}")
    return ml_collections.ConfigDict(values)


def model_size(size: str) -> dict[str, Any]:
    """Every ModelConfig field, with the named size's values filled in."""
    if size not in SIZES:
        raise ConfigError(f"size={size!r} is unknown; allowed: {list(SIZES)}")
    return dataclasses.asdict(ModelConfig(**SIZES[size]))


def _convert(text: str, current: Any, where: str) -> Any:
    """Parses `text` into the type of the value it replaces."""
    try:
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str) or current is None:
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return type(current)(value)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}={text!r} is not a valid {type(current).__name__}") from None
    raise ConfigError(
        f"{where} cannot be set from the command line (it is a {type(current).__name__})"
    )


def _literal(text: str) -> Any:
    """A Python literal (number, bool, dict, list...) or else the text as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _add_evaluator_setting(config: ml_collections.ConfigDict, parts: list[str], text: str) -> bool:
    """`evals.NAME={...}` adds an evaluator, `evals.NAME.KEY=V` adds a setting (the evaluator
    checks the names); True when the override was such an addition."""
    if parts[0] != "evals" or len(parts) not in (2, 3):
        return False
    if "evals" not in config:  # A run configured before named evaluators existed.
        config.evals = ml_collections.ConfigDict()
    evals = config.evals
    if len(parts) == 2 and parts[1] not in evals:
        value = _literal(text)
        if not isinstance(value, dict):
            raise ConfigError(
                f"--config.evals.{parts[1]} adds an evaluator: give a dict, e.g. "
                "\"{'type': 'zeroshot', 'classes': 'classes.txt'}\""
            )
        evals[parts[1]] = ml_collections.ConfigDict(value)
        return True
    if len(parts) == 3 and parts[1] in evals and parts[2] not in evals[parts[1]]:
        evals[parts[1]][parts[2]] = _literal(text)
        return True
    return False


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    node = config
    parts = dotted.split(".")
    if _add_evaluator_setting(config, parts, text):
        return
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = f"under {prefix!r}" if prefix else "at the top level"
            allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key {dotted!r}; allowed keys {where}: {allowed}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {dotted!r} is a group; set one of {sorted(current.keys())}")
    if dotted in _SPEC_KEYS:
        # A spec or a mixture literal: parsed and checked by validate().
        with node.ignore_type():
            node[parts[-1]] = text
        return
    node[parts[-1]] = _convert(text, current, f"config.{dotted}")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`spec` is 'path.py' or 'path.py:arg'; overrides are 'KEY=VALUE' strings."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config file {path!r} has no get_config(arg) function")
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override --config.{item} needs a value: --config.{key}=VALUE")
        apply_override(config, key, value)
    validate(config)
    absolute_paths(config)
    return config


def absolute_paths(config: ml_collections.ConfigDict) -> None:
    """Makes the paths a config names absolute (against the working directory), so that
    config.json names the same files whichever folder a later command runs from."""
    from mmjax.data.sources import absolute_mixture, absolute_spec

    with config.data.ignore_type():
        config.data.train = absolute_mixture(config.data.train)
    config.data.eval = absolute_spec(config.data.eval)
    if config.data.get("tokenizer"):
        config.data.tokenizer = os.path.abspath(os.path.expanduser(config.data.tokenizer))
    if config.get("init_from"):
        config.init_from = os.path.abspath(os.path.expanduser(config.init_from))
    for block in (config.get("evals") or {}).values():
        for key in ("data", "train_data"):
            try:
                if block.get(key):
                    block[key] = absolute_spec(block[key])
            except ValueError:
                pass  # Not a spec: the evaluator names it when it is built.


def split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates '--config.KEY=VALUE' (and '--config.KEY VALUE') from other args."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked without devices (the mesh is checked at startup)."""
    _validate_data(config.data)
    if config.loss.contrastive not in CONTRASTIVE_LOSSES:
        raise ConfigError(
            f"loss.contrastive={config.loss.contrastive!r} is unknown; "
            f"allowed: {list(CONTRASTIVE_LOSSES)}"
        )
    for key in ("contrastive_weight", "caption_weight"):
        if config.loss[key] < 0:
            raise ConfigError(f"loss.{key}={config.loss[key]} must be >= 0")
    if config.loss.contrastive_weight == 0 and config.loss.caption_weight == 0:
        raise ConfigError(
            "loss.contrastive_weight and loss.caption_weight are both 0: nothing to train"
        )
    for key in ("batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[key] < 1:
            raise ConfigError(f"{key}={config[key]} must be >= 1")
    if not isinstance(config.get("allow_config_change", False), bool):
        raise ConfigError(
            f"allow_config_change={config.allow_config_change!r} must be True or False"
        )
    if config.train.on_nan not in ON_NAN:
        raise ConfigError(
            f"train.on_nan={config.train.on_nan!r} is unknown; allowed: {list(ON_NAN)}"
        )
    if config.train.microbatches < 1 or config.batch_size % config.train.microbatches:
        raise ConfigError(
            f"train.microbatches={config.train.microbatches} must be >= 1 and divide "
            f"batch_size={config.batch_size}"
        )
    try:
        ModelConfig.from_mapping(config.model.to_dict()).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    known = set(ModelConfig.__dataclass_fields__)
    extra = sorted(set(config.model.keys()) - known)
    if extra:
        raise ConfigError(f"model.{extra[0]} is not a model field; allowed: {sorted(known)}")


def _validate_data(data: ml_collections.ConfigDict) -> None:
    from mmjax.data.preprocess import ImageOptions  # Late: keeps config loading light.
    from mmjax.data.sources import parse_mixture, parse_spec

    try:
        parse_mixture(data.train)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data.train: {e}") from None
    if not isinstance(data.eval, str) or data.eval.lstrip().startswith(("[", "(")):
        raise ConfigError(f"data.eval={data.eval!r} must be one source spec, not a mixture")
    try:
        parse_spec(data.eval)
    except ValueError as e:
        raise ConfigError(f"data.eval: {e}") from None
    try:
        ImageOptions(
            image_size=1,
            train=True,
            crop_scale=tuple(data.crop_scale),
            crop_ratio=tuple(data.crop_ratio),
            color_jitter=data.color_jitter,
            max_pixels=data.max_image_pixels,
        )
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    if not 0 <= data.max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction={data.max_skip_fraction} must be in [0, 1]")
    for key in ("workers", "min_samples_for_skip_check"):
        if data[key] < 0:
            raise ConfigError(f"data.{key}={data[key]} must be >= 0")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json_file(path: str | Path) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
