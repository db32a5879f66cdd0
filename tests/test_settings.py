"""Content addresses: exactly the settings a stage reads, plus its inputs' addresses."""

import copy
import json

import pytest

from apo.config import validate_config
from apo.settings import STAGES, Plan, digest
from conftest import ROOT, SCHEMA


def configured(cfg, **changes) -> dict:
    """`cfg` with `a__b=value` changes, validated."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node = cfg
        *head, last = dotted.split("__")
        for part in head:
            node = node[part]
        node[last] = value
    return validate_config(cfg, SCHEMA)


def plan(cfg, **changes) -> Plan:
    return Plan(configured(cfg, **changes))


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


def test_the_training_engine_moves_only_training_and_its_evaluation(demo_config):
    """generation.train_backend is read by the training stages alone: reference sampling and
    the evaluations keep generation.backend."""
    base = plan(demo_config, generation__backend="vllm", generation__train_backend="hf")
    assert base.trains["apo"].settings["backend"] == "hf"
    assert base.sample.settings["backend"] == base.evals["reference", "demo_test"].settings["backend"] == "vllm"
    moved = plan(demo_config, generation__backend="vllm", generation__train_backend=None)
    assert moved.trains["apo"].settings["backend"] == "vllm"
    assert changed(base, moved) == {"train:apo", "eval:apo:demo_test"}


def test_measure_kl_is_in_the_address_only_where_it_changes_the_run(demo_config):
    """A*-PO's loss reads the reference, so the KL is measured whatever train.measure_kl says:
    the key stays out of its address (and out of every run planned before the key existed)."""
    base = plan(demo_config, methods=["apo", "grpo"])
    assert "measure_kl" not in base.trains["apo"].settings and "measure_kl" in base.trains["grpo"].settings
    assert changed(base, plan(demo_config, methods=["apo", "grpo"], train__measure_kl=False)) == {
        "train:grpo", "eval:grpo:demo_test"}


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
    assert p.sample is None and not any(kind == "sample" for kind, _ in p.stages)
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
    other = plan(demo_config, resources={"train": {"gpu": 2, "mem_mb": 64000}}, train__gradient_checkpointing=True)
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



def local_plan(cfg, results, **changes) -> Plan:
    p = plan(cfg, **changes)
    return Plan(p.config, str(results))


def test_a_local_model_is_addressed_by_its_content(demo_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "my-model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "tokenizer.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\0" * 100)
    base = local_plan(demo_config, "results", model="./my-model")
    assert base.trains["apo"].manifest()["inputs"]["model"].startswith("local:sha256:")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")  # dot-files are not the model
    assert stage_dirs(local_plan(demo_config, "results", model="./my-model")) == stage_dirs(base)
    (model / "sub" / "weights.bin").write_bytes(b"\1" + b"\0" * 99)
    moved = changed(base, local_plan(demo_config, "results", model="./my-model"))
    assert moved == set(stage_dirs(base)) - {"demo"}  # the demo datasets do not read the model


def test_file_digests_are_cached_by_size_and_mtime(demo_config, tmp_path, monkeypatch):
    """A large model is not read again at every plan: an unchanged (size, mtime) reuses the
    recorded digest; a changed mtime reads the file again."""
    import json
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    weights = tmp_path / "m" / "w.bin"
    weights.write_bytes(b"abc")
    first = local_plan(demo_config, "results", model="./m").trains["apo"].hash
    cache_file = tmp_path / "results" / ".content-digests.json"
    cache = json.loads(cache_file.read_text())
    cache[str(weights)][2] = "0" * 64  # what a re-read could never produce
    cache_file.write_text(json.dumps(cache))
    assert local_plan(demo_config, "results", model="./m").trains["apo"].hash != first  # the cached digest was used
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert local_plan(demo_config, "results", model="./m").trains["apo"].hash == first  # read again


def test_a_digest_cache_that_cannot_be_written_is_skipped_with_a_warning(demo_config, tmp_path, monkeypatch):
    """`snakemake -n` on a read-only results/ plans as usual (a read-only directory refuses
    the cache's temporary file, as simulated here: the tests run as root, which writes
    anyway)."""
    import errno
    import tempfile

    import pytest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"abc")
    (tmp_path / "m" / "config.json").write_text("{}")  # what planning asks of a local model
    (tmp_path / "m" / "tokenizer.json").write_text("{}")

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "results"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.warns(UserWarning, match=r"results/.content-digests.json: the content digest cache cannot be "
                                             r"written \(\[Errno 13\] Permission denied"):
            planned = local_plan(demo_config, "results", model="./m").trains["apo"].hash
    assert not (tmp_path / "results" / ".content-digests.json").exists()
    assert planned == local_plan(demo_config, "results", model="./m").trains["apo"].hash


def test_a_local_dataset_and_table_are_addressed_by_content(demo_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = demo_config["data"]["train"]
    row = json.dumps({spec["prompt_field"]: "x", spec["answer_field"]: "1", spec.get("id_field") or "id": "0"}) + "\n"
    # (the entry's fields: the plan checks them)
    (tmp_path / "t.jsonl").write_text(row)
    (tmp_path / "table.parquet").write_bytes(b"one")
    table = {"path": "table.parquet", "id_field": "id", "reward_fields": ["r"]}
    cfg = dict(data__train={**demo_config["data"]["train"], "path": "t.jsonl"}, vstar__source="table", vstar__table=table, prompt__template="raw")
    base = local_plan(demo_config, "results", **cfg)
    assert base.train_data.manifest()["inputs"]["source"].startswith("local:sha256:")
    assert base.vstar.manifest()["inputs"]["table"].startswith("local:sha256:")
    (tmp_path / "table.parquet").write_bytes(b"two")
    other = local_plan(demo_config, "results", **cfg)
    assert other.train_data.hash == base.train_data.hash and other.vstar.hash != base.vstar.hash
    (tmp_path / "t.jsonl").write_text(row.replace('"x"', '"y"', 1))
    assert local_plan(demo_config, "results", **cfg).train_data.hash != base.train_data.hash


def test_a_hub_revision_is_part_of_the_address(demo_config):
    hub = plan(demo_config, model="Qwen/Qwen2.5-1.5B")
    pinned = plan(demo_config, model="Qwen/Qwen2.5-1.5B", model_revision="8faed761d45a263340a0528343f099c05c9a4323")
    assert pinned.trains["apo"].manifest()["inputs"]["model"] == "external:Qwen/Qwen2.5-1.5B@8faed761d45a263340a0528343f099c05c9a4323"
    assert changed(hub, pinned) == set(stage_dirs(hub)) - {"demo"}
    table = plan(demo_config, vstar__source="table", vstar__table={**TABLE, "revision": "v1"}, prompt__template="raw")
    assert table.vstar.manifest()["inputs"]["table"] == f"external:{TABLE['path']}@v1"
    assert plan(demo_config, data__train={**demo_config["data"]["train"], "revision": "v1"}).train_data.settings["revision"] == "v1"


def test_the_demo_model_is_addressed_by_the_prompt_instruction(demo_config):
    """Its tokenizer and warm start are trained on prompts that end with the instruction."""
    other = plan(demo_config, prompt__instruction="Answer in \\boxed{}.")
    assert changed(plan(demo_config), other) == set(stage_dirs(other))
    assert other.demo.manifest()["settings"]["instruction"] == "Answer in \\boxed{}."


# Keys that are in no stage's address, on purpose: names, and knobs of speed and placement
# that jobs receive as `--runtime` (common.smk RUNTIME) or as scheduler resources.
UNADDRESSED = (
    "experiment", "data.benchmarks.*.name", "generation.batch_size", "generation.vllm.*",
    "grading.workers", "train.gradient_checkpointing", "tracking_uri", "lock_wait_s", "resources.*", "prefetch",
    "data.validation_on_benchmark",  # a check at validation (and a line in the report), no stage reads it
)


def config_leaves(node, path=()):
    """(dotted path, value) of every setting; list items of objects by index, other lists whole."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from config_leaves(v, (*path, k))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from config_leaves(v, (*path, i))
    else:
        yield path, node


def perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return 7 if value is None else [*value, *value[:1]]


def shipped_configs() -> list[dict]:
    """Every shipped experiment config, and a paper config reading a published stage-1 table
    (so the table's keys are walked too)."""
    import yaml

    files = [ROOT / "config/config.yaml", ROOT / "config/compare.yaml", ROOT / "config/grpo_variants.yaml",
             *sorted((ROOT / "config/paper").glob("*.yaml"))]
    cfgs = [yaml.safe_load(f.read_text()) for f in files]
    table = copy.deepcopy(cfgs[-1])
    table["vstar"] = {"source": "table", "table": {**TABLE, "revision": "main", "subset": "s"}}
    return [*cfgs, table]


def test_every_setting_is_in_an_address_or_declared_unaddressed():
    """Walk every setting of the shipped configs: changing it must move some stage's address,
    unless it is declared in UNADDRESSED. A key read by a job but left out of every address
    (as prompt.instruction was for the demo model) fails here or in test_pipeline's
    test_jobs_receive_settings_only_through_their_manifest."""
    import fnmatch

    cfgs = [validate_config(c, SCHEMA) for c in shipped_configs()]
    moved, seen = set(), set()
    for cfg in cfgs:
        base = set(Plan(cfg).stages)
        for path, value in config_leaves(cfg):
            if path[0] in ("methods", "seeds"):  # which stages exist, not their settings
                continue
            if path == ("data", "validation"):  # no validation set (GSM8K): its keys are walked where one is set
                continue
            key = ".".join("*" if isinstance(p, int) else str(p) for p in path)
            seen.add(key)
            c = copy.deepcopy(cfg)
            node = c
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = perturbed(value)
            if set(Plan(c).stages) != base:
                moved.add(key)
    unaddressed = {k for k in seen - moved if not any(fnmatch.fnmatch(k, pat) for pat in UNADDRESSED)}
    assert unaddressed == set()
    assert not {k for k in moved if any(fnmatch.fnmatch(k, pat) for pat in UNADDRESSED)}




