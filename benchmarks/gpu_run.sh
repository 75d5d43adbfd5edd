#!/usr/bin/env bash
# The visit of a lent GPU in two commands (README "Memory and speed on one GPU"), from the repo
# root, the wheels of benchmarks/fetch_wheels.sh carried (.whl, then .whl-bnb):
#   bash benchmarks/gpu_run.sh 1 "$OUT"   # wheels but bitsandbytes, the CUDA tests, lora+liger
#                                         # (decode compiled), lora+liger-eager, trl-lora (8 min)
#   bash benchmarks/gpu_run.sh 2 "$OUT"   # bitsandbytes, qlora+liger, lora+liger-calls (its
#                                         # generation in calls of 16 sequences; ~6 minutes)
#   TINY=1 WHEELS=/tmp/whl SITE=/tmp/site bash benchmarks/gpu_run.sh 1 /tmp/out  # rehearsal, CPU
# Each variant's row holds the memory plan's estimate of its settings (benchmarks/results/plans,
# made here by train.py --plan_memory) beside the measured peak.
set -euo pipefail
cd "$(dirname "$0")/.."
part=$1 out=$2 wheels=${WHEELS:-.whl} site=${SITE:-/tmp/site}
mkdir -p "$out"
case $part in
    1) install=("$wheels"/*.whl) variants=(lora+liger lora+liger-eager trl-lora) ;;
    2) install=("$wheels"-bnb/*.whl) variants=(qlora+liger lora+liger-calls)
       [ -d "$site/transformers" ] || install+=("$wheels"/*.whl) ;;  # a fresh machine: all
    *) echo "usage: $0 1|2 OUT" >&2; exit 2 ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${install[@]}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/versions-$part.txt"
args=(--steps 1 --out "$out")  # the plans are of the paper's settings: not the rehearsal's
[ -n "${TINY:-}" ] && args+=(--tiny --prompts 2 --G 2 --completion_tokens 12 --image_side 56 \
    --cpu_compile --compile_backend eager) \
    || args+=(--plan_dir benchmarks/results/plans)
if [ "$part" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 \
        | tee "$out/cuda-tests.log" | tail -5
fi
python3 benchmarks/grpo_step.py "${args[@]}" --variants "${variants[@]}" 2>&1 \
    | tee "$out/bench-$part.log" | tail -12
