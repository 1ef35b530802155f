"""ArrayRecord shards of (key, encoded image, raw caption) records.

ArrayRecord files give fast random access to whole records; written with
`group_size:1` (one record per chunk), reading one record decompresses only
that record. `write_arrayrecord_shards` converts any source into shards;
`ArrayRecordSource` reads them back in the same order.

Record layout (all integers little-endian; no pickle, so reading is safe and
language-neutral):

    offset  size  field
    0       4     magic b"MMJ1"
    4       4     u32 key length K
    8       4     u32 caption length C, or 0xFFFFFFFF for "no caption" (None)
    12      K     key, UTF-8 (surrogateescape: odd file names survive)
    12+K    C     caption bytes exactly as the source had them (not validated:
                  invalid UTF-8 is kept for the caption decoder to reject)
    12+K+C  rest  encoded image bytes (JPEG, PNG, ...)
"""

from __future__ import annotations

import concurrent.futures
import operator
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import grain
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from mmjax import storage
from mmjax.data.records import BadSample, Source

MAGIC = b"MMJ1"
_HEADER = struct.Struct("<4sII")
NO_CAPTION = 0xFFFFFFFF
# One record per chunk: random access reads (and decompresses) just that record.
WRITER_OPTIONS = "group_size:1"
SHARD_NAME = "data-{index:05d}-of-{count:05d}.array_record"
_READ_AHEAD = 256  # records read concurrently while writing


def encode_record(key: str, image: bytes, caption: str | bytes | None) -> bytes:
    """One record in the layout of the module docstring."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"record {key!r}: image must be encoded bytes, got {type(image).__name__} "
            "(sources of decoded arrays cannot be stored as ArrayRecord)"
        )
    key_bytes = key.encode("utf-8", "surrogateescape")
    if caption is None:
        caption_bytes, caption_length = b"", NO_CAPTION
    else:
        if isinstance(caption, str):
            # Lone surrogates (from a CSV read with surrogateescape) become the
            # original invalid bytes again.
            caption_bytes = caption.encode("utf-8", "surrogateescape")
        else:
            caption_bytes = bytes(caption)
        caption_length = len(caption_bytes)
    return b"".join(
        (_HEADER.pack(MAGIC, len(key_bytes), caption_length), key_bytes, caption_bytes, image)
    )


def _split(record: bytes) -> tuple[int, int, int]:
    """(key end, caption end, caption length or NO_CAPTION) of a record, checked."""
    if len(record) < _HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than the header")
    magic, key_length, caption_length = _HEADER.unpack_from(record)
    if magic != MAGIC:
        raise ValueError(f"record starts with {magic!r}, not {MAGIC!r}: not an mmjax record")
    key_end = _HEADER.size + key_length
    caption_end = key_end + (0 if caption_length == NO_CAPTION else caption_length)
    if caption_end > len(record):
        raise ValueError(f"record of {len(record)} bytes is shorter than its header says")
    return key_end, caption_end, caption_length


def decode_record(record: bytes) -> dict[str, Any]:
    """{"key": str, "image": bytes, "caption": bytes | None} from `encode_record` output."""
    key_end, caption_end, caption_length = _split(record)
    view = memoryview(record)
    return {
        "key": bytes(view[_HEADER.size : key_end]).decode("utf-8", "surrogateescape"),
        "image": bytes(view[caption_end:]),
        "caption": None if caption_length == NO_CAPTION else bytes(view[key_end:caption_end]),
    }


def decode_caption_only(record: bytes) -> bytes | None:
    """The caption of a record, without copying its image."""
    key_end, caption_end, caption_length = _split(record)
    return None if caption_length == NO_CAPTION else bytes(memoryview(record)[key_end:caption_end])


class ArrayRecordSource:
    """Records of ArrayRecord shards: {"key": str, "image": bytes, "caption": bytes | None}.

    Shards are read in sorted file-name order, which for the names that
    `write_arrayrecord_shards` writes is the order of the source they came from. A
    `gs://` glob is copied shard by shard into the local object cache first
    (mmjax.storage.local_copy; $MMJAX_CACHE/objects), since array_record reads local files.
    """

    def __init__(self, path_glob: str):
        self.path_glob = path_glob
        self.name = f"arrayrecord:{path_glob}"
        self.paths = storage.glob(path_glob)
        if not self.paths:
            raise FileNotFoundError(f"no ArrayRecord file matches {path_glob!r}")
        if storage.is_remote(path_glob):
            # array_record's reader opens local files only: each shard is copied once into
            # the local object cache (kept per object generation), then read from there.
            cache = storage.local_cache()
            self.paths = [str(storage.local_copy(p, cache)) for p in self.paths]
        # Opens readers lazily, locks internally, and pickles without them.
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (
            f"ArrayRecordSource({self.path_glob!r}, {len(self.paths)} files, {len(self)} records)"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._records[self._check(index)])

    def caption(self, index: int) -> bytes | None:
        return decode_caption_only(self._records[self._check(index)])

    def _check(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} records")
        return index


def write_arrayrecord_shards(
    source: Source,
    out_dir: str | os.PathLike,
    num_shards: int,
    progress: bool = True,
    *,
    num_threads: int = 8,
) -> dict[str, int]:
    """Writes `source` as `out_dir/data-SSSSS-of-NNNNN.array_record`, in source order.

    Shard s holds records [s*n//N, (s+1)*n//N) (minus skipped ones), so the
    sorted shard names read back in the source's order. Samples the source
    cannot read (BadSample, e.g. missing_file) are skipped and counted.
    `num_shards` is capped at the number of records. Shards are written under
    temporary names and renamed only once all of them are complete, so a crash
    never leaves a half-written (or a partial set of) shard with a final name.
    `num_threads` reads records concurrently (file and network reads overlap).

    Returns {"written": n, "skipped_missing_file": k, "skipped_<reason>": ...}.
    """
    total = len(source)
    if total == 0:
        raise ValueError(f"{source.name}: no records to write")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = min(num_shards, total)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.array_record"))
    if existing:
        # The reader globs the folder: old shards would be mixed in.
        raise FileExistsError(
            f"{out} already holds {len(existing)} .array_record files (e.g. {existing[0].name}); "
            "write into an empty folder"
        )
    counts: Counter[str] = Counter({"written": 0, "skipped_missing_file": 0})
    finals = [out / SHARD_NAME.format(index=s, count=num_shards) for s in range(num_shards)]
    temporaries = [final.with_name(f".{final.name}.tmp") for final in finals]

    def read(index: int) -> dict[str, Any] | BadSample:
        try:
            return source[index]
        except BadSample as bad:
            return bad

    bar = tqdm.tqdm(total=total, desc=f"writing {out}", unit="rec", disable=not progress)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            for shard, temporary in enumerate(temporaries):
                start, stop = shard * total // num_shards, (shard + 1) * total // num_shards
                writer = ArrayRecordWriter(str(temporary), WRITER_OPTIONS)
                try:
                    # Bounded read-ahead: pool.map over everything would hold every record.
                    for chunk in range(start, stop, _READ_AHEAD):
                        indices = range(chunk, min(chunk + _READ_AHEAD, stop))
                        for record in pool.map(read, indices):
                            bar.update(1)
                            if isinstance(record, BadSample):
                                counts[f"skipped_{record.reason}"] += 1
                                continue
                            writer.write(
                                encode_record(record["key"], record["image"], record["caption"])
                            )
                            counts["written"] += 1
                finally:
                    writer.close()
        for temporary, final in zip(temporaries, finals):
            os.replace(temporary, final)
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return dict(counts)
