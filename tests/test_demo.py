"""The embedded demo: task generator and a model that loads like a hub model."""

import json
import random

from apo import demo
from conftest import INSTRUCTION


def test_problem_answer_follows_the_operations():
    rng = random.Random(0)
    for _ in range(50):
        p = demo.make_problem(rng, 2, 4)
        assert p.answer == p.start + sum(sign * n for sign, n in p.ops)
        assert p.answer >= 0 and 2 <= len(p.ops) <= 4


def test_clean_solution_reaches_the_gold_answer():
    p = demo.make_problem(random.Random(1), 3, 3)
    text = demo.solution(p, random.Random(2), slip_prob=0.0)
    assert text.endswith(f"\\boxed{{{p.answer}}}.")
    assert text.count("=") == 3


def test_slips_happen_at_the_configured_rate():
    rng = random.Random(3)
    problems = [demo.make_problem(rng, 1, 1) for _ in range(2000)]
    wrong = sum(f"\\boxed{{{p.answer}}}" not in demo.solution(p, rng, 0.3) for p in problems)
    assert 0.25 < wrong / len(problems) < 0.35


def test_test_and_validation_splits_are_disjoint_from_train_and_each_other(tiny_demo):
    train, test, valid = ({json.loads(line)["question"] for line in open(tiny_demo / f"{name}.jsonl")}
                          for name in ("train", "test", "valid"))
    assert len(train) == 120 and len(test) == 16 and len(valid) == 12
    assert not train & test and not valid & (train | test)


def test_model_loads_like_a_hub_model(tiny_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_demo / "model")
    assert model.config.model_type == "qwen2"
    assert model.config.head_dim >= 32  # vLLM's supported head sizes start at 32
    prompt = tok.apply_chat_template([{"role": "user", "content": "Mia has 3 pens."}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # one token per digit, so arithmetic is digit by digit
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5
    assert demo.chat_prompt(tok, "Q?", INSTRUCTION).count(INSTRUCTION) == 1
