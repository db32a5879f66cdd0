"""Golds as the public benchmark files write them: multi-part answers (OlympiadBench),
scientific notation and odd decimals (Minerva Math), floats compared with a relative
tolerance, and where the answer is read from (`grading.extract`)."""

import logging

import pytest

from apo import reward
from apo.data import normalize_answer
from apo.reward import Grader
from conftest import grade_one

logging.getLogger("math_verify").setLevel(logging.ERROR)

# OlympiadBench's `final_answer` lists as Qwen2.5-Math's evaluation/data/olympiadbench/test.jsonl
# has them (ids 1664, 1940, 1938, 1687, 2349, 1807, 1709), a right answer, a fragment of it.
MULTI_PART = [
    (["$69$,$84$"], r"\boxed{69, 84}", r"\boxed{69}"),
    (["$f(x)=x$,$f(x)=2-x$"], r"\boxed{f(x)=x, f(x)=2-x}", r"\boxed{f(x)=x}"),
    (["$f(x)=-1$,$f(x)=x+1$"], r"\boxed{f(x)=-1,\ f(x)=x+1}", r"\boxed{f(x)=-1}"),
    (["$f(n)=n$, $g(n)=1$"], r"\boxed{f(n)=n, g(n)=1}", r"\boxed{f(n)=n}"),
    (["$221,$8$"], r"\boxed{221, 8}", r"\boxed{221}"),
    (["$-2,0,2$"], r"\boxed{-2, 0, 2}", r"\boxed{-2}"),
    (["1,3,5"], r"\boxed{1, 3, 5}", r"\boxed{1}"),
]


@pytest.mark.parametrize("raw, right, fragment", MULTI_PART)
def test_every_part_of_a_multi_part_gold_is_read(raw, right, fragment):
    gold = normalize_answer(raw, "plain")
    assert reward.gold_problem(gold) is None
    assert grade_one(gold, right)[:2] == (1.0, reward.OK)
    assert grade_one(gold, fragment)[:2] == (0.0, reward.OK)


def test_the_parts_of_a_multiple_answer_may_come_in_any_order():
    gold = normalize_answer(["$69$,$84$"], "plain")
    assert grade_one(gold, r"\boxed{84, 69}")[0] == 1.0
    assert grade_one(normalize_answer(["$f(x)=x$,$f(x)=2-x$"], "plain"), r"\boxed{f(x)=2-x, f(x)=x}")[0] == 1.0


def test_a_tuple_keeps_its_order():
    gold = normalize_answer(["$(1,1), (3,2)$"], "plain")
    assert grade_one(gold, r"\boxed{(3,2), (1,1)}")[0] == 1.0  # the set of pairs, in any order
    assert grade_one(gold, r"\boxed{(1,1), (2,3)}")[0] == 0.0  # but each pair in its order


def test_a_gold_that_an_outer_strip_left_with_inner_dollars_is_read_whole():
    # `final_answer[0].strip("$")`, as some readers write it, leaves "69$,$84".
    assert grade_one("69$,$84", r"\boxed{69,84}")[0] == 1.0
    assert grade_one("69$,$84", r"\boxed{69}")[0] == 0.0


# Minerva Math's golds (the last \boxed{} of its solutions) and how a model writes them.
SCIENTIFIC = [
    ("4.5e33", r"The diameter is $\boxed{4.5 \times 10^{33}}$ cm.", 1),
    ("4.5e33", r"\boxed{4.5e33}", 1),
    ("4.5e33", r"\boxed{4.5\cdot 10^{33}}", 1),
    ("4.5e33", r"\boxed{4.6 \times 10^{33}}", 0),
    ("4.5e33", r"\boxed{4.5}", 0),
    ("2.88e-19", r"\boxed{2.88 \times 10^{-19}}", 1),
    ("2.88e-19", r"\boxed{2.88 \times 10^{-18}}", 0),
    ("2.88e-19", r"\boxed{2.88e-18}", 0),
    ("1e-5", r"\boxed{10^{-5}}", 1),
    ("1e-5", r"\boxed{0.00001}", 1),
    ("6.5e-2", r"\boxed{0.065}", 1),
    ("3e8", r"\boxed{3 \times 10^8}", 1),
    ("-1./3", r"\boxed{-\frac{1}{3}}", 1),
    ("-1./3", r"\boxed{-1}", 0),
    ("-3./2", r"\boxed{-1.5}", 1),
    ("-3./2", r"\boxed{-3}", 0),
]


