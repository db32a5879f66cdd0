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

log = logging.getLogger("apo")


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def job_outputs(args) -> list[Path]:
    """The files and directories one stage job writes: its rule's outputs (and counts)."""
    d = Path(args.stage_dir)
    named = {
        "demo": ["train.jsonl", "test.jsonl", "valid.jsonl", "model"],
        "data": ["counts.json"],
        "vstar": ["counts.json"],
        "train": ["metrics.parquet", "summary.json", "validation.parquet", "model"],
        "evaluate": ["scores.json", "samples.parquet"],
    }.get(args.command, [])
    return [d / name for name in named] + ([Path(args.out)] if getattr(args, "out", None) else [])


@contextlib.contextmanager
def stage_job(args, run_suffix: str = "", run_id_file: str | None = None):
    """Tracking and bookkeeping around one stage job; yields the MLflow tracker. When the job
    succeeds, its manifest records the checksums of its outputs (`apo.io.record_outputs`)."""
    from apo.io import record_outputs
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
    record_outputs(stage_dir, m, job_outputs(args))


# Two snakemake runs of overlapping experiments may start the same job at once (the workflow
# profile sets `nolock`, so a killed run needs no `--unlock`). Each job holds an OS lock on a
# file in its stage directory, which the kernel releases when the process dies: a second job
# for the same outputs waits for the first, then finds them written and stops.


def lock_path(args) -> Path:
    shard = f"-{args.shard}" if getattr(args, "shard", None) is not None else ""
    return Path(args.stage_dir) / f".{args.command}{shard}.lock"


@contextlib.contextmanager
def job_lock(path: Path, what: str):
    """Hold an exclusive lock on `path`, waiting (with a message naming the holder) while
    another process holds it. The lock file says who holds it."""
    import fcntl
    import socket
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a process"
            log.warning("%s: another job is writing these outputs (%s); waiting for it", path.parent, holder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}\n")
        fh.flush()
        yield fh


def outputs_done(args) -> bool:
    """Whether this job's outputs are complete: present, and their checksums recorded in the
    stage manifest under this address (what a finished job leaves, and the only way a job
    that waited for the lock finds them: Snakemake removes a job's outputs before it starts)."""
    from apo.io import file_sha256, read_json

    manifest, outputs = Path(args.stage_dir) / "manifest.json", job_outputs(args)
    if not manifest.exists() or not all(p.exists() for p in outputs):
        return False
    m = read_json(manifest)
    recorded = m.get("outputs", {})
    return m.get("hash") == args.manifest.get("hash") and all(
        recorded.get(p.name) == file_sha256(p) for p in outputs if p.is_file()
    )


def cmd_lock(args):
    """`apo lock FILE -- COMMAND...`: run COMMAND holding the job lock FILE. The lock is
    inherited across exec, so it is held until COMMAND (e.g. `accelerate launch`, which starts
    one process per GPU, all after the lock is taken) ends or dies."""
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise SystemExit("apo lock: no command given after --")
    with job_lock(Path(args.file), " ".join(command)) as fh:
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

    with stage_job(args) as tracker:
        df, counts = data.run(args.manifest["settings"], args.tokenizer, args.demo_dir, args.runtime["grading"])
        tracker.log_metrics(counts)
        write_parquet(args.out, df)
        write_json(Path(args.stage_dir) / "counts.json", counts)
        log.info("%s: %s", args.out, counts)


def cmd_sample(args):
    from apo import sample
    from apo.io import write_parquet

    m = args.manifest
    with stage_job(args, run_suffix=f"-shard{args.shard}") as tracker:
        df, metrics = sample.run_shard(m["kind"], m["settings"], args.model, args.prompts, args.shard,
                                       args.runtime["generation"], args.runtime["grading"])
        tracker.log_metrics(metrics)
        write_parquet(args.out, df)


def cmd_vstar(args):
    from apo import vstar
    from apo.io import write_json, write_parquet

    with stage_job(args) as tracker:
        kept, counts, metrics = vstar.run(args.manifest["settings"], args.prompts, args.samples or [])
        tracker.log_metrics(metrics)
        write_json(Path(args.stage_dir) / "counts.json", counts)
        write_parquet(args.out, kept)


def cmd_train(args):
    from apo import train

    run = functools.partial(train.run, args.manifest["settings"], args.model, args.prompts, args.vstar,
                            args.stage_dir, args.runtime, args.validation)
    if int(os.environ.get("RANK", 0)) != 0:
        # Under `accelerate launch` with several GPUs the other processes train their share of
        # each batch; the main process alone tracks and writes the outputs.
        run()
        return
    with stage_job(args, run_id_file=str(Path(args.stage_dir) / "checkpoints" / "mlflow_run_id")) as tracker:
        run(tracker=tracker)


def cmd_sweep(args):
    from apo import sweep
    from apo.io import write_json

    with stage_job(args) as tracker:
        result = sweep.pick(args.runs)
        tracker.log_metrics({f"final_val_accuracy.{r['label']}": r["final_accuracy"] for r in result["runs"]})
        tracker.set_tags({"picked": result["label"]})
        log.info("%s: picked %s %s", args.manifest["settings"]["method"], result["label"], result["picked"])
        write_json(args.out, result)


def cmd_evaluate(args):
    from apo import evaluate
    from apo.io import write_json, write_parquet

    out = Path(args.stage_dir)
    with stage_job(args) as tracker:
        samples, scores = evaluate.run(args.manifest["settings"], args.prompts, args.shards)
        tracker.log_metrics({k: v for k, v in scores.items() if isinstance(v, (int, float))})
        write_parquet(out / "samples.parquet", samples)
        write_json(out / "scores.json", scores)


