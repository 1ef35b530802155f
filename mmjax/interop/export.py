"""Export a run's weights for another library.

  mmjax export open_clip --workdir runs/my_run --out exported/ [--step N]
  mmjax export hf --workdir runs/my_clip --out exported_hf/    # a transformers CLIPModel

`hf` writes config.json, model.safetensors and preprocessor_config.json, which
`transformers.AutoModel.from_pretrained("exported_hf")` loads as a CLIPModel (a CLIP in
open_clip's layout: class token, argmax text pooling; not a CoCa) or, for a sigmoid run, as
a SiglipModel (SigLIP's layout: mmjax.interop.hf_siglip; with its spiece.model when the run
reads SigLIP's tokenizer).

DIR gets the files of an open_clip model on the Hugging Face Hub: `open_clip_config.json`
({"model_cfg": open_clip's model config, "preprocess_cfg": image size, mean, std}) and
`open_clip_model.safetensors` (the state dict), which open_clip loads as one of its own:

  model = open_clip.create_model("local-dir:exported")

Only a model open_clip builds exactly is exported (one converted from open_clip, or trained
from such a one with `init_from`): any field in which open_clip's nearest model would differ
is refused, by name, in one line. Needs numpy and safetensors only (the default install).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mmjax.interop.open_clip import ConversionError, export_state_dict, open_clip_config
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.models.layers import stack_layers
from mmjax.runtime import cli, paths
from mmjax.runtime import sharding as shd
from mmjax.runtime.checkpoint import CheckpointError, read_params
from mmjax.runtime.config import from_json_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def read_run(workdir: str, step: int | None = None) -> tuple[ModelConfig, int, Any]:
    """(model config, step, params as numpy arrays in the scanned layout) of a workdir."""
    from mmjax.inference.predictor import abstract_params

    directory = paths.run_dir(workdir)
    config = from_json_file(directory / "config.json")
    cfg = ModelConfig.from_mapping(config.model.to_dict())
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    found, params = read_params(
        directory / "checkpoints", abstract_params(CoCa(cfg), mesh, shd.DEFAULT_RULES), step
    )
    params = jax.tree.map(np.asarray, params)
    if not cfg.scan_layers:
        params = jax.tree.map(np.asarray, stack_layers(params))
    return cfg, found, params


def _exportable(workdir: str, step: int | None, target: str):
    """(model config, step, params, open_clip config) of a run the target builds exactly;
    ConversionError naming every field in which it would differ otherwise."""
    cfg, found, params = read_run(workdir, step)
    oc, differences = open_clip_config(cfg)
    if differences:
        raise ConversionError(
            f"{target} has no model equal to this one; it would differ in " + "; ".join(differences)
        )
    return cfg, found, params, oc


def _write(target: Path, files: dict[str, Any], weights: str, state: dict, metadata=None):
    """JSON `files` and the safetensors `weights` into `target`; returns the summary."""
    from safetensors.numpy import save_file

    target.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (target / name).write_text(json.dumps(content, indent=2) + "\n")
    # np.ascontiguousarray would make the 0-d logit scale 1-d.
    arrays = {k: np.array(v, order="C") for k, v in state.items()}
    save_file(arrays, str(target / weights), metadata=metadata)
    return {
        "tensors": len(state),
        "parameters": int(sum(v.size for v in state.values())),
        "config": str(target / next(iter(files))),
        "weights": str(target / weights),
    }


def export_open_clip(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
    """Writes OUT/open_clip_config.json and OUT/open_clip_model.safetensors; returns a summary."""
    cfg, found, params, oc = _exportable(workdir, step, "open_clip")
    hub = {
        "model_cfg": {k: v for k, v in oc.items() if k != "preprocess_cfg"},
        "preprocess_cfg": {"size": cfg.image_size, **oc["preprocess_cfg"]},
    }
    summary = _write(Path(out), {CONFIG_FILE: hub}, WEIGHTS_FILE, export_state_dict(params, cfg))
    return {"step": found, "model": "CoCa" if cfg.captioning else "CLIP", **summary}


def export_hf(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
    """Writes OUT/config.json, OUT/model.safetensors and OUT/preprocessor_config.json of a
    transformers CLIPModel, or SiglipModel for a sigmoid run or SigLIP's attention-pooled
    image tower (`transformers.AutoModel.from_pretrained(OUT)`)."""
    from mmjax.interop import hf_clip

    config = from_json_file(paths.run_dir(workdir) / "config.json")
    pool = config.model.get("vision", {}).get("pool", "")
    if config.loss.get("contrastive") == "sigmoid" or pool == "map":  # SigLIP's loss or head.
        return export_hf_siglip(workdir, out, step, config)
    cfg, found, params, oc = _exportable(workdir, step, "transformers' CLIPModel")
    if cfg.captioning:
        raise ConversionError(
            "a CoCa's towers have no exact transformers form, even with the decoder dropped: "
            "its image tower pools with attention queries, a LayerNorm and a projection "
            "(CLIPModel pools a class token, SiglipModel a probe with a residual MLP) and its "
            "text tower a causal CLS token; export it with `mmjax export open_clip`"
        )
    if cfg.init_logit_bias:
        raise ConversionError("a model with a logit bias (sigmoid loss) is not a CLIPModel")
    state = hf_clip.from_open_clip_state(export_state_dict(params, cfg), oc)
    size = cfg.image_size
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "do_convert_rgb": True,
    }
    files = {"config.json": hf_clip.hf_config(oc), "preprocessor_config.json": processor}
    # transformers reads only safetensors files that say which framework wrote them.
    summary = _write(Path(out), files, hf_clip.WEIGHTS, state, metadata={"format": "pt"})
    return {"step": found, "model": "CLIPModel", **summary}


def export_hf_siglip(workdir: str, out: str, step: int | None, config) -> dict[str, Any]:
    """A sigmoid run as a transformers SiglipModel, with its SentencePiece tokenizer when the
    run reads one in SigLIP's layout."""
    from mmjax.interop import hf_clip, hf_siglip

    cfg, found, params = read_run(workdir, step)
    differences = hf_siglip.differences(cfg)
    if differences:
        raise ConversionError(
            "transformers' SiglipModel has no model equal to this one; it would differ in "
            + "; ".join(differences)
        )
    files = {
        "config.json": hf_siglip.hf_config(cfg),
        "preprocessor_config.json": hf_siglip.processor_config(cfg),
    }
    target = Path(out)
    tokenizer = config.data.get("tokenizer", "")
    if config.data.get("tokenizer_type") == "siglip" and tokenizer:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, target / hf_siglip.TOKENIZER_FILE)
        files["tokenizer_config.json"] = {
            "tokenizer_class": "SiglipTokenizer",
            "model_max_length": cfg.context_length,
            "do_lower_case": True,
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
        }
    state = hf_siglip.from_params(params, cfg)
    summary = _write(target, files, hf_clip.WEIGHTS, state, metadata={"format": "pt"})
    return {"step": found, "model": "SiglipModel", **summary}


TARGETS = {"open_clip": export_open_clip, "hf": export_hf}


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="mmjax export")
    parser.add_argument("target", choices=sorted(TARGETS), help="the library to export for")
    parser.add_argument("--workdir", required=True, help="a run or converted workdir")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    args = parser.parse_args(argv)
    try:
        summary = TARGETS[args.target](args.workdir, args.out, args.step)
    except (ConversionError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