@pytest.mark.parametrize("gold, response, expected", SCIENTIFIC)
def test_scientific_notation_and_bare_points(gold, response, expected):
    assert reward.gold_problem(gold) is None
    assert grade_one(gold, response)[:2] == (float(expected), reward.OK)


@pytest.mark.parametrize(
    "gold, response, expected",
    [
        (".0000672", r"\boxed{0.0000672}", 1),
        (".0000672", r"\boxed{0.0000673}", 0),  # six decimals cannot tell these apart
        ("1.6", r"\boxed{1.60}", 1),
        ("1.6", r"\boxed{1.61}", 0),
        ("27.0", r"\boxed{27}", 1),  # AMC23 stores its golds as floats
        ("1000.5", r"\boxed{1000.55}", 1),  # within 1e-4 of the value
        ("1000.5", r"\boxed{1000.7}", 0),
        ("100000", r"\boxed{100001}", 0),  # integers stay exact
        ("025", r"\boxed{25}", 1),  # AIME24 stores "025"
    ],
)
def test_floats_are_compared_with_a_relative_tolerance(gold, response, expected):
    assert grade_one(gold, response)[0] == float(expected)


def test_numbers_in_words_are_left_alone():
    assert reward.normalize_numbers("the 2e5 engine, x2e3, 1.5e, e5") == r"the 2 \times 10^{5} engine, x2e3, 1.5e, e5"
    assert reward.normalize_numbers(r"0.\overline{3} and 5. The end") == r"0.\overline{3} and 5. The end"


# grading.extract: where the answer is read from.
@pytest.mark.parametrize(
    "response, any_, boxed",
    [
        ("... and so we get 5.", 1.0, 0.0),  # no box: the authors' MATH reward gives 0
        (r"so $x = 5$", 1.0, 0.0),
        (r"\boxed{5}", 1.0, 1.0),
        # math-verify reads several boxes as the set of their answers; boxed reads the last one
        (r"first \boxed{5}, then on reflection \boxed{6}", 0.0, 0.0),
        (r"\boxed{6} ... oops, \boxed{5}", 0.0, 1.0),
        (r"The answer is $\boxed 5$.", 1.0, 1.0),  # the spaced form the authors read too
    ],
)
def test_boxed_extraction_reads_only_the_last_box(response, any_, boxed):
    assert grade_one("5", response, extract="any")[0] == any_
    assert grade_one("5", response, extract="boxed")[0] == boxed


def test_boxed_extraction_without_a_box_is_no_answer():
    assert grade_one("5", "we get 5", extract="boxed")[:2] == (0.0, reward.NO_ANSWER)


def test_the_grader_pool_applies_the_extraction():
    with Grader(timeout_s=5, workers=1, extract="boxed") as g:
        out = g.grade(["5", "5"], ["we get 5.", r"so \boxed{5}"])
    assert out.rewards == [0.0, 1.0]
    assert out.status == [reward.NO_ANSWER, reward.OK]


def test_an_unknown_extraction_is_an_error():
    with pytest.raises(ValueError, match="extract"):
        reward.grade_function("math_verify", "last")


# The authors' flexible GSM8K match (verl/utils/reward_score/gsm8k.py, method='flexible').
@pytest.mark.parametrize(
    "response, flexible, strict",
    [
        ("She makes 9 * 2 = 18 dollars\n#### 18", 1.0, 1.0),
        ("She makes 9 * 2 = 18 dollars a day", 1.0, 0.0),  # no '####': strict gives 0
        ("#### 18 and then 3 more", 0.0, 1.0),  # the last number is 3
        ("The answer is 18.", 0.0, 0.0),  # "18." as written, their quirk; no '####'
        ("so 1,072", 0.0, 0.0),  # commas are kept by the flexible match
        ("no numbers here", 0.0, 0.0),
    ],
)
def test_gsm8k_flexible_takes_the_last_number_as_written(response, flexible, strict):
    gold = "1072" if "1,072" in response else "18"
    assert grade_one(gold, response, "gsm8k_flexible")[0] == flexible
    assert grade_one(gold, response, "gsm8k_strict")[0] == strict
