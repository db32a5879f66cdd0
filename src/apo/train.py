"""Stage 2 of A*-PO: on-policy training with one generation per prompt (and, on equal
footing, the baselines: GRPO and REBEL sample a group or a pair per prompt, PPO one response
scored by a learned critic).

The loop, per optimizer step:
  1. take the next `batch_size` prompts (a fixed permutation per epoch, so the position in
     the data is just the step number),
  2. sample ONE response per prompt (A*-PO) from the current policy and grade it,
  3. score the responses under the frozen reference (PPO: and the critic, then GAE),
  4. per micro-batch: log-probs under the policy, the A*-PO loss against r - V*, backward
     (gradients accumulate over micro-batches),
  5. clip, AdamW step, LR schedule, push the new weights to the generation engine,
  6. log; every `checkpoint_every` steps an atomic checkpoint (model, optimizer, scheduler,
     RNG states, step, metric history) from which a rerun continues.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from apo.generation import SamplingSettings, VLLMSettings, make_generator
from apo.io import atomic_path, read_json, write_json
from apo.losses import (
    apo_loss,
    gae,
    group_advantages,
    grpo_loss,
    masked_whiten,
    ppo_loss,
    ppo_token_rewards,
    rebel_loss,
)
from apo.reward import Grader

log = logging.getLogger(__name__)


# Each method: a loss over one micro-batch `mb` of responses (flattened prompt-major, so the
# responses of one prompt are consecutive), and how many responses it samples per prompt.
# `mb` holds [B, T] tensors logp (with grad), ref_logp, mask, and [B] rewards and vstar; for
# PPO also the critic's values (with grad) and the batch's old_values, advantages, returns.
# The baselines do one optimizer step per batch, so pi_old = pi and the ratio to it is 1.
def _apo(mb, s):
    return apo_loss(mb["logp"], mb["ref_logp"], mb["mask"], mb["rewards"], mb["vstar"], s["beta2"])


def _grpo(mb, s):
    g = s["grpo"]
    adv = group_advantages(mb["rewards"].view(-1, g["group_size"])).flatten()
    return grpo_loss(mb["logp"], mb["logp"].detach(), mb["ref_logp"], mb["mask"], adv, g["clip_eps"], g["kl_coef"])


def _rebel(mb, s):
    return rebel_loss(mb["logp"], mb["logp"].detach(), mb["mask"], mb["rewards"], s["rebel"]["eta"])


def _ppo(mb, s):
    p = s["ppo"]
    return ppo_loss(
        mb["logp"], mb["logp"].detach(), mb["mask"], mb["advantages"], mb["values"], mb["old_values"],
        mb["returns"], p["clip_eps"], p["value_clip"],
    )


LOSSES = {"apo": _apo, "grpo": _grpo, "rebel": _rebel, "ppo": _ppo}


def samples_per_prompt(s: dict) -> int:
    """A*-PO and PPO: one generation per prompt; GRPO: a group of G; REBEL: a pair."""
    if s["method"] == "grpo":
        return s["grpo"]["group_size"]
    return {"apo": 1, "ppo": 1, "rebel": 2}[s["method"]]


class NonFiniteLossError(RuntimeError):
    pass


def _forward(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Run prompt + response sequences, right-padded, through `model`; returns its output and
    the input ids."""
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
    ids, attn = ids.to(device), attn.to(device)
    return model(input_ids=ids, attention_mask=attn), ids


def _response_positions(per_position: torch.Tensor, prompts, responses):
    """Pick, for each response token y_t, the value at the position that predicts it
    (len(prompt) - 1 + t), aligned left so that [B, T] is as small as possible.

    Args: per_position [B, L - 1], position i predicting token i + 1. Returns (out, mask) [B, T].
    """
    t_max = max(map(len, responses))
    out = per_position.new_zeros((len(responses), t_max))
    mask = torch.zeros((len(responses), t_max), device=per_position.device)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        out[b, : len(r)] = per_position[b, len(p) - 1 : len(p) - 1 + len(r)]
        mask[b, : len(r)] = 1
    return out, mask


