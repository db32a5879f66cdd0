"""One training process of tests/test_fsdp.py, started by torchrun (or called in-process for
the single-process reference).

`python fsdp_worker.py ARGS_JSON` with "mode":
- "train": `train.train` under FSDP, as the pipeline's training job runs it;
- "update": one update of the policy on a fixed rollout (the same global batch whatever the
  number of processes), the weights pushed into the engine; the engine's weights are compared
  with the gathered policy and the gathered policy is saved for the test to compare.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from apo import train as T
from apo.sharding import full_weights


def fixed_rollout(t: T.Trainer) -> T.Rollout:
    """Step 0's prompts, this process's share of them (as `train.roll_out` splits them), with
    responses and rewards that depend only on the prompt: the same global batch in one process
    or several."""
    s, n, acc = t.settings, t.sampling.n, t.accelerator
    idx = T.batch_indices(0, s["batch_size"], len(t.data), s["seed"])[acc.process_index :: t.world]
    eos = t.tokenizer.eos_token_id
    r_ids = [[10 + (7 * i + 3 * j + k) % 290 for k in range(4 + (i + j) % 5)] + [eos] for i in idx for j in range(n)]
    return T.Rollout(
        idx=idx,
        p_ids=[t.prompt_ids[i] for i in idx for _ in range(n)],
        r_ids=r_ids,
        rewards=torch.tensor([float((i + j) % 2) for i in idx for j in range(n)], device=acc.device),
        vstars=torch.tensor(t.data["vstar"].iloc[idx].repeat(n).to_numpy(), dtype=torch.float32, device=acc.device),
        finished=[True] * len(r_ids),
    )


def update_once(t: T.Trainer) -> dict[str, torch.Tensor]:
    """Score and update on the fixed rollout; the gathered policy afterwards (every process)."""
    r = fixed_rollout(t)
    T.score(t, r, {})
    T.update(t, r, 0)
    return {k: v.cpu() for k, v in full_weights(t.policy)}


def engine_logprob_gaps(t: T.Trainer, full: dict[str, torch.Tensor], model_path: str) -> dict:
    """How far the engine's per-token log-probs of its own samples are from the gathered
    policy's, and from the policy before the update (which they must no longer match). vLLM's
    CPU backend repacks its linear layers' weights, so they are compared through what the
    engine computes."""
    from transformers import AutoModelForCausalLM

    from apo.generation import SamplingSettings
    from apo.scoring import token_logprobs

    prompts = list(t.data["prompt"].iloc[:6])
    sampling = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12)
    outs = [c for cs in t.generator.generate(prompts, sampling, progress=False, seed=3, logprobs=True) for c in cs]
    p_ids = [t.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(2)]
    r_ids = [c.token_ids for c in outs]
    engine = torch.tensor([lp for c in outs for lp in c.logprobs])
    gaps = {}
    for label, weights in (("updated", full), ("before", None)):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        if weights is not None:
            model.load_state_dict(weights, strict=False)  # a tied LM head is not listed
            model.tie_weights()
        with torch.no_grad():
            logp, mask = token_logprobs(model, p_ids, r_ids, t.tokenizer.pad_token_id)
        gaps[label] = float((logp[mask.bool()] - engine).abs().max())
    return gaps


def main(args: dict) -> None:
    if args["mode"] == "train":
        logging.basicConfig(level=logging.INFO)  # "resumed from ..." on stderr
        res = T.train(args["settings"], *args["inputs"], args["out"], *args["runtime"], distributed="fsdp")
        if int(os.environ["RANK"]) == 0:
            res["history"].to_parquet(Path(args["out"]) / "metrics.parquet")
        return
    t = T.setup(args["settings"], *args["inputs"], Path(args["out"]), args["runtime"][0],
                args.get("gradient_checkpointing", False), distributed="fsdp")
    assert t.policy.is_gradient_checkpointing == args.get("gradient_checkpointing", False)
    full = update_once(t)
    t.generator.sync_weights(t.policy)
    mismatch = engine_logprob_gaps(t, full, args["inputs"][0])
    rank = t.accelerator.process_index
    with open(f"{args['out']}/engine_{rank}.json", "w") as f:
        json.dump(mismatch, f)
    if rank == 0:
        torch.save(full, f"{args['out']}/policy.pt")
    t.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
