"""open_clip CLIP and CoCa checkpoints <-> mmjax: the one tensor mapping every import and
export uses (`mmjax convert`, `mmjax export`: mmjax.interop.convert / export).

  mmjax convert open_clip --model-config coca_ViT-B-32.json \\
      --checkpoint open_clip_model.safetensors --out runs/coca_b32 [--bpe-vocab PATH]

CONFIG.json is in open_clip's model-config format (or a Hub model's open_clip_config.json);
the checkpoint is a `.safetensors` file (safetensors, in the default install) or a torch
state_dict (read with weights_only=True; needs the `openclip` extra).
DIR gets config.json (configs/coca.py with the matching model and the CLIP BPE
tokenizer), and checkpoints/0 holding the parameters only, which mmjax.inference.predictor (caption,
search) and `mmjax.train --config.init_from=DIR` read. Every tensor is checked first:
missing, unexpected and mis-shaped tensors are reported by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmjax.interop import tensor_map
from mmjax.interop.tensor_map import ConversionError, Rules
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime.checkpoint import Checkpointer
from mmjax.runtime.config import load_config, to_json
from mmjax.training.state import dummy_batch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

# open_clip config keys this converter understands, with the values it can reproduce
# (None: any value). Anything else is refused by name rather than converted wrongly.
_TOP = {
    "embed_dim": None,
    "vision_cfg": None,
    "text_cfg": None,
    "multimodal_cfg": None,
    "quick_gelu": None,
    "custom_text": None,
    "init_logit_scale": None,
    "init_logit_bias": None,
    "preprocess_cfg": None,
}
_VISION = {
    "image_size": None,
    "layers": None,
    "width": None,
    "head_width": None,
    "mlp_ratio": None,
    "patch_size": None,
    "attentional_pool": (False, True),
    "attn_pooler_queries": None,
    "attn_pooler_heads": None,
    "output_tokens": None,
    "patch_dropout": None,  # Training only: model.patch_dropout.
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "pool_type": ("tok",),
    "final_ln_after_pool": (False, True),  # Same result with tok pooling.
    "ls_init_value": (None,),
}
_TEXT = {
    "context_length": None,
    "vocab_size": None,
    "width": None,
    "heads": None,
    "layers": None,
    "mlp_ratio": None,
    "embed_cls": None,
    "output_tokens": None,
    "pad_id": (0,),
    "pool_type": ("argmax",),
    "proj_bias": (False,),
    "proj_type": ("linear",),
    "no_causal_mask": (False,),
    "ls_init_value": (None,),
    "final_ln_after_pool": (False,),
    "dim_head": None,  # multimodal_cfg: unused by open_clip.
    "n_queries": None,  # multimodal_cfg: ignored by open_clip.
    "attn_pooler_heads": None,  # multimodal_cfg: ignored by open_clip.
    "latent_dim": None,
}
# Buffers open_clip may save that carry no parameters.
_IGNORED = ("attn_mask",)


def _check_keys(section: str, values: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConversionError(f"open_clip config: unknown keys in {section}: {unknown}")
    for key, choices in allowed.items():
        if key in values and choices is not None and values[key] not in choices:
            raise ConversionError(
                f"open_clip config: {section}.{key}={values[key]!r} is not supported "
                f"(supported: {list(choices)})"
            )


def hub_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model config from either file form: a model config
    (open_clip/model_configs/*.json) or a Hub model's open_clip_config.json, which wraps it
    as "model_cfg" beside a "preprocess_cfg" (its mean and std are taken)."""
    if "model_cfg" not in config:
        return dict(config)
    oc = dict(config["model_cfg"])
    pre = {k: v for k, v in config.get("preprocess_cfg", {}).items() if k in ("mean", "std")}
    if pre:
        oc["preprocess_cfg"] = {**oc.get("preprocess_cfg", {}), **pre}
    return oc


