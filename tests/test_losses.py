"""The A*-PO loss against hand-computed values, including its sign conventions."""

import pytest
import torch

from apo.losses import apo_loss, masked_sum


def test_masked_sum_ignores_padding():
    v = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_sum(v, m).tolist() == [3.0, 3.0]


def test_apo_loss_hand_computed():
    # Two responses. Response 0: tokens log-ratios 0.5 and 1.0 (sum 1.5), r=1, V*=0.25.
    # Response 1: one real token with log-ratio -2.0 (second is padding), r=0, V*=0.5.
    logp = torch.tensor([[-1.0, -0.5], [-3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.5], [-1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    r = torch.tensor([1.0, 0.0])
    v = torch.tensor([0.25, 0.5])
    beta2 = 0.1
    # residual_0 = 0.1 * 1.5 - (1 - 0.25) = 0.15 - 0.75 = -0.6
    # residual_1 = 0.1 * -2.0 - (0 - 0.5) = -0.2 + 0.5 = 0.3
    # L = (0.36 + 0.09) / 2 = 0.225
    loss, stats = apo_loss(logp, ref, mask, r, v, beta2)
    assert loss.item() == pytest.approx(0.225)
    assert stats["log_ratio"] == pytest.approx((1.5 - 2.0) / 2)
    assert stats["advantage"] == pytest.approx((0.75 - 0.5) / 2)


def test_log_ratio_is_summed_not_averaged():
    # Same per-token log-ratio, twice as many tokens: the regression sees twice the ratio.
    zero = torch.zeros(1)
    short, _ = apo_loss(torch.full((1, 2), 0.5), torch.zeros(1, 2), torch.ones(1, 2), zero, zero, 1.0)
    long, _ = apo_loss(torch.full((1, 4), 0.5), torch.zeros(1, 4), torch.ones(1, 4), zero, zero, 1.0)
    assert short.item() == pytest.approx(1.0**2)
    assert long.item() == pytest.approx(2.0**2)


def test_gradient_raises_likelihood_of_positive_advantage():
    # At pi == pi_ref, a response better than V* must get its log-prob pushed up (gradient
    # descent direction = -grad > 0), a worse one pushed down.
    for reward, direction in [(1.0, +1), (0.0, -1)]:
        logp = torch.zeros(1, 3, requires_grad=True)
        loss, _ = apo_loss(logp, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([reward]),
                           torch.tensor([0.5]), beta2=0.1)
        loss.backward()
        assert torch.all(torch.sign(-logp.grad) == direction)


def test_loss_is_zero_at_the_optimal_log_ratio():
    # beta2 * log(pi/pi_ref) == r - V*  <=>  the residual vanishes.
    beta2, r, v = 0.05, 1.0, 0.3
    target = (r - v) / beta2  # 14 nats in total, spread over 2 tokens
    logp = torch.tensor([[target / 2, target / 2]])
    loss, _ = apo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([r]), torch.tensor([v]), beta2)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------- baselines

from apo.losses import group_advantages, grpo_variant_loss, rebel_loss  # noqa: E402


def test_group_advantages_hand_computed():
    # group (1, 0, 0, 1): mean 0.5, unbiased std sqrt(1/3) = 0.57735
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), eps=0.0)
    assert a[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-6)
    b = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert b.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # no signal from a solved group


