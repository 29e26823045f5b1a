#!/usr/bin/env bash
# The trainer benchmark on a GPU machine: ResNet18 and ResNet50 at 224 px, tutorial loop vs ours.
# Needs python3 with torch, torchvision and pillow (and nothing from the network).
# Run from the repository root: bash benchmarks/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/bench_trainer.py --device cuda --models resnet18 resnet50 --image-size 224 \
  --images 4000 --epochs 3 --batch-size 128 --workers "$(( $(nproc) > 8 ? 8 : $(nproc) ))"
