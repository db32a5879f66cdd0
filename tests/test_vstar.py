"""V* = beta1 * log mean exp(r / beta1), its limits and the table built from samples."""

import math

import pandas as pd
import pytest
import torch

from apo.vstar import vstar_estimate, vstar_table


def test_hand_computed_value():
    # rewards (1, 0, 0, 0), beta1 = 0.5: V* = 0.5 * log((e^2 + 3) / 4)
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = 0.5 * math.log((math.exp(2.0) + 3.0) / 4.0)
    assert vstar_estimate(r, 0.5).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.4772, abs=1e-4)  # (7.389 + 3) / 4 = 2.597; log = 0.9545


def test_beta1_zero_means_the_mean():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert vstar_estimate(r, 0.0).tolist() == [0.5, 0.0]


def test_small_beta1_tends_to_max_and_is_stable():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    v = vstar_estimate(r, 1e-4).item()  # exp(1e4) would overflow without logsumexp
    assert math.isfinite(v)
    assert v == pytest.approx(1.0 + 1e-4 * math.log(1 / 8), abs=1e-9)  # -> max as beta1 -> 0


def test_large_beta1_tends_to_mean():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert vstar_estimate(r, 1e6).item() == pytest.approx(0.25, abs=1e-6)


def test_vstar_between_mean_and_max():
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    v = vstar_estimate(r, 0.5)
    assert torch.all(v >= r.mean(-1)) and torch.all(v <= r.max(-1).values)


def test_negative_beta1_rejected():
    with pytest.raises(ValueError, match="beta1"):
        vstar_estimate(torch.zeros(1, 2), -1.0)


def test_table_counts_and_order():
    samples = pd.DataFrame({"id": ["b", "a", "b", "a"], "reward": [1.0, 0.0, 1.0, 1.0]})
    t = vstar_table(samples, 0.0)
    assert t["id"].tolist() == ["a", "b"]
    assert t["n_samples"].tolist() == [2, 2]
    assert t["n_correct"].tolist() == [1, 2]
    assert t["vstar"].tolist() == [0.5, 1.0]


def test_table_rejects_unequal_sample_counts():
    samples = pd.DataFrame({"id": ["a", "a", "b"], "reward": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="unequal"):
        vstar_table(samples, 0.5)


def test_prompt_filters():
    from apo.vstar import filter_prompts

    samples = pd.DataFrame({"id": list("aabbcc"), "reward": [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]})
    t = vstar_table(samples, 0.5)  # a: unsolved, b: sometimes, c: always solved
    assert filter_prompts(t, "keep_all")["id"].tolist() == ["a", "b", "c"]
    assert filter_prompts(t, "drop_unsolved")["id"].tolist() == ["b", "c"]
    assert filter_prompts(t, "drop_unsolved_and_solved")["id"].tolist() == ["b"]
    with pytest.raises(ValueError, match="vstar.filter"):
        filter_prompts(t, "drop_easy")
