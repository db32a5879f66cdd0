"""Grading with math-verify in worker processes, with a hard time bound."""

import time

import pytest

from apo import reward
from apo.reward import Grader, grade_one


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=5, workers=1, chunk_size=4) as g:
        yield g


def test_grade_one_boxed_answer():
    assert grade_one("14", "so 7 + 7 = 14. The answer is \\boxed{14}.")[:2] == (1.0, reward.OK)
    assert grade_one("14", "The answer is \\boxed{15}.")[:2] == (0.0, reward.OK)


def test_boxed_answer_wins_over_other_numbers():
    # The last number of the text is 3, the boxed one is 14.
    assert grade_one("14", "\\boxed{14} because 1 + 2 = 3")[0] == 1.0


def test_equivalent_forms_are_accepted():
    assert grade_one("\\frac{1}{2}", "\\boxed{0.5}")[0] == 1.0
    assert grade_one("$x^2+1$", "\\boxed{1 + x^2}")[0] == 1.0


def test_unparseable_response_gets_zero_and_is_counted():
    r, status, _ = grade_one("14", "I do not know.")
    assert (r, status) == (0.0, reward.NO_ANSWER)


def test_batch_grading_keeps_order(grader):
    golds = ["1", "2", "3", "4", "5", "6", "7"]
    responses = [f"\\boxed{{{g}}}" if i % 2 == 0 else "\\boxed{0}" for i, g in enumerate(golds)]
    g = grader.grade(golds, responses)
    assert g.rewards == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert g.status == [reward.OK] * 7


def sleepy_chunk(pairs):
    """Stands in for math-verify hanging on a response (workers import it by name)."""
    if any("HANG" in r for _, r in pairs):
        time.sleep(60)
    return [(1.0, reward.OK, "") for _ in pairs]


def test_hanging_item_times_out_without_losing_the_others():
    t0 = time.monotonic()
    with Grader(timeout_s=1.0, workers=1, chunk_size=2, slack_s=1.0, grade_chunk=sleepy_chunk) as g:
        out = g.grade(["1", "2", "3", "4"], ["a", "HANG", "c", "d"])
    elapsed = time.monotonic() - t0
    assert out.status == [reward.OK, reward.TIMEOUT, reward.OK, reward.OK]
    assert out.rewards == [1.0, 0.0, 1.0, 1.0]
    assert elapsed < 30  # 3 s of bounds plus worker start-ups, not the 60 s hang


# ---------------------------------------------------------------- property-based

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LATEX_BITS = ["\\boxed{", "}", "{", "\\frac{", "^", "^{", "\\sqrt{", "\\left(", "\\right)", "=",
              "x", "9" * 40, "10^{10^{10}}", "\\int", "$", "\\\\", ",", ".", "-", "e", "\\pi", " ",
              "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\infty", "!", "%", "\\text{", "\x00"]
adversarial = st.lists(st.sampled_from(LATEX_BITS), max_size=30).map("".join)
any_text = st.one_of(st.text(max_size=200), adversarial)

BOUND_S = 2.0


@pytest.fixture(scope="module")
def bounded_grader():
    with Grader(timeout_s=BOUND_S, workers=1, chunk_size=8, slack_s=2.0) as g:
        yield g


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(any_text, any_text), min_size=1, max_size=8))
def test_grader_never_raises_and_respects_its_bound(bounded_grader, pairs):
    golds, responses = [g for g, _ in pairs], [r for _, r in pairs]
    t0 = time.monotonic()
    out = bounded_grader.grade(golds, responses)
    elapsed = time.monotonic() - t0
    assert len(out.rewards) == len(pairs)
    assert set(out.rewards) <= {0.0, 1.0}
    assert set(out.status) <= {reward.OK, reward.NO_ANSWER, reward.BAD_GOLD, reward.TIMEOUT, reward.ERROR}
    # whole-chunk bound, plus the one-by-one retry when a chunk overran, plus pool restarts
    assert elapsed < 2 * (BOUND_S * len(pairs) + 2.0) + 10.0


@settings(max_examples=200, deadline=None)
@given(gold=st.from_regex(r"-?[0-9]{1,6}", fullmatch=True), noise=st.text(max_size=40))
def test_grade_one_finds_a_boxed_integer_anywhere(gold, noise):
    noise = noise.replace("\\", "").replace("{", "").replace("}", "").replace("$", "")
    r, status, _ = grade_one(gold, f"{noise} The answer is \\boxed{{{gold}}}.")
    assert (r, status) == (1.0, reward.OK)
