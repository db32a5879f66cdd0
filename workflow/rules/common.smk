import json
import sys
from pathlib import Path

from apo.config import SCHEMA_PATH, load_yaml, refuse_template_files, validate_config
from apo.job import (
    DIRECTORY_OUTPUTS,
    SHARD_RULE,
    STAGE_OUTPUTS,
    lock_file,
    output_name,
    read_stage_json,
)
from apo.memory import workflow_plan
from apo.report import FILES as REPORT_FILES
from apo.prefetch import artefacts as hub_artefacts
from apo.settings import External, Plan, Stage, digest, model_path, runtime_knobs
from apo.tracking import check_reachable, check_store_location, default_tracking_uri

# Validate before any job is planned: a bad key stops the run here, naming the key. The
# config is the file given with --configfile (config/config.yaml, the demo, when none is:
# profiles/default), with its `extends` file under it; nothing else is merged in. Snakemake
# has rendered a config with `__use_yte__` (Python in it ran): stop here rather than run on
# what it computed. And it read each file keeping the last of a key given twice: read again,
# that is an error.
refuse_template_files(workflow.configfiles)
for _configfile in workflow.configfiles:
    load_yaml(_configfile)
_validated = validate_config(
    config,
    SCHEMA_PATH,
    base_dir=workflow.basedir,
)
config.clear()
config.update(_validated)

# Once per plan rather than minutes of retries in every job.
check_reachable(config["tracking_uri"])

RESULTS = "results"
# Once per plan, not a database broken by a cluster's jobs writing it over a network file system.
check_store_location(config["tracking_uri"] or default_tracking_uri(RESULTS))
PLAN = Plan(config, RESULTS)
EXPERIMENT_DIR = f"{RESULTS}/{PLAN.experiment}"
# Named by the plan before the sweeps' picks (apo.settings.Plan.report_digest): a changed plan
# (a method added, a setting changed) is a missing file, so the report is redone.
REPORT_PLAN = f"{EXPERIMENT_DIR}/log/plan-{PLAN.report_digest()}.json"

# Per-GPU memory of each training job, before anything is queued: the table goes to stderr
# and a job that cannot fit resources.train.gpu_memory_gb stops the run here, naming the
# settings to change. Once per run: cluster jobs, which parse this file again, skip it.
if workflow.is_main_process:
    workflow_plan(
        config,
        {
            method: method for method in config["methods"]
        },  # a sweep's runs: its method's row
        model_path(PLAN.model),
        lambda text: print(text, file=sys.stderr),
    )
    if PLAN.epoch_steps():
        print(PLAN.epoch_steps(), file=sys.stderr)


def output_file(stage_, role):
    """A planned stage's output of `role`, named by the rule that writes it
    (`apo.job.STAGE_OUTPUTS`): results/<kind>/<hash>/<name>."""
    return f"{stage_.dir}/{output_name(stage_.kind, role)}"


def picked_combo(pick_file):
    """A sweep's pick, checked against the checksum its job recorded."""
    return read_stage_json(pick_file)["picked"]


# A sweep's pick made in an earlier run (or by the checkpoint before this job was started)
# plans its runs on the other seeds and the evaluations; `resolve_picks` waits for the rest.
for _method, _sweep in PLAN.sweeps.items():
    if Path(output_file(_sweep, "pick")).exists():
        PLAN.add_pick(_method, picked_combo(output_file(_sweep, "pick")))


def resolve_picks():
    """Every sweep's pick, in the plan; raises Snakemake's incomplete-checkpoint signal (so the
    DAG waits for the sweep job) while one is not made yet."""
    for method, sweep in PLAN.sweeps.items():
        if method not in PLAN.picked:
            PLAN.add_pick(
                method, picked_combo(checkpoints.sweep.get(h=sweep.hash).output.pick)
            )


def sweep_runs(sweep):
    """params: the grid's runs of a sweep stage, as JSON for `apo sweep`."""
    grid = dict(zip(sweep.inputs, sweep.settings["grid"]))
    return json.dumps(
        [
            {"label": label, "combo": grid[label], "dir": run.dir}
            for label, run in sweep.inputs.items()
        ]
    )


