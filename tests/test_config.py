"""Config validation: defaults filled, bad values and unknown keys named."""

from pathlib import Path

import pytest
import yaml

from apo.config import ConfigError, load_yaml, validate_config
from conftest import ROOT, SCHEMA


def load_config(path: Path) -> dict:
    """A shipped config file, validated with its `extends` base (paths from the repository)."""
    return validate_config(load_yaml(path), source=str(path), base_dir=ROOT)


def test_demo_config_is_valid_and_gets_defaults(demo_config):
    cfg = validate_config(demo_config, SCHEMA)
    assert cfg["train"]["weight_decay"] == 0.0  # a default
    assert cfg["data"]["train"]["answer_format"] == "plain"  # default inside a $ref'd dataset
    assert cfg["data"]["benchmarks"][0]["limit"] is None
    assert cfg["train"]["collapse"]["window"] == 20  # nested default


SHIPPED = sorted(p for p in (ROOT / "config").rglob("*.yaml") if p.parent.name not in ("benchmarks", "base"))


@pytest.mark.parametrize("config_file", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_are_valid(config_file):
    """... read as the workflow reads them: a key given twice is an error."""
    validate_config(load_yaml(config_file), SCHEMA)


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
        (("train", "dtype"), "bfloat16", "unknown config key 'train.dtype'"),
        (("train", "compute_dtype"), "float16", "config key 'train.compute_dtype'"),
        (("train", "loss_agg"), "sum", "config key 'train.loss_agg'"),
        (("methods",), ["apo", "dpo"], "config key 'methods': unknown method(s) ['dpo']"),
        (("prompt", "template"), "alpaca", "config key 'prompt.template'"),
        (("experiment",), "..", "config key 'experiment'"),
        (("experiment",), ".hidden", "config key 'experiment'"),
        (("experiment",), "smoke\n", "config key 'experiment': 'smoke\\n' is not a name"),
        (("experiment",), "a/b", "config key 'experiment'"),
        (("resources",), {"train": {"gpu": -1}}, "config key 'resources.train.gpu'"),
        (("resources",), {"trian": {"gpu": 1}}, "unknown config key 'resources.trian'"),
        (("vstar", "source"), "table", "config key 'vstar.table' is required"),
        (("vstar", "table"), {"split": "train"}, "config key 'vstar.table'"),
        (("train", "gspo"), {"ratio": "response"}, "config key 'train.gspo.ratio'"),
        (("train", "dapo"), {"loss_agg": "seq_sum"}, "config key 'train.dapo.loss_agg'"),
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


def test_mini_batch_must_divide_batch_and_be_divided_by_micro_batch(demo_config):
    demo_config["train"].update(batch_size=64, mini_batch_size=24, micro_batch_size=8)
    with pytest.raises(ConfigError, match=r"'train.batch_size' \(64\) must be a multiple of 'train.mini_batch_size' \(24\)"):
        validate_config(demo_config, SCHEMA)
    demo_config["train"].update(mini_batch_size=32, micro_batch_size=12)
    with pytest.raises(ConfigError, match=r"'train.mini_batch_size' \(32\) must be a multiple of 'train.micro_batch_size' \(12\)"):
        validate_config(demo_config, SCHEMA)


def test_published_vstar_table_needs_raw_prompts(demo_config):
    """The authors sampled their stage-1 table from raw prompts; joining its V* to chat-formatted
    prompts would pair each value with another input."""
    table = {"path": "t.parquet", "prompt_field": "q", "reward_fields": ["eval_0"]}
    demo_config["vstar"].update(source="table", table=table)
    demo_config["prompt"]["template"] = "chat"
    with pytest.raises(ConfigError, match="'prompt.template' is 'chat'.*set prompt.template: raw"):
        validate_config(demo_config, SCHEMA)
    demo_config["prompt"]["template"] = "raw"
    assert validate_config(demo_config, SCHEMA)["prompt"]["template"] == "raw"


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
    assert set(r) == {"demo", "data", "sample", "vstar", "train", "evaluate"}
    assert {k: v["gpu"] for k, v in r.items()} == {
        "demo": 0, "data": 0, "sample": 1, "vstar": 0, "train": 1, "evaluate": 1}
    assert r["train"]["distributed"] == "ddp"
    demo_config["resources"] = {"sample": {"gpu": 2}}  # a partial block: the rest from the generic defaults
    assert validate_config(demo_config, SCHEMA)["resources"]["sample"] == {
        "gpu": 2, "mem_mb": 4000, "runtime": 60, "cpus_per_task": 2}


def test_extends_puts_a_base_file_under_the_config(tmp_path):
    """`extends: FILE`: the base's keys, the config's own on top (nested mappings merged key by
    key, lists and scalars replaced), then schema defaults; a base may extend another."""
    (tmp_path / "root.yaml").write_text("experiment: root\nmodel: demo\nsample: {n: 4, seed: 3}\n")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "extends": "root.yaml", "data": {
            "train": {"path": "demo", "split": "train", "prompt_field": "q", "answer_field": "a", "limit": 10},
            "benchmarks": [{"name": "b", "path": "demo", "split": "test", "prompt_field": "q", "answer_field": "a"}]},
        "methods": ["apo", "grpo"], "train": {"lr": 1.0e-5, "steps": 7}}))
    own = {"extends": "base.yaml", "experiment": "mine", "sample": {"n": 2}, "methods": ["rebel"],
           "train": {"steps": 9}}
    cfg = validate_config(own, SCHEMA, base_dir=tmp_path)
    assert cfg["experiment"] == "mine" and cfg["model"] == "demo"
    assert cfg["sample"]["n"] == 2 and cfg["sample"]["seed"] == 3  # merged key by key
    assert cfg["methods"] == ["rebel"]  # a list is replaced
    assert cfg["train"]["lr"] == 1.0e-5 and cfg["train"]["steps"] == 9
    assert cfg["data"]["train"]["limit"] == 10 and cfg["train"]["warmup_steps"] == 0  # schema default
    assert "extends" not in cfg


