#!/usr/bin/env bash
# The device check for a lent GPU machine (its image has torch, pandas, pyarrow, safetensors, tqdm,
# pytest; no dagster or mlflow, so only the core runs): the core tests, CUDA ones included, then the
# core benchmark on the GPU and on that machine's CPU. Writes its log to $OUT when set.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m pytest -q -p no:cacheprovider tests/influence 2>&1 | tail -5
  python3 benchmarks/estimators.py --device cuda
  python3 benchmarks/estimators.py --device cpu
} 2>&1 | tee "$log"
