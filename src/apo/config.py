"""Config validation against the schema (src/apo/config.schema.yaml, shipped in the package),
with defaults filled in.

Runs when the workflow starts, before any job: a bad value or an unknown key stops the run
with an error that names the key (e.g. ``config key 'train.lr': 'fast' is not of type
'number'``). Defaults are written into the config first, so every stage's settings (and so
its content address) are the same whether a default was spelled out or not.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import re
from collections.abc import Hashable
from pathlib import Path

import jsonschema
import yaml

from apo import methods, sweep

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a second `train:` block would drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides by design
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base constructor names an unhashable key itself
            if key in seen:
                raise ConfigError(
                    f"{self.name}, line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                    f"in one mapping (first at line {seen[key] + 1}); YAML would keep only the last"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path):
    """A YAML (or JSON) config file's content; a duplicate key is a ConfigError naming the file,
    the line and the key. Every config the project reads goes through here."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        loader = _UniqueKeyLoader(fh)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        finally:
            loader.dispose()


def _resolve(schema: dict, root: dict) -> dict:
    """Follow a local `$ref` and merge `allOf` parts, enough to find defaults."""
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    for part in schema.get("allOf", []):
        part = _resolve(part, root)
        schema = {**schema, "properties": {**part.get("properties", {}), **schema.get("properties", {})}}
    return schema


