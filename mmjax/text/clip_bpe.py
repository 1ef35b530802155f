"""CLIP's byte-level BPE tokenizer (open_clip's models), read offline from its merges file.

  mmjax tokenizer encode VOCAB.txt.gz "a photo of a cat" --type clip_bpe   # prints the ids

The vocabulary file is CLIP's `bpe_simple_vocab_16e6.txt.gz` (open_clip ships it inside
its package), given by path: nothing is downloaded. Ids follow CLIP: the 256 byte symbols,
the same with the end-of-word marker, one id per merge, then <|startoftext|> (BOS) and
<|endoftext|> (EOS); padding is id 0 as in open_clip (a real token, so it is never
generated: mmjax.inference.generate bans the pad id). Text is cleaned like open_clip's default:
ftfy (when installed), HTML unescaping, collapsed whitespace, lower case.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Sequence

import numpy as np
import regex

from mmjax import storage
from mmjax.text.tokenizer import PAD_ID, caption_row, check_context_length, encode_rows

MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file.
BOS_TEXT, EOS_TEXT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


@functools.cache
def byte_symbols() -> tuple[str, ...]:
    """A printable character per byte value (BPE works on these, never on raw bytes):
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return tuple(symbols[b] for b in range(256))


def clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # Optional: only mojibake repair is lost.
        pass
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).strip().lower()


class ClipBpeTokenizer:
    """mmjax's tokenizer interface (encode_batch, decode_batch, bos/eos/pad ids) for CLIP BPE."""

    def __init__(self, merges: Sequence[tuple[str, str]], name: str = "<in-memory>"):
        self.name = name
        symbols = list(byte_symbols())
        # CLIP lists the bytes that stand for themselves first, then the remapped ones.
        base = sorted(symbols, key=ord)
        vocab = base + [s + END_OF_WORD for s in base] + ["".join(m) for m in merges]
        vocab += [BOS_TEXT, EOS_TEXT]
        self._ids = {piece: i for i, piece in enumerate(vocab)}
        self._pieces = vocab
        self._rank = {pair: i for i, pair in enumerate(merges)}
        self._byte_of = {s: b for b, s in enumerate(symbols)}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClipBpeTokenizer:
        path = storage.path(path)
        if not storage.retry(path.is_file, f"reading {path}"):
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}")
        try:
            data = storage.read_bytes(path)
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            lines = data.decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read CLIP BPE vocabulary {path}: {e}") from None
        merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if len(merges) != MERGES or bad is not None:
            raise ValueError(
                f"{path} is not CLIP's BPE merges file (needs {MERGES} 'a b' lines after the "
                f"header; line {(bad or len(merges)) + 2} is not one)"
            )
        return cls(merges, name=str(path))

    def piece_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece (as CLIP's vocab.json spells it), None if unknown."""
        return self._ids.get(piece)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return self._ids[BOS_TEXT]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS_TEXT]

    def _word_ids(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        parts = [self._byte_symbol(b) for b in word.encode("utf-8")]
        parts[-1] += END_OF_WORD
        while len(parts) > 1:  # Apply the lowest-ranked merge present, until none applies.
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self._rank.get(p, float("inf")))
            if best not in self._rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._ids[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    @staticmethod
    def _byte_symbol(byte: int) -> str:
        return byte_symbols()[byte]

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        return [i for word in _WORDS.findall(clean(text)) for i in self._word_ids(word)]

    def encode(self, caption: str, context_length: int) -> tuple[np.ndarray, bool]:
        """int32 [context_length]: BOS, ids..., EOS, pad; and whether the caption was cut
        (then it still ends with EOS, as open_clip's tokenize does)."""
        check_context_length(context_length)
        return caption_row(self.encode_ids(caption), context_length, self)

    def encode_batch(self, captions: Sequence[str], context_length: int) -> np.ndarray:
        return encode_rows(self, captions, context_length)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row up to the first EOS; BOS and padding after EOS are dropped."""
        data = bytearray()
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.eos_id:
                break
            if token == self.bos_id or not 0 <= token < self.vocab_size:
                continue
            piece = self._pieces[token].replace(END_OF_WORD, " ")
            data.extend(self._byte_of.get(ch, ord(ch) & 0xFF) if ch != " " else 32 for ch in piece)
        return " ".join(data.decode("utf-8", errors="replace").split())

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in ids]