def model_config(oc: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig reproducing the open_clip model of config `oc` (CLIP or CoCa)."""
    _check_keys("the top level", oc, _TOP)
    vision, text = dict(oc.get("vision_cfg", {})), dict(oc.get("text_cfg", {}))
    multimodal = oc.get("multimodal_cfg")
    _check_keys("vision_cfg", vision, _VISION)
    _check_keys("text_cfg", text, _TEXT)
    coca = multimodal is not None
    if coca:
        _check_keys("multimodal_cfg", multimodal, _TEXT)
    # open_clip's defaults (CLIPVisionCfg / CLIPTextCfg).
    v = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224)
    v.update(vision)
    t = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)
    t.update(text)
    embed_dim = int(oc["embed_dim"])
    if coca != bool(t.get("embed_cls", False)):
        raise ConversionError(
            "open_clip config: text_cfg.embed_cls must be true exactly for CoCa models"
        )
    pooled_attn = bool(v.get("attentional_pool", False))
    if coca != pooled_attn:
        raise ConversionError(
            "open_clip config: vision_cfg.attentional_pool must be true exactly for CoCa models"
        )
    for name, cfg in (("vision_cfg", v), ("text_cfg", t)):
        if not float(cfg["mlp_ratio"]) * cfg["width"] == int(cfg["mlp_ratio"] * cfg["width"]):
            raise ConversionError(f"open_clip config: {name}.mlp_ratio gives a fractional width")
    if v["width"] % v["head_width"]:
        raise ConversionError("open_clip config: vision_cfg.width is not a multiple of head_width")
    mean = tuple(oc.get("preprocess_cfg", {}).get("mean", OPENAI_MEAN))
    std = tuple(oc.get("preprocess_cfg", {}).get("std", OPENAI_STD))
    fields: dict[str, Any] = dict(
        image_size=int(v["image_size"]),
        **{
            "vision.patch_size": int(v["patch_size"]),
            "vision.width": int(v["width"]),
            "vision.layers": int(v["layers"]),
            "vision.heads": int(v["width"]) // int(v["head_width"]),
            "vision.mlp_dim": int(v["mlp_ratio"] * v["width"]),
            "vision.class_token": True,
            "vision.ln_pre": True,
            "vision.patch_bias": False,
            "text.width": int(t["width"]),
            "text.layers": int(t["layers"]),
            "text.heads": int(t["heads"]),
            "text.mlp_dim": int(t["mlp_ratio"] * t["width"]),
        },
        vocab_size=int(t["vocab_size"]),
        embed_dim=embed_dim,
        norm_eps=1e-5,
        mlp_activation="quick_gelu" if oc.get("quick_gelu", False) else "gelu",
        init_logit_scale=float(oc.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=float(oc.get("init_logit_bias") or 0.0),
        image_mean=mean,
        image_std=std,
        patch_dropout=float(v.get("patch_dropout", 0.0)),
        scan_layers=True,
    )
    if coca:
        m = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
        m.update(multimodal)
        for key in ("width", "heads", "vocab_size"):
            if m[key] != t[key]:
                raise ConversionError(
                    f"open_clip config: multimodal_cfg.{key}={m[key]} differs from "
                    f"text_cfg.{key}={t[key]}; mmjax's decoder shares the text tower's"
                )
        if embed_dim != t["width"]:  # open_clip's decoder normalises them at its width.
            raise ConversionError(
                f"open_clip config: CoCa needs embed_dim ({embed_dim}) == text_cfg.width "
                f"({t['width']}): its decoder attends to embed_dim-wide image tokens"
            )
        if float(t["mlp_ratio"]) != 4.0:  # open_clip's decoder always uses ratio 4.
            raise ConversionError("open_clip config: CoCa needs text_cfg.mlp_ratio=4")
        fields.update(
            context_length=int(t["context_length"]) + 1,  # + the CLS slot.
            captioning=True,
            **{
                "decoder.layers": int(m["layers"]),
                "decoder.block": "split",
                "decoder.head_bias": False,
                "vision.caption_queries": int(v.get("attn_pooler_queries", 256)) - 1,
                "vision.pool": "shared_queries",
                "vision.pool_width": embed_dim,
                "vision.pool_heads": int(v.get("attn_pooler_heads", 8)),
                "text.pool": "cls",
                "text.mask": "open_clip",
            },
        )
    else:
        fields.update(
            context_length=int(t["context_length"]),
            captioning=False,
            **{"vision.pool": "class_token", "text.pool": "argmax"},
        )
    cfg = ModelConfig().replace(fields)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConversionError(f"open_clip config gives an invalid model: {e}") from None
    return cfg


# Fields the reverse mapping leaves out of the comparison: numerics and memory layout, which
# change how a model runs, not which model it is.
_RUN_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "max_logit_scale")
# Biases open_clip lacks: a model that has them is checked on its weights instead (zero ones
# export; export_state_dict names a non-zero one).
_WEIGHT_CHECKED = ("vision.patch_bias", "decoder.head_bias")


def open_clip_config(cfg: ModelConfig) -> tuple[dict[str, Any], list[str]]:
    """model_config in reverse: the open_clip model config nearest to `cfg`, and the mmjax
    fields in which that open_clip model differs from `cfg` ('' list: the same model).

    The differences are found by mapping the open_clip config forward again, so they name
    exactly what open_clip's layout would change (its class token, its one shared pooler,
    its split decoder blocks, ...). What open_clip cannot build at all is refused by name.
    """
    unsupported = {
        "input_kind": (cfg.input_kind, "image"),
        "vision.encoder": (cfg.vision.encoder, "vit"),
        "text.encoder": (cfg.text.encoder, "transformer"),
        "decoder.fusion": (cfg.decoder.fusion, "cross_attention"),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ConversionError(f"open_clip has no model with model.{name}={value!r}")
    if cfg.mlp_activation == "gelu_tanh":
        activation = {}  # Nearest: open_clip's exact GELU (listed as a difference below).
    else:
        activation = {"quick_gelu": cfg.mlp_activation == "quick_gelu"}
    v, t = cfg.vision, cfg.text
    oc: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": v.patch_size,
            "width": v.width,
            "layers": v.layers,
            "head_width": v.width // v.heads,
            "mlp_ratio": v.mlp_dim / v.width,
            **({"patch_dropout": cfg.patch_dropout} if cfg.patch_dropout else {}),
        },
        "text_cfg": {
            "context_length": cfg.context_length - int(cfg.captioning),
            "vocab_size": cfg.vocab_size,
            "width": t.width,
            "heads": t.heads,
            "layers": t.layers,
            "mlp_ratio": t.mlp_dim / t.width,
        },
        **activation,
        "init_logit_scale": cfg.init_logit_scale,
        "preprocess_cfg": {"mean": list(cfg.image_mean), "std": list(cfg.image_std)},
    }
    if cfg.init_logit_bias:
        oc["init_logit_bias"] = cfg.init_logit_bias
    if cfg.captioning:
        oc["vision_cfg"].update(
            attentional_pool=True,
            attn_pooler_queries=v.caption_queries + 1,
            attn_pooler_heads=v.pool_heads or v.heads,
            output_tokens=True,
        )
        oc["text_cfg"].update(embed_cls=True, output_tokens=True)
        oc["custom_text"] = True  # open_clip.create_model builds a CoCa only with it.
        oc["multimodal_cfg"] = {
            "context_length": oc["text_cfg"]["context_length"],
            "vocab_size": cfg.vocab_size,
            "width": t.width,
            "heads": t.heads,
            "layers": cfg.decoder.layers,
        }
    return oc, config_differences(cfg, model_config(oc))


def config_differences(want_cfg: ModelConfig, back_cfg: ModelConfig) -> list[str]:
    """The model fields in which `back_cfg` (another library's nearest model, mapped back)
    differs from `want_cfg`, as 'field: mine -> theirs'; run settings are left out."""
    back = _effective(dataclasses.asdict(back_cfg))
    want = _effective(dataclasses.asdict(want_cfg))
    differences = []
    for key in sorted(want):
        if key in _RUN_FIELDS:
            continue
        if isinstance(want[key], dict):
            differences += [
                f"{key}.{name}: {value!r} -> {back[key][name]!r}"
                for name, value in want[key].items()
                if key != "video"
                and f"{key}.{name}" not in _WEIGHT_CHECKED
                and _differ(value, back[key][name])
            ]
        elif _differ(want[key], back[key]):
            differences.append(f"{key}: {want[key]!r} -> {back[key]!r}")
    return differences


def _effective(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields whose 0 means 'as another field' replaced by that field's value."""
    vision, text, decoder = fields["vision"], fields["text"], fields["decoder"]
    vision["pool_width"] = vision["pool_width"] or vision["width"]
    vision["pool_heads"] = vision["pool_heads"] or vision["heads"]
    decoder["heads"] = decoder["heads"] or text["heads"]
    decoder["mlp_dim"] = decoder["mlp_dim"] or text["mlp_dim"]
    return fields


def _differ(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return not math.isclose(float(a), float(b), rel_tol=1e-6)
    return a != b


def _rules(cfg: ModelConfig, text_prefix: str) -> Rules:
    rules = Rules()
    add, norm, linear = rules.add, rules.norm, rules.linear
    cross_attention = rules.cross_attention

    def block(src, width, heads, mlp, target, layer, names=("ln_attn", "attn", "ln_mlp", "mlp")):
        norm(f"{src}.ln_1", width, f"{target}/{names[0]}", layer)
        rules.self_attention(f"{src}.attn", width, heads, f"{target}/{names[1]}", layer)
        norm(f"{src}.ln_2", width, f"{target}/{names[2]}", layer)
        linear(f"{src}.mlp.c_fc", width, mlp, f"{target}/{names[3]}/fc1", layer)
        linear(f"{src}.mlp.c_proj", mlp, width, f"{target}/{names[3]}/fc2", layer)

    # Image tower.
    w, p = cfg.vision.width, cfg.vision.patch_size
    img = "image_encoder"
    # conv [W, 3, P, P] -> kernel [(row, col, channel), W], mmjax's patch order.
    add("visual.conv1.weight", (w, 3, p, p), f"{img}/patch_embed/kernel",
        lambda x: x.transpose(2, 3, 1, 0).reshape(p * p * 3, w))  # fmt: skip
    if cfg.vision.patch_bias:  # Workdirs converted before the switch existed: zeros.
        add((), (), f"{img}/patch_embed/bias", lambda: np.zeros(w, np.float32))
    add("visual.class_embedding", (w,), f"{img}/cls_token")
    add("visual.positional_embedding", (cfg.vit_positions, w), f"{img}/pos_embed")
    norm("visual.ln_pre", w, f"{img}/ln_pre")
    for i in range(cfg.vision.layers):
        block(f"visual.transformer.resblocks.{i}", w, cfg.vision.heads, cfg.vision.mlp_dim,
              f"{img}/blocks/layers", i)  # fmt: skip
    e = cfg.embed_dim
    if cfg.vision.pool == "shared_queries":
        q = cfg.vision.pool_width
        add("visual.attn_pool.query", (cfg.vision.caption_queries + 1, q), f"{img}/pool/queries")
        norm("visual.attn_pool.ln_q", q, f"{img}/pool/ln_queries")
        norm("visual.attn_pool.ln_k", w, f"{img}/pool/ln_context")
        cross_attention("visual.attn_pool.attn", q, w, cfg.vision.pool_heads, f"{img}/pool/attn")
        norm("visual.ln_post", q, f"{img}/pool/ln_out")
        add("visual.proj", (q, e), "image_proj/kernel")
    else:
        norm("visual.ln_post", w, f"{img}/ln_post")
        add("visual.proj", (w, e), "image_proj/kernel")

    # Text tower.
    tw, tp = cfg.text.width, text_prefix
    txt = "text_encoder"
    add(f"{tp}token_embedding.weight", (cfg.vocab_size, tw), f"{txt}/token_embed/embedding")
    add(f"{tp}positional_embedding", (cfg.context_length, tw), f"{txt}/pos_embed")
    for i in range(cfg.text.layers):
        block(f"{tp}transformer.resblocks.{i}", tw, cfg.text.heads, cfg.text.mlp_dim,
              f"{txt}/blocks/layers", i)  # fmt: skip
    if cfg.text.pool == "cls":
        add(f"{tp}cls_emb", (tw,), f"{txt}/cls")
        norm(f"{tp}ln_final", tw, f"{txt}/ln_cls")
    else:
        norm(f"{tp}ln_final", tw, f"{txt}/ln_final")
    add(f"{tp}text_projection", (tw, e), "text_proj/kernel")

    # Multimodal decoder.
    if cfg.captioning:
        dec = "decoder/blocks/layers"
        for i in range(cfg.decoder.layers):
            names = ("ln_self", "self_attn", "ln_self_mlp", "self_mlp")
            block(f"text_decoder.resblocks.{i}", tw, cfg.text.heads, cfg.text.mlp_dim, dec, i,
                  names)  # fmt: skip
            src = f"text_decoder.cross_attn.{i}"
            norm(f"{src}.ln_1", tw, f"{dec}/ln_cross", i)
            norm(f"{src}.ln_1_kv", tw, f"{dec}/ln_context", i)
            cross_attention(f"{src}.attn", tw, tw, cfg.text.heads, f"{dec}/cross_attn", i)
            norm(f"{src}.ln_2", tw, f"{dec}/ln_mlp", i)
            linear(f"{src}.mlp.c_fc", tw, cfg.text.mlp_dim, f"{dec}/mlp/fc1", i)
            linear(f"{src}.mlp.c_proj", cfg.text.mlp_dim, tw, f"{dec}/mlp/fc2", i)
        norm("text_decoder.ln_final", tw, "decoder/ln_final")
        add("text_decoder.text_projection", (tw, cfg.vocab_size), "decoder/lm_head/kernel")
        if cfg.decoder.head_bias:  # Workdirs converted before the switch existed: zeros.
            add((), (), "decoder/lm_head/bias", lambda: np.zeros(cfg.vocab_size, np.float32))
    add("logit_scale", (), "logit_scale")
    return rules


def _normalise_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a DDP 'module.' prefix (open_clip training checkpoints)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def convert_state_dict(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, progress: bool = False
) -> dict[str, Any]:
    """open_clip tensors (name -> float array) -> mmjax params (nested dict of np.float32).

    Raises ConversionError listing missing / unexpected tensors, or the first wrong shape.
    """
    state = _normalise_names(state)
    text_prefix = "text." if any(k.startswith("text.") for k in state) else ""
    rules = _rules(cfg, text_prefix)
    optional = {"logit_bias"}
    ignored = {k for k in state if k.rsplit(".", 1)[-1] in _IGNORED} | (optional & set(state))
    tensor_map.check_state(state, rules, ignored)
    flat = tensor_map.to_params(state, rules, progress)
    bias = np.asarray(state.get("logit_bias", np.zeros(())), np.float32).reshape(())
    flat[("logit_bias",)] = bias
    return tensor_map.nest(flat)


def export_state_dict(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """convert_state_dict in reverse: mmjax params (scanned layout) -> open_clip tensors.

    Every rule of the import runs backwards (mmjax.interop.tensor_map), so the two
    directions cannot disagree. A parameter open_clip has no tensor for (the patch
    embedding's and the LM head's biases) must hold the value the import writes (zeros);
    otherwise the export is refused by name.
    """
    text_prefix = "text." if cfg.captioning else ""  # open_clip's CoCa nests its text tower.
    state = tensor_map.from_params(params, _rules(cfg, text_prefix), "open_clip")
    if cfg.init_logit_bias:  # open_clip_config then builds the model with a logit bias.
        state["logit_bias"] = np.asarray(params["logit_bias"], np.float32).reshape(())
    return state


def check_against_model(params: Mapping[str, Any], cfg: ModelConfig) -> None:
    """Raises ConversionError when `params` do not fit the mmjax model of `cfg`."""
    import flax.linen as nn
    import jax

    model = CoCa(cfg)
    abstract = nn.unbox(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model))["params"])
    )
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)
    }
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ConversionError(f"converted parameters do not fit the model: {diff[:6]}")


