"""Paths as they enter mmjax: made absolute once, where a command or config takes them.

Libraries below (orbax, tensorstore, grain workers) need absolute paths, and a config.json
that records relative ones breaks as soon as a command runs from another folder; so every
path a user gives is made absolute at the door (`os.path.abspath`, which keeps symlinks).
A `gs://` or `s3://` URL is absolute already and becomes an object-storage Path
(mmjax.runtime.storage).
"""

from __future__ import annotations

import os
from typing import Any

from mmjax import storage


class PathError(ValueError):
    """A path argument that cannot serve its purpose, explained in one line."""


def absolute(path: str | os.PathLike) -> Any:
    """`path` with `~` expanded, made absolute against the working directory (a URL as is)."""
    return storage.path(path)


def workdir(path: str | os.PathLike, *, flag: str = "--workdir", must_exist: bool = False) -> Any:
    """The absolute workdir; PathError when it exists and is not a folder, or (with
    `must_exist`) when it is missing. On object storage a folder is a prefix: it exists when
    something is stored under it, and its bucket must exist."""
    try:
        resolved = absolute(path)
        if storage.is_remote(resolved):
            storage.check_bucket(resolved, flag)
            if must_exist and not storage.retry(resolved.exists, f"{flag} {path}"):
                raise PathError(f"{flag} {path} does not exist")
            return resolved
    except storage.StorageError as e:
        raise PathError(str(e)) from None
    if resolved.exists() and not resolved.is_dir():
        raise PathError(f"{flag} {path} exists and is not a directory")
    if must_exist and not resolved.is_dir():
        raise PathError(f"{flag} {path} does not exist")
    return resolved


def run_dir(path: str | os.PathLike, *, flag: str = "--workdir") -> Any:
    """A training workdir to read from (it must hold config.json)."""
    resolved = workdir(path, flag=flag, must_exist=True)
    if not storage.retry((resolved / "config.json").is_file, f"{flag} {path}"):
        raise PathError(f"{flag} {path} has no config.json: is it a training workdir?")
    return resolved
