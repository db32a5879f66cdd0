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
        **{f"train:{k}": t.dir for k, t in p.trains.items()}, **{f"eval:{k[0]}:{k[1]}": s.dir for k, s in p.evals.items()},
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
    assert changed(base, plan(demo_config, train__beta2=0.5)) == {"train:apo", "eval:apo:demo_test"}


def test_reference_sample_count_moves_sampling_and_downstream(demo_config):
    base = plan(demo_config)
    assert changed(base, plan(demo_config, sample__n=4)) == {
        "sample", "vstar", "train:apo", "eval:apo:demo_test"}


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
    assert p.trains["apo"].manifest()["inputs"]["model"] == "external:Qwen/Qwen2.5-1.5B"
    assert p.demo is not None  # the demo datasets still need the demo stage


def test_methods_and_seeds_share_data_and_reference_samples(demo_config):
    p = plan(demo_config, methods=["apo", "grpo", "rebel", "ppo"], seeds=[0, 1])
    assert sorted(p.trains) == [f"{m}-seed{s}" for m in ["apo", "grpo", "ppo", "rebel"] for s in (0, 1)]
    assert len({t.hash for t in p.trains.values()}) == 8
    for label, t in p.trains.items():
        assert t.inputs["prompts"] is p.train_data
        # only A*-PO reads V* (and so the reference samples); the baselines do not
        assert ("vstar" in t.inputs) == label.startswith("apo")
        assert ("beta2" in t.settings) == label.startswith("apo")
        for method in ("grpo", "rebel", "ppo"):  # each reads its own block only
            assert (method in t.settings) == label.startswith(method)
    assert len(p.evals) == 9  # reference + 8 trained models, one benchmark


def test_adding_a_baseline_keeps_the_apo_addresses(demo_config):
    base, more = plan(demo_config), plan(demo_config, methods=["apo", "grpo"])
    assert more.trains["apo"].dir == base.trains["apo"].dir
    # a GRPO setting does not move the A*-PO run
    assert plan(demo_config, train__grpo={"group_size": 4}).trains["apo"].dir == base.trains["apo"].dir
    assert plan(demo_config, train__ppo={"critic_lr": 1e-3}).trains["apo"].dir == base.trains["apo"].dir


TABLE = {"path": "Cornell-AGI/math_size_qwen2.5_1.5b_eval", "prompt_field": "extra_info.question",
         "reward_fields": [f"eval_{i}" for i in range(8)]}


def test_published_table_replaces_sampling(demo_config):
    p = plan(demo_config, vstar__source="table", vstar__table=TABLE, prompt__template="raw")
    assert p.sample is None and p.hashes("sample") == []
    m = p.vstar.manifest()
    assert m["inputs"] == {"table": f"external:{TABLE['path']}", "prompts": f"data/{p.train_data.hash}"}
    assert m["settings"]["table"]["prompt_field"] == "extra_info.question"
    assert p.trains["apo"].inputs["vstar"] is p.vstar


def test_table_settings_are_part_of_the_vstar_address(demo_config):
    base = plan(demo_config, vstar__source="table", vstar__table=TABLE, prompt__template="raw")
    other = plan(demo_config, vstar__source="table", vstar__table={**TABLE, "split": "test"}, prompt__template="raw")
    assert base.vstar.hash != other.vstar.hash
    assert base.trains["apo"].hash != other.trains["apo"].hash


def test_sampling_vstar_address_ignores_an_unused_table(demo_config):
    assert plan(demo_config).vstar.hash == plan(demo_config, vstar__table=TABLE).vstar.hash


def test_resources_and_gradient_checkpointing_are_not_part_of_any_address(demo_config):
    other = plan(demo_config, resources={"train": {"gpu": 4, "mem_mb": 64000}}, train__gradient_checkpointing=True)
    assert changed(plan(demo_config), other) == set()


def test_training_compute_dtype_moves_only_training_and_its_evaluation(demo_config):
    assert changed(plan(demo_config), plan(demo_config, train__compute_dtype="bfloat16")) == {"train:apo", "eval:apo:demo_test"}


def test_a_registered_method_is_planned_with_its_own_settings_only(demo_config, monkeypatch):
    """Adding a method is one registry entry: config validation, the plan and its address read
    the registry (here a copy of A*-PO under another name, reading train.grpo instead of beta2)."""
    import dataclasses

    from apo import methods

    twin = dataclasses.replace(methods.METHODS["apo"], name="apo_twin", settings=("grpo",))
    monkeypatch.setitem(methods.METHODS, "apo_twin", twin)
    p = plan(demo_config, methods=["apo", "apo_twin"])
    assert set(p.trains) == {"apo", "apo_twin"}
    settings = p.trains["apo_twin"].settings
    assert "grpo" in settings and "beta2" not in settings and settings["method"] == "apo_twin"
    assert p.trains["apo_twin"].inputs["vstar"] is p.vstar  # reads_vstar, as A*-PO


def test_validation_set_and_settings_are_part_of_the_training_address(demo_config):
    base = plan(demo_config)
    assert base.trains["apo"].inputs["validation"] is base.validation
    assert base.validation.settings["split"] == "valid"
    for change in [{"train__validate_every": 25}, {"train__validation": {"temperature": 1.0, "k": 4}},
                   {"data__validation": {**demo_config["data"]["validation"], "limit": 64}}]:
        assert changed(base, plan(demo_config, **change)) == {"train:apo", "eval:apo:demo_test"}, change
    # spelling out the default length (the training length) keeps the address
    same = plan(demo_config, train__validation={"max_new_tokens": demo_config["train"]["max_new_tokens"]})
    assert changed(base, same) == set()


def test_without_a_validation_set_its_settings_are_not_read(demo_config):
    del demo_config["data"]["validation"]
    base = plan(demo_config)
    assert base.validation is None and "validation" not in base.trains["apo"].inputs
    assert "validate_every" not in base.trains["apo"].settings
    assert changed(base, plan(demo_config, train__validate_every=7)) == set()