def test_extends_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="config key 'extends': no such file .*nope.yaml"):
        validate_config({"extends": "nope.yaml"}, SCHEMA, base_dir=tmp_path)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        validate_config({"extends": "loop.yaml"}, SCHEMA, base_dir=tmp_path)


def test_backend_auto_resolves_to_the_installed_engine(demo_config):
    """Stage addresses must name the engine that samples, never 'auto'."""
    from apo.config import vllm_available

    demo_config["generation"]["backend"] = "auto"
    assert validate_config(demo_config, SCHEMA)["generation"]["backend"] == ("vllm" if vllm_available() else "hf")
    demo_config["generation"]["backend"] = "hf"
    assert validate_config(demo_config, SCHEMA)["generation"]["backend"] == "hf"


def test_the_training_engine_is_the_generation_engine_unless_named(demo_config, monkeypatch):
    """generation.train_backend: null keeps generation.backend (resolved); a named one (auto
    resolved alike) is what the training stages carry, the other stages keep
    generation.backend."""
    import apo.config

    monkeypatch.setattr(apo.config, "vllm_available", lambda: True)
    demo_config["generation"].update(backend="auto", train_backend=None)
    assert validate_config(demo_config, SCHEMA)["generation"]["train_backend"] == "vllm"
    demo_config["generation"].update(backend="auto", train_backend="hf")
    gen = validate_config(demo_config, SCHEMA)["generation"]
    assert (gen["backend"], gen["train_backend"]) == ("vllm", "hf")
    monkeypatch.setattr(apo.config, "vllm_available", lambda: False)
    demo_config["generation"].update(backend="hf", train_backend="auto")
    assert validate_config(demo_config, SCHEMA)["generation"]["train_backend"] == "hf"


@pytest.mark.parametrize("path, value", [
    (("grading", "timeout_s"), float("nan")),
    (("vstar", "beta1"), float("nan")),
    (("train", "lr"), float("inf")),
    (("train", "max_grad_norm"), "nan"),  # as `--config` delivers it
    (("evaluate", "temperature"), float("-inf")),
])
def test_non_finite_numbers_are_rejected(demo_config, path, value):
    """NaN compares false with every bound, so the schema alone lets it through."""
    demo_config[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=rf"config key '{'.'.join(path)}': -?(nan|inf) is not a finite number"):
        validate_config(demo_config, SCHEMA)


