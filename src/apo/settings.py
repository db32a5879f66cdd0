"""Which settings each stage reads, and the content address of every stage output.

The address of a stage is the hash of the canonical JSON of
``(stage kind, format version, the settings that stage reads, the addresses of the stages it
reads from)``.  Sharing and invalidation therefore follow from the data, not from timestamps:
two experiments that agree on a stage's settings and inputs share its directory, and changing
a setting moves exactly the stages downstream of it to new directories.

What a stage reads from outside the results is addressed by what it is: a local file or
directory by a digest of its content (`apo.fingerprint`, cached, so a large model is not
re-read at every plan), a hub id by the id and the `revision` the config pins (a branch name
like the default `main` can move on the hub: pin a commit to make the address exact). The
Snakefile builds a `Plan` from the validated config and the rules ask it for paths and
settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apo import __version__, methods, sweep
from apo.config import LOCAL_SUFFIXES, ConfigError, check_held_out, dataset_file, dataset_specs
from apo.fingerprint import DigestCache, content_digest

# Bump a stage's format version when its code changes what it writes for the same settings;
# every downstream address changes with it.
FORMAT_VERSION = {
    "demo": 2,
    "data": 4,
    "sample": 3,
    "vstar": 2,
    "train": 3,
    "evaluate": 3,
    "sweep": 1,
}
# One name per stage: the config section, the rule, the `apo` command, the results folder and
# the module all use the stage's kind (the sampling and evaluation shards share rule `sample`).
STAGES = tuple(FORMAT_VERSION)

# train.* keys that change speed and memory, not results: passed to the job, not addressed
RUNTIME_TRAIN_KEYS = ("gradient_checkpointing",)
# train.* keys read only when data.validation is set: a run without one keeps its address
VALIDATION_TRAIN_KEYS = ("validate_every", "validation")
DEMO = "demo"  # the value of `model` / a dataset `path` that means "the embedded demo"
HASH_LEN = 12


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal settings give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:HASH_LEN]


@dataclass(frozen=True)
class External:
    """Something a stage reads from outside the results: a local file or directory (`digest`
    of its content) or a hub id (pinned by `revision`, where the config gives one)."""

    ref: str
    revision: str | None = None
    digest: str | None = None
    local: bool = False  # a local path: a rule input Snakemake checks (and waits for)

    @property
    def id(self) -> str:
        if self.digest is not None:
            return f"local:sha256:{self.digest}"
        return f"external:{self.ref}" + (f"@{self.revision}" if self.revision else "")


def looks_local(ref: str) -> bool:
    """Whether a reference is meant as a local file or directory, even one that does not exist,
    rather than a hub id (`name` or `owner/name`): it exists, or has a data file suffix, is an
    explicit relative or absolute path, has more than one `/`, or its first component is a
    local directory."""
    path = Path(ref)
    return (
        path.exists()
        or path.suffix in LOCAL_SUFFIXES
        or ref.startswith(("/", "./", "../", "~"))
        or ref.count("/") > 1
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


# One of these makes a directory a tokenizer transformers can load (with tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def local_model_problem(ref: str) -> str | None:
    """What an existing local model path lacks for `from_pretrained` (its config.json, its
    tokenizer files), or None. A missing path is left to Snakemake's missing-input error."""
    path = Path(ref).expanduser()
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{ref} is a file; a model is a directory of config.json, weights and tokenizer files"
    if not (path / "config.json").is_file():
        return f"{ref} has no config.json (the model's architecture); write the model there with save_pretrained"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (f"{ref} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); write the model's tokenizer "
                "there with tokenizer.save_pretrained")
    return None


@dataclass(frozen=True)
class Stage:
    """One content-addressed stage output: ``<results>/<kind>/<hash>/``."""

    kind: str
    settings: dict
    # role -> upstream Stage, or an External (hub id / local path)
    inputs: dict = field(default_factory=dict)
    results: str = "results"

    def _input_ids(self) -> dict:
        return {
            role: (f"{up.kind}/{up.hash}" if isinstance(up, Stage) else up.id)
            for role, up in self.inputs.items()
        }

    @property
    def hash(self) -> str:
        return digest(
            {
                "kind": self.kind,
                "format": FORMAT_VERSION[self.kind],
                "settings": self.settings,
                "inputs": self._input_ids(),
            }
        )

    @property
    def dir(self) -> str:
        return f"{self.results}/{self.kind}/{self.hash}"

    def manifest(self) -> dict:
        """What `manifest.json` in the stage directory records."""
        return {
            "kind": self.kind,
            "hash": self.hash,
            "format": FORMAT_VERSION[self.kind],
            "settings": self.settings,
            "inputs": self._input_ids(),
            "apo_version": __version__,
        }


