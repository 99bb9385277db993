#!/usr/bin/env bash
# The prepared GPU benchmark: run from a plain checkout on a CUDA machine (no network needed).
# Needs torch, torchvision, numpy and Pillow only (onnxruntime-gpu, when installed, adds the ONNX Runtime
# CUDA and TensorRT rows of the serving half). Finishes in about 9 minutes on one H100, plus the multi-GPU
# section below (about 40 s per rank count: 1, 2, 4, 8 as present).
#   bench/gpu.sh                       # all four architectures
#   bench/gpu.sh --archs resnet50      # one
# python -m bench.gpu --device cpu --archs resnet18 --images 24 --batch 4 --seconds 0.2 --no-compile
#   checks the script without a GPU (tests/test_bench_gpu_smoke.py runs it with only those packages visible)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, torchvision, numpy, PIL; assert torch.cuda.is_available(), 'no CUDA device'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 570 python -m bench.gpu "$@"

# Multi-GPU section: one resnet50 training job on 1, 2, 4, 8 ranks (as many as this machine has) under
# torchrun, bf16, channels-last, 224 px, 128 images per rank: images/s and scaling efficiency (bench/ddp.py).
# About 40 s per rank count. BENCH_DDP=0 skips it.
if [ "${BENCH_DDP:-1}" != "0" ]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  results=()
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || break
    out="bench/out/ddp-$n.json"
    timeout 180 python -m torch.distributed.run --standalone --nproc-per-node "$n" -m bench.ddp --out "$out" \
      && results+=("$out") || echo "ddp with $n ranks failed" >&2
  done
  [ "${#results[@]}" -eq 0 ] || python -m bench.ddp --summary "${results[@]}" | tee bench/out/ddp.txt
fi
