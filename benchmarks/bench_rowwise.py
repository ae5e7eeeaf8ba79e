"""Row-wise ops (LayerNorm+modulate, dual final norm, gated residual): forward, JVP and backward, at DiT-B/2 and
DiT-XL/2 row shapes (T = 256 tokens, D = 768 / 1152).

Implementations: the PyTorch reference (the plain expressions the engine ran before these ops: F.layer_norm +
modulate, jvp/fused.layernorm_modulate_tangent, autograd for backward), torch.compile of that reference with its
outputs in the dtypes our kernels write (CUDA; compiled_as_ours), and
ours through ops/rowwise.py: the C++ CPU twin (CPU), the CUDA kernels and the Triton kernels (CUDA).
Each row: ms (median, p20-p80; CUDA events on GPU), GB/s against the bytes the op must move
(ops/rowwise_ref.rowwise_bytes: each input read once, each output written once), speedup vs the reference, and on
CUDA the fraction of the card's copy bandwidth measured in the same run (bytes read + written by a 2 GiB copy).

  python benchmarks/bench_rowwise.py                  # CUDA if present: N=256, fp32-residual+bf16 and bf16
  python benchmarks/bench_rowwise.py --cpu            # CPU twins vs PyTorch, fp32, N=8
  python benchmarks/bench_rowwise.py --quick          # tiny shapes, few iterations (the test suite's smoke run)
  python benchmarks/bench_rowwise.py --cuda-variants  # also the CUDA kernel variants (csrc/rowwise_fast.h):
      cuda-general (the general kernels only), cuda-nopreload / cuda-preload (fast path without / with the next
      row's loads in flight: forward and LayerNorm backward), and the option bits on the default: cuda-wide (the
      JVP with four warps per row), cuda-planned (backward tiles planned for the card: a sample per block where
      that fills it, no second kernel), cuda-tworows (two rows per pass in the LayerNorm backward),
      cuda-tworows-planned, cuda-streaming / cuda-rows / cuda-rows-streaming (the gated residual's forward and JVP
      with the evict-first cache hint / by rows with the gate in registers / both), cuda-widebwd /
      cuda-widebwd-planned (the LayerNorm backward with a block of warps per row, column sums in registers; it
      takes precedence over tworows), cuda-all (every option bit but tuning); the "cuda" rows are the build's default
      (csrc/rowwise_fast.h kDefaultVariant; cuda-auto = 1, the automatic choice without option bits)

The build's default is the tuned variant (1 | 32): each op measures its candidate variants on its first call per
shape (in the warm-up here) and runs the fastest; the "cuda" rows' note says which it chose, with every candidate's
median ms from that measurement (dumo_engine._C.cuda_tuned()).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Row, device_name, emit, measure, measure_events, pin_cpu_allocator  # noqa: E402

from dumo_engine.jvp.fused import layernorm_modulate_tangent  # noqa: E402
from dumo_engine.ops import rowwise as rw  # noqa: E402
from dumo_engine.ops import rowwise_ref as ref  # noqa: E402

EPS = 1e-6
SHAPES = {"B/2": (256, 768), "XL/2": (256, 1152)}  # (T, D)
OPS = ["ln_mod_fwd", "ln_mod_jvp", "ln_mod_bwd", "ln_dual_fwd", "ln_dual_bwd", "gated_fwd", "gated_jvp", "gated_bwd"]


# the reference expressions (what the engine computed before the row-wise ops), from the reference module
ln_mod_expr, ln_dual_expr = ref.model_ln_mod, ref.model_ln_dual
gated_expr, gated_jvp_expr = ref.model_gated, ref.model_gated_jvp


def ln_jvp_expr(x, x_dot, scale, shift_dot, scale_dot):
    return layernorm_modulate_tangent(x, x_dot, scale, shift_dot, scale_dot, EPS)


def make_inputs(N, T, D, tx, tm, device):
    g = torch.Generator(device=device).manual_seed(0)

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    d = dict(x=r(N, T, D, dtype=tx), x_dot=r(N, T, D), h=r(N, T, D, dtype=tm), h_dot=r(N, T, D, dtype=tm),
             gy=r(N, T, D, dtype=tm), gy2=r(N, T, D, dtype=tm), gout=r(N, T, D, dtype=tx))
    d["mods"] = (r(N, 6 * D, dtype=tm) * 0.3).chunk(6, dim=1)  # adaLN chunks: row-strided views
    d["mods_dot"] = r(N, 6 * D, dtype=tm).chunk(6, dim=1)
    _, d["mean"], d["rstd"] = ref.ln_mod_fwd(d["x"], d["mods"][0], d["mods"][1], EPS)
    return d


def _grad_fn(expr, leaves, grads):
    """Backward only: the graph is built once, each call runs autograd over it."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = expr(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    return lambda: torch.autograd.grad(out, leaves, grads[:len(out)], retain_graph=True)


