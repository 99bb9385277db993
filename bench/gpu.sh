#!/usr/bin/env bash
# The prepared GPU benchmark: run from a plain checkout on a CUDA machine (no network needed).
# Needs torch, torchvision, numpy and Pillow only (onnxruntime-gpu, when installed, adds the ONNX Runtime
# CUDA and TensorRT rows of the serving half). Finishes in about 9 minutes on one H100.
#   bench/gpu.sh                       # all four architectures
#   bench/gpu.sh --archs resnet50      # one
# python -m bench.gpu --device cpu --archs resnet18 --images 24 --batch 4 --seconds 0.2 --no-compile
#   checks the script without a GPU (tests/test_bench_gpu_smoke.py runs it with only those packages visible)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, torchvision, numpy, PIL; assert torch.cuda.is_available(), 'no CUDA device'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 570 python -m bench.gpu "$@"