def token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Per-token log pi(y_t | x, y_<t) of each response, right-padded to [B, T].

    Returns (logp [B, T], mask [B, T]) where mask is 1 on response tokens.
    """
    output, ids = _forward(model, prompts, responses, pad_id)
    logits = output.logits[:, :-1].float()
    # log_softmax at the target only: gather minus logsumexp, no [B, L, V] log-prob tensor
    logp = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return _response_positions(logp, prompts, responses)


def token_values(critic, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """PPO's critic: V(x, y_<t), the value of the state in which y_t is chosen, [B, T]."""
    output, _ = _forward(critic, prompts, responses, pad_id)
    return _response_positions(output.logits[:, :-1, 0].float(), prompts, responses)


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B_i, T_i] tensors along B, zero-padding every T_i to the largest."""
    width = max(x.shape[1] for x in tensors)
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in tensors])


def score_batch(fn, model, prompts, responses, parts: list[slice], pad_id: int):
    """`fn` (token_logprobs or token_values) over a batch, one micro-batch (`parts`) at a
    time; returns (scores, mask), each one zero-padded [B, T] tensor."""
    outs = [fn(model, prompts[sl], responses[sl], pad_id) for sl in parts]
    return pad_cat([x for x, _ in outs]), pad_cat([m for _, m in outs])


def batch_indices(step: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """Prompts of optimizer step `step`: a fresh permutation per epoch, batches never straddle
    an epoch boundary (the tail of an epoch that does not fill a batch is skipped)."""
    per_epoch = n_prompts // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size].tolist()


@dataclass
class CollapseMonitor:
    """Flags a training collapse: reward or response length falling far below where it began.

    Compares the mean over the last `window` steps with the mean over the first `window`.
    """

    window: int = 20
    reward_ratio: float = 0.5
    length_ratio: float = 0.3
    history: list = field(default_factory=list)
    message: str | None = None

    def update(self, reward: float, length: float) -> str | None:
        """Record one step; returns the message on the step a collapse is first detected."""
        self.history.append((reward, length))
        w = self.window
        if self.message is not None or len(self.history) < 2 * w:
            return None
        r0 = sum(h[0] for h in self.history[:w]) / w
        l0 = sum(h[1] for h in self.history[:w]) / w
        r1 = sum(h[0] for h in self.history[-w:]) / w
        l1 = sum(h[1] for h in self.history[-w:]) / w
        step = len(self.history)
        if r0 > 0 and r1 < self.reward_ratio * r0:
            self.message = f"reward collapsed at step {step}: {r1:.3f} (first {w} steps: {r0:.3f})"
        elif l1 < self.length_ratio * l0:
            self.message = f"response length collapsed at step {step}: {l1:.1f} tokens (was {l0:.1f})"
        return self.message


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; a complete one has been renamed to `step-N`."""
    done = sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def save_checkpoint(accelerator, ckpt_root: Path, step: int, state: dict, keep: int) -> None:
    """Every process writes its part (its RNG state; its shards under ZeRO) into one hidden
    directory, which the main process renames to `step-N` when all are done."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the loop


def train(
    settings: dict,
    model_path: str,
    prompts_path: str,
    vstar_path: str | None,
    out_dir: str | os.PathLike,
    generation: dict,
    grading: dict,
    tracker=None,
    gradient_checkpointing: bool = False,
) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, get_scheduler

    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    s = settings
    # Data parallel (`accelerate launch --num_processes N`): each process samples and
    # trains on its 1/N of every batch with its own generation engine on its own device.
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher (before any process group)
    if s["batch_size"] % (s["micro_batch_size"] * world):
        raise ValueError(
            f"train.batch_size must be a multiple of train.micro_batch_size x {world} training processes"
        )
    accum = s["batch_size"] // (s["micro_batch_size"] * world)
    # split_batches: `batch_size` is the global batch, so the LR schedule steps once per
    # optimizer step, not once per process.
    accelerator = Accelerator(
        gradient_accumulation_steps=accum, dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    if accelerator.distributed_type == DistributedType.FSDP and s["backend"] == "hf":
        raise NotImplementedError(
            "resources.train.distributed: fsdp shards the policy, and the hf generation engine samples "
            "from the local module; use ddp or deepspeed (ZeRO-2 keeps full weights on every GPU)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and s["method"] == "ppo":
        raise NotImplementedError(
            "train.method ppo trains two networks (policy and critic), which accelerate's DeepSpeed "
            "integration needs one plugin each for; use resources.train.distributed: ddp or fsdp"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no dataloader to read it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = s["micro_batch_size"]
    set_seed(s["seed"], device_specific=True)  # seed + process index: one process, as before

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # train.dtype: bfloat16 halves weights, gradients and optimizer state (the paper trains
    # in bf16); the reference is scored in the same dtype so the log-ratio starts at zero.
    dtype = getattr(torch, s["dtype"])
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    reference.requires_grad_(False).eval().to(accelerator.device)
    if gradient_checkpointing:
        # Takes effect in train mode only; the loop switches to train mode around the
        # update and back to eval mode for generation (which needs the KV cache).
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    data = pd.read_parquet(prompts_path)
    if vstar_path is not None:  # A*-PO trains on the prompts of the (filtered) V* table
        vstar = pd.read_parquet(vstar_path)
        data = data.merge(vstar[["id", "vstar"]], on="id", how="inner")
    else:
        data = data.assign(vstar=float("nan"))
    if len(data) < s["batch_size"]:
        raise ValueError(
            f"{len(data)} training prompts (after V* filtering), fewer than train.batch_size={s['batch_size']}"
        )
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in data["prompt"]]

    def optimize(model, lr):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=s["weight_decay"], betas=(0.9, 0.999))
        scheduler = get_scheduler(
            s["lr_schedule"], optimizer, num_warmup_steps=s["warmup_steps"], num_training_steps=s["steps"]
        )
        return accelerator.prepare(model, optimizer, scheduler)

    policy, optimizer, scheduler = optimize(policy, s["lr"])
    critic = None
    if s["method"] == "ppo":
        # The critic starts from the reference model with a fresh scalar head (a token
        # classifier with one label), trained by its own optimizer at its own rate.
        critic = AutoModelForTokenClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
        if gradient_checkpointing:
            critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        critic, critic_optimizer, critic_scheduler = optimize(critic, s["ppo"]["critic_lr"])
        critic.eval()
    trained = [policy] if critic is None else [policy, critic]
    # Colocated engine: vLLM lives in this process and gets the new weights after every step.
    generator = make_generator(
        s["backend"], tokenizer, model=accelerator.unwrap_model(policy), model_path=model_path,
        batch_size=generation["batch_size"], seed=s["seed"],
        max_model_len=max(map(len, prompt_ids)) + s["max_new_tokens"],
        vllm=VLLMSettings.from_runtime(generation),
    )
    n = samples_per_prompt(s)
    sampling = SamplingSettings(
        n=n, temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=s["max_new_tokens"]
    )
    loss_fn = LOSSES[s["method"]]
    monitor = CollapseMonitor(**s["collapse"])

    start, history = 0, []
    resume_from = latest_checkpoint(ckpt_root)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # models, optimizers, schedulers, RNG states
        state = read_json(resume_from / "trainer_state.json")
        start, history = state["step"], state["history"]
        for h in history:
            monitor.update(h["reward"], h["response_length"])
        generator.sync_weights(accelerator.unwrap_model(policy))  # the engine loaded step 0's
        log.info("resumed from %s at step %d", resume_from, start)

    bar = tqdm(range(start, s["steps"]), desc="train", initial=start, total=s["steps"], mininterval=2,
               disable=not accelerator.is_main_process)
    with Grader(grading["timeout_s"], grading["workers"]) as grader:
        for step in bar:
            t0 = time.perf_counter()
            idx = batch_indices(step, s["batch_size"], len(data), s["seed"])
            idx = idx[accelerator.process_index :: world]  # this process's share
            batch = data.iloc[idx]
            # n responses per prompt, flattened prompt-major; the sampler is seeded per step (and
            # process) so that a resumed run draws what the uninterrupted run drew
            outs = generator.generate(list(batch["prompt"]), sampling, progress=False, seed=s["seed"] * 1_000_003 + step + 7_919 * accelerator.process_index)
            completions = [c for cs in outs for c in cs]
            generator.sleep()  # GPU: hand the engine's memory to the update
            t_gen = time.perf_counter()
            grades = grader.grade(list(batch["answer"].repeat(n)), [c.text for c in completions])
            rewards = torch.tensor(grades.rewards, device=accelerator.device)
            vstars = torch.tensor(batch["vstar"].repeat(n).to_numpy(), dtype=torch.float32, device=accelerator.device)
            t_grade = time.perf_counter()

            # Score the batch before any update: reference log-probs (and for PPO the critic's
            # values and GAE, whose advantages are normalised over the whole batch).
            mb = s["micro_batch_size"] * n  # responses per micro-batch: whole prompts
            parts = [slice(m * mb, (m + 1) * mb) for m in range(accum)]
            p_ids = [prompt_ids[i] for i in idx for _ in range(n)]
            r_ids = [c.token_ids or [tokenizer.eos_token_id] for c in completions]

            def score(fn, model):
                return score_batch(fn, model, p_ids, r_ids, parts, tokenizer.pad_token_id)

            with torch.no_grad():
                ref_logp, mask = score(token_logprobs, reference)
                t_ref = time.perf_counter()
                if critic is not None:
                    ppo = s["ppo"]
                    old_values, _ = score(token_values, critic)
                    # the reward's KL penalty needs pi_old (= pi before this step); with
                    # kl_coef 0 it vanishes and the extra policy pass is skipped
                    old_logp = score(token_logprobs, policy)[0] if ppo["kl_coef"] > 0 else ref_logp
                    token_rewards = ppo_token_rewards(rewards, old_logp, ref_logp, mask, ppo["kl_coef"])
                    advantages, returns = gae(token_rewards, old_values, mask, ppo["gamma"], ppo["lam"])
                    advantages = masked_whiten(advantages, mask)
            t_values = time.perf_counter()

            losses, stats, kls = [], [], []
            for model in trained:
                model.train(gradient_checkpointing)  # unchanged (eval) without checkpointing
            for sl in parts:
                with accelerator.accumulate(*trained):
                    logp, _ = token_logprobs(policy, p_ids[sl], r_ids[sl], tokenizer.pad_token_id)
                    width = logp.shape[1]  # this micro-batch's longest response
                    micro = {
                        "logp": logp, "ref_logp": ref_logp[sl, :width], "mask": mask[sl, :width],
                        "rewards": rewards[sl], "vstar": vstars[sl],
                    }
                    if critic is not None:
                        micro["values"], _ = token_values(critic, p_ids[sl], r_ids[sl], tokenizer.pad_token_id)
                        for k, v in (("old_values", old_values), ("advantages", advantages), ("returns", returns)):
                            micro[k] = v[sl, :width]
                    loss, st = loss_fn(micro, s)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"non-finite loss {loss.item()} at optimizer step {step + 1}; the last good checkpoint "
                            f"is {latest_checkpoint(ckpt_root)}"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), s["max_grad_norm"])
                        if critic is not None:
                            accelerator.clip_grad_norm_(critic.parameters(), s["max_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if critic is not None:
                        critic_optimizer.step()
                        critic_scheduler.step()
                        critic_optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                stats.append(st)
                # sample-based KL(pi || pi_ref) = E_pi[sum_t log pi - log pi_ref]
                kls.append(((logp.detach() - micro["ref_logp"]) * micro["mask"]).sum(-1).mean().item())
            for model in trained:
                model.eval()
            t_sync = time.perf_counter()
            generator.sync_weights(accelerator.unwrap_model(policy))
            t_end = time.perf_counter()

            lengths = [len(c.token_ids) for c in completions]
            row = {
                "step": step + 1,
                "reward": float(rewards.mean()),
                "loss": sum(losses) / accum,
                "kl": sum(kls) / accum,
                "response_length": sum(lengths) / len(lengths),
                "truncated": sum(not c.finished for c in completions) / len(completions),
                "vstar": float(vstars.mean()),
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),  # DeepSpeed: may be None
                "lr": scheduler.get_last_lr()[0],
                **{k: sum(x[k] for x in stats) / accum for k in stats[0]},  # the loss's own stats
                "tokens": n * sum(len(prompt_ids[i]) for i in idx) + sum(lengths),
                "time_generate_s": t_gen - t0,
                "time_grade_s": t_grade - t_gen,
                "time_ref_logprobs_s": t_ref - t_grade,
                "time_values_s": t_values - t_ref,  # PPO's critic pass and GAE (0 for the others)
                "time_update_s": t_sync - t_values,
                "time_sync_s": t_end - t_sync,
                "time_step_s": t_end - t0,
                "peak_memory_mb": peak_memory_mb(accelerator.device),
            }
            if world > 1:  # the whole batch's means: every process has an equal share
                keys = [k for k in row if k != "step"]
                mean = accelerator.reduce(
                    torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=accelerator.device), "mean"
                )
                row.update(zip(keys, mean.tolist()))
                row["tokens"] = round(row["tokens"] * world)
            history.append(row)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.2f}", len=f"{row['response_length']:.1f}")

            collapse = monitor.update(row["reward"], row["response_length"])
            if collapse:
                log.warning("COLLAPSE: %s", collapse)
                if tracker is not None:
                    tracker.set_tags({"collapse": collapse})
                if s["stop_on_collapse"]:
                    raise RuntimeError(f"training stopped: {collapse} (train.stop_on_collapse is true)")

            last = step + 1 == s["steps"]
            if (step + 1) % s["checkpoint_every"] == 0 or last:
                state = {"step": step + 1, "history": history, "collapse": monitor.message}
                save_checkpoint(accelerator, ckpt_root, step + 1, state, s["keep_checkpoints"])

    final = accelerator.unwrap_model(policy)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_path(out_dir / "model", is_dir=True) as tmp:
            final.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    metrics = pd.DataFrame(history)
    # one column order whether rows came from this process or from a checkpoint's JSON
    metrics = metrics[["step", *sorted(c for c in metrics.columns if c != "step")]]
    first = metrics.head(min(len(metrics), monitor.window))
    lastw = metrics.tail(min(len(metrics), monitor.window))
    return {
        "history": metrics,
        "summary": {
            "steps": int(s["steps"]),
            "reward_first": float(first["reward"].mean()),
            "reward_last": float(lastw["reward"].mean()),
            "kl_last": float(lastw["kl"].mean()),
            "response_length_last": float(lastw["response_length"].mean()),
            "collapse": monitor.message or "",
            "train_time_s": float(metrics["time_step_s"].sum()),
            "tokens": int(metrics["tokens"].sum()),
            "peak_memory_mb": float(metrics["peak_memory_mb"].max()),
            "dtype": s["dtype"],
            "gradient_checkpointing": bool(gradient_checkpointing),
        },
    }
