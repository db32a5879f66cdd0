"""`apo prefetch` and the offline jobs after it: what a config reads from the hub, each
artefact fetched the way its job loads it, nothing recorded when one fails, and jobs told to
stay offline. The hub itself is replaced by recorders (no network here)."""

import json
import os

import pytest
import yaml

from apo import prefetch
from apo.cli import main
from apo.config import validate_config
from conftest import ROOT


def paper_config() -> dict:
    path = ROOT / "config" / "paper" / "qwen2.5-1.5b.yaml"
    return validate_config(yaml.safe_load(path.read_text()), source=str(path), base_dir=ROOT)


def test_a_paper_config_names_its_model_and_every_dataset_once():
    config = paper_config()
    items = prefetch.artefacts(config)
    (model,) = [i for i in items if i["kind"] == "model"]
    assert model == {"kind": "model", "ref": config["model"], "revision": config["model_revision"]}
    datasets = {(i["ref"], i["split"]) for i in items if i["kind"] == "dataset"}
    specs = [config["data"]["train"], *config["data"]["benchmarks"], config["data"]["validation"]]
    assert datasets == {(s["path"], s["split"]) for s in specs}
    assert len(items) == len({json.dumps(i, sort_keys=True) for i in items})  # each once


def test_the_demo_and_local_files_are_not_on_the_hub(demo_config, tmp_path):
    config = validate_config(demo_config)
    assert prefetch.artefacts(config) == []
    config["data"]["train"]["path"] = str(tmp_path / "train.jsonl")
    assert prefetch.artefacts(config) == []


@pytest.fixture
def hub(monkeypatch):
    """Stand-ins for the hub: snapshot_download and the data stage's loader record each call."""
    import huggingface_hub

    from apo import data

    calls = []

    def snapshot_download(ref, revision=None):
        calls.append(("model", ref, revision))
        return f"/cache/{ref}/{revision}"

    def load_rows(spec, demo_dir=None):
        calls.append(("dataset", spec["path"], spec["split"], spec["revision"]))
        if spec["path"] == "broken/set":
            raise ConnectionError("hub unreachable")
        return [1, 2, 3]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(data, "load_rows", load_rows)
    for key in prefetch.OFFLINE:
        monkeypatch.delenv(key, raising=False)
    return calls


def test_every_artefact_is_fetched_and_recorded(hub, tmp_path):
    items = [{"kind": "model", "ref": "Qwen/Qwen2.5-Math-1.5B", "revision": "abc"},
             {"kind": "dataset", "ref": "some/set", "subset": None, "split": "test", "revision": "v1"}]
    out = tmp_path / "prefetch" / "fetched.json"
    prefetch.run(items, out)
    assert hub == [("model", "Qwen/Qwen2.5-Math-1.5B", "abc"), ("dataset", "some/set", "test", "v1")]
    record = json.loads(out.read_text())["artefacts"]
    assert record[0]["local"] == "/cache/Qwen/Qwen2.5-Math-1.5B/abc" and record[1]["rows"] == 3


def test_a_failed_fetch_names_the_artefact_and_records_nothing(hub, tmp_path):
    items = [{"kind": "dataset", "ref": "broken/set", "subset": None, "split": "train", "revision": None}]
    out = tmp_path / "fetched.json"
    with pytest.raises(RuntimeError, match="prefetch of dataset broken/set failed: ConnectionError"):
        prefetch.run(items, out)
    assert not out.exists() and not list(tmp_path.iterdir())  # no record: the jobs would not start


def test_prefetch_refuses_to_run_offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="unset HF_HUB_OFFLINE"):
        prefetch.run([{"kind": "model", "ref": "a/b", "revision": None}])


def test_apo_prefetch_of_a_config_file(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the paper config extends a file named from the repository root
    main(["prefetch", "config/paper/qwen2.5-1.5b.yaml", "--out", str(tmp_path / "f.json")])
    out = capsys.readouterr().out
    config = paper_config()
    pinned = f"@{config['model_revision']}" if config["model_revision"] else ""
    assert f"model    {config['model']}{pinned}" in out.splitlines()
    assert len(json.loads((tmp_path / "f.json").read_text())["artefacts"]) == len(hub)


def test_jobs_after_a_prefetch_run_offline():
    env = {}
    prefetch.offline_environment({"hub_offline": True}, env)
    assert env == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {}
    prefetch.offline_environment({"hub_offline": False}, env)
    assert env == {}


def test_every_rule_that_may_read_the_hub_waits_for_the_prefetch():
    for rule in ("data", "sample", "vstar", "train"):
        text = (ROOT / "workflow" / "rules" / f"{rule}.smk").read_text()
        assert "prefetched=prefetched" in text, rule
    assert os.path.exists(ROOT / "workflow" / "rules" / "prefetch.smk")
