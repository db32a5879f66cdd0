"""The vLLM backend against the transformers backend on the demo model (float32, CPU):
greedy outputs token-identical, per-token log-probs within 1e-4, and still identical after
the trained weights are pushed into the engine."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apo.config import vllm_available
from apo.generation import HFGenerator, SamplingSettings, VLLMSettings, make_generator
from apo.scoring import token_logprobs

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (envs/cpu.txt has it)")

GREEDY = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def engines(tiny_demo, tmp_path_factory):
    """The demo's tokenizer and architecture (2 layers, head_dim 32) with random weights drawn
    wide enough that greedy answers are varied and argmax margins large: the session's tiny
    warm-started model repeats one token, which would make parity trivial."""
    from transformers import AutoConfig, Qwen2Config

    base = AutoConfig.from_pretrained(tiny_demo / "model").to_dict()
    base.pop("layer_types", None)  # re-derived for the new depth
    config = Qwen2Config(**{**base, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32,
                            "initializer_range": 0.2})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random_qwen2")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vllm = make_generator("vllm", tok, model=model, model_path=str(path), seed=0, max_model_len=256,
                          vllm=VLLMSettings(enforce_eager=True))
    rows = [json.loads(line) for line in (tiny_demo / "train.jsonl").read_text().splitlines()[:12]]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    return model, tok, HFGenerator(model, tok, batch_size=8), vllm, prompts


def _ids(outs):
    return [c.token_ids for cs in outs for c in cs]


def test_greedy_outputs_are_token_identical(engines):
    model, tok, hf, vllm, prompts = engines
    a, b = hf.generate(prompts, GREEDY, progress=False), vllm.generate(prompts, GREEDY, progress=False)
    assert len({tuple(ids) for ids in _ids(a)}) > len(prompts) // 2, "degenerate model: parity would be trivial"
    assert _ids(a) == _ids(b)
    assert [c.text for cs in a for c in cs] == [c.text for cs in b for c in cs]
    assert [c.finished for cs in a for c in cs] == [c.finished for cs in b for c in cs]


def test_sampled_token_logprobs_match_transformers(engines):
    model, tok, hf, vllm, prompts = engines
    sampling = SamplingSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=24)
    outs = [c for cs in vllm.generate(prompts, sampling, progress=False, seed=1, logprobs=True) for c in cs]
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(3)]
    with torch.no_grad():
        logp, mask = token_logprobs(model, p_ids, [c.token_ids for c in outs], tok.pad_token_id)
    for b, c in enumerate(outs):
        assert len(c.logprobs) == len(c.token_ids) > 0
        assert torch.tensor(c.logprobs) == pytest.approx(logp[b, : len(c.token_ids)], abs=1e-4)


def test_seeded_calls_repeat_and_differ_by_seed(engines):
    _, _, _, vllm, prompts = engines
    sampling = SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_new_tokens=24)
    a = _ids(vllm.generate(prompts, sampling, progress=False, seed=7))
    assert a == _ids(vllm.generate(prompts, sampling, progress=False, seed=7))
    assert a != _ids(vllm.generate(prompts, sampling, progress=False, seed=8))


def test_weight_sync_makes_vllm_follow_the_updated_model(engines):
    model, tok, hf, vllm, prompts = engines
    before = _ids(vllm.generate(prompts, GREEDY, progress=False))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torch.manual_seed(0)
        with torch.no_grad():  # a large step, so that greedy outputs must change
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p) * p.std())
        vllm.sync_weights(model)
        after_hf = _ids(hf.generate(prompts, GREEDY, progress=False))
        assert after_hf != before, "the perturbation did not change the greedy outputs"
        assert _ids(vllm.generate(prompts, GREEDY, progress=False)) == after_hf
    finally:
        model.load_state_dict(original)
        vllm.sync_weights(model)
    assert _ids(vllm.generate(prompts, GREEDY, progress=False)) == before


def test_the_engine_leaves_torchs_threads_as_they_were(engines):
    """vLLM's CPU worker replaces torch.set_num_threads by a no-op; the generator puts it back
    (apo.engine_threads), with the thread count the process had."""
    *_, vllm, _ = engines
    assert "torch.set_num_threads" in vllm.restored
    assert torch.set_num_threads.__module__ != "vllm.v1.worker.cpu_worker"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(n)


RENDEZVOUS_SCRIPT = """
import os, sys, tempfile
from transformers import AutoTokenizer
from apo import generation
tok = AutoTokenizer.from_pretrained(sys.argv[1])
gen = generation.VLLMGenerator(sys.argv[1], tok, seed=0, max_model_len=128, stop_ids=[tok.eos_token_id],
                               dtype="float32", settings=generation.VLLMSettings(enforce_eager=True))
store = generation.rendezvous_file(gen.llm)
print("STORE", store, store is not None and store.exists(), store in generation._RENDEZVOUS_FILES)
generation.remove_rendezvous_files()
print("LEFT", sorted(p.name for p in store.parent.glob("vllm_dist_*")))
out = gen.generate(["1 + 2 ="], generation.SamplingSettings(1, 0.0, 1.0, 4), progress=False)
print("GENERATED", len(out[0][0].token_ids))
os._exit(0)
"""


def test_the_engines_rendezvous_file_is_known_and_removed_at_exit(tiny_demo, tmp_path):
    """vLLM's one-rank process group meets through a file in the temp directory that torch
    deletes only at teardown, which `apo.cli.run` skips: the generator finds the file and
    `remove_rendezvous_files` (called by `apo.cli.run` before it leaves) deletes it. In a fresh
    process, as a job is: an engine started where a process group already exists (an earlier
    test's, in this one) joins that group and creates no file."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", RENDEZVOUS_SCRIPT, str(tiny_demo / "model")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0] in
                 ("STORE", "LEFT", "GENERATED"))
    path, exists, recorded = lines["STORE"].rsplit(" ", 2)
    assert path.startswith(str(tmp_path / "vllm_dist_")) and exists == "True" and recorded == "True"
    assert lines["LEFT"] == "[]"  # deleted
    assert int(lines["GENERATED"]) > 0  # the engine still generates without it
