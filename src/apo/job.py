"""The stage-job contract: what a job writes, what it leaves behind, and what a reader checks
before trusting it.

- Each rule's outputs are named once, in `STAGE_OUTPUTS`: the rule files declare them
  (`workflow/rules/common.smk`, `rule_outputs`), the stage commands write them, and readers
  find them by role (`output_name`).
- A `Job` is one run of a rule's command into its stage directory: its outputs, its lock
  file, whether its outputs are done, and the checksums it records (`Job.record`, once the
  command has written them); `Job.run` runs the command's work under the lock unless done.
- A job holds an OS lock on a file in its stage directory while it runs (`job_lock`); a second
  job for the same outputs says on the console who holds it, waits at most `lock_wait_s`, then
  finds the outputs written (`outputs_done`) or fails naming the holder.
- A finished job records the SHA-256 of every file it wrote (a model directory: each of its
  files) in its stage's `manifest.json` (`record_outputs`).
- Every reader of a stage output checks it against that record first (`verify_stage_file`,
  `read_stage_parquet`, `read_stage_json`, `verify_if_stage`): a file changed, truncated or
  replaced after its job finished, or one the manifest does not record, is a `StageFileError`
  naming the file and the rule that writes it again, never a silently different input.
- `verify_results` checks whole stage directories for `apo verify`.
- Temporary files of writers that died (`apo.io.atomic_path`) are removed when the next job
  of the stage directory starts (`apo.io.clean_dead_tmp`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from apo.io import clean_dead_tmp, read_json, write_json
from apo.settings import HASH_LEN, STAGES

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# What a stage directory holds besides its outputs: the manifest, logs, training checkpoints
# (checked when resumed), and dot-files (locks, temporaries).
NOT_OUTPUTS = (MANIFEST, "log", "checkpoints")
HASH_DIR = re.compile(rf"[0-9a-f]{{{HASH_LEN}}}")

# What each rule's job writes into its stage directory, by role; a rule, its `apo` command and
# its stage share a name. Rule `sample` writes the shards of both the sample and the evaluate
# stages (`{shard}` is the rule's wildcard); the evaluate rule then writes the scores beside
# them. The rule files declare exactly these (common.smk's `rule_outputs`), the stage
# commands write them (`Job.output`) and every reader names a file by rule and role
# (`output_name`).
STAGE_OUTPUTS: dict[str, dict[str, str]] = {
    "demo": {"model": "model", "train": "train.jsonl", "test": "test.jsonl", "valid": "valid.jsonl"},
    "data": {"prompts": "prompts.parquet", "counts": "counts.json"},
    "sample": {"shard": "shard-{shard}.parquet"},
    "vstar": {"vstar": "vstar.parquet", "counts": "counts.json"},
    "train": {"model": "model", "metrics": "metrics.parquet", "summary": "summary.json",
              "validation": "validation.parquet"},
    "sweep": {"pick": "pick.json"},
    "evaluate": {"scores": "scores.json", "samples": "samples.parquet"},
}
# The outputs that are directories (a saved model): Snakemake's `directory()`, checksummed
# file by file.
DIRECTORY_OUTPUTS = frozenset({"model"})
SHARD_RULE = "sample"


def output_name(rule: str, role: str, shard: int | None = None) -> str:
    """The file name of a rule's output, relative to its stage directory; a shard's with its
    index filled in (without one, the rule's wildcard pattern)."""
    name = STAGE_OUTPUTS[rule][role]
    return name if shard is None else name.format(shard=shard)


class StageFileError(ValueError):
    """A stage output that is not what its job wrote; the message names the file and rule."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stage_dir_of(path: str | os.PathLike) -> Path | None:
    """The stage directory (`<results>/<stage>/<hash>/`) that holds `path` (a file in it, a
    model directory, or a file of one), or None for a path outside any stage directory (a
    local model or a hub id)."""
    path = Path(path)
    for d in [path, *path.parents][:3]:
        if HASH_DIR.fullmatch(d.name) and d.parent.name in STAGES:
            return d
    return None


def writer_rule(stage_dir: Path, name: str) -> str:
    """The rule that writes a stage file: the stage's own (rules are named after their stage),
    but shards of reference sampling and of evaluation are both written by rule `sample`."""
    top = name.split("/")[0]
    shards = [re.escape(n).replace(re.escape("{shard}"), r"\d+") for n in STAGE_OUTPUTS[SHARD_RULE].values()]
    return SHARD_RULE if any(re.fullmatch(p, top) for p in shards) else stage_dir.parent.name


def _files(path: Path):
    """The files of an output: itself, or a directory's files (dot-files left out)."""
    if path.is_file():
        yield path
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            yield from (Path(root) / f for f in sorted(files) if not f.startswith("."))


def output_sums(stage_dir: Path, outputs: list) -> dict:
    """{path relative to the stage directory: SHA-256} of every file of `outputs`."""
    return {f.relative_to(stage_dir).as_posix(): file_sha256(f) for p in outputs for f in _files(Path(p))}


def record_outputs(stage_dir: str | os.PathLike, manifest: dict, outputs: list) -> None:
    """Write `manifest.json` with the checksums of this job's output files added to those of
    the stage's other jobs (shards share a directory and run at once, hence the lock)."""
    stage_dir = Path(stage_dir)
    sums = output_sums(stage_dir, outputs)
    with open(stage_dir / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = stage_dir / MANIFEST
        known = {}
        if path.exists():
            with contextlib.suppress(ValueError, OSError):
                old = read_json(path)
                known = old.get("outputs", {}) if old.get("hash") == manifest.get("hash") else {}
        write_json(path, {**manifest, "outputs": {**known, **sums}})


def _rerun(stage_dir: Path, name: str) -> str:
    return f"rerun snakemake (rule {writer_rule(stage_dir, name)} writes it again)"


def recorded_outputs(stage_dir: Path, name: str) -> dict:
    """The checksums the stage's manifest records; a StageFileError naming the manifest when it
    is missing, unreadable or records none."""
    manifest = stage_dir / MANIFEST
    if not manifest.exists():
        raise StageFileError(
            f"{stage_dir / name}: its stage has no {MANIFEST} (its job did not finish); delete {stage_dir} "
            f"and {_rerun(stage_dir, name)}")
    try:
        outputs = read_json(manifest).get("outputs")
    except (ValueError, AttributeError) as e:
        raise StageFileError(f"{e}; delete {stage_dir} and {_rerun(stage_dir, name)}") from None
    if not isinstance(outputs, dict):
        raise StageFileError(
            f"{stage_dir / name}: {manifest} records no output checksums; delete {stage_dir} and "
            f"{_rerun(stage_dir, name)}")
    return outputs


# A verified file is not hashed again by the same process (the command line checks a job's
# inputs before the stage's code reads them): keyed by path, size and modification time.
_verified: set = set()


def verify_stage_file(path: str | os.PathLike) -> None:
    """Raise StageFileError unless `path` (a file, or a directory such as a model) is exactly
    what its job wrote: every file present and matching the checksum the stage's manifest
    records, and (a directory) no file the job did not write."""
    path = Path(path)
    stage_dir = stage_dir_of(path)
    if stage_dir is None:
        raise StageFileError(f"{path}: not in a stage directory (<results>/<stage>/<hash>/)")
    if path == stage_dir:  # a whole stage directory (the demo's, as the data stage reads it)
        recorded = recorded_outputs(stage_dir, MANIFEST)
        for output in outputs_of(stage_dir):
            verify_stage_file(output)
        if missing := sorted(name for name in recorded if not (stage_dir / name).exists()):
            raise StageFileError(f"{stage_dir / missing[0]}: missing; {_rerun(stage_dir, missing[0])}")
        return
    rel = path.relative_to(stage_dir).as_posix()
    if not path.exists():
        raise StageFileError(f"{path}: missing; {_rerun(stage_dir, rel)}")
    files = list(_files(path))
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key in _verified:
        return
    recorded = recorded_outputs(stage_dir, rel)
    expected = {k: v for k, v in recorded.items() if k == rel or k.startswith(rel + "/")}
    for f in files:
        name = f.relative_to(stage_dir).as_posix()
        if name not in expected:
            raise StageFileError(
                f"{f}: not among the outputs its job recorded in {stage_dir / MANIFEST}; delete "
                f"{path} and {_rerun(stage_dir, rel)}")
        if file_sha256(f) != expected.pop(name):
            raise StageFileError(
                f"{f}: its content does not match the checksum its job recorded in {stage_dir / MANIFEST} "
                f"(changed or truncated since); delete {path} and {_rerun(stage_dir, rel)}")
    if expected:
        raise StageFileError(f"{stage_dir / sorted(expected)[0]}: missing; delete {path} and {_rerun(stage_dir, rel)}")
    _verified.add(key)


def verify_if_stage(path: str | os.PathLike | None) -> None:
    """`verify_stage_file` for a path that may also be a local model or a hub id (not checked:
    those are addressed by their content or revision)."""
    if path is not None and stage_dir_of(path) is not None:
        verify_stage_file(path)


def read_stage_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """A stage's parquet output, checked against its recorded checksum (a file outside any
    stage directory, which no job of the workflow reads, is read as it is)."""
    verify_if_stage(path)
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors do not name the file
        stage_dir = stage_dir_of(path)
        rerun = _rerun(stage_dir, Path(path).name) if stage_dir else "rewrite it"
        raise StageFileError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); delete it and "
                             f"{rerun}") from e