def test_grpo_loss_hand_computed_with_clipping():
    # one response, two tokens, A = +1, eps = 0.2:
    # token 0: ratio e^0.1 = 1.10517 (inside the clip range) -> -1.10517
    # token 1: ratio e^0.5 = 1.64872 -> clipped to 1.2            -> -1.2
    # mean over the two tokens: -1.152585
    logp = torch.tensor([[0.1, 0.5]])
    loss, stats = grpo_variant_loss(logp, torch.zeros(1, 2), logp.clone(), torch.ones(1, 2), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(-(1.105171 + 1.2) / 2, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    # A = -1: min(-1.105, -1.2*...) picks the pessimistic side: -ratio for token 1 is -1.6487
    loss_neg, _ = grpo_variant_loss(logp, torch.zeros(1, 2), logp.clone(), torch.ones(1, 2), torch.tensor([-1.0]))
    assert loss_neg.item() == pytest.approx((1.105171 + 1.648721) / 2, abs=1e-6)


def test_grpo_kl_term_is_k3_and_zero_at_the_reference():
    logp = torch.tensor([[-1.0]])
    zero_kl, _ = grpo_variant_loss(logp, logp, logp, torch.ones(1, 1), torch.tensor([0.0]), kl_coef=1.0)
    assert zero_kl.item() == pytest.approx(0.0)
    # q = ref - logp = 0.5: k3 = e^0.5 - 0.5 - 1 = 0.148721
    kl, _ = grpo_variant_loss(logp, logp, logp + 0.5, torch.ones(1, 1), torch.tensor([0.0]), kl_coef=2.0)
    assert kl.item() == pytest.approx(2 * 0.148721, abs=1e-6)


def test_grpo_token_mean_ignores_padding():
    logp = torch.tensor([[0.1, 99.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, _ = grpo_variant_loss(logp, torch.zeros(1, 2), logp.clone(), mask, torch.tensor([1.0]))
    assert loss.item() == pytest.approx(-1.105171, abs=1e-6)


def test_rebel_loss_hand_computed():
    # REBEL's code form: (delta log-ratio - eta * delta r)^2, eta = 0.5.
    # pair 1: seq log-ratios 0.3 (y1: 0.1 + 0.2) and -0.2 (y2): 0.5 - 0.5 * (1 - 0) = 0 -> 0
    # pair 2: 0 and 0.4 -> -0.4 - 0.5 * 0 = -0.4 -> 0.16
    logp = torch.tensor([[0.1, 0.2], [-0.2, 0.0], [0.0, 0.0], [0.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss, _ = rebel_loss(logp, torch.zeros(4, 2), mask, r, eta=0.5)
    assert loss.item() == pytest.approx((0.0 + 0.16) / 2)
    # eta scales the reward difference, not the log-ratio: eta = 2 on pair 1 -> (0.5 - 2)^2
    loss2, _ = rebel_loss(logp[:2], torch.zeros(2, 2), mask[:2], r[:2], eta=2.0)
    assert loss2.item() == pytest.approx(2.25)


def test_token_mean_over_micro_batches_equals_the_mini_batch_token_mean():
    """verl's token_mean: with the denominator the trainer passes (mini-batch tokens / micro-
    batches), the average of the micro-batch losses is the mean over all the mini-batch's tokens;
    seq_mean_token_mean weighs each response equally instead."""
    from apo.losses import aggregate

    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [7.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    tokens = mask.sum().item() / 2  # 7 tokens in 2 micro-batches
    micro = [aggregate(values[i : i + 2], mask[i : i + 2], "token_mean", tokens) for i in (0, 2)]
    assert ((micro[0] + micro[1]) / 2).item() == pytest.approx(28 / 7)
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(28 / 7)
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4 + 5.5 + 7) / 4)
    with pytest.raises(ValueError, match="train.loss_agg"):
        aggregate(values, mask, "sum")


def test_grpo_loss_aggregation_modes_differ_on_unequal_lengths():
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])  # ratio 1: per-token loss -A
    tok, _ = grpo_variant_loss(logp, logp, logp, mask, adv, loss_agg="token_mean")
    seq, _ = grpo_variant_loss(logp, logp, logp, mask, adv, loss_agg="seq_mean_token_mean")
    assert tok.item() == pytest.approx((-1 - 1 + 1) / 3)
    assert seq.item() == pytest.approx((-1 + 1) / 2)


# --------------------------------------------------------------------------- PPO

from apo.losses import gae, k3_kl, masked_whiten, ppo_loss, ppo_token_rewards  # noqa: E402


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)


def test_ppo_token_rewards_kl_on_every_token_reward_on_the_last():
    # response 0 has 3 tokens, response 1 has 1 (then padding); kl_coef 0.5
    old = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-1.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = ppo_token_rewards(torch.tensor([1.0, 0.0]), old, ref, mask, kl_coef=0.5)
    # -0.5 * (old - ref): (-0.25, 0, +0.25) and (-0.1); the reward 1 lands on token 2
    close(r, [[-0.25, 0.0, 1.25], [-0.1, 0.0, 0.0]])


def test_gae_hand_computed():
    # one response of 3 tokens, reward 1 at the end, V = (0.5, 0.2, 0.4), gamma 0.9, lam 0.5:
    # delta_2 = 1 + 0.9*0 - 0.4 = 0.6;       A_2 = 0.6
    # delta_1 = 0 + 0.9*0.4 - 0.2 = 0.16;    A_1 = 0.16 + 0.45*0.6 = 0.43
    # delta_0 = 0 + 0.9*0.2 - 0.5 = -0.32;   A_0 = -0.32 + 0.45*0.43 = -0.1265
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 7.0]])  # 7.0 sits on padding: must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[-0.1265, 0.43, 0.6, 0.0]])
    close(ret, [[0.3735, 0.63, 1.0, 0.0]])


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    # the LLM setting (gamma = lam = 1): A_t = sum_{s >= t} r_s - V_t, returns = reward-to-go
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.6, 0.9]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(ret, [[0.9, 0.8, 1.0]])
    close(adv, [[0.6, 0.2, 0.1]])


