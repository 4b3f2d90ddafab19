#!/usr/bin/env bash
# The checks that need a CUDA device, in about five minutes: the CUDA tests, then the quick benchmarks on
# the GPU as JSON lines (written to ${OUT:-.}/bench_cuda.jsonl). Run from the repository root after
# `make install` (or with clusterformers installed in the active environment).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-.}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py -k "cuda or sync or grouped"
"$PY" -m clusterformers bench --quick --device cuda --json --only attention,moe,contrastive \
    | tee "$OUT/bench_cuda.jsonl"
