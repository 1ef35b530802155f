"""`mmjax convert SOURCE ...`: another library's weights as an mmjax workdir.

  mmjax convert open_clip --model-config CONFIG.json --checkpoint CKPT --out W
  mmjax convert hf --model-dir DIR --out W       # a transformers CLIPModel or SiglipModel
  mmjax convert big_vision NPZ --variant B/16 --tokenizer SPM.model --out W   # SigLIP

CLIP sources (open_clip, a CLIPModel) are mapped into open_clip's layout and imported by one
mapping (mmjax.interop.open_clip); SigLIP sources (a SiglipModel, big_vision's `.npz`) into
transformers' SiglipModel layout and imported by another (mmjax.interop.hf_siglip). Both are
lists of mmjax.interop.tensor_map rules, which the exports run backwards. W gets config.json
(configs/coca.py's defaults with the converted model and its tokenizer) and checkpoints/0
(parameters only), read by every inference command and by `mmjax train --config.init_from=W`.

Tokenizers: a model directory's own files when present (a CLIPModel's merges.txt and
vocab.json, a SiglipModel's spiece.model; copied into W), else --bpe-vocab / open_clip's bundled
CLIP BPE for CLIP, --tokenizer for SigLIP. What mmjax cannot represent is refused by name, in
one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mmjax.interop import big_vision, hf_clip, hf_siglip
from mmjax.interop.open_clip import (
    BPE_FILE,
    ConversionError,
    check_against_model,
    convert_open_clip,
    copy_into,
    import_state,
    load_checkpoint,
    write_workdir,
)
from mmjax.models.config import ModelConfig
from mmjax.runtime import cli
from mmjax.text.clip_bpe import ClipBpeTokenizer


def _read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ConversionError(f"--model-dir {path.parent}: no {path.name}")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not JSON ({e})") from None


def folder_bpe(directory: Path) -> Path | None:
    """A CLIPModel directory's merges.txt, checked against its vocab.json (the ids mmjax's
    CLIP BPE gives every piece must be the folder's); None when it has none."""
    merges, vocab_path = directory / "merges.txt", directory / "vocab.json"
    if not merges.is_file():
        return None
    try:
        tokenizer = ClipBpeTokenizer.load(merges)
    except ValueError as e:
        raise ConversionError(f"{merges}: {e}") from None
    vocab = _read_json(vocab_path, required=False)
    if vocab is not None:
        wrong = [piece for piece, i in vocab.items() if tokenizer.piece_id(piece) != i]
        if wrong:
            raise ConversionError(
                f"{vocab_path} disagrees with merges.txt on {len(wrong)} pieces "
                f"(first: {wrong[0]!r}); not CLIP's byte-level BPE"
            )
    return merges


def convert_hf(
    model_dir: str,
    out: str,
    bpe_vocab: str | None = None,
    progress: bool = True,
    tokenizer: str | None = None,
) -> ModelConfig:
    directory = Path(model_dir)
    config = _read_json(directory / "config.json")
    if config.get("model_type") == hf_siglip.MODEL_TYPE:
        preprocessor = _read_json(directory / "preprocessor_config.json", required=False)
        cfg = hf_siglip.model_config(config, preprocessor)
        weights = directory / hf_clip.WEIGHTS
        if not weights.is_file():
            raise ConversionError(f"--model-dir {directory}: no {weights.name}")
        own = directory / hf_siglip.TOKENIZER_FILE
        spm = _siglip_tokenizer(Path(tokenizer) if tokenizer else own)
        params = hf_siglip.to_params(load_checkpoint(weights), cfg, progress)
        return _write_siglip(cfg, params, spm, out, "hf")
    oc, state = hf_clip.read_model_dir(directory)
    own = None if bpe_vocab else folder_bpe(directory)
    return import_state(oc, state, out, own or bpe_vocab, "hf", progress, own is not None)


def convert_big_vision(
    npz: str, variant: str, tokenizer: str, out: str, progress: bool = True
) -> ModelConfig:
    spm = _siglip_tokenizer(Path(tokenizer))
    params = big_vision.read_npz(npz)
    config = big_vision.siglip_config(params, variant)
    cfg = hf_siglip.model_config(config)
    state = big_vision.to_hf_state(params, config)
    params = hf_siglip.to_params(state, cfg, progress)
    return _write_siglip(cfg, params, spm, out, "big_vision")


def _siglip_tokenizer(spm: Path) -> Path:
    if not spm.is_file():
        raise ConversionError(
            f"SigLIP tokenizer {spm} not found: pass --tokenizer PATH (its SentencePiece model)"
        )
    return spm


def _write_siglip(cfg: ModelConfig, params, spm: Path, out: str, source: str) -> ModelConfig:
    check_against_model(params, cfg)
    write_workdir(out, params, cfg, copy_into(spm, out), source, "siglip")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="mmjax convert")
    sub = parser.add_subparsers(dest="source", required=True)
    oc = sub.add_parser("open_clip", help="an open_clip CLIP or CoCa checkpoint")
    oc.add_argument("--model-config", required=True, help="open_clip model config JSON")
    oc.add_argument("--checkpoint", required=True, help=".safetensors or torch state_dict")
    hf = sub.add_parser("hf", help="a transformers CLIPModel or SiglipModel directory")
    hf.add_argument("--model-dir", required=True, help="config.json + model.safetensors")
    bv = sub.add_parser("big_vision", help="a big_vision SigLIP .npz checkpoint")
    bv.add_argument("npz", help="the checkpoint (.npz)")
    bv.add_argument("--variant", required=True, help="big_vision's image tower name, e.g. B/16")
    bv.add_argument("--tokenizer", required=True, help="its SentencePiece model")
    for p in (oc, hf):
        p.add_argument(
            "--bpe-vocab", default=None, help=f"CLIP's {BPE_FILE} (default: open_clip's)"
        )
    hf.add_argument(
        "--tokenizer", default=None, help="SigLIP: SentencePiece model (default: DIR's)"
    )
    for p in (oc, hf, bv):
        p.add_argument("--out", required=True, help="directory to create")
    args = parser.parse_args(argv)
    try:
        if args.source == "hf":
            cfg = convert_hf(args.model_dir, args.out, args.bpe_vocab, tokenizer=args.tokenizer)
        elif args.source == "big_vision":
            cfg = convert_big_vision(args.npz, args.variant, args.tokenizer, args.out)
        else:
            cfg = convert_open_clip(args.model_config, args.checkpoint, args.out, args.bpe_vocab)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "CoCa" if cfg.captioning else ("SigLIP" if cfg.vision.pool == "map" else "CLIP")
    print(f"wrote {args.out}: {kind}, image {cfg.image_size}px, context {cfg.context_length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
