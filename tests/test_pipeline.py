"""The Snakemake DAG: dry-run plans (what reruns when a setting changes) and the smoke run."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from apo.config import validate_config
from apo.settings import Plan
from conftest import ROOT, SMOKE, snakemake

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
    for kind in ["demo", "data", "sample", "vstar", "train", "evaluate"]:
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
    # the vLLM jobs (sampling, training, evaluation) leave no rendezvous file in their temp dir
    assert not list((workdir / "tmp").glob("vllm_dist_*"))


@pytest.mark.slow
def test_second_run_is_a_noop(smoke_run):
    workdir, _ = smoke_run
    out = snakemake(workdir, "-n", "--cores", "2", "--configfile", str(SMOKE)).stdout
    assert "Nothing to be done" in out


@pytest.mark.slow
def test_a_truncated_prompts_file_then_the_same_command_is_an_error(smoke_run, tmp_path):
    """`apo verify` finds every output of a finished run as its job wrote it; after a
    truncated prompts.parquet the same snakemake command stops naming the file and its rule
    (its newer mtime reruns the jobs downstream, whose own outputs are written) instead of
    finishing with nothing done, and `apo verify` says which directory to delete."""
    workdir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], workdir, symlinks=True)
    apo = [str(Path(sys.executable).with_name("apo")), "verify"]
    proc = subprocess.run([*apo, "results"], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    (sample,) = (workdir / "results" / "sample").glob("*/manifest.json")
    prompts = workdir / "results" / json.loads(sample.read_text())["inputs"]["prompts"] / "prompts.parquet"
    prompts.write_bytes(prompts.read_bytes()[: prompts.stat().st_size // 2])
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(SMOKE), check=False)
    assert proc.returncode != 0
    rel = prompts.relative_to(workdir)
    assert f"{rel}: its content does not match the checksum its job recorded" in proc.stdout + proc.stderr
    proc = subprocess.run([*apo, "results/smoke"], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout.rstrip().endswith(f"rm -r {(workdir / rel.parent).resolve()}")


@pytest.mark.slow
def test_changing_beta2_plans_no_sampling(smoke_run):
    workdir, _ = smoke_run
    jobs = planned_jobs(workdir, "--configfile", str(SMOKE), "--config", "train={'beta2': 0.3}")
    assert "vstar" not in jobs and "demo" not in jobs
    # the sample rule's jobs are the new model's 2 evaluation shards only: no reference sampling
    assert jobs.get("train") == 1 and jobs.get("sample") == 2 and jobs.get("evaluate") == 1
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
    shards = sorted((workdir / "results" / "evaluate").glob("*/shard-*.parquet"))
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
    assert jobs == {"sample": 1, "evaluate": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_adding_a_method_to_a_finished_experiment_trains_only_it(smoke_run):
    """The new method's training and evaluation, and the report (its set of inputs grew)."""
    workdir, _ = smoke_run
    jobs = planned_jobs(workdir, "--configfile", str(SMOKE), "--config", "methods=['apo', 'rebel']")
    assert jobs == {"train": 1, "sample": 2, "evaluate": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_adding_a_method_after_a_sweep_trains_its_sweep_and_redoes_the_report(smoke_run, tmp_path):
    """With a sweep the report's inputs wait for a checkpoint, and Snakemake then checks neither
    their set nor their dates: its plan file (named by the plan) is what brings the new method's
    sweep and the report into the run. Going back to the first plan redoes the report again.
    In a copy: other tests read the smoke run's stage folders whole."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run[0], workdir, symlinks=True)
    swept = ["--configfile", str(SMOKE), "--config", "experiment=smoke_sweep", "train={'lr': [1.0e-4, 3.0e-4]}"]
    snakemake(workdir, "--cores", "2", *swept)
    assert "Nothing to be done" in snakemake(workdir, "-n", *swept).stdout
    jobs = planned_jobs(workdir, *swept, "methods=['apo', 'rebel']")
    assert jobs == {"train": 2, "sweep": 1, "report": 1, "all": 1}  # the pick's evaluation: after the checkpoint
    snakemake(workdir, "--cores", "2", *swept, "methods=['apo', 'rebel']")
    summary = pd.read_csv(workdir / "results" / "smoke_sweep" / "summary.csv")
    assert set(summary["model"]) == {"reference", "apo", "rebel"}
    assert planned_jobs(workdir, *swept) == {"report": 1, "all": 1}


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
    # 2 reference sampling shards and the new model's 2 evaluation shards
    assert jobs.get("sample") == 2 + 2 and jobs.get("vstar") == 1
    assert jobs.get("train") == 1 and jobs.get("evaluate") == 1 and jobs.get("report") == 1
    assert "demo" not in jobs and "data" not in jobs


PAPER = sorted((ROOT / "config" / "paper").glob("*.yaml"))


def evaluation_shards(cfg: dict) -> int:
    """Sampling jobs of one model's evaluation: the shards of every benchmark."""
    return sum({**cfg["evaluate"], **b.get("evaluate", {})}["shards"] for b in cfg["data"]["benchmarks"])


@pytest.mark.parametrize("config_file", PAPER, ids=lambda p: p.name)
def test_paper_configs_plan_the_full_dag(tmp_path, config_file):
    """A dry run plans every stage for every method; hub ids are only strings, nothing is
    downloaded (no demo model is planned for a hub model and hub datasets)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cfg = validate_config(yaml.safe_load(config_file.read_text()), base_dir=ROOT)  # with its base
    jobs = planned_jobs(tmp_path, "--configfile", str(config_file))
    benches, models = len(cfg["data"]["benchmarks"]), 1 + len(cfg["methods"]) * len(cfg.get("seeds", [0]))
    assert cfg["methods"] == ["apo", "grpo", "rebel", "ppo"]  # the paper's comparison
    assert jobs == {
        **({"demo": 1} if cfg["model"] == "demo" else {}),
        "prefetch": 1,  # a hub model and hub datasets: fetched first, on this host
        "data": 1 + benches + (cfg["data"].get("validation") is not None),
        "sample": cfg["sample"]["shards"] + models * evaluation_shards(cfg),
        "vstar": 1,
        "train": len(cfg["methods"]) * len(cfg.get("seeds", [0])),
        "evaluate": models * benches,
        "report": 1,
        "all": 1,
    }
    assert not (tmp_path / "results").exists()


def test_compare_config_plans_the_sweep_before_its_picks(tmp_path):
    """3 learning rates x 5 methods (the DAPO-style GRPO row included) on seed 0, one pick per
    method; the picked runs on seed 1 and every evaluation but the reference's wait for the
    picks (a checkpoint)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    jobs = planned_jobs(tmp_path, "--configfile", str(ROOT / "config" / "compare.yaml"))
    # the sample rule: 2 reference sampling shards and the reference's evaluation shard
    assert jobs == {"demo": 1, "data": 3, "sample": 2 + 1, "vstar": 1, "train": 15,
                    "sweep": 5, "evaluate": 1, "report": 1, "all": 1}
    plan = Plan(validate_config(yaml.safe_load((ROOT / "config" / "compare.yaml").read_text()), base_dir=ROOT))
    dapo = plan.grids["dapo"]
    assert len(dapo) == 3 and {s.settings["method"] for s in dapo.values()} == {"dapo"}
    assert {s.settings["lr"] for s in dapo.values()} == {1e-4, 3e-4, 1e-3}  # its own pick from the sweep
    first = next(iter(dapo.values())).settings
    assert first["dapo"]["clip_eps_high"] == 0.28 and first["dapo"]["dynamic_sampling"] is True
    assert first["batch_size"] == plan.grids["grpo"][next(iter(plan.grids["grpo"]))].settings["batch_size"]


def test_grpo_variants_config_plans_each_variant_with_its_own_sweep(tmp_path):
    """GRPO, Dr. GRPO, DAPO and GSPO by name: 3 learning rates each on seed 0, one pick each;
    no method reads V*, so no reference sampling (the sample rule: the reference's evaluation)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    jobs = planned_jobs(tmp_path, "--configfile", str(ROOT / "config" / "grpo_variants.yaml"))
    assert jobs == {"demo": 1, "data": 3, "sample": 1, "train": 12,
                    "sweep": 4, "evaluate": 1, "report": 1, "all": 1}


def test_published_stage1_table_plans_no_sampling(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    table = ("{source: table, table: {path: Cornell-AGI/math_size_qwen2.5_1.5b_eval, "
             "prompt_field: extra_info.question, reward_fields: [eval_0, eval_1]}}")
    jobs = planned_jobs(tmp_path, "--configfile", str(ROOT / "config/paper/qwen2.5-1.5b.yaml"),
                        "--config", f"vstar={table}")
    cfg = validate_config(yaml.safe_load((ROOT / "config/paper/qwen2.5-1.5b.yaml").read_text()), base_dir=ROOT)
    assert jobs["sample"] == 5 * evaluation_shards(cfg) and jobs["vstar"] == 1 and jobs["train"] == 4  # apo, grpo, rebel, ppo


def test_bad_config_fails_before_any_job(tmp_path):
    bad = yaml.safe_load(SMOKE.read_text())
    bad["train"]["lr"] = "fast"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0
    assert "config key 'train.lr': 'fast' is not of type 'number'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_a_yte_template_config_is_refused(tmp_path):
    """Snakemake evaluates a config with `__use_yte__: true` as a template (its Python runs,
    `snakemake -n` included, before the workflow sees the config): the run stops on the file."""
    cfg = yaml.safe_load(SMOKE.read_text())
    (tmp_path / "yte.yaml").write_text(yaml.safe_dump({"__use_yte__": True, **cfg}) + "seeds: ?[0 + 0]\n")
    proc = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "yte.yaml"), check=False)
    assert proc.returncode != 0
    assert (f"invalid {tmp_path / 'yte.yaml'}: config key '__use_yte__': a config file is data"
            in proc.stdout + proc.stderr)


def test_a_config_file_with_a_key_given_twice_fails_before_any_job(tmp_path):
    """Snakemake reads --configfile keeping the last of two `train:` blocks; the workflow reads
    the file again and refuses it, naming the line."""
    text = SMOKE.read_text() + "train:\n  steps: 2\n"
    (tmp_path / "twice.yaml").write_text(text)
    proc = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "twice.yaml"), check=False)
    line = text.count("\n") - 1
    assert proc.returncode != 0
    assert f"twice.yaml, line {line}: key 'train' is given twice" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(ROOT / "Snakefile")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_path_in_a_shell_command_is_quoted(tmp_path):
    """A checkout and a working directory whose paths hold a space and a command substitution:
    every job's command still splits into the intended arguments, and nothing is run."""
    import shlex

    checkout = tmp_path / "a b $(touch pwned)"
    checkout.mkdir()
    for part in ("Snakefile", "workflow", "config"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, checkout / part)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(checkout / "Snakefile"), "--directory",
           str(checkout), "-n", "-p", "--configfile", str(SMOKE), "--config", "resources={train: {gpu: 2}}"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prefix = "Shell command: "
    commands = [line[len(prefix):] for line in proc.stdout.splitlines()
                if line.startswith(prefix) and line != prefix + "None"]  # rule all: no command
    assert len(commands) >= 8
    (train,) = [shlex.split(c) for c in commands if "accelerate launch" in c]
    assert train[:3] == ["apo", "lock", "--wait-s"]
    assert train[4] == train[train.index("--stage-dir") + 1] + "/.train.lock"
    assert train[train.index("--config_file") + 1] == str(checkout / "workflow/accelerate/ddp.yaml")
    assert "--main_process_port" in train
    for c in commands:
        args = shlex.split(c)
        out = args[args.index("--stage-dir" if "--stage-dir" in args else "--out-dir") + 1]
        assert out.startswith("results/")
    assert not list(tmp_path.rglob("pwned"))


# A stand-in for `apo` and `accelerate`: writes a job's outputs (empty) and nothing else, so
# Snakemake records a finished run, with its metadata, in a second.
STUB = """#!/usr/bin/env python3
import sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "lock":  # apo lock FILE -- accelerate launch ...
    args = args[args.index("--") + 2:]
from apo.job import DIRECTORY_OUTPUTS, STAGE_OUTPUTS
from apo.report import FILES
cmd = "train" if args[0] == "launch" else args[0]
opt = lambda name: args[args.index(name) + 1] if name in args else None
if cmd == "report":
    files = [Path(opt("--out-dir")) / n for n in FILES] + [Path(opt("--plan"))]
else:
    files = [Path(opt("--stage-dir")) / n.format(shard=opt("--shard")) for n in STAGE_OUTPUTS[cmd].values()]
for f in files:
    f.mkdir(parents=True, exist_ok=True) if f.name in DIRECTORY_OUTPUTS else (f.parent.mkdir(parents=True, exist_ok=True), f.touch())
"""


def stub_run(workdir: Path, *args: str) -> None:
    """Run the workflow with every stage job replaced by STUB."""
    bin_dir = workdir / "stub-bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("apo", "accelerate"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", *args]
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_editing_a_local_train_file_replans_data_prep_and_after_only(tmp_path):
    """Local files take part in addresses by content: one edited line moves the training
    prompts and everything downstream of them; the demo model, the benchmark and the
    reference model's evaluation stay. A touched file with the same bytes moves nothing."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(
        f'{{"id": "p{i}", "question": "Mia has {i} pens. She finds 2 more. How many pens does Mia have now?", '
        f'"answer": "{i + 2}"}}\n' for i in range(8)))
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["data"]["train"] = {"path": "train.jsonl", "split": "train", "prompt_field": "question",
                            "answer_field": "answer", "id_field": "id"}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    args = ("--configfile", str(tmp_path / "local.yaml"))
    stub_run(tmp_path, *args)
    assert planned_jobs(tmp_path, *args) == {}

    os.utime(train)  # newer, same content
    assert planned_jobs(tmp_path, *args) == {}

    lines = train.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("finds 2 more", "finds 2 more today")
    train.write_text("".join(lines))
    assert planned_jobs(tmp_path, *args) == {
        "data": 1, "sample": 2 + 2, "vstar": 1, "train": 1, "evaluate": 1, "report": 1, "all": 1}


# What a stage job may receive besides its manifest: paths of its inputs (all addressed; its
# outputs are its rule's, in its stage directory), its shard index, and the runtime knobs that
# change speed, not results.
JOB_OPTIONS = {"--manifest", "--stage-dir", "--runtime", "--model", "--model-revision", "--tokenizer",
               "--prompts", "--samples", "--shard", "--shards", "--demo-dir", "--vstar", "--validation"}
RUNTIME_KEYS = {"generation": {"batch_size", "vllm"}, "grading": {"workers"}, "tracking_uri": None,
                "lock_wait_s": None, "hub_offline": None,
                "train": {"gradient_checkpointing", "distributed", "time_limit_min"}}


def test_jobs_receive_settings_only_through_their_manifest(tmp_path):
    """Every job of the smoke plan (all four methods): no option carries a config value past
    the stage's address, the manifest is the one its directory is named after, and `--runtime`
    holds only the declared runtime knobs."""
    import json
    import shlex

    shutil.copytree(ROOT / "config", tmp_path / "config")
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(SMOKE), "--config",
                    "methods=['apo', 'grpo', 'rebel', 'ppo']").stdout
    prefix = "Shell command: "
    commands = [shlex.split(line[len(prefix):]) for line in out.splitlines()
                if line.startswith(prefix) and line != prefix + "None"]
    stage_jobs = [c for c in commands if "--stage-dir" in c]
    assert len(stage_jobs) >= 15
    for args in stage_jobs:
        options = {a for a in args[args.index("--manifest"):] if a.startswith("--")}
        assert options <= JOB_OPTIONS, (args[:3], options - JOB_OPTIONS)
        manifest = json.loads(args[args.index("--manifest") + 1])
        assert args[args.index("--stage-dir") + 1] == f"results/{manifest['kind']}/{manifest['hash']}"
        runtime = json.loads(args[args.index("--runtime") + 1])
        assert {k: set(v) if isinstance(v, dict) else None for k, v in runtime.items()} == RUNTIME_KEYS


@pytest.mark.slow
def test_two_concurrent_runs_share_each_job(tmp_path):
    """Two snakemake runs of one experiment at once (the profile's `nolock` lets them): both
    finish, and a job the second starts while the first runs it waits for it and then finds
    its outputs instead of redoing them; outputs are not deleted under the other run's readers
    when a run starts a job the other has finished since it planned (`addressed`). Up to
    training: the jobs after it are shared in the same way."""
    import mlflow

    shutil.copytree(ROOT / "config", tmp_path / "config")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "1", "--configfile", str(SMOKE), "--until", "train"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for _ in range(2)]
    outs = [r.communicate(timeout=1800)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    results = tmp_path / "results"
    trained = list((results / "train").iterdir())
    assert len(trained) == 1 and (trained[0] / "model" / "config.json").exists()  # one training, finished
    # both runs' jobs write the one log file of a job they share: where their writes meet, it need
    # not be valid UTF-8 (a progress bar's block character cut in two)
    logs = [f.read_text(errors="replace") for f in results.glob("*/*/log/*.log")]
    assert any("another job is writing these outputs" in text for text in logs)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{results}/mlflow.db")
    names = [r.info.run_name for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    trainings = [n for n in names if n.startswith("train-")]
    assert len(trainings) == 1, names  # trained once, although both runs started the job


def test_a_named_config_is_the_whole_config(tmp_path):
    """`--configfile mine.yaml` replaces the demo's config instead of being merged over it: a
    key mine.yaml leaves out takes the schema's default, not the demo's value (the demo sets
    data.train.limit 1024, train.lr 3e-4, train.steps 150)."""
    demo = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    mine = {"experiment": "mine", "model": "demo", "data": {
        "train": {k: v for k, v in demo["data"]["train"].items() if k != "limit"},
        "benchmarks": demo["data"]["benchmarks"]}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    out = snakemake(tmp_path, "-n", "--printshellcmds", "--configfile", str(tmp_path / "mine.yaml")).stdout
    manifests = []
    for line in out.splitlines():
        if "--manifest" in line:
            words = shlex.split(line)
            manifests.append(json.loads(words[words.index("--manifest") + 1]))
    train = next(m["settings"] for m in manifests if m["kind"] == "train")
    data = next(m["settings"] for m in manifests if m["kind"] == "data" and m["settings"]["split"] == "train")
    assert (train["lr"], train["steps"], data["limit"]) == (1.0e-6, 100, None)


def test_every_rule_declares_exactly_the_outputs_its_job_writes(tmp_path):
    """apo.job.STAGE_OUTPUTS is the one list of each rule's outputs: in a dry run of a plan with
    every rule (sweeps included), each job's declared outputs are its rule's entries in its
    stage directory, and they are what the job records and `apo verify` checks."""
    from apo.job import STAGE_OUTPUTS

    shutil.copytree(ROOT / "config", tmp_path / "config")
    out = snakemake(tmp_path, "-n", "--configfile", str(ROOT / "config" / "compare.yaml")).stdout
    jobs = re.findall(r"^(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    output: (.*)\n(?:    .*\n)*?    wildcards: (.*)",
                      out, re.M)
    seen = set()
    for rule, outputs, wildcards in jobs:
        if rule == "report":
            continue  # not a stage: apo.report.FILES (tests/test_report.py)
        w = dict(item.split("=") for item in wildcards.split(", "))
        stage_dir = f"results/{w.get('kind', rule)}/{w['h']}"
        declared = [o.removesuffix(" (update)") for o in outputs.split(", ")]
        assert all(o.endswith(" (update)") for o in outputs.split(", ")), rule  # `addressed`: kept
        assert declared == [f"{stage_dir}/{name.format(**w)}" for name in STAGE_OUTPUTS[rule].values()], rule
        seen.add(rule)
    assert seen == set(STAGE_OUTPUTS)
