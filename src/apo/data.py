"""Prepare a prompt set (training prompts or a benchmark) into one parquet schema.

Output columns: id (str, unique), prompt (formatted per prompt.template, ready for generation), question
(the raw problem text), answer (gold answer as a string), source (where it came from).

Loading always goes through `datasets.load_dataset`: a hub id, a local dataset directory, or
local json/jsonl/parquet/csv files. The embedded demo is just local JSON lines.

A local file holds one split, `train` (the library's name for a data file's rows), unless the
spec says where its splits are: `{split}` in the path (one file per split) or `split_field` (a
column naming each row's split). Any other split of a file is refused, never read as the
whole file. Golds are read as the file writes them: a JSON number keeps its digits (Arrow
would make `12` beside `2.5` the float `12.0`), a CSV cell stays text.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from pathlib import Path

import pandas as pd

from apo.config import dataset_file, file_split_problem
from apo.settings import looks_local

log = logging.getLogger(__name__)

SCHEMA = ["id", "prompt", "question", "answer", "source"]
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad input data; the message names the file or dataset and the row."""


def load_rows(spec: dict, demo_dir: str | None = None):
    """A `datasets.Dataset` of the spec's path and split."""
    return read_rows(spec, demo_dir)[0]


def read_rows(spec: dict, demo_dir: str | None = None):
    """The spec's rows (a `datasets.Dataset`) and, for a local JSON file, its answer field of
    each row as written (else None: the dataset's own values are the golds)."""
    import datasets

    path, split = spec["path"], spec["split"]
    if path == "demo":
        if demo_dir is None:
            raise DataError("dataset path 'demo' needs the demo stage directory")
        return datasets.load_dataset("json", data_files=str(Path(demo_dir) / f"{split}.jsonl"), split="train"), None
    file = dataset_file(spec)
    local = Path(file)
    if not local.exists() and looks_local(file):
        raise DataError(f"{file}: no such file or directory (data.*.path)")
    if local.is_file():
        return _read_file(local, spec)
    # A local dataset directory or a hub id; `subset` is the hub config name.
    try:
        return datasets.load_dataset(path, spec.get("subset"), split=split, revision=spec.get("revision")), None
    except (ConnectionError, OSError) as e:
        where = "a local dataset directory" if local.is_dir() else "not a local path, and the hub"
        raise DataError(f"{path}: {where} could not be read: {type(e).__name__}: {e}") from e
    except ValueError as e:  # an unknown split: the library's message lists the known ones
        raise DataError(f"{path}: {e} (data.*.split)") from e


def local_splits(path: Path, subset: str | None = None) -> list[str]:
    """The split names of a local dataset directory, as `datasets.load_dataset` finds them
    (from its file names, or its README's configs)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(str(path), subset))
    except Exception as e:  # the library's own error does not name the directory
        raise DataError(f"{path}: cannot be read as a dataset directory: {type(e).__name__}: {e}") from e


def _read_file(local: Path, spec: dict):
    import datasets

    builder = BUILDERS.get(local.suffix)
    if builder is None:
        raise DataError(f"{local}: unknown file type {local.suffix!r} (use {sorted(BUILDERS)})")
    problem = file_split_problem(spec)
    if problem is not None:
        raise DataError(problem)
    check_file(local, builder)
    options = {}
    if builder == "csv":  # every cell as written: pandas would read "12" beside "2.5" as 12.0
        with open(local, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh))
        options = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                   "keep_default_na": False}
    try:
        ds = datasets.load_dataset(builder, data_files=str(local), split="train", **options)
    except Exception as e:  # the library's own error does not name the file
        raise DataError(f"{local}: cannot be read as {builder}: {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"{local}: the file has no rows")
    golds = json_column(local, spec["answer_field"], len(ds)) if builder == "json" and spec.get("answer_field") else None
    keep = split_rows(ds, spec, local)
    if keep is not None:
        ds = ds.select(keep)
        golds = [golds[i] for i in keep] if golds is not None else None
    return ds, golds


def split_rows(ds, spec: dict, path) -> list[int] | None:
    """The rows of `spec['split']` by its `split_field` column (None: no split_field, every row)."""
    field = spec.get("split_field")
    if not field:
        return None
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r} (split_field); columns: {ds.column_names}")
    values = [None if v is None else str(v) for v in ds[field]]
    keep = [i for i, v in enumerate(values) if v == spec["split"]]
    if not keep:
        found = sorted({v for v in values if v is not None})
        raise DataError(f"{path}: no row has {field} = {spec['split']!r} (split); its values: {found[:20]}")
    return keep


def json_column(path: Path, field: str, rows: int) -> list:
    """`field` of every row of a JSON-lines file (or a JSON array of objects), numbers as their
    written text, in the order the loader reads the rows."""
    text = path.read_text(encoding="utf-8")
    parse = {"parse_int": str, "parse_float": str}
    try:
        objects = [json.loads(line, **parse) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        objects = None
    if objects is None or not all(isinstance(o, dict) for o in objects):
        try:
            whole = json.loads(text, **parse)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: its answers cannot be read as written ({e.msg} at line {e.lineno}); "
                            "write one JSON object per line") from None
        if isinstance(whole, dict) and isinstance(whole.get(field), list):
            objects = [{field: v} for v in whole[field]]  # a mapping of columns
        else:
            objects = whole if isinstance(whole, list) else [whole]
    if len(objects) != rows:
        raise DataError(f"{path}: {len(objects)} JSON rows, but the loader read {rows}; write one object per line")
    return [o.get(field) if isinstance(o, dict) else None for o in objects]


def check_file(path: Path, builder: str) -> None:
    """Errors that name the file and line, for what the loaders report as a bare traceback:
    an empty file, text that is not UTF-8, a JSON line that is not one JSON object, a CSV file
    with a header and no rows."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder not in ("json", "csv"):
        return
    json_lines = path.suffix == ".jsonl"
    lines = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}, line {lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1}); save the file as UTF-8"
                ) from None
            lines += bool(line.strip())
            if json_lines and line.strip():
                _check_json_line(path, lineno, line)
    if builder == "csv" and lines < 2:
        raise DataError(f"{path}: the file has a header line and no rows")


