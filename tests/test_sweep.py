"""Sweeps: a list of values plans one training per combination, each method's pick by final
validation accuracy is trained on the other seeds and alone evaluated."""

import pandas as pd
import pytest

from apo import sweep
from apo.config import ConfigError, validate_config
from conftest import SCHEMA
from test_settings import plan

LRS = [1.0e-4, 3.0e-4, 1.0e-3]


def test_a_list_plans_one_training_per_combination(demo_config):
    p = plan(demo_config, methods=["apo", "grpo", "rebel"], seeds=[0, 1], train__lr=LRS,
             train__grpo={"group_size": [4, 8]})
    assert {m: len(g) for m, g in p.grids.items()} == {"apo": 3, "grpo": 6, "rebel": 3}
    assert list(p.grids["grpo"]) == [f"lr{lr:g}-group_size{g}" for lr in LRS for g in (4, 8)]
    assert len({s.hash for g in p.grids.values() for s in g.values()}) == 12
    for method, grid in p.grids.items():
        assert all(s.settings["seed"] == 0 and s.settings["method"] == method for s in grid.values())
        assert p.sweeps[method].inputs == grid  # the sweep picks among every run of its grid
    grpo = p.grids["grpo"]["lr0.001-group_size4"].settings
    assert grpo["lr"] == 1e-3 and grpo["grpo"]["group_size"] == 4
    # nothing of a swept method is evaluated before its pick: only the reference
    assert p.trains == {} and [label for label, _ in p.evals] == ["reference"]


def test_values_that_differ_past_the_labels_precision_are_each_trained(demo_config):
    """`:g` writes 1e-4 and 1.0000001e-4 alike; the label keeps the full value, so neither run
    is dropped, and a value that `:g` writes exactly keeps its short label."""
    p = plan(demo_config, train__lr=[1.0e-4, 1.0000001e-4, 3.0e-4])
    assert list(p.grids["apo"]) == ["lr0.0001", "lr0.00010000001", "lr0.0003"]
    assert len({s.hash for s in p.grids["apo"].values()}) == 3
    assert sweep.label({"lr": 123456789, "grpo.group_size": 8}) == "lr123456789-group_size8"
    with pytest.raises(ValueError, match=r"the listed values \{'lr': 1\} and \{'lr': 1.0\} give one sweep run label"):
        sweep.labelled([{"lr": 1}, {"lr": 1.0}])


@pytest.mark.parametrize("key, values", [("lr", [1.0e-4, 0.0001]), ("beta2", [0.1, 0.1]),
                                         ("grpo.group_size", [4, 4])])
def test_a_value_listed_twice_is_refused_with_its_key(demo_config, key, values):
    """The sweep rule pairs its runs with the grid's combinations by position: a repeated value
    would shift them, so the config refuses it."""
    cfg = {**demo_config, "methods": ["apo", "grpo"]}
    head, _, last = key.rpartition(".")
    (cfg["train"].setdefault(head, {}) if head else cfg["train"])[last] = values
    with pytest.raises(ConfigError, match=rf"config key 'train.{key}': .* has non-unique elements"):
        validate_config(cfg, SCHEMA)


def test_only_the_method_that_reads_a_listed_key_sweeps_it(demo_config):
    p = plan(demo_config, methods=["apo", "grpo"], train__beta2=[0.1, 0.5])
    assert list(p.grids) == ["apo"] and list(p.grids["apo"]) == ["beta20.1", "beta20.5"]
    assert set(p.trains) == {"grpo"}  # unswept: trained and evaluated as always


def test_a_changed_grid_keeps_the_finished_runs(demo_config):
    small = plan(demo_config, train__lr=LRS)
    large = plan(demo_config, train__lr=[*LRS, 3.0e-3])
    assert {k: s.dir for k, s in small.grids["apo"].items()}.items() <= {
        k: s.dir for k, s in large.grids["apo"].items()}.items()
    assert small.sweeps["apo"].dir != large.sweeps["apo"].dir  # a new pick, over four runs
    # a grid run is the single run with the same values: shared with config/config.yaml's
    assert small.grids["apo"]["lr0.0003"].dir == plan(demo_config).trains["apo"].dir


def test_the_pick_is_trained_on_the_other_seeds_and_evaluated(demo_config):
    p = plan(demo_config, seeds=[0, 1], train__lr=LRS)
    p.add_pick("apo", {"lr": 1e-3})
    assert set(p.trains) == {"apo-seed0", "apo-seed1"}
    assert p.trains["apo-seed0"].dir == p.grids["apo"]["lr0.001"].dir  # the grid's run, not another
    assert p.trains["apo-seed1"].settings == {**p.trains["apo-seed0"].settings, "seed": 1}
    assert {label for label, _ in p.evals} == {"reference", "apo-seed0", "apo-seed1"}
    with pytest.raises(ValueError, match="not in its grid"):
        p.add_pick("apo", {"lr": 5e-4})


def _runs(tmp_path, finals):
    runs = []
    for i, (label, curve) in enumerate(finals.items()):
        d = tmp_path / label
        d.mkdir()
        pd.DataFrame({"step": range(len(curve)), "train_time_s": [10.0 * s for s in range(len(curve))],
                      "accuracy": curve}).to_parquet(d / "validation.parquet")
        runs.append({"label": label, "combo": {"lr": [1e-4, 3e-4, 1e-3][i]}, "dir": str(d)})
    return runs


def test_pick_is_the_best_final_validation_accuracy(tmp_path):
    runs = _runs(tmp_path, {"lr0.0001": [0.4, 0.5, 0.6], "lr0.0003": [0.4, 0.9, 0.7],  # best on the way, not at the end
                            "lr0.001": [0.4, 0.6, 0.75]})
    got = sweep.pick(runs)
    assert got["label"] == "lr0.001" and got["picked"] == {"lr": 1e-3}
    assert [r["final_accuracy"] for r in got["runs"]] == [0.6, 0.7, 0.75]


def test_a_tie_goes_to_the_first_in_grid_order(tmp_path):
    got = sweep.pick(_runs(tmp_path, {"a": [0.1, 0.5], "b": [0.2, 0.5], "c": [0.3, 0.4]}))
    assert got["label"] == "a"


def test_a_sweep_needs_a_held_out_validation_set(demo_config):
    demo_config["train"]["lr"] = LRS
    cfg = dict(demo_config, data={**demo_config["data"], "validation": None})
    with pytest.raises(ConfigError, match="'train.lr' lists several values.*set data.validation"):
        validate_config(cfg, SCHEMA)
    cfg = dict(demo_config, data={**demo_config["data"], "validation_on_benchmark": True})
    with pytest.raises(ConfigError, match="the pick would be made on test problems"):
        validate_config(cfg, SCHEMA)


def test_listed_values_given_on_the_command_line_are_numbers(demo_config):
    demo_config["train"]["lr"] = ["1e-4", "3e-4"]  # YAML reads 1e-4 without a dot as a string
    assert validate_config(demo_config, SCHEMA)["train"]["lr"] == [1e-4, 3e-4]
