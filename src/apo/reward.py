"""Binary math reward, graded in worker processes with a hard time bound per response.

Three grading methods (config `grading.method`):

- ``math_verify``: the response's answer checked against the gold answer for mathematical
  equivalence by math-verify. Where the answer comes from is `extract`: ``any`` (its
  ``\\boxed{}`` first, else math-verify's other readings, down to the last number of the text,
  as the field's evaluation harnesses do) or ``boxed`` (the last ``\\boxed{}`` only, 0 without
  one: the authors' MATH reward, ZhaolinGao/A-PO verl/utils/reward_score/math.py:31-42).
  Numbers in scientific notation (``4.5e33``) or with a bare point (``-1./3``) are rewritten as
  LaTeX in golds and responses alike, and a number written as a float is compared with a
  relative tolerance (`FLOAT_REL_TOL`) instead of math-verify's fixed number of decimals;
- ``gsm8k_strict``: the authors' GSM8K reward (ZhaolinGao/A-PO,
  verl/utils/reward_score/gsm8k.py, ``extract_solution(method='strict')``): the first
  ``#### N`` of the response, commas and ``$`` removed, must equal the gold number as a string;
- ``gsm8k_flexible``: the same file's ``method='flexible'``, which the authors grade their GSM8K
  stage-1 samples with (preprocess/data_generation/model_generate.py:38): the last number
  anywhere in the response, as written (commas and a trailing point kept), equal to the gold.

math-verify's own timeouts use `signal.alarm`, which only works in the main thread of the main
interpreter; they are switched off and time is bounded from outside instead. Responses are
queued, one request each, to a few long-lived worker processes (`apo.grade_worker`); a worker
that has not answered `timeout_s` after it started on a response is killed (SIGKILL) and
replaced: that response alone gets reward 0 with status ``timeout``, and the ones queued behind
it go to the next free worker. The other workers go on meanwhile, so a hanging response costs
`timeout_s` plus a worker's start, wherever it sits in a batch.
Workers are plain subprocesses on pipes: no multiprocessing machinery (no resource tracker)
is left behind, and a worker whose parent dies reads end-of-file and exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

# Status of one graded response (counted in every stage's outputs).
OK, NO_ANSWER, BAD_GOLD, TIMEOUT, ERROR = "ok", "no_answer", "bad_gold", "timeout", "error"
# Where math_verify finds a response's answer (config `grading.extract`, `evaluate.extract`).
EXTRACTS = ("any", "boxed")


@dataclass(frozen=True)
class GradingMethod:
    """One grading method (config `grading.method`): what a worker calls for each extraction
    (`EXTRACTS`), as "module:function" (workers import functions by name), and whether its
    gold must be a number. A method with a function for `any` alone finds its answer itself and
    reads every extraction so."""

    name: str
    functions: dict[str, str]
    numeric_gold: bool = False

    def function(self, extract: str = "any") -> str:
        if extract not in EXTRACTS:
            raise ValueError(f"grading extract {extract!r}: use one of {EXTRACTS}")
        return self.functions.get(extract, self.functions["any"])


GRADING_METHODS = {m.name: m for m in (
    GradingMethod("math_verify", {"any": "apo.reward:grade_math_verify", "boxed": "apo.reward:grade_math_verify_boxed"}),
    GradingMethod("gsm8k_strict", {"any": "apo.reward:grade_gsm8k_strict"}, numeric_gold=True),
    GradingMethod("gsm8k_flexible", {"any": "apo.reward:grade_gsm8k_flexible"}, numeric_gold=True),
)}
METHODS = tuple(GRADING_METHODS)
DEFAULT_METHOD = METHODS[0]


def grading_method(name: str) -> GradingMethod:
    try:
        return GRADING_METHODS[name]
    except KeyError:
        raise ValueError(f"grading method {name!r}: use one of {METHODS}") from None


# Two numbers of which one is written as a float match when they agree to this relative
# tolerance, the one the Qwen2.5-Math evaluation harness uses (QwenLM/Qwen2.5-Math,
# evaluation/grader.py:266-273, `numeric_equal`). Exact numbers (integers, fractions, roots)
# are compared exactly by math-verify.
FLOAT_REL_TOL = 1e-4


# ---------------------------------------------------------------------------- gold answers

# `\\(` or `\\[`: the gold carries display or inline delimiters of its own.
_DELIMITED = re.compile(r"\\\(|\\\[")
# An unescaped `$` (an escaped one, `\\$`, is a currency sign).
_DOLLAR = re.compile(r"(?<!\\)\$")
# Scientific notation as Minerva Math writes its golds (`4.5e33`, `2.88e-19`, `1.e5`): math-verify
# reads the `e` as Euler's number. Not inside a word or a longer number.
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+\.?\d*|\.\d+)[eE]([+-]?\d+)(?!\w)(?!\.\d)")
# A number ending in a bare point before a division (`-1./3`): math-verify reads `-1.` alone.
_BARE_POINT = re.compile(r"(\d)\.(?=\s*/)")


# numpy's names for functions, as one Minerva Math gold is written (`np.arcsin(10/13)`).
_NUMPY = re.compile(r"(?<![\w.])np\.(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|exp|log|sqrt|pi)\b")


def normalize_numbers(text: str) -> str:
    """Numbers written for a program rewritten as LaTeX, in golds and responses alike:
    ``4.5e33`` -> ``4.5 \\times 10^{33}``, ``-1./3`` -> ``-1/3``, ``np.arcsin`` -> ``\\arcsin``."""
    text = _NUMPY.sub(r"\\\1", text)
    text = _SCIENTIFIC.sub(lambda m: f"{m.group(1).rstrip('.')} \\times 10^{{{int(m.group(2))}}}", text)
    return _BARE_POINT.sub(r"\1", text)


def gold_latex(gold: str) -> str:
    """A gold answer as math-verify's `parse` expects one: inside one pair of `$`.

    Golds are stored the way MATH and MATH-500 store them, bare LaTeX without `$`
    (``2\\sqrt{3}``, ``\\left( 3, \\frac{\\pi}{2} \\right)``). Parsed bare, math-verify reads
    only a fragment of them (``2``, ``3``) or nothing (``\\frac{\\sqrt{3}}{2}``); inside `$...$`
    it reads the whole expression. OlympiadBench writes each part of a multi-part answer in its
    own `$` (``$69$,$84$``, ``$f(x)=x$, $f(x)=2-x$``), and a reader that strips only the outer
    pair leaves ``69$,$84``, of which math-verify reads ``69``: every unescaped `$` is removed
    and the whole gold put in one pair, which math-verify reads as the set of its
    comma-separated parts (compared in any order). A gold with `\\(` or `\\[` stays as it is.
    """
    gold = normalize_numbers(gold.strip())
    if _DELIMITED.search(gold):
        return gold
    return f"${_DOLLAR.sub('', gold).strip()}$"


@lru_cache(maxsize=4096)  # a gold is graded against every sample of its prompt
def parse_gold(gold: str) -> list:
    """math-verify's reading of a gold answer (its last item is the raw-string fallback)."""
    import math_verify

    return math_verify.parse(gold_latex(gold), parsing_timeout=None)


