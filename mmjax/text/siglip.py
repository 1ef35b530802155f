"""SigLIP's tokenizer: a SentencePiece model in SigLIP's row layout (data.tokenizer_type=siglip).

  mmjax tokenizer encode spiece.model "a photo of a cat" --type siglip   # prints the ids

The model file is the `spiece.model` of a transformers `SiglipModel` directory (or big_vision's
SentencePiece vocabulary for a converted `.npz`). A row is the caption's pieces, then EOS, then
EOS again as padding: there is no BOS and padding is not id 0, since SigLIP's text tower reads
every position and pools the last one ("sticky" EOS: a cut caption still ends with EOS). Text is
canonicalised as transformers' SiglipTokenizer does it: lower-cased, ASCII punctuation removed,
whitespace collapsed.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from mmjax import storage
from mmjax.text.sentencepiece import read_processor
from mmjax.text.tokenizer import check_context_length, encode_rows

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalise(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


class SiglipTokenizer:
    """mmjax's tokenizer interface for SigLIP's layout; bos_id is -1 (it has none)."""

    def __init__(self, processor: spm.SentencePieceProcessor, name: str = "<in-memory>"):
        if processor.eos_id() < 0:
            raise ValueError(f"tokenizer {name} has no EOS id; SigLIP's layout needs one")
        self.name = name
        self._sp = processor

    @classmethod
    def load(cls, path: str | os.PathLike) -> SiglipTokenizer:
        return cls(read_processor(path), name=str(storage.path(path)))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return -1

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, caption: str, context_length: int) -> tuple[np.ndarray, bool]:
        """int32 [context_length] (pieces..., EOS, EOS...) and whether it was cut."""
        check_context_length(context_length)
        ids = self._sp.encode(canonicalise(caption), out_type=int)
        truncated = len(ids) > context_length - 1
        row = np.full(context_length, self.eos_id, np.int32)
        kept = ids[: context_length - 1]
        row[: len(kept)] = kept
        return row, truncated

    def encode_batch(self, captions: Sequence[str], context_length: int) -> np.ndarray:
        return encode_rows(self, captions, context_length)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, up to the first EOS."""
        kept = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.eos_id:
                break
            kept.append(token if 0 <= token < self.vocab_size else self._sp.unk_id())
        return self._sp.decode(kept)

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in ids]