# The ops whose outputs our kernels write in the modulation dtype (what the engine's next GEMM reads under bf16
# autocast), where the eager reference writes float32 (float32 LayerNorm x (1 + bf16 scale); the JVP's float32
# tangent). torch.compile of the reference gets the same output contract (compiled_as_ours): otherwise it would write
# twice the output bytes of ours and leave the cast to a later kernel, outside its timing.
SAME_OUTPUT_DTYPE_OPS = ("ln_mod_fwd", "ln_mod_jvp", "ln_mod_bwd", "ln_dual_fwd", "ln_dual_bwd")


def compiled_as_ours(op, out_dtype):
    """expr_wrap for reference_fns: torch.compile of the expression with its outputs cast to out_dtype (inside the
    compiled graph, so the cast is fused) for SAME_OUTPUT_DTYPE_OPS; for the backward ops the graph's outputs, and so
    the incoming gradients, are then in out_dtype too, as for our kernels."""
    def wrap(f):
        if op in SAME_OUTPUT_DTYPE_OPS:
            def cast(*a):
                out = f(*a)
                return tuple(o.to(out_dtype) for o in out) if isinstance(out, tuple) else out.to(out_dtype)

            return torch.compile(cast, dynamic=False)
        return torch.compile(f, dynamic=False)

    return wrap


def reference_fns(op, d, expr_wrap=lambda f: f):
    """The reference (or, with expr_wrap=compiled_as_ours(...), its compiled version) for one op."""
    x, (sh, sc, g, sh2, sc2, _), (shd, scd, gd, *_) = d["x"], d["mods"], d["mods_dot"]
    if op == "ln_mod_fwd":
        f = expr_wrap(ln_mod_expr)
        return lambda: f(x, sh, sc)
    if op == "ln_mod_jvp":
        f = expr_wrap(ln_jvp_expr)
        return lambda: f(x, d["x_dot"], sc, shd, scd)
    if op == "ln_mod_bwd":
        return _grad_fn(expr_wrap(ln_mod_expr), [x, sh, sc], (d["gy"],))
    if op == "ln_dual_fwd":
        f = expr_wrap(ln_dual_expr)
        return lambda: f(x, sh, sc, sh2, sc2)
    if op == "ln_dual_bwd":
        return _grad_fn(expr_wrap(ln_dual_expr), [x, sh, sc, sh2, sc2], (d["gy"], d["gy2"]))
    if op == "gated_fwd":
        f = expr_wrap(gated_expr)
        return lambda: f(x, g, d["h"])
    if op == "gated_jvp":
        f = expr_wrap(gated_jvp_expr)
        return lambda: f(d["x_dot"], g, gd, d["h"], d["h_dot"])
    if op == "gated_bwd":
        return _grad_fn(expr_wrap(gated_expr), [x, g, d["h"]], (d["gout"],))
    raise ValueError(op)


