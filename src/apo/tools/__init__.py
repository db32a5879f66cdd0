"""Tools beside the pipeline: benchmarks that print figures side by side (`apo bench-*`) and the
GPU check (`scripts/gpu-check.sh`). No stage imports them."""
