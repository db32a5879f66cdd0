import json
import sys
from pathlib import Path

from apo.config import validate_config
from apo.memory import workflow_plan
from apo.settings import External, Plan, Stage, model_path
from apo.tracking import check_reachable

# Validate before any job is planned: a bad key stops the run here, naming the key. The
# config is the file given with --configfile (config/config.yaml, the demo, when none is:
# profiles/default), with its `extends` file under it; nothing else is merged in.
_validated = validate_config(
    config,
    Path(workflow.basedir) / "workflow/schemas/config.schema.yaml",
    base_dir=workflow.basedir,
)
config.clear()
config.update(_validated)

# Once per plan rather than minutes of retries in every job.
check_reachable(config["tracking_uri"])

RESULTS = "results"
PLAN = Plan(config, RESULTS)
EXPERIMENT_DIR = f"{RESULTS}/{PLAN.experiment}"

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


def picked_combo(pick_file):
    return json.loads(Path(pick_file).read_text())["picked"]


# A sweep's pick made in an earlier run (or by the checkpoint before this job was started)
# plans its runs on the other seeds and the evaluations; `resolve_picks` waits for the rest.
for _method, _pick in PLAN.picks.items():
    if Path(f"{_pick.dir}/pick.json").exists():
        PLAN.add_pick(_method, picked_combo(f"{_pick.dir}/pick.json"))


def resolve_picks():
    """Every sweep's pick, in the plan; raises Snakemake's incomplete-checkpoint signal (so the
    DAG waits for the pick job) while one is not made yet."""
    for method, s in PLAN.picks.items():
        if method not in PLAN.picked:
            PLAN.add_pick(
                method, picked_combo(checkpoints.pick.get(h=s.hash).output[0])
            )


def pick_runs(pick):
    """params: the grid's runs of a pick stage, as JSON for `apo pick`."""
    grid = {label: combo for label, combo in zip(pick.inputs, pick.settings["grid"])}
    return json.dumps(
        [
            {"label": label, "combo": grid[label], "dir": s.dir}
            for label, s in pick.inputs.items()
        ]
    )


# Knobs that change how fast, not what: they are not part of any stage's address.
RUNTIME = json.dumps(
    {
        "generation": {
            "batch_size": config["generation"]["batch_size"],
            "vllm": config["generation"]["vllm"],
        },
        "grading": {k: config["grading"][k] for k in ("timeout_s", "workers")},
        "tracking_uri": config["tracking_uri"],
        "train": {
            "gradient_checkpointing": config["train"]["gradient_checkpointing"],
            "distributed": config["resources"]["train"]["distributed"],
        },
    }
)

HASH = r"[0-9a-f]{12}"


def stage(kind, wildcards):
    return PLAN.get(kind, wildcards.h)


def manifest(kind):
    """params: the stage's manifest as JSON, for the `apo` command line."""
    return lambda w: json.dumps(stage(kind, w).manifest())


def stage_dir(kind):
    """params: the stage's directory, results/<kind>/<hash>."""
    return lambda w: stage(kind, w).dir


def external_input(ref):
    """A local file or directory as an input, so Snakemake reports a missing one before any
    job. Its content is in the stage's address, so its modification time must not trigger a
    rerun (`ancient`): a touched file with the same bytes redoes nothing."""
    return [ancient(ref.ref)] if isinstance(ref, External) and ref.local else []


def model_input(model):
    """Input files for a model: a stage's saved model, a local model directory, or nothing
    for a hub id."""
    return [model_path(model)] if isinstance(model, Stage) else external_input(model)


def shard_files(s):
    """A sharded stage's (sampling, evaluation) per-job outputs."""
    return [f"{s.dir}/shard-{i}.parquet" for i in range(s.settings["shards"])]


def vstar_samples(vstar):
    """The sample shards a V* stage reads; none when it reads a published table."""
    samples = vstar.inputs.get("samples")
    return shard_files(samples) if samples is not None else []


def vstar_prompts(w):
    """The prepared prompts V* is for: those its samples were drawn for, or those a published
    table is joined to."""
    v = stage("vstar", w)
    source = v.inputs.get("samples", v)
    return f"{source.inputs['prompts'].dir}/prompts.parquet"


