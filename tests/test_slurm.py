"""The workflow on a real Slurm: `snakemake --cores all --profile slurm` from the repository
root, against the one-node cluster of scripts/slurm-local-up.sh.

Checked from Slurm's own records (slurmctld keeps finished jobs for MinJobAge seconds): every
job of a non-local rule was an sbatch job that completed, with the GPUs and memory the config
asked for; the local rules (all, report, scores) were not. The results equal a local run's.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, SMOKE

UP = ROOT / "scripts" / "slurm-local-up.sh"
DOWN = ROOT / "scripts" / "slurm-local-down.sh"
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

# Overrides for the local cluster (its partition, no accounts, no slurmdbd for sacct) and a
# short first status poll, so that jobs of a few seconds do not wait 40 s to be noticed.
LOCAL_CLUSTER = ["--default-resources", "slurm_partition=debug", "--slurm-no-account",
                 "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"]

# Stage directory -> the rule of its cluster jobs (an evaluation's shards are rule `sample`'s;
# its scores are computed locally).
RULE_OF_STAGE = {"demo": "demo", "data": "data", "sample": "sample", "vstar": "vstar", "train": "train",
                 "evaluate": "sample"}
GPU_RULES = {"sample", "train"}
LOCAL_RULES = {"all", "prefetch", "report", "evaluate", "sweep"}  # `localrules` in the Snakefile


def env_with_venv(**extra) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A running one-node Slurm (started here, always stopped after); yields its SLURM_CONF."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it starts munged, slurmctld, slurmd)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "APO_SLURM_DIR": str(state)}
    try:
        up = subprocess.run([str(UP)], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"slurm-local-up failed:\n{up.stdout}\n{up.stderr}"
        yield str(state / "slurm.conf")
    finally:
        subprocess.run([str(DOWN)], env=env, capture_output=True, text=True, timeout=120)


def slurm_jobs(slurm_conf: str) -> list[dict]:
    """Every job slurmctld still knows, as {field: value} (scontrol's one-line records)."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], env={**os.environ, "SLURM_CONF": slurm_conf},
                         capture_output=True, text=True, check=True).stdout
    return [dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line)) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def slurm_run(local_slurm, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke-slurm")
    shutil.copytree(ROOT / "config", workdir / "config")
    cmd = [SNAKEMAKE, "--cores", "all", "--profile", "slurm", "--directory", str(workdir),
           "--configfile", str(SMOKE), *LOCAL_CLUSTER]
    t0 = time.monotonic()
    # From the repository root, as users run it: that is where `--profile slurm` is found.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env=env_with_venv(SLURM_CONF=local_slurm))
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"snakemake --profile slurm failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    print(f"snakemake --profile slurm on the smoke config: {seconds:.0f} s")
    return workdir, proc, slurm_jobs(local_slurm)


def expected_cluster_jobs(results: Path) -> set[str]:
    """The Slurm job comments (rule_<rule>_wildcards_<values>) the finished results imply."""
    jobs = set()
    for stage, rule in RULE_OF_STAGE.items():
        for d in (results / stage).iterdir():
            if stage in ("sample", "evaluate"):  # one job per shard; wildcards kind, h, shard
                jobs |= {f"rule_{rule}_wildcards_{stage}_{d.name}_{p.stem.split('-')[1]}"
                         for p in d.glob("shard-*.parquet")}
            else:
                jobs.add(f"rule_{rule}_wildcards_{d.name}")
    return jobs


@pytest.mark.slow
def test_every_cluster_job_went_through_sbatch(slurm_run):
    workdir, proc, records = slurm_run
    ours = [j for j in records if j.get("WorkDir") == str(workdir)]
    done = {j["Comment"]: j for j in ours if j["JobState"] == "COMPLETED"}
    expected = expected_cluster_jobs(workdir / "results")
    assert len(expected) == 12  # demo model, 3 datasets (train, benchmark, validation), 2 shards, V*, training, 2 x 2 evaluation shards
    assert set(done) == expected, f"Slurm records: {sorted(done)}; expected {sorted(expected)}"
    assert not any(j["Comment"].split("_wildcards")[0] in {f"rule_{r}" for r in LOCAL_RULES} for j in ours)
    for comment, job in done.items():
        rule = re.match(r"rule_(.+?)_wildcards_", comment).group(1)
        assert job["Partition"] == "debug"
        assert ("gres:gpu:1" in job.get("TresPerJob", "")) == (rule in GPU_RULES), (comment, job.get("TresPerJob"))
        assert re.search(r"mem=(\d+)M", job["TRES"]), job["TRES"]
    train = next(j for c, j in done.items() if c.startswith("rule_train_"))
    assert "mem=3000M" in train["TRES"] and train["NumCPUs"] == "2"  # tests/smoke_config.yaml resources
    # Snakemake's own account agrees: one submission per cluster job, the local rules local.
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", proc.stdout + proc.stderr)
    assert sorted(submitted) == sorted(j["JobId"] for j in done.values())
    assert re.search(r"localrule report:", proc.stdout + proc.stderr)


def drop_timings(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.startswith("time_") or c == "peak_memory_mb"])


