#!/usr/bin/env bash
# Where the time of a training step goes on one GPU: torch-profiler breakdowns of a plain and a pruning
# step (bench/profile_step.py) for gpu_smoke's 1.1B LLaMA (2 x 4 x 2048 tokens per step) and for the
# study's SmolLM2-135M step (1 x 32 x 256), bf16 autocast. About 2 minutes on an H200; each run is
# stopped after 170 s, so the whole script ends within 6 minutes whatever happens.
#   bash bench/gpu_profile.sh          # writes $OUT/{1b,smollm2}/ (else runs/profile/...): profile.json,
#                                      # trace_plain.json[.gz], trace_prune.json[.gz], log.txt
# Extra arguments go to both runs (e.g. --steps 5). Needs torch with CUDA and transformers importable by
# $PYTHON (default python3), as bench/gpu_smoke.sh; runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DEST=${OUT:-runs/profile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
status=0
run() {  # name, then profile_step.py's arguments
    local name=$1
    shift
    mkdir -p "$DEST/$name"
    echo "=== $name: bench/profile_step.py $*"
    timeout 170 "$PY" bench/profile_step.py "$@" --out "$DEST/$name" 2>&1 | tee "$DEST/$name/log.txt"
    local rc=$?
    [ "$rc" -eq 0 ] || { echo "=== $name failed (exit $rc)"; status=1; }
}
run 1b --shape 1b --batch 8 --micro-batch 4 --seq 2048 --steps 3 --warmup 3 "$@"
run smollm2 --shape smollm2 --batch 32 --micro-batch 32 --seq 256 --steps 3 --warmup 3 "$@"
exit $status