def test_masked_whiten_uses_only_response_tokens():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = masked_whiten(x, torch.tensor([[1.0, 1.0, 0.0]]), eps=0.0)
    s = 2 ** 0.5  # mean 2, unbiased variance ((1-2)^2 + (3-2)^2) / (2 - 1) = 2, as verl's masked_var
    close(w, [[-1 / s, 1 / s, 0.0]])


def test_masked_whiten_over_processes_uses_the_whole_batch():
    """Two processes (threads here, with an all-reduce that sums what both hand in), each with
    half of a batch: each whitens with the batch's mean and std, not its half's own (which would
    make every half zero-mean whatever its rewards)."""
    import threading

    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0], [10.0, 0.0, 0.0], [6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    whole = masked_whiten(x, mask)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def process(rank):
        def all_reduce_sum(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        rows = slice(2 * rank, 2 * rank + 2)
        out[rank] = masked_whiten(x[rows], mask[rows], reduce=all_reduce_sum)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads], [t.join() for t in threads]
    close(torch.cat(out), whole)
    alone = masked_whiten(x[:2], mask[:2])
    assert not torch.allclose(alone, whole[:2], atol=1e-2)  # the per-process whitening differs


def test_grpo_kl_term_is_clamped_as_verl_does():
    """A token whose reference log-prob is far below the policy's: q = -30, k3 = e^-30 + 29 ~ 29,
    clamped to 10 (verl's low_var_kl); the other direction q = +30 would be ~1e13."""
    logp = torch.tensor([[0.0, -40.0]])
    ref = torch.tensor([[-30.0, -10.0]])
    k3 = k3_kl(logp, ref)
    close(k3, [[10.0, 10.0]])
    small = k3_kl(torch.tensor([0.0]), torch.tensor([0.5]))  # inside the bounds: unclamped
    close(small, [0.148721])


def test_ppo_loss_hand_computed_with_policy_and_value_clipping():
    # token 0: ratio e^0.5 = 1.6487, A = +1 -> clipped to 1.2 -> -1.2
    # token 1: ratio 1, A = -2 -> +2
    # values (1.0, 0.0) vs old (0.0, 0.0), returns (0.0, 1.0), value_clip 0.5:
    # token 0: max((1-0)^2, (0.5-0)^2) / 2 = 0.5;  token 1: max(1, 1) / 2 = 0.5
    logp = torch.tensor([[0.5, 0.0]])
    loss, stats = ppo_loss(
        logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, -2.0]]),
        torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]),
        clip_eps=0.2, value_clip=0.5,
    )
    assert loss.item() == pytest.approx((-1.2 + 2.0) / 2 + (0.5 + 0.5) / 2, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["value_loss"] == pytest.approx(0.5)


def test_ppo_value_clip_keeps_the_pessimistic_error():
    # V moves from 0 to 1 with return 2: unclipped error (1-2)^2 = 1, clipped V = 0.5 gives
    # (0.5-2)^2 = 2.25; PPO takes the max so it does not profit from the clipped move
    _, stats = ppo_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1),
        torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 2.0), value_clip=0.5,
    )
    assert stats["value_loss"] == pytest.approx(2.25 / 2)