# Text and commands stripped before looking for prose: `\text{odd}`, `\pi`.
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_PROSE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")
_NUMBER = re.compile(r"-?[0-9.]+")


def gold_problem(gold: str, method: str = DEFAULT_METHOD) -> str | None:
    """Why a gold answer cannot be graded against (dropped when data is prepared), or None."""
    gold = str(gold).strip()
    if grading_method(method).numeric_gold:
        if not _NUMBER.fullmatch(gold.replace(",", "")):
            return "not a number, which the strict '#### N' match needs"
        return None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parsed = parse_gold(gold)
    if not parsed:
        return "math-verify finds no answer in it"
    # parse() appends the matched text as a string. A gold math-verify reads only as that
    # string (`E_{1},E_{2}`, `m_{\max}=n^2-n-1`) is kept: a response earns it by giving the same
    # text, which is right, and every other response gets 0, as for a wrong answer. Unless the
    # text is no answer at all: no letter or digit, or broken LaTeX (unbalanced braces).
    if all(isinstance(p, str) for p in parsed) and (
        not re.search(r"[A-Za-z0-9]", gold) or gold.count("{") != gold.count("}")
    ):
        return "math-verify reads it only as a raw string, and that holds no answer"
    # Words outside \text{} become a product of one-letter symbols ("no answer here" ->
    # a*e*h*...): it parses, but nothing a model writes should match it.
    if _PROSE.search(_COMMAND.sub(" ", _TEXT_GROUP.sub(" ", gold))):
        return "prose, not a math answer"
    return None


# ---------------------------------------------------------------------------- grading


