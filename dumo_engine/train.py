"""The training loop: batch -> objective -> backward -> clip -> step -> EMA -> log -> checkpoint."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass

import torch

from . import checkpoint as ckpt_io
from .config import ConfigError, RunConfig, save_config, to_flat_dict
from .data import DigitsData
from .fsio import write_text_atomic
from .models import build_model, load_pretrained_dit
from .objectives import OBJECTIVES, GuidanceConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available here; use train.device=cpu or auto")
    return torch.device(name)


def autocast_ctx(device: torch.device, precision: str):
    """bf16 autocast on CUDA; a no-op context on CPU (and for fp32)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_objective(cfg: RunConfig):
    o = cfg.objective
    kw = dict(P_mean=o.P_mean, P_std=o.P_std, adaptive_p=o.adaptive_p, adaptive_eps=o.adaptive_eps,
              guidance=GuidanceConfig(o.cfg_w, o.cfg_k, o.cfg_t_lo, o.cfg_t_hi, o.label_dropout))
    if o.name != "flow_matching":
        kw.update(tangent=o.tangent, target_velocity=o.target_velocity, jvp_backend=o.jvp_backend)
        if o.equal_fraction is not None:
            kw["equal_fraction"] = o.equal_fraction
    if o.name == "dumo":
        kw["lambda_v"] = o.lambda_v
    return OBJECTIVES[o.name](cfg.model.num_classes, **kw)


def build_model_from_config(cfg: RunConfig) -> torch.nn.Module:
    m = cfg.model
    return build_model(m.name, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                       h_in_trunk=m.h_in_trunk, time_scale=m.time_scale)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def measure_step_flops(model, objective, x, y) -> float:
    """FLOPs of one training step (forward, JVP, backward) per image, counted by torch; RNG untouched."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = objective.loss(model, x, y)
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


@dataclass
class TrainResult:
    run_dir: str
    step: int
    model: torch.nn.Module
    ema: torch.nn.Module
    objective: object
    log_path: str
    rank: int = 0  # under DeepSpeed only rank 0 holds model/ema (consolidated); other ranks have None


# What a resume must find unchanged: every setting that shapes the trajectory (model, objective, data, optimizer,
# global batch, seed, precision). Not: how long or where it runs, how it logs and saves, the JVP backend (the same
# math), model.pretrained (overwritten by the checkpoint), DeepSpeed's layout (checked against the checkpoint itself).
_RESUME_SECTIONS = ("model", "objective", "data", "optim")
_RESUME_TRAIN_KEYS = ("batch_size", "seed", "precision")
_RESUME_FREE = ("model.pretrained", "model.pretrained_source", "objective.jvp_backend")


def training_settings(cfg: RunConfig) -> dict:
    """{dotted key: value} of the settings a resumed run must share with its checkpoint (stored in state.json)."""
    flat = to_flat_dict(cfg)
    keys = [k for k in flat if k.split(".")[0] in _RESUME_SECTIONS and k not in _RESUME_FREE]
    return {k: flat[k] for k in sorted(keys + [f"train.{k}" for k in _RESUME_TRAIN_KEYS])}


def check_resume_settings(path: str, state: dict, cfg: RunConfig) -> None:
    """Raise ConfigError naming every training setting that differs from the checkpoint's (a checkpoint written
    before they were recorded is not checked)."""
    saved = state.get("meta", {}).get("config")
    if not isinstance(saved, dict):
        return
    now = training_settings(cfg)
    # a setting added after the checkpoint was written is absent from it: that run had the setting's default
    saved = {**{k: v for k, v in training_settings(RunConfig()).items() if k not in saved}, **saved}
    missing = object()
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k, missing) != now.get(k, missing)]
    if diff:
        def show(d, k):
            return f"{k}={d[k]!r}" if k in d else f"{k} (absent)"

        raise ConfigError(f"train.resume: {path} was trained with {', '.join(show(saved, k) for k in diff)}; this run "
                          f"has {', '.join(show(now, k) for k in diff)}. A resume continues the same run: set them "
                          "back, or train into a new train.out_dir (train.resume=false moves the earlier run aside)")


def _trim_log(path: str, last_step: int) -> None:
    """After a resume, drop log lines the interrupted run wrote past its last checkpoint (and a torn last line)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for ln in f:
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:  # a line cut short when the process was killed
                continue
            if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= last_step:
                keep.append(json.dumps(row) + "\n")
    write_text_atomic(path, "".join(keep))