def upstream(kind, role, filename=None):
    """Input function: a file of the stage that `kind`'s stage reads as `role`."""

    def files(w):
        up = stage(kind, w).inputs.get(role)
        if up is None:
            return []
        if isinstance(up, Stage):
            return f"{up.dir}/{filename}" if filename else up.dir
        return external_input(up)  # nothing for a hub id

    return files


def upstream_model(kind, role="model"):
    """Input function: the saved model of the upstream stage (nothing for a hub id)."""
    return lambda w: model_input(stage(kind, w).inputs[role])


def upstream_model_path(kind, role="model"):
    """params: what `from_pretrained` loads: a stage's model directory or a hub id / path."""
    return lambda w: model_path(stage(kind, w).inputs[role])


def upstream_model_revision(kind, role="model"):
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


def report_inputs(filename):
    """Input function: a file of every evaluated training run (after the sweeps' picks)."""

    def files(w):
        resolve_picks()
        return [f"{s.dir}/{filename}" for s in PLAN.trains.values()]

    return files


def swept(label):
    """Whether an evaluated model is a run of a method with a sweep (known after its pick)."""
    return label != "reference" and PLAN.trains[label].settings["method"] in PLAN.grids


def fixed_scores():
    """The evaluations planned before any pick: the reference's and those of unswept methods."""
    return [
        f"{s.dir}/scores.json"
        for (label, _), s in PLAN.evals.items()
        if not swept(label)
    ]


def picked_scores(w):
    """Input function: the evaluations of the sweeps' picks (after the picks)."""
    resolve_picks()
    return [
        f"{s.dir}/scores.json" for (label, _), s in PLAN.evals.items() if swept(label)
    ]


def sweep_spec():
    """Every run of every sweep, its combination and whether it is the method's pick."""
    return [
        {
            "method": method,
            "label": f"{method}-{label}",
            "combo": combo,
            "dir": s.dir,
            "picked": combo == PLAN.picked.get(method),
        }
        for method, runs in PLAN.grids.items()
        for (label, s), combo in zip(runs.items(), PLAN.picks[method].settings["grid"])
    ]


def report_spec(w=None):
    """What the report reads: every evaluation and training run of this experiment."""
    resolve_picks()
    return json.dumps(
        {
            "experiment": PLAN.experiment,
            "evals": [
                {"model": label, "benchmark": bench, "dir": s.dir}
                for (label, bench), s in PLAN.evals.items()
            ],
            "trainings": [
                {
                    "label": label,
                    "dir": s.dir,
                    "method": s.settings["method"],
                    "seed": s.settings["seed"],
                }
                for label, s in PLAN.trains.items()
            ],
            "validation": validation_spec(),
            "sweep": sweep_spec(),
            "stages": {
                name: s.dir
                for name, s in [
                    ("demo_model", PLAN.demo),
                    ("data_train", PLAN.train_data),
                    *[(f"data_{b}", s) for b, s in PLAN.benchmarks.items()],
                    ("data_validation", PLAN.validation),
                    ("sample", PLAN.sample),
                    ("vstar", PLAN.vstar),
                    *[(f"train_{label}", s) for label, s in PLAN.trains.items()],
                    *[(f"pick_{m}", s) for m, s in PLAN.picks.items()],
                ]
                if s is not None
            },
        }
    )


def validation_spec():
    """What the report says of the validation set: which it is, and whether the config
    declares it a test benchmark's (data.validation_on_benchmark)."""
    spec = config["data"]["validation"]
    if spec is None:
        return None
    return {
        "dataset": f"{spec['path']} split {spec['split']}",
        "on_benchmark": config["data"]["validation_on_benchmark"],
    }


def job_resources(section):
    """resources: what one job asks the cluster for, from config `resources.<section>`.

    `gpu` becomes sbatch --gpus under the Slurm profile; locally it is only a label."""
    r = config["resources"][section]
    return {k: r[k] for k in ("gpu", "mem_mb", "runtime", "cpus_per_task")}


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