def read_stage_json(path: str | os.PathLike):
    """A stage's JSON output, checked like `read_stage_parquet`'s."""
    verify_if_stage(path)
    try:
        return read_json(path)
    except ValueError as e:
        stage_dir = stage_dir_of(path)
        raise StageFileError(f"{e}; delete it and {_rerun(stage_dir, Path(path).name) if stage_dir else 'rewrite it'}"
                             ) from e


# --------------------------------------------------------------------------- apo verify


def outputs_of(stage_dir: Path) -> list[Path]:
    """The outputs in a stage directory: what is there but the manifest, logs, checkpoints and
    dot-files."""
    return sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".") and p.name not in NOT_OUTPUTS)


def stage_problems(stage_dir: Path) -> list[str]:
    """What is wrong with one stage directory's outputs (empty when every one is what its job
    wrote): files that differ from their checksums, are missing, or are not recorded."""
    top = outputs_of(stage_dir)
    if not (stage_dir / MANIFEST).exists():
        return [f"{stage_dir}: no {MANIFEST}, but outputs {[p.name for p in top]}"] if top else []
    problems = []
    try:
        recorded = recorded_outputs(stage_dir, MANIFEST)
    except StageFileError as e:
        return [str(e)]
    for path in top:
        try:
            verify_stage_file(path)
        except StageFileError as e:
            problems.append(str(e))
    present = {f.relative_to(stage_dir).as_posix() for p in top for f in _files(p)}
    problems += [f"{stage_dir / name}: missing (recorded in {MANIFEST})" for name in sorted(set(recorded) - present)]
    return problems


