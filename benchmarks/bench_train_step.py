"""Whole training step: flow matching vs DuMo (reference torch.func JVP) vs DuMo (fused forward + JVP).

Per case: ms/step (median, p20-p80), img/s, peak memory (CUDA), and MFU against the card's measured bf16
GEMM peak (measured in the same run), with FLOPs from the engine's cost model: forward FLOPs/img counted
by torch's FlopCounterMode on a plain forward, times 3.0 (flow matching), 4.04 (DuMo fused: primal+tangent
forward 2.04 + primal backward 2.0), plus 2.0 with folded CFG (two no-grad v-head passes).
On CUDA the fused rows' speedup is against the reference under the same bf16 autocast (dumo_reference_autocast);
the float32 reference (the oracle, dumo_reference) is timed too, and each fused row notes its ratio to it.

  python benchmarks/bench_train_step.py                 # CUDA: DiT-XL/2 and B/2, bf16, largest batch that fits
  python benchmarks/bench_train_step.py --cpu           # CPU: DiT-digits-size model on 8x8 inputs, fp32
  python benchmarks/bench_train_step.py --models DiT-B/2 --batch 64 --out benchmarks/out/train_step.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Row, device_name, emit, measure, peak_memory_gib  # noqa: E402

from dumo_engine.models import build_model  # noqa: E402
from dumo_engine.objectives import DuMo, FlowMatching, GuidanceConfig  # noqa: E402
from dumo_engine.train import autocast_ctx  # noqa: E402

STEP_FACTOR = {"flow_matching": 3.0, "dumo_reference": 4.04, "dumo_reference_autocast": 4.04,
               "dumo_fused": 4.04}  # x forward FLOPs
CFG_FACTOR = 2.0


def forward_flops_per_img(model, x, y) -> float:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    t = torch.rand(x.shape[0], device=x.device)
    # torch counts the CUDA SDPA kernels but not the CPU flash kernel: without this, CPU FLOPs (and MFU) left out
    # the attention (DiT-B/2 43.6 instead of 46.0 GFLOP/img); the same count as torch's CUDA SDPA formula
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with torch.no_grad(), counter:
        model(x, t, t * 0.5, y)
    return counter.get_total_flops() / x.shape[0]


def measured_gemm_peak(device: torch.device) -> float:
    """bf16 GEMM TFLOP/s on a large square matmul (the denominator of MFU); CPU: fp32."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, warmup=3, iters=10, device_type=device.type)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def make_step(kind: str, model, opt, x, y, device, cfg: bool):
    guidance = GuidanceConfig(w=0.2, k=0.92, t_hi=0.75) if cfg else GuidanceConfig()
    if kind == "flow_matching":
        obj = FlowMatching(model.num_classes, guidance=guidance)
    else:
        obj = DuMo(model.num_classes, guidance=guidance, jvp_backend="fused" if kind == "dumo_fused" else "func",
                   jvp_autocast=kind == "dumo_reference_autocast")

    def step():
        with autocast_ctx(device, "bf16"):
            loss, _ = obj.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_case(name: str, kind: str, batch: int, device, cfg: bool, iters: int, input_size: int, channels: int):
    torch.manual_seed(0)
    model = build_model(name, input_size=input_size, in_channels=channels,
                        num_classes=1000 if device.type == "cuda" else 10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, channels, input_size, input_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    fwd = forward_flops_per_img(model, x[:2], y[:2])
    step = make_step(kind, model, opt, x, y, device, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = measure(step, warmup=2, iters=iters, device_type=device.type)
    flops = fwd * (STEP_FACTOR[kind] + (CFG_FACTOR if cfg else 0.0)) * batch
    return timing, flops, peak_memory_gib(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "ALLOC_FAILED")))


class NoBatchFits(RuntimeError):
    pass


