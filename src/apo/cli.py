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


@contextlib.contextmanager
def stage_job(args, run_suffix: str = "", run_id_file: str | None = None):
    """Tracking and bookkeeping around one stage job; yields the MLflow tracker."""
    from apo.io import write_json
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
    write_json(stage_dir / "manifest.json", m)


def cmd_demo(args):
    import tempfile

    from apo import demo
    from apo.io import move_into_place

    out = Path(args.stage_dir)
    with stage_job(args) as tracker, tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        info = demo.build(args.manifest["settings"], tmp, args.instruction)
        tracker.log_metrics(info)
        for name in ("train.jsonl", "test.jsonl", "valid.jsonl", "model"):  # the model last: rules wait for it
            move_into_place(Path(tmp) / name, out / name)


def cmd_data(args):
    from transformers import AutoTokenizer

    from apo import data
    from apo.io import write_json, write_parquet
    from apo.reward import Grader

    s = args.manifest["settings"]
    grading = args.runtime["grading"]
    with stage_job(args) as tracker, Grader(grading["timeout_s"], grading["workers"]) as grader:
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
    from apo.io import write_parquet

    from apo.io import write_json

    s = args.manifest["settings"]
    with stage_job(args) as tracker:
        if s.get("source") == "table":  # a published stage-1 table joined to the prompts
            samples, counts = vstar.samples_from_table(s["table"], pd.read_parquet(args.prompts))
            tracker.log_metrics(counts)
            write_json(Path(args.stage_dir) / "counts.json", counts)
            if counts["prompts_unmatched"]:
                log.warning("%d of %d training prompts are not in the stage-1 table %s: no V*, not trained on",
                            counts["prompts_unmatched"], counts["prompts"], s["table"]["path"])
        else:
            samples = pd.concat([pd.read_parquet(p) for p in args.samples], ignore_index=True)
        table = vstar.vstar_table(samples, s["beta1"])
        kept = vstar.filter_prompts(table, s["filter"])
        tracker.log_metrics(
            {"prompts": len(table), "prompts_kept": len(kept), "vstar_mean": table["vstar"].mean(),
             "mean_reward": table["mean_reward"].mean(),
             "unsolved": int((table["n_correct"] == 0).sum()),
             "always_solved": int((table["n_correct"] == table["n_samples"]).sum())}
        )
        log.info("V* for %d prompts; %d kept by filter %s", len(table), len(kept), s["filter"])
        write_parquet(args.out, kept)


def cmd_train(args):
    from apo import train
    from apo.io import write_json, write_parquet

    s = args.manifest["settings"]
    out = Path(args.stage_dir)
    run = functools.partial(
        train.train, s, args.model, args.prompts, args.vstar, out, args.runtime["generation"],
        args.runtime["grading"], gradient_checkpointing=args.runtime.get("train", {}).get("gradient_checkpointing", False),
        validation_path=args.validation,
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
    from apo.io import write_json, write_parquet

    s = args.manifest["settings"]
    out = Path(args.stage_dir)
    with stage_job(args) as tracker:
        samples = pd.concat([pd.read_parquet(f) for f in args.shards], ignore_index=True)
        scores = evaluate.scores(s, pd.read_parquet(args.prompts), samples)
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

    sp = stage("demo", cmd_demo, "build the demo task and reference model")
    sp.add_argument("--instruction", required=True)
    sp = stage("data", cmd_data, "prepare a prompt set into parquet")
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--demo-dir")
    sp.add_argument("--out", required=True)
    sp = stage("sample", cmd_sample, "sample and grade reference responses (one shard)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--shard", type=int, required=True)
    sp.add_argument("--out", required=True)
    sp = stage("vstar", cmd_vstar, "V* table from graded reference samples")
    sp.add_argument("--samples", nargs="+", help="graded reference samples (vstar.source: sample)")
    sp.add_argument("--prompts", help="training prompts to join the table to (vstar.source: table)")
    sp.add_argument("--out", required=True)
    sp = stage("train", cmd_train, "A*-PO stage 2 training")
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--vstar", help="V* table (A*-PO only)")
    sp.add_argument("--validation", help="validation prompts (data.validation), scored during training")
    sp = stage("pick", cmd_pick, "a sweep's pick: the grid run with the best final validation accuracy")
    sp.add_argument("--runs", type=_json, required=True, help="[{label, combo, dir}] of the grid's runs (JSON)")
    sp.add_argument("--out", required=True)
    sp = stage("evaluate", cmd_evaluate, "sample and grade k responses per problem (one shard of a benchmark)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--shard", type=int, required=True)
    sp.add_argument("--out", required=True)
    sp = stage("scores", cmd_scores, "a benchmark's avg@k from its evaluation shards")
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--shards", nargs="+", required=True)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
