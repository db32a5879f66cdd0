"""Prompt preparation: local files through `datasets`, one schema, clear errors."""

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from apo.data import SCHEMA, DataError, normalize_answer, prepare

PROMPT = {"instruction": "Answer in \\boxed{}.", "max_prompt_tokens": 256, "template": "chat"}


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return AutoTokenizer.from_pretrained(tiny_demo / "model")


def spec(path, **kw):
    return {"path": str(path), "split": "train", "prompt_field": "q", "answer_field": "a",
            "id_field": None, "answer_format": "plain", "limit": None, "subset": None, **kw}


ROWS = [{"q": "Mia has 3 pens. She finds 2 more.", "a": "5"}, {"q": "Leo has 4 cards.", "a": 4}]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_local_files_load_into_the_schema(tmp_path, tokenizer, suffix):
    path = tmp_path / f"rows.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == "csv":
        pd.DataFrame(ROWS).astype(str).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).astype(str).to_parquet(path)
    df, counts = prepare(spec(path), PROMPT, tokenizer)
    assert list(df.columns) == SCHEMA
    assert df["answer"].tolist() == ["5", "4"]
    assert df["id"].tolist() == ["train-000000", "train-000001"]
    assert df["prompt"][0].startswith("<|im_start|>user\nMia has 3 pens.")
    assert "Answer in \\boxed{}." in df["prompt"][0] and df["prompt"][0].endswith("assistant\n")
    assert counts == {"rows_in": 2, "rows_out": 2, "beyond_limit": 0, "dropped_too_long": 0, "dropped_bad_gold": 0}


def test_demo_path_reads_the_demo_stage(tiny_demo, tokenizer):
    df, counts = prepare(spec("demo", split="test", prompt_field="question", answer_field="answer",
                              id_field="id", limit=5), PROMPT, tokenizer, demo_dir=str(tiny_demo))
    assert len(df) == 5 and df["id"][0] == "test-00000"
    # rows_in counts what was read, before the limit (the tiny demo's test split has 16 rows)
    assert counts["rows_in"] == 16 and counts["beyond_limit"] == 11 and counts["rows_out"] == 5


def test_answer_formats():
    assert normalize_answer("so 40 + 2 = 42\n#### 1,042", "gsm8k") == "1042"
    assert normalize_answer("thus \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}", "boxed") == "x^{2}"
    assert normalize_answer(" 7 ", "plain") == "7"


def write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, kw, message",
    [
        ([{"q": "x", "b": "1"}], {}, "no column 'a'"),
        ([{"q": "", "a": "1"}], {}, "row 0 (id train-000000): prompt field 'q' is empty"),
        ([{"q": 5, "a": "1"}], {}, "row 0 (id train-000000): prompt field 'q' is empty or not a string"),
        ([{"q": None, "a": "1"}], {}, "row 0 (id train-000000): prompt field 'q' is empty or not a string"),
        ([{"q": "x", "a": "1"}, {"q": "y", "a": " "}], {}, "row 1 (id train-000001): answer field 'a' is empty"),
        ([{"q": "x", "a": "1", "i": "7"}, {"q": "y", "a": "2", "i": "7"}], {"id_field": "i"},
         "row 1: duplicate id '7' (first at row 0)"),
        ([{"q": "x", "a": "no hashes"}], {"answer_format": "boxed"}, "no gold answer"),
    ],
)
def test_bad_rows_are_named(tmp_path, tokenizer, rows, kw, message):
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as err:
        prepare(spec(path, **kw), PROMPT, tokenizer)
    assert message in str(err.value) and str(path) in str(err.value)


def test_too_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    path = write(tmp_path, [{"q": "short", "a": "1"}, {"q": "long " * 300, "a": "2"}])
    df, counts = prepare(spec(path), PROMPT, tokenizer)
    assert len(df) == 1 and counts["dropped_too_long"] == 1