def our_fn(op, d, impl):
    """(callable, name of the dispatcher entry that records which implementation ran)."""
    x, (sh, sc, g, sh2, sc2, _), (shd, scd, gd, *_) = d["x"], d["mods"], d["mods_dot"]
    tm = sh.dtype
    if op == "ln_mod_fwd":
        return (lambda: rw._ln_fwd(x, [sh], [sc], EPS, impl)), "ln_mod_fwd"
    if op == "ln_mod_jvp":
        return (lambda: rw.layernorm_modulate_jvp(x, d["x_dot"], d["mean"], d["rstd"], sc, shd, scd, tm,
                                                  impl=impl)), "ln_mod_jvp"
    if op == "ln_mod_bwd":
        return (lambda: rw._ln_bwd([d["gy"]], x, d["mean"], d["rstd"], [sc], impl)), None
    if op == "ln_dual_fwd":
        return (lambda: rw._ln_fwd(x, [sh, sh2], [sc, sc2], EPS, impl)), "ln_dual_fwd"
    if op == "ln_dual_bwd":
        return (lambda: rw._ln_bwd([d["gy"], d["gy2"]], x, d["mean"], d["rstd"], [sc, sc2], impl)), None
    if op == "gated_fwd":
        return (lambda: rw.gated_residual(x, g, d["h"], impl=impl)), "gated_fwd"
    if op == "gated_jvp":
        return (lambda: rw.gated_residual_jvp(d["x_dot"], g, gd, d["h"], d["h_dot"], impl=impl)), "gated_jvp"
    if op == "gated_bwd":
        return (lambda: rw._gated_bwd(d["gout"], g, d["h"], impl)), None
    raise ValueError(op)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the ceiling for these ops)."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    t = measure_events(lambda: b.copy_(a), warmup=3, iters=20)
    return 2 * a.numel() * a.element_size() / (t.median_ms * 1e-3)


# bench op -> (cuda_tuned()'s op, modulations): the tuned variant's records of that op
TUNED_KEYS = {"ln_mod_fwd": ("ln_mod_fwd", 1), "ln_dual_fwd": ("ln_mod_fwd", 2), "ln_mod_jvp": ("ln_mod_jvp", 1),
              "ln_mod_bwd": ("ln_mod_bwd", 1), "ln_dual_bwd": ("ln_mod_bwd", 2), "gated_bwd": ("gated_bwd", 1),
              "gated_fwd": ("gated_fwd", 1), "gated_jvp": ("gated_jvp", 1)}


