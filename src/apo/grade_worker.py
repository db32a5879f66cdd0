"""One grading worker process, started by `apo.reward.Grader` as `python -m apo.grade_worker`.

Arguments: the functions it will be asked to call, as ``"module:name"``; they are imported
before the worker says it is ready. Protocol, one JSON document per line: the worker writes
``"ready"`` once its imports are done, then answers each request ``[function, args]`` on
stdin with ``{"ok": result}`` or ``{"error": "..."}`` on stdout, in order. It exits when stdin
closes. The parent kills it when a request overruns its time bound, so nothing here needs a
timeout of its own.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys


def resolve(spec: str):
    """The function named by ``"module:name"``."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main() -> None:
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    from apo.reward import warm_up

    # Imports and first-call set-up must not count against a response's time bound.
    functions = {spec: resolve(spec) for spec in sys.argv[1:]}
    warm_up()
    channel.write('"ready"\n')
    for line in sys.stdin:
        spec, args = json.loads(line)
        try:
            fn = functions.get(spec) or functions.setdefault(spec, resolve(spec))
            reply = {"ok": fn(*args)}
        except Exception as e:  # the parent decides what a failed call is worth
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