def _check_json_line(path: Path, lineno: int, line: str) -> None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}, line {lineno}: a JSON line must be an object {{...}}, got {type(row).__name__}")


def gold_type_problem(raw) -> str | None:
    """Why a gold value is not an answer (a boolean, an object, a NaN or infinite number, a
    nested list), or None: `str()` would make `true` the answer 'True' and NaN 'nan'."""
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, float) and not math.isfinite(raw):
        return "not a finite number"
    if isinstance(raw, (list, tuple)):
        if not raw:
            return "an empty list"
        inner = [gold_type_problem(v) or ("a list inside a list" if isinstance(v, (list, tuple)) else None) for v in raw]
        bad = next((p for p in inner if p is not None), None)
        return None if bad is None else f"a list with {bad} in it"
    if not isinstance(raw, (str, int, float)):
        return f"an object ({type(raw).__name__})"
    return None


def file_fields(path: Path, rows: int = 100) -> list[str]:
    """The field names of a local data file, read cheaply: a JSON-lines file's first `rows`
    rows, a parquet file's schema, a CSV file's header (a .json file is read whole)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", errors="replace") as fh:
            return next(csv.reader(fh), [])
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
        return list(dict.fromkeys(k for r in records[:rows] if isinstance(r, dict) for k in r))
    fields: dict = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in itertools.islice((ln for ln in fh if ln.strip()), rows):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # the data stage names the line (`check_file`)
            fields.update(dict.fromkeys(row) if isinstance(row, dict) else {})
    return list(fields)


def check_fields(spec: dict, where: str) -> None:
    """At plan time: the fields a local file's entry names exist in the file, else an error
    naming `where` (the config key of the entry), the file and the fields it has."""
    path = Path(dataset_file({"split": "train", **spec})).expanduser()  # the schema's default split
    if not path.is_file() or path.suffix not in BUILDERS:
        return
    have = file_fields(path)
    keys = ("prompt_field", "answer_field", "id_field")
    missing = [f"{key} {spec[key]!r}" for key in keys if spec.get(key) and spec[key] not in have]
    if missing:
        raise DataError(f"{where}: the file {path} has no field {', '.join(missing)}; its fields: {have}")


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


def format_prompt(question: str, prompt_cfg: dict, tokenizer) -> str:
    """The text the model is prompted with. raw: the problem, a space and the instruction, as
    the authors build it (ZhaolinGao/A-PO, preprocess/data_preprocess/math_dataset.py) and feed
    it to the base model; chat: the same text as one user turn of the chat template."""
    instruction = prompt_cfg["instruction"]
    if prompt_cfg["template"] == "raw":
        return f"{question} {instruction}" if instruction else question
    content = f"{question.strip()} {instruction}".strip()
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for: a text longer than
    `n * max_token_chars` has more than `n` tokens. (A byte-level BPE token string has one
    character per byte, a SentencePiece piece one per character; either bounds the text.)"""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def prepare(
    spec: dict, prompt_cfg: dict, tokenizer, demo_dir: str | None = None, grader=None
) -> tuple[pd.DataFrame, dict]:
    """Rows of the dataset in the fixed schema, plus counts for the report.

    Malformed rows (missing/empty/non-string prompt, empty answer, duplicate id) are errors
    naming the row. Prompts longer than `max_prompt_tokens` (when it is set) and, when a
    `grader` is given, gold answers it cannot grade against (`apo.reward.gold_problem`) are
    dropped and counted.
    """
    where = f"dataset {dataset_file(spec)!r} split {spec['split']!r}"
    ds, golds = read_rows(spec, demo_dir)
    _check_columns(ds.column_names, spec, where)
    rows_read = len(ds)
    if spec.get("limit"):
        ds = ds.select(range(min(spec["limit"], len(ds))))  # the first rows: `golds` stay aligned

    rows, seen = [], {}
    too_long = 0
    limit = prompt_cfg["max_prompt_tokens"]  # None: no length filter (a benchmark's default)
    max_chars = limit * max_token_chars(tokenizer) if limit is not None else float("inf")
    for i, ex in enumerate(ds):
        gold = golds[i] if golds is not None else ex[spec["answer_field"]]
        rid, q, answer = _checked_row(i, ex, gold, spec, where, seen)
        if len(q) + 1 + len(prompt_cfg["instruction"]) > max_chars:
            too_long += 1  # certainly over the token bound: not worth tokenizing (a 10 MB row took 49 s)
            continue
        prompt = format_prompt(q, prompt_cfg, tokenizer)
        if limit is not None and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > limit:
            too_long += 1  # dropped, as the paper's max prompt length does; counted
            continue
        rows.append({"id": rid, "prompt": prompt, "question": q, "answer": answer, "source": dataset_file(spec)})
    rows, bad_gold = _drop_bad_golds(rows, grader, where)
    if not rows:
        raise DataError(
            f"{where}: no usable rows ({too_long} longer than prompt.max_prompt_tokens, "
            f"{bad_gold} with an unparseable gold answer)"
        )
    counts = {"rows_in": rows_read, "rows_out": len(rows), "beyond_limit": rows_read - len(ds),
              "dropped_too_long": too_long,
              "dropped_bad_gold": bad_gold}
    return pd.DataFrame(rows, columns=SCHEMA), counts


