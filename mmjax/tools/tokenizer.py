"""Tokenizers from the command line.

mmjax tokenizer train SRC_SPEC --vocab-size N --out tok.model   # SentencePiece, from captions
mmjax tokenizer encode TOKENIZER "a photo of a cat" [--type clip_bpe]   # prints the ids
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections

from mmjax.data.sources import make_source, read_captions
from mmjax.runtime import cli
from mmjax.text.registry import TOKENIZER_TYPES, load_tokenizer
from mmjax.text.sentencepiece import train_tokenizer


def _train(args) -> int:
    data = ml_collections.ConfigDict(
        dict(
            seed=0,
            train_examples=20_000,
            eval_examples=512,
            image_key=args.image_key,
            caption_key=args.caption_key,
        )
    )
    try:
        source = make_source(args.source, split="train", data=data, image_size=32, frames=None)
        captions = read_captions([source], args.max_captions, progress=True)
        if not captions:
            raise ValueError(f"{source.name}: no usable caption among its {len(source)} samples")
        tokenizer = train_tokenizer(captions, args.out, args.vocab_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    note = ""
    if tokenizer.vocab_size < args.vocab_size:
        note = (
            f" (below --vocab-size {args.vocab_size}, an upper bound: these captions hold no "
            "more distinct pieces)"
        )
    print(
        f"wrote {args.out}: vocabulary {tokenizer.vocab_size}{note}, from {len(captions)} captions"
    )
    return 0


def _encode(args) -> int:
    try:
        tokenizer = load_tokenizer(args.tokenizer, args.type)
        ids = tokenizer.encode(args.text, args.context_length)[0]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The row up to its first EOS: padding follows it (SigLIP's layout pads with EOS itself).
    end = list(ids).index(tokenizer.eos_id) + 1 if tokenizer.eos_id in ids else len(ids)
    print(" ".join(str(int(i)) for i in ids[:end]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.tokenizer", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece model on a source's captions")
    train.add_argument("source", help="data source spec: shapes, csv:PATH, wds:PATTERN, ...")
    train.add_argument("--vocab-size", type=int, required=True, help="upper bound")
    train.add_argument("--out", required=True, help="where to write the .model file")
    train.add_argument("--max-captions", type=int, default=1_000_000)
    train.add_argument("--image-key", default="filepath", help="csv column of image paths")
    train.add_argument("--caption-key", default="caption", help="csv column of captions")
    encode = commands.add_parser("encode", help="print a text's ids (BOS ... EOS)")
    encode.add_argument("tokenizer", help="a .model file, or CLIP's bpe_simple_vocab_16e6.txt.gz")
    encode.add_argument("text")
    encode.add_argument("--type", default="sentencepiece", choices=TOKENIZER_TYPES)
    encode.add_argument("--context-length", type=int, default=77)
    args = parser.parse_args(argv)
    return _train(args) if args.command == "train" else _encode(args)


if __name__ == "__main__":
    sys.exit(main())