def test_ppo_gradients_move_policy_up_the_advantage_and_values_to_returns():
    logp = torch.zeros(1, 2, requires_grad=True)
    values = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo_loss(
        logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, -1.0]]),
        values, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
    )
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descent raises token 0, lowers token 1
    assert values.grad[0, 0] < 0 < values.grad[0, 1]  # descent moves V towards the returns


# ---------------------------------------------------------------- GRPO variants

import math  # noqa: E402

from apo import methods  # noqa: E402
from apo.config import validate_config  # noqa: E402
from apo.losses import (  # noqa: E402
    centred_advantages, logprob_gap, overlong_penalty, seq_mean_token_sum_norm,
    sequence_log_ratio, tis_weights,
)


def _blocks(group_size: int = 2) -> dict:
    """The train.* blocks of the GRPO family with their schema defaults (each variant's recipe),
    for groups of `group_size`."""
    cfg = {"experiment": "x", "model": "demo", "data": {
        "train": {"path": "demo", "split": "train", "prompt_field": "q", "answer_field": "a"},
        "benchmarks": [{"name": "b", "path": "demo", "split": "test", "prompt_field": "q", "answer_field": "a"}]}}
    train = validate_config(cfg)["train"]
    return {name: {**train[name], "group_size": group_size} for name in methods.GRPO_FAMILY}


def _micro(logp, old, mask, rewards, **kw):
    return methods.MicroBatch(logp=logp, old_logp=old, ref_logp=logp.detach().clone(), mask=mask, rewards=rewards,
                              vstar=torch.full_like(rewards, float("nan")), tokens=float(mask.sum()),
                              loss_agg="token_mean", **kw)


def test_variant_defaults_are_the_peers_recipes():
    b = _blocks()
    assert (b["grpo"]["scale_rewards"], b["grpo"]["clip_eps_high"], b["grpo"]["ratio"]) == (True, None, "token")
    assert (b["dr_grpo"]["scale_rewards"], b["dr_grpo"]["loss_agg"]) == (False, "seq_mean_token_sum_norm")
    assert (b["dapo"]["clip_eps"], b["dapo"]["clip_eps_high"], b["dapo"]["loss_agg"], b["dapo"]["dynamic_sampling"]) == (
        0.2, 0.28, "token_mean", True)
    assert (b["gspo"]["ratio"], b["gspo"]["clip_eps"], b["gspo"]["clip_eps_high"], b["gspo"]["loss_agg"]) == (
        "sequence", 3e-4, 4e-4, "seq_mean_token_mean")
    assert [methods.get(n).display for n in b] == ["GRPO", "Dr. GRPO", "DAPO", "GSPO"]


def test_centred_advantages_do_not_divide_by_the_std():
    a = centred_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]))
    assert a.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]


def test_seq_mean_token_sum_norm_divides_token_sums_by_a_constant():
    v = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # (1 + 2) + 3 over 2 responses x max_len 4
    assert seq_mean_token_sum_norm(v, m, 4).item() == pytest.approx(6 / 8)