def test_grading_method_moves_every_stage_that_grades(demo_config):
    # The data stage's gold check depends on the method too.
    assert changed(plan(demo_config), plan(demo_config, grading__method="gsm8k_strict")) == (
        set(stage_dirs(plan(demo_config))) - {"demo"}
    )


def test_grading_extract_moves_reference_sampling_and_training_not_evaluation(demo_config):
    moved = changed(plan(demo_config), plan(demo_config, grading__extract="boxed"))
    dirs = set(stage_dirs(plan(demo_config)))
    assert moved == {"sample", "vstar"} | {k for k in dirs if k.startswith(("train:", "eval:"))} - {
        k for k in dirs if k.startswith("eval:reference")}
    assert plan(demo_config, grading__extract="boxed").sample.settings["grading_extract"] == "boxed"


def test_evaluate_extract_moves_only_the_evaluations(demo_config):
    moved = changed(plan(demo_config), plan(demo_config, evaluate__extract="boxed"))
    assert moved == {k for k in stage_dirs(plan(demo_config)) if k.startswith("eval:")}
    ev = plan(demo_config, evaluate__extract="boxed").evals["reference", "demo_test"].settings
    assert ev["grading_extract"] == "boxed" and "extract" not in ev


def test_stage_one_may_grade_with_its_own_method(demo_config):
    p = plan(demo_config, grading__sample_method="gsm8k_flexible")
    assert p.sample.settings["grading_method"] == "gsm8k_flexible"
    assert p.trains["apo"].settings["grading_method"] == "math_verify"
    # the samples move, and with them V* and the A*-PO training that reads it
    assert changed(plan(demo_config), p) == {"sample", "vstar", "train:apo", "eval:apo:demo_test"}


def test_benchmarks_have_no_prompt_limit_unless_they_set_one(demo_config):
    base = plan(demo_config)
    assert base.benchmarks["demo_test"].settings["prompt"]["max_prompt_tokens"] is None
    assert base.train_data.settings["prompt"]["max_prompt_tokens"] == demo_config["prompt"].get("max_prompt_tokens", 256)
    cfg = copy.deepcopy(demo_config)
    cfg["data"]["benchmarks"][0]["max_prompt_tokens"] = 100
    own = Plan(validate_config(cfg, SCHEMA))
    assert own.benchmarks["demo_test"].settings["prompt"]["max_prompt_tokens"] == 100
    assert "max_prompt_tokens" not in own.benchmarks["demo_test"].settings  # one place: the prompt block


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


def test_validation_set_and_settings_are_part_of_the_training_address(demo_config):
    base = plan(demo_config)
    assert base.trains["apo"].inputs["validation"] is base.validation
    assert base.validation.settings["split"] == "valid"
    for change in [{"train__validate_every": 25}, {"train__validation": {"temperature": 0.5, "k": 2}},
                   {"data__validation": {**demo_config["data"]["validation"], "limit": 64}}]:
        assert changed(base, plan(demo_config, **change)) == {"train:apo", "eval:apo:demo_test"}, change
    # spelling out the default length (the training length) keeps the address
    same = plan(demo_config, train__validation={**demo_config["train"]["validation"],
                                                "max_new_tokens": demo_config["train"]["max_new_tokens"]})
    assert changed(base, same) == set()


