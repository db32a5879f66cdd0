"""One small generation interface, used by reference sampling, training and evaluation.

A backend turns chat-formatted prompt strings into `n` completions each. The transformers
backend lives here; the vLLM backend plugs in behind the same `Generator` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @classmethod
    def from_config(cls, section: dict, n: int | None = None) -> "SamplingSettings":
        return cls(
            n=n if n is not None else section.get("n", section.get("k", 1)),
            temperature=section["temperature"],
            top_p=section["top_p"],
            max_new_tokens=section["max_new_tokens"],
        )


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # response tokens, including the end-of-turn token when it ended
    finished: bool  # ended with an end-of-sequence token (not cut at max_new_tokens)


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[str], sampling: SamplingSettings, progress: bool = True
    ) -> list[list[Completion]]:
        """`n` completions for every prompt, in prompt order."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class HFGenerator:
    """Batched `model.generate` with left padding.

    It samples from the very model object it is given, so in training the weights are always
    current and `sync_weights` has nothing to do.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingSettings, progress: bool = True):
        tok, model = self.tokenizer, self.model
        was_training = model.training
        model.eval()
        out: list[list[Completion]] = []
        # One batch holds batch_size sequences in all, i.e. batch_size // n prompts.
        per_batch = max(1, self.batch_size // sampling.n)
        starts = range(0, len(prompts), per_batch)
        for start in tqdm(starts, desc="generate (hf)", disable=not progress, mininterval=2):
            chunk = list(prompts[start : start + per_batch])
            enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            greedy = sampling.temperature == 0
            seqs = model.generate(
                **enc,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else 0,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.n,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
            new = seqs[:, enc["input_ids"].shape[1] :].tolist()
            for i in range(len(chunk)):
                out.append([self._completion(ids) for ids in new[i * sampling.n : (i + 1) * sampling.n]])
        model.train(was_training)
        return out

    def _completion(self, ids: list[int]) -> Completion:
        for pos, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[: pos + 1]
                return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, True)
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, False)

    def sync_weights(self, model) -> None:
        assert model is self.model, "the hf backend samples from the model it was built with"


def make_generator(backend: str, model, tokenizer, batch_size: int) -> Generator:
    if backend == "hf":
        return HFGenerator(model, tokenizer, batch_size)
    raise ValueError(f"generation.backend: unknown backend {backend!r} (expected 'hf')")
