"""Prepare a prompt set (training prompts or a benchmark) into one parquet schema.

Output columns: id (str, unique), prompt (chat-formatted, ready for generation), question
(the raw problem text), answer (gold answer as a string), source (where it came from).

Loading always goes through `datasets.load_dataset`: a hub id, a local dataset directory, or
local json/jsonl/parquet/csv files. The embedded demo is just local JSON lines.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

SCHEMA = ["id", "prompt", "question", "answer", "source"]
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad input data; the message names the file or dataset and the row."""


def load_rows(spec: dict, demo_dir: str | None = None):
    """A `datasets.Dataset` for the spec's path and split."""
    import datasets

    path, split = spec["path"], spec["split"]
    if path == "demo":
        if demo_dir is None:
            raise DataError("dataset path 'demo' needs the demo stage directory")
        return datasets.load_dataset("json", data_files=str(Path(demo_dir) / f"{split}.jsonl"), split="train")
    local = Path(path)
    if not local.exists() and (local.suffix in BUILDERS or path.startswith(("/", "./", "../"))):
        raise DataError(f"{path}: no such file or directory (data.*.path)")
    if local.is_file():
        builder = BUILDERS.get(local.suffix)
        if builder is None:
            raise DataError(f"{path}: unknown file type {local.suffix!r} (use {sorted(BUILDERS)})")
        return datasets.load_dataset(builder, data_files=str(local), split="train")
    # A local dataset directory or a hub id; `subset` is the hub config name.
    return datasets.load_dataset(path, spec.get("subset"), split=split)


def normalize_answer(raw, answer_format: str) -> str:
    """The gold answer as a string, as the dataset means it (read by `apo.reward.gold_latex`).

    A list of answers (OlympiadBench's original `final_answer` is one) is read as all of them."""
    if isinstance(raw, (list, tuple)):
        raw = ", ".join(str(a).strip().strip("$") for a in raw)
    text = str(raw).strip()
    if answer_format == "gsm8k":  # "...reasoning... #### 1,072": the number, commas removed
        text = text.split("####")[-1].strip().replace(",", "")
    elif answer_format == "boxed":  # a worked solution whose last \boxed{...} holds the answer
        m = last_boxed(text)
        text = m.strip() if m is not None else ""
    return text


def last_boxed(text: str) -> str | None:
    r"""What the last ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed 5``) of a solution holds.

    The forms MATH's solutions use, as the authors read them (ZhaolinGao/A-PO,
    verl/utils/reward_score/math.py, last_boxed_only_string_preprocessing and remove_boxed).
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    spaced = text.rfind("\\boxed ")
    if spaced > start:  # "\boxed 5$": up to the closing dollar
        return text[spaced + len("\\boxed ") :].split("$")[0]
    if start < 0:
        return None
    depth, i = 0, text.index("{", start)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def prepare(
    spec: dict, prompt_cfg: dict, tokenizer, demo_dir: str | None = None, grader=None
) -> tuple[pd.DataFrame, dict]:
    """Rows of the dataset in the fixed schema, plus counts for the report.

    Malformed rows (missing/empty/non-string prompt, empty answer, duplicate id) are errors
    naming the row. Prompts longer than `max_prompt_tokens` and, when a `grader` is given,
    gold answers it cannot grade against (`apo.reward.gold_problem`) are dropped and counted.
    """
    where = f"dataset {spec['path']!r} split {spec['split']!r}"
    ds = load_rows(spec, demo_dir)
    for key in ("prompt_field", "answer_field"):
        if spec[key] not in ds.column_names:
            raise DataError(f"{where}: no column {spec[key]!r} (data.*.{key}); columns: {ds.column_names}")
    if spec.get("id_field") and spec["id_field"] not in ds.column_names:
        raise DataError(f"{where}: no column {spec['id_field']!r} (id_field); columns: {ds.column_names}")
    if spec.get("limit"):
        ds = ds.select(range(min(spec["limit"], len(ds))))

    rows, seen = [], {}
    too_long = 0
    for i, ex in enumerate(ds):
        q, a = ex[spec["prompt_field"]], ex[spec["answer_field"]]
        rid = str(ex[spec["id_field"]]) if spec.get("id_field") else f"{spec['split']}-{i:06d}"
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}, row {i} (id {rid}): prompt field {spec['prompt_field']!r} is empty or not a string")
        if a is None or (isinstance(a, str) and not a.strip()):
            raise DataError(f"{where}, row {i} (id {rid}): answer field {spec['answer_field']!r} is empty")
        if rid in seen:
            raise DataError(f"{where}, row {i}: duplicate id {rid!r} (first at row {seen[rid]})")
        seen[rid] = i
        answer = normalize_answer(a, spec["answer_format"])
        if not answer:
            raise DataError(f"{where}, row {i} (id {rid}): no gold answer in {a!r} (answer_format {spec['answer_format']})")
        content = f"{q.strip()} {prompt_cfg['instruction']}".strip()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > prompt_cfg["max_prompt_tokens"]:
            too_long += 1  # dropped, as the paper's max prompt length does; counted
            continue
        rows.append({"id": rid, "prompt": prompt, "question": q, "answer": answer, "source": spec["path"]})
    rows, bad_gold = _drop_bad_golds(rows, grader, where)
    if not rows:
        raise DataError(
            f"{where}: no usable rows ({too_long} longer than prompt.max_prompt_tokens, "
            f"{bad_gold} with an unparseable gold answer)"
        )
    counts = {"rows_in": len(ds), "rows_out": len(rows), "dropped_too_long": too_long,
              "dropped_bad_gold": bad_gold}
    return pd.DataFrame(rows, columns=SCHEMA), counts



def _drop_bad_golds(rows: list[dict], grader, where: str) -> tuple[list[dict], int]:
    """Rows whose gold answer the grader can grade against, and how many were dropped."""
    if grader is None or not rows:
        return rows, 0
    problems = grader.gold_problems([r["answer"] for r in rows])
    bad = [(r["id"], r["answer"], p) for r, p in zip(rows, problems) if p is not None]
    for rid, answer, problem in bad[:5]:
        log.warning("%s: dropping id %s, gold answer %r: %s", where, rid, answer, problem)
    if bad:
        log.warning("%s: dropped %d rows whose gold answer cannot be graded against", where, len(bad))
    return [r for r, p in zip(rows, problems) if p is None], len(bad)