def _archive_previous(run_dir: str) -> None:
    """train.resume=false into a used run directory: move the old checkpoints, log, config, scores and samples aside,
    never delete them."""
    if not any(os.path.exists(os.path.join(run_dir, p)) for p in ("checkpoints", "log.jsonl")):
        return
    samples = sorted(p for p in os.listdir(run_dir) if p.startswith(("samples_", "sample_")) and
                     os.path.isfile(os.path.join(run_dir, p)))  # the end-of-run grids and `dumo sample` outputs
    old = [p for p in ("checkpoints", "log.jsonl", "config.yaml", "eval.json") if os.path.exists(os.path.join(run_dir, p))]
    old += samples
    k = 1
    while os.path.exists(os.path.join(run_dir, f"previous-{k}")):
        k += 1
    dest = os.path.join(run_dir, f"previous-{k}")
    os.makedirs(dest)
    for p in old:
        os.rename(os.path.join(run_dir, p), os.path.join(dest, p))
    print(f"train.resume=false: the earlier run's {', '.join(old)} moved to {dest}")


class LocalBackend:
    """One process, plain PyTorch (distributed.engine.DeepSpeedBackend is the multi-rank twin with the same methods)."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, device: torch.device):
        oc = cfg.optim
        self.device = device
        self.module = self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=(oc.beta1, oc.beta2),
                                     weight_decay=oc.weight_decay, fused=device.type == "cuda")
        self.grad_clip = oc.grad_clip if oc.grad_clip > 0 else float("inf")

    def shards(self, n: int) -> list[tuple[int, int]]:
        return [(0, n)]

    def backward(self, loss: torch.Tensor, first: bool) -> None:
        if first:
            self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        return norm

    def ema_update(self, decay: float) -> None:
        ema_update(self.ema, self.model, decay)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def on_main(self, fn):
        return fn()

    def save(self, run_dir: str, step: int, meta: dict, keep: int) -> None:
        ckpt_io.save_checkpoint(run_dir, step, self.model, self.ema, self.opt, meta=meta, keep=keep, device=self.device)

    def resume(self, run_dir: str, check=None) -> tuple[int, str | None, list[str]]:
        """(step, path, skipped-damaged messages) of the newest usable checkpoint, restored into the live objects
        after check(path, state) (which raises on a mismatch); (0, None, ...) when there is none."""
        ckpt, skipped = ckpt_io.load_newest_valid(run_dir)
        if ckpt is None:
            return 0, None, skipped
        if check is not None:
            check(ckpt["path"], ckpt["state"])
        return ckpt_io.restore(ckpt, self.model, self.ema, self.opt, self.device), ckpt["path"], skipped

    def final_models(self):
        return self.model, self.ema


def make_backend(cfg: RunConfig, model: torch.nn.Module, device: torch.device):
    if not cfg.train.deepspeed:
        return LocalBackend(cfg, model, device)
    from .distributed.engine import DeepSpeedBackend

    return DeepSpeedBackend(cfg, model, device)


def _flops_per_img(cfg: RunConfig, backend, objective, x, y) -> float:
    if not cfg.train.deepspeed:
        return measure_step_flops(backend.module, objective, x, y)
    with torch.device("meta"):  # sharded parameters cannot run outside the engine: count on a meta-device copy
        meta_model = build_model_from_config(cfg)
    return measure_step_flops(meta_model, objective, x.to("meta"), y.to("meta"))


def train(cfg: RunConfig) -> TrainResult:
    tc, oc = cfg.train, cfg.optim
    device = resolve_device(tc.device)
    if tc.deepspeed and device.type == "cuda":  # one GPU per rank, chosen before anything touches CUDA
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    run_dir = os.path.abspath(tc.out_dir)  # ranks exchange paths: make them independent of each one's cwd
    log_path = os.path.join(run_dir, "log.jsonl")
    torch.manual_seed(tc.seed)
    model = build_model_from_config(cfg).to(device)
    # a resume overwrites the pretrained weights: its file may be gone by then (with checkpoints present, the resume
    # below loads one or raises CheckpointError naming why none loads: it never starts from the random init)
    pretrained_skipped = bool(cfg.model.pretrained and tc.resume and not os.path.exists(cfg.model.pretrained)
                              and ckpt_io.has_checkpoints(run_dir))
    if cfg.model.pretrained and not pretrained_skipped:
        print(load_pretrained_dit(model, cfg.model.pretrained, source=cfg.model.pretrained_source).summary())
    objective = build_objective(cfg)
    if tc.deepspeed and getattr(objective, "jvp_backend", None) == "auto":
        objective.jvp_backend = "fused"  # the one JVP path that runs through the engine's forward
    backend = make_backend(cfg, model, device)  # under DeepSpeed: joins the process group, shards the model
    main = backend.is_main

    def prepare_run_dir():
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ConfigError(f"train.out_dir: {run_dir} exists and is not a directory")
        os.makedirs(run_dir, exist_ok=True)
        if not tc.resume:
            _archive_previous(run_dir)

    backend.on_main(prepare_run_dir)  # rank 0 writes; a failure there stops every rank
    data = DigitsData.from_config(cfg.data, tc.batch_size, tc.seed, device)

    def check(path, state):
        check_resume_settings(path, state, cfg)

    step, path, skipped = backend.resume(run_dir, check) if tc.resume else (0, None, [])

    def report_resume():  # config.yaml only now: a refused resume leaves the run's own config in place
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        for msg in skipped:
            print(f"warning: skipped a damaged checkpoint: {msg}")
        if path is not None:
            _trim_log(log_path, step)
            print(f"resumed from {path} at step {step}")
            if step >= tc.steps:
                print(f"note: train.steps={tc.steps} is not past the checkpoint's step {step}: nothing to train")
        elif os.path.exists(log_path):
            os.remove(log_path)

    backend.on_main(report_resume)

    with torch.device("meta"):  # the full count (ZeRO-3 leaves each rank a partition)
        n_params = sum(p.numel() for p in build_model_from_config(cfg).parameters())
    flops_img = _flops_per_img(cfg, backend, objective, *data.batch(step))
    if main:
        where = f"{device}" + (f" x {backend.world_size} ranks, ZeRO-{backend.stage}" if tc.deepspeed else "")
        print(f"{cfg.model.name}: {n_params / 1e6:.2f}M params | {objective.name} | {flops_img / 1e9:.3f} GFLOP/img/step | {where}")

    bar = None
    if tc.progress and main:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    count, t_last = 0, time.perf_counter()
    model.train()
    with open(log_path, "a") if main else contextlib.nullcontext() as log:
        while step < tc.steps:
            x, y = data.batch(step)  # the global batch: the same on every rank
            draws = objective.draw(x)  # the step's randomness for all rows, in one order (rank-independent)
            parts = backend.shards(x.shape[0])  # this rank's rows, as micro-batches
            metrics: dict[str, torch.Tensor] = {}
            for i, (a, b) in enumerate(parts):
                with autocast_ctx(device, tc.precision):
                    loss, m = objective.loss(backend.module, x[a:b], y[a:b], draws.rows(a, b))
                backend.backward(loss, first=i == 0)
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v.detach().float() / len(parts)
            metrics["grad_norm"] = backend.step()
            # EMA warm-up: averaging starts short so a short run's EMA is not dominated by the init.
            backend.ema_update(min(oc.ema_decay, (1 + step) / (10 + step)) if oc.ema_warmup else oc.ema_decay)
            step += 1
            count += 1
            for k, v in metrics.items():  # accumulate on device: no sync inside the step
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            ckpt_now = (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps
            # a log window also closes at each checkpoint, so a resumed run logs exactly the same rows
            if tc.log_every and (step % tc.log_every == 0 or ckpt_now):
                means = {k: backend.reduce_mean(v / count).item() for k, v in sums.items()}  # mean over ranks
                dt = time.perf_counter() - t_last
                img_s = count * tc.batch_size / dt
                row = {"step": step, "kimg": step * tc.batch_size / 1e3, **means,
                       "img_s": img_s, "sec_per_kimg": 1e3 / img_s, "lr": oc.lr}
                if tc.peak_tflops > 0:
                    row["mfu"] = flops_img * img_s / (tc.peak_tflops * 1e12 * backend.world_size)
                if device.type == "cuda":  # the largest peak over ranks (ZeRO partitions need not be even)
                    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)) / 2**30)
                    row["max_mem_gib"] = backend.reduce_max(peak).item()
                if main:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if ckpt_now:  # durable before the checkpoint that follows: a resume keeps rows up to it
                        os.fsync(log.fileno())
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}")
                sums, count, t_last = {}, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if ckpt_now:
                backend.save(run_dir, step, {"model": cfg.model.name, "config": training_settings(cfg)},
                             tc.keep_checkpoints)
    if bar is not None:
        bar.close()
    final_model, final_ema = backend.final_models()  # consolidated on rank 0 under DeepSpeed; None elsewhere
    return TrainResult(run_dir, step, final_model, final_ema, objective, log_path, backend.rank)


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
