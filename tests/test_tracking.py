"""MLflow tracking: params and metrics land in the SQLite store; parallel jobs lose nothing."""

import multiprocessing as mp

import pytest

from mlflow.tracking import MlflowClient

from apo.tracking import Tracker, flatten


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_params_metrics_and_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_file = tmp_path / "run_id"
    t = Tracker(uri, "train-abc", {"train": {"lr": 0.1}}, {"stage": "train"}, run_id_file=run_file)
    for step in range(1, 4):
        t.log_metrics({"reward": step / 10}, step=step)
    t.finish("FAILED")  # e.g. killed: the rerun resumes the same run
    again = Tracker(uri, "train-abc", {"train": {"lr": 0.1}}, {"stage": "train"}, run_id_file=run_file)
    assert again.run_id == t.run_id
    again.log_metrics({"reward": 0.4}, step=4)
    again.finish()
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.data.params["train.lr"] == "0.1" and run.data.tags["stage"] == "train"
    assert [m.value for m in client.get_metric_history(t.run_id, "reward")] == [0.1, 0.2, 0.3, 0.4]
    assert run.info.status == "FINISHED"


def _job(args):
    uri, i = args
    t = Tracker(uri, f"job-{i}", {"i": i}, {"stage": "test"}, flush_every=5)
    for step in range(30):
        t.log_metrics({"m": float(step)}, step=step)
    t.finish()
    return t.run_id


def test_parallel_jobs_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with mp.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(_job, [(uri, i) for i in range(6)])
    client = MlflowClient(uri)
    for i, run_id in enumerate(run_ids):
        assert client.get_run(run_id).data.params["i"] == str(i)
        assert len(client.get_metric_history(run_id, "m")) == 30


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_fails_at_once():
    import time

    import pytest

    from apo.tracking import TrackingError, check_reachable

    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"no tracking server answers at {uri}"):
        check_reachable(uri)
    assert time.monotonic() - start < 10
    check_reachable(None)
    check_reachable("sqlite:///somewhere/mlflow.db")


def test_the_plan_stops_on_an_unreachable_tracking_server(tmp_path):
    """Before any job: not minutes of retries in each."""
    import time

    from conftest import SMOKE, snakemake

    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = snakemake(tmp_path, "-n", "--configfile", str(SMOKE), "--config", f"tracking_uri={uri}", check=False)
    assert proc.returncode != 0 and f"no tracking server answers at {uri}" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fileserver:/export/lab /srv/lab nfs4 rw,vers=4.2 0 0
/dev/nvme0n1 /srv/lab/local xfs rw 0 0
//nas/share /media/my\\040share cifs rw 0 0
"""


def test_the_file_system_of_a_path_is_its_longest_mount_point():
    from apo.tracking import filesystem_type

    assert filesystem_type("/srv/lab/project/results/mlflow.db", MOUNTS) == "nfs4"
    assert filesystem_type("/srv/lab/local/results/mlflow.db", MOUNTS) == "xfs"  # a local disk inside /srv/lab
    assert filesystem_type("/media/my share/x.db", MOUNTS) == "cifs"  # an escaped space in /proc/mounts
    assert filesystem_type("/tmpfoo/x.db", MOUNTS) == "ext4"  # /tmp is not a prefix of /tmpfoo
    assert filesystem_type("/tmp/x.db", MOUNTS) == "tmpfs"


def test_an_sqlite_store_on_a_network_file_system_fails_at_plan_time_with_the_fix():
    from apo.tracking import TrackingError, check_store_location

    with pytest.raises(TrackingError, match=r"on a nfs4 file system.*tracking server.*tracking_uri: http"):
        check_store_location("sqlite:////srv/lab/project/results/mlflow.db", MOUNTS)
    check_store_location("sqlite:////srv/lab/local/results/mlflow.db", MOUNTS)  # local: fine
    check_store_location("http://tracking:5000", MOUNTS)  # a server: its own business
