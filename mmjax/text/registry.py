"""Tokenizers chosen by name (data.tokenizer_type)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mmjax import storage
from mmjax.text.clip_bpe import ClipBpeTokenizer
from mmjax.text.sentencepiece import Tokenizer
from mmjax.text.siglip import SiglipTokenizer
from mmjax.text.tokenizer import TextTokenizer

# clip_bpe: the tokenizer of converted open_clip models (mmjax.interop.open_clip); siglip:
# that of converted SigLIP models (mmjax.interop.hf_siglip, big_vision).
TOKENIZERS = {
    "sentencepiece": Tokenizer.load,
    "clip_bpe": ClipBpeTokenizer.load,
    "siglip": SiglipTokenizer.load,
}
TOKENIZER_TYPES = tuple(TOKENIZERS)


def load_tokenizer(path: str | os.PathLike, kind: str = "sentencepiece") -> TextTokenizer:
    """The tokenizer of data.tokenizer_type `kind` at `path` (same interface either way)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"data.tokenizer_type={kind!r} is unknown; allowed: {TOKENIZER_TYPES}")
    return TOKENIZERS[kind](path)


def tokenizer_path(data: Mapping, workdir: str | os.PathLike) -> Any:
    """A run's tokenizer: data.tokenizer, else the one it trained and keeps in its workdir
    (local or object storage)."""
    return storage.path(data.get("tokenizer", "") or storage.path(workdir) / "tokenizer.model")