def load_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """name -> float32 array from a .safetensors file or a torch state_dict file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        try:  # torch framework: reads bf16/fp16 too (numpy has no bfloat16).
            import torch  # noqa: F401

            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k).float().numpy()
        except ImportError:
            with safe_open(str(path), framework="numpy") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k).astype(np.float32)
        return out
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a torch checkpoint: install the extra (pip install -e '.[openclip]')"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # Pickle, zip and weights_only refusals alike.
        raise ConversionError(
            f"cannot read {path} with torch.load(weights_only=True): {e}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def default_bpe_vocab() -> Path | None:
    """open_clip's bundled vocabulary file, if open_clip is installed (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    return path if path.is_file() else None


def workdir_config(cfg: ModelConfig, tokenizer: Path, tokenizer_type: str = "clip_bpe"):
    """configs/coca.py's defaults with this model and its tokenizer (data.tokenizer_type)."""
    import ml_collections

    config = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "coca.py"))
    model = dataclasses.asdict(cfg)
    model["image_mean"], model["image_std"] = list(cfg.image_mean), list(cfg.image_std)
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
        config.data.tokenizer = str(tokenizer.resolve())
        config.data.tokenizer_type = tokenizer_type
        if not cfg.captioning:
            config.loss.caption_weight = 0.0
        if cfg.init_logit_bias:  # A learnt logit bias: a SigLIP-style sigmoid model.
            config.loss.contrastive = "sigmoid"
    return config


