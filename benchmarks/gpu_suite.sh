#!/usr/bin/env bash
# The prepared GPU check: build the CUDA extension, run the GPU tests and every benchmark, results under $OUT.
# Each stage has its own timeout, cut to what is left before a deadline (BUDGET, default 570 s after the start, so a
# device run with timeout_s=600 ends on the script's terms, with table and log written; QUICK=1 ran in about 160 s on
# an H100 with four kernel variants and 8 torch.compile graphs, 2026-11-27; it now compiles 32 graphs, both dtype
# mixes at both shapes, and times 15 CUDA variants; the build takes about 50 s). Benchmark rows are written one by
# one, so a timeout keeps what was measured; each stage's exit status is logged (124: timed out). A build without the
# CUDA kernels stops the run at once (nothing after it would measure them). Files under $OUT (at most 8 come back): suite.log (everything printed), build.log, and one
# JSONL per benchmark.
# Run from the repository root on the lent GPU machine (device tool), e.g.
#   run(command="bash benchmarks/gpu_suite.sh", timeout_s=600)           [add carry [".whl"] once wheels are needed]
# It uses the machine's own python3/torch/triton (no pip install of this package: its torch pin is for CPU boxes).
# PROFILE=1: build, then Nsight Compute (if the image has ncu) on the row-wise kernels still below 80% of the copy
# bandwidth, sections written to ncu.csv (benchmarks/profile_rowwise.py runs the ops).
# QUICK=1: build, the CUDA row-wise tests under every kernel variant and the fused pass on them,
# bench_rowwise with the CUDA kernel variants and torch.compile (XL/2 rows, then B/2; rowwise_table.md puts every
# variant of a row side by side), and the B/2 train step with and without the row-wise kernels.
set -uo pipefail
QUICK=${QUICK:-0}
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the image lacks (tools/gpu_wheels.sh), when a later part needs them
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
start=$(date +%s)
DEADLINE=$(( start + ${BUDGET:-570} ))
stamp() { echo "[gpu_suite] $(( $(date +%s) - start ))s: $*" | tee -a "$LOG"; }
# bound N: N seconds, or what is left before the deadline if less (at least 5: a stage still starts and says so)
bound() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt 5 ] && left=5; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
status() { echo "[gpu_suite] $1 exit $2$([ "$2" = 124 ] && echo ' (timed out)')" | tee -a "$LOG"; }

if ! nvidia-smi -L >/dev/null 2>&1; then  # GPU only: nothing below measures anything without one
  stamp "stopped: no NVIDIA GPU here (nvidia-smi -L failed); this suite runs on a GPU machine"
  exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2; } >> "$LOG" 2>&1
stamp "env"; tail -n 4 "$LOG"

# C++/CUDA extension (csrc/): sm_90a only here (the lent cards are Hopper; CI compile-checks sm_80 and sm_90a)
stamp "build dumo_engine._C with CUDA (TORCH_CUDA_ARCH_LIST=9.0a)"
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout "$(bound 150)" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
status build $?; tail -n 3 "$OUT/build.log"
if ! timeout 30 python3 -c "import sys, torch, dumo_engine._C as C; print('dumo_engine._C with_cuda =', C.with_cuda()); sys.exit(0 if C.with_cuda() else 1)" 2>&1 | tee -a "$LOG"; then
  tail -n 40 "$OUT/build.log" | tee -a "$LOG"
  stamp "stopped: dumo_engine._C has no CUDA kernels (build.log above); nothing after this would measure them"
  exit 1
fi

if [ "${PROFILE:-0}" = 1 ]; then  # after the build: Nsight Compute on the kernels still below 80% of copy bandwidth
  stamp "profile (ncu) ln_mod_jvp XL/2, ln_dual_bwd XL/2 and B/2, ln_mod_bwd B/2 (bf16, default kernels)"
  if command -v ncu >/dev/null 2>&1; then
    for spec in "ln_mod_jvp XL/2 3" "ln_dual_bwd XL/2 6" "ln_mod_bwd B/2 6" "ln_dual_bwd B/2 6"; do
      set -- $spec  # op, shape, launches to skip (3 warm-up calls; a backward call is two launches)
      timeout "$(bound 90)" ncu --csv --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        -k regex:'ln_mod|gated|colsum' --launch-skip "$3" --launch-count 2 \
        python3 benchmarks/profile_rowwise.py --ops "$1" --shape "$2" --dtype bf16 --warmup 3 --repeat 1 \
        >> "$OUT/ncu.csv" 2>> "$LOG"
      echo "ncu $1 $2 exit $?" | tee -a "$LOG"
    done
  else
    echo "ncu not found on this machine" | tee -a "$LOG"
  fi
  stamp "done (profile)"
  exit 0
