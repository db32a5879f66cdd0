"""apo bench-steps: which runs it times (the training itself is the trainer's, tested elsewhere)."""

import json

import pytest

from apo.tools.bench_steps import finished_runs, train_command


def run_dir(root, name, method, done=True):
    d = root / "results" / "train" / name
    d.mkdir(parents=True)
    settings = {"method": method, "lr": 1e-3, "steps": 150, "checkpoint_every": 50, "batch_size": 64}
    inputs = {"model": "demo/aaa", "prompts": "data/bbb", **({"vstar": "vstar/ccc"} if method == "apo" else {})}
    (d / "manifest.json").write_text(json.dumps({"kind": "train", "hash": name, "settings": settings, "inputs": inputs}))
    if done:
        (d / "summary.json").write_text("{}")
    return d


def test_the_first_finished_run_of_each_method_is_timed(tmp_path):
    dirs = [run_dir(tmp_path, "a1", "apo"), run_dir(tmp_path, "g1", "grpo"), run_dir(tmp_path, "a2", "apo")]
    runs = finished_runs([str(d) for d in dirs])
    assert {m: d.name for m, (d, _) in runs.items()} == {"apo": "a1", "grpo": "g1"}


def test_an_unfinished_run_is_refused_naming_it(tmp_path):
    d = run_dir(tmp_path, "a1", "apo", done=False)
    with pytest.raises(SystemExit, match="a1 is not a finished training run"):
        finished_runs([str(d)])


def test_the_timed_run_has_the_runs_settings_but_its_own_length_and_no_validation(tmp_path):
    d = run_dir(tmp_path, "a1", "apo")
    (_, manifest), = finished_runs([str(d)]).values()
    cmd = train_command(d.resolve(), manifest, 7, tmp_path / "out", {"grading": {"workers": 1}})
    sent = json.loads(cmd[cmd.index("--manifest") + 1])
    assert sent["settings"] == {**manifest["settings"], "steps": 7, "checkpoint_every": 7}
    results = (tmp_path / "results").resolve()
    assert cmd[cmd.index("--vstar") + 1] == f"{results}/vstar/ccc/vstar.parquet" and "--validation" not in cmd
    assert cmd[cmd.index("--model") + 1] == f"{results}/demo/aaa/model"
