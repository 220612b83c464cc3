#!/usr/bin/env bash
# The GPU checks of the Triton kernels and of the vector's cost, as one prepared run
# for a lent CUDA machine (about 9 minutes on one H200; each step has its own time limit and a
# failing step does not stop the others). Run from the repository root:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR
#
# It needs python3 with torch (CUDA), triton, transformers, peft and safetensors; deepspeed,
# bitsandbytes and datasets are not needed. The project need not be installed: the repository root is put on
# the path (dist_secvec/__init__ imports nothing). Results in OUT_DIR: one log per step, the benchmarks' JSON and
# markdown, and summary.txt (the exit code of every step).
set -u
OUT=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks.sh: torch sees no CUDA device here; run it on a GPU machine" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # dist_secvec.kernels from this checkout, installed or not

step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.log, record the exit code
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name rc=$rc" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# 1. the compiled kernels against the float64 references, fp32/fp16/bf16 on CUDA (DEVICE=cuda)
step kernel_tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_secvec_lora_delta.py
# 2. (a) base only, (b) peft's frozen adapter, (c) the fused kernel: 7B/13B/70B layers, bf16
step bench_secvec_delta 150 "$PY" benchmarks/bench_secvec_delta.py --models 7b 13b 70b --tokens 4096 16384 \
    --dtype bf16 --backend triton --repeats 20 --warmup 5 --out "$OUT/secvec_delta"
# 3. the QLoRA case: vector + LoRA in one kernel vs separately vs a second peft adapter
step bench_secvec_lora_delta 120 "$PY" benchmarks/bench_secvec_lora_delta.py --models 7b --tokens 4096 16384 \
    --dtype bf16 --backend triton --repeats 20 --warmup 5 --out "$OUT/secvec_lora_delta"
# 3b. full fine-tuning (W trainable): the Triton delta vs the torch weight delta x (W + s B A)^T, 7B, bf16
step bench_secvec_delta_full 90 "$PY" benchmarks/bench_secvec_delta.py --trainable-base --models 7b \
    --tokens 4096 16384 --dtype bf16 --backend triton --repeats 20 --warmup 5 --out "$OUT/secvec_delta_full"
# 4. folded vs attached vs no vector, whole training steps of a 2-layer 4096-hidden Llama
step bench_fold 90 "$PY" benchmarks/bench_fold.py --hidden 4096 --layers 2 --tokens 4096 --steps 10 --warmup 3 \
    --out "$OUT/fold"
# 5. data.packing through flash_attention_2's varlen kernel (skipped where flash_attn is not installed)
step packing_flash 120 "$PY" -m pytest -q -x -p no:cacheprovider -rs tests/test_packing.py -k flash_attention
echo "summary:"; cat "$OUT/summary.txt"
