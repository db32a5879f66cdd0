"""Gold answers as MATH and MATH-500 store them (bare LaTeX, no `$`), graded right.

Every row of TABLE is checked twice: through the pipeline (`normalize_answer`, then the
grader's in-process function), and against math-verify called the documented way (the gold
inside `$...$`, both parsed with the defaults, `verify(gold, answer)`), so a wrapper that reads
golds differently from math-verify's own usage fails here.
"""

import logging

import pytest

from apo import reward
from apo.data import normalize_answer
from conftest import grade_one

logging.getLogger("math_verify").setLevel(logging.ERROR)

# (gold as stored, response, reward)
TABLE = [
    # fractions
    (r"\frac{14}{3}", r"So the answer is $\boxed{\frac{14}{3}}$.", 1),
    (r"\frac{14}{3}", r"The answer is \boxed{\frac{3}{14}}.", 0),
    (r"\dfrac{3}{4}", r"\boxed{\frac{3}{4}}", 1),
    (r"\dfrac{3}{4}", r"\boxed{0.75}", 1),
    (r"\tfrac{1}{2}", r"\boxed{\dfrac{1}{2}}", 1),
    (r"\frac{1}{2}", r"\boxed{1}", 0),
    (r"-\frac{7}{2}", r"\boxed{-3.5}", 1),
    (r"-\frac{7}{2}", r"\boxed{\frac{7}{2}}", 0),
    # roots and pi
    (r"2\sqrt{3}", r"Hence the side is $\boxed{2\sqrt{3}}$.", 1),
    (r"2\sqrt{3}", r"\boxed{2}", 0),
    (r"2\sqrt{3}", r"\boxed{\sqrt{12}}", 1),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{\sqrt{3}}{2}}", 1),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\sqrt{3}}", 0),
    (r"\sqrt[3]{2}", r"\boxed{2^{1/3}}", 1),
    (r"5\sqrt{2}", r"\boxed{5}", 0),
    (r"\pi", r"\boxed{\pi}", 1),
    (r"2\pi", r"\boxed{2 \pi}", 1),
    (r"2\pi", r"\boxed{2}", 0),
    (r"\frac{3\pi}{4}", r"\boxed{\frac{3\pi}{4}}", 1),
    (r"\frac{3\pi}{4}", r"\boxed{3}", 0),
    # intervals and unions
    (r"(-\infty, 2) \cup (3, \infty)", r"\boxed{(-\infty,2)\cup(3,\infty)}", 1),
    (r"(-\infty, 2) \cup (3, \infty)", r"\boxed{(-\infty, 2)}", 0),
    (r"[1, 5)", r"\boxed{[1,5)}", 1),
    (r"[1, 5)", r"\boxed{[1,5]}", 0),
    (r"\left[ -\frac{1}{2}, \frac{1}{2} \right]", r"\boxed{[-\frac12, \frac12]}", 1),
    # tuples and points
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", 1),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{3}", 0),
    (r"(1, -2)", r"\boxed{(1,-2)}", 1),
    (r"(1, -2)", r"\boxed{(-2,1)}", 0),
    # sets and lists of solutions
    (r"\{1, 2, 3\}", r"\boxed{\{1,2,3\}}", 1),
    (r"3, 5", r"\boxed{3, 5}", 1),
    (r"3, 5", r"\boxed{3}", 0),
    (r"-2, 1", r"\boxed{1, -2}", 1),
    # matrices and vectors
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", 1),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", 0),
    (r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}}", 1),
    # words and choice letters
    (r"\text{(C)}", r"The answer is \boxed{\text{(C)}}.", 1),
    (r"\text{(C)}", r"\boxed{(C)}", 1),
    (r"\text{(C)}", r"\boxed{\text{(D)}}", 0),
    (r"\text{Devon}", r"\boxed{\text{Devon}}", 1),
    (r"\text{odd}", r"\boxed{\text{even}}", 0),
    # degrees, percent, dollars, units
    (r"90^\circ", r"\boxed{90^\circ}", 1),
    (r"90^\circ", r"\boxed{90}", 1),
    (r"90^\circ", r"\boxed{45^\circ}", 0),
    (r"25\%", r"\boxed{25\%}", 1),
    (r"25\%", r"\boxed{0.25}", 1),
    (r"25\%", r"\boxed{20\%}", 0),
    (r"\$18.90", r"\boxed{\$18.90}", 1),
    (r"\$18.90", r"\boxed{18.90}", 1),
    (r"\$18.90", r"\boxed{\$18}", 0),
    (r"10\text{ cm}", r"\boxed{10 \text{ cm}}", 1),
    (r"10\text{ cm}", r"\boxed{10}", 1),
    (r"10\text{ cm}", r"\boxed{100}", 0),
    # thousands separators
    (r"10,\!000", r"\boxed{10000}", 1),
    (r"10,\!000", r"\boxed{10,000}", 1),
    (r"10,\!000", r"\boxed{10}", 0),
    (r"1,\!000,\!000", r"\boxed{1000000}", 1),
    (r"10{,}000", r"\boxed{10000}", 1),
    # equations and expressions
    (r"x = 3", r"\boxed{x=3}", 1),
    (r"x = 3", r"\boxed{3}", 1),
    (r"x = 3", r"\boxed{x = 4}", 0),
    (r"y = 2x + 3", r"\boxed{y=2x+3}", 1),
    (r"x^2+7x+10", r"\boxed{(x+2)(x+5)}", 1),
    (r"x^2+7x+10", r"\boxed{x^2+7x}", 0),
    # negative numbers and infinity
    (r"-5", r"\boxed{-5}", 1),
    (r"-5", r"\boxed{5}", 0),
    (r"-\infty", r"\boxed{-\infty}", 1),
    (r"\infty", r"\boxed{-\infty}", 0),
    # plain integers and decimals (AIME, AMC, Minerva)
    (r"204", r"Therefore $m+n = \boxed{204}$.", 1),
    (r"204", r"\boxed{20}4 is not it; \boxed{240}", 0),
    (r"2.75", r"\boxed{\frac{11}{4}}", 1),
    (r"27.0", r"\boxed{27}", 1),
    # the answer sits in the last box, not in other numbers of the text
    (r"14", r"We get 3 and 7, so \boxed{14}.", 1),
    (r"\frac{1}{4}", r"Half of \frac{1}{2} is $\boxed{\frac{1}{4}}$.", 1),
]


