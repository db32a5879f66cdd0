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


# ---------------------------------------------------------------- golds as written (issue 23)


def test_golds_are_read_as_written(tmp_path, tokenizer):
    """A JSON number keeps its digits (Arrow reads 12 beside 2.5 as 12.0) and a CSV cell stays
    text; under gsm8k_strict the gold '12.0' would fail the right '#### 12'."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": "a", "a": 12}\n{"q": "b", "a": 2.5}\n\n{"q": "c", "a": -3}\n')  # one float column to Arrow
    df, _ = prepare(spec(path), PROMPT, tokenizer)
    assert df["answer"].tolist() == ["12", "2.5", "-3"]
    path.write_text('{"q": "c", "a": "7"}\n{"q": "d", "a": [1, 2.50]}\n')
    assert prepare(spec(path), PROMPT, tokenizer)[0]["answer"].tolist() == ["7", "1, 2.50"]
    array = tmp_path / "rows.json"
    array.write_text('[{"q": "a", "a": 12}, {"q": "b", "a": 2.5}]')
    assert prepare(spec(array), PROMPT, tokenizer)[0]["answer"].tolist() == ["12", "2.5"]
    table = tmp_path / "rows.csv"
    table.write_text("q,a,i\na,12,007\nb,2.5,008\n")
    df, _ = prepare(spec(table, id_field="i"), PROMPT, tokenizer)
    assert df["answer"].tolist() == ["12", "2.5"] and df["id"].tolist() == ["007", "008"]


def test_golds_under_gsm8k_strict_keep_their_integer(tmp_path, tokenizer):
    from apo.reward import Grader

    path = write(tmp_path, [{"q": "a", "a": 12}, {"q": "b", "a": 2.5}])
    with Grader(timeout_s=5, workers=1, method="gsm8k_strict") as grader:
        df, _ = prepare(spec(path), PROMPT, tokenizer, grader=grader)
        assert grader.grade(df["answer"].tolist()[:1], ["so #### 12"]).rewards == [1.0]


@pytest.mark.parametrize(
    "line, what",
    [
        ('{"q": "b", "a": NaN}', "holds nan, not a finite number"),
        ('{"q": "b", "a": Infinity}', "holds inf, not a finite number"),
        ('{"q": "b", "a": true}', "holds True, a boolean"),
        ('{"q": "b", "a": {"v": 1}}', "holds {'v': '1'}, an object (dict)"),
        ('{"q": "b", "a": [1, [2]]}', "a list with a list inside a list in it"),
        ('{"q": "b", "a": []}', "an empty list"),
    ],
)
def test_non_scalar_and_non_finite_golds_are_refused_with_file_and_row(tmp_path, tokenizer, line, what):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": "a", "a": "1"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        prepare(spec(path), PROMPT, tokenizer)
    assert str(path) in str(err.value) and "row 1 (id train-000001): answer field 'a'" in str(err.value)
    assert what in str(err.value)


def test_a_non_finite_gold_of_a_typed_column_is_refused(tmp_path, tokenizer):
    path = tmp_path / "rows.parquet"
    pd.DataFrame({"q": ["a", "b", "c"], "a": [1.5, float("inf"), float("nan")]}).to_parquet(path)
    with pytest.raises(DataError, match=r"row 1 \(id train-000001\): answer field 'a' holds inf, not a finite number"):
        prepare(spec(path), PROMPT, tokenizer)
    path.unlink()
    pd.DataFrame({"q": ["a", "c"], "a": [1.5, float("nan")]}).to_parquet(path)  # pandas writes NaN as null
    with pytest.raises(DataError, match=r"row 1 \(id train-000001\): answer field 'a' is empty"):
        prepare(spec(path), PROMPT, tokenizer)


# ---------------------------------------------------------------- splits of local files (issue 23)


def test_a_split_column_selects_the_rows_of_a_split(tmp_path, tokenizer):
    rows = [{"q": f"q{i}", "a": str(i), "part": "test" if i % 3 == 0 else "train"} for i in range(6)]
    path = write(tmp_path, rows)
    train, counts = prepare(spec(path, split_field="part"), PROMPT, tokenizer)
    test, _ = prepare(spec(path, split="test", split_field="part"), PROMPT, tokenizer)
    assert train["question"].tolist() == ["q1", "q2", "q4", "q5"] and counts["rows_in"] == 4
    assert test["question"].tolist() == ["q0", "q3"] and test["id"].tolist() == ["test-000000", "test-000001"]
    with pytest.raises(DataError, match=r"no row has part = 'valid' \(split\); its values: \['test', 'train'\]"):
        prepare(spec(path, split="valid", split_field="part"), PROMPT, tokenizer)
    with pytest.raises(DataError, match=r"no column 'nope' \(split_field\)"):
        prepare(spec(path, split_field="nope"), PROMPT, tokenizer)


def test_a_split_in_the_path_reads_that_splits_file(tmp_path, tokenizer):
    write(tmp_path, [{"q": "from train", "a": "1"}]).rename(tmp_path / "train.jsonl")
    write(tmp_path, [{"q": "from test", "a": "2"}]).rename(tmp_path / "test.jsonl")
    df, _ = prepare(spec(tmp_path / "{split}.jsonl", split="test"), PROMPT, tokenizer)
    assert df["question"].tolist() == ["from test"] and df["source"].tolist() == [str(tmp_path / "test.jsonl")]


def test_a_file_refuses_a_split_it_cannot_honour(tmp_path, tokenizer):
    """One file read whole is one split: `split: test` of it would read the training rows."""
    path = write(tmp_path, ROWS)
    with pytest.raises(DataError, match=r"is one file, read whole as split 'train', so split 'test' cannot be honoured"):
        prepare(spec(path, split="test"), PROMPT, tokenizer)


def test_a_dataset_directory_without_the_split_is_named(tmp_path, tokenizer):
    (tmp_path / "ds").mkdir()
    write(tmp_path, ROWS).rename(tmp_path / "ds" / "train.jsonl")
    with pytest.raises(DataError, match=r"ds: Unknown split \"valid\".*\['train'\]"):
        prepare(spec(tmp_path / "ds", split="valid"), PROMPT, tokenizer)


# ---------------------------------------------------------------- special tokens (issue 23)


def test_a_tokenizer_without_eos_or_pad_is_refused_up_front(tiny_demo, tmp_path):
    from apo.data import check_special_tokens

    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    check_special_tokens(tok, "m")
    tok.pad_token = None
    with pytest.raises(DataError, match=r"model m: its tokenizer has no pad token.*\"pad_token\" in "
                                        r"m/tokenizer_config.json.*EOS token"):
        check_special_tokens(tok, "m")
    tok.pad_token = tok.eos_token  # pad = EOS, as Qwen2.5's base tokenizer has it
    check_special_tokens(tok, "m")
    tok.eos_token = None
    with pytest.raises(DataError, match=r"model m: its tokenizer has no EOS token.*\"eos_token\""):
        check_special_tokens(tok, "m")


def test_the_data_stage_checks_the_tokenizer_before_reading(tiny_demo, tmp_path):
    from apo.data import run

    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    settings = {**spec(tmp_path / "missing.jsonl"), "prompt": PROMPT, "grading_timeout_s": 5,
                "grading_method": "math_verify"}
    with pytest.raises(DataError, match="has no pad token"):
        run(settings, str(tmp_path / "tok"), None, {"workers": 1})
