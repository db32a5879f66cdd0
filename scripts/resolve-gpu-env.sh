#!/usr/bin/env bash
# Resolve envs/gpu.txt as a cluster user's `pip install -r envs/gpu.txt` would, without
# installing anything: pip's dependency resolver on Linux x86_64 with Python 3.11 (the
# Python of envs/apo.yaml), against the package index, ignoring what is installed and any
# local pip configuration (constraints files, extra indexes, find-links).
#
#   scripts/resolve-gpu-env.sh [REPORT.json]      (make resolve-gpu)
#
# Needs the network. pip reads each candidate's metadata; where the index serves no separate
# metadata file it downloads the wheel to read it (about 1.5 GB here, torch and vLLM
# included), into a temporary directory, not the pip cache. The report (default
# build/gpu-resolve.json) lists every package pip would install; the summary printed after
# it names torch, its CUDA runtime and vLLM. INDEX_URL selects another index (a mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
REPORT="${1:-build/gpu-resolve.json}"
INDEX_URL="${INDEX_URL:-https://pypi.org/simple}"

platform=$("$PYTHON" -c 'import platform, sys; print(sys.platform, platform.machine(), "%d.%d" % sys.version_info[:2])')
if [ "$platform" != "linux x86_64 3.11" ]; then
    # pip's --platform / --python-version flags would resolve elsewhere, but only from
    # wheels, and snakemake needs sdist-only packages (connection_pool).
    echo "resolve-gpu-env: needs Linux x86_64 with Python 3.11 (envs/apo.yaml), not: $platform" >&2
    exit 2
fi
mkdir -p "$(dirname "$REPORT")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
TMPDIR="$tmp" "$PYTHON" -m pip --isolated install --dry-run --ignore-installed --no-cache-dir \
    --quiet --index-url "$INDEX_URL" --report "$REPORT" -r envs/gpu.txt
"$PYTHON" scripts/gpu_env_report.py "$REPORT"
