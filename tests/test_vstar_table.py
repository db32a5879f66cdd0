"""vstar.source: table — V* from a published stage-1 table instead of reference sampling.

The fixture file has the layout of the authors' published tables (one row per prompt; the
problem in extra_info.question, its row index in extra_info.index, N responses and their
rewards in response_i / eval_i), built here on a few rows; nothing is downloaded.
"""

import json

import pandas as pd
import pytest
import torch

from apo import cli
from apo.vstar import TableError, samples_from_table, vstar_estimate

QUESTIONS = ["What is 1+1?", "What is  2*3?\n", "Solve x+1=3.", "Not a training prompt."]
REWARDS = [[1, 1, 0, 1], [0, 0, 0, 0], [1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1]]
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def published_layout(rewards=REWARDS) -> pd.DataFrame:
    rows = []
    for i, (q, rs) in enumerate(zip(QUESTIONS, rewards)):
        row = {
            "data_source": "lighteval/MATH",
            "prompt": [{"role": "user", "content": f"{q} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "2"},
            "extra_info": {"split": "train", "index": i, "answer": "...", "question": q},
        }
        row.update({f"response_{j}": f"response {j}" for j in range(4)})
        row.update({f"eval_{j}": r for j, r in enumerate(rs)})
        rows.append(row)
    return pd.DataFrame(rows)


# Training prompts as the data stage writes them; "unmatched" is not in the table.
PROMPTS = pd.DataFrame({
    "id": ["a", "b", "c", "unmatched"],
    "prompt": ["<chat>"] * 4,
    "question": ["What is 1+1?", "What is 2*3?", "  Solve x+1=3.", "Something else."],
    "answer": ["2", "6", "2", "0"],
    "source": ["x"] * 4,
})
BY_TEXT = {"path": None, "subset": None, "split": "train", "id_field": None, "prompt_field": "extra_info.question",
           "reward_fields": [f"eval_{j}" for j in range(4)], "reward_list_field": None}


@pytest.fixture
def table_file(tmp_path):
    path = tmp_path / "math_size_qwen2.5_1.5b_eval.parquet"
    published_layout().to_parquet(path)
    return path


def test_join_by_problem_text_counts_what_did_not_match(table_file):
    long, counts = samples_from_table({**BY_TEXT, "path": str(table_file)}, PROMPTS)
    assert counts == {"table_rows": 4, "table_duplicate_keys": 0, "prompts": 4, "prompts_matched": 3,
                      "prompts_unmatched": 1, "table_rows_unused": 1}
    # whitespace differences do not break the join; every matched prompt has its N = 4 rewards
    assert long.groupby("id")["reward"].apply(list).to_dict() == {
        "a": [1.0, 1.0, 0.0, 1.0], "b": [0.0] * 4, "c": [1.0, 0.0, 0.0, 0.0]}


def test_join_by_id_and_vstar_from_the_existing_estimator(table_file, tmp_path):
    prompts = PROMPTS.assign(id=["0", "1", "2", "99"])
    spec = {**BY_TEXT, "path": str(table_file), "id_field": "extra_info.index", "prompt_field": None}
    long, counts = samples_from_table(spec, prompts)
    assert counts["prompts_matched"] == 3 and counts["prompts_unmatched"] == 1
    from apo.vstar import vstar_table

    table = vstar_table(long, beta1=0.5)
    expected = vstar_estimate(torch.tensor(REWARDS[:3], dtype=torch.float64), 0.5).tolist()
    assert table["vstar"].tolist() == pytest.approx(expected)
    assert table["n_correct"].tolist() == [3, 0, 1]


def test_list_column_of_rewards_in_json_lines(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text("".join(json.dumps({"uid": i, "rewards": rs}) + "\n" for i, rs in zip("abc", REWARDS)))
    spec = {**BY_TEXT, "path": str(path), "id_field": "uid", "prompt_field": None,
            "reward_fields": None, "reward_list_field": "rewards"}
    long, counts = samples_from_table(spec, PROMPTS)
    assert counts["prompts_matched"] == 3 and len(long) == 12


@pytest.mark.parametrize("bad, message", [
    ("yes", "row 1, field 'eval_2': reward 'yes' is not a number"),
    (None, "row 1, field 'eval_2': reward "),
])
def test_bad_reward_names_the_file_row_and_field(tmp_path, bad, message):
    rewards = [list(map(str, rs)) for rs in REWARDS]  # a string column, so "yes" can be stored
    rewards[1][2] = bad
    path = tmp_path / "bad.parquet"
    published_layout(rewards).to_parquet(path)
    with pytest.raises(TableError) as err:
        samples_from_table({**BY_TEXT, "path": str(path)}, PROMPTS)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_column_and_no_match_are_errors(table_file):
    with pytest.raises(TableError, match=r"no column\(s\) \['evals'\]"):
        samples_from_table({**BY_TEXT, "path": str(table_file), "reward_fields": ["evals"]}, PROMPTS)
    with pytest.raises(TableError, match="none of its 4 rows matches any of the 4 training prompts"):
        samples_from_table({**BY_TEXT, "path": str(table_file)}, PROMPTS.assign(question=list("wxyz")))


def test_vstar_command_reads_the_table(table_file, tmp_path):
    """`apo vstar --prompts` (what the rule runs when vstar.source is table)."""
    prompts = tmp_path / "prompts.parquet"
    PROMPTS.to_parquet(prompts)
    settings = {"beta1": 0.0, "filter": "drop_unsolved", "source": "table",
                "table": {**BY_TEXT, "path": str(table_file)}}
    manifest = {"kind": "vstar", "hash": "0" * 12, "format": 1, "settings": settings,
                "inputs": {"table": f"external:{table_file}"}}
    stage = tmp_path / "vstar" / ("0" * 12)
    out = stage / "vstar.parquet"
    cli.main(["vstar", "--manifest", json.dumps(manifest), "--stage-dir", str(stage), "--runtime",
              json.dumps({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}), "--prompts", str(prompts)])
    v = pd.read_parquet(out)
    assert v["id"].tolist() == ["a", "c"]  # b unsolved (dropped by the filter), unmatched absent
    assert v["vstar"].tolist() == pytest.approx([0.75, 0.25])
    assert json.loads((stage / "counts.json").read_text())["prompts_unmatched"] == 1
    assert (stage / "manifest.json").exists()
