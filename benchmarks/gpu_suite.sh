#!/usr/bin/env bash
# The prepared GPU check: GPU tests + every benchmark, results under $OUT, in under 8 minutes (timeouts add to 460 s;
# benchmark rows are written one by one, so a timeout keeps what was measured).
# Run from the repository root on the lent GPU machine (device tool), e.g.
#   run(command="bash benchmarks/gpu_suite.sh", timeout_s=540)           [add carry [".whl"] once wheels are needed]
# It uses the machine's own python3/torch/triton (no pip install of this package: its torch pin is for CPU boxes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the image lacks (tools/gpu_wheels.sh), when a later part needs them
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
start=$(date +%s)
stamp() { echo "[gpu_suite] $(( $(date +%s) - start ))s: $*"; }

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
stamp "env"; cat "$OUT/env.txt" | tail -n 1

# C++/CUDA extension build goes here when csrc/ lands (issue 4).

stamp "GPU tests + the whole attention-JVP file on the compiled kernel"
timeout 120 python3 -m pytest -q tests/test_gpu.py tests/test_attention_jvp.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -n 15
stamp "fused-pass and JVP unit tests (CPU tensors, under the GPU image's torch)"
timeout 60 python3 -m pytest -q tests/test_fused_jvp.py tests/test_jvp.py -p no:cacheprovider 2>&1 | tee "$OUT/cpu_suite_subset.txt" | tail -n 3

if [ -f benchmarks/bench_attention_jvp.py ]; then
  stamp "bench_attention_jvp"
  timeout 90 python3 benchmarks/bench_attention_jvp.py --out "$OUT/attention_jvp.jsonl" 2>&1 | tee "$OUT/bench_attention_jvp.md"
fi
stamp "bench_train_step (XL/2, B/2, bf16)"
timeout 190 python3 benchmarks/bench_train_step.py --iters 6 --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/bench_train_step.md"
stamp "done"
