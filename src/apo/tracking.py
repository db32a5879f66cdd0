"""MLflow logging for every stage.

Many jobs may log to one SQLite tracking store at once (Snakemake runs jobs in parallel), and
SQLite answers concurrent writers with "database is locked". Writes from this module are
therefore batched (one `log_batch` per flush) and serialised across processes with an
advisory file lock beside the database. For a tracking server (http://...) no lock is taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXPERIMENT = __package__  # one MLflow experiment, named after the package


class TrackingError(RuntimeError):
    """A tracking server that cannot be reached; the message names the URI."""


def check_reachable(uri: str | None, timeout_s: float = 5.0) -> None:
    """Fail at once when `tracking_uri` names an http(s) server that does not accept a
    connection: MLflow's client would retry for minutes in every job before giving up."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise TrackingError(
            f"config key 'tracking_uri': no tracking server answers at {uri} ({e}); start it, "
            "correct the URI, or leave tracking_uri null for the local store results/mlflow.db"
        ) from None


# File systems on which SQLite's file locks are known to be unreliable or absent (SQLite's
# FAQ: "file locking is broken on many network file systems"); several jobs writing one
# database there can corrupt it.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
                       "fuse.sshfs", "glusterfs", "fuse.glusterfs", "9p")


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The type of the file system that holds `path` (the longest mount point above it in
    /proc/mounts, or in `mounts`, that file's text); None where that cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    path = os.path.realpath(Path(path).expanduser())  # a results/ that links elsewhere is on that disk
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def check_store_location(uri: str, mounts: str | None = None) -> None:
    """Fail at plan time when the SQLite store is on a network file system: every job of a
    cluster run writes to it, and without working file locks the database breaks."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    kind = filesystem_type(db, mounts)
    if kind in NETWORK_FILESYSTEMS:
        raise TrackingError(
            f"config key 'tracking_uri': the MLflow store {db} is on a {kind} file system, whose file locks "
            "SQLite cannot rely on when many jobs write at once; run a tracking server (mlflow server "
            "--backend-store-uri sqlite:////local/disk/mlflow.db) and set tracking_uri: http://HOST:PORT, "
            "or set tracking_uri: sqlite:////a/local/disk/mlflow.db"
        )


def default_tracking_uri(results_dir: str = "results") -> str:
    return f"sqlite:///{Path(results_dir).resolve()}/mlflow.db"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """One MLflow run per stage job; reused when the job resumes (run id kept in a file)."""

    def __init__(
        self,
        uri: str,
        run_name: str,
        params: dict,
        tags: dict,
        run_id_file: str | os.PathLike | None = None,
        flush_every: int = 20,
    ):
        self.uri = uri
        self.flush_every = flush_every
        self._pending: list = []
        self._lock_path = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            db.parent.mkdir(parents=True, exist_ok=True)
            self._lock_path = f"{db}.lock"
        for name in ("alembic", "mlflow.store.db.utils", "mlflow.store"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        with self._locked():
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self._resume_or_create(run_name, params, tags, run_id_file)

    @contextlib.contextmanager
    def _locked(self):
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _resume_or_create(self, run_name, params, tags, run_id_file) -> str:
        if run_id_file is not None and Path(run_id_file).exists():
            run_id = Path(run_id_file).read_text().strip()
            with contextlib.suppress(Exception):
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                return run_id
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            artifacts = Path(self._lock_path).parent / "mlartifacts" if self._lock_path else None
            exp_id = self.client.create_experiment(
                EXPERIMENT, artifact_location=artifacts.as_uri() if artifacts else None
            )
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run.info.run_id, params=flat[i : i + 100])
        if run_id_file is not None:
            Path(run_id_file).parent.mkdir(parents=True, exist_ok=True)
            Path(run_id_file).write_text(run.info.run_id)
        return run.info.run_id

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        if len(self._pending) >= self.flush_every * max(1, len(metrics)):
            self.flush()

    def set_tags(self, tags: dict) -> None:
        with self._locked():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike) -> None:
        with self._locked():
            self.client.log_artifact(self.run_id, str(path))

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            with self._locked():
                self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        with self._locked():
            self.client.set_terminated(self.run_id, status=status)
