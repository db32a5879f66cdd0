"""Binary math reward with math-verify, in worker processes with a hard time bound.

math-verify's own timeouts use `signal.alarm`, which only works in the main thread of the
main interpreter; we switch them off and bound time from outside instead: every batch goes
to a pool of worker processes, and a batch that overruns its bound has its workers killed and
is retried item by item, so that one pathological answer costs reward 0, not the run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Status of one graded response (counted in every stage's outputs).
OK, NO_ANSWER, BAD_GOLD, TIMEOUT, ERROR = "ok", "no_answer", "bad_gold", "timeout", "error"


def grade_one(gold: str, response: str) -> tuple[float, str, str]:
    """(reward, status, extracted answer) for one response; gold first, as math-verify wants.

    Runs inside a worker process. The boxed answer is preferred over any other expression.
    """
    import math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:
            return 0.0, BAD_GOLD, ""
        pred = math_verify.parse(
            response,
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
            parsing_timeout=None,
        )
        if not pred:
            return 0.0, NO_ANSWER, ""
        ok = math_verify.verify(gold_parsed, pred, timeout_seconds=None)
        return (1.0 if ok else 0.0), OK, str(pred[-1])[:200]
    except Exception as e:  # a grader crash is the response's problem, not the run's
        return 0.0, ERROR, f"{type(e).__name__}"[:200]


def _grade_chunk(pairs: list[tuple[str, str]]) -> list[tuple[float, str, str]]:
    return [grade_one(g, r) for g, r in pairs]


def _parse_gold(gold: str) -> list:
    """math-verify's reading of a gold answer; a bare answer is read as inline math."""
    import math_verify

    return math_verify.parse(gold if "$" in gold or "\\" in gold else f"${gold}$", parsing_timeout=None)


def gold_parses(gold: str) -> bool:
    """Whether math-verify can read a gold answer at all (checked when data is prepared)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        return bool(_parse_gold(gold))
    except Exception:
        return False


def _gold_chunk(golds: list[str]) -> list[bool]:
    return [gold_parses(g) for g in golds]


def _warm_up() -> None:
    import math_verify  # noqa: F401  (the import is the slow part of a worker's start)


@dataclass
class Grades:
    rewards: list[float]
    status: list[str]
    extracted: list[str]


class Grader:
    """Runs math-verify in a process pool with a per-item time bound."""

    def __init__(
        self,
        timeout_s: float = 5.0,
        workers: int = 2,
        chunk_size: int = 64,
        slack_s: float = 30.0,
        grade_chunk=None,
    ):
        self.timeout_s, self.workers, self.chunk_size = timeout_s, workers, chunk_size
        # A chunk may wait behind the others; it must finish within timeout_s per item + slack.
        self.slack_s = slack_s
        # (gold, response) pairs -> [(reward, status, extracted)]; a module-level function,
        # since spawned workers import it by name.
        self.grade_chunk = grade_chunk or _grade_chunk
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            # spawn: workers must not inherit the trainer's threads, CUDA or engine state.
            self._pool = mp.get_context("spawn").Pool(self.workers)
            # Start-up (imports) must not count against the first item's time bound.
            for w in [self._pool.apply_async(_warm_up) for _ in range(self.workers)]:
                w.get()
        return self._pool

    def _kill_pool(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def grade(self, golds: list[str], responses: list[str]) -> Grades:
        """Reward, status and extracted answer of every response; never raises for bad text."""
        pairs = list(zip(golds, responses, strict=True))
        results = self._map(self.grade_chunk, pairs, on_timeout=(0.0, TIMEOUT, ""))
        rewards, status, extracted = (list(x) for x in zip(*results)) if results else ([], [], [])
        return Grades(rewards, status, extracted)

    def golds_parse(self, golds: list[str]) -> list[bool]:
        """Whether each gold answer can be parsed (False also when parsing overran its bound)."""
        return self._map(_gold_chunk, list(golds), on_timeout=False)

    def _map(self, fn, items: list, on_timeout) -> list:
        """fn over chunks of items in the pool; an item that overruns gets `on_timeout`."""
        out: list = []
        pool = self._get_pool()
        chunks = [items[i : i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]
        pending = [pool.apply_async(fn, (c,)) for c in chunks]
        for i, chunk in enumerate(chunks):
            try:
                out.extend(pending[i].get(self.timeout_s * len(chunk) + self.slack_s))
            except mp.TimeoutError:
                log.warning("grading overran its bound; redoing %d items one by one", len(chunk))
                self._kill_pool()
                out.extend(self._each(fn, chunk, on_timeout))
                # The killed pool took the later chunks with it: resubmit them.
                pool = self._get_pool()
                pending[i + 1 :] = [pool.apply_async(fn, (c,)) for c in chunks[i + 1 :]]
        return out

    def _each(self, fn, items: list, on_timeout) -> list:
        out = []
        for item in items:
            fut = self._get_pool().apply_async(fn, ([item],))
            try:
                out.extend(fut.get(self.timeout_s))
            except mp.TimeoutError:
                self._kill_pool()
                out.append(on_timeout)
        return out
