"""Run chosen row-wise ops a few times each, with nothing else in between, so a kernel profiler can attribute
every launch: the companion of bench_rowwise.py for finding *why* a kernel misses its bandwidth target (occupancy,
registers, stalls, DRAM throughput) rather than how fast it is.

  python benchmarks/profile_rowwise.py --ops ln_mod_jvp,ln_dual_bwd --shape XL/2 --dtype bf16
  ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      -k regex:'ln_mod|gated|colsum' --launch-skip 6 --launch-count 8 \
      python3 benchmarks/profile_rowwise.py --ops ln_mod_jvp --shape XL/2 --dtype bf16 --variant 1

Each op runs --warmup times and then --repeat times inside an NVTX range named after it (nsys / ncu --nvtx).
--variant picks dumo_engine._C.cuda_fast_path (0 general kernels, 1 automatic, 2 / 3 fast path without / with the
next row's loads in flight; plus 4 for the JVP with four warps per row, 8 for backward tiles planned for the card,
16 for two rows per pass in the LayerNorm backward, 64 / 128 for the gated residual by rows / with cache hints, 256
for the LayerNorm backward with a block of warps per row; 32, the build's tuned default, would add its measuring
launches to the first call). --cpu runs the C++ twins instead (a smoke test of this script without a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_rowwise import OPS, SHAPES, make_inputs, our_fn  # noqa: E402

from dumo_engine.ops import rowwise as rw  # noqa: E402

DTYPES = {"fp32+bf16": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp32": (torch.float32, torch.float32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--shape", default="XL/2", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=0, help="samples N (rows = N*256); default 256 CUDA, 4 CPU")
    p.add_argument("--variant", type=int, default=1,
                   help="dumo_engine._C.cuda_fast_path value (the extension checks it)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    impl = "cuda" if cuda else "cpp"
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {OPS}")
    T, D = SHAPES[args.shape]
    tx, tm = DTYPES[args.dtype]
    N = args.batch or (256 if cuda else 4)
    rw.implementation(torch.empty(1, device=device), impl)  # a clear error if the extension is missing
    prev = rw.extension().cuda_fast_path(args.variant) if cuda else None
    try:
        d = make_inputs(N, T, D, tx, tm, device)
        for op in ops:
            fn, key = our_fn(op, d, impl)
            for _ in range(args.warmup):
                fn()
            if key is not None and rw.last_impl().get(key) != impl:
                raise SystemExit(f"{op}: asked for {impl}, ran {rw.last_impl().get(key)}")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_push(f"rowwise/{op}")
            for _ in range(args.repeat):
                fn()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
            print(f"[profile_rowwise] {op} {args.shape} N{N} T{T} D{D} {args.dtype} variant {args.variant}: "
                  f"{args.warmup} + {args.repeat} calls on {impl}", flush=True)
    finally:
        if prev is not None:
            rw.extension().cuda_fast_path(prev)


if __name__ == "__main__":
    main()
