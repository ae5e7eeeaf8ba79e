"""DeepSpeed ZeRO training backend: the engine the training loop drives when train.deepspeed names a config.

Launch (one node or many; README "Scale out"):
  deepspeed --num_gpus 8 --module dumo_engine.cli train --config C --train.deepspeed=configs/deepspeed/zero2.json
  torchrun --nproc_per_node 8 -m dumo_engine.cli train --config C --train.deepspeed=configs/deepspeed/zero2.json
Both set RANK/WORLD_SIZE/MASTER_ADDR; the process group is NCCL on CUDA and gloo on CPU.

What each rank does per optimizer step (global batch B = micro x accumulation x world):
  - every rank builds the same global batch (the sampler is a pure function of the step) and draws the step's
    randomness for all B rows in one fixed order (objectives' `draw`), then trains on its own rows: rank r gets
    rows [r B/W, (r+1) B/W), cut into `accumulation` micro-batches. So W ranks see exactly the samples and noise
    one process would, and DeepSpeed's gradient averaging makes the update the one-process update.
  - the loss goes through the DeepSpeed engine's forward, with the fused forward+JVP pass (an ordinary forward:
    nothing bypasses the wrapper, so no gradient sync is skipped); engine.backward + engine.step (which clips).
  - EMA: fp32, of DeepSpeed's fp32 master weights, for the part this rank owns (ZeRO 1-3: its optimizer
    partition; ZeRO-0: whole); no communication per step, gathered only for export and checkpoints.
  - metrics are averaged over ranks at log time; only rank 0 writes logs, config, samples and checkpoint pointers.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from .ds_config import load_ds_config, resolve_ds_config, zero_stage


def _import_deepspeed():
    try:
        import deepspeed
    except Exception as e:  # ImportError, or a broken install
        raise ConfigError(f"train.deepspeed is set but deepspeed is not importable ({type(e).__name__}: {e}); "
                          "install it from the checkout with: DS_BUILD_OPS=0 pip install -e '.[deepspeed]'") from None
    with contextlib.suppress(Exception):  # its shared-memory comm op JIT-builds for ~30 s and is not needed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_process_group(device: torch.device):
    """torch.distributed over NCCL (CUDA) or gloo (CPU), from the launcher's environment; a single process without
    a launcher becomes a world of one on 127.0.0.1."""
    deepspeed = _import_deepspeed()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))  # two such runs on one host must not collide
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return deepspeed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fp32_source(p: torch.Tensor, stage: int, masters: dict[int, torch.Tensor]):
    """The fp32 master tensor this rank holds for parameter p (a live view of the optimizer's copy), None where this
    rank holds none:
      ZeRO-0       the whole parameter: its fp32 master (stage0_masters; bf16 runs) or the module's fp32 weight
      ZeRO-1/2     this rank's fragment of the flat fp32 partition (param._hp_mapping)
      ZeRO-3       this rank's fp32 partition of the parameter (safe_get_local_fp32_param; layout of ds_tensor)"""
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)
    if stage in (1, 2):
        mapping = getattr(p, "_hp_mapping", None)
        return None if mapping is None else mapping.get_hp_fragment()
    return stage0_master(p, masters)