def test_integral_floats_of_integer_keys_become_ints(demo_config):
    demo_config["sample"]["shards"] = 2.0
    demo_config["train"]["steps"] = "3.0"
    demo_config["data"]["train"]["limit"] = 1e3
    cfg = validate_config(demo_config, SCHEMA)
    assert type(cfg["sample"]["shards"]) is int and cfg["sample"]["shards"] == 2
    assert type(cfg["train"]["steps"]) is int and cfg["train"]["steps"] == 3
    assert type(cfg["data"]["train"]["limit"]) is int
    assert type(cfg["vstar"]["beta1"]) is float  # a number key keeps its float


@pytest.mark.parametrize("path, value", [(("sample", "shards"), 2.5), (("train", "steps"), "3.5")])
def test_non_integral_values_of_integer_keys_are_rejected(demo_config, path, value):
    demo_config[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=rf"config key '{'.'.join(path)}'.*not of type 'integer'"):
        validate_config(demo_config, SCHEMA)


def test_more_shards_than_limited_prompts_is_rejected(demo_config):
    demo_config["data"]["train"]["limit"] = 4
    demo_config["sample"]["shards"] = 5
    with pytest.raises(ConfigError, match=r"'sample.shards' \(5\) is larger than 'data.train.limit' \(4\)"):
        validate_config(demo_config, SCHEMA)
    demo_config["sample"]["shards"] = 1
    demo_config["data"]["benchmarks"][0]["limit"] = 1
    demo_config["evaluate"]["shards"] = 2
    with pytest.raises(ConfigError, match=r"'evaluate.shards' \(2\) is larger than 'data.benchmarks\[0\].limit'"):
        validate_config(demo_config, SCHEMA)


def test_a_shard_without_prompts_is_a_clear_error():
    import pandas as pd

    from apo.sample import shard_rows

    prompts = pd.DataFrame({"id": ["a", "b", "c"]})
    assert [len(shard_rows(prompts, i, 3)) for i in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="p.parquet: 3 prompts cannot fill 4 shards: set config key 'sample.shards' to at most 3"):
        shard_rows(prompts, 3, 4, "p.parquet", "sample.shards")


def test_a_benchmark_name_must_be_a_whole_name(demo_config):
    demo_config["data"]["benchmarks"][0]["name"] = "test\n"
    with pytest.raises(ConfigError, match=r"config key 'data.benchmarks\[0\].name': 'test\\n' is not a name"):
        validate_config(demo_config, SCHEMA)


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


def test_paper_configs_share_one_base():
    """Each paper config names the model and what depends on its size; the recipe lives once,
    in config/paper/base/math.yaml, and no paper file repeats a training setting of it."""
    for path in sorted((ROOT / "config" / "paper").glob("*.yaml")):
        own = yaml.safe_load(path.read_text())
        assert own["extends"] == "config/paper/base/math.yaml", path.name
        # GSM8K's reward has no EOS rule; gradient checkpointing is a memory knob sized per model
        assert set(own.get("train", {})) <= {"steps", "require_eos", "gradient_checkpointing"}, path.name


def test_validation_set_must_not_be_a_benchmark_or_the_training_set(demo_config):
    data = demo_config["data"]
    data["validation"] = {**data["benchmarks"][0], "limit": 50}  # a part of the test set is the test set
    data["validation"].pop("name")
    with pytest.raises(ConfigError, match=r"'data.validation': dataset 'demo' split 'test' is the test set "
                                          r"of benchmark\(s\) \['demo_test'\].*validation_on_benchmark"):
        validate_config(demo_config, SCHEMA, source="my.yaml")
    data["validation_on_benchmark"] = True  # declared (the authors' MATH scripts): allowed
    assert validate_config(demo_config, SCHEMA)["data"]["validation"]["split"] == "test"
    data["validation"] = {**data["train"], "limit": None}
    with pytest.raises(ConfigError, match="'data.validation': .* is the training set"):
        validate_config(demo_config, SCHEMA)


