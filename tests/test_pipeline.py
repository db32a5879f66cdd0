"""The Snakemake DAG: dry-run plans (what reruns when a setting changes) and the smoke run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT

SMOKE = ROOT / "tests" / "smoke_config.yaml"


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile with results under `workdir`."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> dict:
    """{rule: count} of a dry run."""
    out = snakemake(workdir, "-n", "--quiet", "rules", *args).stdout
    jobs, in_table = {}, False
    for line in out.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.mark.slow
def test_smoke_config_runs_every_stage(smoke_run):
    workdir, _ = smoke_run
    results = workdir / "results"
    summary = pd.read_csv(results / "smoke" / "summary.csv")
    assert set(summary["model"]) == {"reference", "apo"}
    assert summary["n"].tolist() == [24, 24] and summary["k"].tolist() == [2, 2]
    assert (results / "smoke" / "training_curves.png").stat().st_size > 1000
    assert (results / "smoke" / "training_phases.png").stat().st_size > 1000
    assert "| model" in (results / "smoke" / "report.md").read_text()
    paper = pd.read_csv(results / "smoke" / "paper_table.csv", index_col="method")
    assert paper.index.tolist() == ["reference", "A*-PO"] and paper.loc["A*-PO", "time_ratio"] == 1.0
    assert paper.loc["A*-PO", "train_hours"] > 0 and paper.loc["A*-PO", "peak_memory_gb"] > 0
    assert "A*-PO" in (results / "smoke" / "paper_table.tex").read_text()
    for kind in ["demo_model", "data", "sample", "vstar", "train", "eval"]:
        dirs = list((results / kind).iterdir())
        assert dirs and all((d / "manifest.json").exists() for d in dirs), kind
    shards = sorted((results / "sample").glob("*/shard-*.parquet"))
    assert len(shards) == 2
    samples = pd.concat(pd.read_parquet(s) for s in shards)
    assert len(samples) == 16 * 2 and samples["id"].nunique() == 16  # every prompt in one shard
    train_dir = next((results / "train").iterdir())
    assert (train_dir / "model" / "config.json").exists()
    assert len(pd.read_parquet(train_dir / "metrics.parquet")) == 3
    assert (results / "mlflow.db").exists()
    links = results / "smoke" / "stages"
    assert (links / "train_apo").resolve() == train_dir.resolve()


@pytest.mark.slow
def test_second_run_is_a_noop(smoke_run):
    workdir, _ = smoke_run
    out = snakemake(workdir, "-n", "--cores", "2", "--configfile", str(SMOKE)).stdout
    assert "Nothing to be done" in out


@pytest.mark.slow
def test_changing_beta2_plans_no_sampling(smoke_run):
    workdir, _ = smoke_run
    jobs = planned_jobs(workdir, "--configfile", str(SMOKE), "--config", "train={'beta2': 0.3}")
    assert "sample_reference" not in jobs and "vstar" not in jobs and "demo_model" not in jobs
    assert jobs.get("train") == 1 and jobs.get("evaluate") == 2 and jobs.get("scores") == 1
    assert jobs.get("report") == 1


@pytest.mark.slow
def test_changing_a_runtime_knob_plans_nothing(smoke_run):
    """Batch size, grader workers, vLLM memory: speed knobs, not in any address, never redo work."""
    workdir, _ = smoke_run
    out = snakemake(workdir, "-n", "--cores", "2", "--configfile", str(SMOKE), "--config",
                    "generation={'batch_size': 7, 'vllm': {'cpu_kvcache_gib': 2}}",
                    "grading={'workers': 2}").stdout
    assert "Nothing to be done" in out


@pytest.mark.slow
def test_an_unfinished_evaluation_shard_is_the_only_evaluation_redone(smoke_run):
    """As after a killed evaluation: one shard, that benchmark's scores and the report not
    written yet (Snakemake does not regenerate a missing intermediate under a finished report)."""
    workdir, _ = smoke_run
    shards = sorted((workdir / "results" / "eval").glob("*/shard-*.parquet"))
    assert len(shards) == 2 * 2  # reference and apo, 2 shards each
    lost = [shards[0], shards[0].parent / "scores.json", shards[0].parent / "samples.parquet",
            workdir / "results" / "smoke"]
    for f in lost:
        f.rename(f.with_name(f.name + ".kept"))
    try:
        jobs = planned_jobs(workdir, "--configfile", str(SMOKE))
    finally:
        for f in lost:
            f.with_name(f.name + ".kept").rename(f)
    assert jobs == {"evaluate": 1, "scores": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_adding_a_method_to_a_finished_experiment_trains_only_it(smoke_run):
    """The new method's training and evaluation, and the report (its set of inputs grew)."""
    workdir, _ = smoke_run
    jobs = planned_jobs(workdir, "--configfile", str(SMOKE), "--config", "methods=['apo', 'rebel']")
    assert jobs == {"train": 1, "evaluate": 2, "scores": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_a_missing_report_output_reruns_the_report_only(smoke_run):
    """E.g. an output added to the report in a newer version of the workflow."""
    workdir, _ = smoke_run
    plot = workdir / "results" / "smoke" / "training_phases.png"
    plot.rename(plot.with_name("kept.png"))
    try:
        jobs = planned_jobs(workdir, "--configfile", str(SMOKE))
    finally:
        plot.with_name("kept.png").rename(plot)
    assert jobs == {"report": 1, "all": 1}


@pytest.mark.slow
def test_changing_sample_count_replans_sampling_and_downstream(smoke_run):
    workdir, _ = smoke_run
    jobs = planned_jobs(workdir, "--configfile", str(SMOKE), "--config", "sample={'n': 3}")
    assert jobs.get("sample_reference") == 2 and jobs.get("vstar") == 1
    assert jobs.get("train") == 1 and jobs.get("evaluate") == 2 and jobs.get("report") == 1
    assert "demo_model" not in jobs and "prepare_data" not in jobs


PAPER = sorted((ROOT / "config" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("config_file", PAPER, ids=lambda p: p.name)
def test_paper_configs_plan_the_full_dag(tmp_path, config_file):
    """A dry run plans every stage for every method; hub ids are only strings, nothing is
    downloaded (no demo model is planned for a hub model and hub datasets)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cfg = yaml.safe_load(config_file.read_text())
    jobs = planned_jobs(tmp_path, "--configfile", str(config_file))
    benches, models = len(cfg["data"]["benchmarks"]), 1 + len(cfg["methods"]) * len(cfg.get("seeds", [0]))
    assert cfg["methods"] == ["apo", "grpo", "rebel", "ppo"]  # the paper's comparison
    assert jobs == {
        **({"demo_model": 1} if cfg["model"] == "demo" else {}),
        "prepare_data": 1 + benches + (cfg["data"].get("validation") is not None),
        "sample_reference": cfg["sample"]["shards"],
        "vstar": 1,
        "train": len(cfg["methods"]) * len(cfg.get("seeds", [0])),
        "evaluate": models * benches * cfg["evaluate"].get("shards", 1),
        "scores": models * benches,
        "report": 1,
        "all": 1,
    }
    assert not (tmp_path / "results").exists()


def test_compare_config_plans_the_sweep_before_its_picks(tmp_path):
    """3 learning rates x 4 methods on seed 0, one pick per method; the picked runs on seed 1
    and every evaluation but the reference's wait for the picks (a checkpoint)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    jobs = planned_jobs(tmp_path, "--configfile", str(ROOT / "config" / "compare.yaml"))
    assert jobs == {"demo_model": 1, "prepare_data": 3, "sample_reference": 2, "vstar": 1, "train": 12,
                    "pick": 4, "evaluate": 1, "scores": 1, "report": 1, "all": 1}


def test_published_stage1_table_plans_no_sampling(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    table = ("{source: table, table: {path: Cornell-AGI/math_size_qwen2.5_1.5b_eval, "
             "prompt_field: extra_info.question, reward_fields: [eval_0, eval_1]}}")
    jobs = planned_jobs(tmp_path, "--configfile", str(ROOT / "config/paper/qwen2.5-1.5b.yaml"),
                        "--config", f"vstar={table}")
    assert "sample_reference" not in jobs and jobs["vstar"] == 1 and jobs["train"] == 4  # apo, grpo, rebel, ppo


def test_bad_config_fails_before_any_job(tmp_path):
    bad = yaml.safe_load(SMOKE.read_text())
    bad["train"]["lr"] = "fast"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0
    assert "config key 'train.lr': 'fast' is not of type 'number'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(ROOT / "Snakefile")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
