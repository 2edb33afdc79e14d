#!/usr/bin/env bash
# The whole GPU measurement of the published model's cost, for one H100 or H200, in under 8 minutes:
# the fixtures' error on CUDA (float32 with TF32 off/on, bfloat16: the GPU tolerances), then CTFlow-L in the
# released layout with random weights: the original's Euler 200 and our ab2 32 in float32 (as the original runs),
# then ab2 32 in bfloat16 (ctflow's GPU default). Needs the project's venv with a CUDA torch.
#
#   bash bench/released_model_gpu.sh [OUT_FOLDER]        # results: OUT_FOLDER/released_L_*.json and .md
#
# Expected (estimate from FLOPs, not measured): an L call ~50 ms float32 and ~15 ms bfloat16 on an H100; Euler 200
# over 13 blocks ~2.5 min, ab2 32 ~25 s, writing and importing the 2 GB of random weights ~1 min. The timeouts
# (40 + 300 + 100 s) keep the whole under 8 minutes; each run writes its JSON after every setting.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/CTFlowLib${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/released_L_gpu.txt"
# the GPU tolerances first (seconds)
timeout 40 "$python" bench/released_fixture_check.py --device cuda | tee "$out/released_fixture_gpu.json" \
    || echo "fixture check failed: rc $?"
timeout 300 "$python" bench/released_model.py --device cuda --dtype float32 --slices 208 \
    --json "$out/released_L_float32.json" --overwrite | tee "$out/released_L_float32.md" \
    || echo "float32 run stopped (rc $?): its JSON holds the settings that finished"
timeout 100 "$python" bench/released_model.py --device cuda --dtype bfloat16 --slices 208 --no-reference \
    --json "$out/released_L_bfloat16.json" --overwrite | tee "$out/released_L_bfloat16.md" \
    || echo "bfloat16 run stopped: rc $?"
