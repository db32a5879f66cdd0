"""The embedded demo: a synthetic math task and a tiny reference model, built locally.

Everything a real run downloads (a base model, its tokenizer, a dataset) is built here and
saved with `save_pretrained` / JSON lines, so every later stage loads it exactly as it would
load `Qwen/Qwen2.5-1.5B` and a hub dataset.

The task: short word problems over a running count (``Mia has 7 marbles. She finds 5 more.
Then she loses 3. ...``), solved step by step (``7 + 5 = 12. 12 - 3 = 9. The answer is
\\boxed{9}.``).

Why the reference policy leaves room for RL: the warm start imitates a solver that usually
does not bother to reason. With probability `reason_prob` a demonstration works the problem
out step by step (each step slipping by 1 or 2 with probability `slip_prob`); otherwise it
guesses a number near the answer (``The answer is \\boxed{13}.``), right one time in five. The
warm-started model learns both behaviours, so it solves only a minority of problems, greedy
or sampled, although it can compute the answer. An on-policy method with a verifiable reward
can learn to reason every time, which is what RL does for real LLMs too: it up-weights a good
strategy the base model already has. Watch the response length grow in the training curves.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apo.job import output_name

log = logging.getLogger(__name__)

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Ivy", "Sam", "Lena", "Raj", "Tom", "Ana"]
HE = {"Leo", "Noah", "Omar", "Sam", "Raj", "Tom"}
ITEMS = ["marbles", "apples", "stickers", "coins", "books", "shells", "cards", "pens"]
GAIN = ["finds {n} more", "buys {n} more", "gets {n} more", "is given {n} more"]
LOSS = ["loses {n}", "gives away {n}", "sells {n}", "uses {n}"]
SLIPS = [-2, -1, 1, 2]
GUESS_OFFSETS = [-2, -1, 0, 1, 2]

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    start: int
    ops: tuple[tuple[int, int], ...]  # (sign, amount) per step


def make_problem(
    rng: random.Random, min_ops: int, max_ops: int, max_start: int = 20, max_operand: int = 9
) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_start)
    start, ops, sentences = value, [], [f"{name} has {value} {item}."]
    pronoun = "He" if name in HE else "She"
    for i in range(rng.randint(min_ops, max_ops)):
        n = rng.randint(1, max_operand)
        sign = -1 if (rng.random() < 0.5 and value - n >= 0) else 1
        value += sign * n
        ops.append((sign, n))
        verb = rng.choice(GAIN if sign > 0 else LOSS).format(n=n)
        sentences.append(f"Then {pronoun.lower()} {verb}." if i else f"{pronoun} {verb}.")
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), value, start, tuple(ops))


def solution(problem: Problem, rng: random.Random, slip_prob: float, reason_prob: float = 1.0) -> str:
    """A demonstration: step by step with probability `reason_prob` (each step slipping with
    probability `slip_prob`), else a guess near the answer without working."""
    if rng.random() >= reason_prob:
        guess = max(0, problem.answer + rng.choice(GUESS_OFFSETS))
        return f"The answer is \\boxed{{{guess}}}."
    value, steps = problem.start, []
    for sign, n in problem.ops:
        result = value + sign * n
        if rng.random() < slip_prob:
            result = max(0, result + rng.choice(SLIPS))
        steps.append(f"{value} {'+' if sign > 0 else '-'} {n} = {result}.")
        value = result
    return " ".join(steps) + f" The answer is \\boxed{{{value}}}."


def make_problems(n: int, seed: int, task: dict, exclude=frozenset()) -> list[Problem]:
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        p = make_problem(rng, task["min_ops"], task["max_ops"], task["max_start"], task["max_operand"])
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with one token per digit (so arithmetic is done digit by digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
    )


def build_model(tokenizer, spec: dict, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_heads"],
        head_dim=spec["hidden_size"] // spec["num_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(cfg)


def chat_prompt(tokenizer, question: str, instruction: str) -> str:
    content = f"{question} {instruction}".strip()
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def warm_start(model, tokenizer, prompts: list[str], responses: list[str], settings: dict, seed: int):
    """Supervised fine-tuning on (prompt, response); loss on response tokens only."""
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    examples = []
    for p, r in zip(prompts, responses):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]
        examples.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    steps, warmup = settings["steps"], max(1, settings["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    bar = tqdm(range(steps), desc="demo warm start", mininterval=2)
    for step in bar:
        idx = torch.randint(len(examples), (settings["batch_size"],), generator=g).tolist()
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = examples[i]
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = (
                torch.tensor(x),
                torch.tensor(y),
                1,
            )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def build(settings: dict, out_dir: str | Path, instruction: str) -> dict:
    """Write `model/` (tokenizer + warm-started model), `train.jsonl`, `test.jsonl` and
    `valid.jsonl` (held out for validation during training; no benchmark reads it)."""
    out_dir = Path(out_dir)
    seed, task = settings["seed"], settings["task"]
    train = make_problems(task["num_train"], seed, task)
    test = make_problems(task["num_test"], seed + 1, task, {p.question for p in train})
    # validation problems: disjoint from both, drawn last so that train and test stay as they were
    valid = make_problems(task["num_valid"], seed + 3, task, {p.question for p in train + test})
    rng = random.Random(seed + 2)
    responses = [solution(p, rng, task["slip_prob"], task["reason_prob"]) for p in train]

    # Train BPE on what the model will see (questions, solutions and the instruction, which
    # repeats in every prompt), so that frequent words are single tokens and sequences short.
    tokenizer = build_tokenizer(
        [f"{p.question} {instruction}" for p in train] + responses, settings["model"]["vocab_size"]
    )
    model = build_model(tokenizer, settings["model"], seed)
    prompts = [chat_prompt(tokenizer, p.question, instruction) for p in train]
    final_loss = warm_start(model, tokenizer, prompts, responses, settings["warm_start"], seed)

    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir / output_name("demo", "model"))
    tokenizer.save_pretrained(out_dir / output_name("demo", "model"))
    for name, problems in [("train", train), ("test", test), ("valid", valid)]:
        with open(out_dir / output_name("demo", name), "w") as f:
            for i, p in enumerate(problems):
                row = {"id": f"{name}-{i:05d}", "question": p.question, "answer": str(p.answer)}
                f.write(json.dumps(row) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    return {"warm_start_loss": final_loss, "num_parameters": n_params, "vocab_size": len(tokenizer)}


def run(settings: dict, out_dir: str | Path) -> dict:
    """Stage entry: `build` into a temporary directory inside `out_dir`, then each file moved
    into place (the model last: the rules wait for it), so a killed job leaves nothing that
    looks finished. Returns the metrics to log."""
    import tempfile

    from apo.io import move_into_place

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        info = build(settings, tmp, settings["instruction"])
        for role in ("train", "test", "valid", "model"):
            move_into_place(Path(tmp) / output_name("demo", role), out_dir / output_name("demo", role))
    return info
