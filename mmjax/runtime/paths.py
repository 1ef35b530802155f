"""Paths as they enter mmjax: made absolute once, where a command or config takes them.

Libraries below (orbax, tensorstore, grain workers) need absolute paths, and a config.json
that records relative ones breaks as soon as a command runs from another folder; so every
path a user gives is made absolute at the door (`os.path.abspath`, which keeps symlinks).
"""

from __future__ import annotations

import os
from pathlib import Path


class PathError(ValueError):
    """A path argument that cannot serve its purpose, explained in one line."""


def absolute(path: str | os.PathLike) -> Path:
    """`path` with `~` expanded, made absolute against the working directory."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def workdir(path: str | os.PathLike, *, flag: str = "--workdir", must_exist: bool = False) -> Path:
    """The absolute workdir; PathError when it exists and is not a folder, or (with
    `must_exist`) when it is missing."""
    resolved = absolute(path)
    if resolved.exists() and not resolved.is_dir():
        raise PathError(f"{flag} {path} exists and is not a directory")
    if must_exist and not resolved.is_dir():
        raise PathError(f"{flag} {path} does not exist")
    return resolved


def run_dir(path: str | os.PathLike, *, flag: str = "--workdir") -> Path:
    """A training workdir to read from (it must hold config.json)."""
    resolved = workdir(path, flag=flag, must_exist=True)
    if not (resolved / "config.json").is_file():
        raise PathError(f"{flag} {path} has no config.json: is it a training workdir?")
    return resolved