def _coerce(value, schema: dict):
    """A string where the schema wants a number or boolean, converted if it reads as one.

    Nested values given with `snakemake --config key="{a: 1e-4}"` arrive as strings, and
    YAML reads `1e-4` (no dot) as a string too.
    """
    branches = [schema, *schema.get("anyOf", [])]  # a sweepable key: a scalar or a list of them
    if isinstance(value, list):
        items = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        return [_coerce(v, items[0]) for v in value] if items else value
    types = [t for b in branches for t in ([b["type"]] if isinstance(b.get("type"), str) else b.get("type", []))]
    if "integer" in types and "number" not in types:
        # JSON schema counts 2.0 as an integer, but range(2.0) and friends do not: store an int.
        number = value if isinstance(value, float) else _parse_number(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
    if not isinstance(value, str):
        return value
    for t, parse in [("integer", int), ("number", float), ("boolean", _parse_bool), ("null", _parse_null)]:
        if t in types:
            try:
                return parse(value)
            except ValueError:
                pass
    return value


def _parse_number(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    raise ValueError(text)


def _parse_null(text: str) -> None:
    if text.strip().lower() in {"null", "none", "~"}:
        return None
    raise ValueError(text)


def fill_defaults(instance, schema: dict, root: dict):
    """Insert `default` values of missing properties and coerce strings to the schema's
    scalar types, recursively (objects and arrays)."""
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            sub = _resolve(sub, root)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = _coerce(instance[key], sub)
                fill_defaults(instance[key], _object_branch(sub, instance[key], root), root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"], root)
    return instance


def _object_branch(schema: dict, value, root: dict) -> dict:
    """For an optional block (`anyOf: [null, object]`) given as an object: the object branch,
    whose defaults are filled in; any other schema as it is."""
    if isinstance(value, dict):
        for branch in schema.get("anyOf", []):
            branch = _resolve(branch, root)
            if branch.get("type") == "object":
                return branch
    return schema


def _key(path) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "<top level>"


def _message(error) -> str:
    """The error's message; for a sweepable key (`anyOf`: a value or a list of values) what is
    wrong with the value given, read as the branch of its kind."""
    if error.validator != "anyOf" or not error.context:
        return error.message
    kinds = ["array" if b.get("type") == "array" else "scalar" for b in error.schema["anyOf"]]
    if "array" not in kinds:
        return error.message
    want = kinds.index("array" if isinstance(error.instance, list) else "scalar")
    sub = next((e for e in error.context if e.schema_path[0] == want), error.context[0])
    item = f"item {sub.path[0]}: " if sub.path else ""
    return f"{item}{sub.message} (a value, or a list of values to sweep)"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """`auto` is vLLM wherever it is installed, transformers elsewhere."""
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    return backend


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: nested mappings merged key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Snakemake renders a config file holding this key as a YTE template: Python expressions in
# it are evaluated while the file is loaded, before this workflow sees it. A config is data.
TEMPLATE_KEY = "__use_yte__"


def refuse_templates(config: dict, source: str) -> None:
    """A ConfigError where a config (as written in its file) asks to be evaluated as code."""
    if isinstance(config, dict) and TEMPLATE_KEY in config:
        raise ConfigError(
            f"invalid {source}: config key '{TEMPLATE_KEY}': a config file is data; this workflow refuses "
            f"YTE templates (Python evaluated while the file is loaded): write the values out and remove the key")


def refuse_template_files(paths) -> None:
    """`refuse_templates` for the config files Snakemake loaded (it has rendered a template
    and dropped the key before the workflow sees the config, so the files are read again)."""
    for path in paths:
        with contextlib.suppress(OSError, yaml.YAMLError):
            refuse_templates(yaml.safe_load(Path(path).read_text()), str(path))


def resolve_extends(config: dict, base_dir: Path, source: str = "config", seen: tuple = ()) -> dict:
    """`extends: FILE` (a path from `base_dir`, the workflow's directory): FILE's config with
    this one's keys merged over it. A config the user names is otherwise the whole config:
    nothing is inherited that it does not name (schema defaults fill the rest)."""
    name = config.get("extends")
    if name is None:
        return config
    path = (Path(base_dir) / name).resolve()
    if path in seen:
        raise ConfigError(f"invalid {source}: config key 'extends': {name} extends itself")
    if not path.is_file():
        raise ConfigError(f"invalid {source}: config key 'extends': no such file {path}")
    base = load_yaml(path)
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ConfigError(f"invalid {source}: config key 'extends': {path} holds a {type(base).__name__}, "
                          "not a mapping of config keys")
    refuse_templates(base, str(path))
    base = resolve_extends(base, base_dir, str(path), (*seen, path))
    return merge(base, {k: v for k, v in config.items() if k != "extends"})


def validate_config(
    config: dict, schema_path: str | Path = SCHEMA_PATH, source: str = "config", base_dir: str | Path | None = None
) -> dict:
    """A validated copy of `config` with defaults filled in (and its `extends` file under it,
    found from `base_dir`, by default the working directory); raises ConfigError naming the key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    refuse_templates(config, source)
    config = resolve_extends(dict(config), Path(base_dir or Path.cwd()), source)
    config = fill_defaults(copy.deepcopy(config), schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    # NaN passes every bound (it compares false) and inf passes the open ones: neither is a
    # usable setting anywhere, so they are rejected before the schema's own checks.
    lines = [f"config key '{_key(path)}': {value} is not a finite number" for path, value in _non_finite(config)]
    if errors or lines:
        for e in errors[:10]:
            if e.validator == "additionalProperties":
                extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
                where = _key(e.absolute_path)
                keys = ", ".join(f"'{where + '.' if e.absolute_path else ''}{k}'" for k in extra)
                lines.append(f"unknown config key {keys}")
            else:
                lines.append(f"config key '{_key(e.absolute_path)}': {_message(e)}")
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines))
    _check_consistency(config, source)
    _check_validation(config, source)
    # Stage addresses name the engine that actually samples, never "auto".
    gen = config["generation"]
    train_key = "generation.train_backend" if gen["train_backend"] is not None else "generation.backend"
    asked = gen["train_backend"] or gen["backend"]  # what the training jobs' engine was set to
    gen["backend"], gen["train_backend"] = resolve_backend(gen["backend"]), resolve_backend(asked)
    _check_backend_fits_jobs(config, source, train_key, asked)
    return config


def _check_backend_fits_jobs(config: dict, source: str, key: str, asked: str) -> None:
    """`auto` is resolved on the host that plans (often a login node), and every job samples
    with what it resolved to: a sharded multi-GPU training job cannot sample with the hf
    engine (it samples from the local, sharded module), so resolving to hf there is an error
    now rather than in every training job. `key` names the setting the training engine came
    from, `asked` its value as written."""
    train = config["resources"]["train"]
    if config["generation"]["train_backend"] == "hf" and train.get("distributed") == "fsdp" and train.get("gpu", 0) > 1:
        how = (f"{key} is auto, which resolves to hf on this host (vLLM is not installed here)"
               if asked == "auto" else f"{key} is hf")
        raise ConfigError(
            f"invalid {source}: config key '{key}': {how}, but resources.train shards training "
            f"over {train['gpu']} GPUs (distributed: fsdp), which needs the vllm engine: set "
            f"{key}: vllm (and install envs/gpu.txt on the compute nodes)"
        )


def _non_finite(node, path=()):
    """(key path, value) of every NaN or infinite number in a config."""
    if isinstance(node, float) and not math.isfinite(node):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _non_finite(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _non_finite(v, (*path, i))


def _check_consistency(config: dict, source: str) -> None:
    """Rules that span keys, which JSON schema cannot say."""
    unknown = [m for m in config["methods"] if m not in methods.METHODS]
    if unknown:
        raise ConfigError(f"invalid {source}: config key 'methods': unknown method(s) {unknown} "
                          f"(known: {sorted(methods.METHODS)})")
    _check_batch_sizes(config["train"], source)
    _check_train_gpus(config, source)
    _check_greedy_samples(config, source)
    _check_overlong(config, source)
    _check_vstar_table(config["vstar"], source)
    if config["vstar"]["source"] == "table" and config["prompt"]["template"] != "raw":
        # The published stage-1 rewards were sampled from raw prompts: V* of a chat prompt
        # would be the value of another input.
        raise ConfigError(
            f"invalid {source}: config key 'prompt.template' is {config['prompt']['template']!r}, but the "
            "published stage-1 table (vstar.source: table) was sampled from raw prompts; set prompt.template: raw"
        )
    _check_shards(config, source)
    _check_names(config, source)
    _check_splits(config, source)
    if "evaluate" in config["data"]["train"]:
        raise ConfigError(
            f"invalid {source}: config key 'data.train.evaluate': evaluation settings belong to "
            "a benchmark (data.benchmarks[i].evaluate) or to the top-level 'evaluate' block"
        )
    names = [b["name"] for b in config["data"]["benchmarks"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"invalid {source}: config key 'data.benchmarks': duplicate name(s) {sorted(dup)}")


def _check_batch_sizes(t: dict, source: str) -> None:
    """batch (prompts per generation step) = k x mini-batch (per optimizer step) = j x micro-batch."""
    mini = t["mini_batch_size"] or t["batch_size"]
    mini_key = "mini_batch_size" if t["mini_batch_size"] else "batch_size"  # null: one update per batch
    for big, small, a, b in [(t["batch_size"], mini, "batch_size", "mini_batch_size"),
                             (mini, t["micro_batch_size"], mini_key, "micro_batch_size")]:
        if big % small:
            raise ConfigError(
                f"invalid {source}: config key 'train.{a}' ({big}) must be a multiple of 'train.{b}' ({small})"
            )


def _check_train_gpus(config: dict, source: str) -> None:
    """`resources.train.gpu` training processes each take an equal share of every mini-batch
    in whole micro-batches (apo.train.batch_layout), found here rather than inside the GPU job."""
    t, gpus = config["train"], config["resources"]["train"]["gpu"]
    mini = t["mini_batch_size"] or t["batch_size"]
    mini_key = "mini_batch_size" if t["mini_batch_size"] else "batch_size"
    if gpus > 1 and mini % (t["micro_batch_size"] * gpus):
        raise ConfigError(
            f"invalid {source}: config key 'resources.train.gpu' ({gpus}): 'train.{mini_key}' ({mini}) must be "
            f"a multiple of 'train.micro_batch_size' ({t['micro_batch_size']}) x {gpus} GPUs, one training "
            "process per GPU"
        )


def _sample_counts(config: dict):
    """(what draws, samples per prompt, key of its temperature, the temperature) of every
    place the pipeline draws responses."""
    yield "config key 'sample.n'", config["sample"]["n"], "sample.temperature", config["sample"]["temperature"]
    ev = config["evaluate"]
    for i, b in enumerate(config["data"]["benchmarks"]):
        own, key = b.get("evaluate", {}), f"data.benchmarks[{i}].evaluate"
        k_key = f"{key}.k" if "k" in own else "evaluate.k"
        t_key = f"{key}.temperature" if "temperature" in own else "evaluate.temperature"
        yield f"config key '{k_key}'", own.get("k", ev["k"]), t_key, own.get("temperature", ev["temperature"])
    v = config["train"]["validation"]
    if config["data"].get("validation") is not None:
        yield "config key 'train.validation.k'", v["k"], "train.validation.temperature", v["temperature"]
    for name in config["methods"]:
        n = methods.get(name).samples(config["train"])
        for count in n if isinstance(n, list) else [n]:  # a swept group size: each value
            yield f"method '{name}'", count, "train.temperature", config["train"]["temperature"]


def _check_greedy_samples(config: dict, source: str) -> None:
    """Temperature 0 is greedy decoding: every sample of a prompt would be the same response,
    and vLLM refuses several greedy samples per prompt, minutes into the job."""
    for what, count, temp_key, temperature in _sample_counts(config):
        if temperature == 0 and count > 1:
            raise ConfigError(
                f"invalid {source}: {what} draws {count} samples per prompt at '{temp_key}' 0 (greedy "
                "decoding), which would all be the same response; draw 1, or set a temperature above 0"
            )


def _check_overlong(config: dict, source: str) -> None:
    """DAPO's overlong buffer is a stretch before the length limit: shorter than the limit."""
    t = config["train"]
    for name in (m for m in config["methods"] if m in methods.GRPO_FAMILY):
        if t[name]["overlong_buffer"] >= t["max_new_tokens"]:
            raise ConfigError(
                f"invalid {source}: config key 'train.{name}.overlong_buffer' ({t[name]['overlong_buffer']}) must be "
                f"shorter than 'train.max_new_tokens' ({t['max_new_tokens']})"
            )


# Names that become paths (results/<experiment>/, a benchmark's files): the whole name must
# match. The schema's pattern alone lets "smoke\n" through: a regex `$` also matches before a
# trailing newline.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_names(config: dict, source: str) -> None:
    named = [("experiment", config["experiment"])]
    named += [(f"data.benchmarks[{i}].name", b["name"]) for i, b in enumerate(config["data"]["benchmarks"])]
    for key, name in named:
        if not NAME.fullmatch(name):
            raise ConfigError(
                f"invalid {source}: config key '{key}': {name!r} is not a name (letters, digits, "
                "'_', '.', '-', starting with a letter or digit)"
            )


def _check_shards(config: dict, source: str) -> None:
    """A shard job needs at least one prompt. The prompt count is known here only where a
    `limit` bounds it; the stage checks the rest (`apo.sample.shard_rows`)."""
    pairs = [("sample.shards", config["sample"]["shards"], "data.train", config["data"]["train"])]
    if config["vstar"]["source"] == "table":
        pairs = []
    pairs += [("evaluate.shards", config["evaluate"]["shards"], f"data.benchmarks[{i}]", b)
              for i, b in enumerate(config["data"]["benchmarks"])]
    for key, shards, where, spec in pairs:
        if spec["limit"] is not None and shards > spec["limit"]:
            raise ConfigError(
                f"invalid {source}: config key '{key}' ({shards}) is larger than "
                f"'{where}.limit' ({spec['limit']}): a shard would have no prompts"
            )


def _check_vstar_table(v: dict, source: str) -> None:
    """vstar.source: table needs a table with one join key and one way to read rewards."""
    if v["source"] != "table":
        return
    t = v.get("table")
    if t is None:
        raise ConfigError(f"invalid {source}: config key 'vstar.table' is required when vstar.source is 'table'")
    for a, b in [("id_field", "prompt_field"), ("reward_fields", "reward_list_field")]:
        if (t[a] is None) == (t[b] is None):
            raise ConfigError(
                f"invalid {source}: config key 'vstar.table': give exactly one of '{a}' and '{b}'"
            )


# The suffixes of the local data files the data stage reads (apo.data.BUILDERS).
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def dataset_specs(config: dict):
    """(config key, spec) of every prompt set: data.train, each benchmark, data.validation."""
    yield "data.train", config["data"]["train"]
    for i, b in enumerate(config["data"]["benchmarks"]):
        yield f"data.benchmarks[{i}]", b
    if config["data"].get("validation") is not None:
        yield "data.validation", config["data"]["validation"]


def dataset_file(spec: dict) -> str:
    """The path a dataset spec reads: its `path`, with `{split}` replaced by its split."""
    return spec["path"].replace("{split}", spec["split"])


def file_split_problem(spec: dict) -> str | None:
    """Why a local file cannot give the spec's split, or None: a file read whole is one split,
    `train` (as the datasets library names a data file's rows); another split needs `{split}`
    in the path or a `split_field`."""
    if "{split}" in spec["path"] or spec.get("split_field") or spec["split"] == "train":
        return None
    return (f"{spec['path']} is one file, read whole as split 'train', so split {spec['split']!r} cannot be "
            "honoured: name the column holding each row's split (split_field), put {split} in the path "
            "(one file per split, e.g. data/{split}.jsonl), or set split: train")


def _check_splits(config: dict, source: str) -> None:
    """A local file gives the split a spec names (`file_split_problem`); `{split}` and
    `split_field` are two ways to say where the splits are, not to be combined."""
    table = [("vstar.table", config["vstar"]["table"])] if config["vstar"]["source"] == "table" else []
    for key, spec in [*dataset_specs(config), *table]:
        if "{split}" in spec["path"] and spec.get("split_field"):
            raise ConfigError(f"invalid {source}: config key '{key}.split_field': the path {spec['path']!r} names "
                              "one file per split ({split}); a split column is for one file holding every split")
        file = Path(dataset_file(spec)).expanduser()
        if spec["path"] != "demo" and (file.is_file() or (file.suffix in LOCAL_SUFFIXES and not file.is_dir())):
            problem = file_split_problem(spec)
            if problem is not None:
                raise ConfigError(f"invalid {source}: config key '{key}.split': {problem}")


def source_of(spec: dict) -> tuple:
    """What a prompt set is drawn from, as far as the config tells: an existing local path by
    its resolved location (./data/t.jsonl and data/t.jsonl are one file), anything else by
    its spelling; then subset, split column and split. Two specs with the same source share
    problems, whatever their limits. The plan compares local data by content
    (`apo.settings.Plan.source_identity`)."""
    file = Path(dataset_file(spec)).expanduser()
    if spec["path"] != "demo" and file.is_file():  # read whole, or split by its column
        return os.path.realpath(file), spec.get("split_field"), spec["split"] if spec.get("split_field") else None
    if spec["path"] != "demo" and file.is_dir():
        return os.path.realpath(file), spec.get("subset"), spec["split"]
    return spec["path"], spec.get("subset"), spec.get("split_field"), spec["split"]


def check_held_out(config: dict, source: str, identity=source_of) -> None:
    """data.validation is held out: neither the training set nor, unless declared with
    data.validation_on_benchmark, a benchmark's; the training set is no benchmark's. Two
    prompt sets are the same when `identity` says so."""
    data = config["data"]
    train, spec = identity(data["train"]), data.get("validation")

    def what(s):
        return f"dataset {dataset_file(s)!r} split {s['split']!r}"

    tested = [b["name"] for b in data["benchmarks"] if identity(b) == train]
    if tested:
        raise ConfigError(f"invalid {source}: config key 'data.train': {what(data['train'])} is the test set of "
                          f"benchmark(s) {tested}; train on problems no benchmark uses")
    if spec is None:
        return
    if identity(spec) == train:
        raise ConfigError(f"invalid {source}: config key 'data.validation': {what(spec)} is the training set "
                          "(data.train); validate on problems the policy is not trained on")
    same = [b["name"] for b in data["benchmarks"] if identity(b) == identity(spec)]
    if same and not data["validation_on_benchmark"]:
        raise ConfigError(
            f"invalid {source}: config key 'data.validation': {what(spec)} is the test set of benchmark(s) {same}; "
            "validate on data no benchmark uses, or set data.validation_on_benchmark: true to declare it "
            "(the report then says that the validation set is not held out)"
        )


def _check_validation(config: dict, source: str) -> None:
    """Validation's null length is the training length, filled in here so that spelling it
    out does not change the training stage's address; a sweep needs a held-out validation set;
    the prompt sets are held out from each other (`check_held_out`)."""
    v = config["train"]["validation"]
    if v["max_new_tokens"] is None:
        v["max_new_tokens"] = config["train"]["max_new_tokens"]
    spec = config["data"].get("validation")
    listed = sweep.listed_keys(config["train"])
    if listed and (spec is None or config["data"]["validation_on_benchmark"]):
        raise ConfigError(
            f"invalid {source}: config key 'train.{listed[0]}' lists several values, a sweep, which picks each "
            "method's run by its validation accuracy: set data.validation to a set no benchmark uses"
            + (" (data.validation_on_benchmark is true: the pick would be made on test problems)" if spec else "")
        )
    check_held_out(config, source)