def grade_math_verify(gold: str, response: str, extract: str = "any") -> tuple[float, str, str]:
    """(reward, status, extracted answer) for one response; gold first, as math-verify wants.

    Runs inside a worker process. extract ``any``: the boxed answer is preferred over any other
    expression; ``boxed``: the last ``\\boxed{}`` only, NO_ANSWER without one.
    """
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            return 0.0, BAD_GOLD, ""
        pred = parse_response(response, extract)
        if not pred:
            return 0.0, NO_ANSWER, ""
        ok = numbers_match(gold_parsed, pred)
        if ok is None:
            ok = math_verify.verify(gold_parsed, pred, timeout_seconds=None)
        return (1.0 if ok else 0.0), OK, str(pred[-1])[:200]
    except Exception as e:  # a grader crash is the response's problem, not the run's
        return 0.0, ERROR, f"{type(e).__name__}"[:200]


def grade_math_verify_boxed(gold: str, response: str) -> tuple[float, str, str]:
    """`grade_math_verify` with extract ``boxed`` (workers call functions by name)."""
    return grade_math_verify(gold, response, "boxed")


def parse_response(response: str, extract: str) -> list:
    """math-verify's reading of a response's answer, after `normalize_numbers`."""
    import math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    if extract == "boxed":
        from apo.data import last_boxed

        box = last_boxed(response)
        if box is None or not box.strip():
            return []
        return math_verify.parse(f"${normalize_numbers(box)}$", parsing_timeout=None)
    return math_verify.parse(
        normalize_numbers(response),
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def _real_number(value) -> tuple[float, bool] | None:
    """(value, written as a float) when `value` is one finite real number without symbols."""
    import sympy

    if not isinstance(value, sympy.Expr) or value.free_symbols or not value.is_number:
        return None
    number = value.evalf()
    if not (number.is_real and number.is_finite):
        return None
    return float(number), bool(value.has(sympy.Float))


def numbers_match(gold_parsed: list, pred: list) -> bool | None:
    """Whether gold and answer are the same number when both are one real number and either is
    written as a float: equal to `FLOAT_REL_TOL` (``0.0000673`` is not ``.0000672``, nor
    ``2.88 \\times 10^{-18}`` ``2.88e-19``, which six decimals cannot tell apart). None where
    this rule does not apply (exact numbers, expressions, sets): math-verify decides."""
    gold_number, answer_number = _real_number(gold_parsed[0]), _real_number(pred[0])
    if gold_number is None or answer_number is None or not (gold_number[1] or answer_number[1]):
        return None
    return math.isclose(gold_number[0], answer_number[0], rel_tol=FLOAT_REL_TOL)


# ZhaolinGao/A-PO, verl/utils/reward_score/gsm8k.py, extract_solution(method='strict').
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
# The same file's method='flexible' (lines 29-40): every run of digits, points and commas.
_GSM8K_NUMBERS = re.compile(r"(\-?[0-9\.\,]+)")


def grade_gsm8k_strict(gold: str, response: str) -> tuple[float, str, str]:
    """The authors' strict GSM8K reward: the first ``#### N`` of the response must equal the
    gold as a string once commas (and `$`) are removed, so ``#### 72.0`` does not match 72."""
    m = _GSM8K_STRICT.search(response)
    if m is None:
        return 0.0, NO_ANSWER, ""
    answer = m.group(1).replace(",", "").replace("$", "")
    return (1.0 if answer == gold.strip().replace(",", "") else 0.0), OK, answer[:200]


def grade_gsm8k_flexible(gold: str, response: str) -> tuple[float, str, str]:
    """The authors' flexible GSM8K match, as they grade stage-1 samples: the last number of the
    response that is not a lone point, as written, must equal the gold. Its quirks are theirs:
    ``1,072`` or a sentence's final ``72.`` does not match (gsm8k.py:30-40 strips nothing)."""
    numbers = [n for n in _GSM8K_NUMBERS.findall(response) if n not in ("", ".")]
    if not numbers:
        return 0.0, NO_ANSWER, ""
    answer = numbers[-1]
    return (1.0 if answer == gold.strip().replace(",", "") else 0.0), OK, answer[:200]


def grade_function(method: str, extract: str = "any") -> str:
    """The worker function for a method; `extract` is math_verify's alone (the GSM8K matches
    find their number themselves)."""
    return grading_method(method).function(extract)


GOLD_FUNCTION = "apo.reward:gold_problem"


def warm_up() -> None:
    """A worker's start-up: the imports and math-verify's first-call set-up."""
    grade_math_verify("1", "\\boxed{1}")


@dataclass
class Grades:
    rewards: list[float]
    status: list[str]
    extracted: list[str]


# ---------------------------------------------------------------------------- worker pool


# Requests queued in a worker's pipe behind the one it works on, so that it never waits for
# this process to wake up between two responses and can take all 8 samples of a prompt. Their
# bytes stay well inside a pipe's buffer (64 KiB on Linux), so writing them never blocks, even
# to a worker that hangs.
PIPELINE_DEPTH = 8
PIPELINE_BYTES = 32 * 1024


class _Worker:
    """One `apo.grade_worker` subprocess and the requests it was sent, in order."""

    def __init__(self, functions: list[str]):
        # The parent's import path, so that workers import the same `apo` (and test helpers).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apo.grade_worker", *functions],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self.buffer = b""
        self.ready = False
        self.inflight: deque[tuple[int, int]] = deque()  # (request index, bytes)
        self.started = 0.0  # when the worker started on the request at the head of `inflight`
        self.deadline = 0.0  # `started` + the time bound
        self.spare = False  # started ahead of need; gets no requests until it replaces a worker

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def can_take(self, nbytes: int) -> bool:
        if not self.ready or len(self.inflight) >= PIPELINE_DEPTH:
            return False
        return not self.inflight or sum(b for _, b in self.inflight) + nbytes <= PIPELINE_BYTES

    def send(self, request: bytes, item: int, timeout_s: float) -> bool:
        """Queue one request; False when the worker is gone."""
        if not self.inflight:
            self.started = time.monotonic()
            self.deadline = self.started + timeout_s
        self.inflight.append((item, len(request)))
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            self.inflight.pop()
            return False

    def done(self, timeout_s: float) -> int:
        """The head request was answered: the next one starts now."""
        item, _ = self.inflight.popleft()
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        return item

    def read(self) -> list | None:
        """Messages that arrived (decoded JSON), or None once the worker has exited."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        self.proc.kill()
        self._reap(None)

    def stop(self, wait_s: float = 5.0) -> None:
        """Let the worker exit at end-of-input; kill it if it does not within `wait_s`."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self._reap(wait_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def _reap(self, wait_s: float | None) -> None:
        self.proc.wait(wait_s)  # no zombie left behind
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class Grader:
    """Grades responses in `workers` processes, each response within `timeout_s` seconds."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, method: str = DEFAULT_METHOD,
                 grade_fn: str | None = None, max_start_failures: int = 3, extract: str = "any"):
        self.timeout_s, self.workers, self.method = timeout_s, workers, method
        # "module:function" called as fn(gold, response) -> (reward, status, extracted)
        self.grade_fn = grade_fn or grade_function(method, extract)
        self.max_start_failures = max_start_failures
        # Responses take milliseconds; one still running after this is likely to hang.
        self.spare_after_s = min(1.0, timeout_s / 2)
        self._pool: list[_Worker] = []

    @classmethod
    def from_settings(cls, settings: dict, workers: int) -> Grader:
        """The grader a stage's address says: `settings` holds grading_timeout_s, grading_method
        and, where the stage reads it, grading_extract (apo.settings); the worker count is a
        runtime knob (runtime_knobs: grading.workers), speed only."""
        return cls(settings["grading_timeout_s"], workers, settings["grading_method"],
                   extract=settings.get("grading_extract", "any"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for w in self._pool:
            w.stop()
        self._pool = []

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool]

    def grade(self, golds: list[str], responses: list[str]) -> Grades:
        """Reward, status and extracted answer of every response; never raises for bad text."""
        calls = [[g, r] for g, r in zip(golds, responses, strict=True)]
        results = self._run(
            self.grade_fn, calls, on_timeout=[0.0, TIMEOUT, ""], on_error=[0.0, ERROR, "worker failed"]
        )
        rewards, status, extracted = (list(x) for x in zip(*results)) if results else ([], [], [])
        return Grades([float(r) for r in rewards], status, extracted)

    def gold_problems(self, golds: list[str]) -> list[str | None]:
        """`gold_problem` of each gold answer, within the same time bound as a response."""
        calls = [[g, self.method] for g in golds]
        return self._run(GOLD_FUNCTION, calls, on_timeout="reading it overran the time bound",
                         on_error="the grader failed on it")

    def _run(self, fn: str, calls: list, on_timeout, on_error) -> list:
        """fn(*call) for every call, in the workers; a call that overruns gets `on_timeout`."""
        requests = [(json.dumps([fn, c]) + "\n").encode() for c in calls]
        results: list = [None] * len(calls)
        queue = deque(range(len(calls)))
        keys, owner = [str(c[0]) for c in calls], {}
        failures = 0
        while queue or any(w.inflight for w in self._pool):
            self._staff(bool(queue))
            self._dispatch(queue, requests, keys, owner)
            failures += self._collect(results, queue, on_error)
            if failures >= self.max_start_failures:
                self.close()
                raise RuntimeError(
                    f"grading workers failed to start {failures} times; their errors are above"
                )
            self._expire(results, queue, on_timeout)
        return results

    def _staff(self, work_left: bool) -> None:
        """Keep `workers` workers while there is work, plus one spare, started as soon as a
        response has run for `spare_after_s`: the spare is ready by the time that response's
        worker is killed, so a hang costs its bound, not its bound and a worker's start."""
        active = [w for w in self._pool if not w.spare]
        spares = [w for w in self._pool if w.spare]
        while work_left and len(active) < self.workers:
            if spares:
                spares[0].spare = False
                active.append(spares.pop(0))
            else:
                active.append(self._start())
        now = time.monotonic()
        if not spares and any(w.inflight and now > w.started + self.spare_after_s for w in active):
            self._start().spare = True

    def _start(self) -> _Worker:
        w = _Worker([self.grade_fn, GOLD_FUNCTION])
        self._pool.append(w)
        return w

    def _dispatch(self, queue: deque, requests: list[bytes], keys: list[str], owner: dict) -> None:
        """Hand queued requests to workers as far as each can take them. Requests with the same
        key (gold answer) go to the same worker where it has room: the samples of one prompt
        then share that worker's parse of their gold, and of the answers they agree on.
        `owner` (key -> worker) lives as long as the batch."""
        while queue:
            i = queue[0]
            w = owner.get(keys[i])
            if w is None or w not in self._pool or not w.can_take(len(requests[i])):
                ready = [w for w in self._pool if not w.spare and w.can_take(len(requests[i]))]
                if not ready:
                    return
                w = min(ready, key=lambda w: len(w.inflight))
            queue.popleft()
            if w.send(requests[i], i, self.timeout_s):
                owner[keys[i]] = w
            else:
                queue.appendleft(i)  # the worker died; _collect sees it exit
                return

    def _collect(self, results: list, queue: deque, on_error) -> int:
        """Wait for answers (until the nearest deadline) and record them; returns how many
        workers died before they were ready."""
        readable, _, _ = select.select(self._pool, [], [], self._wait_s())
        start_failures = 0
        for w in readable:
            messages = w.read()
            if messages is None:  # the worker exited: its head request is lost, the rest retried
                if w.inflight:
                    head, _ = w.inflight.popleft()
                    log.warning("a grading worker exited (code %s) on item %d", w.proc.poll(), head)
                    results[head] = on_error
                start_failures += not w.ready
                self._retire(w, queue)
                continue
            for m in messages:
                if m == "ready":
                    w.ready = True
                    continue
                i = w.done(self.timeout_s)
                if "error" in m:
                    log.warning("grading item %d failed: %s", i, m["error"])
                results[i] = m["ok"] if "ok" in m else on_error
        return start_failures

    def _wait_s(self) -> float:
        """How long to wait for answers: until the nearest deadline, or the moment a spare
        should start, or 1 s."""
        busy, now = [w for w in self._pool if w.inflight], time.monotonic()
        wake = [w.deadline for w in busy]
        if not any(w.spare for w in self._pool):  # (a spare time already past has been acted on)
            wake += [t for t in (w.started + self.spare_after_s for w in busy) if t > now]
        return min([1.0, *(max(0.0, t - now) for t in wake)])

    def _expire(self, results: list, queue: deque, on_timeout) -> None:
        """Kill every worker whose current request is past its deadline: that request gets
        `on_timeout`, the ones queued behind it go back to the queue."""
        now = time.monotonic()
        for w in [w for w in self._pool if w.inflight and now > w.deadline]:
            head, _ = w.inflight.popleft()
            log.warning("grading item %d overran %.1f s: reward 0, worker replaced", head, self.timeout_s)
            results[head] = on_timeout
            self._retire(w, queue)

    def _retire(self, w: _Worker, queue: deque) -> None:
        queue.extendleft(reversed([i for i, _ in w.inflight]))
        w.kill()
        self._pool.remove(w)