def test_unparseable_gold_answers_are_dropped_and_counted(tmp_path, tokenizer):
    from apo.reward import Grader

    golds = ["12", "\\frac{", "x^2", "???", "no answer here", "\\frac{\\sqrt{3}}{2}", "\\text{Devon}"]
    path = write(tmp_path, [{"q": f"q{i}", "a": a} for i, a in enumerate(golds)])
    with Grader(timeout_s=5, workers=1) as grader:
        df, counts = prepare(spec(path), PROMPT, tokenizer, grader=grader)
    # "???" is math-verify's raw-string fallback only; "no answer here" is read as a product
    # of one-letter symbols: neither can be graded against.
    assert df["answer"].tolist() == ["12", "x^2", "\\frac{\\sqrt{3}}{2}", "\\text{Devon}"]
    assert counts["dropped_bad_gold"] == 3


def test_gsm8k_strict_golds_must_be_numbers(tmp_path, tokenizer):
    from apo.reward import Grader

    path = write(tmp_path, [{"q": "a", "a": "1,072"}, {"q": "b", "a": "\\frac{1}{2}"}, {"q": "c", "a": "-3"}])
    with Grader(timeout_s=5, workers=1, method="gsm8k_strict") as grader:
        df, counts = prepare(spec(path), PROMPT, tokenizer, grader=grader)
    assert df["answer"].tolist() == ["1,072", "-3"] and counts["dropped_bad_gold"] == 1


def test_missing_local_file_is_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        prepare(spec(tmp_path / "nope.jsonl"), PROMPT, tokenizer)


def test_raw_template_is_the_authors_problem_space_instruction(tiny_demo):
    """prompt.template raw: exactly `problem + " " + instruction` (their math_dataset.py), no
    chat turn; chat wraps the same text in the tokenizer's template."""
    from transformers import AutoTokenizer

    from apo.data import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    cfg = {"instruction": "Think step by step.", "max_prompt_tokens": 256}
    raw = format_prompt("What is 2+3? ", {**cfg, "template": "raw"}, tok)
    assert raw == "What is 2+3?  Think step by step."
    chat = format_prompt("What is 2+3? ", {**cfg, "template": "chat"}, tok)
    assert chat != raw and "What is 2+3? Think step by step." in chat
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("empty.csv", b"", "the file is empty"),
        ("header.csv", b"q,a\n", "the file has a header line and no rows"),
        ("latin1.jsonl", b'{"q": "x", "a": "1"}\n{"q": "caf\xe9", "a": "2"}\n', "line 2: not UTF-8 text (byte 0xe9 at column 11)"),
        ("latin1.csv", b"q,a\ncaf\xe9,1\n", "line 2: not UTF-8 text"),
        ("garbage.jsonl", b'{"q": "x", "a": "1"}\n{"q": "y", "a": "2"} trailing\n', "line 2: not valid JSON (Extra data at column 22)"),
        ("list.jsonl", b'[1, 2]\n', "line 1: a JSON line must be an object"),
    ],
)
def test_unreadable_files_are_named(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare(spec(path), PROMPT, tokenizer)
    assert f"{path}: {message}" in str(err.value) or f"{path}, {message}" in str(err.value)


def test_a_missing_directory_is_not_tried_as_a_hub_id(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in ["data/mytrain", "data/sets/mytrain", "./mytrain", "/nonexistent/prompts"]:
        with pytest.raises(DataError, match=f"{path}: no such file or directory"):
            prepare(spec(path), PROMPT, tokenizer)


def test_a_huge_prompt_is_dropped_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    import time

    path = write(tmp_path, [{"q": "short", "a": "1"}, {"q": "x" * 10_000_000, "a": "2"}])
    calls = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, **kw: calls.append(len(text)) or real(self, text, **kw))
    start = time.monotonic()
    df, counts = prepare(spec(path), PROMPT, tokenizer)
    assert len(df) == 1 and counts["dropped_too_long"] == 1
    assert max(calls) < 10_000  # the long row never reached the tokenizer
    assert time.monotonic() - start < 20
