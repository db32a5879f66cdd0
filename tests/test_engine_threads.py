"""apo.engine_threads: what a colocated vLLM CPU engine changes in the process is put back."""

import os

import torch

from apo.engine_threads import EngineThreads


def test_a_replaced_set_num_threads_and_the_engines_environment_are_put_back(monkeypatch):
    real, threads = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    before = EngineThreads.capture()
    # what vLLM's CPU worker does: a no-op in place of torch.set_num_threads, LD_PRELOAD for children
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/libgomp.so.1")
    fixed = before.restore()
    assert torch.set_num_threads is real and torch.get_num_threads() == threads
    assert "LD_PRELOAD" not in os.environ
    assert fixed == ["torch.set_num_threads", "environment LD_PRELOAD"]


def test_nothing_changed_nothing_restored():
    assert EngineThreads.capture().restore() == []


def test_a_changed_thread_count_is_set_back():
    before = EngineThreads.capture()
    torch.set_num_threads(before.num_threads + 1)
    try:
        assert before.restore() == [f"torch threads -> {before.num_threads}"]
        assert torch.get_num_threads() == before.num_threads
    finally:
        torch.set_num_threads(before.num_threads)
