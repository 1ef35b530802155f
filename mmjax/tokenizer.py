"""SentencePiece tokenizer for captions: training, caching and fixed-length encoding.

Command line (trains on the captions of any data source spec):

  python -m mmjax.tokenizer train SRC_SPEC --vocab-size N --out tok.model

Id layout shared by every model this module trains: pad=0, unk=1, bos=2,
eos=3. An encoded caption is BOS, pieces..., EOS, then pad up to the context
length.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from mmjax import cli

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def check_context_length(context_length: int) -> None:
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold BOS and EOS, got {context_length}")


def caption_row(ids: Sequence[int], context_length: int, tok) -> tuple[np.ndarray, bool]:
    """The row layout every tokenizer shares: int32 [context_length] = BOS, ids, EOS, pad...
    (ids cut so that EOS still fits), and whether they were cut."""
    truncated = len(ids) > context_length - 2
    ids = ids[: context_length - 2]
    row = np.full(context_length, tok.pad_id, np.int32)
    row[0] = tok.bos_id
    row[1 : 1 + len(ids)] = ids
    row[1 + len(ids)] = tok.eos_id
    return row, truncated


def encode_rows(tok, captions: Sequence[str], context_length: int) -> np.ndarray:
    """int32 [len(captions), context_length]: tok.encode() of each caption."""
    if isinstance(captions, str):
        raise TypeError("encode_batch takes a sequence of captions, got a single str")
    rows = [tok.encode(caption, context_length)[0] for caption in captions]
    if not rows:
        return np.zeros((0, context_length), np.int32)
    return np.stack(rows)


class Tokenizer:
    """Wraps a SentencePiece model with batch encoding to fixed-length rows."""

    def __init__(self, processor: spm.SentencePieceProcessor, name: str = "<in-memory>"):
        for role, actual in (
            ("pad", processor.pad_id()),
            ("bos", processor.bos_id()),
            ("eos", processor.eos_id()),
        ):
            if actual < 0:
                raise ValueError(
                    f"tokenizer {name} has no {role} id; train it with train_tokenizer"
                )
        self._sp = processor

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return cls(spm.SentencePieceProcessor(model_file=str(path)), name=str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, caption: str, context_length: int) -> tuple[np.ndarray, bool]:
        """int32 [context_length] (BOS, pieces..., EOS, pad...) and whether it was cut.

        A caption with more than context_length - 2 pieces is cut so that the
        row still ends with EOS.
        """
        check_context_length(context_length)
        # One call per caption: sentencepiece's list encode pays ~130 us of
        # thread-pool setup per call, 40x the cost of encoding one caption.
        return caption_row(self._sp.encode(caption, out_type=int), context_length, self)

    def encode_batch(self, captions: Sequence[str], context_length: int) -> np.ndarray:
        """int32 [len(captions), context_length]: encode() of each caption."""
        return encode_rows(self, captions, context_length)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, up to the first EOS; BOS and pad are dropped."""
        kept = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.eos_id:
                break
            if token in (self.bos_id, self.pad_id):
                continue
            # A model whose embedding table is padded past vocab_size can emit
            # ids the tokenizer does not know; show them as unknown.
            kept.append(token if 0 <= token < self.vocab_size else self._sp.unk_id())
        return self._sp.decode(kept)

    def decode_batch(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """decode() for each row of a [B, L] batch of ids."""
        return [self.decode(row) for row in ids]


TOKENIZER_TYPES = ("sentencepiece", "clip_bpe")


def load_tokenizer(path: str | os.PathLike, kind: str = "sentencepiece"):
    """The tokenizer of data.tokenizer_type `kind` at `path` (same interface either way)."""
    if kind == "sentencepiece":
        return Tokenizer.load(path)
    if kind == "clip_bpe":  # Converted open_clip models (mmjax.convert).
        from mmjax.clip_tokenizer import ClipBpeTokenizer

        return ClipBpeTokenizer.load(path)
    raise ValueError(f"data.tokenizer_type={kind!r} is unknown; allowed: {TOKENIZER_TYPES}")


def train_tokenizer(
    captions: Iterable[str], out_path: str | os.PathLike, vocab_size: int
) -> Tokenizer:
    """Trains a SentencePiece model on `captions`, writes it to `out_path`, loads it.

    `vocab_size` is an upper bound: a small corpus yields a smaller vocabulary.
    The same captions always give the same model bytes.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("train_tokenizer got no captions to train on")
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(
                f"train_tokenizer captions must be str, got {type(caption).__name__}: {caption!r}"
            )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_writer=model,
            # BPE, not the default unigram: on the shapes captions (~25
            # distinct words) unigram stops at 45 near-character pieces for
            # any vocab_size (26 pieces per caption); BPE learns whole words.
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            # Errors only: training otherwise logs dozens of INFO lines to stderr.
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"sentencepiece training failed for vocab_size={vocab_size} "
            f"on {len(captions)} captions: {error}"
        ) from error
    _write_atomically(Path(out_path), model.getvalue())
    return Tokenizer.load(out_path)


def load_or_train_tokenizer(
    path: str | os.PathLike, captions_fn: Callable[[], Iterable[str]], vocab_size: int
) -> Tokenizer:
    """Loads the tokenizer cached at `path`, training it from captions_fn() if absent."""
    path = Path(path)
    if path.is_file():
        return Tokenizer.load(path)
    return train_tokenizer(captions_fn(), path, vocab_size)


def _write_atomically(path: Path, data: bytes) -> None:
    # Readers (or other processes training the same model concurrently) see
    # either no file or a complete one, never a partial write.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the model is not secret
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_captions(sources: Sequence[Any], limit: int, *, progress: bool = False) -> list[str]:
    """Up to `limit` usable captions spread evenly over `sources` and within each source."""
    from mmjax.data.sources import caption_sample

    if limit < 1:
        raise ValueError(f"caption limit must be >= 1, got {limit}")
    per_source = max(1, limit // max(len(sources), 1))
    return [c for source in sources for c in caption_sample(source, per_source, progress=progress)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m mmjax.tokenizer")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece model on a source's captions")
    train.add_argument("source", help="data source spec: shapes, csv:PATH, wds:PATTERN, ...")
    train.add_argument("--vocab-size", type=int, required=True, help="upper bound")
    train.add_argument("--out", required=True, help="where to write the .model file")
    train.add_argument("--max-captions", type=int, default=1_000_000)
    train.add_argument("--image-key", default="filepath", help="csv column of image paths")
    train.add_argument("--caption-key", default="caption", help="csv column of captions")
    args = parser.parse_args(argv)

    import ml_collections

    from mmjax.data.sources import make_source

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


if __name__ == "__main__":
    sys.exit(main())
