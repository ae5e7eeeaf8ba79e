"""Attention forward + JVP: reference torch.func.jvp through math SDPA vs the fused Triton op.

Cases per shape (inputs (B, H, N, D): batch, heads, tokens, head dim):
  sdpa_fwd        plain F.scaled_dot_product_attention forward (default backend), for scale: 4 B H N^2 D FLOPs
  reference_jvp   torch.func.jvp through math SDPA (primal + tangent): counted as 12 B H N^2 D
  triton_jvp      dumo::attention_jvp (one pass, primal + tangent): 12 B H N^2 D (attention_jvp_flops)
and, with the backward (CUDA): sdpa_fwd_bwd (flash fwd+bwd) and triton_jvp_bwd (our fwd+JVP + flash backward).
The speedup column is against reference_jvp. The reference is the one the tests use (tests/test_attention_jvp.py).

  python benchmarks/bench_attention_jvp.py                     # CUDA: B32 H16 N256 D72, B8 H16 N1024 D72, D64, bf16
  python benchmarks/bench_attention_jvp.py --sweep             # CUDA: also sweep the kernel's block configs
  python benchmarks/bench_attention_jvp.py --out benchmarks/out/attention_jvp.jsonl
On CPU the Triton kernel would run in the interpreter (meaningless for timing): only the reference and the
PyTorch fallback of the op (math SDPA + attention_tangent) run, at a small fp32 shape.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from harness import Row, emit, measure, measure_events, peak_memory_gib  # noqa: E402

ops = importlib.import_module("dumo_engine.ops.attention_jvp")

CUDA_SHAPES = [(32, 16, 256, 72), (8, 16, 1024, 72), (32, 16, 256, 64)]
CPU_SHAPES = [(2, 4, 64, 72)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2),
         (32, 64, 4, 2)]


def reference_jvp(*xs):
    # imported lazily: the test module sets TRITON_INTERPRET on CUDA-less machines at import
    from test_attention_jvp import reference_jvp as ref

    return ref(*xs)


def make_inputs(shape, dtype, device, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(6)]
    if requires_grad:
        for x in xs[:3]:
            x.requires_grad_(True)
    return xs


def bench_shape(shape, dtype_name, device, args) -> list[Row]:
    B, H, N, D = shape
    dtype = DTYPES[dtype_name]
    label = f"B{B} H{H} N{N} D{D}"
    xs = make_inputs(shape, dtype, device)
    f_jvp = ops.attention_jvp_flops(B, H, N, D)
    f_fwd = 4.0 * B * H * N * N * D
    jvp_bytes = ops.attention_jvp_bytes(B, H, N, D, elem_size=xs[0].element_size())
    rows = []

    def run(impl, fn, flops, ref_ms=None, nbytes=0.0, **extra):
        """One row; nbytes only for the forward-JVP rows (attention_jvp_bytes is their compulsory traffic)."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # CUDA events: these kernels take tens of microseconds, where a host timer would add launch + sync latency
        t = (measure_events(fn, warmup=args.warmup, iters=args.iters) if device.type == "cuda"
             else measure(fn, warmup=args.warmup, iters=args.iters, device_type=device.type))
        mem = peak_memory_gib(device)
        if mem is not None:
            extra["peak_GiB"] = mem
        rows.append(Row("attention_jvp", label, dtype_name, impl, t, flops=flops, bytes_moved=nbytes,
                        ref_ms=ref_ms, extra=extra))
        return t.median_ms

    with torch.no_grad():
        run("sdpa_fwd", lambda: F.scaled_dot_product_attention(*xs[:3]), f_fwd)
        ref_ms = run("reference_jvp", lambda: reference_jvp(*xs), f_jvp, nbytes=jvp_bytes)
        if device.type == "cuda":
            run("triton_jvp", lambda: ops.attention_jvp(*xs), f_jvp, ref_ms, nbytes=jvp_bytes)
            if args.sweep:
                for cfg in SWEEP:
                    name = "triton_jvp " + ",".join(map(str, cfg))
                    try:  # strict: the config named, never a smaller one it would otherwise fall back to
                        ops.attention_jvp_fwd_triton(*xs, blocks=cfg, strict=True)
                    except ops.triton.runtime.OutOfResources as e:
                        print(f"{label} {name}: skipped, out of resources ({e})")
                        continue
                    run(name, lambda cfg=cfg: ops.attention_jvp_fwd_triton(*xs, blocks=cfg, strict=True), f_jvp,
                        ref_ms, nbytes=jvp_bytes)
        else:
            run("torch_fallback", lambda: ops.attention_jvp_fwd_torch(*xs), f_jvp, ref_ms, nbytes=jvp_bytes)

    if device.type == "cuda" and not args.no_backward:
        xg = make_inputs(shape, dtype, device, requires_grad=True)
        do = torch.randn(shape, device=device, dtype=dtype)
        f_bwd = ops.attention_jvp_flops(B, H, N, D, backward=True)

        def sdpa_fb():
            torch.autograd.grad(F.scaled_dot_product_attention(*xg[:3]), xg[:3], do)

        def ours_fb():
            torch.autograd.grad(ops.attention_jvp(*xg)[0], xg[:3], do)

        run("sdpa_fwd_bwd", sdpa_fb, f_fwd + 10.0 * B * H * N * N * D)
        run("triton_jvp_bwd", ours_fb, f_bwd)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="'B,H,N,D;B,H,N,D' (default: CUDA or CPU list above)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5 CUDA, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed runs (default 30 CUDA, 5 CPU)")
    p.add_argument("--sweep", action="store_true", help="CUDA: also time each block config in SWEEP")
    p.add_argument("--no-backward", action="store_true", help="CUDA: skip the forward+backward rows")
    p.add_argument("--out", default=None, help="append rows as JSONL to this path")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (30 if cuda else 5)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else CUDA_SHAPES if cuda else CPU_SHAPES)
    if not cuda:
        print("CPU: the Triton kernel would only run in the interpreter (no timing value); timing the reference "
              "and the op's PyTorch fallback at a small shape.\n", flush=True)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, dtype_name, device, args)
    emit(rows, out=args.out, command="python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]))


if __name__ == "__main__":
    main()
