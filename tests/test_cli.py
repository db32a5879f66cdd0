"""The `apo` command as Snakemake runs it: it leaves without the interpreter's teardown
(`apo.cli.run`), so everything a job writes must be complete when `main` returns, and a
failing job must still exit non-zero with its error."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd

APO = Path(sys.executable).with_name("apo")


def vstar_job(tmp_path: Path, samples: Path, prompts: Path | None = None) -> subprocess.CompletedProcess:
    stage_dir = tmp_path / "results" / "vstar" / "0123456789ab"
    manifest = {"kind": "vstar", "hash": "0123456789ab", "settings": {"beta1": 0.0, "filter": "keep_all"},
                "inputs": {"samples": "sample/ba9876543210"}}
    runtime = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    if prompts is None:
        prompts = tmp_path / "prompts.parquet"
        pd.DataFrame({"id": ["a", "b"]}).to_parquet(prompts)
    if not (samples.parent / "manifest.json").exists():
        (samples.parent / "manifest.json").write_text(json.dumps({"settings": {"n": 2, "shards": 1}}))
    return subprocess.run(
        [str(APO), "vstar", "--manifest", json.dumps(manifest), "--stage-dir", str(stage_dir),
         "--runtime", json.dumps(runtime), "--samples", str(samples), "--prompts", str(prompts)],
        capture_output=True, text=True, timeout=300,
    )


def test_a_finished_job_has_written_everything(tmp_path):
    samples = tmp_path / "shard-0.parquet"
    pd.DataFrame({"id": ["a", "a", "b", "b"], "reward": [1.0, 0.0, 0.0, 0.0]}).to_parquet(samples)
    proc = vstar_job(tmp_path, samples)
    assert proc.returncode == 0, proc.stderr[-3000:]

    stage_dir = tmp_path / "results" / "vstar" / "0123456789ab"
    table = pd.read_parquet(stage_dir / "vstar.parquet")
    assert table.set_index("id")["vstar"].to_dict() == {"a": 0.5, "b": 0.0}
    written = json.loads((stage_dir / "manifest.json").read_text())
    assert written["hash"] == "0123456789ab"
    assert set(written["outputs"]) == {"vstar.parquet", "counts.json"}  # their checksums
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["prompts"] == 2


def test_a_failing_job_exits_non_zero_and_writes_nothing(tmp_path):
    proc = vstar_job(tmp_path, tmp_path / "missing.parquet")
    assert proc.returncode == 1
    assert "missing.parquet" in proc.stderr
    stage_dir = tmp_path / "results" / "vstar" / "0123456789ab"
    assert not (stage_dir / "vstar.parquet").exists()
    assert not (stage_dir / "manifest.json").exists()


def test_a_pinned_hub_model_is_loaded_from_its_revision(monkeypatch):
    """Every loader gets the local snapshot of the pinned revision, not the hub id."""
    import huggingface_hub

    from apo.cli import build_parser, pin_model_revision

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision: calls.append((repo, revision)) or f"/snap/{revision}")
    common = ["--manifest", "{}", "--stage-dir", "d", "--prompts", "p"]
    args = build_parser().parse_args(["train", *common, "--model", "Qwen/Q", "--model-revision", "abc"])
    pin_model_revision(args)
    assert args.model == "/snap/abc" and calls == [("Qwen/Q", "abc")]
    args = build_parser().parse_args(["data", "--manifest", "{}", "--stage-dir", "d", "--tokenizer", "Qwen/Q",
                                      "--model-revision", "v2"])
    pin_model_revision(args)
    assert args.tokenizer == "/snap/v2"
    args = build_parser().parse_args(["train", *common, "--model", "Qwen/Q"])
    pin_model_revision(args)
    assert args.model == "Qwen/Q" and len(calls) == 2


def test_a_partial_shard_fails_the_vstar_job_naming_it(tmp_path):
    """A shard replaced by a valid file with fewer prompts: no V* table for fewer prompts."""
    samples = tmp_path / "shard-0.parquet"
    pd.DataFrame({"id": ["a", "a"], "reward": [1.0, 0.0]}).to_parquet(samples)  # prompt b is missing
    proc = vstar_job(tmp_path, samples)
    assert proc.returncode == 1
    assert f"{tmp_path}/shard-0.parquet: prompt 'b' has 0 graded samples, expected sample.n = 2" in proc.stderr
    assert not (tmp_path / "results" / "vstar" / "0123456789ab" / "vstar.parquet").exists()


def test_a_second_job_for_the_same_outputs_waits_and_then_finds_them(tmp_path):
    """The job lock: while another process holds it, the job waits, naming the holder; once
    the holder has written the outputs, the job stops without redoing (or rewriting) them."""
    from apo.job import job_lock
    from apo.job import record_outputs

    samples = tmp_path / "shard-0.parquet"
    pd.DataFrame({"id": ["a", "a", "b", "b"], "reward": [1.0, 0.0, 0.0, 0.0]}).to_parquet(samples)
    stage_dir = tmp_path / "results" / "vstar" / "0123456789ab"
    with job_lock(stage_dir / ".vstar.lock", "the first job"):
        second = subprocess.Popen(
            [str(APO), "vstar", "--manifest", json.dumps({"kind": "vstar", "hash": "0123456789ab",
             "settings": {"beta1": 0.0, "filter": "keep_all"}, "inputs": {}}), "--stage-dir", str(stage_dir),
             "--runtime", json.dumps({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}), "--samples", str(samples),
             "--prompts", str(samples)],
            stderr=subprocess.PIPE, text=True)
        (samples.parent / "manifest.json").write_text(json.dumps({"settings": {"n": 2, "shards": 1}}))
        time.sleep(8)
        assert second.poll() is None  # waiting
        # what the first job leaves when it finishes
        pd.DataFrame({"id": ["first"], "vstar": [0.0]}).to_parquet(stage_dir / "vstar.parquet")
        (stage_dir / "counts.json").write_text("{}")
        record_outputs(stage_dir, {"kind": "vstar", "hash": "0123456789ab"},
                       [stage_dir / "vstar.parquet", stage_dir / "counts.json"])
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]
    assert f"another job is writing these outputs (pid {os.getpid()} on " in err and "the first job" in err
    assert pd.read_parquet(stage_dir / "vstar.parquet")["id"].tolist() == ["first"]  # not redone


def test_the_training_launcher_holds_the_lock_until_killed(tmp_path):
    """`apo lock FILE -- CMD` keeps the lock across exec, for as long as CMD runs; a SIGKILL
    releases it (the kernel does), so nothing needs unlocking after a kill."""
    lock = tmp_path / "results" / "train" / "0123456789ab" / ".train.lock"
    first = subprocess.Popen([str(APO), "lock", str(lock), "--", "sleep", "60"])
    for _ in range(100):
        if lock.exists() and "sleep 60" in lock.read_text():
            break
        time.sleep(0.1)
    second = subprocess.Popen([str(APO), "lock", str(lock), "--", "echo", "ran"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        second.wait(timeout=5)
        raise AssertionError("the second job did not wait for the lock")
    except subprocess.TimeoutExpired:
        pass
    first.kill()
    first.wait()
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0 and out.endswith("ran\n")
    assert f"pid {first.pid} on " in err and "sleep 60" in err
    # on stdout too: the rules send only stderr to the job's log, so this reaches the console
    assert f"another job is writing these outputs (pid {first.pid} on " in out


def test_a_job_waits_for_a_lock_at_most_lock_wait_s_then_fails_naming_the_holder(tmp_path):
    from apo.job import job_lock

    lock = tmp_path / "results" / "train" / "0123456789ab" / ".train.lock"
    with job_lock(lock, "the other run's training"):
        proc = subprocess.run([str(APO), "lock", "--wait-s", "2", str(lock), "--", "echo", "ran"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ran" not in proc.stdout
    assert f"(pid {os.getpid()} on " in proc.stdout and "at most 2 s" in proc.stdout  # the console
    assert f"{lock}: still held after 2 s by pid {os.getpid()} on " in proc.stderr
    assert "the other run's training" in proc.stderr


def finished_vstar_job(tmp_path):
    """A data stage's prompts and a sample stage's shard as their jobs left them, and the V*
    job over them run once; returns (prompts, the job's command)."""
    from apo.job import record_outputs

    prompts = tmp_path / "results" / "data" / "aaaaaaaaaaaa" / "prompts.parquet"
    samples = tmp_path / "results" / "sample" / "bbbbbbbbbbbb" / "shard-0.parquet"
    for path, df in [(prompts, pd.DataFrame({"id": ["a", "b"]})),
                     (samples, pd.DataFrame({"id": ["a", "a", "b", "b"], "reward": [1.0, 0.0, 0.0, 0.0]}))]:
        path.parent.mkdir(parents=True)
        df.to_parquet(path)
    record_outputs(prompts.parent, {"kind": "data", "hash": "aaaaaaaaaaaa"}, [prompts])
    record_outputs(samples.parent, {"kind": "sample", "hash": "bbbbbbbbbbbb", "settings": {"n": 2, "shards": 1}},
                   [samples])
    proc = vstar_job(tmp_path, samples, prompts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prompts, samples


def test_a_truncated_input_of_a_finished_job_is_an_error_not_nothing_to_do(tmp_path):
    """Snakemake reruns the jobs downstream of a truncated prompts.parquet (its mtime moved);
    each finds its outputs written, and must not report "nothing to do" over a broken input."""
    prompts, samples = finished_vstar_job(tmp_path)
    prompts.write_bytes(prompts.read_bytes()[:100])
    proc = vstar_job(tmp_path, samples, prompts)
    assert proc.returncode == 1
    assert (f"{prompts}: its content does not match the checksum its job recorded in {prompts.parent}/manifest.json"
            in proc.stderr)
    assert "rule data writes it again" in proc.stderr


def test_a_dead_writers_temporary_output_is_removed_by_the_next_job(tmp_path):
    """A job killed while writing (SIGKILL: no cleanup) leaves `.<name>.*.tmp`; the next job
    of the stage removes it, and leaves a live writer's alone."""
    stage_dir = tmp_path / "results" / "vstar" / "0123456789ab"
    write = ("import sys, time; from apo.io import atomic_path\n"
             "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_text('partial'); print('in', flush=True); "
             "time.sleep(60)\n")
    writers = [subprocess.Popen([sys.executable, "-c", write, str(stage_dir / name)], stdout=subprocess.PIPE, text=True)
               for name in ("vstar.parquet", "other.parquet")]
    for w in writers:
        assert w.stdout.readline() == "in\n"
    writers[0].kill()
    writers[0].wait()
    assert len(list(stage_dir.glob(".vstar.parquet.*.tmp"))) == 1
    samples = tmp_path / "shard-0.parquet"
    pd.DataFrame({"id": ["a", "a", "b", "b"], "reward": [1.0, 0.0, 0.0, 0.0]}).to_parquet(samples)
    try:
        proc = vstar_job(tmp_path, samples)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not list(stage_dir.glob(".vstar.parquet.*"))  # the dead writer's, and its lock file
        assert len(list(stage_dir.glob(".other.parquet.*.tmp"))) == 1  # a live writer's
    finally:
        writers[1].kill()
        writers[1].wait()
