"""Adding a method is one registry entry, one loss and its schema block: a method registered
here, in the test, is validated, planned (a sweep over its own key, the memory plan's peak),
trained for a step and reported as the paper's methods are, with no other module told of it."""

import copy
import json

import pandas as pd
import pytest
import torch
import yaml

from apo import memory, methods, report
from apo import train as T
from apo.config import ConfigError, validate_config
from apo.io import write_json, write_parquet
from apo.methods import MicroBatch
from apo.settings import Plan
from conftest import SCHEMA
from test_train import RUNTIME, SETTINGS, train_inputs  # noqa: F401 (train_inputs: the fixture)

CALLS = []


def toy_loss(batch: MicroBatch, toy: dict):
    """REINFORCE on the pair's centred reward, scaled by train.toy.scale: the method's loss."""
    rewards = batch.rewards.view(-1, 2)
    advantages = (rewards - rewards.mean(-1, keepdim=True)).flatten()
    loss = -(toy["scale"] * advantages * (batch.logp * batch.mask).sum(-1)).mean()
    CALLS.append(batch.logp.shape[0])
    return loss, {"advantage_abs": float(advantages.abs().mean())}


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The method `toy` in the registry (gone again after the test) and the schema with its block."""
    monkeypatch.setitem(methods.METHODS, "toy", None)  # the key is removed at teardown
    methods.register_method("toy", "Toy", samples=2, settings=("toy",), sweepable=("toy.scale",))(toy_loss)
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["properties"]["train"]["properties"]["toy"] = {
        "type": "object", "default": {}, "additionalProperties": False,
        "properties": {"scale": {"$ref": "#/$defs/sweepable_number", "default": 1.0}}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    CALLS.clear()
    return path


def test_a_new_method_is_validated_planned_and_swept(toy, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["methods"] = ["apo", "toy"]
    cfg["train"] = {**cfg.get("train", {}), "toy": {"scale": [0.5, 1.0]}}
    config = validate_config(cfg, toy)
    plan = Plan(config)
    assert list(plan.grids) == ["toy"] and list(plan.grids["toy"]) == ["scale0.5", "scale1"]
    assert [s.settings["toy"]["scale"] for s in plan.grids["toy"].values()] == [0.5, 1.0]
    assert "beta2" not in plan.grids["toy"]["scale1"].settings  # A*-PO's key: not the new method's address
    assert set(plan.trains) == {"apo"}  # the toy runs join when their pick is known
    plan.add_pick("toy", {"toy.scale": 0.5})
    assert plan.trains["toy"].settings["toy"] == {"scale": 0.5}
    assert memory.job_from_config(config, "toy", "toy").samples == 2
    with pytest.raises(ConfigError, match="toy"):
        validate_config(cfg, SCHEMA)  # without its schema block the key is unknown


def test_a_new_method_trains_a_step_and_is_reported(toy, train_inputs, tmp_path):  # noqa: F811
    model, prompts, _ = train_inputs
    settings = {**{k: v for k, v in SETTINGS.items() if k != "beta2"}, "method": "toy", "toy": {"scale": 1.0},
                "steps": 1}
    out = tmp_path / "toy"
    result = T.train(settings, model, prompts, None, out, *RUNTIME,
                     validation_path=str(tmp_path / "valid.parquet"))
    history = result["history"]
    assert history["step"].tolist() == [1] and history["loss"].notna().all()
    assert CALLS == [SETTINGS["micro_batch_size"] * 2] * 2  # two micro-batches of 4 prompts x 2 responses
    assert torch.isfinite(torch.tensor(history["advantage_abs"].to_numpy())).all()
    # the stage's outputs (train.run writes these), then the report over the run
    write_json(out / "summary.json", result["summary"])
    write_parquet(out / "validation.parquet", result["validation"])
    write_parquet(out / "metrics.parquet", result["history"])
    evals = []
    for label in ("reference", "toy"):
        d = tmp_path / f"eval-{label}"
        d.mkdir()
        write_json(d / "scores.json", {"accuracy": 0.5, "n": 10, "n_rows": 10, "n_counted": 10, "k": 1,
                                       "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "unparsed": 0})
        evals.append({"model": label, "benchmark": "b", "dir": str(d)})
    spec = {"experiment": "x", "evals": evals, "trainings": [{"label": "toy", "method": "toy", "seed": 0, "dir": str(out)}],
            "stages": {}, "validation": {"dataset": "demo split valid", "on_benchmark": False, "k": 1, "temperature": 0.0}}
    report.write(spec, tmp_path / "report")
    paper = pd.read_csv(tmp_path / "report" / "paper_table.csv", index_col="method")
    assert list(paper.index) == ["reference", "Toy"]
    assert "Toy" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