def tuned_note(op: str, N: int, T: int, D: int, tx: torch.dtype, tm: torch.dtype) -> str | None:
    """What the tuned variant chose for this op and shape, with each candidate's median ms: "tuned 17 (1: 0.182,
    2: 0.190, ...)" (cuda_fast_path variants, csrc/rowwise_fast.h); None when the tuned variant is off."""
    C = rw.extension()
    if op not in TUNED_KEYS or C is None or not C.with_cuda() or not C.cuda_fast_path() & 32:
        return None
    tx = torch.float32 if op == "gated_jvp" else tx  # float32 tangents in and out whatever the residual dtype
    want = (*TUNED_KEYS[op], N, T, D, str(tx).split(".")[-1], str(tm).split(".")[-1])
    notes = [f"tuned {r['variant']} (" + ", ".join(f"{v}: {ms:.3f}" for v, ms in zip(r["candidates"], r["ms"])) + ")"
             for r in C.cuda_tuned() if (r["op"], r["nmod"], r["N"], r["T"], r["D"], r["tx"], r["tm"]) == want]
    return "; ".join(notes) or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU: C++ twins vs PyTorch, fp32")
    p.add_argument("--batch", type=int, default=0, help="samples N (rows = N*256); default 256 CUDA, 8 CPU")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--shapes", default="B/2,XL/2")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile rows (CUDA; every dtype mix, outputs in our kernels' dtypes)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few iterations (smoke run)")
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--cuda-variants", action="store_true",
                   help="also time the CUDA kernel variants (general kernels only; fast path without/with next-row "
                        "loads; the option bits: wide JVP, planned tiles, two rows, gated rows / streaming, wide "
                        "backward; see above)")
    p.add_argument("--out", default=None, help="append rows as JSONL here")
    p.add_argument("--default-malloc", action="store_true",
                   help="CPU: leave glibc's dynamic malloc thresholds as they are (see harness.pin_cpu_allocator)")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    cuda = device.type == "cuda"
    N = args.batch or (256 if cuda else 8)
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    if args.quick:
        N, shapes = 2, {"odd": (5, 40)}
    iters = args.iters or (3 if args.quick else (50 if cuda else 20))
    dtypes = ([("fp32+bf16", torch.float32, torch.bfloat16), ("bf16", torch.bfloat16, torch.bfloat16)] if cuda
              else [("fp32", torch.float32, torch.float32)])
    impls = ["cuda", "triton"] if cuda else ["cpp"]
    variants = {"cuda": -1}  # dumo_engine._C.cuda_fast_path choices, by row label (-1: the build's default)
    if cuda and args.cuda_variants:
        variants.update({"cuda-general": 0, "cuda-auto": 1, "cuda-nopreload": 2, "cuda-preload": 3, "cuda-wide": 1 | 4,
                         "cuda-planned": 1 | 8, "cuda-tworows": 1 | 16, "cuda-tworows-planned": 1 | 8 | 16,
                         "cuda-streaming": 1 | 128, "cuda-rows": 1 | 64, "cuda-rows-streaming": 1 | 64 | 128,
                         "cuda-widebwd": 1 | 256, "cuda-widebwd-planned": 1 | 8 | 256,
                         "cuda-all": 1 | 4 | 8 | 16 | 64 | 128 | 256})
        impls = list(variants) + ["triton"]
    if cuda and not args.no_compile:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = 64  # one compiled graph per (op, shape, dtype)
    copy_bw = copy_bandwidth(device) if cuda and not args.quick else None
    dev = device_name(device) + (f" (copy {copy_bw / 1e9:.0f} GB/s measured)" if copy_bw else "")
    if not cuda and not args.default_malloc:  # outputs of a few MiB: timings independent of allocation history
        pinned = pin_cpu_allocator()
        dev += f"; {pinned}" if pinned else ""
    command = "python " + " ".join(sys.argv)

    def timed(fn):
        return measure_events(fn, warmup=3, iters=iters) if cuda else measure(fn, warmup=2, iters=iters,
                                                                               device_type="cpu")

    rows = []
    for sname, (T, D) in shapes.items():
        for dlabel, tx, tm in dtypes:
            d = make_inputs(N, T, D, tx, tm, device)
            for op in args.ops.split(","):
                nbytes = ref.rowwise_bytes(op, N, T, D, tx.itemsize, tm.itemsize)
                shape = f"{sname} N{N} T{T} D{D}"

                def row(impl, timing, ref_ms=None, note=None, op=op, shape=shape, dlabel=dlabel, nbytes=nbytes):
                    extra = {}
                    if copy_bw:
                        extra["of_copy_bw"] = f"{nbytes / (timing.median_ms * 1e-3) / copy_bw:.0%}"
                    if note:
                        extra["note"] = note
                    r = Row(op=op, shape=shape, dtype=dlabel, impl=impl, timing=timing, bytes_moved=nbytes,
                            ref_ms=ref_ms, extra=extra)
                    rows.append(r)
                    emit([r], out=args.out, device=dev, command=command)

                t_ref = timed(reference_fns(op, d))
                row("pytorch", t_ref)
                if cuda and not args.no_compile:
                    try:
                        t_c = timed(reference_fns(op, d, compiled_as_ours(op, tm)))
                        row("torch.compile", t_c, t_ref.median_ms)
                    except Exception as e:  # noqa: BLE001 - report and go on: the other rows still count
                        print(f"[bench_rowwise] torch.compile failed for {op}: {type(e).__name__}: {e}")
                for label in impls:
                    impl = "cuda" if label in variants else label
                    try:
                        rw.implementation(d["x"], impl)
                    except RuntimeError as e:
                        print(f"[bench_rowwise] {impl} unavailable: {e}")
                        continue
                    prev = rw.extension().cuda_fast_path(variants[label]) if label in variants else None
                    try:
                        fn, key = our_fn(op, d, impl)
                        fn()
                        if key is not None and rw.last_impl().get(key) != impl:
                            print(f"[bench_rowwise] {op}: asked for {impl}, ran {rw.last_impl().get(key)}; skipped")
                            continue
                        t = timed(fn)  # its warm-up also measures the tuned variant's candidates
                        row(label, t, t_ref.median_ms, note=tuned_note(op, N, T, D, tx, tm) if impl == "cuda" else None)
                    except Exception as e:  # noqa: BLE001 - one failing kernel must not cost every later row
                        print(f"[bench_rowwise] {label} {op} {shape} {dlabel}: {type(e).__name__}: {e}; skipped")
                    finally:
                        if prev is not None:
                            rw.extension().cuda_fast_path(prev)
            del d
            if cuda:
                torch.cuda.empty_cache()
    print("\nall rows:")
    emit(rows, out=None, device=dev, command=command)


if __name__ == "__main__":
    main()
