"""`mmjax convert SOURCE ...`: another library's weights as an mmjax workdir.

  mmjax convert open_clip --model-config CONFIG.json --checkpoint CKPT --out DIR
  mmjax convert hf --model-dir DIR --out W          # a transformers CLIPModel directory

Every source is mapped into open_clip's layout first and imported by one mapping
(mmjax.interop.open_clip), so what one source proves the others share. W gets config.json
(configs/coca.py's defaults with the converted model and the CLIP BPE tokenizer, from
--bpe-vocab or the installed open_clip package) and checkpoints/0 (parameters only), read by
every inference command and by `mmjax train --config.init_from=W`. What mmjax cannot
represent is refused by name, in one line.
"""

from __future__ import annotations

import sys

from mmjax.interop import hf_clip
from mmjax.interop.open_clip import BPE_FILE, ConversionError, convert_open_clip, import_state
from mmjax.runtime import cli


def convert_hf(model_dir: str, out: str, bpe_vocab: str | None = None, progress: bool = True):
    oc, state = hf_clip.read_model_dir(model_dir)
    return import_state(oc, state, out, bpe_vocab, "hf", progress)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="mmjax convert")
    sub = parser.add_subparsers(dest="source", required=True)
    oc = sub.add_parser("open_clip", help="an open_clip CLIP or CoCa checkpoint")
    oc.add_argument("--model-config", required=True, help="open_clip model config JSON")
    oc.add_argument("--checkpoint", required=True, help=".safetensors or torch state_dict")
    hf = sub.add_parser("hf", help="a transformers CLIPModel directory (save_pretrained)")
    hf.add_argument("--model-dir", required=True, help="config.json + model.safetensors")
    for p in (oc, hf):
        p.add_argument("--out", required=True, help="directory to create")
        p.add_argument(
            "--bpe-vocab", default=None, help=f"CLIP's {BPE_FILE} (default: open_clip's)"
        )
    args = parser.parse_args(argv)
    try:
        if args.source == "hf":
            cfg = convert_hf(args.model_dir, args.out, args.bpe_vocab)
        else:
            cfg = convert_open_clip(args.model_config, args.checkpoint, args.out, args.bpe_vocab)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "CoCa" if cfg.captioning else "CLIP"
    print(f"wrote {args.out}: {kind}, image {cfg.image_size}px, context {cfg.context_length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
