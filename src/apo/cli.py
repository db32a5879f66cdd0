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
        "demo": ["train.jsonl", "test.jsonl", "model"],
        "data": ["counts.json"],
        "vstar": ["counts.json"],
        "train": ["metrics.parquet", "summary.json", "model"],
        "scores": ["scores.json", "samples.parquet"],
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
    import tempfile

    from apo import demo
    from apo.io import move_into_place

    out = Path(args.stage_dir)
    with stage_job(args) as tracker, tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        settings = args.manifest["settings"]
        info = demo.build(settings, tmp, settings["instruction"])
        tracker.log_metrics(info)
        for name in ("train.jsonl", "test.jsonl", "valid.jsonl", "model"):  # the model last: rules wait for it
            move_into_place(Path(tmp) / name, out / name)


def cmd_data(args):
    from transformers import AutoTokenizer

    from apo import data
    from apo.io import verify_stage_file, write_json, write_parquet
    from apo.reward import Grader

    s = args.manifest["settings"]
    grading = args.runtime["grading"]
    with stage_job(args) as tracker, Grader(grading["timeout_s"], grading["workers"], s["grading_method"]) as grader:
        if args.demo_dir:
            verify_stage_file(Path(args.demo_dir) / f"{s['split']}.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        df, counts = data.prepare(s, s["prompt"], tokenizer, args.demo_dir, grader)
        tracker.log_metrics(counts)
        write_parquet(args.out, df)
        write_json(Path(args.stage_dir) / "counts.json", counts)
        log.info("%s: %s", args.out, counts)


def cmd_sample(args):
    from apo import sample
    from apo.io import write_parquet

    s = args.manifest["settings"]
    with stage_job(args, run_suffix=f"-shard{args.shard}") as tracker:
        df = sample.run(s, args.model, args.prompts, args.shard, args.runtime["generation"], args.runtime["grading"])
        tracker.log_metrics(
            {"mean_reward": df["reward"].mean(), "responses": len(df),
             "ungraded": int((df["status"] != "ok").sum()), "mean_tokens": df["num_tokens"].mean()}
        )
        write_parquet(args.out, df)


def cmd_vstar(args):
    import pandas as pd

    from apo import vstar
    from apo.io import read_json, read_stage_parquet, write_json, write_parquet

    s = args.manifest["settings"]
    with stage_job(args) as tracker:
        prompts = read_stage_parquet(args.prompts)
        if s.get("source") == "table":  # a published stage-1 table joined to the prompts
            samples, counts = vstar.samples_from_table(s["table"], prompts)
            if counts["prompts_unmatched"]:
                log.warning("%d of %d training prompts are not in the stage-1 table %s: no V*, not trained on",
                            counts["prompts_unmatched"], counts["prompts"], s["table"]["path"])
        else:
            samples = pd.concat([read_stage_parquet(p) for p in args.samples], ignore_index=True)
            sample_dir = Path(args.samples[0]).parent
            sampled = read_json(sample_dir / "manifest.json")["settings"]
            vstar.check_samples(samples, prompts, sampled["n"], sampled["shards"], str(sample_dir))
            counts = {"prompts": len(prompts)}
        table = vstar.vstar_table(samples, s["beta1"])
        kept = vstar.filter_prompts(table, s["filter"])
        counts.update(prompts_kept=len(kept), dropped_by_filter=len(table) - len(kept))
        tracker.log_metrics(
            {**counts, "vstar_mean": table["vstar"].mean(),
             "mean_reward": table["mean_reward"].mean(),
             "unsolved": int((table["n_correct"] == 0).sum()),
             "always_solved": int((table["n_correct"] == table["n_samples"]).sum())}
        )
        log.info("V* for %d prompts; %d kept by filter %s", len(table), len(kept), s["filter"])
        write_json(Path(args.stage_dir) / "counts.json", counts)
        write_parquet(args.out, kept)


def cmd_train(args):
    from apo import train
    from apo.io import write_json, write_parquet

    s = args.manifest["settings"]
    out = Path(args.stage_dir)
    run = functools.partial(
        train.train, s, args.model, args.prompts, args.vstar, out, args.runtime["generation"],
        args.runtime["grading"], gradient_checkpointing=args.runtime.get("train", {}).get("gradient_checkpointing", False),
        validation_path=args.validation, distributed=args.runtime.get("train", {}).get("distributed", "ddp"),
    )
    if int(os.environ.get("RANK", 0)) != 0:
        # Under `accelerate launch` with several GPUs the other processes train their share of
        # each batch; the main process alone tracks and writes the outputs.
        run()
        return
    with stage_job(args, run_id_file=str(out / "checkpoints" / "mlflow_run_id")) as tracker:
        result = run(tracker=tracker)
        tracker.log_metrics({f"final.{k}": v for k, v in result["summary"].items()
                             if isinstance(v, (int, float))})
        write_json(out / "summary.json", result["summary"])
        write_parquet(out / "validation.parquet", result["validation"])
        write_parquet(out / "metrics.parquet", result["history"])


def cmd_pick(args):
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
    from apo.io import write_parquet

    s = args.manifest["settings"]
    with stage_job(args, run_suffix=f"-shard{args.shard}"):
        df = evaluate.run_shard(s, args.model, args.prompts, args.shard, args.runtime["generation"], args.runtime["grading"])
        write_parquet(args.out, df)


def cmd_scores(args):
    import pandas as pd

    from apo import evaluate
    from apo.io import read_stage_parquet, write_json, write_parquet

    s = args.manifest["settings"]
    out = Path(args.stage_dir)
    with stage_job(args) as tracker:
        samples = pd.concat([read_stage_parquet(f) for f in args.shards], ignore_index=True)
        scores = evaluate.scores(s, read_stage_parquet(args.prompts), samples)
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
    for name in ("report.md", "summary.csv", "paper_table.csv", "paper_table.tex", "training_curves.png",
                 "validation_time.png", "validation_steps.png", "time_to_accuracy.csv"):
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


def cmd_bench_grading(args):
    from apo import bench_grading

    bench_grading.run(args.responses, args.workers, args.repeats, args.seed, args.timeout_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--manifest", type=_json, required=True, help="stage manifest (JSON)")
        sp.add_argument("--stage-dir", required=True, help="results/<stage>/<hash>")
        sp.add_argument("--runtime", type=_json, default={}, help="runtime knobs (JSON)")
        sp.set_defaults(fn=fn)
        return sp

    stage("demo", cmd_demo, "build the demo task and reference model")
    sp = stage("data", cmd_data, "prepare a prompt set into parquet")
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--model-revision", help="hub revision of the tokenizer's model (model_revision)")
    sp.add_argument("--demo-dir")
    sp.add_argument("--out", required=True)
    sp = stage("sample", cmd_sample, "sample and grade reference responses (one shard)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--model-revision", help="hub revision of the model (model_revision)")
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--shard", type=int, required=True)
    sp.add_argument("--out", required=True)
    sp = stage("vstar", cmd_vstar, "V* table from graded reference samples")
    sp.add_argument("--samples", nargs="+", help="graded reference samples (vstar.source: sample)")
    sp.add_argument("--prompts", required=True, help="the prepared training prompts")
    sp.add_argument("--out", required=True)
    sp = stage("train", cmd_train, "A*-PO stage 2 training")
    sp.add_argument("--model", required=True)
    sp.add_argument("--model-revision", help="hub revision of the model (model_revision)")
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--vstar", help="V* table (A*-PO only)")
    sp.add_argument("--validation", help="validation prompts (data.validation), scored during training")
    sp = stage("pick", cmd_pick, "a sweep's pick: the grid run with the best final validation accuracy")
    sp.add_argument("--runs", type=_json, required=True, help="[{label, combo, dir}] of the grid's runs (JSON)")
    sp.add_argument("--out", required=True)
    sp = stage("evaluate", cmd_evaluate, "sample and grade k responses per problem (one shard of a benchmark)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--model-revision", help="hub revision of the model (model_revision)")
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--shard", type=int, required=True)
    sp.add_argument("--out", required=True)
    sp = stage("scores", cmd_scores, "a benchmark's avg@k from its evaluation shards")
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--shards", nargs="+", required=True)

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

    sp = sub.add_parser("plan", help="per-GPU memory plan of each training job of a config")
    sp.add_argument("configfile", nargs="+", help="config files, merged in order as snakemake --configfile does")
    sp.add_argument("--results", default="results", help="where a built demo or local model is looked for")
    sp.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="check against this GPU memory (GiB) instead of resources.train.gpu_memory_gb")
    sp.set_defaults(fn=cmd_plan)


    sp = sub.add_parser("bench-grading", help="grading throughput: worker pool vs sequential, side by side")
    sp.add_argument("--responses", type=int, default=2000)
    sp.add_argument("--workers", type=int, default=2, help="pool size (grading.workers' default)")
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--timeout-s", type=float, default=5.0)
    sp.set_defaults(fn=cmd_bench_grading)
    return p


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
