#!/usr/bin/env bash
# The pipeline's checks on a machine with one GPU and no network (the device tool's machines).
#
#   bash tools/gpu_check.sh        (with .whl/ holding the wheels its image lacks, .toy/ the toy pair)
#
# Prepare here: the wheels (deepspeed built with `pip wheel --no-deps deepspeed==X`, and what the
# image lacks: hjson pydantic pydantic_core annotated-types typing-inspection fastapi starlette
# uvicorn math-verify latex2sympy2_extended antlr4-python3-runtime) in .whl/, and the toy models
# (`cp -r ~/.cache/scope_ds/toy/v2-seed0 .toy/`). Each step runs under its own timeout and the
# script goes on after a failure, so one call reports every step:
#   1. a SCOPE toy run with the trainer on the GPU (NCCL), k = 1;
#   2. tools/bench_pipeline.py with the trainer on the GPU, the embedded server on the CPU cores;
#   3. the same benchmark with the GPU hidden (trainer on CPU, gloo), on this machine's cores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
TOY="model.toy_cache=$PWD/.toy"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"

step() {  # step NAME SECONDS COMMAND...: run, keep its log, print one status line
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || tail -25 "$OUT/$name.log"
}

step train_gpu 150 python3 scope_ds/train.py "$TOY" algo.name=scope pipeline.max_staleness=1 \
    train.steps=6 logging.out_dir=/tmp/run_gpu logging.progress=false data.eval_every=3
grep -h "error" "$OUT/train_gpu.log" | head -5
[ -f /tmp/run_gpu/metrics.jsonl ] && python3 - <<'EOF'
import json
rows = [json.loads(line) for line in open("/tmp/run_gpu/metrics.jsonl")]
for r in rows:
    print({k: round(v, 3) for k, v in r.items() if k in ("step", "loss/total", "reward/accuracy", "eval/accuracy", "time/step", "time/teacher", "time/update", "staleness/max")})
EOF

step bench_gpu 240 python3 tools/bench_pipeline.py --steps 10 --warmup 2 --repeats 1 --out "$OUT/bench_gpu.md" "$TOY"
cat "$OUT/bench_gpu.md" 2>/dev/null

CUDA_VISIBLE_DEVICES= step bench_cpu 240 python3 tools/bench_pipeline.py --steps 10 --warmup 2 --repeats 1 \
    --out "$OUT/bench_cpu.md" "$TOY"
cat "$OUT/bench_cpu.md" 2>/dev/null
