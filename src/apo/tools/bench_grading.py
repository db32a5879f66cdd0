"""Grading throughput: the worker pool against the same grading done sequentially in-process.

    apo bench-grading [--responses 2000] [--workers 2] [--repeats 3] [--seed 0]

Grades `--responses` synthetic MATH-style responses (a few steps of reasoning with inline
LaTeX, then a boxed answer: right, wrong, missing or cut off) against MATH-style golds, once
one after another in this process (math-verify with no time bound) and once through one
long-lived `Grader` with `--workers` processes, `--repeats` rounds of fresh responses each,
slice by slice in alternating order (see `time_round`). The
workers' start-up is timed apart: a job pays it once. Prints each round and the medians side by
side.
"""

from __future__ import annotations

import os
import random
import statistics
import time

from apo.reward import Grader, grade_math_verify


def gold_and_wrong(rng: random.Random) -> tuple[str, str]:
    """A MATH-style gold with random numbers, and a wrong answer that shares a fragment with it."""
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(1, 99)
    forms = [
        (rf"\frac{{{a}}}{{{b}}}", rf"\frac{{{b}}}{{{a}}}"), (rf"{a}\sqrt{{{b}}}", f"{a}"),
        (rf"\left( {a}, \frac{{\pi}}{{{b}}} \right)", f"{a}"), (f"{a * c}", f"{a * c + b}"),
        (rf"(-\infty, {a}) \cup ({a + b}, \infty)", rf"(-\infty, {a})"),
        (rf"\frac{{\sqrt{{{b}}}}}{{{a}}}", rf"\sqrt{{{b}}}"),
        (rf"\begin{{pmatrix}} {a} \\ {b} \end{{pmatrix}}", rf"\begin{{pmatrix}} {b} \\ {a} \end{{pmatrix}}"),
        (rf"\text{{({'ABCDE'[c % 5]})}}", rf"\text{{({'ABCDE'[(c + 1) % 5]})}}"),
        (rf"{a * 3}^\circ", rf"{a * 3 + 15}^\circ"),
        (rf"{a},\!{c:03d}", f"{a}{c:03d}0"), (f"x = {a}", f"x = -{a}"), (f"-{c}", f"{c}"),
        (rf"{c}\%", rf"{c + 5}\%"),
        (rf"\{{{a}, {a + b}\}}", rf"\{{{a}\}}"), (rf"\${a}.{c:02d}", rf"\${a}"), (rf"{a}\pi", rf"{a + 1}\pi"),
        (f"x^2+{a}x+{c}", f"x^2+{a}x"), (f"[{a}, {a + b})", f"[{a}, {a + b}]"), (f"{a}.{b}", f"{a}"),
    ]
    return rng.choice(forms)


STEPS = [
    r"Let $x$ be the unknown, so $3x + 7 = 22$ and $x = 5$.",
    r"By the Pythagorean theorem, $a^2 + b^2 = c^2$, hence $c = \sqrt{a^2 + b^2}$.",
    r"We can write $\frac{n(n+1)}{2} = 210$, which gives $n^2 + n - 420 = 0$.",
    r"Expanding, $(x+2)(x+5) = x^2 + 7x + 10$.",
    r"The angle at $B$ is $180^\circ - 2 \cdot 45^\circ = 90^\circ$.",
    r"Taking logarithms, $\log_2 (8^k) = 3k$.",
    r"Since $\sin \theta = \frac{1}{2}$, we have $\theta = \frac{\pi}{6}$ or $\frac{5\pi}{6}$.",
    r"There are $\binom{6}{2} = 15$ ways to choose the pair.",
    r"Multiplying both sides by $4$ gives $4y = 11$, so $y = \frac{11}{4}$.",
    r"The determinant is $1 \cdot 4 - 2 \cdot 3 = -2$.",
    r"Hence the interval where $f(x) > 0$ is found by checking the sign on each piece.",
    r"Let me double-check: substituting back, $2(5) + 3 = 13$, which matches.",
]


