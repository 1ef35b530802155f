"""big_vision SigLIP checkpoints (`.npz`) -> the Hugging Face SiglipModel layout.

  mmjax convert big_vision webli_en_b16_224.npz --variant B/16 --tokenizer c4_en.model --out W

The parameter names are those big_vision's two-tower model writes (models/proj/image_text/
two_towers.py: `img` a ViT with `pool_type='map'` (models/vit.py), `txt` the text
transformer with `pool_type='last'`, `t` and `b` the logit scale and bias), laid out with
or without the leading `params/`, with unrolled (`encoderblock_3`) or scanned
(`encoderblock`, a leading layer axis) encoders. They are renamed into transformers'
SiglipModel tensors following the mapping of transformers' own SigLIP conversion script, then
imported by mmjax.interop.hf_siglip, so both sources share one mapping into mmjax.

The model's sizes are read off the tensor shapes; `--variant` (big_vision's name, e.g. B/16,
So400m/14) must agree with them, so a checkpoint of another model is refused by name. An image
head (`img/head`), which SiglipModel cannot hold, is refused too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mmjax.interop.tensor_map import ConversionError

# big_vision's models/vit.py decode_variant: name -> (width, depth, mlp_dim, heads).
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
_BLOCK = re.compile(r"^(img/Transformer|txt/Encoder_0)/encoderblock(_\d+)?/(.*)$")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """name -> float32 array, without the `params/` prefix, scanned encoders unrolled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: np.asarray(data[k], np.float32) for k in data.files}
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path} as a big_vision .npz: {e}") from None
    out: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        name = name.removeprefix("params/")
        match = _BLOCK.match(name)
        if match and match.group(2) is None:  # Scanned: one tensor per name, layers first.
            for i, layer in enumerate(value):
                out[f"{match.group(1)}/encoderblock_{i}/{match.group(3)}"] = layer
        else:
            out[name] = value
    return out


def _depth(params: dict[str, np.ndarray], prefix: str) -> int:
    found = {
        int(m.group(1)) for k in params if (m := re.match(rf"{prefix}/encoderblock_(\d+)/", k))
    }
    if not found or found != set(range(len(found))):
        raise ConversionError(f"checkpoint: no encoder blocks 0..N-1 under {prefix}")
    return len(found)