def largest_batch(name, kind, device, cfg, input_size, channels, candidates) -> int:
    """Largest candidate micro-batch whose step runs (one warm-up + one timed step), 10% memory kept in reserve."""
    import gc

    for b in candidates:
        ok = False
        try:
            run_case(name, kind, b, device, cfg, 1, input_size, channels)
            ok = torch.cuda.max_memory_allocated(device) < 0.9 * torch.cuda.get_device_properties(device).total_memory
        except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
            if not _is_oom(e):
                raise
        gc.collect()  # the failed probe's model and activations are freed only after its traceback is gone
        torch.cuda.empty_cache()
        if ok:
            return b
    raise NoBatchFits(f"{name} {kind}: not even batch {candidates[-1]} fits")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU mode: small model, fp32")
    p.add_argument("--models", default=None, help="comma-separated registry names")
    p.add_argument("--batch", type=int, default=0, help="micro-batch; 0: largest that fits (CUDA) / 32 (CPU)")
    p.add_argument("--cfg", action="store_true", help="fold CFG into training (2 extra no-grad passes)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kinds", default=None, help="comma-separated subset of the variants (default: all)")
    p.add_argument("--no-own-batch", action="store_true", help="CUDA: skip the fused step at its own largest batch")
    p.add_argument("--out", default=None, help="append rows as JSONL here")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        models = (args.models or "DiT-XL/2,DiT-B/2").split(",")
        input_size, channels = 32, 4
    else:
        models = (args.models or "DiT-digits").split(",")
        input_size, channels = 8, 1
    peak = measured_gemm_peak(device)
    dev_label = f"{device_name(device)} (GEMM peak measured {peak:.3g} TFLOP/s)"
    command = "python " + " ".join(sys.argv)
    rows = []
    for name in models:
        # equal batch for every variant: the largest the reference (fp32 JVP pass, the most memory) fits
        batch = args.batch or (largest_batch(name, "dumo_reference", device, args.cfg, input_size, channels,
                                             [64, 32, 16, 8, 4]) if device.type == "cuda" else 32)
        ref_ms = fp32_ref_ms = None
        # variants of the fused pass: one GEMM over stacked [x; x_dot] rows (opt-in until measured), and on CUDA
        # the PyTorch attention rule instead of the Triton kernel
        # and the plain-PyTorch row-wise rules instead of the C++/CUDA row-wise kernels (DUMO_FUSED_ROWWISE=0)
        kinds = ["flow_matching", "dumo_reference", "dumo_fused", "dumo_fused_torch_rowwise", "dumo_fused_stacked"]
        if device.type == "cuda":
            # the reference pass under the step's bf16 autocast: the like-for-like baseline of the fused rows' speedup
            # column (the fp32 reference stays as the oracle's row; its ratio mixes precision with fusion)
            kinds.insert(2, "dumo_reference_autocast")
            kinds.append("dumo_fused_torch_attn")
        if args.kinds:
            kinds = [k for k in kinds if k in args.kinds.split(",")]
        for kind in kinds:
            os.environ["DUMO_FUSED_ATTN"] = "torch" if kind == "dumo_fused_torch_attn" else "triton"
            os.environ["DUMO_STACKED_LINEAR"] = "1" if kind == "dumo_fused_stacked" else "0"
            os.environ["DUMO_FUSED_ROWWISE"] = "0" if kind == "dumo_fused_torch_rowwise" else "1"
            base = "dumo_fused" if kind.startswith("dumo_fused") else kind
            timing, flops, mem = run_case(name, base, batch, device, args.cfg, args.iters, input_size, channels)
            img_s = batch / (timing.median_ms * 1e-3)
            extra = {"img_s": round(img_s, 1), "mfu": round(flops / (timing.median_ms * 1e-3) / (peak * 1e12), 4)}
            if mem is not None:
                extra["peak_gib"] = round(mem, 2)
            if kind == "dumo_reference":
                ref_ms = fp32_ref_ms = timing.median_ms
            elif kind == "dumo_reference_autocast":
                ref_ms = timing.median_ms
            elif kind.startswith("dumo_fused") and fp32_ref_ms is not None and ref_ms != fp32_ref_ms:
                extra["vs_fp32_reference"] = round(fp32_ref_ms / timing.median_ms, 2)
            # the oracle reference runs its JVP pass in fp32 by design; everything else under bf16 autocast on CUDA
            dtype = "fp32" if device.type == "cpu" else ("fp32 JVP pass" if kind == "dumo_reference" else "bf16-autocast")
            row = Row(op="train_step" + ("+cfg" if args.cfg else ""), shape=f"{name} b{batch} {input_size}px",
                      dtype=dtype, impl=kind, timing=timing, flops=flops,
                      ref_ms=ref_ms if kind.startswith("dumo_fused") else None, extra=extra)
            rows.append(row)
            emit([row], out=args.out, device=dev_label, command=command)  # each row lands as soon as it is measured
        if device.type == "cuda" and not args.batch and not args.no_own_batch:  # the fused step at its own largest batch (the img/s target)
            os.environ["DUMO_FUSED_ATTN"], os.environ["DUMO_STACKED_LINEAR"] = "triton", "0"
            os.environ["DUMO_FUSED_ROWWISE"] = "1"
            try:
                own = largest_batch(name, "dumo_fused", device, args.cfg, input_size, channels, [256, 128])
            except NoBatchFits as e:  # neither fits: this model's other rows stand, the next model still runs
                print(f"[bench_train_step] {name}: no own-batch row ({e})", flush=True)
                own = 0
            if own > batch:
                timing, flops, mem = run_case(name, "dumo_fused", own, device, args.cfg, args.iters, input_size, channels)
                row = Row(op="train_step" + ("+cfg" if args.cfg else ""), shape=f"{name} b{own} {input_size}px",
                          dtype="bf16-autocast", impl="dumo_fused (own largest batch)", timing=timing, flops=flops,
                          extra={"img_s": round(own / (timing.median_ms * 1e-3), 1),
                                 "mfu": round(flops / (timing.median_ms * 1e-3) / (peak * 1e12), 4),
                                 "peak_gib": round(mem, 2)})
                rows.append(row)
                emit([row], out=args.out, device=dev_label, command=command)
    print("\nall rows:")
    emit(rows, out=None, device=dev_label, command=command)


if __name__ == "__main__":
    main()
