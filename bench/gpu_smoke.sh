#!/usr/bin/env bash
# The GPU check: bf16 pruning steps of a random ~1.1B LLaMA on one GPU (under 8 minutes on an H200).
#   bash bench/gpu_smoke.sh            # prints tokens/s, peak memory and the pruning/plain step-time ratio
# Needs torch with CUDA and transformers 5 importable by $PYTHON (default python3); runs from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
timeout 470 "$PY" bench/gpu_smoke.py "$@"