def test_without_a_validation_set_its_settings_are_not_read(demo_config):
    del demo_config["data"]["validation"]
    base = plan(demo_config)
    assert base.validation is None and "validation" not in base.trains["apo"].inputs
    assert "validate_every" not in base.trains["apo"].settings
    assert changed(base, plan(demo_config, train__validate_every=7)) == set()


def test_an_experiment_cannot_be_named_like_a_stage_folder():
    """results/<experiment>/ and results/<stage>/<hash>/ share the results folder: the schema
    refuses every stage's name (and MLflow's artifact folder and local store) as an experiment name."""
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    assert set(schema["properties"]["experiment"]["not"]["enum"]) == {
        *STAGES, "mlartifacts", "mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm"}


def test_every_stage_output_is_kept_when_its_job_starts():
    """Snakemake deletes a job's existing outputs when it starts the job unless they are
    flagged `update`: with two runs at once, the second would delete outputs the first had
    just written and its readers need. Every stage rule's outputs are `rule_outputs`', each
    `addressed` (common.smk; a dry run shows the flag: tests/test_pipeline.py)."""
    import re

    for kind in STAGES:
        rule = ROOT / "workflow" / "rules" / f"{kind}.smk"  # one rule file per stage
        blocks = re.findall(r"\n    output:\n((?:        .*\n)+)", rule.read_text())
        assert blocks, rule.name
        for block in blocks:
            entries = re.findall(r"^        (.+?),?$", block, flags=re.M)
            assert entries and all(re.fullmatch(r'\*\*rule_outputs\("\w+".*\)', e) for e in entries), (rule.name, entries)
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    body = common.split("def rule_outputs(")[1].split("\ndef ")[0]
    assert "addressed(" in body


# ---------------------------------------------------------------- local inputs at planning (issue 23)


def test_a_copy_of_a_benchmark_file_is_not_a_held_out_validation_set(demo_config, tmp_path, monkeypatch):
    """Data sets are compared by content: a copy of the test file under another name is the
    test set, whatever the config calls it."""
    import pytest

    from apo.config import ConfigError

    monkeypatch.chdir(tmp_path)
    rows = '{"q": "x", "a": "1"}\n{"q": "y", "a": "2"}\n'
    (tmp_path / "test.jsonl").write_text(rows)
    (tmp_path / "held_out.jsonl").write_text(rows)
    (tmp_path / "train.jsonl").write_text('{"q": "z", "a": "3"}\n')
    spec = {"split": "train", "prompt_field": "q", "answer_field": "a"}
    cfg = configured(demo_config, data__train={**spec, "path": "train.jsonl"},
                     data__benchmarks=[{**spec, "name": "b", "path": "test.jsonl"}],
                     data__validation={**spec, "path": "held_out.jsonl"})
    with pytest.raises(ConfigError, match=r"'data.validation': dataset 'held_out.jsonl' split 'train' is the test "
                                          r"set of benchmark\(s\) \['b'\]"):
        Plan(cfg, "results")
    (tmp_path / "held_out.jsonl").write_text('{"q": "w", "a": "4"}\n')
    assert Plan(cfg, "results").validation is not None
    (tmp_path / "train.jsonl").write_text(rows)  # training on the benchmark's rows
    with pytest.raises(ConfigError, match=r"'data.train': dataset 'train.jsonl' .* is the test set of benchmark"):
        Plan(cfg, "results")


def test_planning_names_local_inputs_that_cannot_work(demo_config, tmp_path, monkeypatch):
    import pytest

    from apo.config import ConfigError

    monkeypatch.chdir(tmp_path)
    cfg = configured(demo_config)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / cfg["experiment"]).write_text("a file where the results entry goes")
    with pytest.raises(ConfigError, match=r"config key 'experiment': results/apo-demo exists and is not a directory"):
        Plan(cfg, "results")
    (tmp_path / "results" / cfg["experiment"]).unlink()

    model = tmp_path / "m"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"config key 'model': ./m has no config.json"):
        local_plan(demo_config, "results", model="./m")
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"config key 'model': ./m has no tokenizer files \(one of tokenizer.json"):
        local_plan(demo_config, "results", model="./m")

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"q": "x", "a": "1"}\n')
    (tmp_path / "ds" / "test.jsonl").write_text('{"q": "y", "a": "2"}\n')
    spec = {"path": "ds", "prompt_field": "q", "answer_field": "a"}
    with pytest.raises(ConfigError, match=r"config key 'data.validation.split': the dataset directory ds has no "
                                          r"split 'valid'; its splits: \['train', 'test'\]"):
        local_plan(demo_config, "results", data__train={**spec, "split": "train"}, data__validation={**spec, "split": "valid"})


