"""WebDataset tar shards (img2dataset layout) as a random-access source.

A shard is an uncompressed tar whose members are grouped into samples by key:
`KEY.jpg` (or .jpeg/.png/.webp, any case) holds the image, `KEY.txt` the
caption and `KEY.json` metadata (indexed, unused for now). KEY is the member
name up to the first dot of its basename, with any directory prefix kept
(webdataset's rule; img2dataset keys contain no dots), and the rest is the
extension: `cat.v1.jpg` has key `cat` and extension `v1.jpg`, which is no image.
Members of other extensions (.cls, .npy, ...) are ignored.

What indexing cannot use is reported in one line per shard (kept in the cached
index, so it is reported on every start): members whose names look like an image
or caption behind a second dot, and a shard that ends inside a member or without
the tar end-of-archive blocks (a truncated copy: the samples that were after the
cut are gone). A member cut short by the truncation reads as the bad sample
`truncated_member`. A source whose shards hold no sample at all is an error.

Random access without extracting anything: each shard's tar headers are
scanned once with `tarfile` for every member's data offset and size, and
samples are read with `os.pread` on a file descriptor opened lazily per
process (pread has no shared file position, so threads need no lock). Shards on
object storage (`gs://...`, brace ranges and globs alike) are scanned through a
seekable remote file and read with one ranged request per member.

The index of a shard is cached as `<shard>.idx.json` next to it when that
folder is writable, else in `cache_dir` (named by a hash of the shard's
absolute path or URL; a workdir on object storage serves too), else kept in memory
only. A cache is used only while the shard's size and mtime_ns (an object's
generation) match the ones it records.

Incomplete samples are kept, so that the pipeline counts them rather than
hiding them: a key with a caption (or metadata) but no image raises
BadSample("missing_file") when read; a key with an image but no caption reads
with caption None, which the caption decoder counts as `empty_caption`.
If a key has several images, the first one in the tar is used.

Samples are ordered by shard (in pattern order), then by where their key
first appears in the tar.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import operator
import os
import re
import tarfile
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from mmjax import storage
from mmjax.data.records import BadSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 2
# Columns of a shard index: member data offset and size, -1 where the member is absent.
_FIELDS = ("image", "txt", "json")

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Expands `{000..099}` ranges (zero padding kept) and `{a,b}` lists, left to right.

    `a{0..1}b{x,y}` -> a0bx, a0by, a1bx, a1by. A range counts down if its end is
    below its start. Braces holding neither a range nor a comma stay literal.
    """
    pieces: list[list[str]] = []
    position = 0
    for match in _BRACE.finditer(pattern):
        pieces.append([pattern[position : match.start()]])
        pieces.append(_expand_group(match.group(1)))
        position = match.end()
    pieces.append([pattern[position:]])
    return ["".join(parts) for parts in itertools.product(*pieces)]