def test_validation_length_defaults_to_the_training_length(demo_config):
    del demo_config["train"]["validation"]  # the demo's samples avg@4; the default is greedy
    cfg = validate_config(demo_config, SCHEMA)
    assert cfg["train"]["validation"] == {"k": 1, "temperature": 0.0, "top_p": 1.0,
                                          "max_new_tokens": demo_config["train"]["max_new_tokens"], "seed": 0}
    assert cfg["data"]["validation"]["split"] == "valid" and cfg["train"]["validate_every"] == 50


# ---------------------------------------------------------------- config mistakes (issue 23)


def test_a_key_given_twice_is_an_error_naming_file_line_and_key(tmp_path):
    """PyYAML keeps the last of two `train:` blocks; every config the project reads refuses it."""
    path = tmp_path / "twice.yaml"
    path.write_text("experiment: x\ntrain:\n  lr: 1.0e-5\nsample: {n: 2}\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml, line 5: key 'train' is given twice .*first at line 2"):
        load_yaml(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train: {lr: 1, lr: 2}\n")
    with pytest.raises(ConfigError, match="line 1: key 'lr' is given twice"):
        load_yaml(nested)
    # an extends base goes through the same loader
    (tmp_path / "own.yaml").write_text("extends: twice.yaml\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        validate_config({"extends": "twice.yaml"}, SCHEMA, base_dir=tmp_path)
    # YAML merge keys override on purpose: not duplicates
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {k: 1, t: 0}\nevaluate:\n  <<: *b\n  k: 2\n")
    assert load_yaml(merged)["evaluate"] == {"k": 2, "t": 0}


def test_extends_of_a_file_that_is_not_a_mapping_names_the_key(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"config key 'extends': .*list.yaml holds a list, not a mapping"):
        validate_config({"extends": "list.yaml"}, SCHEMA, base_dir=tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"evaluate": {"temperature": 0, "k": 4}}, "config key 'evaluate.k' draws 4 samples per prompt at 'evaluate.temperature' 0"),
        ({"train": {"validation": {"k": 2}}}, "config key 'train.validation.k' draws 2 samples per prompt at 'train.validation.temperature' 0"),
        ({"sample": {"temperature": 0.0}}, "config key 'sample.n' draws 8 samples"),
        ({"benchmark_evaluate": {"temperature": 0}}, "config key 'evaluate.k' draws 4 samples per prompt at 'data.benchmarks[0].evaluate.temperature' 0"),
        ({"methods": ["apo", "grpo"], "train": {"temperature": 0}}, "method 'grpo' draws 8 samples per prompt at 'train.temperature' 0"),
    ],
)
def test_greedy_decoding_with_several_samples_is_refused(demo_config, changes, message):
    for section, value in changes.items():
        if section == "benchmark_evaluate":
            demo_config["data"]["benchmarks"][0]["evaluate"] = value
        elif isinstance(value, dict):
            demo_config[section] = {**demo_config.get(section, {}), **value}
        else:
            demo_config[section] = value
    with pytest.raises(ConfigError) as err:
        validate_config(demo_config, SCHEMA)
    assert message in str(err.value)


def test_greedy_decoding_with_one_sample_is_fine(demo_config):
    demo_config["evaluate"] = {**demo_config["evaluate"], "temperature": 0, "k": 1}
    demo_config["train"]["validation"] = {"k": 1}  # greedy by default
    assert validate_config(demo_config, SCHEMA)["train"]["validation"]["temperature"] == 0


@pytest.mark.parametrize("name", ["mlflow.db", "mlflow.db-journal", "x" * 300])
def test_an_experiment_name_the_workflow_owns_or_too_long_is_refused(demo_config, name):
    demo_config["experiment"] = name
    with pytest.raises(ConfigError, match="config key 'experiment'"):
        validate_config(demo_config, SCHEMA)