fi

if [ "$QUICK" = 1 ]; then
  stamp "GPU tests (quick): CUDA row-wise kernels under every kernel variant, the fused pass on them"
  # the bad-input checks first, on their own (a crash there under torch 2.11 used to end the whole test run)
  timeout "$(bound 30)" python3 -m pytest -q -p no:cacheprovider tests/test_rowwise.py -k "bad_inputs" 2>&1 | tee -a "$LOG" | tail -n 4
  status "tests (bad inputs)" "${PIPESTATUS[0]}"
  timeout "$(bound 120)" python3 -m pytest -q -p no:cacheprovider tests/test_rowwise.py tests/test_gpu.py -k "not triton and not bad_inputs" 2>&1 | tee -a "$LOG" | tail -n 12
  status "tests (row-wise, gpu)" "${PIPESTATUS[0]}"
  stamp "bench_rowwise (quick: XL/2 then B/2 rows, torch.compile and the CUDA variants)"
  timeout "$(bound 150)" python3 benchmarks/bench_rowwise.py --shapes XL/2 --iters 20 --cuda-variants --out "$OUT/rowwise.jsonl" >> "$LOG" 2>&1
  status "bench_rowwise XL/2" $?
  echo >> "$OUT/rowwise.jsonl"  # a row cut short by a timeout stays on its own line (rowwise_table skips it)
  timeout "$(bound 150)" python3 benchmarks/bench_rowwise.py --shapes B/2 --iters 20 --cuda-variants --out "$OUT/rowwise.jsonl" >> "$LOG" 2>&1
  status "bench_rowwise B/2" $?
  timeout 20 python3 benchmarks/rowwise_table.py "$OUT/rowwise.jsonl" 2>&1 | tee "$OUT/rowwise_table.md" | tee -a "$LOG"
  stamp "bench_train_step (quick: B/2 b64, fused with and without the row-wise kernels)"
  timeout "$(bound 45)" python3 benchmarks/bench_train_step.py --models DiT-B/2 --batch 64 --iters 5 --no-own-batch \
    --kinds dumo_fused,dumo_fused_torch_rowwise --out "$OUT/train_step.jsonl" >> "$LOG" 2>&1
  status bench_train_step $?
  tail -n 5 "$LOG"
  stamp "done (quick)"
  exit 0
fi

stamp "GPU tests: row-wise ops (cuda, triton, cpp), fused pass on CUDA, attention-JVP kernel"
timeout "$(bound 170)" python3 -m pytest -q -p no:cacheprovider tests/test_rowwise.py tests/test_rowwise_triton.py \
  tests/test_gpu.py tests/test_attention_jvp.py tests/test_fused_jvp.py -k "not ddp" 2>&1 | tee -a "$LOG" | tail -n 12
status tests "${PIPESTATUS[0]}"

stamp "bench_rowwise (B/2, XL/2 rows; pytorch, torch.compile, cuda, triton)"
timeout "$(bound 200)" python3 benchmarks/bench_rowwise.py --iters 30 --cuda-variants --out "$OUT/rowwise.jsonl" >> "$LOG" 2>&1
status bench_rowwise $?
timeout 20 python3 benchmarks/rowwise_table.py "$OUT/rowwise.jsonl" 2>&1 | tee "$OUT/rowwise_table.md" | tee -a "$LOG"

stamp "bench_train_step (XL/2, B/2, bf16)"
timeout "$(bound 100)" python3 benchmarks/bench_train_step.py --iters 5 --out "$OUT/train_step.jsonl" >> "$LOG" 2>&1
status bench_train_step $?
tail -n 16 "$LOG"

if [ -f benchmarks/bench_attention_jvp.py ]; then
  stamp "bench_attention_jvp"
  timeout "$(bound 50)" python3 benchmarks/bench_attention_jvp.py --out "$OUT/attention_jvp.jsonl" >> "$LOG" 2>&1
  status bench_attention_jvp $?
  tail -n 8 "$LOG"
fi
stamp "done"
