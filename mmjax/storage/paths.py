"""Paths to local files or object storage (`gs://`, `s3://`), behind one Path type.

A local path stays a `pathlib.Path`; a URL becomes an `etils.epath.Path` (fsspec: gcsfs for
`gs://`, s3fs for `s3://`), which has the same methods (`/`, open, read_text, exists, glob,
iterdir, mkdir, rename, unlink). Checkpoints go through orbax/TensorStore, which speak
`gs://` natively. Code that takes a path calls `storage.path(...)` once and then uses the
Path's own methods, never the builtin `open` or `os.*`.

Object storage has no append and no rename of a folder in one step: files that grow
(metrics.jsonl, TensorBoard events, runs.jsonl) are rewritten whole (`rewrite`), each
write one atomic object; see mmjax.runtime.metric_writer for when.

Transient errors are retried: mmjax.storage.retry.

Emulators: the standard variables point everything at one, nothing else to set:
`STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage), `TENSORSTORE_GCS_HTTP_URL` (TensorStore,
so orbax) with `GOOGLE_AUTH_TOKEN_FOR_TESTING` for its auth.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mmjax.storage.retry import StorageError, retry

SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://")

if os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs >= 2025 first asks an emulator for the bucket type over gRPC, which it does not
    # serve, and waits a minute before falling back to JSON over HTTP.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def scheme(path: str | os.PathLike) -> str | None:
    """'gs' for 'gs://b/x', None for a local path."""
    match = _URL.match(os.fspath(path)) if isinstance(path, str) else None
    if match is None and not isinstance(path, (str, Path)):
        match = _URL.match(str(path))
    return match.group(1) if match else None


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def path(value: str | os.PathLike) -> Any:
    """A Path for `value`: an absolute local `pathlib.Path` (`~` expanded, symlinks kept), or
    an epath for a `gs://` / `s3://` URL; StorageError in one line for other schemes."""
    found = scheme(value)
    if found is None:
        return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))
    if found not in SCHEMES:
        raise StorageError(f"{value}: scheme {found}:// is not supported; allowed: local paths, "
                           + ", ".join(f"{s}://" for s in SCHEMES))  # fmt: skip
    from etils import epath  # Imports the fsspec backends on first use only.

    return epath.Path(str(value))


def join(base: Any, relative: str) -> Any:
    """`relative` resolved against the folder `base` (a CSV's image paths): an absolute path
    or a URL stays itself."""
    if is_remote(relative) or os.path.isabs(relative):
        return path(relative)
    return base / relative


def bucket_of(value: Any) -> str | None:
    text = str(value)
    return text.split("://", 1)[1].split("/", 1)[0] if is_remote(text) else None


def check_bucket(value: Any, what: str) -> None:
    """StorageError in one line when `value` is a URL whose bucket does not exist."""
    bucket = bucket_of(value)
    if bucket is None:
        return
    root = path(f"{scheme(str(value))}://{bucket}")
    if not retry(root.exists, f"{what} {value}"):
        raise StorageError(f"{what} {value}: bucket {bucket!r} does not exist")


def read_bytes(target: Any) -> bytes:
    """The whole file; FileNotFoundError naming the URL when an object is missing."""
    try:
        return retry(target.read_bytes, f"reading {target}")
    except FileNotFoundError:
        if is_remote(target):
            raise FileNotFoundError(f"{target}: no such object") from None
        raise


def read_text(target: Any) -> str:
    return read_bytes(target).decode("utf-8")


def write_bytes(target: Any, data: bytes) -> None:
    """Writes `data` so that readers see the old or the new content, never a part: one
    object PUT on object storage, a temporary file renamed over it locally."""
    if is_remote(target):
        retry(lambda: target.write_bytes(data), f"writing {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(target: Any, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def mkdir(target: Any) -> None:
    """A folder (object storage has none: nothing to do there)."""
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)


def local_copy(target: str, cache: Path) -> Path:
    """A local file with the object's bytes, for libraries that open local paths only
    (array_record's reader); a local `target` is returned as it is. Copies are kept in
    `cache` under the object's name, size and generation, so a changed object is copied
    again and an unchanged one never is; a copy is renamed into place whole."""
    if not is_remote(target):
        return Path(target)
    size, stamp = stat(target)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(target).split("://", 1)[1])
    local = cache / f"{name}.{size}.{stamp}"
    if not local.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        fs, key = _fs(target)
        retry(lambda: fs.get_file(key, str(tmp)), f"copying {target}")
        os.replace(tmp, local)
    return local


def local_cache() -> Path:
    """Where local copies of objects go: $MMJAX_CACHE/objects (default ~/.cache/mmjax)."""
    root = os.environ.get("MMJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmjax")
    return Path(root) / "objects"


def create_exclusive(target: Any, data: bytes) -> bool:
    """Creates `target` holding `data` only if it does not exist; False when it does. One
    conditional write on object storage (GCS: ifGenerationMatch=0), O_EXCL locally."""
    if is_remote(target):
        import fsspec

        fs, key = fsspec.core.url_to_fs(str(target))
        try:
            retry(lambda: fs.pipe(key, data, mode="create"), f"creating {target}")
        except FileExistsError:
            return False
        return True
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _fs(target: Any):
    """(fsspec filesystem, key) of a URL."""
    import fsspec

    return fsspec.core.url_to_fs(str(target))


def stat(target: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; FileNotFoundError if absent."""
    if not is_remote(target):
        st = os.stat(target)
        return st.st_size, st.st_mtime_ns
    fs, key = _fs(target)
    info = retry(lambda: fs.info(key), f"reading {target}")
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{target} is a folder")
    # A new object gets a new generation, so (size, generation) changes with the content.
    stamp = info.get("generation") or info.get("mtime") or info.get("updated") or 0
    try:
        stamp = int(stamp)
    except (TypeError, ValueError):
        stamp = abs(hash(str(stamp)))
    return int(info["size"]), stamp


def is_file(target: str) -> bool:
    if not is_remote(target):
        return os.path.isfile(target)
    fs, key = _fs(target)
    return retry(lambda: fs.isfile(key), f"reading {target}")


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern, sorted; URLs keep their scheme."""
    if not is_remote(pattern):
        import glob as local_glob

        return sorted(local_glob.glob(pattern))
    fs, key = _fs(pattern)
    found = retry(lambda: fs.glob(key), f"listing {pattern}")
    prefix = f"{scheme(pattern)}://"
    return sorted(prefix + name for name in found)


def open_binary(target: str):
    """A seekable binary file object (object storage: ranged reads on demand)."""
    if not is_remote(target):
        return open(target, "rb")
    fs, key = _fs(target)
    return retry(lambda: fs.open(key, "rb"), f"opening {target}")


def read_range(target: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (fewer only at the end of the file) in one ranged read."""
    fs, key = _fs(target)
    return retry(lambda: fs.cat_file(key, start=offset, end=offset + size), f"reading {target}")