def test_dr_grpo_loss_hand_computed():
    """Group (1, 0): advantages +0.5 / -0.5 (no std division); at ratio 1 each token's loss is
    -A; response 0 has 2 tokens, response 1 has 1: (-0.5 * 2 + 0.5 * 1) / (2 x max_len 4)."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch = _micro(logp, logp.detach(), mask, torch.tensor([1.0, 0.0]), max_len=4)
    loss, _ = methods.get("dr_grpo").bind(_blocks())(batch)
    assert loss.item() == pytest.approx((-0.5 * 2 + 0.5 * 1) / 8)
    # GRPO on the same batch: A = +-0.5 / std(1, 0) = +-0.707107, token mean over 3 tokens
    grpo, _ = methods.get("grpo").bind(_blocks())(batch)
    assert grpo.item() == pytest.approx((-2 * 0.707106 + 0.707106) / 3, abs=1e-5)


def test_dapo_clip_higher_hand_computed():
    """DAPO clips the ratio to [0.8, 1.28]: response 0 (A = +1) has ratios 1.25 (inside, where
    a symmetric 0.2 would clip it to 1.2) and 1.5 (-> 1.28); response 1 (A = -1) has 0.7
    (-> the pessimistic 0.8). Token mean over the 3 tokens."""
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(1.25), math.log(1.5)], [math.log(0.7), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_variant_loss(logp, old, logp, mask, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    symmetric, _ = grpo_variant_loss(logp, old, logp, mask, adv, clip_eps=0.2)
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3, abs=1e-6)


def test_dapo_loss_through_the_registry_is_the_batch_token_mean():
    """The dapo entry: group-normalised advantages (std kept), clip-higher, token mean with the
    trainer's mini-batch token count."""
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(1.25), math.log(1.5)], [math.log(0.7), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # group (1, 0): A = +-0.5 / 0.707107 = +-0.707107 (the +1e-6 of the std is negligible here)
    a = 0.707106
    loss, _ = methods.get("dapo").bind(_blocks())(_micro(logp, old, mask, torch.tensor([1.0, 0.0]), max_len=2))
    assert loss.item() == pytest.approx((-1.25 * a - 1.28 * a + 0.8 * a) / 3, abs=1e-5)


def test_gspo_sequence_ratio_value_and_gradient():
    """GSPO: response 0's token log-ratios 0.1 and 0.3 give s = e^0.2 on both tokens, response
    1's -0.2 gives e^-0.2; each token's gradient is s times its log-prob's."""
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.3], [-0.2, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    log_s = sequence_log_ratio(logp, old, mask)
    assert torch.exp(log_s[0]).tolist() == pytest.approx([math.exp(0.2)] * 2, abs=1e-6)
    assert math.exp(log_s[1, 0].item()) == pytest.approx(math.exp(-0.2), abs=1e-6)
    # wide clip: unclipped; loss = mean over responses of the token mean of -s_b A_b
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_variant_loss(logp, old, logp.detach(), mask, adv, clip_eps=0.9, loss_agg="seq_mean_token_mean",
                                ratio_level="sequence")
    assert loss.item() == pytest.approx((-math.exp(0.2) + math.exp(-0.2)) / 2, abs=1e-6)
    loss.backward()
    # d/d logp_{0,t} = -A_0 s_0 / (|y_0| B) = -e^0.2 / 4; d/d logp_{1,0} = +e^-0.2 / 2; padding 0
    assert logp.grad.flatten().tolist() == pytest.approx([-math.exp(0.2) / 4] * 2 + [math.exp(-0.2) / 2, 0.0], abs=1e-6)


def test_gspo_clips_the_sequence_ratio_to_its_narrow_range():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    logp = torch.tensor([[0.1, 0.3]])  # s = e^0.2, far outside [1 - 3e-4, 1 + 4e-4]
    batch = _micro(logp, old, mask, torch.tensor([1.0]), max_len=2)
    batch.rewards = torch.tensor([1.0, 0.0])  # group size 2 needs a pair
    batch.logp, batch.old_logp = torch.cat([logp, logp]), torch.zeros(2, 2)
    batch.ref_logp, batch.mask = batch.logp.clone(), torch.ones(2, 2)
    loss, stats = methods.get("gspo").bind({"gspo": {**_blocks()["gspo"], "group_size": 2}})(batch)
    a = 0.707106  # +-0.5 / std(1, 0)
    assert loss.item() == pytest.approx((-(1 + 4e-4) * a + math.exp(0.2) * a) / 2, abs=1e-5)
    assert stats["clip_frac"] == 1.0


def test_overlong_penalty_hand_computed():
    # max_len 10, buffer 4: free up to 6 tokens, then -1/4 per token down to -1 at 10
    lengths = torch.tensor([5, 6, 8, 10])
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(lengths, 10, 4, 0.5).tolist() == [0.0, 0.0, -0.25, -0.5]
    assert overlong_penalty(lengths, 10, 0, 1.0).tolist() == [0.0] * 4  # off


def test_overlong_shaping_enters_the_advantage():
    """dapo with overlong_buffer 2, max_len 4: response 0 (reward 1, 4 tokens) loses 1, response
    1 (reward 0, 2 tokens) nothing: shaped rewards (0, 0) give no advantage and a zero loss."""
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    block = {**_blocks()["dapo"], "group_size": 2}
    plain, _ = methods.get("dapo").bind({"dapo": block})(_micro(logp, logp, mask, torch.tensor([1.0, 0.0]), max_len=4))
    shaped, _ = methods.get("dapo").bind({"dapo": {**block, "overlong_buffer": 2}})(
        _micro(logp, logp, mask, torch.tensor([1.0, 0.0]), max_len=4))
    assert plain.item() != 0 and shaped.item() == 0


def test_tis_weights_truncate_the_trainer_engine_ratio():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    engine = torch.tensor([[-1.5, -0.5, float("nan")]])
    w = tis_weights(old, engine, cap=1.5)
    assert w.flatten().tolist() == pytest.approx([1.5, math.exp(-0.5), 1.0])  # e^0.5 = 1.65 -> 1.5; no log-prob -> 1


def test_tis_weights_scale_the_policy_term_only():
    """grpo with tis_cap: each token's surrogate times its weight; the KL term unweighted."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]])
    mask = torch.ones(2, 2)
    engine = torch.tensor([[-1.0 - math.log(2), -2.0], [-1.0 + math.log(2), -3.0]])  # weights 2 -> cap 1.5, 1, 0.5, 1
    block = {**_blocks()["grpo"], "group_size": 2, "tis_cap": 1.5}
    batch = _micro(logp, logp, mask, torch.tensor([1.0, 0.0]), max_len=2, engine_logp=engine)
    loss, _ = methods.get("grpo").bind({"grpo": block})(batch)
    a = 0.707106  # +-0.5 / std(1, 0); ratio 1: token losses -a, -a, +a, +a
    assert loss.item() == pytest.approx((-1.5 * a - a + 0.5 * a + a) / 4, abs=1e-5)
    without, _ = methods.get("grpo").bind({"grpo": {**block, "tis_cap": None}})(batch)
    assert without.item() == pytest.approx(0.0, abs=1e-6)


def test_logprob_gap_over_the_scored_response_tokens():
    engine = torch.tensor([[-1.0, -2.0, 0.0], [float("nan"), -1.0, 0.0]])
    trainer = torch.tensor([[-1.1, -1.5, 9.0], [-7.0, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    total, count, peak = logprob_gap(engine, trainer, mask)
    assert (total, count, peak) == pytest.approx((0.1 + 0.5 + 0.0, 3.0, 0.5))


def test_every_grpo_variant_clamps_its_kl_term_as_verl_does():
    """The registry's GRPO family trains with `grpo_variant_loss`: its k3 term is clamped."""
    logp = torch.tensor([[0.0, -40.0]])
    ref = torch.tensor([[-30.0, -10.0]])
    for agg in ("token_mean", "seq_mean_token_mean"):
        loss, stats = grpo_variant_loss(logp, logp, ref, torch.ones(1, 2), torch.tensor([0.0]), kl_coef=1.0, loss_agg=agg)
        assert loss.item() == pytest.approx(10.0) and stats["kl_k3"] == pytest.approx(10.0)
