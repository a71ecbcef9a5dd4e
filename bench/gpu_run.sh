#!/usr/bin/env bash
# Every GPU check and measurement of issues 12 and 13, in one command on a lent GPU machine (docs/gpu.md):
#   here, once:  bash bench/gpu_wheels.sh
#   there:       device run: command "bash bench/gpu_run.sh", carry [".whl", ".gpu-cache"], timeout_s 590
# Results go to $OUT (what comes back): env.txt, gpu_tests.txt, moe_layer.txt + moe_layer_gpu.json,
# gpu_mfu.txt + gpu_mfu.json. Each step has its own time limit, so one that hangs costs only its share and
# the others still report. About 7-8 minutes in all on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/megamoe-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run bash bench/gpu_wheels.sh here first, and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MEGAMOE_CACHE=$PWD/.gpu-cache TOKENIZERS_PARALLELISM=false
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, transformers, deepspeed; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. The -m gpu suite: NCCL timeouts, a bf16 step of the quickstart architecture + export, grouped_mm's CUDA
#    path, and the MoE layer's step under set_sync_debug_mode("error").
timeout 150 python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -q -x --no-header -rA 2>&1 | tee "$OUT/gpu_tests.txt"

# 2. The MoE layer against dense and HF grouped_mm at d=2048, F=1408, bf16 (issue 13's targets: <= 1.3x dense at
#    E=64, <= 1.15x at E=8, T=16384; faster than HF's grouped_mm block everywhere).
timeout 200 python3 bench/moe_layer.py --device cuda --dtype bfloat16 --hidden 2048 --expert-width 1408 \
  --warmup 3 --repeats 10 --json "$OUT/moe_layer_gpu.json" 2>&1 | tee "$OUT/moe_layer.txt"

# 3. MFU of `megamoe train` on a ~1 B MegaMoE and its dense twin (target >= 40 %).
timeout 220 python3 bench/gpu_mfu.py /tmp/megamoe-gpu-mfu 2>&1 | tail -80 >"$OUT/gpu_mfu.txt"
cp /tmp/megamoe-gpu-mfu/gpu_mfu.json "$OUT/" 2>/dev/null
tail -40 "$OUT/gpu_mfu.txt"