def _expand_group(body: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        first, last = match.groups()
        start, stop = int(first), int(last)
        step = 1 if stop >= start else -1
        # Leading zeros on either end ask for padding to the wider end.
        padded = any(
            len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in match.groups()
        )
        width = max(len(first), len(last)) if padded else 0
        return [f"{n:0{width}d}" for n in range(start, stop + step, step)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]


def shard_paths(pattern: str) -> list[str]:
    """The shard files `pattern` names, in order; glob wildcards are allowed after expansion."""
    paths: list[str] = []
    for expanded in expand_braces(pattern):
        if _GLOB_CHARS.search(expanded):
            matched = storage.glob(expanded)
            if not matched:
                raise FileNotFoundError(f"no shard matches {expanded!r} (from {pattern!r})")
            paths.extend(matched)
        elif not storage.is_file(expanded):
            raise FileNotFoundError(f"shard {expanded} does not exist (from {pattern!r})")
        else:
            paths.append(expanded)
    return paths


class ShardIndex:
    """Where each sample's members lie in one shard (offset, size; -1 when absent), and
    what indexing could not use (`problems`: one-line descriptions)."""

    def __init__(
        self,
        keys: list[str],
        columns: dict[str, np.ndarray],
        problems: list[str] | None = None,
        ignored: int = 0,
    ):
        # Fixed-width arrays: far smaller than lists of Python objects.
        self.keys = np.asarray(keys, dtype=str)
        self.columns = {name: np.asarray(columns[name], np.int64) for name in columns}
        self.problems = list(problems or [])
        self.ignored = int(ignored)  # members not used: unknown extensions included

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self, size: int, mtime_ns: int, shard: str) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "shard": shard,
            "shard_size": size,
            "shard_mtime_ns": mtime_ns,
            "keys": self.keys.tolist(),
            "problems": self.problems,
            "ignored": self.ignored,
            **{name: column.tolist() for name, column in self.columns.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardIndex:
        columns = {}
        for field in _FIELDS:
            for part in ("offset", "size"):
                columns[f"{field}_{part}"] = data[f"{field}_{part}"]
        return cls(data["keys"], columns, data["problems"], data["ignored"])


_TAR_BLOCK = 512
_LIKELY_FIELDS = (*IMAGE_EXTENSIONS, "txt", "json")


def scan_shard(path: str) -> ShardIndex:
    """Reads a tar's headers (not its data) and groups members into samples."""
    found: dict[str, dict[str, tuple[int, int]]] = {}  # Insertion order = tar order.
    size, _ = storage.stat(path)
    second_dot: list[str] = []  # names like cat.v1.jpg: an image behind a second dot
    ignored = end = 0
    cut: str | None = None
    stream = storage.open_binary(path)
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
    except tarfile.ReadError as e:
        stream.close()
        raise ValueError(f"shard {path} is not an uncompressed tar file: {e}") from None
    with stream, tar:
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError as e:  # Past the first member: the rest is cut off.
                if tar.offset == 0:
                    raise ValueError(f"shard {path} is not an uncompressed tar file: {e}") from None
                break
            if member is None:
                break
            end = tar.offset  # Just past this member.
            if not member.isfile() or member.issparse():
                continue
            if member.offset_data + member.size > size:
                cut = f"{member.name} ({size - member.offset_data} of {member.size} bytes)"
            folder, _, basename = member.name.rpartition("/")
            stem, dot, extension = basename.partition(".")
            extension = extension.lower()
            field = "image" if extension in IMAGE_EXTENSIONS else extension
            if not stem or not dot or field not in _FIELDS:
                ignored += 1
                if "." in extension and extension.rsplit(".", 1)[1] in _LIKELY_FIELDS:
                    second_dot.append(member.name)
                continue
            key = f"{folder}/{stem}" if folder else stem
            # setdefault: the first image (or caption) of a key wins.
            found.setdefault(key, {}).setdefault(field, (member.offset_data, member.size))
    problems = []
    if cut is not None:
        problems.append(
            f"it ends inside member {cut}: the shard is truncated, the samples after it are "
            "lost and this one is skipped as truncated_member"
        )
    elif not _has_end_marker(path, end, size):
        problems.append(
            f"it ends at byte {size} without the tar end-of-archive blocks: the shard is "
            "probably truncated and samples after its last member are lost"
        )
    if second_dot:
        problems.append(
            f"{len(second_dot)} members ignored because a sample's key is the name up to its "
            f"first dot, so {second_dot[0]!r} has extension "
            f"{second_dot[0].rpartition('/')[2].partition('.')[2]!r}, not an image or caption"
        )
    columns = {
        f"{field}_{part}": [members.get(field, (-1, -1))[i] for members in found.values()]
        for field in _FIELDS
        for i, part in enumerate(("offset", "size"))
    }
    return ShardIndex(list(found), columns, problems, ignored)


def _has_end_marker(path: str, end: int, size: int) -> bool:
    """Whether the bytes after the last member are the two zero blocks a tar ends with."""
    if size - end < 2 * _TAR_BLOCK:
        return False
    with storage.open_binary(path) as f:
        f.seek(end)
        return not any(f.read(2 * _TAR_BLOCK))


def _cache_paths(shard: str, cache_dir: str | os.PathLike | None) -> list[Any]:
    paths = [storage.path(shard + INDEX_SUFFIX)]
    if cache_dir is not None:
        digest = hashlib.sha256(str(storage.path(shard)).encode("utf-8", "surrogateescape"))
        paths.append(storage.path(cache_dir) / f"{digest.hexdigest()[:32]}{INDEX_SUFFIX}")
    return paths


def load_index(shard: str, cache_dir: str | os.PathLike | None = None) -> ShardIndex:
    """The shard's index: from a fresh cache if there is one, else scanned and cached."""
    size, mtime_ns = storage.stat(shard)
    absolute = str(storage.path(shard))
    candidates = _cache_paths(shard, cache_dir)
    for cache in candidates:
        try:
            data = json.loads(storage.read_text(cache))
            if (
                data.get("version") == INDEX_VERSION
                and data.get("shard_size") == size
                and data.get("shard_mtime_ns") == mtime_ns
                and (cache == candidates[0] or data.get("shard") == absolute)
            ):
                return ShardIndex.from_json(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # Missing, unreadable or corrupt: rebuild.
    index = scan_shard(shard)
    text = json.dumps(index.to_json(size, mtime_ns, absolute))
    for cache in candidates:
        if _write_atomically(cache, text):
            break
    return index


def _write_atomically(path: Any, text: str) -> bool:
    """Writes via a temporary file and rename, so readers never see half a file (object
    storage: one object, whole or absent); False where it cannot be written."""
    if storage.is_remote(path):
        try:
            storage.write_text(path, text)
            return True
        except OSError:
            return False  # A read-only bucket: try the next place.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError:
        return False  # Not writable: try the next place.
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users.
            f.write(text)
        os.replace(temporary, path)
        return True
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return False


class WebDatasetSource:
    """Samples of tar shards: {"key": "SHARD:KEY", "image": bytes, "caption": bytes | None}."""

    def __init__(
        self,
        pattern: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        """`warn` gets one line per shard that indexing could not fully use (default: the
        mmjax logger); a source without any sample raises ValueError."""
        self.pattern = pattern
        self.name = f"wds:{pattern}"
        self.shards = shard_paths(pattern)
        self.indexes = [load_index(shard, cache_dir) for shard in self.shards]
        warn = warn or logging.getLogger("mmjax").warning
        for shard, index in zip(self.shards, self.indexes):
            for problem in index.problems:
                warn(f"wds shard {shard}: {problem}")
        if not any(len(index) for index in self.indexes):
            detail = next((p for i in self.indexes for p in i.problems), "")
            raise ValueError(
                f"{self.name}: no samples in {len(self.shards)} shard(s): "
                + (detail or "they hold no KEY.jpg / KEY.txt members")
            )
        # Sample i lives in shard s where starts[s] <= i < starts[s + 1].
        self._starts = np.cumsum([0] + [len(index) for index in self.indexes])
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.pattern!r}, {len(self.shards)} shards, {len(self)} samples)"

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self._locate(index)
        key = f"{self.shards[shard]}:{self.indexes[shard].keys[row]}"
        image = self._read(shard, row, "image")
        if image is None:
            raise BadSample("missing_file", f"{key}: no image member (.jpg/.jpeg/.png/.webp)")
        return {"key": key, "image": image, "caption": self._read(shard, row, "txt")}

    def caption(self, index: int) -> bytes | None:
        """The raw caption bytes (None without a .txt member); reads nothing else."""
        return self._read(*self._locate(index), "txt")

    def _locate(self, index: int) -> tuple[int, int]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _read(self, shard: int, row: int, field: str) -> bytes | None:
        columns = self.indexes[shard].columns
        offset = int(columns[f"{field}_offset"][row])
        size = int(columns[f"{field}_size"][row])
        if offset < 0:
            return None
        if storage.is_remote(self.shards[shard]):
            return self._read_remote(shard, row, field, offset, size)
        fd = self._fd(shard)
        data = os.pread(fd, size, offset)
        while len(data) < size:  # pread may return less; 0 bytes means end of file.
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                key = self.indexes[shard].keys[row]
                raise BadSample(
                    "truncated_member",
                    f"{self.shards[shard]}:{key}: the shard ends {size - len(data)} bytes "
                    f"into its {field} member",
                )
            data += more
        return data

    def _read_remote(self, shard: int, row: int, field: str, offset: int, size: int) -> bytes:
        """One ranged read (object storage keeps no descriptors)."""
        try:
            data = storage.read_range(self.shards[shard], offset, size)
        except (FileNotFoundError, PermissionError) as e:
            raise BadSample("missing_file", f"{self.shards[shard]}: {e}") from None
        if len(data) < size:
            key = self.indexes[shard].keys[row]
            raise BadSample(
                "truncated_member",
                f"{self.shards[shard]}:{key}: the shard ends {size - len(data)} bytes "
                f"into its {field} member",
            )
        return data

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._fd_lock:  # Two threads must not both open (and leak) a descriptor.
                fd = self._fds.get(shard)
                if fd is None:
                    try:
                        fd = os.open(self.shards[shard], os.O_RDONLY)
                    except (FileNotFoundError, PermissionError) as e:
                        raise BadSample(
                            "missing_file", f"{self.shards[shard]}: {e.strerror}"
                        ) from None
                    self._fds[shard] = fd
        return fd

    def close(self) -> None:
        """Closes this process's shard descriptors (they reopen on the next read)."""
        with self._fd_lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors and locks belong to this process; the receiver opens its own.
        state = self.__dict__.copy()
        state["_fds"] = {}
        del state["_fd_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd_lock = threading.Lock()
