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