def stage_dirs(paths: list[str]) -> list[Path]:
    """The stage directories `apo verify` checks: each path a stage directory, an experiment's
    directory (those its `stages/` links name) or a results directory (all of them)."""
    found = []
    for p in map(Path, paths):
        if stage_dir_of(p) == p:
            found.append(p)
        elif (p / "stages").is_dir():
            found += [link.resolve() for link in sorted((p / "stages").iterdir())]
        elif p.is_dir():
            found += sorted(d for kind in STAGES for d in (p / kind).glob("*") if HASH_DIR.fullmatch(d.name))
        else:
            raise SystemExit(f"apo verify: {p}: not a stage, experiment or results directory")
    return list(dict.fromkeys(found))


def verify_results(paths: list[str], out=sys.stdout) -> int:
    """`apo verify`: check every stage directory under `paths`; print one line per problem and
    the directories to delete before rerunning snakemake. Returns the exit status."""
    bad = {}
    dirs = stage_dirs(paths)
    for d in dirs:
        if problems := stage_problems(d):
            bad[d] = problems
            print(*problems, sep="\n", file=out)
    if not bad:
        print(f"{len(dirs)} stage directories checked: every output is what its job wrote", file=out)
        return 0
    print(f"{len(bad)} of {len(dirs)} stage directories have outputs that are not what their jobs wrote; "
          f"delete them and rerun snakemake:\n  rm -r {' '.join(map(str, bad))}", file=out)
    return 1