def documented(gold: str, response: str) -> bool:
    """math-verify as its documentation shows it: gold in `$...$`, defaults, gold first."""
    import math_verify

    gold_parsed = math_verify.parse(f"${gold}$", parsing_timeout=None)
    answer = math_verify.parse(response, parsing_timeout=None)
    return bool(math_verify.verify(gold_parsed, answer, timeout_seconds=None))


def test_table_is_large_enough():
    assert len(TABLE) >= 60


@pytest.mark.parametrize("gold, response, expected", TABLE)
def test_gold_as_stored(gold, response, expected):
    answer = normalize_answer(gold, "plain")
    assert grade_one(answer, response)[:2] == (float(expected), reward.OK)
    assert documented(gold, response) == bool(expected)


@pytest.mark.parametrize("gold, response, expected", TABLE)
def test_gold_from_a_worked_solution(gold, response, expected):
    """answer_format boxed: the gold is the last box of a MATH-style solution."""
    solution = f"First, $a = 1$ and so $\\boxed{{7}}$ is not final. Thus the answer is $\\boxed{{{gold}}}$."
    assert grade_one(normalize_answer(solution, "boxed"), response)[0] == float(expected)


# The rows the issue reported (gold as stored, response, right reward).
REPORTED = [
    (r"2\sqrt{3}", r"so the side is \boxed{2\sqrt{3}}", 1),
    (r"2\sqrt{3}", r"so the side is \boxed{2}", 0),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{3}", 0),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", 1),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{\sqrt{3}}{2}}", 1),
]


@pytest.mark.parametrize("gold, response, expected", REPORTED)
def test_reported_rows(gold, response, expected):
    assert reward.gold_problem(gold) is None
    assert grade_one(gold, response)[:2] == (float(expected), reward.OK)


@pytest.mark.parametrize(
    "raw, fmt, gold",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", "gsm8k", "1072"),
        ("She owes 5 - 8 = <<5-8=-3>>-3 dollars.\n#### -3", "gsm8k", "-3"),
        (r"So $x = \boxed{\frac{\sqrt{3}}{2}}$.", "boxed", r"\frac{\sqrt{3}}{2}"),
        (r"It is $\fbox{12}$.", "boxed", "12"),
        (r"The answer is $\boxed 5$.", "boxed", "5"),
        (r"  \left( 3, \frac{\pi}{2} \right) ", "plain", r"\left( 3, \frac{\pi}{2} \right)"),
        (27.0, "plain", "27.0"),
        (["$\\sqrt{2}$"], "plain", "\\sqrt{2}"),
        (["$-2$", "$1$"], "plain", "-2, 1"),
    ],
)
def test_answer_formats(raw, fmt, gold):
    assert normalize_answer(raw, fmt) == gold
    assert reward.gold_problem(gold) is None


def test_delimited_golds_are_read_as_they_are():
    assert reward.gold_latex(r"$\sqrt{2}$") == r"$\sqrt{2}$"
    assert reward.gold_latex(r"\$18.90") == r"$\$18.90$"  # an escaped dollar is a currency sign
    assert grade_one(r"$\sqrt{2}$", r"\boxed{\sqrt{2}}")[0] == 1.0
