"""`dumo plan-memory`: predicted per-GPU memory of a DuMo training run for each ZeRO stage, and which stages fit.

Model state per parameter (P parameters, G data-parallel GPUs), the ZeRO paper's accounting:
  bf16 (DeepSpeed bf16): weights 2 B, gradients 2 B, optimizer 12 B (fp32 master 4 + Adam m 4 + v 4)
  fp32:                  weights 4 B, gradients 4 B, optimizer 8 B (Adam m, v; the weights are the master) at
                         ZeRO-0 and ZeRO-3, 12 B at ZeRO-1/2 (DeepSpeed's stage-1/2 optimizer clones the fp32
                         weights into its own flat partition even when they are already fp32)
  ZeRO-0 keeps all of it on every GPU; ZeRO-1 partitions the optimizer state over G; ZeRO-2 also the gradients;
  ZeRO-3 also the weights. The engine's EMA is fp32 (4 B): full on every GPU under ZeRO-0, partitioned like the
  optimizer state under ZeRO 1-3 (distributed.engine.ShardedEMA).
Activations: the bytes autograd saves for backward per image, counted on the meta device (no memory, no compute)
for the plain forward (flow matching) and for the fused DuMo forward+JVP pass (whose tangent saves nothing), times
the micro-batch. The meta device runs attention through the math path, which saves the T x T scores; the flash and
Triton kernels do not, so this is an upper bound. Not counted: transient working memory of the largest layer, the
CUDA context (~0.5 GiB), allocator fragmentation, DeepSpeed's communication buckets (about 2 x bucket size).
"""
from __future__ import annotations

import dataclasses

import torch

GIB = 2**30
BYTES = {"bf16": {"weights": 2, "grads": 2, "optimizer": 12}, "fp32": {"weights": 4, "grads": 4, "optimizer": 8}}


@dataclasses.dataclass
class StagePlan:
    stage: int
    weights: float  # bytes per GPU
    grads: float
    optimizer: float
    ema: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema + self.activations


def model_state_bytes(n_params: int, stage: int, gpus: int, precision: str = "bf16") -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer state and EMA under ZeRO `stage` on `gpus` GPUs."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero: {stage} is not one of 0, 1, 2, 3")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if precision not in BYTES:
        raise ValueError(f"--precision must be one of {', '.join(BYTES)}, got {precision!r}")
    b = dict(BYTES[precision])
    if precision == "fp32" and stage in (1, 2):
        b["optimizer"] = 12  # + the separate fp32 master partition (deepspeed/runtime/zero/stage_1_and_2.py)
    shard = {"optimizer": stage >= 1, "grads": stage >= 2, "weights": stage >= 3}
    out = {k: n_params * b[k] / (gpus if shard[k] else 1) for k in ("weights", "grads", "optimizer")}
    out["ema"] = n_params * 4 / (gpus if stage >= 1 else 1)  # partitioned like the optimizer state
    return out


def activation_bytes_per_image(name: str, input_size: int, in_channels: int, num_classes: int,
                               precision: str = "bf16") -> dict[str, float]:
    """{'plain': bytes, 'dumo_fused': bytes} saved for backward per image (meta device: nothing is allocated)."""
    from ..models import build_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        m = build_model(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes).to(dtype)
        params = {id(p) for p in m.parameters()}
        z = torch.randn(1, in_channels, input_size, input_size, dtype=dtype)
        t = torch.rand(1, dtype=dtype)
        y = torch.zeros(1, dtype=torch.long)

        def saved(fn) -> float:
            total = [0]

            def pack(x):
                base = x._base if x._base is not None else x
                if id(x) not in params and id(base) not in params:  # weights are counted as model state
                    total[0] += x.numel() * x.element_size()
                return x

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                fn()
            return float(total[0])

        return {"plain": saved(lambda: m(z, t, t * 0, y)),
                "dumo_fused": saved(lambda: m(z, t, t * 0, y, tangent=torch.randn_like(z)))}


def plan(name: str, gpus: int, micro_batch: int, precision: str = "bf16", input_size: int = 32,
         in_channels: int = 4, num_classes: int = 1000) -> tuple[int, dict[str, float], list[StagePlan]]:
    from ..models import build_model

    if micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {micro_batch}")
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(name, input_size=input_size, in_channels=in_channels,
                                                      num_classes=num_classes).parameters())
    act = activation_bytes_per_image(name, input_size, in_channels, num_classes, precision)
    plans = [StagePlan(stage=s, activations=act["dumo_fused"] * micro_batch,
                       **model_state_bytes(n_params, s, gpus, precision)) for s in range(4)]
    return n_params, act, plans


def format_plan(name: str, gpus: int, micro_batch: int, gpu_mem_gib: float, precision: str, n_params: int,
                act: dict, plans: list[StagePlan], highlight: int | None = None) -> str:
    lines = [f"{name}: {n_params / 1e6:.2f}M parameters | {gpus} GPU(s) | micro-batch {micro_batch} per GPU | "
             f"{precision} | GPU memory {gpu_mem_gib:g} GiB",
             f"activations saved for backward per image: plain forward {act['plain'] / GIB:.3f} GiB, fused DuMo "
             f"forward+JVP {act['dumo_fused'] / GIB:.3f} GiB (upper bound: math attention)", "",
             "| ZeRO | weights GiB | grads GiB | optimizer GiB | EMA GiB | activations GiB | total GiB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        mark = " <-" if p.stage == highlight else ""
        fits = "yes" if p.total <= gpu_mem_gib * GIB else "no"
        lines.append(f"| {p.stage}{mark} | {p.weights / GIB:.2f} | {p.grads / GIB:.2f} | {p.optimizer / GIB:.2f} | "
                     f"{p.ema / GIB:.2f} | {p.activations / GIB:.2f} | {p.total / GIB:.2f} | {fits} |")
    ok = [p.stage for p in plans if p.total <= gpu_mem_gib * GIB]
    if ok:
        lines.append(f"\nfits: ZeRO {', '.join(map(str, ok))}; the lowest stage that fits moves the least data: "
                     f"configs/deepspeed/zero{ok[0]}.json")
    else:
        lines.append("\nfits: none; lower the micro-batch (gradient accumulation keeps the global batch) or add GPUs")
    return "\n".join(lines)