def write_workdir(
    out: str | Path,
    params: Mapping[str, Any],
    cfg: ModelConfig,
    tokenizer: Path,
    source: str = "open_clip",
    tokenizer_type: str = "clip_bpe",
):
    """DIR/config.json and DIR/checkpoints/0 (params only), read by mmjax.inference.predictor and
    mmjax.train --config.init_from=DIR."""
    import jax

    out = Path(out)
    if (out / "checkpoints").exists():
        raise ConversionError(f"{out}/checkpoints already exists; pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    # A trained scale above mmjax's default cap (SigLIP's ~112 > 100) is kept exactly.
    scale = float(np.asarray(params["logit_scale"]))
    cfg = dataclasses.replace(cfg, max_logit_scale=max(cfg.max_logit_scale, scale))
    (out / "config.json").write_text(to_json(workdir_config(cfg, tokenizer, tokenizer_type)))
    checkpointer = Checkpointer(out / "checkpoints", async_save=False)
    try:
        state = {"params": jax.tree.map(jax.numpy.asarray, params)}
        checkpointer.save(0, state, batch_size=0, extra_meta={"converted_from": source},
                          force=True)  # fmt: skip
        checkpointer.wait()
    finally:
        checkpointer.close()


def convert_open_clip(
    model_config_path: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    bpe_vocab: str | Path | None = None,
    progress: bool = True,
) -> ModelConfig:
    try:
        oc = json.loads(Path(model_config_path).read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read open_clip config {model_config_path}: {e}") from None
    return import_state(
        hub_model_config(oc), load_checkpoint(checkpoint), out, bpe_vocab, "open_clip", progress
    )


def import_state(
    oc: Mapping[str, Any],
    state: Mapping[str, np.ndarray],
    out: str | Path,
    bpe_vocab: str | Path | None,
    source: str,
    progress: bool = True,
    copy_tokenizer: bool = False,
) -> ModelConfig:
    """An open_clip model config and state dict (from any source) -> an mmjax workdir.
    `copy_tokenizer`: the vocabulary is copied into the workdir (a model directory's own
    tokenizer files), else referred to where it is (open_clip's bundled file)."""
    cfg = model_config(oc)
    vocab = Path(bpe_vocab) if bpe_vocab else default_bpe_vocab()
    if vocab is None or not vocab.is_file():
        raise ConversionError(
            f"CLIP BPE vocabulary {vocab or BPE_FILE} not found: pass --bpe-vocab PATH"
        )
    params = convert_state_dict(state, cfg, progress=progress)
    check_against_model(params, cfg)
    if copy_tokenizer:
        vocab = copy_into(vocab, out)
    write_workdir(out, params, cfg, vocab, source)
    return cfg


def copy_into(file: Path, out: str | Path) -> Path:
    """`file` copied into the new workdir `out` (created), so that the workdir stands alone."""
    import shutil

    out = Path(out)
    if (out / "checkpoints").exists():
        raise ConversionError(f"{out}/checkpoints already exists; pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(file, out / file.name))