def cmd_report(args):
    from apo import report
    from apo.tracking import Tracker, default_tracking_uri

    spec, out = args.spec, Path(args.out_dir)
    table = report.write(spec, out)
    uri = args.runtime.get("tracking_uri") or default_tracking_uri(out.parent)
    tracker = Tracker(uri, run_name=f"report-{spec['experiment']}", params={"stages": spec["stages"]},
                      tags={"stage": "report", "experiment": spec["experiment"]})
    tracker.log_metrics({f"accuracy.{r.model}.{r.benchmark}": r.accuracy for r in table.itertuples()})
    for name in report.FILES:
        tracker.log_artifact(out / name)
    tracker.finish()


def cmd_bench_generation(args):
    from apo import bench

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


def cmd_plan(args):
    from apo.memory import MemoryPlanError, plan_from_files

    try:
        plan = plan_from_files(args.configfile, args.results, args.gpu_memory_gb)
        print(plan.table())
        plan.check()
    except MemoryPlanError as e:
        raise SystemExit(str(e)) from None


def cmd_bench_steps(args):
    from apo import bench_steps

    bench_steps.run(args.runs, args.config, args.steps, args.rounds)


def cmd_bench_peers(args):
    from apo import bench_peers

    bench_peers.run(args.config, args.steps, args.rounds, args.methods.split(","), args.engines.split(","), args.batch)


def cmd_bench_grading(args):
    from apo import bench_grading

    bench_grading.run(args.responses, args.workers, args.repeats, args.seed, args.timeout_s)


# The stage commands the rules call: (name, function, help, their own arguments). Every one
# also takes --manifest, --stage-dir and --runtime.
MODEL = ("--model", {"required": True, "help": "a stage's model directory, a local model or a hub id"})
REVISION = ("--model-revision", {"help": "hub revision of the model (model_revision)"})
PROMPTS = ("--prompts", {"required": True, "help": "a data stage's prompts.parquet"})
OUT = ("--out", {"required": True})
STAGE_COMMANDS = [
    ("demo", cmd_demo, "build the demo task and reference model", []),
    ("data", cmd_data, "prepare a prompt set into parquet",
     [("--tokenizer", {"required": True}), ("--model-revision", {"help": "hub revision of the tokenizer's model"}),
      ("--demo-dir", {}), OUT]),
    ("sample", cmd_sample, "sample and grade responses: one shard of reference sampling or of an evaluation",
     [MODEL, REVISION, PROMPTS, ("--shard", {"type": int, "required": True}), OUT]),
    ("vstar", cmd_vstar, "V* table from graded reference samples or a published stage-1 table",
     [("--samples", {"nargs": "+", "help": "the sample stage's shards (vstar.source: sample)"}), PROMPTS, OUT]),
    ("train", cmd_train, "stage 2: A*-PO or a baseline, on-policy",
     [MODEL, REVISION, PROMPTS, ("--vstar", {"help": "V* table (A*-PO only)"}),
      ("--validation", {"help": "validation prompts (data.validation), scored during training"})]),
    ("sweep", cmd_sweep, "a sweep's pick: the grid run with the best final validation accuracy",
     [("--runs", {"type": _json, "required": True, "help": "[{label, combo, dir}] of the grid's runs (JSON)"}), OUT]),
    ("evaluate", cmd_evaluate, "a benchmark's avg@k from its sampled shards",
     [PROMPTS, ("--shards", {"nargs": "+", "required": True})]),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apo", description=__doc__.splitlines()[0])
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
    """Commands that are not stages: the training rule's lock, the report, benchmarks, the plan."""
    sp = sub.add_parser("lock", help="run a command holding a stage job's lock (the training rule's launcher)")
    sp.add_argument("file")
    sp.add_argument("command_line", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_lock)

    sp = sub.add_parser("report", help="tables and plots of one experiment")
    sp.add_argument("--spec", type=_json, required=True)
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--runtime", type=_json, default={}, help="runtime knobs (JSON)")
    sp.set_defaults(fn=cmd_report)

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
    sp.add_argument("--methods", default="apo,grpo", help="comma-separated: apo, grpo")
    sp.add_argument("--engines", default="vllm,hf", help="the project's generation engines to time")
    sp.add_argument("--batch", type=int, default=16, help="prompts of the batch the A*-PO losses are compared on")
    sp.set_defaults(fn=cmd_bench_peers)

    sp = sub.add_parser("plan", help="per-GPU memory plan of each training job of a config")
    sp.add_argument("configfile", nargs="+", help="config files, merged in order as snakemake --configfile does")
    sp.add_argument("--results", default="results", help="where a built demo or local model is looked for")
    sp.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="check against this GPU memory (GiB) instead of resources.train.gpu_memory_gb")
    sp.set_defaults(fn=cmd_plan)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "stage_dir", None) is None:
        args.fn(args)
        return 0
    if args.command == "train":
        # Locked by `apo lock` around `accelerate launch`: every process checks, none waits.
        if not outputs_done(args):
            pin_model_revision(args)
            args.fn(args)
        return 0
    with job_lock(lock_path(args), f"apo {args.command} {args.stage_dir}"):
        if outputs_done(args):
            log.info("%s: outputs already written by the job that held the lock; nothing to do", args.stage_dir)
            return 0
        pin_model_revision(args)
        args.fn(args)
    return 0


def run() -> None:
    """The `apo` command: `main`, then leave without the interpreter's teardown.

    A stage job's outputs are written and closed (atomically) by the time `main` returns; what
    teardown would still do is finalize vLLM's engine and unload thousands of modules, which took
    3.5 s per generation job here. Errors take the normal path (traceback, exit status 1)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