def _check_columns(columns: list[str], spec: dict, where: str) -> None:
    """The columns the dataset's spec names are all there; else an error listing the columns."""
    for key in ("prompt_field", "answer_field"):
        if spec[key] not in columns:
            raise DataError(f"{where}: no column {spec[key]!r} (data.*.{key}); columns: {columns}")
    if spec.get("id_field") and spec["id_field"] not in columns:
        raise DataError(f"{where}: no column {spec['id_field']!r} (id_field); columns: {columns}")


def _checked_row(i: int, ex: dict, gold, spec: dict, where: str, seen: dict) -> tuple[str, str, str]:
    """Row `i`'s id, question and normalized gold answer; an error naming the row if its prompt
    or answer is empty or of the wrong type, or its id repeats one in `seen` (which it joins)."""
    q = ex[spec["prompt_field"]]
    rid = str(ex[spec["id_field"]]) if spec.get("id_field") else f"{spec['split']}-{i:06d}"
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}, row {i} (id {rid}): prompt field {spec['prompt_field']!r} is empty or not a string")
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        raise DataError(f"{where}, row {i} (id {rid}): answer field {spec['answer_field']!r} is empty")
    problem = gold_type_problem(gold)
    if problem is not None:
        raise DataError(f"{where}, row {i} (id {rid}): answer field {spec['answer_field']!r} holds {gold!r}, "
                        f"{problem}; a gold answer is text or a number, or a list of them")
    if rid in seen:
        raise DataError(f"{where}, row {i}: duplicate id {rid!r} (first at row {seen[rid]})")
    seen[rid] = i
    answer = normalize_answer(gold, spec["answer_format"])
    if not answer:
        raise DataError(f"{where}, row {i} (id {rid}): no gold answer in {gold!r} (answer_format {spec['answer_format']})")
    return rid, q, answer


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


def check_special_tokens(tokenizer, model: str) -> None:
    """The tokens every later stage relies on, checked by the first job that loads the
    tokenizer: EOS ends a response (without it every response runs to max_new_tokens) and pad
    fills the training batches. Pad may be EOS itself, as in Qwen2.5's base tokenizer."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"model {model}: its tokenizer has no EOS token, so no response could end before "
                        f"max_new_tokens; {_how_to_set('eos_token', model)} (the token that ends a turn)")
    if tokenizer.pad_token_id is None:
        raise DataError(f"model {model}: its tokenizer has no pad token, which training pads batches with; "
                        f"{_how_to_set('pad_token', model)} (e.g. to the EOS token {tokenizer.eos_token!r})")


def _how_to_set(name: str, model: str) -> str:
    return (f"set \"{name}\" in {model}/tokenizer_config.json, or save a copy of the tokenizer with it "
            f"(tok.{name} = ...; tok.save_pretrained(DIR), beside the model's files) and set config key 'model' to DIR")


def run(settings: dict, tokenizer_path: str, demo_dir: str | None, grading: dict) -> tuple[pd.DataFrame, dict]:
    """Stage entry: the prompt set `settings` describes (a data stage's manifest settings),
    formatted with the tokenizer's template, and its counts (counts.json)."""
    from transformers import AutoTokenizer

    from apo.job import verify_if_stage, verify_stage_file
    from apo.reward import Grader

    if demo_dir:
        verify_stage_file(Path(demo_dir) / f"{settings['split']}.jsonl")
    verify_if_stage(tokenizer_path)  # the demo's model is a stage output
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    check_special_tokens(tokenizer, tokenizer_path)
    with Grader.from_settings(settings, grading["workers"]) as grader:
        return prepare(settings, settings["prompt"], tokenizer, demo_dir, grader)