def _need(params: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in params:
        raise ConversionError(f"checkpoint: missing tensor {name} (a big_vision SigLIP has it)")
    return params[name]


def siglip_config(params: dict[str, np.ndarray], variant: str) -> dict[str, Any]:
    """The transformers SiglipConfig (config.json form) of the checkpoint, read off its
    shapes and checked against big_vision's `variant`."""
    if "img/head/kernel" in params:
        raise ConversionError(
            "checkpoint: img/head (an image projection) is not supported: transformers' "
            "SiglipModel and mmjax's SigLIP take the pooled vector as the image embedding"
        )
    patch, _, _, width = _need(params, "img/embedding/kernel").shape
    positions = _need(params, "img/pos_embedding").shape[1]
    side = int(round(positions**0.5))
    if side * side != positions:
        raise ConversionError(
            f"checkpoint: img/pos_embedding has {positions} positions, not a square"
        )
    block = "img/Transformer/encoderblock_0"
    heads = _need(params, f"{block}/MultiHeadDotProductAttention_0/query/kernel").shape[1]
    mlp = _need(params, f"{block}/MlpBlock_0/Dense_0/kernel").shape[1]
    depth = _depth(params, "img/Transformer")
    name, _, patch_name = variant.partition("/")
    if name not in VARIANTS:
        raise ConversionError(f"--variant {variant!r}: unknown; big_vision's: {sorted(VARIANTS)}")
    want = dict(zip(("width", "depth", "mlp_dim", "heads"), VARIANTS[name], strict=True))
    if patch_name:
        want["patch_size"] = int(patch_name)
    have = {"width": width, "depth": depth, "mlp_dim": mlp, "heads": heads, "patch_size": patch}
    wrong = [f"{k} {have[k]} (variant: {v})" for k, v in want.items() if have[k] != v]
    if wrong:
        raise ConversionError(f"checkpoint is not a {variant} image tower: " + ", ".join(wrong))
    vocab, text_width = _need(params, "txt/Embed_0/embedding").shape
    tblock = "txt/Encoder_0/encoderblock_0"
    return {
        "model_type": "siglip",
        "text_config": {
            "vocab_size": int(vocab),
            "hidden_size": int(text_width),
            "intermediate_size": int(_need(params, f"{tblock}/MlpBlock_0/Dense_0/kernel").shape[1]),
            "num_hidden_layers": _depth(params, "txt/Encoder_0"),
            "num_attention_heads": int(
                _need(params, f"{tblock}/MultiHeadDotProductAttention_0/query/kernel").shape[1]
            ),
            "max_position_embeddings": int(_need(params, "txt/pos_embedding").shape[1]),
            "projection_size": int(_need(params, "txt/head/kernel").shape[1]),
            "hidden_act": "gelu_pytorch_tanh",  # flax's nn.gelu: the tanh approximation.
            "layer_norm_eps": 1e-6,  # flax's LayerNorm default.
        },
        "vision_config": {
            "hidden_size": int(width),
            "intermediate_size": int(mlp),
            "num_hidden_layers": depth,
            "num_attention_heads": int(heads),
            "image_size": int(side * patch),
            "patch_size": int(patch),
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
    }


def _renames(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(big_vision name, SiglipModel name) pairs, as transformers' conversion script lists them."""
    pairs = [
        ("img/embedding/kernel", "vision_model.embeddings.patch_embedding.weight"),
        ("img/embedding/bias", "vision_model.embeddings.patch_embedding.bias"),
        ("img/pos_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("img/Transformer/encoder_norm/scale", "vision_model.post_layernorm.weight"),
        ("img/Transformer/encoder_norm/bias", "vision_model.post_layernorm.bias"),
        ("img/MAPHead_0/probe", "vision_model.head.probe"),
        ("img/MAPHead_0/LayerNorm_0/scale", "vision_model.head.layernorm.weight"),
        ("img/MAPHead_0/LayerNorm_0/bias", "vision_model.head.layernorm.bias"),
        ("img/MAPHead_0/MlpBlock_0/Dense_0/kernel", "vision_model.head.mlp.fc1.weight"),
        ("img/MAPHead_0/MlpBlock_0/Dense_0/bias", "vision_model.head.mlp.fc1.bias"),
        ("img/MAPHead_0/MlpBlock_0/Dense_1/kernel", "vision_model.head.mlp.fc2.weight"),
        ("img/MAPHead_0/MlpBlock_0/Dense_1/bias", "vision_model.head.mlp.fc2.bias"),
        ("img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel",
         "vision_model.head.attention.out_proj.weight"),
        ("img/MAPHead_0/MultiHeadDotProductAttention_0/out/bias",
         "vision_model.head.attention.out_proj.bias"),
        ("txt/Embed_0/embedding", "text_model.embeddings.token_embedding.weight"),
        ("txt/pos_embedding", "text_model.embeddings.position_embedding.weight"),
        ("txt/Encoder_0/encoder_norm/scale", "text_model.final_layer_norm.weight"),
        ("txt/Encoder_0/encoder_norm/bias", "text_model.final_layer_norm.bias"),
        ("txt/head/kernel", "text_model.head.weight"),
        ("txt/head/bias", "text_model.head.bias"),
        ("t", "logit_scale"),
        ("b", "logit_bias"),
    ]  # fmt: skip
    towers = (("img/Transformer", "vision_model", config["vision_config"]),
              ("txt/Encoder_0", "text_model", config["text_config"]))  # fmt: skip
    for bv, hf, tower in towers:
        for i in range(tower["num_hidden_layers"]):
            b, h = f"{bv}/encoderblock_{i}", f"{hf}.encoder.layers.{i}"
            pairs += [
                (f"{b}/LayerNorm_0/scale", f"{h}.layer_norm1.weight"),
                (f"{b}/LayerNorm_0/bias", f"{h}.layer_norm1.bias"),
                (f"{b}/LayerNorm_1/scale", f"{h}.layer_norm2.weight"),
                (f"{b}/LayerNorm_1/bias", f"{h}.layer_norm2.bias"),
                (f"{b}/MlpBlock_0/Dense_0/kernel", f"{h}.mlp.fc1.weight"),
                (f"{b}/MlpBlock_0/Dense_0/bias", f"{h}.mlp.fc1.bias"),
                (f"{b}/MlpBlock_0/Dense_1/kernel", f"{h}.mlp.fc2.weight"),
                (f"{b}/MlpBlock_0/Dense_1/bias", f"{h}.mlp.fc2.bias"),
            ]
            for bv_name, hf_name in (("query", "q_proj"), ("key", "k_proj"),
                                     ("value", "v_proj"), ("out", "out_proj")):  # fmt: skip
                attn = f"{b}/MultiHeadDotProductAttention_0/{bv_name}"
                pairs += [(f"{attn}/kernel", f"{h}.self_attn.{hf_name}.weight"),
                          (f"{attn}/bias", f"{h}.self_attn.{hf_name}.bias")]  # fmt: skip
    return pairs


def _convert(hf_name: str, value: np.ndarray, width: int) -> np.ndarray:
    """One tensor from flax's layout to torch's (the conversion script's rename_key)."""
    if any(p in hf_name for p in ("q_proj", "k_proj", "v_proj", "out_proj")) and hf_name.endswith(
        "weight"
    ):
        return value.reshape(-1, width).T  # [D, H, K] or [H, K, D] -> torch [out, in]
    if hf_name.endswith("patch_embedding.weight"):
        return value.transpose(3, 2, 0, 1)  # [P, P, 3, D] -> [D, 3, P, P]
    if "position_embedding" in hf_name:
        return value.reshape(-1, width)
    if hf_name.endswith("weight") and "token_embedding" not in hf_name and "probe" not in hf_name:
        return value.T
    if hf_name.endswith("bias") or hf_name in ("logit_scale",):
        return value.reshape(-1)
    return value


def to_hf_state(params: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """big_vision tensors -> SiglipModel tensors; missing and unexpected ones named."""
    pairs = _renames(config)
    head = "img/MAPHead_0/MultiHeadDotProductAttention_0"
    fused = [f"{head}/{p}/{k}" for p in ("query", "key", "value") for k in ("kernel", "bias")]
    wanted = {bv for bv, _ in pairs} | set(fused)
    missing, extra = sorted(wanted - set(params)), sorted(set(params) - wanted)
    if missing or extra:
        parts = [f"missing tensors {missing}" if missing else "",
                 f"unexpected tensors {extra}" if extra else ""]  # fmt: skip
        raise ConversionError(
            "checkpoint is not a big_vision SigLIP: " + "; ".join(p for p in parts if p)
        )
    widths = {"vision_model": config["vision_config"]["hidden_size"],
              "text_model": config["text_config"]["hidden_size"]}  # fmt: skip
    state = {}
    for bv, hf in pairs:
        state[hf] = _convert(hf, params[bv], widths.get(hf.split(".")[0], 0))
    width = widths["vision_model"]
    state["vision_model.head.attention.in_proj_weight"] = np.concatenate(
        [params[f"{head}/{p}/kernel"].reshape(-1, width).T for p in ("query", "key", "value")]
    )
    state["vision_model.head.attention.in_proj_bias"] = np.concatenate(
        [params[f"{head}/{p}/bias"].reshape(-1) for p in ("query", "key", "value")]
    )
    return state
