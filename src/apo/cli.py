"""`apo <stage>`: the command-line entry of every stage; the Snakemake rules call these.

Each stage command receives its manifest (the settings it reads, its input hashes; see
`apo.settings.Stage.manifest`) as JSON, and the runtime knobs that do not change results
(batch sizes, worker counts, tracking URI) separately. It logs to MLflow and, when its
outputs are complete, writes `manifest.json` into its stage directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def job_of(args):
    """The stage job a command line describes (`apo.job.Job`: its outputs, lock and record)."""
    from apo.job import LOCK_WAIT_S, Job

    return Job(args.command, Path(args.stage_dir), args.manifest, getattr(args, "shard", None),
               float(args.runtime.get("lock_wait_s", LOCK_WAIT_S)))


def job_inputs(args) -> list:
    """The paths one stage job reads (stage files among them are checked before it runs): its
    path arguments, and a sweep's grid runs' validations."""
    from apo.job import output_name

    paths = [getattr(args, name, None) for name in ("tokenizer", "demo_dir", "model", "prompts", "vstar", "validation")]
    paths += [*(getattr(args, "samples", None) or []), *(getattr(args, "shards", None) or [])]
    paths += [Path(r["dir"]) / output_name("train", "validation") for r in getattr(args, "runs", None) or []]
    return [p for p in paths if p]


@contextlib.contextmanager
def stage_job(args, run_suffix: str = "", run_id_file: str | None = None):
    """Tracking and bookkeeping around one stage job; yields the MLflow tracker. When the job
    succeeds, its manifest records the checksums of its outputs (`apo.job.Job.record`)."""
    from apo.tracking import Tracker, default_tracking_uri

    m = args.manifest
    stage_dir = Path(args.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    uri = args.runtime.get("tracking_uri") or default_tracking_uri(stage_dir.parent.parent)
    tracker = Tracker(
        uri,
        run_name=f"{m['kind']}-{m['hash']}{run_suffix}",
        params=m["settings"],
        tags={"stage": m["kind"], "hash": m["hash"], "stage_dir": str(stage_dir), **{
            f"input.{k}": v for k, v in m["inputs"].items()}},
        run_id_file=run_id_file,
    )
    try:
        yield tracker
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    job_of(args).record()


def cmd_lock(args):
    """`apo lock FILE -- COMMAND...`: run COMMAND holding the job lock FILE. The lock is
    inherited across exec, so it is held until COMMAND (e.g. `accelerate launch`, which starts
    one process per GPU, all after the lock is taken) ends or dies."""
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise SystemExit("apo lock: no command given after --")
    from apo.job import LOCK_WAIT_S, job_lock

    wait_s = LOCK_WAIT_S if args.wait_s is None else args.wait_s
    with job_lock(Path(args.file), " ".join(command), wait_s) as fh:
        os.set_inheritable(fh.fileno(), True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(command[0], command)


def cmd_demo(args):
    from apo import demo

    with stage_job(args) as tracker:
        tracker.log_metrics(demo.run(args.manifest["settings"], args.stage_dir))


def cmd_data(args):
    from apo import data
    from apo.io import write_json, write_parquet

    job = job_of(args)
    with stage_job(args) as tracker:
        df, counts = data.run(args.manifest["settings"], args.tokenizer, args.demo_dir, args.runtime["grading"])
        tracker.log_metrics(counts)
        write_parquet(job.output("prompts"), df)
        write_json(job.output("counts"), counts)
        log.info("%s: %s", job.output("prompts"), counts)


def cmd_sample(args):
    from apo import sample
    from apo.io import write_parquet

    m = args.manifest
    with stage_job(args, run_suffix=f"-shard{args.shard}") as tracker:
        df, metrics = sample.run_shard(m["kind"], m["settings"], args.model, args.prompts, args.shard,
                                       args.runtime["generation"], args.runtime["grading"])
        tracker.log_metrics(metrics)
        write_parquet(job_of(args).output("shard"), df)


def cmd_vstar(args):
    from apo import vstar
    from apo.io import write_json, write_parquet

    job = job_of(args)
    with stage_job(args) as tracker:
        kept, counts, metrics = vstar.run(args.manifest["settings"], args.prompts, args.samples or [])
        tracker.log_metrics(metrics)
        write_json(job.output("counts"), counts)
        write_parquet(job.output("vstar"), kept)


def cmd_train(args):
    from apo import train

    run = functools.partial(train.run, args.manifest["settings"], args.model, args.prompts, args.vstar,
                            args.stage_dir, args.runtime, args.validation)
    if int(os.environ.get("RANK", 0)) != 0:
        # Under `accelerate launch` with several GPUs the other processes train their share of
        # each batch; the main process alone tracks and writes the outputs.
        try:
            run()
        except train.TimeLimitReached as e:
            raise SystemExit(str(e)) from None
        return
    try:
        with stage_job(args, run_id_file=str(Path(args.stage_dir) / "checkpoints" / "mlflow_run_id")) as tracker:
            run(tracker=tracker)
    except train.TimeLimitReached as e:
        raise SystemExit(f"apo train {args.stage_dir}: {e}") from None


def cmd_sweep(args):
    from apo import sweep
    from apo.io import write_json

    with stage_job(args) as tracker:
        result = sweep.pick(args.runs)
        tracker.log_metrics({f"final_val_accuracy.{r['label']}": r["final_accuracy"] for r in result["runs"]})
        tracker.set_tags({"picked": result["label"]})
        log.info("%s: picked %s %s", args.manifest["settings"]["method"], result["label"], result["picked"])
        write_json(job_of(args).output("pick"), result)


def cmd_evaluate(args):
    from apo import evaluate
    from apo.io import write_json, write_parquet

    job = job_of(args)
    with stage_job(args) as tracker:
        samples, scores = evaluate.run(args.manifest["settings"], args.prompts, args.shards)
        tracker.log_metrics({k: v for k, v in scores.items() if isinstance(v, (int, float))})
        write_parquet(job.output("samples"), samples)
        write_json(job.output("scores"), scores)


def cmd_report(args):
    from apo import report
    from apo.tracking import Tracker, default_tracking_uri

    from apo.io import clean_dead_tmp

    spec, out = args.spec, Path(args.out_dir)
    clean_dead_tmp(out)
    table = report.write(spec, out)
    uri = args.runtime.get("tracking_uri") or default_tracking_uri(out.parent)
    tracker = Tracker(uri, run_name=f"report-{spec['experiment']}", params={"stages": spec["stages"]},
                      tags={"stage": "report", "experiment": spec["experiment"]})
    tracker.log_metrics({f"accuracy.{r.model}.{r.benchmark}": r.accuracy for r in table.itertuples()})
    for name in report.FILES:
        tracker.log_artifact(out / name)
    tracker.finish()
    if args.plan is not None:
        report.write_plan(spec, args.plan)


def cmd_verify(args):
    from apo.job import verify_results

    code = verify_results(args.dirs or ["results"])
    if code:
        raise SystemExit(code)


def cmd_bench_generation(args):
    from apo.tools import bench

    if (args.hidden_size is None) != (args.num_layers is None):
        raise SystemExit("apo bench-generation: give --hidden-size and --num-layers together")
    scale = None if args.hidden_size is None else (args.hidden_size, args.num_layers)
    if scale is not None and args.model is not None:
        raise SystemExit("apo bench-generation: --model or --hidden-size/--num-layers, not both")
    bench.run(args.config, args.prompts, args.repeats, args.model, scale)


def pin_model_revision(args) -> None:
    """A hub model pinned by `model_revision`: every loader (transformers, vLLM) gets the local
    snapshot of exactly that revision, so none of them can load another one."""
    revision = getattr(args, "model_revision", None)
    if not revision:
        return
    from huggingface_hub import snapshot_download

    attr = "tokenizer" if args.command == "data" else "model"
    ref = getattr(args, attr)
    setattr(args, attr, snapshot_download(ref, revision=revision))
    log.info("model %s at revision %s: %s", ref, revision, getattr(args, attr))


def cmd_import_model(args):
    from apo.import_model import ImportModelError, import_model

    try:
        digest = import_model(args.source, args.dest, args.dtype)
    except ImportModelError as e:
        raise SystemExit(f"apo import-model: {e}") from None
    print(f"{args.dest}: content sha256 {digest}; use it with `model: {args.dest}` in a config")


def cmd_plan(args):
    from apo.memory import MemoryPlanError, plan_from_files

    try:
        plan = plan_from_files(args.configfile, args.results, args.gpu_memory_gb)
        print(plan.table())
        plan.check()
    except MemoryPlanError as e:
        raise SystemExit(str(e)) from None


def cmd_prefetch(args):
    import yaml

    from apo import prefetch
    from apo.config import merge, validate_config

    if args.artefacts is not None:
        items = args.artefacts
    else:
        raw: dict = {}
        for path in args.configfile:
            with open(path) as fh:
                raw = merge(raw, yaml.safe_load(fh) or {})
        items = prefetch.artefacts(validate_config(raw, source=" + ".join(args.configfile)))
    if not items:
        print("nothing on the hub to fetch: the config's model and data are local or the demo")
    for item in prefetch.run(items, args.out) if items else []:
        print(f"{item['kind']:8s} {item['ref']}" + (f"@{item['revision']}" if item.get("revision") else ""))


def cmd_bench_steps(args):
    from apo.tools import bench_steps

    bench_steps.run(args.runs, args.config, args.steps, args.rounds)


def cmd_bench_peers(args):
    from apo.tools import bench_peers

    bench_peers.run(args.config, args.steps, args.rounds, args.methods.split(","), args.engines.split(","), args.batch)


def cmd_bench_grading(args):
    from apo.tools import bench_grading

    bench_grading.run(args.responses, args.workers, args.repeats, args.seed, args.timeout_s)


# The stage commands the rules call: (name, function, help, their own arguments). Every one
# also takes --manifest, --stage-dir and --runtime, and writes its rule's outputs
# (`apo.job.STAGE_OUTPUTS`) into the stage directory.
MODEL = ("--model", {"required": True, "help": "a stage's model directory, a local model or a hub id"})
REVISION = ("--model-revision", {"help": "hub revision of the model (model_revision)"})
PROMPTS = ("--prompts", {"required": True, "help": "a data stage's prompts.parquet"})
STAGE_COMMANDS = [
    ("demo", cmd_demo, "build the demo task and reference model", []),
    ("data", cmd_data, "prepare a prompt set into parquet",
     [("--tokenizer", {"required": True}), ("--model-revision", {"help": "hub revision of the tokenizer's model"}),
      ("--demo-dir", {})]),
    ("sample", cmd_sample, "sample and grade responses: one shard of reference sampling or of an evaluation",
     [MODEL, REVISION, PROMPTS, ("--shard", {"type": int, "required": True})]),
    ("vstar", cmd_vstar, "V* table from graded reference samples or a published stage-1 table",
     [("--samples", {"nargs": "+", "help": "the sample stage's shards (vstar.source: sample)"}), PROMPTS]),
    ("train", cmd_train, "stage 2: A*-PO or a baseline, on-policy",
     [MODEL, REVISION, PROMPTS, ("--vstar", {"help": "V* table (A*-PO only)"}),
      ("--validation", {"help": "validation prompts (data.validation), scored during training"})]),
    ("sweep", cmd_sweep, "a sweep's pick: the grid run with the best final validation accuracy",
     [("--runs", {"type": _json, "required": True, "help": "[{label, combo, dir}] of the grid's runs (JSON)"})]),
    ("evaluate", cmd_evaluate, "a benchmark's avg@k from its sampled shards",
     [PROMPTS, ("--shards", {"nargs": "+", "required": True})]),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=__package__, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_, arguments in STAGE_COMMANDS:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--manifest", type=_json, required=True, help="stage manifest (JSON)")
        sp.add_argument("--stage-dir", required=True, help="results/<stage>/<hash>")
        sp.add_argument("--runtime", type=_json, default={}, help="runtime knobs (JSON)")
        for flag, kwargs in arguments:
            sp.add_argument(flag, **kwargs)
        sp.set_defaults(fn=fn)
    add_tool_commands(sub)
    return p


def add_tool_commands(sub) -> None:
    """Commands that are not stages: the jobs' helpers and the benchmarks."""
    add_job_commands(sub)
    add_bench_commands(sub)


