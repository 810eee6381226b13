#!/usr/bin/env bash
# The GPU check of issue #6 in one call on a lent GPU machine (the `device` tool's `run`, carry [".whl"]).
#
# Its image has torch (CUDA), lightning, transformers, peft and torchmetrics but nothing can be
# fetched there, so the missing wheels travel in .whl/ (ignored by git; about 58 MB) and are installed
# into .cuda-site/ in the copied checkout (ignored too). Here, once:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl bitsandbytes==0.50.2 transformers==5.24.0 jsonargparse==4.53.0 docstring-parser==0.18.0 \
#     typeshed-client==2.15.0
#
# Then run: bash scripts/cuda_check.sh   (writes $OUT/cuda_check.jsonl; about 4-7 minutes on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .cuda-site .whl/*.whl
export PYTHONPATH="$PWD/.cuda-site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 scripts/cuda_check.py --out "${OUT:-.}"
