"""Hyperparameter sweeps: each method at its own best setting.

`train.lr` and the keys each method's registry entry calls sweepable (`Method.sweepable`: A*-PO's
beta2, REBEL's eta, the group size of each of the GRPO family) may be lists. A
method is then trained once per combination of the listed values it reads (on the first of
`seeds`); its pick is the combination with the best final validation accuracy (the policy
after the last step, scored on data.validation: never a test benchmark), which alone is
trained on the other seeds and evaluated on the benchmarks.

Every training of the grid is an ordinary training stage, addressed by its own values: adding
a value to a list keeps the finished runs, and a grid run with the settings of an earlier
single run is that run. The pick is a stage of its own (kind `pick`) whose inputs are the
grid's runs.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from apo import methods


def sweepable() -> tuple[str, ...]:
    """The keys a sweep may list, as dotted train.* paths: every method's learning rate, then
    the method-only keys the registry calls sweepable."""
    return ("lr", *methods.sweepable_keys())


def _get(train: dict, dotted: str):
    node = train
    for part in dotted.split("."):
        node = node[part]
    return node


def swept_keys(train: dict, reads: set[str]) -> list[str]:
    """The listed keys among those a method reads (`reads`: its top-level train.* keys)."""
    return [k for k in sweepable() if k.split(".")[0] in reads and isinstance(_get(train, k), list)]


def listed_keys(train: dict) -> list[str]:
    """The sweepable keys the config lists several values for (any method's)."""
    return [k for k in sweepable() if isinstance(_get(train, k), list)]


def grid(train: dict, reads: set[str]) -> list[dict]:
    """The combinations a method is trained with, in the order the lists give them: a list of
    {dotted key: value}; one empty combination when it reads no listed key."""
    keys = swept_keys(train, reads)
    return [dict(zip(keys, values)) for values in itertools.product(*(_get(train, k) for k in keys))]


def apply(train: dict, combo: dict) -> dict:
    """`train` with the combination's values in place of the lists."""
    out = copy.deepcopy(train)
    for dotted, value in combo.items():
        *head, last = dotted.split(".")
        node = out
        for part in head:
            node = node[part]
        node[last] = value
    return out


def value_text(v) -> str:
    """A value as short as `:g` writes it where that reads back as the value, else in full
    (1.0000001e-4 is not 0.0001): two listed values never share a label."""
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


def label(combo: dict) -> str:
    """A short, path-safe name: lr0.0003-eta0.1."""
    return "-".join(f"{k.split('.')[-1]}{value_text(v)}" for k, v in combo.items())


def labelled(combos: list[dict]) -> dict:
    """{label: combination}; a ValueError naming the values where two different combinations
    would share a label (e.g. 1 and 1.0: one label, two addresses). A value listed twice is
    one run."""
    out = {}
    for combo in combos:
        name = label(combo)
        if name in out and json.dumps(out[name], sort_keys=True) != json.dumps(combo, sort_keys=True):
            raise ValueError(f"config key 'train': the listed values {out[name]} and {combo} give one sweep run "
                             f"label ({name!r}); list each value once")
        out.setdefault(name, combo)
    return out


def pick(runs: list[dict]) -> dict:
    """The run whose last validation is the most accurate; ties go to the first in grid order.

    runs: {label, combo, dir} per grid run, each dir holding validation.parquet. Returns
    {picked: combo, label, runs: [{label, combo, final_accuracy, train_time_s}]}."""
    from apo.job import output_name, read_stage_parquet

    rows = []
    for r in runs:
        path = Path(r["dir"]) / output_name("train", "validation")
        v = read_stage_parquet(path)
        if v.empty:
            raise ValueError(f"{path} has no validation: a sweep needs data.validation")
        last = v.sort_values("step").iloc[-1]
        rows.append({"label": r["label"], "combo": r["combo"], "final_accuracy": float(last["accuracy"]),
                     "train_time_s": float(last["train_time_s"])})
    best = max(range(len(rows)), key=lambda i: (rows[i]["final_accuracy"], -i))
    return {"picked": rows[best]["combo"], "label": rows[best]["label"], "criterion": "final validation accuracy",
            "runs": rows}
