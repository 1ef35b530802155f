"""Hugging Face `CLIPModel` directories in and out, through open_clip's layout.

transformers' CLIPModel and open_clip's CLIP are the same network under other names (its
q/k/v projections are separate, open_clip's fused; its projections are stored [out, in]).
So a `save_pretrained` directory is renamed into an open_clip state dict and model config
and imported by mmjax.interop.open_clip, and an export goes the other way from the open_clip
export: one tensor mapping (mmjax <-> open_clip) plus renames, tested both ways.

Read locally only (`config.json`, `model.safetensors`, `preprocessor_config.json`); nothing
is downloaded. Needs numpy and safetensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmjax.interop.open_clip import OPENAI_MEAN, OPENAI_STD, ConversionError

WEIGHTS = "model.safetensors"
# transformers' defaults (CLIPTextConfig / CLIPVisionConfig / CLIPConfig), for keys a config
# leaves out.
_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
             layer_norm_eps=1e-5, eos_token_id=49407)  # fmt: skip
_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
               hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # -> open_clip's quick_gelu flag


def _towers(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_type = config.get("model_type")
    if model_type != "clip":
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported (supported: 'clip', "
            "a transformers CLIPModel, and 'siglip', a SiglipModel)"
        )
    text = {**_TEXT, **config.get("text_config", {})}
    vision = {**_VISION, **config.get("vision_config", {})}
    return text, vision


def open_clip_config(config: dict[str, Any], preprocessor: dict[str, Any] | None) -> dict:
    """The open_clip model config of a transformers CLIPConfig (as config.json holds it)."""
    text, vision = _towers(config)
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise ConversionError(
            f"config.json: hidden_act {sorted(acts)} is not supported (both towers one of "
            f"{sorted(ACTIVATIONS)})"
        )
    for name, tower in (("text_config", text), ("vision_config", vision)):
        if tower["layer_norm_eps"] != 1e-5:
            raise ConversionError(f"config.json: {name}.layer_norm_eps must be 1e-05")
    if vision["num_channels"] != 3:
        raise ConversionError("config.json: vision_config.num_channels must be 3")
    eos, vocab = text["eos_token_id"], text["vocab_size"]
    if eos not in (2, vocab - 1):  # 2: transformers' legacy argmax pooling.
        raise ConversionError(
            f"config.json: text_config.eos_token_id={eos}: mmjax pools at the highest token "
            f"id, which is the EOS only when it is the last id ({vocab - 1})"
        )
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    pre = preprocessor or {}
    return {
        "embed_dim": int(config.get("projection_dim", 512)),
        "quick_gelu": ACTIVATIONS[acts.pop()],
        "init_logit_scale": float(config.get("logit_scale_init_value", math.log(1 / 0.07))),
        "vision_cfg": {
            "image_size": int(vision["image_size"]),
            "patch_size": int(vision["patch_size"]),
            "width": int(width),
            "layers": int(vision["num_hidden_layers"]),
            "head_width": int(width // heads),
            "mlp_ratio": vision["intermediate_size"] / width,
        },
        "text_cfg": {
            "context_length": int(text["max_position_embeddings"]),
            "vocab_size": int(vocab),
            "width": int(text["hidden_size"]),
            "heads": int(text["num_attention_heads"]),
            "layers": int(text["num_hidden_layers"]),
            "mlp_ratio": text["intermediate_size"] / text["hidden_size"],
        },
        "preprocess_cfg": {
            "mean": list(pre.get("image_mean", OPENAI_MEAN)),
            "std": list(pre.get("image_std", OPENAI_STD)),
        },
    }


def _tower_renames(hf: str, oc: str, layers: int) -> list[tuple[str, str]]:
    names = []
    for i in range(layers):
        h, o = f"{hf}.encoder.layers.{i}", f"{oc}transformer.resblocks.{i}"
        names += [
            (f"{h}.self_attn.out_proj.weight", f"{o}.attn.out_proj.weight"),
            (f"{h}.self_attn.out_proj.bias", f"{o}.attn.out_proj.bias"),
            (f"{h}.layer_norm1.weight", f"{o}.ln_1.weight"),
            (f"{h}.layer_norm1.bias", f"{o}.ln_1.bias"),
            (f"{h}.layer_norm2.weight", f"{o}.ln_2.weight"),
            (f"{h}.layer_norm2.bias", f"{o}.ln_2.bias"),
            (f"{h}.mlp.fc1.weight", f"{o}.mlp.c_fc.weight"),
            (f"{h}.mlp.fc1.bias", f"{o}.mlp.c_fc.bias"),
            (f"{h}.mlp.fc2.weight", f"{o}.mlp.c_proj.weight"),
            (f"{h}.mlp.fc2.bias", f"{o}.mlp.c_proj.bias"),
        ]
    return names


def _renames(oc: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(plain renames hf -> open_clip, transposed ones, attention prefixes (hf, open_clip))."""
    vl, tl = oc["vision_cfg"]["layers"], oc["text_cfg"]["layers"]
    plain = [
        ("logit_scale", "logit_scale"),
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        ("text_model.final_layer_norm.weight", "ln_final.weight"),
        ("text_model.final_layer_norm.bias", "ln_final.bias"),
        ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
        ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
        ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
        ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
        ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
        ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
        ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
        *_tower_renames("text_model", "", tl),
        *_tower_renames("vision_model", "visual.", vl),
    ]
    transposed = [
        ("visual_projection.weight", "visual.proj"),
        ("text_projection.weight", "text_projection"),
    ]
    attention = [
        (f"text_model.encoder.layers.{i}.self_attn", f"transformer.resblocks.{i}.attn")
        for i in range(tl)
    ] + [
        (f"vision_model.encoder.layers.{i}.self_attn", f"visual.transformer.resblocks.{i}.attn")
        for i in range(vl)
    ]
    return plain, transposed, attention


