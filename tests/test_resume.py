"""Kill real jobs part-way through Snakemake, rerun the same command, and check that work
resumed (not restarted), that no finished shard was recomputed, and that the results equal
an uninterrupted run's, bit for bit.

Both runs use `--cores 1`, so every job gets the same thread count and the same results.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import ROOT, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    cfg = yaml.safe_load((ROOT / "tests" / "smoke_config.yaml").read_text())
    cfg["experiment"] = "resume"
    cfg["sample"]["shards"] = 3  # a kill after the first shard leaves work for the rerun
    cfg["evaluate"]["shards"] = 1  # evaluation is not killed here (tests/test_pipeline.py loses a shard)
    cfg["train"].update(steps=30, checkpoint_every=5)
    path = tmp_path_factory.mktemp("cfg") / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(workdir: Path, config_file: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--cores", "1", "--configfile", str(config_file)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}  # the test reads the log while snakemake runs
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL Snakemake and every job it started, as a preempted node would."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300, poll_s: float = 0.05):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            kill_tree(proc)
            raise AssertionError(f"kill point not reached in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)


def job_outputs(log_text: str, rule: str) -> dict:
    """jobid -> output of every job of `rule` that Snakemake started in this log."""
    outputs = {}
    for block in re.split(r"\n(?:local)?rule ", log_text)[1:]:
        if block.startswith(f"{rule}:"):
            out = re.search(r"output: (\S+)", block)
            jobid = re.search(r"jobid: (\d+)", block)
            if out and jobid:
                outputs[jobid.group(1)] = out.group(1)
    return outputs


def reference_shards(log_text: str, finished_only: bool = True) -> set:
    """File names of the reference sampling shards (rule `sample` under results/sample/, not
    an evaluation's shards) started, or finished, in this log."""
    outputs = {j: o for j, o in job_outputs(log_text, "sample").items() if "/sample/" in o}
    if finished_only:
        done = set(re.findall(r"Finished jobid: (\d+) \(Rule: sample\)", log_text))
        outputs = {j: o for j, o in outputs.items() if j in done}
    return {Path(o).name for o in outputs.values()}


def job_counts(log_text: str) -> dict:
    """The first 'Job stats' table Snakemake printed: {rule: count}."""
    counts, table = {}, log_text.split("Job stats:", 1)[1].splitlines()
    for line in table[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, config_file) -> Path:
    workdir = tmp_path_factory.mktemp("straight")
    snakemake(workdir, "--cores", "1", "--configfile", str(config_file))
    return workdir / "results"


def test_killed_sampling_and_training_resume_exactly(tmp_path, config_file, uninterrupted):
    results = tmp_path / "results"

    # 1. Kill while sampling: once the first shard job has finished, before the last.
    log1 = tmp_path / "run1.log"
    proc = start(tmp_path, config_file, log1)
    wait_for(lambda: reference_shards(log1.read_text()), proc, log1)
    kill_tree(proc)
    finished = reference_shards(log1.read_text())
    assert 1 <= len(finished) < 3
    done_before = {name: next(results.glob(f"sample/*/{name}")).stat().st_mtime_ns for name in finished}
    # nothing half-written under a final name: every shard file present is a complete table
    for p in results.glob("sample/*/shard-*.parquet"):
        assert len(pd.read_parquet(p)) > 0

    # 2. Rerun; kill again once training has written its first checkpoint (step 5 of 30).
    log2 = tmp_path / "run2.log"
    proc = start(tmp_path, config_file, log2)
    ckpt = lambda: list(results.glob("train/*/checkpoints/step-*"))  # noqa: E731
    wait_for(ckpt, proc, log2, poll_s=0.01)
    kill_tree(proc)
    assert len(reference_shards(log2.read_text(), finished_only=False)) == 3 - len(done_before)
    for name, mtime in done_before.items():  # finished shards were not recomputed
        assert next(results.glob(f"sample/*/{name}")).stat().st_mtime_ns == mtime
    train_dir = next(results.glob("train/*"))
    assert not (train_dir / "model").exists()  # the killed job left nothing that looks done

    # 3. Rerun to the end: training resumes from its last checkpoint.
    log3 = tmp_path / "run3.log"
    proc = start(tmp_path, config_file, log3)
    assert proc.wait(timeout=900) == 0, log3.read_text()[-3000:]
    counts = job_counts(log3.read_text())
    assert "vstar" not in counts and counts["train"] == 1
    resumed = re.findall(r"resumed from \S+ at step (\d+)", (train_dir / "log" / "train.log").read_text())
    assert resumed and int(resumed[-1]) >= 5

    # 4. The same results as a run that was never interrupted.
    straight_train = uninterrupted / "train" / train_dir.name
    assert straight_train.exists()  # same settings, same content address
    a = AutoModelForCausalLM.from_pretrained(train_dir / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(straight_train / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(
        pd.read_parquet(train_dir / "metrics.parquet").filter(regex="^(?!time_|peak_memory)"),
        pd.read_parquet(straight_train / "metrics.parquet").filter(regex="^(?!time_|peak_memory)"),
    )
    mine = pd.read_csv(results / "resume" / "summary.csv")
    theirs = pd.read_csv(uninterrupted / "resume" / "summary.csv")
    pd.testing.assert_frame_equal(mine, theirs)