@torch.no_grad()
def write_fp32_masters(module: torch.nn.Module, stage: int, optimizer, full: dict[str, torch.Tensor]) -> None:
    """Set every fp32 master (this rank's part of it) from the full fp32 weights `full` {name: tensor}, and, at
    ZeRO-0, forget the optimizer state of DeepSpeed's setup step.

    Under bf16 DeepSpeed makes its fp32 masters from the module's weights after rounding them to bf16, so the masters
    (and the EMA and exports built from them) would start from rounded initial or pretrained weights where the one-
    process run keeps them exact. At ZeRO-0 its unfused bf16 optimizer also runs one AdamW step on zero gradients
    while it sets up: that decays the masters by lr x weight_decay and sets Adam's step count to 1, so every later
    bias correction is one step off (the first update 0.73x the one-process run's at betas 0.9/0.95). After this,
    the first optimizer step is the one-process run's first step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    masters = stage0_masters(optimizer) if stage == 0 else {}
    for name, p in module.named_parameters():
        src = fp32_source(p, stage, masters)
        if src is None:
            continue
        flat = full[name].reshape(-1)
        if stage == 3:  # rank r holds elements [r n, (r + 1) n) of the flattened parameter, the last one padded
            n = src.numel()
            lo, hi = min(rank * n, flat.numel()), min((rank + 1) * n, flat.numel())
            src.view(-1)[: hi - lo].copy_(flat[lo:hi])
        elif stage in (1, 2):
            addr = p._hp_mapping.lp_fragment_address
            src.view(-1).copy_(flat.narrow(0, addr.start, addr.numel))
        else:
            src.copy_(flat.view_as(src))
    if stage == 0 and masters:  # the unfused bf16 wrapper's inner AdamW, which its setup stepped once
        optimizer.optimizer.state.clear()


def stage0_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0: {id(module parameter): its fp32 master}. Under bf16, DeepSpeed wraps a client torch optimizer in its
    unfused mixed-precision optimizer, which steps fp32 copies (fp32_groups) and writes them back rounded into the
    module's bf16 parameters (fp16_groups, in the same order); an fp32 run has no wrapper and the module's parameters
    are the masters (empty dict). The copies are updated in place, on resume too, so the mapping stays valid."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high:
        return {}
    out = {}
    for lg, hg in zip(low, high):
        for lp, hp in zip(lg, hg):
            if lp.shape != hp.shape or hp.dtype != torch.float32:
                raise RuntimeError(f"DeepSpeed's {type(optimizer).__name__}: an fp32 master of shape {tuple(hp.shape)} "
                                   f"({hp.dtype}) pairs with a parameter of shape {tuple(lp.shape)}")
            out[id(lp)] = hp
    return out


def stage0_master(p: torch.Tensor, masters: dict[int, torch.Tensor]) -> torch.Tensor:
    """The fp32 master of ZeRO-0 parameter p (stage0_masters); p itself in fp32 runs. Never the rounded weights."""
    master = masters.get(id(p))
    if master is not None:
        return master
    if p.dtype != torch.float32:
        raise RuntimeError(f"ZeRO-0: a {p.dtype} parameter of shape {tuple(p.shape)} has no fp32 master in the "
                           "DeepSpeed optimizer: its EMA and export would average rounded weights")
    return p


class ShardedEMA:
    """fp32 EMA of DeepSpeed's fp32 master weights, kept for the part of each parameter this rank owns (fp32_source:
    ZeRO-0 the whole parameter, ZeRO-1/2 this rank's fragment, ranks owning none keep none, ZeRO-3 its partition).
    update() is torch._foreach_lerp_, the one-process rule, with no communication; full_state() gathers."""

    def __init__(self, module: torch.nn.Module, stage: int, optimizer=None):
        self.stage = stage
        self.masters = stage0_masters(optimizer) if stage == 0 else {}
        self.named = list(module.named_parameters())
        self.shadow = [None if (src := self._source(p)) is None else src.detach().float().clone()
                       for _, p in self.named]

    def _source(self, p: torch.Tensor):
        """The fp32 tensor this rank averages for parameter p (a live view of the optimizer's master copy)."""
        return fp32_source(p, self.stage, self.masters)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        pairs = [(s, self._source(p)) for s, (_, p) in zip(self.shadow, self.named) if s is not None]
        if pairs:
            torch._foreach_lerp_([s for s, _ in pairs], [src.detach().float() for _, src in pairs], 1.0 - decay)

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().contiguous() for (n, _), s in zip(self.named, self.shadow) if s is not None}

    def load_shards(self, tensors: dict[str, torch.Tensor]) -> None:
        for (n, _), s in zip(self.named, self.shadow):
            if s is None:
                continue
            if n not in tensors or tensors[n].shape != s.shape:
                raise ValueError(f"EMA shard for {n!r} is missing or has another shape")
            s.copy_(tensors[n])

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} on every rank (collective for ZeRO 1-3)."""
        out = {}
        if self.stage == 0:
            return {n: s.detach().cpu().clone() for (n, _), s in zip(self.named, self.shadow)}
        world = dist.get_world_size()
        for (n, p), s in zip(self.named, self.shadow):
            if self.stage == 3:
                parts = [torch.empty_like(s) for _ in range(world)]
                dist.all_gather(parts, s)
                out[n] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()
            else:  # fragments of the flattened parameter: place ours, sum over ranks (as get_full_hp_param does)
                full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if s is not None:
                    addr = p._hp_mapping.lp_fragment_address
                    full.narrow(0, addr.start, addr.numel).copy_(s)
                dist.all_reduce(full)
                out[n] = full.view(p.shape).cpu()
        return out


class DeepSpeedBackend:
    """Drives a DeepSpeed engine for the training loop (see train.LocalBackend for the one-process twin)."""

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device):
        deepspeed = init_process_group(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        ds = resolve_ds_config(load_ds_config(cfg.train.deepspeed), cfg, self.world_size, device.type)
        self.cfg, self.ds_config, self.stage = cfg, ds, zero_stage(ds)
        self.micro, self.accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        oc = cfg.optim
        opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=(oc.beta1, oc.beta2),
                                weight_decay=oc.weight_decay, fused=device.type == "cuda")
        # under bf16 the masters are set from these exact fp32 weights after DeepSpeed's setup (write_fp32_masters)
        full = ({n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}
                if ds["bf16"]["enabled"] else None)
        # DeepSpeed's setup must not move the RNG: the step draws have to match a one-process run
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        if full is not None:
            write_fp32_masters(self.engine.module, self.stage, self.optimizer, full)
            del full
        self.module = self.engine  # what the objective calls: the engine's forward
        self.ema = ShardedEMA(self.engine.module, self.stage, self.optimizer)
        self.device = device

    # ---- the step ----
    def shards(self, n: int) -> list[tuple[int, int]]:
        """This rank's rows of the global batch of n, as `accum` micro-batches."""
        if n != self.micro * self.accum * self.world_size:
            raise ConfigError(f"global batch {n} != micro {self.micro} x accumulation {self.accum} x {self.world_size}")
        base = self.rank * self.micro * self.accum
        return [(base + k * self.micro, base + (k + 1) * self.micro) for k in range(self.accum)]

    def backward(self, loss: torch.Tensor, first: bool) -> None:
        self.engine.backward(loss)  # scales by 1/accumulation; averages gradients over ranks at the boundary
        self._norm = None
        if self.stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # ZeRO-0 in fp32 clips with torch's clip_grad_norm_ and keeps no norm: measure the averaged gradients
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.engine.step()  # steps (and clips) only at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._norm
        if norm is None:
            return torch.tensor(float("nan"))
        return norm if isinstance(norm, torch.Tensor) else torch.tensor(norm)  # no host sync for a tensor norm

    def ema_update(self, decay: float) -> None:
        self.ema.update(decay)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.device).clone()
        dist.all_reduce(t)
        return t / self.world_size

    def reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def on_main(self, fn):
        """fn() on rank 0 only; its result, or its exception (raised again on every rank), is broadcast, so no rank
        is left waiting in a collective for a rank 0 that failed (filesystem errors, a damaged run directory)."""
        box = [None, None]
        if self.is_main:
            try:
                box = [fn(), None]
            except Exception as e:  # noqa: BLE001 - every rank must learn about it, then it is raised again
                box = [None, e]
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    # ---- checkpoints (distributed/checkpoint.py) and the final weights ----
    def save(self, run_dir: str, step: int, meta: dict, keep: int) -> None:
        from .checkpoint import save_ds_checkpoint

        save_ds_checkpoint(run_dir, step, self, meta=meta, keep=keep)

    def resume(self, run_dir: str, check=None):
        from .checkpoint import resume_ds_checkpoint

        return resume_ds_checkpoint(run_dir, self, check)

    def final_models(self):
        """(model, EMA) built from the consolidated fp32 weights on rank 0, (None, None) elsewhere; collective."""
        from ..train import build_model_from_config

        model_sd, ema_sd = self.full_state_dicts()
        if not self.is_main:
            return None, None
        model, ema = build_model_from_config(self.cfg), build_model_from_config(self.cfg)
        model.load_state_dict(model_sd)
        ema.load_state_dict(ema_sd)
        return model.eval(), ema.requires_grad_(False).eval()

    # ---- weights ----
    def full_state_dicts(self) -> tuple[Optional[dict], Optional[dict]]:
        """(model, EMA) consolidated fp32 state dicts on rank 0 (None elsewhere); collective. Parameters come from
        DeepSpeed's fp32 master copy (ZeRO 1-3; ZeRO-0 its unfused optimizer's masters under bf16, else the module),
        buffers from a freshly built model (the module's are in the training dtype)."""
        from deepspeed.utils import safe_get_full_fp32_param

        from ..train import build_model_from_config

        params = {}
        for n, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p) if self.stage > 0 else stage0_master(p, self.ema.masters)  # collective
            if full is None and p.dtype != torch.float32:
                raise RuntimeError(f"ZeRO-{self.stage}: DeepSpeed gives no fp32 master for {n} ({p.dtype}): the export "
                                   "would hold rounded weights")
            params[n] = (p if full is None else full).detach().float().cpu().clone()
        ema = self.ema.full_state()
        if not self.is_main:
            return None, None
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # rank 0 alone: must not move its RNG
            fresh = build_model_from_config(self.cfg)
        model_sd = {k: params.get(k, v.detach().float().cpu().clone()) for k, v in fresh.state_dict().items()}
        ema_sd = {k: (ema[k] if k in ema else v).clone() for k, v in model_sd.items()}
        return model_sd, ema_sd