# Buffers transformers may save that carry no parameters.
_IGNORED = ("position_ids",)


def to_open_clip_state(hf: dict[str, np.ndarray], oc: dict) -> dict[str, np.ndarray]:
    """A CLIPModel state dict -> open_clip CLIP tensors; missing and unexpected tensors
    are reported by name."""
    plain, transposed, attention = _renames(oc)
    wanted = {h for h, _ in plain + transposed}
    for h, _ in attention:
        wanted |= {f"{h}.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")}
    present = {k for k in hf if not k.endswith(_IGNORED)}
    missing, extra = sorted(wanted - present), sorted(present - wanted)
    if missing or extra:
        parts = [f"missing tensors {missing}" if missing else "",
                 f"unexpected tensors {extra}" if extra else ""]  # fmt: skip
        raise ConversionError(
            "model.safetensors does not match config.json: " + "; ".join(p for p in parts if p)
        )
    state = {o: hf[h] for h, o in plain}
    state.update({o: np.ascontiguousarray(hf[h].T) for h, o in transposed})
    for h, o in attention:
        state[f"{o}.in_proj_weight"] = np.concatenate([hf[f"{h}.{p}_proj.weight"] for p in "qkv"])
        state[f"{o}.in_proj_bias"] = np.concatenate([hf[f"{h}.{p}_proj.bias"] for p in "qkv"])
    return state


def from_open_clip_state(state: dict[str, np.ndarray], oc: dict) -> dict[str, np.ndarray]:
    """to_open_clip_state in reverse."""
    plain, transposed, attention = _renames(oc)
    hf = {h: state[o] for h, o in plain}
    hf.update({h: np.ascontiguousarray(state[o].T) for h, o in transposed})
    for h, o in attention:
        for name, key in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
            for p, part in zip("qkv", np.split(state[f"{o}.{name}"], 3), strict=True):
                hf[f"{h}.{p}_proj.{key}"] = np.ascontiguousarray(part)
    return hf


def hf_config(oc: dict) -> dict[str, Any]:
    """open_clip_config in reverse: the config.json of the CLIPModel."""
    v, t = oc["vision_cfg"], oc["text_cfg"]
    act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": oc["embed_dim"],
        "logit_scale_init_value": oc.get("init_logit_scale", math.log(1 / 0.07)),
        "text_config": {
            "vocab_size": t["vocab_size"],
            "hidden_size": t["width"],
            "intermediate_size": int(t["mlp_ratio"] * t["width"]),
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "max_position_embeddings": t["context_length"],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": oc["embed_dim"],
            "bos_token_id": t["vocab_size"] - 2,
            "eos_token_id": t["vocab_size"] - 1,
        },
        "vision_config": {
            "hidden_size": v["width"],
            "intermediate_size": int(v["mlp_ratio"] * v["width"]),
            "num_hidden_layers": v["layers"],
            "num_attention_heads": v["width"] // v["head_width"],
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": oc["embed_dim"],
        },
    }


def read_model_dir(model_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(open_clip model config, open_clip state dict) of a save_pretrained directory."""
    from mmjax.interop.open_clip import load_checkpoint

    directory = Path(model_dir)
    config_path, weights = directory / "config.json", directory / WEIGHTS
    for path in (config_path, weights):
        if not path.is_file():
            raise ConversionError(f"--model-dir {directory}: no {path.name}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ConversionError(f"{config_path}: not JSON ({e})") from None
    pre_path = directory / "preprocessor_config.json"
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    oc = open_clip_config(config, preprocessor)
    return oc, to_open_clip_state(load_checkpoint(weights), oc)
