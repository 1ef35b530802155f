"""Hugging Face `SiglipModel` directories in and out.

  mmjax convert hf --model-dir siglip_dir --out runs/siglip     # model_type 'siglip'
  mmjax export hf --workdir runs/siglip --out exported_hf/      # a sigmoid run -> SiglipModel

SigLIP in mmjax's terms: a ViT without class token whose blocks end in a LayerNorm and a
multihead attention pooling head (model.vision.pool='map'), the pooled vector being the image
embedding (vision.proj=False); a bidirectional text transformer pooled at its last position
(text.pool='last') and projected with a bias (text.proj_bias); sigmoid loss with a learnt
logit bias; the SentencePiece tokenizer in SigLIP's layout (mmjax.text.siglip, from the
directory's spiece.model). The tensors map straight onto mmjax's parameters by the rules of
mmjax.interop.tensor_map, which also run backwards for the export; big_vision's `.npz`
checkpoints are renamed into this layout first (mmjax.interop.big_vision).

Read locally only (`config.json`, `model.safetensors`, `preprocessor_config.json`,
`spiece.model`); nothing is downloaded. Needs numpy and safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.interop import tensor_map
from mmjax.interop.tensor_map import ConversionError, Rules
from mmjax.models.config import ModelConfig

MODEL_TYPE = "siglip"
TOKENIZER_FILE = "spiece.model"
# transformers' defaults (SiglipTextConfig / SiglipVisionConfig), for keys a config leaves out.
_TEXT = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
             layer_norm_eps=1e-6)  # fmt: skip
_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
               hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)  # fmt: skip
# transformers' activation names -> model.mlp_activation (gelu_new is the tanh formula too).
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
               "quick_gelu": "quick_gelu"}  # fmt: skip
_EXPORTED_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu",
                         "quick_gelu": "quick_gelu"}  # fmt: skip
# Buffers transformers may save that carry no parameters.
_IGNORED = ("position_ids",)


def _towers(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    text = {**_TEXT, **config.get("text_config", {})}
    vision = {**_VISION, **config.get("vision_config", {})}
    return text, vision


def model_config(
    config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
) -> ModelConfig:
    """The ModelConfig of a transformers SiglipConfig (as config.json holds it)."""
    text, vision = _towers(config)
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise ConversionError(
            f"config.json: hidden_act {sorted(acts)} is not supported (both towers one of "
            f"{sorted(ACTIVATIONS)})"
        )
    eps = {text["layer_norm_eps"], vision["layer_norm_eps"]}
    if len(eps) != 1:
        raise ConversionError(f"config.json: the towers' layer_norm_eps differ: {sorted(eps)}")
    if vision["num_channels"] != 3:
        raise ConversionError("config.json: vision_config.num_channels must be 3")
    if not vision.get("vision_use_head", True):
        raise ConversionError(
            "config.json: vision_config.vision_use_head=false (no pooling head) is not supported"
        )
    width = int(vision["hidden_size"])
    projection = int(text.get("projection_size") or text["hidden_size"])
    if projection != width:
        raise ConversionError(
            f"config.json: the text head's output ({projection}) must equal the image "
            f"tower's width ({width}): SigLIP's image embedding is its pooled vector"
        )
    pre = preprocessor or {}
    fields = {
        "image_size": int(vision["image_size"]),
        "vocab_size": int(text["vocab_size"]),
        "context_length": int(text["max_position_embeddings"]),
        "embed_dim": width,
        "captioning": False,
        "norm_eps": float(eps.pop()),
        "mlp_activation": ACTIVATIONS[acts.pop()],
        "image_mean": tuple(float(x) for x in pre.get("image_mean", (0.5, 0.5, 0.5))),
        "image_std": tuple(float(x) for x in pre.get("image_std", (0.5, 0.5, 0.5))),
        # SigLIP's initialisation (its paper): scale 10, bias -10.
        "init_logit_scale": math.log(10.0),
        "init_logit_bias": -10.0,
        "scan_layers": True,
        "vision.patch_size": int(vision["patch_size"]),
        "vision.width": width,
        "vision.layers": int(vision["num_hidden_layers"]),
        "vision.heads": int(vision["num_attention_heads"]),
        "vision.mlp_dim": int(vision["intermediate_size"]),
        "vision.pool": "map",
        "vision.proj": False,
        "text.width": int(text["hidden_size"]),
        "text.layers": int(text["num_hidden_layers"]),
        "text.heads": int(text["num_attention_heads"]),
        "text.mlp_dim": int(text["intermediate_size"]),
        "text.pool": "last",
        "text.proj_bias": True,
    }
    cfg = ModelConfig().replace(fields)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConversionError(f"config.json gives an invalid model: {e}") from None
    return cfg


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """model_config in reverse: the config.json of the SiglipModel nearest to `cfg`."""
    v, t = cfg.vision, cfg.text
    act = _EXPORTED_ACTIVATIONS[cfg.mlp_activation]
    return {
        "architectures": ["SiglipModel"],
        "model_type": MODEL_TYPE,
        "text_config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": cfg.context_length,
            "hidden_act": act,
            "layer_norm_eps": cfg.norm_eps,
            # SiglipModel's joint space is the image tower's width (no image projection).
            "projection_size": v.width,
        },
        "vision_config": {
            "hidden_size": v.width,
            "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "image_size": cfg.image_size,
            "patch_size": v.patch_size,
            "hidden_act": act,
            "layer_norm_eps": cfg.norm_eps,
        },
    }


def differences(cfg: ModelConfig) -> list[str]:
    """The fields in which transformers' nearest SiglipModel differs from `cfg` ([]: none).
    A model SiglipModel cannot hold at all is refused by name."""
    from mmjax.interop.open_clip import config_differences

    unsupported = {
        "input_kind": (cfg.input_kind, "image"),
        "vision.encoder": (cfg.vision.encoder, "vit"),
        "text.encoder": (cfg.text.encoder, "transformer"),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ConversionError(f"SiglipModel has no model with model.{name}={value!r}")
    if cfg.vision.pool_heads not in (0, cfg.vision.heads):
        return [f"vision.pool_heads: {cfg.vision.pool_heads} -> {cfg.vision.heads}"]
    back = model_config(hf_config(cfg), {"image_mean": cfg.image_mean, "image_std": cfg.image_std})
    # The initial logit scale/bias only matter for training from scratch.
    back = back.replace({"init_logit_scale": cfg.init_logit_scale,
                         "init_logit_bias": cfg.init_logit_bias})  # fmt: skip
    found = config_differences(cfg, back)
    if cfg.text.width != cfg.vision.width:  # Read as projection_size by newer transformers only.
        found.append(
            f"text.width: {cfg.text.width} -> {cfg.vision.width} (a SiglipModel text head keeps "
            "its width where transformers does not read projection_size)"
        )
    if not cfg.init_logit_bias:
        found.append("init_logit_bias: 0.0 (softmax loss) -> a learnt bias (sigmoid loss)")
    return found


def rules(cfg: ModelConfig) -> Rules:
    """The SiglipModel tensors of `cfg` -> mmjax parameters."""
    r = Rules()
    v, t = cfg.vision, cfg.text
    w, p = v.width, v.patch_size
    img = "image_encoder"
    r.add("vision_model.embeddings.patch_embedding.weight", (w, 3, p, p),
          f"{img}/patch_embed/kernel",
          lambda x: x.transpose(2, 3, 1, 0).reshape(p * p * 3, w))  # fmt: skip
    r.add("vision_model.embeddings.patch_embedding.bias", (w,), f"{img}/patch_embed/bias")
    r.add("vision_model.embeddings.position_embedding.weight", (cfg.num_patches, w),
          f"{img}/pos_embed")  # fmt: skip

    def blocks(hf: str, target: str, width: int, heads: int, mlp: int, layers: int):
        for i in range(layers):
            h = f"{hf}.encoder.layers.{i}"
            r.norm(f"{h}.layer_norm1", width, f"{target}/ln_attn", i)
            r.separate_self_attention(f"{h}.self_attn", width, heads, f"{target}/attn", i)
            r.norm(f"{h}.layer_norm2", width, f"{target}/ln_mlp", i)
            r.linear(f"{h}.mlp.fc1", width, mlp, f"{target}/mlp/fc1", i)
            r.linear(f"{h}.mlp.fc2", mlp, width, f"{target}/mlp/fc2", i)

    blocks("vision_model", f"{img}/blocks/layers", w, v.heads, v.mlp_dim, v.layers)
    r.norm("vision_model.post_layernorm", w, f"{img}/ln_post")
    head = "vision_model.head"
    r.add(f"{head}.probe", (1, 1, w), f"{img}/map_head/probe", lambda x: x.reshape(1, w))
    r.cross_attention(f"{head}.attention", w, w, v.heads, f"{img}/map_head/attn")
    r.norm(f"{head}.layernorm", w, f"{img}/map_head/ln")
    r.linear(f"{head}.mlp.fc1", w, v.mlp_dim, f"{img}/map_head/mlp/fc1")
    r.linear(f"{head}.mlp.fc2", v.mlp_dim, w, f"{img}/map_head/mlp/fc2")

    tw, txt = t.width, "text_encoder"
    r.add("text_model.embeddings.token_embedding.weight", (cfg.vocab_size, tw),
          f"{txt}/token_embed/embedding")  # fmt: skip
    r.add("text_model.embeddings.position_embedding.weight", (cfg.context_length, tw),
          f"{txt}/pos_embed")  # fmt: skip
    blocks("text_model", f"{txt}/blocks/layers", tw, t.heads, t.mlp_dim, t.layers)
    r.norm("text_model.final_layer_norm", tw, f"{txt}/ln_final")
    r.linear("text_model.head", tw, cfg.embed_dim, "text_proj")
    r.add("logit_scale", (1,), "logit_scale", lambda x: x.reshape(()))
    r.add("logit_bias", (1,), "logit_bias", lambda x: x.reshape(()))
    return r


def to_params(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, progress: bool = False
) -> dict[str, Any]:
    """SiglipModel tensors -> mmjax params; missing, unexpected and mis-shaped tensors are
    reported by name."""
    r = rules(cfg)
    ignored = {k for k in state if k.rsplit(".", 1)[-1] in _IGNORED}
    tensor_map.check_state(state, r, ignored, "model.safetensors")
    return tensor_map.nest(tensor_map.to_params(state, r, progress))


def from_params(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """to_params in reverse (scanned layout in, SiglipModel tensors out)."""
    return tensor_map.from_params(params, rules(cfg), "transformers' SiglipModel")


def processor_config(cfg: ModelConfig) -> dict[str, Any]:
    """preprocessor_config.json of SiglipImageProcessor: resize to the model's size (no crop),
    then mean/std."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "SiglipProcessor",
        "do_resize": True,
        "size": {"height": cfg.image_size, "width": cfg.image_size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
    }
