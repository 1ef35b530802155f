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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags as absl_flags
from ml_collections import config_flags

from mmjax import storage
from mmjax.models.config import LEGACY_KEYS, SIZES, ModelConfig, upgrade_legacy_keys

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
ON_NAN = ("halt", "skip")


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
    return dataclasses.asdict(ModelConfig.from_mapping(SIZES[size]))


def _convert(text: str, current: Any, where: str) -> Any:
    """A config argument (`path.py:KEY=VALUE,...`) parsed into its default's type."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1", "yes", "false", "0", "no"):
                return text.lower() in ("true", "1", "yes")
            raise ValueError
        if isinstance(current, (int, float)):
            return type(current)(text)
        return text
    except ValueError:
        raise ConfigError(f"{where}={text!r} is not a valid {type(current).__name__}") from None


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


def _diagnose(config: ml_collections.ConfigDict, dotted: str, text: str) -> ConfigError:
    """The one-line error for an override config_flags refused: the first missing key with
    the keys allowed there, a group given a value, or a value of the wrong type."""
    _refuse_legacy_model_key(dotted)
    node: Any = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:i])
            where = f"under {prefix!r}" if prefix else "at the top level"
            allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return ConfigError(f"unknown config key {dotted!r}; allowed keys {where}: {allowed}")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        return ConfigError(f"config key {dotted!r} is a group; set one of {sorted(node.keys())}")
    return ConfigError(f"config.{dotted}={text!r} is not a valid {type(node).__name__}")


def _innermost_config_error(error: BaseException) -> ConfigError | None:
    """config_flags re-raises a config file's ValueError with its traceback as the message;
    the ConfigError the file raised is further down the exception context."""
    found = None
    while error is not None:
        if isinstance(error, ConfigError) and "\n" not in str(error):
            found = error
        error = error.__context__
    return found


Pairs = list[tuple[str, str]]


def _split_overrides(overrides: Sequence[str]) -> tuple[Pairs, Pairs]:
    """'KEY=VALUE' strings -> (config_flags' overrides, evaluator overrides).

    A key given twice keeps its last value, as for any flag: config_flags itself would
    concatenate repeated values of a tuple field ((1, 1) twice -> four entries)."""
    flags_part: dict[str, str] = {}
    evals_part = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override --config.{item} needs a value: --config.{key}=VALUE")
        _refuse_legacy_model_key(key)
        if key.split(".")[0] == "evals":
            evals_part.append((key, value))
        else:
            flags_part.pop(key, None)
            flags_part[key] = value
    return list(flags_part.items()), evals_part


def _parse_with_config_flags(define, pairs: Pairs, diagnose_config) -> ml_collections.ConfigDict:
    """Runs absl over `--config... --config.KEY=VALUE...` with one config flag defined by
    `define(flag_values, argv)`; refusals become one-line ConfigErrors."""
    argv = ["mmjax", *define.argv, *(f"--config.{key}={value}" for key, value in pairs)]
    flag_values = absl_flags.FlagValues()
    try:  # Defining the flag already parses argv.
        define(flag_values, argv)
        flag_values(argv)
        return flag_values.config
    except (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        inner = _innermost_config_error(e)
        if inner is not None:
            raise inner from None
        config = diagnose_config()
        for key, value in pairs:
            error = _diagnose(config, key, value)
            if "is not a valid" not in str(error) or f"--config.{key}=" in str(e):
                raise error from None
        raise ConfigError(str(e).splitlines()[0]) from None


class _ConfigFile:
    """config_flags.DEFINE_config_file for one `path.py[:arg]` spec."""

    def __init__(self, spec: str):
        self.argv = [f"--config={spec}"]

    def __call__(self, flag_values, argv):
        config_flags.DEFINE_config_file(
            "config", flag_values=flag_values, lock_config=False, sys_argv=argv
        )


class _ConfigDict:
    """config_flags.DEFINE_config_dict for a config already in hand (a saved config.json)."""

    argv: list[str] = []

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def __call__(self, flag_values, argv):
        config_flags.DEFINE_config_dict(
            "config", self.config, flag_values=flag_values, lock_config=False, sys_argv=argv
        )


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies 'KEY=VALUE' overrides to `config` in place, through config_flags (evaluator
    additions, which config_flags cannot express, through `_add_evaluator_setting`)."""
    flags_part, evals_part = _split_overrides(overrides)
    _apply_evaluator_overrides(config, evals_part)
    if flags_part:
        parsed = _parse_with_config_flags(_ConfigDict(config), flags_part, lambda: config)
        assert parsed is config, "config_flags overrides a config dict in place"


def _apply_evaluator_overrides(config: ml_collections.ConfigDict, pairs: Pairs) -> None:
    existing = []
    for key, value in pairs:
        if not _add_evaluator_setting(config, key.split("."), value):
            existing.append((key, value))
    if existing:
        _parse_with_config_flags(_ConfigDict(config), existing, lambda: config)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`spec` is 'path.py' or 'path.py:arg'; overrides are 'KEY=VALUE' strings.

    The file and the overrides go through ml_collections' config_flags (absl flags), as
    `--config spec --config.KEY=VALUE`; evaluators may also be added by name."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--config file {path!r} does not exist")

    def loaded_by_hand() -> ml_collections.ConfigDict:  # Only to name what was refused.
        module = load_module(path)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config file {path!r} has no get_config(arg) function")
        return module.get_config(arg or None)

    flags_part, evals_part = _split_overrides(overrides)
    config = _parse_with_config_flags(_ConfigFile(spec), flags_part, loaded_by_hand)
    _apply_evaluator_overrides(config, evals_part)
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
        config.data.tokenizer = str(storage.path(config.data.tokenizer))
    if config.get("init_from"):
        config.init_from = str(storage.path(config.init_from))
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
    caption_logits = config.loss.get("caption_logits", "auto")
    if caption_logits not in ("auto", "full", "chunked"):  # training.objective.CAPTION_LOGITS
        raise ConfigError(
            f"loss.caption_logits={caption_logits!r} is unknown; allowed: auto, full, chunked"
        )
    if config.loss.get("sharded_softmax", "gather") not in ("gather", "ring"):
        raise ConfigError(
            f"loss.sharded_softmax={config.loss.sharded_softmax!r} is unknown; allowed: "
            "gather, ring"
        )
    if config.loss.get("caption_chunk", 16) < 1:
        raise ConfigError(f"loss.caption_chunk={config.loss.caption_chunk} must be >= 1")
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
    _validate_model_keys(config.model)
    try:
        ModelConfig.from_mapping(config.model.to_dict()).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _refuse_legacy_model_key(dotted: str) -> None:
    group, _, name = dotted.partition(".")
    if group == "model" and name in LEGACY_KEYS:
        raise ConfigError(f"config key {dotted!r} was renamed 'model.{LEGACY_KEYS[name]}'")


def _validate_model_keys(model: ml_collections.ConfigDict) -> None:
    """Every key of config.model must be a ModelConfig field (per group)."""
    for key in model.keys():
        _refuse_legacy_model_key(f"model.{key}")
    reference = dataclasses.asdict(ModelConfig())
    for key in model.keys():
        if key not in reference:
            raise ConfigError(f"model.{key} is not a model field; allowed: {sorted(reference)}")
        if isinstance(reference[key], dict):
            if not isinstance(model[key], ml_collections.ConfigDict):
                raise ConfigError(f"model.{key} is a group of settings, not a value")
            extra = sorted(set(model[key].keys()) - set(reference[key]))
            if extra:
                raise ConfigError(
                    f"model.{key}.{extra[0]} is not a model field; allowed: "
                    f"{sorted(reference[key])}"
                )


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
    """A saved config.json; model keys of runs saved before the per-tower grouping are
    upgraded to their grouped names (models.config.LEGACY_KEYS)."""
    values = json.loads(storage.read_text(storage.path(path)))
    if isinstance(values.get("model"), dict):
        values["model"] = upgrade_legacy_keys(values["model"])
    return ml_collections.ConfigDict(values)