def test_the_plan_prints_the_steps_train_epochs_comes_to(demo_config, tmp_path):
    import json
    from pathlib import Path

    cfg = copy.deepcopy(demo_config)
    cfg["train"]["epochs"] = 3
    p = Plan(validate_config(cfg, SCHEMA), str(tmp_path / "results"))
    assert "known once the training data stage has run" in p.epoch_steps()
    Path(p.train_data.dir).mkdir(parents=True)
    (Path(p.train_data.dir) / "counts.json").write_text(json.dumps({"rows_out": 100}))
    batch = cfg["train"]["batch_size"]
    assert p.epoch_steps().endswith(f"100 prepared prompts -> {100 // batch} batches an epoch, {3 * (100 // batch)} steps")
    assert plan(demo_config).epoch_steps() is None


def test_the_report_spec_names_every_run_the_sweeps_and_the_stages_used(demo_config):
    """What `apo report` reads (Plan.report_spec): every evaluation and training run, each
    sweep's runs with the pick marked once it is known, and a link for every stage used."""
    p = plan(demo_config, seeds=[0, 1], train__lr=[1.0e-4, 3.0e-4])
    before = p.report_spec()
    assert before["trainings"] == [] and not any(run["picked"] for run in before["sweep"])
    p.add_pick("apo", {"lr": 3.0e-4})
    spec = p.report_spec()
    assert spec["experiment"] == demo_config["experiment"]
    assert [(t["label"], t["seed"], t["method"]) for t in spec["trainings"]] == [("apo-seed0", 0, "apo"),
                                                                                 ("apo-seed1", 1, "apo")]
    assert {(e["model"], e["dir"]) for e in spec["evals"]} == {(label, s.dir) for (label, _), s in p.evals.items()}
    assert [(run["label"], run["picked"]) for run in spec["sweep"]] == [("apo-lr0.0001", False),
                                                                        ("apo-lr0.0003", True)]
    assert spec["stages"]["sweep_apo"] == p.sweeps["apo"].dir
    assert spec["stages"]["train_apo-seed1"] == p.trains["apo-seed1"].dir
    assert set(spec["stages"]) >= {"demo", "data_train", "sample", "vstar"}
    assert json.loads(json.dumps(spec)) == spec  # the rule passes it as JSON


def test_the_report_spec_says_which_validation_set_it_is(demo_config):
    valid = {"path": "demo", "split": "valid", "prompt_field": "question", "answer_field": "answer",
             "id_field": "id"}
    assert plan(demo_config, data__validation=None).report_spec()["validation"] is None
    spec = plan(demo_config, data__validation=valid).report_spec()
    assert spec["validation"]["dataset"] == "demo split valid" and spec["validation"]["on_benchmark"] is False
    assert spec["stages"]["data_validation"].startswith("results/data/")


def test_the_report_digest_follows_what_the_report_would_show(demo_config):
    """The report's plan file is named by it (Plan.report_digest): a method added, a grid
    changed or a training setting changed renames it, so the report is redone; a runtime
    knob or the same config again does not. It is the plan before any pick."""
    base = plan(demo_config, train__lr=[1.0e-4, 3.0e-4])
    assert base.report_digest() == plan(demo_config, train__lr=[1.0e-4, 3.0e-4]).report_digest()
    assert base.report_digest() == plan(demo_config, train__lr=[1.0e-4, 3.0e-4],
                                        generation__batch_size=7).report_digest()
    for changes in ({"methods": ["apo", "rebel"]}, {"train__lr": [1.0e-4, 1.0e-3]}, {"train__steps": 7},
                    {"experiment": "other"}, {"seeds": [0, 1]}):
        assert plan(demo_config, **{"train__lr": [1.0e-4, 3.0e-4], **changes}).report_digest() != base.report_digest(), changes
    base.add_pick("apo", {"lr": 3.0e-4})
    with pytest.raises(RuntimeError, match="before add_pick"):
        base.report_digest()
