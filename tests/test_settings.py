"""Content addresses: exactly the settings a stage reads, plus its inputs' addresses."""

import copy

from apo.config import validate_config
from apo.settings import Plan, digest
from conftest import SCHEMA


def plan(cfg, **changes) -> Plan:
    cfg = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node = cfg
        *head, last = dotted.split("__")
        for part in head:
            node = node[part]
        node[last] = value
    return Plan(validate_config(cfg, SCHEMA))


def stage_dirs(p: Plan) -> dict:
    return {
        "demo": p.demo.dir, "data": p.train_data.dir, "sample": p.sample.dir, "vstar": p.vstar.dir,
        "train": p.train.dir, **{f"eval:{k[0]}:{k[1]}": s.dir for k, s in p.evals.items()},
    }


def changed(a: Plan, b: Plan) -> set:
    da, db = stage_dirs(a), stage_dirs(b)
    return {k for k in da if da[k] != db[k]}


def test_digest_is_canonical():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 1.5})


def test_same_config_same_addresses(demo_config):
    assert stage_dirs(plan(demo_config)) == stage_dirs(plan(demo_config))


def test_spelled_out_default_does_not_change_addresses(demo_config):
    assert stage_dirs(plan(demo_config)) == stage_dirs(plan(demo_config, train__weight_decay=0.0))


def test_training_setting_moves_only_training_and_its_evaluation(demo_config):
    base = plan(demo_config)
    assert changed(base, plan(demo_config, train__beta2=0.5)) == {"train", "eval:apo:demo_test"}


def test_reference_sample_count_moves_sampling_and_downstream(demo_config):
    base = plan(demo_config)
    assert changed(base, plan(demo_config, sample__n=4)) == {
        "sample", "vstar", "train", "eval:apo:demo_test"}


def test_experiment_name_and_runtime_knobs_are_not_part_of_any_address(demo_config):
    base = plan(demo_config)
    other = plan(demo_config, experiment="other", generation__batch_size=7, grading__workers=1)
    assert changed(base, other) == set()


def test_demo_setting_moves_everything(demo_config):
    assert changed(plan(demo_config), plan(demo_config, demo__seed=1)) == set(stage_dirs(plan(demo_config)))


def test_manifest_records_settings_and_inputs(demo_config):
    p = plan(demo_config)
    m = p.vstar.manifest()
    assert m["settings"] == {"beta1": demo_config["vstar"]["beta1"], "filter": "keep_all"}
    assert m["inputs"] == {"samples": f"sample/{p.sample.hash}"}
    assert m["hash"] == p.vstar.hash and "apo_version" in m


def test_hub_model_is_an_external_input(demo_config):
    p = plan(demo_config, model="Qwen/Qwen2.5-1.5B")
    assert p.train.manifest()["inputs"]["model"] == "external:Qwen/Qwen2.5-1.5B"
    assert p.demo is not None  # the demo datasets still need the demo stage