def runtime_knobs(config: dict) -> dict:
    """What every job receives besides its manifest: settings that change how fast a stage
    runs, or where it logs, never what it writes, and so are part of no address. (The grading
    time limit changes grades: it is addressed, and jobs read it from their manifest.)"""
    return {
        "generation": {"batch_size": config["generation"]["batch_size"], "vllm": config["generation"]["vllm"]},
        "grading": {"workers": config["grading"]["workers"]},
        "tracking_uri": config["tracking_uri"],
        "lock_wait_s": config["lock_wait_s"],
        # how the training job spreads over its GPUs (ddp or fsdp): placement, like resources
        "train": {**{key: config["train"][key] for key in RUNTIME_TRAIN_KEYS},
                  "distributed": config["resources"]["train"]["distributed"],
                  # the job's time request: under a scheduler training stops, checkpointed, before it
                  "time_limit_min": config["resources"]["train"]["runtime"]},
    }


def _subset(section: dict, keys: list[str]) -> dict:
    return {k: section[k] for k in keys}


def _grading(grading: dict, method: str | None = None, extract: str | None = None) -> dict:
    """What a grading stage's address holds of the `grading` block (workers is speed only): the
    time bound, the method (`method` where the stage has its own: stage 1's sample_method) and,
    for a stage that grades responses, where their answer is read from (`extract`)."""
    out = {"grading_timeout_s": grading["timeout_s"], "grading_method": method or grading["method"]}
    if extract is not None:
        out["grading_extract"] = extract
    return out


