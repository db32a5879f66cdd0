"""Atomic file output: a killed job never leaves a file or directory that looks finished.

Everything is written under a temporary sibling name and renamed into place when complete;
`os.replace` / `os.rename` within one directory are atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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

    On an exception the temporary file or directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


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


# --------------------------------------------------------------------------- stage outputs
# Each job records a SHA-256 of every output file in its stage's manifest.json; a job that
# reads a stage file checks it first, so a file replaced or truncated after its job finished
# is an error naming the file and the rule that rewrites it, never a library traceback or a
# silently partial input.

class StageFileError(ValueError):
    """A stage output that is not what its job wrote; the message names the file and rule."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def writer_rule(path: Path) -> str:
    """The rule that writes a stage file: the stage's own (rules are named after their stage),
    but shards of reference sampling and of evaluation are both written by rule `sample`."""
    return "sample" if path.name.startswith("shard-") else path.parent.parent.name


def record_outputs(stage_dir: str | os.PathLike, manifest: dict, outputs: list) -> None:
    """Write `manifest.json` with the checksums of this job's output files added to those of
    the stage's other jobs (shards share a directory and run at once, hence the lock)."""
    stage_dir = Path(stage_dir)
    sums = {Path(p).name: file_sha256(p) for p in outputs if Path(p).is_file()}
    with open(stage_dir / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = stage_dir / "manifest.json"
        known = {}
        if path.exists():
            with contextlib.suppress(ValueError, OSError):
                old = read_json(path)
                known = old.get("outputs", {}) if old.get("hash") == manifest.get("hash") else {}
        write_json(path, {**manifest, "outputs": {**known, **sums}})


def verify_stage_file(path: str | os.PathLike) -> None:
    """Raise StageFileError when `path` differs from the checksum its job recorded. Files of
    results written before checksums were recorded are not checked."""
    path = Path(path)
    manifest = path.parent / "manifest.json"
    if not path.exists():
        raise StageFileError(f"{path}: missing; rerun snakemake (rule {writer_rule(path)} writes it)")
    if not manifest.exists():
        return
    expected = read_json(manifest).get("outputs", {}).get(path.name)
    if expected is not None and file_sha256(path) != expected:
        raise StageFileError(
            f"{path}: its content does not match the checksum its job recorded in {manifest} "
            f"(changed or truncated since); delete it and rerun snakemake (rule "
            f"{writer_rule(path)} writes it again)"
        )


def read_stage_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """A stage's parquet output, checked against its recorded checksum."""
    verify_stage_file(path)
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors do not name the file
        raise StageFileError(
            f"{path}: not a readable parquet file ({type(e).__name__}: {e}); delete it and rerun "
            f"snakemake (rule {writer_rule(Path(path))} writes it again)"
        ) from e