def add_job_commands(sub) -> None:
    """The training rule's lock, the report, `verify`, prefetching the hub's artefacts,
    importing a model, the memory plan."""
    sp = sub.add_parser("lock", help="run a command holding a stage job's lock (the training rule's launcher)")
    sp.add_argument("--wait-s", type=float, default=None,
                    help="how long to wait for another holder of the lock before failing (lock_wait_s); before FILE")
    sp.add_argument("file")
    sp.add_argument("command_line", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_lock)

    sp = sub.add_parser("report", help="tables and plots of one experiment")
    sp.add_argument("--spec", type=_json, required=True)
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--runtime", type=_json, default={}, help="runtime knobs (JSON)")
    sp.add_argument("--plan", default=None,
                    help="where to write the spec the report was made from (the workflow's plan-<digest>.json)")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("verify", help="check stage outputs against their manifests' checksums; say which to delete")
    sp.add_argument("dirs", nargs="*", help="stage directories, an experiment's directory (results/<experiment>: the "
                                            "stages it used) or a results directory (all of them); default results")
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("prefetch", help="download a config's hub models, datasets and tables into the HF cache")
    sp.add_argument("configfile", nargs="*", default=["config/config.yaml"],
                    help="config files, merged in order as snakemake --configfile does")
    sp.add_argument("--artefacts", type=_json, default=None, help="what to fetch (JSON; the workflow's rule passes it)")
    sp.add_argument("--out", default=None, help="where to record what was fetched (JSON)")
    sp.set_defaults(fn=cmd_prefetch)

    sp = sub.add_parser("import-model", help="a local GGUF file or checkpoint as a plain model directory")
    sp.add_argument("source", help="a .gguf file, or a model directory transformers loads")
    sp.add_argument("dest", help="the model directory to write (must not exist)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the weights' dtype in the written directory")
    sp.set_defaults(fn=cmd_import_model)

    sp = sub.add_parser("plan", help="per-GPU memory plan of each training job of a config")
    sp.add_argument("configfile", nargs="+", help="config files, merged in order as snakemake --configfile does")
    sp.add_argument("--results", default="results", help="where a built demo or local model is looked for")
    sp.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="check against this GPU memory (GiB) instead of resources.train.gpu_memory_gb")
    sp.set_defaults(fn=cmd_plan)


