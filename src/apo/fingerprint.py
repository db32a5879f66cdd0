"""Content digests of local files and directories, for the addresses of the stages that read
them (a local model, dataset or stage-1 table).

A digest is the SHA-256 of the bytes (of a directory: of its files' relative names and
digests, dot-files left out). Reading a model of many GB at every plan would take minutes, so
each file's digest is kept in a small JSON cache keyed by its absolute path, size and
modification time: a file is read again only when one of them changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

CHUNK = 1 << 20


class DigestCache:
    """File digests by (absolute path, size, mtime_ns), loaded from and saved to `path`."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs a re-read

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        known = self.entries.get(key)
        if known is not None and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return known[2]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        """Write the cache if it changed; atomic, so parallel plans never read half a file. A
        cache that cannot be written (a read-only results directory, a full disk) is skipped
        with a warning: it only saves reading the files again at the next plan."""
        if self.path is None or not self.dirty:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(self.entries, fh, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            warnings.warn(f"{self.path}: the content digest cache cannot be written ({e}); not saved, so "
                          "local inputs are read again at the next plan", stacklevel=2)
        self.dirty = False


def content_digest(path: str | os.PathLike, cache: DigestCache) -> str:
    """SHA-256 of a file's bytes, or of a directory's (relative name, file digest) pairs."""
    path = Path(path)
    if path.is_file():
        return cache.file_digest(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = Path(root) / name
            h.update(f"{file.relative_to(path).as_posix()}\0{cache.file_digest(file)}\n".encode())
    return h.hexdigest()
