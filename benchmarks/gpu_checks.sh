#!/usr/bin/env bash
# The GPU checks of issue 14 §4 as one script of under 10 minutes, for a session that is lent a GPU machine:
#   bash benchmarks/gpu_checks.sh            (from the repository root; results and logs go to $OUT)
# Needs a Python with clbench's dependencies importable ($PY, default python3). On the device machine its image
# holds torch, lightning, torchmetrics, peft, transformers and pytest, but not hydra-core, omegaconf, mlflow,
# avalanche-lib, mlxtend or mnist1d: carry those as wheels (device README, "a Python package missing there") and
# put them on PYTHONPATH before running this. Each step has its own time limit, so one that hangs costs only its
# share, and every step runs whatever the previous ones gave.
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...: run it, log to $OUT/steps.log, time it, go on whatever it returns
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "===== $name: $*" >> "$OUT/steps.log"
    timeout "$limit" "$@" >> "$OUT/steps.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1

# 1. The CUDA tests.
step pytest_gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider
# 2. GPM's PMNIST setting (784-100-100-10, batch 10, lr 0.01, 5 epochs, 10 tasks) on the GPU: with the real
#    PMNIST under data/ (benchmark=pmnist) when it is there, else on its offline stand-in permuted_mnist_5k.
bench=permuted_mnist_5k
[ -d data/MNIST ] && bench=pmnist
step gpm_pmnist_cuda 240 "$PY" -m clbench.cli strategy=gpm benchmark=$bench engine.accelerator=cuda \
    engine.progress=none threads=4 checkpoint_dir="$OUT/ckpt" tracking.uri="sqlite:///$OUT/mlflow.db" \
    tracking.artifact_root="$OUT/art" hydra.run.dir="$OUT/hydra"
# 3. The basis and projection benchmarks on the GPU (ratios against their baselines in the same process;
#    benchmarks.conv_projection still builds on the CPU only).
step basis_cuda 90 "$PY" -m benchmarks.basis --device cuda --json "$OUT/basis.json"
step projection_cuda 90 "$PY" -m benchmarks.projection --device cuda --steps 50 --json "$OUT/projection.json"
# 4. A LoRA step of the tiny LM (clbench's loop vs a hand-written peft loop) on the GPU.
step lm_cuda 60 "$PY" -m benchmarks.lm --device cuda --json "$OUT/lm.json"
# 5. O3's gated inference with its detectors (MiniLM-L6) on the GPU, tiny LM.
step o3_cuda 90 "$PY" -m benchmarks.o3 --device cuda --repeats 10 --json "$OUT/o3.json"
rm -rf "$OUT/ckpt" "$OUT/hydra" "$OUT/art" "$OUT/mlflow.db"  # at most 8 files come back: keep the logs and JSON
cat "$OUT/summary.txt"
