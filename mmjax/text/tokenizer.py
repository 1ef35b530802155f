"""What every tokenizer shares: the id layout, the fixed-length caption row, the interface.

Every tokenizer mmjax trains or reads for captioning models pads with id 0 (the models hide
id-0 keys and the caption loss skips id-0 targets), starts a caption with its BOS id and ends it
with its EOS id. SigLIP's layout (mmjax.text.siglip) is the exception: no BOS, padded with EOS,
for its contrastive-only models, whose text tower reads every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# The id layout of the SentencePiece models mmjax trains; PAD_ID holds for every tokenizer.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TextTokenizer(Protocol):
    """The interface the data pipeline, the evaluators and the Predictor use."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, caption: str, context_length: int) -> tuple[np.ndarray, bool]: ...

    def encode_batch(self, captions: Sequence[str], context_length: int) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def decode_batch(self, ids) -> list[str]: ...


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