# Everything the config reads from the hub, fetched once by rule prefetch on this host before
# any job that reads it (apo.prefetch); those jobs then run offline.
HUB = hub_artefacts(config) if config["prefetch"] else []
PREFETCHED = f"{RESULTS}/prefetch/{digest(HUB)}/fetched.json"


def prefetched(wildcards):
    """Input: the prefetch's record, for a job that may read from the hub (none without one);
    ancient: a refetch changes no job's inputs, so it reruns none."""
    return [ancient(PREFETCHED)] if HUB else []


# Knobs that change how fast, not what (apo.settings.runtime_knobs): passed to every job,
# part of no address.
RUNTIME = json.dumps({**runtime_knobs(config), "hub_offline": bool(HUB)})

HASH = r"[0-9a-f]{12}"


def stage(kind, wildcards):
    """The planned stage of a job: of `kind`, or of the job's `kind` wildcard when None (the
    sample rule serves the sample and evaluate stages)."""
    return PLAN.get(kind or wildcards.kind, wildcards.h)


def manifest(kind=None):
    """params: the stage's manifest as JSON, for the `apo` command line."""
    return lambda w: json.dumps(stage(kind, w).manifest())


def stage_dir(kind=None):
    """params: the stage's directory, results/<kind>/<hash>."""
    return lambda w: stage(kind, w).dir


# What every stage command takes (`apo.cli.STAGE_COMMANDS`), from `stage_params`.
STAGE_ARGS = "--manifest {params.manifest:q} --stage-dir {params.dir:q} --runtime {params.runtime:q}"


def stage_params(kind=None, **extra):
    """params of a stage rule: what STAGE_ARGS passes, and the rule's own."""
    return {
        "manifest": manifest(kind),
        "dir": stage_dir(kind),
        "runtime": RUNTIME,
        **extra,
    }


def rule_outputs(rule, kind=None):
    """output: every file the rule's job writes (`apo.job.STAGE_OUTPUTS`), by role, in
    results/<kind>/{h}/ (`kind`: the stage's, the rule's own unless given), each `addressed`.
    """
    outputs = {}
    for role, name in STAGE_OUTPUTS[rule].items():
        path = f"{RESULTS}/{kind or rule}/{{h}}/{name}"
        outputs[role] = addressed(
            directory(path) if name in DIRECTORY_OUTPUTS else path
        )
    return outputs


def stage_log(kind, name):
    return f"{RESULTS}/{kind}/{{h}}/log/{name}.log"


def stage_benchmark(kind, name):
    return f"{RESULTS}/{kind}/{{h}}/log/{name}.benchmark.tsv"


def addressed(path):
    """A content-addressed output. Snakemake would otherwise delete a job's existing outputs
    when it starts the job: a second run that planned the job while the first was still
    writing them would delete them under the first run's readers. Kept instead, the job takes
    the stage's lock, finds the outputs complete and does nothing (`apo.job.Job.run`).
    """
    return update(path)


def external_input(ref):
    """A local file or directory as an input, so Snakemake reports a missing one before any
    job. Its content is in the stage's address, so its modification time must not trigger a
    rerun (`ancient`): a touched file with the same bytes redoes nothing."""
    return [ancient(ref.ref)] if isinstance(ref, External) and ref.local else []


def model_input(model):
    """Input files for a model: a stage's saved model, a local model directory, or nothing
    for a hub id."""
    return [model_path(model)] if isinstance(model, Stage) else external_input(model)


def shard_files(sharded):
    """A sharded stage's (sampling, evaluation) per-job outputs."""
    return [
        f"{sharded.dir}/{output_name(SHARD_RULE, 'shard', i)}"
        for i in range(sharded.settings["shards"])
    ]


def vstar_samples(vstar):
    """The sample shards a V* stage reads; none when it reads a published table."""
    samples = vstar.inputs.get("samples")
    return shard_files(samples) if samples is not None else []


def vstar_prompts(w):
    """The prepared prompts V* is for: those its samples were drawn for, or those a published
    table is joined to."""
    v = stage("vstar", w)
    source = v.inputs.get("samples", v)
    return output_file(source.inputs["prompts"], "prompts")


