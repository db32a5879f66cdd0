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
    p = plan(demo_config, vstar__source="table", vstar__table=TABLE)
    assert p.sample is None and p.hashes("sample") == []
    m = p.vstar.manifest()
    assert m["inputs"] == {"table": f"external:{TABLE['path']}", "prompts": f"data/{p.train_data.hash}"}
    assert m["settings"]["table"]["prompt_field"] == "extra_info.question"
    assert p.trains["apo"].inputs["vstar"] is p.vstar


def test_table_settings_are_part_of_the_vstar_address(demo_config):
    base = plan(demo_config, vstar__source="table", vstar__table=TABLE)
    other = plan(demo_config, vstar__source="table", vstar__table={**TABLE, "split": "test"})
    assert base.vstar.hash != other.vstar.hash
    assert base.trains["apo"].hash != other.trains["apo"].hash


def test_sampling_vstar_address_ignores_an_unused_table(demo_config):
    assert plan(demo_config).vstar.hash == plan(demo_config, vstar__table=TABLE).vstar.hash


def test_resources_and_gradient_checkpointing_are_not_part_of_any_address(demo_config):
    other = plan(demo_config, resources={"train": {"gpu": 4, "mem_mb": 64000}}, train__gradient_checkpointing=True)
    assert changed(plan(demo_config), other) == set()


def test_training_dtype_moves_only_training_and_its_evaluation(demo_config):
    assert changed(plan(demo_config), plan(demo_config, train__dtype="bfloat16")) == {"train:apo", "eval:apo:demo_test"}


def test_grading_method_moves_every_stage_that_grades(demo_config):
    # The data stage's gold check depends on the method too.
    assert changed(plan(demo_config), plan(demo_config, grading__method="gsm8k_strict")) == (
        set(stage_dirs(plan(demo_config))) - {"demo"}
    )


def test_a_benchmarks_own_evaluation_settings_move_only_its_evaluations(demo_config):
    cfg = copy.deepcopy(demo_config)
    second = {**cfg["data"]["benchmarks"][0], "name": "second"}
    cfg["data"]["benchmarks"].append(second)
    base = Plan(validate_config(cfg, SCHEMA))
    second["evaluate"] = {"k": 32, "temperature": 0.6, "top_p": 0.95}
    other = Plan(validate_config(cfg, SCHEMA))
    moved = {key for key in base.evals if base.evals[key].dir != other.evals[key].dir}
    assert moved == {(label, "second") for label in base.models}
    assert other.benchmarks["second"].dir == base.benchmarks["second"].dir  # same prompts file
    settings = other.evals["reference", "second"].settings
    assert (settings["k"], settings["temperature"], settings["top_p"]) == (32, 0.6, 0.95)
    assert settings["max_new_tokens"] == cfg["evaluate"]["max_new_tokens"]  # the global default
    assert other.evals["reference", cfg["data"]["benchmarks"][0]["name"]].settings["k"] == cfg["evaluate"]["k"]
