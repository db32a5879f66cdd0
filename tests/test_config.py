"""Config validation: defaults filled, bad values and unknown keys named."""

import pytest
import yaml

from apo.config import ConfigError, load_config, validate_config
from conftest import ROOT, SCHEMA


def test_demo_config_is_valid_and_gets_defaults(demo_config):
    cfg = validate_config(demo_config, SCHEMA)
    assert cfg["train"]["weight_decay"] == 0.0  # a default
    assert cfg["data"]["train"]["answer_format"] == "plain"  # default inside a $ref'd dataset
    assert cfg["data"]["benchmarks"][0]["limit"] is None
    assert cfg["train"]["collapse"]["window"] == 20  # nested default


@pytest.mark.parametrize("config_file", sorted(set((ROOT / "config").rglob("*.yaml")) - {ROOT / "config/benchmarks/catalog.yaml"}))
def test_shipped_configs_are_valid(config_file):
    validate_config(yaml.safe_load(config_file.read_text()), SCHEMA)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("train", "lr"), "fast", "config key 'train.lr': 'fast' is not of type 'number'"),
        (("train", "beta2"), -1, "config key 'train.beta2'"),
        (("sample", "n"), 0, "config key 'sample.n'"),
        (("vstar", "beta1"), -0.5, "config key 'vstar.beta1'"),
        (("generation", "backend"), "tgi", "config key 'generation.backend'"),
        (("generation", "vllm"), {"gpu_memory_utilization": 1.5}, "config key 'generation.vllm.gpu_memory_utilization'"),
        (("evaluate", "shards"), 0, "config key 'evaluate.shards'"),
        (("train", "lernrate"), 1.0, "unknown config key 'train.lernrate'"),
        (("data", "benchmarks"), [], "config key 'data.benchmarks'"),
        (("experiment",), "train", "config key 'experiment'"),
        (("train", "dtype"), "float16", "config key 'train.dtype'"),
        (("resources",), {"train": {"gpu": -1}}, "config key 'resources.train.gpu'"),
        (("resources",), {"trian": {"gpu": 1}}, "unknown config key 'resources.trian'"),
        (("vstar", "source"), "table", "config key 'vstar.table' is required"),
        (("vstar", "table"), {"split": "train"}, "config key 'vstar.table'"),
    ],
)
def test_bad_values_name_the_key(demo_config, path, value, message):
    node = demo_config
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        validate_config(demo_config, SCHEMA, source="my.yaml")
    assert message in str(err.value)
    assert "my.yaml" in str(err.value)


def test_unknown_top_level_key(demo_config):
    demo_config["trian"] = {}
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        validate_config(demo_config, SCHEMA)


def test_benchmark_without_name_is_rejected(demo_config):
    del demo_config["data"]["benchmarks"][0]["name"]
    with pytest.raises(ConfigError, match=r"data.benchmarks\[0\]"):
        validate_config(demo_config, SCHEMA)


def test_micro_batch_must_divide_batch(demo_config):
    demo_config["train"]["batch_size"] = 10
    demo_config["train"]["micro_batch_size"] = 4
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate_config(demo_config, SCHEMA)


def test_command_line_strings_are_coerced_to_the_schema_types(demo_config):
    # `snakemake --config train="{beta2: 0.3}"` delivers nested values as strings
    demo_config["train"].update({"beta2": "0.3", "steps": "7", "stop_on_collapse": "true", "lr": "1e-4"})
    cfg = validate_config(demo_config, SCHEMA)
    assert cfg["train"]["beta2"] == 0.3 and cfg["train"]["steps"] == 7
    assert cfg["train"]["stop_on_collapse"] is True and cfg["train"]["lr"] == 1e-4


@pytest.mark.parametrize("table, message", [
    ({"path": "t.parquet", "reward_fields": ["eval_0"]}, "exactly one of 'id_field' and 'prompt_field'"),
    ({"path": "t.parquet", "id_field": "i", "prompt_field": "q", "reward_fields": ["r"]}, "'id_field' and 'prompt_field'"),
    ({"path": "t.parquet", "id_field": "i"}, "exactly one of 'reward_fields' and 'reward_list_field'"),
])
def test_vstar_table_needs_one_join_key_and_one_reward_layout(demo_config, table, message):
    demo_config["vstar"].update(source="table", table=table)
    with pytest.raises(ConfigError, match="config key 'vstar.table'") as err:
        validate_config(demo_config, SCHEMA)
    assert message in str(err.value)


def test_resources_give_gpus_to_sampling_training_and_evaluation_only(demo_config):
    cfg = validate_config(demo_config, SCHEMA)
    r = cfg["resources"]
    assert set(r) == {"demo_model", "data", "sample", "vstar", "train", "evaluate"}
    assert {k: v["gpu"] for k, v in r.items()} == {
        "demo_model": 0, "data": 0, "sample": 1, "vstar": 0, "train": 1, "evaluate": 1}
    assert r["train"]["distributed"] == "ddp"
    demo_config["resources"] = {"sample": {"gpu": 2}}  # a partial block: the rest from the generic defaults
    assert validate_config(demo_config, SCHEMA)["resources"]["sample"] == {
        "gpu": 2, "mem_mb": 4000, "runtime": 60, "cpus_per_task": 2}


@pytest.mark.parametrize("config_file", sorted((ROOT / "config" / "paper").glob("*.yaml")) + [ROOT / "config/compare.yaml"],
                         ids=lambda p: p.name)
def test_configs_do_not_inherit_demo_settings(config_file):
    """`snakemake --configfile X` merges X over config/config.yaml (nested keys extended), so
    every key the demo sets must be spelled out in X: the merged config is X's own."""
    from snakemake.utils import update_config

    own = yaml.safe_load(config_file.read_text())
    merged = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(merged, own)
    a, b = validate_config(merged, SCHEMA), validate_config(own, SCHEMA)
    if own["model"] != "demo":
        a.pop("demo"), b.pop("demo")  # unused without the demo model
    assert a == b


def test_backend_auto_resolves_to_the_installed_engine(demo_config):
    """Stage addresses must name the engine that samples, never 'auto'."""
    from apo.config import vllm_available

    demo_config["generation"]["backend"] = "auto"
    assert validate_config(demo_config, SCHEMA)["generation"]["backend"] == ("vllm" if vllm_available() else "hf")
    demo_config["generation"]["backend"] = "hf"
    assert validate_config(demo_config, SCHEMA)["generation"]["backend"] == "hf"


def test_gsm8k_paper_config_grades_as_the_authors_did():
    cfg = load_config(ROOT / "config" / "paper" / "gsm8k-qwen2.5-1.5b.yaml")
    assert cfg["grading"]["method"] == "gsm8k_strict"
    assert cfg["prompt"]["instruction"] == "Let's think step by step and output the final answer after \"####\"."


def test_evaluation_settings_belong_to_benchmarks(demo_config):
    demo_config["data"]["train"]["evaluate"] = {"k": 2}
    with pytest.raises(ConfigError, match="data.train.evaluate"):
        validate_config(demo_config, SCHEMA)


def test_paper_configs_report_amc23_as_avg_at_32():
    for name in ("qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"):
        cfg = load_config(ROOT / "config" / "paper" / f"{name}.yaml")
        amc = next(b for b in cfg["data"]["benchmarks"] if b["name"] == "amc23")
        assert amc["evaluate"]["k"] == 32, name