def test_training_gpus_must_divide_the_mini_batch(demo_config):
    demo_config["resources"] = {"train": {"gpu": 3}}  # batch 64, micro-batch 32
    with pytest.raises(ConfigError, match=r"config key 'resources.train.gpu' \(3\): 'train.batch_size' \(64\) "
                                          r"must be a multiple of 'train.micro_batch_size' \(32\) x 3 GPUs"):
        validate_config(demo_config, SCHEMA)
    demo_config["resources"] = {"train": {"gpu": 2}}
    assert validate_config(demo_config, SCHEMA)["resources"]["train"]["gpu"] == 2


# ---------------------------------------------------------------- splits of local files (issue 23)


def local_config(demo_config, tmp_path, monkeypatch, **specs):
    """The demo config with local files for some prompt sets, paths from `tmp_path`."""
    monkeypatch.chdir(tmp_path)
    base = {"prompt_field": "q", "answer_field": "a"}
    for key, spec in specs.items():
        if key == "validation":
            demo_config["data"]["validation"] = {**base, **spec}
        elif key == "benchmark":
            demo_config["data"]["benchmarks"] = [{"name": "b", **base, **spec}]
        else:
            demo_config["data"]["train"] = {**base, **spec}
    return demo_config


def test_a_local_file_gives_only_the_split_it_can_honour(demo_config, tmp_path, monkeypatch):
    (tmp_path / "t.jsonl").write_text('{"q": "x", "a": "1"}\n')
    cfg = local_config(demo_config, tmp_path, monkeypatch, benchmark={"path": "t.jsonl", "split": "test"})
    with pytest.raises(ConfigError, match=r"config key 'data.benchmarks\[0\].split': t.jsonl is one file, read "
                                          r"whole as split 'train', so split 'test' cannot be honoured"):
        validate_config(cfg, SCHEMA)
    cfg["data"]["benchmarks"][0]["split"] = "train"  # the file read whole
    validate_config(cfg, SCHEMA)
    cfg["data"]["benchmarks"][0].update(split="test", split_field="part")  # its rows of one split
    validate_config(cfg, SCHEMA)
    cfg["data"]["benchmarks"][0].update(path="{split}.jsonl", split_field=None)  # one file per split
    validate_config(cfg, SCHEMA)
    cfg["data"]["benchmarks"][0]["split_field"] = "part"
    with pytest.raises(ConfigError, match=r"'data.benchmarks\[0\].split_field'"):
        validate_config(cfg, SCHEMA)