def upstream(kind, role, output=None):
    """Input function: the `output` (a role of its rule's outputs; none: the directory) of the
    stage that `kind`'s stage reads as `role`."""

    def files(w):
        up = stage(kind, w).inputs.get(role)
        if up is None:
            return []
        if isinstance(up, Stage):
            return output_file(up, output) if output else up.dir
        return external_input(up)  # nothing for a hub id

    return files


def upstream_model(kind=None, role="model"):
    """Input function: the saved model of the upstream stage (nothing for a hub id)."""
    return lambda w: model_input(stage(kind, w).inputs[role])


def upstream_model_path(kind=None, role="model"):
    """params: what `from_pretrained` loads: a stage's model directory or a hub id / path."""
    return lambda w: model_path(stage(kind, w).inputs[role])


def upstream_model_revision(kind=None, role="model"):
    """params: `--model-revision <rev>` for a hub model pinned by `model_revision`, else none."""

    def args(w):
        model = stage(kind, w).inputs[role]
        revision = getattr(model, "revision", None)
        return ["--model-revision", revision] if revision else []

    return args


def demo_dir(kind):
    """params: `--demo-dir <dir>` where a dataset is the embedded demo's, else none."""

    def args(w):
        source = stage(kind, w).inputs.get("source")
        return ["--demo-dir", source.dir] if isinstance(source, Stage) else []

    return args


def report_inputs(output):
    """Input function: an output of every evaluated training run (after the sweeps' picks)."""

    def files(w):
        resolve_picks()
        return [output_file(run, output) for run in PLAN.trains.values()]

    return files


def swept(label):
    """Whether an evaluated model is a run of a method with a sweep (known after its pick)."""
    return label != "reference" and PLAN.trains[label].settings["method"] in PLAN.grids


def fixed_scores():
    """The evaluations planned before any pick: the reference's and those of unswept methods."""
    return [
        output_file(evaluation, "scores")
        for (label, _), evaluation in PLAN.evals.items()
        if not swept(label)
    ]


def picked_scores(w):
    """Input function: the evaluations of the sweeps' picks (after the picks)."""
    resolve_picks()
    return [
        output_file(evaluation, "scores")
        for (label, _), evaluation in PLAN.evals.items()
        if swept(label)
    ]


def report_spec(w=None):
    """params: what the report reads (`apo.settings.Plan.report_spec`), as JSON."""
    resolve_picks()
    return json.dumps(PLAN.report_spec())


def job_resources(kind=None):
    """resources: what one job asks the cluster for, from config `resources.<kind>` (of the
    job's `kind` wildcard when None).

    `gpu` becomes sbatch --gpus under the Slurm profile; locally it is only a label."""
    keys = ("gpu", "mem_mb", "runtime", "cpus_per_task")
    if kind is not None:
        return {k: config["resources"][kind][k] for k in keys}
    return {k: lambda w, k=k: config["resources"][w.kind][k] for k in keys}


def extend_train_retries():
    """onstart: the train rule is retried resources.train.pieces - 1 times more than the others
    (--retries, the Slurm profile's 2 for node failures): each retry resumes a run cut by its
    job's time limit. Set when the run starts, the first moment Snakemake's retries are known.
    """
    train = rules.train.rule
    train.restart_times = (
        (workflow.execution_settings.retries or 0)
        + config["resources"]["train"]["pieces"]
        - 1
    )


ACCELERATE_CONFIGS = Path(workflow.basedir) / "workflow" / "accelerate"


def accelerate_args(wildcards, resources):
    """params: `accelerate launch` options, one training process per GPU of the job (a list,
    each item quoted in the shell command)."""
    if resources.gpu <= 1:
        # One process (one GPU, or CPU): nothing distributed to set up.
        return "--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    mode = config["resources"]["train"]["distributed"]
    return [
        "--config_file",
        str(ACCELERATE_CONFIGS / f"{mode}.yaml"),
        "--num_processes",
        str(resources.gpu),
    ]


def accelerate_port(wildcards, resources):
    """params: a port per Slurm job, so two training jobs on one node do not collide. A fixed
    shell expression (no path or config value in it), expanded by the job's shell."""
    if resources.gpu <= 1:
        return ""
    return "--main_process_port $((20000 + ${SLURM_JOB_ID:-$$} % 20000))"
