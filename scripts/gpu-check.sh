#!/usr/bin/env bash
# The GPU check: A*-PO, GRPO (G = 8), REBEL and PPO, a few steps each, trained by the
# project's own trainer on a random-weight model with Qwen2.5-1.5B's architecture, built on
# the spot (nothing is downloaded). Prints, and writes as gpu-check.json and gpu-check.md,
# one table: seconds per step by phase, CUDA peak memory (allocated and reserved) and ratios
# to A*-PO. The Python is src/apo/tools/gpu_check.py (`PYTHONPATH=src python3 -m apo.tools.gpu_check -h`).
#
#   scripts/gpu-check.sh [OUT_DIR]           one GPU (H100/H200): about 6-7 minutes
#   scripts/gpu-check.sh --tiny [OUT_DIR]    a small model on the CPU, seconds (CI runs it)
#   scripts/gpu-check.sh --pytest [OUT_DIR]  the check, then the GPU unit tests (pytest -m gpu)
#   scripts/gpu-check.sh --gpus auto [OUT_DIR]  a node of 2 or more GPUs: one FSDP rank with a
#                                            vLLM engine per GPU, two steps, per-rank peak memory
#                                            beside the memory plan (gpu-check-multi.json, .md;
#                                            src/apo/tools/gpu_check_multi.py); --gpus N for N of them
#   scripts/gpu-check.sh --tiny --gpus 2     the same on the CPU, two processes (minutes)
#
# OUT_DIR defaults to $OUT, else ./gpu-check. Other options go to apo.tools.gpu_check (--methods,
# --prompts, --response-tokens, --steps, --budget-s, --gradient-checkpointing, --device).
# The multi-GPU mode needs vLLM (envs/gpu.txt) for its colocated check; without it it runs ddp
# with the transformers engine and exits with 2.
#
# Needs PyTorch (with CUDA unless --tiny), transformers, accelerate, pandas, pyarrow, pyyaml
# (pytest for --pytest); not vLLM, Snakemake or MLflow. Two small pure-Python packages and
# their dependencies may be missing on a GPU machine: math-verify (the grader) and jsonschema
# (the config check). Bring them as wheels. On a machine with a package index, in the
# repository root (the versions are those of envs/cpu.txt; --python-version is the GPU
# machine's Python; rpds-py is the only compiled one):
#
#   echo /.whl/ >> .git/info/exclude   # keeps the folder out of git
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#     math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
#     jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
#
# (under 1 MB in all). This script installs every wheel in .whl (or --wheels DIR, or
# $APO_WHEELS) with `pip install --no-index --find-links DIR` before the check, so that a
# missing dependency fails there, in seconds, and not after the model build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${APO_WHEELS:-.whl}
PYTEST=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pytest) PYTEST=1 ;;
    --wheels) WHEELS=$2; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu-check: installing the wheels in $WHEELS"
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl; then
    # An environment that is not writable: the same wheels into a folder of their own.
    SITE=${TMPDIR:-/tmp}/apo-gpu-check-site
    echo "gpu-check: installing into $SITE instead"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

status=0
"$PY" -m apo.tools.gpu_check ${ARGS[@]+"${ARGS[@]}"} || status=$?
if [ "$PYTEST" = 1 ]; then  # bounded, so that a hung test cannot eat the machine's time
  timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py || status=$?
fi
exit $status