def add_bench_commands(sub) -> None:
    """Benchmarks that print figures side by side (apo.tools)."""
    from apo.methods import METHODS  # the registry alone: no torch

    sp = sub.add_parser("bench-generation", help="tokens/s of the vllm and hf backends, side by side")
    sp.add_argument("--config", default="config/config.yaml")
    sp.add_argument("--prompts", type=int, default=256, help="how many training prompts")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--model", default=None, help="another model directory (same tokenizer), instead of the demo model")
    sp.add_argument("--hidden-size", type=int, default=None, help="time a random-weight model of this width ...")
    sp.add_argument("--num-layers", type=int, default=None, help="... and depth (demo architecture and tokenizer)")
    sp.set_defaults(fn=cmd_bench_generation)

    sp = sub.add_parser("bench-grading", help="grading throughput: worker pool vs sequential, side by side")
    sp.add_argument("--responses", type=int, default=2000)
    sp.add_argument("--workers", type=int, default=2, help="pool size (grading.workers' default)")
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--timeout-s", type=float, default=5.0)
    sp.set_defaults(fn=cmd_bench_grading)

    sp = sub.add_parser("bench-steps", help="seconds per training step of each method, side by side")
    sp.add_argument("runs", nargs="+", help="finished training runs, e.g. results/compare/stages/train_*")
    sp.add_argument("--config", default="config/config.yaml", help="whose runtime knobs (engine batch, graders)")
    sp.add_argument("--steps", type=int, default=20, help="steps per timed run (the first 2 are not counted)")
    sp.add_argument("--rounds", type=int, default=2, help="runs per method, the methods taking turns")
    sp.set_defaults(fn=cmd_bench_steps)

    sp = sub.add_parser("bench-peers", help="the project's A*-PO and GRPO against TRL's trainers, side by side")
    sp.add_argument("--config", default="config/config.yaml", help="whose model, prompts, V* and settings")
    sp.add_argument("--steps", type=int, default=12, help="steps per timed run (the first 2 are not counted)")
    sp.add_argument("--rounds", type=int, default=3, help="runs per trainer, the trainers taking turns")
    peered = ",".join(m.name for m in METHODS.values() if m.peer)
    sp.add_argument("--methods", default=peered, help=f"comma-separated, of those with a TRL peer: {peered}")
    sp.add_argument("--engines", default="vllm,hf", help="the project's generation engines to time")
    sp.add_argument("--batch", type=int, default=16, help="prompts of the batch the A*-PO losses are compared on")
    sp.set_defaults(fn=cmd_bench_peers)


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command; a stage file that is not what its job wrote, or a lock held
    past `lock_wait_s`, ends it with that message alone (exit status 1), not a traceback."""
    from apo.job import LockTimeout, StageFileError

    try:
        return _main(argv)
    except (StageFileError, LockTimeout) as e:
        log.error("%s", e)
        return 1


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "stage_dir", None) is None:
        args.fn(args)
        return 0
    from apo.prefetch import offline_environment

    offline_environment(args.runtime)  # after `apo prefetch`: the hub cache only

    from apo.io import clean_dead_tmp
    from apo.job import verify_inputs

    # A changed input is an error here, before a job whose outputs are done would report
    # "nothing to do" over it.
    verify_inputs(job_inputs(args))
    job = job_of(args)
    if args.command == "train":
        # Locked by `apo lock` around `accelerate launch`: every process checks, none waits.
        if not job.done():
            if int(os.environ.get("RANK", 0)) == 0:
                clean_dead_tmp(args.stage_dir)
            pin_model_revision(args)
            args.fn(args)
        return 0

    def work():
        pin_model_revision(args)
        args.fn(args)

    job.run(work)
    return 0


def run() -> None:
    """The `apo` command: `main`, then leave without the interpreter's teardown.

    A stage job's outputs are written and closed (atomically) by the time `main` returns; what
    teardown would still do is finalize vLLM's engine and unload thousands of modules, which took
    3.5 s per generation job here. Errors take the normal path (traceback, exit status 1)."""
    code = main()
    if "apo.generation" in sys.modules:  # only a job that built an engine has files to remove
        sys.modules["apo.generation"].remove_rendezvous_files()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