# --------------------------------------------------------------------------- one job
# Two snakemake runs of overlapping experiments may start the same job at once (the workflow
# profile sets `nolock`, so a killed run needs no `--unlock`). Each job holds an OS lock on a
# file in its stage directory, which the kernel releases when the process dies: a second job
# for the same outputs waits for the first, then finds them written and stops.

LOCK_WAIT_S = 86400.0  # config key `lock_wait_s`'s default


class LockTimeout(RuntimeError):
    """Another job held a stage's lock for longer than `lock_wait_s`; names the holder."""


def _say(message: str) -> None:
    """To the log (the job's stderr) and the console: the rules send only stderr to the log,
    so Snakemake's console shows what a job prints on stdout."""
    log.warning("%s", message)
    print(message, file=sys.stdout, flush=True)


@contextlib.contextmanager
def job_lock(path: Path, what: str, wait_s: float = LOCK_WAIT_S):
    """Hold an exclusive lock on `path`. While another process holds it, say so on the console
    with the holder (the lock file says who it is), and wait for at most `wait_s` seconds,
    then fail naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a process"
            _say(f"{path.parent}: another job is writing these outputs ({holder}); waiting for it "
                 f"(at most {wait_s:g} s, config key lock_wait_s)")
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"{path}: still held after {wait_s:g} s by {holder}; stop that job or wait for "
                            f"it, then rerun (config key lock_wait_s bounds the wait)") from None
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}\n")
        fh.flush()
        yield fh


def outputs_done(stage_dir: Path, manifest: dict, outputs: list[Path]) -> bool:
    """Whether a job's outputs are complete: present, and their checksums recorded in the
    stage manifest under this address (what a finished job leaves, and the only way a job
    that waited for the lock finds them: Snakemake removes a job's outputs before it starts)."""
    path = stage_dir / MANIFEST
    if not path.exists() or not all(p.exists() for p in outputs):
        return False
    try:
        m = read_json(path)
    except ValueError:
        return False  # a damaged manifest: the job is redone and writes a whole one
    recorded = m.get("outputs") or {}
    return m.get("hash") == manifest.get("hash") and all(
        recorded.get(name) == sha for name, sha in output_sums(stage_dir, outputs).items())


def lock_file(stage_dir: str | os.PathLike, rule: str, shard: int | None = None) -> Path:
    """The lock a rule's job holds in its stage directory (one per shard: a stage's shards run
    at once); the training rule takes it in `apo lock`, around every training process."""
    return Path(stage_dir) / (f".{rule}.lock" if shard is None else f".{rule}-{shard}.lock")


@dataclass(frozen=True)
class Job:
    """One job of a rule: its `apo` command writing the rule's outputs (`STAGE_OUTPUTS`) into
    the stage directory of the stage `manifest` describes (`shard`: rule sample's index)."""

    rule: str
    stage_dir: Path
    manifest: dict
    shard: int | None = None
    lock_wait_s: float = LOCK_WAIT_S

    def output(self, role: str) -> Path:
        return self.stage_dir / output_name(self.rule, role, self.shard)

    @property
    def outputs(self) -> list[Path]:
        return [self.output(role) for role in STAGE_OUTPUTS[self.rule]]

    @property
    def lock(self) -> Path:
        return lock_file(self.stage_dir, self.rule, self.shard)

    def done(self) -> bool:
        return outputs_done(self.stage_dir, self.manifest, self.outputs)

    def record(self) -> None:
        """The finished job's checksums, in the stage manifest (`record_outputs`)."""
        record_outputs(self.stage_dir, self.manifest, self.outputs)

    def run(self, work: Callable[[], None]) -> None:
        """`work` under the job's lock, unless the job that held it before wrote the outputs;
        dead writers' temporaries removed first (`apo.io.clean_dead_tmp`)."""
        with job_lock(self.lock, f"apo {self.rule} {self.stage_dir}", self.lock_wait_s):
            clean_dead_tmp(self.stage_dir)
            if self.done():
                log.info("%s: outputs already written by the job that held the lock; nothing to do", self.stage_dir)
                return
            work()


def verify_inputs(paths: list) -> None:
    """Check every stage file among a job's inputs (a local model or a hub id is not one)
    before anything reads it, and before a job whose outputs are done says so: a changed input
    is an error, not a silent "nothing to do"."""
    for p in paths:
        verify_if_stage(p)
