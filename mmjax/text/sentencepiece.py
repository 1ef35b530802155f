"""SentencePiece tokenizer for captions: training, caching and fixed-length encoding.

Trained from the command line by `mmjax tokenizer train` (mmjax/tools/tokenizer.py).

Id layout shared by every model this module trains: pad=0, unk=1, bos=2,
eos=3. An encoded caption is BOS, pieces..., EOS, then pad up to the context
length.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mmjax import storage
from mmjax.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    caption_row,
    check_context_length,
    encode_rows,
)


def read_processor(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A SentencePiece model file (local or object storage alike) as a processor."""
    path = storage.path(path)
    if not storage.retry(path.is_file, f"reading {path}"):
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    return spm.SentencePieceProcessor(model_proto=storage.read_bytes(path))


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
        return cls(read_processor(path), name=str(storage.path(path)))

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
    target = storage.path(out_path)
    if storage.is_remote(target):
        storage.write_bytes(target, model.getvalue())  # One object: whole or absent.
    else:
        _write_atomically(target, model.getvalue())
    return Tokenizer.load(target)


def load_or_train_tokenizer(
    path: str | os.PathLike, captions_fn: Callable[[], Iterable[str]], vocab_size: int
) -> Tokenizer:
    """Loads the tokenizer cached at `path`, training it from captions_fn() if absent."""
    path = storage.path(path)
    if storage.retry(path.is_file, f"reading {path}"):
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