def test_one_file_spelled_two_ways_is_one_data_set(demo_config, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text('{"q": "x", "a": "1"}\n')
    cfg = local_config(demo_config, tmp_path, monkeypatch, benchmark={"path": "data/t.jsonl", "split": "train"},
                       validation={"path": "./data/t.jsonl", "split": "train"})
    with pytest.raises(ConfigError, match=r"'data.validation': dataset './data/t.jsonl' split 'train' is the test "
                                          r"set of benchmark\(s\) \['b'\]"):
        validate_config(cfg, SCHEMA)
    # the same file by {split}: data/{split}.jsonl at split t is data/t.jsonl
    cfg["data"]["validation"] = None
    cfg["data"]["train"] = {"path": "data/{split}.jsonl", "split": "t", "prompt_field": "q", "answer_field": "a"}
    with pytest.raises(ConfigError, match=r"'data.train': dataset 'data/t.jsonl' split 't' is the test set of "
                                          r"benchmark\(s\) \['b'\]"):
        validate_config(cfg, SCHEMA)
    # a split column selects different rows of one file
    cfg["data"]["train"] = {"path": "data/t.jsonl", "split": "train", "split_field": "part", "prompt_field": "q",
                            "answer_field": "a"}
    cfg["data"]["benchmarks"][0].update(split="test", split_field="part")
    validate_config(cfg, SCHEMA)


def test_training_on_a_benchmark_is_refused(demo_config):
    demo_config["data"]["train"] = {**demo_config["data"]["benchmarks"][0], "limit": 64}
    demo_config["data"]["train"].pop("name")
    with pytest.raises(ConfigError, match=r"'data.train': dataset 'demo' split 'test' is the test set of "
                                          r"benchmark\(s\) \['demo_test'\]"):
        validate_config(demo_config, SCHEMA)


def test_a_local_stage_one_table_gives_only_the_split_it_can_honour(demo_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.parquet").write_bytes(b"x")
    demo_config["prompt"] = {**demo_config["prompt"], "template": "raw"}
    demo_config["vstar"] = {"source": "table", "table": {"path": "table.parquet", "split": "test", "id_field": "id",
                                                         "reward_fields": ["r"]}}
    with pytest.raises(ConfigError, match=r"config key 'vstar.table.split': table.parquet is one file"):
        validate_config(demo_config, SCHEMA)
    demo_config["vstar"]["table"]["split"] = "train"
    validate_config(demo_config, SCHEMA)

def test_a_sharded_multi_gpu_job_needs_the_vllm_engine_at_plan_time(demo_config, monkeypatch):
    """`auto` is resolved where the workflow is planned: a login node without vLLM resolves
    it to hf, with which no sharded 4-GPU training job can sample. That is a config error,
    before any job starts, and it names the key and the fix."""
    import apo.config

    demo_config["resources"] = {"train": {"gpu": 4, "distributed": "fsdp"}}
    demo_config["train"]["micro_batch_size"] = 16  # the demo's batch of 64 in whole micro-batches on 4 GPUs
    monkeypatch.setattr(apo.config, "vllm_available", lambda: False)
    demo_config["generation"].update(backend="auto", train_backend=None)
    with pytest.raises(ConfigError, match=r"'generation.backend': generation.backend is auto, which resolves "
                                          r"to hf on this host .* set generation.backend: vllm"):
        validate_config(demo_config, SCHEMA)
    demo_config["generation"]["backend"] = "hf"
    with pytest.raises(ConfigError, match="shards training over 4 GPUs"):
        validate_config(demo_config, SCHEMA)
    demo_config["generation"]["backend"] = "vllm"  # named: every job uses it (or fails naming it)
    assert validate_config(demo_config, SCHEMA)["generation"]["backend"] == "vllm"
    demo_config["resources"] = {"train": {"gpu": 1, "distributed": "fsdp"}}  # one process shards nothing
    demo_config["generation"]["backend"] = "auto"
    assert validate_config(demo_config, SCHEMA)["generation"]["backend"] == "hf"
    demo_config["resources"] = {"train": {"gpu": 4, "distributed": "fsdp"}}
    demo_config["generation"].update(backend="vllm", train_backend="hf")  # the training engine is what counts
    with pytest.raises(ConfigError, match=r"'generation.train_backend': generation.train_backend is hf, .* set "
                                          r"generation.train_backend: vllm"):
        validate_config(demo_config, SCHEMA)


@pytest.mark.parametrize("config_file", sorted((ROOT / "config" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_configs_name_the_engine_their_jobs_need(config_file, monkeypatch):
    import apo.config

    monkeypatch.setattr(apo.config, "vllm_available", lambda: False)  # a login node without vLLM
    assert load_config(config_file)["generation"]["backend"] == "vllm"


def test_a_config_that_asks_to_be_evaluated_as_code_is_refused(demo_config, tmp_path):
    with pytest.raises(ConfigError, match=r"config key '__use_yte__': a config file is data"):
        validate_config({**demo_config, "__use_yte__": True}, SCHEMA)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"__use_yte__": True, "experiment": "x"}))
    with pytest.raises(ConfigError, match=rf"invalid {tmp_path / 'base.yaml'}: config key '__use_yte__'"):
        validate_config({**demo_config, "extends": "base.yaml"}, SCHEMA, base_dir=tmp_path)


def test_dapo_overlong_buffer_must_be_shorter_than_the_length_limit(demo_config):
    demo_config["methods"] = ["apo", "dapo"]
    demo_config["train"]["dapo"] = {"overlong_buffer": 80}
    with pytest.raises(ConfigError, match=r"'train.dapo.overlong_buffer' \(80\) must be shorter than "
                                          r"'train.max_new_tokens' \(80\)"):
        validate_config(demo_config, SCHEMA, source="my.yaml")
    demo_config["train"]["dapo"] = {"overlong_buffer": 16}
    assert validate_config(demo_config, SCHEMA)["train"]["dapo"]["clip_eps_high"] == 0.28  # the recipe's default