def responses(n: int, seed: int, samples: int = 8) -> tuple[list[str], list[str]]:
    """`n` (gold, response) pairs, `samples` per problem as in reference sampling: 55% right,
    30% wrong, 8% unboxed, 7% cut off mid-step."""
    rng = random.Random(seed)
    golds, texts = [], []
    for i in range(n):
        if i % samples == 0:
            gold, wrong = gold_and_wrong(rng)
        body = " ".join(rng.choice(STEPS) for _ in range(rng.randint(3, 12)))
        u = rng.random()
        if u < 0.55:
            end = f" Therefore, the final answer is $\\boxed{{{gold}}}$."
        elif u < 0.85:
            end = f" Therefore, the final answer is $\\boxed{{{wrong}}}$."
        elif u < 0.93:
            end = f" So the answer is {wrong}."
        else:
            end = " " + rng.choice(STEPS)[: rng.randint(5, 40)]
        golds.append(gold)
        texts.append(body + end)
    return golds, texts


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes (Linux /proc), 0 where it cannot be read."""
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def time_sequential(golds: list[str], texts: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds to grade one response after another in this process."""
    t, c = time.perf_counter(), time.process_time()
    for g, r in zip(golds, texts):
        grade_math_verify(g, r)
    return time.perf_counter() - t, time.process_time() - c


def time_pool(grader: Grader, golds: list[str], texts: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds to grade through the pool; CPU of this process and the workers."""
    pids = grader.worker_pids
    t, c, cw = time.perf_counter(), time.process_time(), cpu_seconds(pids)
    grader.grade(golds, texts)
    return time.perf_counter() - t, time.process_time() - c + cpu_seconds(pids) - cw


def time_round(grader: Grader, golds: list[str], texts: list[str], slice_size: int = 200) -> dict:
    """Wall and CPU seconds of both ways for all responses, measured slice by slice in
    alternating order, so that load from other work on the machine falls on both alike."""
    out = {"seq": [0.0, 0.0], "pool": [0.0, 0.0]}
    for j, i in enumerate(range(0, len(golds), slice_size)):
        g, t = golds[i : i + slice_size], texts[i : i + slice_size]
        order = ["pool", "seq"] if j % 2 else ["seq", "pool"]
        for way in order:
            wall, cpu = time_sequential(g, t) if way == "seq" else time_pool(grader, g, t)
            out[way][0] += wall
            out[way][1] += cpu
    return out


def run(n: int = 2000, workers: int = 2, repeats: int = 3, seed: int = 0, timeout_s: float = 5.0) -> dict:
    """Both ways grade the same fresh responses each round (seed + round), so that neither
    reuses what it cached for the other's items; both keep their libraries warm across rounds,
    as the workers of a training run do across its steps."""
    print(f"{n} MATH-style responses a round ({n // 8} golds, 8 samples each); pool of {workers} "
          f"workers vs sequential in this process; {repeats} rounds", flush=True)
    rounds = []
    with Grader(timeout_s=timeout_s, workers=workers) as grader:
        t = time.perf_counter()
        grader.grade(["1"] * workers, ["\\boxed{1}"] * workers)  # starts every worker
        startup = time.perf_counter() - t
        for r in range(repeats):
            rounds.append(time_round(grader, *responses(n, seed + r)))
            (sw, sc), (pw, pc) = rounds[-1]["seq"], rounds[-1]["pool"]
            print(f"round {r + 1}: sequential {sw:6.2f} s ({n / sw:4.0f}/s, CPU {sc:5.2f} s) | "
                  f"pool {pw:6.2f} s ({n / pw:4.0f}/s, CPU {pc:5.2f} s)", flush=True)
    med = {way: [statistics.median(x[way][k] for x in rounds) for k in (0, 1)] for way in ("seq", "pool")}
    (sw, sc), (pw, pc) = med["seq"], med["pool"]
    print(f"median: sequential {sw:.2f} s ({n / sw:.0f} responses/s, CPU {sc:.2f} s) | pool of {workers} "
          f"{pw:.2f} s ({n / pw:.0f} responses/s, CPU {pc:.2f} s) | sequential / pool = {sw / pw:.2f}x "
          f"wall, {sc / pc:.2f}x CPU; workers started in {startup:.2f} s (once per job)")
    return {"rounds": rounds, "median": med, "startup_s": startup, "speedup": sw / pw}