@pytest.mark.slow
def test_slurm_results_equal_a_local_run(slurm_run, smoke_run):
    slurm_results = slurm_run[0] / "results"
    local_results = smoke_run[0] / "results"

    def stage_files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for kind in RULE_OF_STAGE for p in (root / kind).rglob("*")
                if p.is_file() and "log" not in p.parts}

    # A job's lock file names the process that held it: not a result.
    files = {f for f in stage_files(slurm_results) if not f.endswith(".lock")}
    assert files == {f for f in stage_files(local_results) if not f.endswith(".lock")}  # the same addresses, files
    # Wall-clock times (and what holds them: a training's manifest records its files' checksums)
    # differ between runs; everything else is bit-equal.
    timed = {"metrics.parquet", "summary.json", "trainer_state.json", "mlflow_run_id", "validation.parquet"}
    for rel in sorted(files):
        a, b = slurm_results / rel, local_results / rel
        if Path(rel).name not in timed and not (rel.startswith("train/") and rel.endswith("manifest.json")):
            assert a.read_bytes() == b.read_bytes(), rel
    for validation in (slurm_results / "train").glob("*/validation.parquet"):
        local = local_results / validation.relative_to(slurm_results)
        untimed = [c for c in pd.read_parquet(validation).columns if c not in ("train_time_s", "time_validate_s")]
        pd.testing.assert_frame_equal(pd.read_parquet(validation)[untimed], pd.read_parquet(local)[untimed])
    for metrics in (slurm_results / "train").glob("*/metrics.parquet"):
        local = local_results / metrics.relative_to(slurm_results)
        pd.testing.assert_frame_equal(drop_timings(pd.read_parquet(metrics)), drop_timings(pd.read_parquet(local)))
    for summary in (slurm_results / "train").glob("*/summary.json"):
        a, b = (json.loads(p.read_text()) for p in (summary, local_results / summary.relative_to(slurm_results)))
        for timing in ("train_time_s", "peak_memory_mb", "validate_time_s"):
            a.pop(timing, None), b.pop(timing, None)
        assert a == b
    pd.testing.assert_frame_equal(pd.read_csv(slurm_results / "smoke" / "summary.csv"),
                                  pd.read_csv(local_results / "smoke" / "summary.csv"))


PLAN_CONFIGS = [ROOT / "config" / "config.yaml", *sorted((ROOT / "config" / "paper").glob("*.yaml"))]


@pytest.mark.parametrize("configfile", PLAN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_dry_run_under_the_slurm_profile_shows_resources(configfile, tmp_path):
    """Plans every config (the demo, each paper config) for Slurm and prints each planned job
    with its GPU and memory request; no cluster needed."""
    env = env_with_venv()
    env.pop("SLURM_CONF", None)
    proc = subprocess.run([SNAKEMAKE, "-n", "--profile", "slurm", "--directory", str(tmp_path),
                           "--configfile", str(configfile)], cwd=ROOT, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", out, flags=re.M)
    planned = []
    for rule, resources in jobs:
        res = dict(kv.split("=", 1) for kv in resources.split(", "))
        if rule in LOCAL_RULES:
            continue
        assert res["slurm_partition"] and "mem_mb" in res and "runtime" in res, (rule, res)
        assert (int(res["gpu"]) >= 1) == (rule in GPU_RULES), (rule, res)
        planned.append(f"{rule:18s} gpu={res['gpu']:>2s} mem_mb={res['mem_mb']:>7s} "
                       f"cpus_per_task={res['cpus_per_task']:>3s} runtime={res['runtime']} min")
    assert {j.split()[0] for j in planned} >= {"data", "sample", "train"}
    # The hub's models and datasets are fetched first, on this host (compute nodes may have no
    # internet): planned for every paper config, which reads from the hub; not for the demo.
    local = {rule for rule, _ in jobs if rule in LOCAL_RULES}
    assert ("prefetch" in local) == (configfile.parent.name == "paper"), local
    print(f"\n{configfile.relative_to(ROOT)}: {len(planned)} cluster jobs\n  " + "\n  ".join(planned))
