"""`apo prefetch`: bring every hub model, dataset and stage-1 table a config names into the
Hugging Face cache, once, on a host with internet (the login node), so that jobs on compute
nodes without it run offline.

The workflow plans it as its first step (rule `prefetch`, a local rule) whenever the config
names something on the hub and `prefetch: true`; every job then runs with `HF_HUB_OFFLINE=1`
and `HF_DATASETS_OFFLINE=1` (`offline_environment`) and reads only the cache. The cache must
be one the compute nodes see (HF_HOME on a shared file system).
"""

from __future__ import annotations

import json
import logging
import os

from apo.io import atomic_path
from apo.settings import DEMO, looks_local

log = logging.getLogger(__name__)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def artefacts(config: dict) -> list[dict]:
    """What a validated config reads from the hub, each once: the model (at `model_revision`),
    every dataset (training, benchmarks, validation) and the published stage-1 table (at their
    `revision`). Local paths and the demo are not on the hub."""
    found = []
    if config["model"] != DEMO and not looks_local(config["model"]):
        found.append({"kind": "model", "ref": config["model"], "revision": config["model_revision"]})
    data = config["data"]
    specs = [data["train"], *data["benchmarks"], data.get("validation")]
    if config["vstar"]["source"] == "table":
        specs.append(config["vstar"]["table"])
    for spec in specs:
        if spec is None or spec["path"] == DEMO or looks_local(spec["path"]):
            continue
        found.append({"kind": "dataset", "ref": spec["path"], "subset": spec.get("subset"),
                      "split": spec["split"], "revision": spec.get("revision")})
    unique = []
    for item in found:
        if item not in unique:
            unique.append(item)
    return unique


def fetch(item: dict) -> dict:
    """Download one artefact into the cache as the job that reads it will load it: a model as
    a snapshot of its repository at the revision, a dataset through the data stage's own loader
    (so that the job's identical call finds it offline)."""
    if item["kind"] == "model":
        from huggingface_hub import snapshot_download

        local = snapshot_download(item["ref"], revision=item["revision"])
        return {**item, "local": local}
    from apo.data import load_rows

    rows = load_rows({"path": item["ref"], "subset": item["subset"], "split": item["split"],
                      "revision": item["revision"]})
    return {**item, "rows": len(rows)}


def run(items: list[dict], out: str | os.PathLike | None = None) -> list[dict]:
    """Fetch every artefact (one after another, naming each), then write `out` (when given):
    what is in the cache, so that the jobs after it can run offline. Nothing is written when
    one fails."""
    if any(os.environ.get(k) == "1" for k in OFFLINE):
        raise RuntimeError("apo prefetch downloads from the hub: unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE "
                           "for it (the jobs after it run offline)")
    done = []
    for i, item in enumerate(items, 1):
        what = f"{item['kind']} {item['ref']}" + (f"@{item['revision']}" if item.get("revision") else "")
        log.info("prefetch %d/%d: %s", i, len(items), what)
        try:
            done.append(fetch(item))
        except Exception as e:  # the hub's own errors do not say which config entry failed
            raise RuntimeError(f"prefetch of {what} failed: {type(e).__name__}: {e}") from e
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps({"artefacts": done}, indent=2))
    return done


def offline_environment(runtime: dict, environ=os.environ) -> None:
    """A job after a prefetch reads the hub cache only (set before any Hugging Face library is
    imported: they read these variables once)."""
    if runtime.get("hub_offline"):
        for key, value in OFFLINE.items():
            environ.setdefault(key, value)
