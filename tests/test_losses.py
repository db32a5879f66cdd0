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

from apo.losses import grpo_loss, group_advantages, rebel_loss  # noqa: E402


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
    loss, stats = grpo_loss(logp, torch.zeros(1, 2), logp.clone(), torch.ones(1, 2), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(-(1.105171 + 1.2) / 2, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    # A = -1: min(-1.105, -1.2*...) picks the pessimistic side: -ratio for token 1 is -1.6487
    loss_neg, _ = grpo_loss(logp, torch.zeros(1, 2), logp.clone(), torch.ones(1, 2), torch.tensor([-1.0]))
    assert loss_neg.item() == pytest.approx((1.105171 + 1.648721) / 2, abs=1e-6)


def test_grpo_kl_term_is_k3_and_zero_at_the_reference():
    logp = torch.tensor([[-1.0]])
    zero_kl, _ = grpo_loss(logp, logp, logp, torch.ones(1, 1), torch.tensor([0.0]), kl_coef=1.0)
    assert zero_kl.item() == pytest.approx(0.0)
    # q = ref - logp = 0.5: k3 = e^0.5 - 0.5 - 1 = 0.148721
    kl, _ = grpo_loss(logp, logp, logp + 0.5, torch.ones(1, 1), torch.tensor([0.0]), kl_coef=2.0)
    assert kl.item() == pytest.approx(2 * 0.148721, abs=1e-6)


def test_grpo_token_mean_ignores_padding():
    logp = torch.tensor([[0.1, 99.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, _ = grpo_loss(logp, torch.zeros(1, 2), logp.clone(), mask, torch.tensor([1.0]))
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
    tok, _ = grpo_loss(logp, logp, logp, mask, adv, loss_agg="token_mean")
    seq, _ = grpo_loss(logp, logp, logp, mask, adv, loss_agg="seq_mean_token_mean")
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
    loss, _ = grpo_loss(logp, logp, ref, torch.ones(1, 2), torch.tensor([0.0]), kl_coef=1.0)
    assert loss.item() == pytest.approx(10.0)
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
