"""The stage-job contract (apo.job): every reader of a stage output checks it against the
checksums its job recorded, and `apo verify` checks whole stage directories."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from apo import report, sweep
from apo.io import read_json
from apo.job import StageFileError, read_stage_json, record_outputs, verify_if_stage, verify_results

APO = Path(sys.executable).with_name("apo")


def finished(results: Path, kind: str, files: dict, h: str = "0123456789ab") -> Path:
    """A stage directory as its job leaves it: `files` ({relative name: bytes}) and their
    checksums in manifest.json."""
    d = results / kind / h
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    tops = sorted({d / Path(name).parts[0] for name in files})
    record_outputs(d, {"kind": kind, "hash": h}, tops)
    return d


def parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


MODEL = {"model/config.json": b"{}", "model/model.safetensors": b"weights"}


def test_a_replaced_model_file_is_not_evaluated_as_the_trained_model(tmp_path):
    d = finished(tmp_path / "results", "train", MODEL)
    assert set(read_json(d / "manifest.json")["outputs"]) == set(MODEL)  # each file of the model
    verify_if_stage(d / "model")
    (d / "model" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(StageFileError, match=rf"{d}/model/model.safetensors: its content does not match the checksum "
                                             rf".*delete {d}/model and rerun snakemake \(rule train writes it again"):
        verify_if_stage(d / "model")
    verify_if_stage("Qwen/Qwen2.5-1.5B")  # a hub id or a local model is addressed by content, not checked here


def test_a_file_added_to_a_model_or_one_missing_from_it_is_an_error(tmp_path):
    d = finished(tmp_path / "results", "demo", MODEL)
    (d / "model" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(StageFileError, match=rf"{d}/model/pytorch_model.bin: not among the outputs its job recorded"):
        verify_if_stage(d / "model")
    (d / "model" / "pytorch_model.bin").unlink()
    (d / "model" / "config.json").unlink()
    with pytest.raises(StageFileError, match=rf"{d}/model/config.json: missing; .*rule demo"):
        verify_if_stage(d / "model")


def test_an_edited_score_does_not_reach_the_report(tmp_path):
    scores = {"accuracy": 0.5, "n": 2, "n_rows": 2, "n_counted": 2, "k": 1, "temperature": 0, "top_p": 1,
              "max_new_tokens": 8, "unparsed": 0}
    d = finished(tmp_path / "results", "evaluate", {"scores.json": json.dumps(scores).encode()})
    evals = [{"dir": str(d), "benchmark": "b", "model": "m"}]
    assert report.summary_table(evals)["accuracy"].tolist() == [50.0]
    (d / "scores.json").write_text(json.dumps({**scores, "accuracy": 0.9}))
    with pytest.raises(StageFileError, match=rf"{d}/scores.json: its content does not match .*rule evaluate"):
        report.summary_table(evals)


def test_an_edited_validation_does_not_reach_the_sweeps_pick(tmp_path):
    runs = []
    for i, acc in enumerate([0.2, 0.4]):
        v = pd.DataFrame({"step": [0, 2], "accuracy": [0.1, acc], "train_time_s": [0.0, 1.0]})
        d = finished(tmp_path / "results", "train", {"validation.parquet": parquet(v)}, h=f"{i:012d}")
        runs.append({"label": f"lr{i}", "combo": {"lr": i}, "dir": str(d)})
    assert sweep.pick(runs)["label"] == "lr1"
    edited = pd.DataFrame({"step": [0, 2], "accuracy": [0.1, 0.9], "train_time_s": [0.0, 1.0]})
    edited.to_parquet(Path(runs[0]["dir"]) / "validation.parquet")
    with pytest.raises(StageFileError, match=r"000000000000/validation.parquet: its content does not match .*rule train"):
        sweep.pick(runs)


def test_a_truncated_json_names_the_file(tmp_path):
    d = finished(tmp_path / "results", "sweep", {"pick.json": b'{"picked": {"lr": 0.1'})  # written so by its job
    with pytest.raises(StageFileError, match=rf"{d}/pick.json: not valid JSON .*; delete it and rerun snakemake "
                                             r"\(rule sweep writes it again\)"):
        read_stage_json(d / "pick.json")
    (tmp_path / "state.json").write_text('{"step": 3')
    with pytest.raises(ValueError, match=rf"{tmp_path}/state.json: not valid JSON"):
        read_json(tmp_path / "state.json")


def test_apo_verify_names_every_bad_stage_and_what_to_delete(tmp_path):
    results = tmp_path / "results"
    good = finished(results, "data", {"prompts.parquet": b"rows", "counts.json": b"{}"})
    model = finished(results, "train", {**MODEL, "summary.json": b"{}"})
    (model / "checkpoints").mkdir()  # not an output: checked when resumed
    (model / "checkpoints" / "x").write_bytes(b"")
    shards = finished(results, "sample", {"shard-0.parquet": b"a", "shard-1.parquet": b"b"})
    (model / "model" / "model.safetensors").write_bytes(b"replaced")
    (shards / "shard-1.parquet").unlink()
    unrecorded = results / "evaluate" / "abcdefabcdef"
    unrecorded.mkdir(parents=True)
    (unrecorded / "scores.json").write_text("{}")  # a job that never recorded it

    out = io.StringIO()
    assert verify_results([str(results)], out) == 1
    text = out.getvalue()
    assert f"{model}/model/model.safetensors: its content does not match" in text
    assert f"{shards}/shard-1.parquet: missing" in text
    assert f"{unrecorded}: no manifest.json, but outputs ['scores.json']" in text
    assert str(good) not in text
    assert text.rstrip().endswith(f"rm -r {unrecorded} {shards} {model}")

    out = io.StringIO()
    assert verify_results([str(good)], out) == 0 and "every output is what its job wrote" in out.getvalue()
    experiment = results / "exp" / "stages"
    experiment.mkdir(parents=True)
    (experiment / "data_train").symlink_to(good, target_is_directory=True)
    proc = subprocess.run([str(APO), "verify", str(results / "exp")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 stage directories checked" in proc.stdout
    proc = subprocess.run([str(APO), "verify", str(model)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"rm -r {model}" in proc.stdout


def test_a_whole_stage_directory_is_verified_output_by_output(tmp_path):
    """The data stage reads the demo's directory: its outputs are checked, not its manifest,
    logs or locks."""
    d = finished(tmp_path / "results", "demo", {**MODEL, "train.jsonl": b"{}\n"})
    (d / "log").mkdir()
    (d / "log" / "demo.log").write_text("...")
    (d / ".demo.lock").write_text("pid 1")
    verify_if_stage(d)
    (d / "train.jsonl").unlink()
    with pytest.raises(StageFileError, match=rf"{d}/train.jsonl: missing; rerun snakemake \(rule demo"):
        verify_if_stage(d)


def test_a_job_writes_its_rules_outputs_and_does_nothing_once_they_are_recorded(tmp_path):
    """`Job`: a rule's outputs in its stage directory (a shard's with its index), one lock per
    shard, and `run` skips the work when the job before it recorded the same outputs."""
    from apo.job import Job, writer_rule

    shard = Job("sample", tmp_path / "evaluate" / "0123456789ab", {"hash": "0123456789ab"}, shard=3)
    assert shard.outputs == [shard.stage_dir / "shard-3.parquet"]
    assert shard.lock.name == ".sample-3.lock"
    assert writer_rule(shard.stage_dir, "shard-3.parquet") == "sample"
    assert writer_rule(shard.stage_dir, "scores.json") == "evaluate"

    job = Job("vstar", tmp_path / "vstar" / "0123456789ab", {"hash": "0123456789ab"})
    assert [p.name for p in job.outputs] == ["vstar.parquet", "counts.json"]
    calls = []

    def work():
        calls.append(1)
        job.output("vstar").write_bytes(b"table")
        job.output("counts").write_text("{}")

    job.run(work)
    assert not job.done()  # written but not recorded: the tracker records them (`stage_job`)
    job.record()
    assert job.done()
    job.run(work)
    assert calls == [1]
    job.output("counts").write_text('{"edited": 1}')
    assert not job.done()
