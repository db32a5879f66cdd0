"""Data-parallel training as a multi-GPU Slurm job runs it, on CPU: two processes (gloo)
started by torchrun, as `accelerate launch --num_processes 2` starts them on two GPUs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def train_2_processes(results: Path, train_dir: Path, out: Path) -> subprocess.CompletedProcess:
    m = json.loads((train_dir / "manifest.json").read_text())
    inputs = {k: results / v for k, v in m["inputs"].items()}
    runtime = {"generation": {"batch_size": 64}, "grading": {"timeout_s": 5, "workers": 1},
               "tracking_uri": f"sqlite:///{out.parent}/mlflow.db"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
           "-m", "apo.cli", "train", "--manifest", json.dumps(m), "--stage-dir", str(out),
           "--runtime", json.dumps(runtime), "--model", str(inputs["model"] / "model"),
           "--prompts", str(inputs["prompts"] / "prompts.parquet"), "--vstar", str(inputs["vstar"] / "vstar.parquet")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_two_process_training_shares_batches_and_resumes(smoke_run, tmp_path):
    results = smoke_run[0] / "results"
    train_dir = next((results / "train").iterdir())
    single = pd.read_parquet(train_dir / "metrics.parquet")
    out = tmp_path / "train"
    train_2_processes(results, train_dir, out)

    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["step"].tolist() == single["step"].tolist()
    # Each process sampled its half of every batch; the logged values are the whole batch's.
    assert metrics["tokens"].sum() > 0 and metrics["lr"].tolist() == single["lr"].tolist()  # one LR step per step
    ckpt = out / "checkpoints" / "step-000003"
    assert {p.name for p in ckpt.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    assert (out / "model" / "model.safetensors").exists()
    assert not list((out / "checkpoints").glob(".*"))  # no half-written checkpoint left behind

    # A rerun after losing the last checkpoint resumes from step 2 and ends where the first did.
    first = metrics
    shutil.rmtree(ckpt), shutil.rmtree(out / "model"), (out / "metrics.parquet").unlink()
    proc = train_2_processes(results, train_dir, out)
    assert "resumed from" in proc.stderr
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "metrics.parquet").filter(regex="^(?!time_|peak_)"), first.filter(regex="^(?!time_|peak_)"))
