"""Atomic file output: a killed job never leaves a file or directory that looks finished.

Everything is written under a temporary sibling name and renamed into place when complete;
`os.replace` / `os.rename` within one directory are atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`.

    On an exception the temporary file or directory is removed and `path` is untouched. The
    temporary directory `.<name>.<random>.tmp` has a lock file beside it, `<that>.lock`,
    created and locked before it and removed after it: a writer killed before its cleanup
    leaves both, unlocked, for `clean_dead_tmp` to remove.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, lock_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.lock", dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = Path(lock_name[: -len(".lock")])
        tmp.mkdir()
        target = tmp if is_dir else tmp / path.name
        try:
            yield target
            if is_dir:
                if path.exists():
                    shutil.rmtree(path)
                os.rename(tmp, path)
            else:
                os.replace(target, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_name)
        os.close(fd)


def clean_dead_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary outputs (`atomic_path`) in `directory` whose writer is dead: its
    lock file is not held (the kernel releases the lock of a killed process, on any host that
    shares the file system), or is gone. Returns what was removed."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        lock = tmp.with_name(tmp.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # a writer creates its lock first and removes it last: none is writing
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live writer
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)
        removed.append(tmp)
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; a truncated or malformed one is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged or truncated") from None


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def move_into_place(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a finished file or directory to its final name, replacing what was there."""
    dst = Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)