class Plan:
    """Every stage one experiment needs, keyed by (kind, hash).

    Attributes name the stages by role: `demo` (or None), `model` (the reference model: the
    demo Stage or an External), `train_data`, `benchmarks` (name -> Stage),
    `sample` (None when V* comes from a published table), `vstar`, `validation` (the
    data.validation prompt set, or None), `grids` (method -> {combination label: Stage}, the
    trainings of a sweep), `sweeps` (method -> its sweep Stage, which picks one of the grid's
    runs), `picked` (method -> the picked combination, once known), `trains` (label -> Stage,
    one per method and seed), and `evals`:
    (model label, benchmark name) -> Stage.
    """

    def __init__(self, config: dict, results: str = "results"):
        self.config = config
        self.results = results
        self.experiment = config["experiment"]
        self.stages: dict[tuple[str, str], Stage] = {}
        self.digests = DigestCache(f"{results}/.content-digests.json")

        uses_demo = config["model"] == DEMO or any(
            d["path"] == DEMO for d in [config["data"]["train"], *config["data"]["benchmarks"]]
        )
        # The demo's tokenizer and warm start are trained on prompts with the instruction.
        demo = {**config["demo"], "instruction": config["prompt"]["instruction"]}
        self.demo = self._add("demo", demo, {}) if uses_demo else None
        self.model = self.demo if config["model"] == DEMO else self.external(config["model"], config["model_revision"])
        self._check_local_inputs()

        grading = config["grading"]
        self.train_data = self._dataset(config["data"]["train"], "data.train")
        self.benchmarks = {b["name"]: self._dataset(b, f"benchmark {b['name']!r}", benchmark=True)
                           for b in config["data"]["benchmarks"]}
        spec = config["data"].get("validation")
        self.validation = self._dataset(spec, "data.validation") if spec is not None else None
        # The held-out checks of validation, by what each prompt set is rather than its spelling.
        check_held_out(config, "config", self.source_identity)

        sample, vstar = config["sample"], config["vstar"]
        if vstar["source"] == "table":
            # A published stage-1 table replaces reference sampling: no sample stage at all.
            # The address covers the table's location and field mapping (the table itself is
            # external, like a hub model) and the prompts it is joined to.
            self.sample = None
            self.vstar = self._add(
                "vstar",
                {**_subset(vstar, ["beta1", "filter", "source"]), "table": vstar["table"]},
                {"table": self.external(vstar["table"]["path"], vstar["table"]["revision"]), "prompts": self.train_data},
            )
        else:
            self.sample = self._add(
                "sample",
                {
                    **_subset(sample, ["n", "temperature", "top_p", "max_new_tokens", "seed", "shards"]),
                    "backend": config["generation"]["backend"],
                    **_grading(grading, grading["sample_method"], grading["extract"]),
                },
                {"model": self.model, "prompts": self.train_data},
            )
            # What sampling-based V* reads (the table keys are for a published table only).
            self.vstar = self._add("vstar", _subset(vstar, ["beta1", "filter"]), {"samples": self.sample})
        self.models: dict[str, Stage | str] = {"reference": self.model}
        self.trains: dict[str, Stage] = {}
        self.evals: dict[tuple[str, str], Stage] = {}
        self.grids: dict[str, dict[str, Stage]] = {}
        self.sweeps: dict[str, Stage] = {}
        self.picked: dict[str, dict] = {}
        self._add_evals("reference", self.model)
        self._plan_trainings()
        self.digests.save()

    def epoch_steps(self) -> str | None:
        """The plan's line on train.epochs: the steps it comes to from the prepared training
        prompts (the data stage's counts.json), or when they will be known; None without it."""
        train = self.config["train"]
        if train.get("epochs") is None:
            return None
        from apo.job import output_name  # (apo.job imports this module)

        counts = Path(self.train_data.dir) / output_name("data", "counts")
        head = f"train.epochs {train['epochs']} x (prompts // train.batch_size {train['batch_size']})"
        if not counts.exists():
            return f"{head}: the steps are known once the training data stage has run ({self.train_data.dir})"
        prompts = json.loads(counts.read_text())["rows_out"]
        filtered = "" if self.config["vstar"]["filter"] == "keep_all" else " before V*'s filter, which A*-PO applies first"
        return (f"{head}: {prompts} prepared prompts{filtered} -> {prompts // train['batch_size']} batches "
                f"an epoch, {train['epochs'] * (prompts // train['batch_size'])} steps")

    def eval_settings(self, benchmark: str) -> dict:
        """The top-level `evaluate` block with the benchmark's own `evaluate` keys over it."""
        spec = next(b for b in self.config["data"]["benchmarks"] if b["name"] == benchmark)
        return {**self.config["evaluate"], **spec.get("evaluate", {})}

    def _plan_trainings(self) -> None:
        """One training run per (method, seed), labelled "apo" or "apo-seed1" when seeds vary; a
        method with listed values is first trained once per combination (apo.sweep), and its
        runs join `trains` when its pick is known (`add_pick`)."""
        config = self.config
        for method in config["methods"]:
            combos = sweep.grid(config["train"], self._reads(method))
            if len(combos) == 1:
                self._add_runs(method, combos[0])
                continue
            runs = {name: self._train(method, config["seeds"][0], c) for name, c in sweep.labelled(combos).items()}
            self.grids[method] = runs
            settings = {"method": method, "criterion": "final validation accuracy", "grid": combos}
            self.sweeps[method] = self._add("sweep", settings, runs)

    def _reads(self, method: str) -> set[str]:
        """The top-level train.* keys a method's training reads."""
        return (set(self.config["train"]) - methods.method_only_keys()) | set(methods.get(method).settings)

    def _add_runs(self, method: str, combo: dict) -> None:
        """The evaluated runs of a method: one per seed, with the combination's values."""
        for seed in self.config["seeds"]:
            label = method if len(self.config["seeds"]) == 1 else f"{method}-seed{seed}"
            self.trains[label] = self.models[label] = self._train(method, seed, combo)
            self._add_evals(label, self.trains[label])

    def add_pick(self, method: str, combo: dict) -> None:
        """A sweep's pick is known: its run on the first seed (the grid's), its runs on the
        other seeds, and their evaluations join the plan."""
        grid = self.sweeps[method].settings["grid"]
        if combo not in grid:
            raise ValueError(f"pick {combo} of {method} is not in its grid {grid}")
        self.picked[method] = combo
        self._add_runs(method, combo)

    def _add_evals(self, label: str, model) -> None:
        for name, bench in self.benchmarks.items():
            settings = self.eval_settings(name)
            extract = settings.pop("extract")
            self.evals[label, name] = self._add(
                "evaluate",
                {
                    **settings,
                    "backend": self.config["generation"]["backend"],
                    **_grading(self.config["grading"], extract=extract),
                },
                {"model": model, "prompts": bench},
            )

    def _train(self, method: str, seed: int, combo: dict) -> Stage:
        """A training stage reads the shared train settings and its own method's keys only
        (apo.methods), with the combination's values where the config lists several; A*-PO
        reads V* (and so the reference samples), the baselines do not."""
        train, spec = sweep.apply(self.config["train"], combo), methods.get(method)
        skip = methods.method_only_keys() | set(RUNTIME_TRAIN_KEYS)
        if self.validation is None:  # validation settings are read only with a validation set
            skip |= set(VALIDATION_TRAIN_KEYS)
        settings = {k: v for k, v in train.items() if k not in skip}
        settings.update({k: train[k] for k in spec.settings})
        if spec.reads_reference(settings):  # the pass runs anyway: measure_kl changes nothing
            settings.pop("measure_kl")
        settings.update(
            method=method,
            seed=seed,
            backend=self.config["generation"]["train_backend"],
            **_grading(self.config["grading"], extract=self.config["grading"]["extract"]),
        )
        inputs = {"model": self.model, "prompts": self.train_data}
        if spec.reads_vstar:
            inputs["vstar"] = self.vstar
        if self.validation is not None:
            inputs["validation"] = self.validation
        return self._add("train", settings, inputs)

    def _add(self, kind: str, settings: dict, inputs: dict) -> Stage:
        stage = Stage(kind, settings, inputs, self.results)
        self.stages[kind, stage.hash] = stage
        return stage

    def _dataset(self, spec: dict, where: str, benchmark: bool = False) -> Stage:
        # The tokenizer (chat template) shapes the prompts, so the model is an input. The
        # benchmark's display name and how it is evaluated do not change the file.
        settings = {k: v for k, v in spec.items() if k not in ("name", "evaluate", "max_prompt_tokens")}
        settings["prompt"] = {**self.config["prompt"], "max_prompt_tokens": prompt_limit(self.config, spec, benchmark)}
        # Which golds are kept depends on what the grader can read (and in what time).
        settings.update(_grading(self.config["grading"]))
        inputs = {"tokenizer": self.model}
        if spec["path"] == DEMO:
            inputs["source"] = self.demo
        else:
            source = self.external(dataset_file(spec), spec["revision"])
            if source.local:
                inputs["source"] = source  # its path is in the settings; this is its content
                from apo.data import check_fields  # (apo.data imports this module)

                check_fields(spec, where)  # a misnamed field stops the plan, not the data job
        return self._add("data", settings, inputs)

    def _check_local_inputs(self) -> None:
        """What planning can tell of local inputs before any job: the results entry is not a
        file, a local model has its config and tokenizer, a dataset directory has the split."""
        entry = Path(self.results) / self.experiment
        if entry.exists() and not entry.is_dir():
            raise ConfigError(f"config key 'experiment': {entry} exists and is not a directory (the experiment's "
                              "results entry); choose another experiment name or move the file")
        if isinstance(self.model, External) and self.model.local:
            problem = local_model_problem(self.model.ref)
            if problem is not None:
                raise ConfigError(f"config key 'model': {problem}")
        for key, spec in dataset_specs(self.config):
            path = Path(dataset_file(spec)).expanduser()
            if spec["path"] != DEMO and path.is_dir():
                from apo.data import local_splits

                splits = local_splits(path, spec.get("subset"))
                if spec["split"] not in splits:
                    raise ConfigError(f"config key '{key}.split': the dataset directory {path} has no split "
                                      f"{spec['split']!r}; its splits: {splits}")

    def source_identity(self, spec: dict) -> tuple:
        """What a prompt set is drawn from, by what it is: a local file or directory by its
        content (a copy or another spelling of one path is the same data), a hub dataset by its
        id, revision and subset; then the split, which selects rows of a directory or hub
        dataset, or of a file by its `split_field` (a file read whole, or one per `{split}`, is
        its content alone)."""
        if spec["path"] == DEMO:
            return ("demo", spec["split"])
        source = self.external(dataset_file(spec), spec["revision"])
        if source.local and Path(dataset_file(spec)).expanduser().is_file():
            return (source.id, spec.get("split_field"), spec["split"] if spec.get("split_field") else None)
        return (source.id, spec.get("subset"), spec["split"])

    def external(self, ref: str, revision: str | None) -> External:
        """A local path by its content (when it exists; a missing one is left for Snakemake
        to report as a missing input), anything else as a hub id at `revision`."""
        if not looks_local(ref):
            return External(ref, revision)
        path = Path(ref).expanduser()
        digest = content_digest(path, self.digests) if path.exists() else None
        return External(ref, None, digest, local=True)

    def get(self, kind: str, hash_: str) -> Stage:
        try:
            return self.stages[kind, hash_]
        except KeyError:
            raise KeyError(f"no {kind} stage with hash {hash_} in this config's plan") from None

    # ----------------------------------------------------------------- what the report reads

    def sweep_spec(self) -> list[dict]:
        """Every run of every sweep: its label, combination, directory and whether it is its
        method's pick (False while the pick is not known)."""
        return [
            {"method": method, "label": f"{method}-{label}", "combo": combo, "dir": run.dir,
             "picked": combo == self.picked.get(method)}
            for method, runs in self.grids.items()
            for (label, run), combo in zip(runs.items(), self.sweeps[method].settings["grid"])
        ]

    def validation_spec(self) -> dict | None:
        """What the report says of the validation set: which it is, how it is sampled, and
        whether the config declares it a test benchmark's (data.validation_on_benchmark)."""
        spec = self.config["data"]["validation"]
        if spec is None:
            return None
        sampling = self.config["train"]["validation"]
        return {"dataset": f"{spec['path']} split {spec['split']}",
                "on_benchmark": self.config["data"]["validation_on_benchmark"],
                "k": sampling["k"], "temperature": sampling["temperature"]}

    def used_stages(self) -> dict[str, str]:
        """{link name: stage directory} of every stage the experiment uses (its `stages/`)."""
        named = [("demo", self.demo), ("data_train", self.train_data),
                 *[(f"data_{b}", d) for b, d in self.benchmarks.items()],
                 ("data_validation", self.validation), ("sample", self.sample), ("vstar", self.vstar),
                 *[(f"train_{label}", run) for label, run in self.trains.items()],
                 *[(f"sweep_{m}", sweep) for m, sweep in self.sweeps.items()]]
        return {name: used.dir for name, used in named if used is not None}

    def report_digest(self) -> str:
        """The report's inputs as far as they are known before any pick: the experiment, the
        seeds a pick is trained on, every evaluation by label and address, the validation set
        and the stages used (every training and sweep among them). It names the report's plan
        file, results/<experiment>/log/plan-<digest>.json, so a changed plan reruns the report:
        Snakemake checks neither the set of input files nor their dates for a job whose inputs
        wait for a checkpoint (the sweeps), and would leave a report of fewer methods in place.
        Call it before `add_pick`."""
        if self.picked:
            raise RuntimeError("report_digest is the plan before the sweeps' picks; call it before add_pick")
        return digest({
            "experiment": self.experiment,
            "seeds": self.config["seeds"],  # a pick is trained on each (add_pick)
            "evals": [[label, bench, evaluation.hash] for (label, bench), evaluation in self.evals.items()],
            "validation": self.validation_spec(),
            "stages": self.used_stages(),
        })

    def report_spec(self) -> dict:
        """What `apo report` reads (`apo.report.write`'s spec): every evaluation and training
        run of the experiment, the sweeps, the validation set and the stages used. Complete
        once every sweep's pick is known (`add_pick`)."""
        return {
            "experiment": self.experiment,
            "evals": [{"model": label, "benchmark": bench, "dir": evaluation.dir}
                      for (label, bench), evaluation in self.evals.items()],
            "trainings": [{"label": label, "dir": run.dir, "method": run.settings["method"],
                           "seed": run.settings["seed"]} for label, run in self.trains.items()],
            "validation": self.validation_spec(),
            "sweep": self.sweep_spec(),
            "stages": self.used_stages(),
        }


def prompt_limit(config: dict, spec: dict, benchmark: bool) -> int | None:
    """The prompt-length limit of a prompt set: its own `max_prompt_tokens`, else
    prompt.max_prompt_tokens for training and validation prompts and none for a benchmark
    (published numbers score every problem)."""
    if spec.get("max_prompt_tokens") is not None:
        return spec["max_prompt_tokens"]
    return None if benchmark else config["prompt"]["max_prompt_tokens"]


def model_path(model: Stage | External) -> str:
    """Where `from_pretrained` finds a model: a stage's saved model or a hub id / path."""
    return f"{model.dir}/model" if isinstance(model, Stage) else model.ref
