"""DeepSpeed configs: the JSON files under configs/deepspeed/ (zero0..zero3.json), with "auto" values filled from
the run config, and every inconsistency reported before training starts (no deepspeed import needed here).

Filled from the run config:
  train_batch_size                 train.batch_size (the global batch, the same number a one-process run uses)
  train_micro_batch_size_per_gpu   train.micro_batch, or batch_size / world_size when that is 0
  gradient_accumulation_steps      batch_size / (micro_batch * world_size)
  gradient_clipping                optim.grad_clip
  bf16.enabled                     train.precision == "bf16" on CUDA (CPU runs train in fp32)
Numbers written in the JSON must agree with these (train_batch_size = micro * accumulation * world_size).
The optimizer is the engine's own AdamW (optim.*), handed to DeepSpeed as a client optimizer: an "optimizer" or
"scheduler" section in the JSON is refused, as is fp16 (the engine trains in bf16 or fp32).
"""
from __future__ import annotations

import copy
import json
import os

from ..config import ConfigError, RunConfig

STAGES = (0, 1, 2, 3)


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed config that cannot run; the message names the key."""


# top-level sections that change the precision or the batch behind the engine's back
_PRECISION_KEYS = (
    ("torch_autocast", "it runs the forward in another precision than train.precision says"),
    ("amp", "NVIDIA apex AMP; the engine trains in bf16 or fp32 (train.precision)"),
    ("elasticity", "it rewrites the batch sizes, which must follow train.batch_size and train.micro_batch"),
)


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"train.deepspeed: DeepSpeed config not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{path}: the top level must be an object")
    return data


def zero_stage(ds: dict) -> int:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError("zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in STAGES:
        raise DeepSpeedConfigError(f"zero_optimization.stage: {stage!r} is not one of {', '.join(map(str, STAGES))}")
    return stage


def _fill(ds: dict, key: str, value, why: str):
    cur = ds.get(key, "auto")
    if cur != "auto" and (isinstance(cur, bool) or not isinstance(cur, (int, float)) or cur != value):
        raise DeepSpeedConfigError(f"{key}: {cur!r} in the DeepSpeed config contradicts the run ({why} gives {value}); "
                                   f"set it to \"auto\" or change the run config")
    ds[key] = value  # the run's value and type (a JSON 4.0 becomes 4)


def resolve_ds_config(ds: dict, cfg: RunConfig, world_size: int, device_type: str) -> dict:
    """A complete DeepSpeed config for this run on `world_size` ranks; raises DeepSpeedConfigError naming the key."""
    ds = copy.deepcopy(ds)
    zero_stage(ds)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise DeepSpeedConfigError(f"{key}: not supported here: the engine hands DeepSpeed its own AdamW "
                                       f"(optim.lr, betas, weight_decay); remove the {key!r} section")
    if "fp16" in ds:
        fp16 = ds["fp16"]
        if not isinstance(fp16, dict):
            raise DeepSpeedConfigError(f"fp16 must be an object like {{\"enabled\": false}}, got {fp16!r}")
        if fp16.get("enabled", False) not in (False, "auto"):  # DeepSpeed's default for a present section: off
            raise DeepSpeedConfigError("fp16.enabled: fp16 training is not supported; use bf16 (train.precision=bf16)")
    ds.pop("fp16", None)
    for key, why in _PRECISION_KEYS:
        if key in ds:
            raise DeepSpeedConfigError(f"{key}: not supported here ({why}); remove it")
    if "grad_accum_dtype" in (ds.get("data_types") or {}):
        raise DeepSpeedConfigError("data_types.grad_accum_dtype: not supported here (it swaps in another bf16 "
                                   "optimizer, or fails at ZeRO-0; gradients accumulate in the weights' dtype); "
                                   "remove it")
    zero = ds.get("zero_optimization", {})
    for key, why in (("offload_optimizer", "the engine's client AdamW runs on the GPU"),
                     ("offload_param", "the sharded EMA reads resident partitions"),
                     ("cpu_offload", "DeepSpeed's old name for offload_optimizer"),
                     ("cpu_offload_param", "DeepSpeed's old name for offload_param"),
                     ("cpu_offload_use_pin_memory", "an offload setting; nothing is offloaded here"),
                     ("mics_shard_size", "the sharded EMA gathers over the whole world, not MiCS shard groups")):
        if key in zero:
            raise DeepSpeedConfigError(f"zero_optimization.{key}: not supported here ({why}); remove it")
    if "checkpoint" in ds:
        raise DeepSpeedConfigError("checkpoint: not supported here: the engine's checkpoint API needs DeepSpeed's "
                                   "default synchronous writer to have finished every file before it hashes them")
    if world_size < 1:
        raise DeepSpeedConfigError(f"world size must be >= 1, got {world_size}")
    tc = cfg.train
    global_b = tc.batch_size
    if global_b % world_size:
        raise DeepSpeedConfigError(f"train.batch_size={global_b} does not divide over {world_size} ranks")
    micro = tc.micro_batch or global_b // world_size
    if global_b % (micro * world_size):
        raise DeepSpeedConfigError(
            f"train.micro_batch={micro} x {world_size} ranks does not divide train.batch_size={global_b}: "
            f"the global batch must be micro_batch x gradient_accumulation_steps x world_size")
    accum = global_b // (micro * world_size)
    if ds.get("managed_gradient_accumulation", True) is not True:
        raise DeepSpeedConfigError("managed_gradient_accumulation: only true is supported (false makes DeepSpeed step "
                                   "the optimizer on every micro-batch instead of at the accumulation boundary); "
                                   "remove it")
    _fill(ds, "train_micro_batch_size_per_gpu", micro,
          "train.micro_batch" if tc.micro_batch else "train.batch_size / world size (train.micro_batch 0)")
    _fill(ds, "gradient_accumulation_steps", accum, "train.batch_size / (micro_batch x world_size)")
    _fill(ds, "train_batch_size", global_b, "train.batch_size")
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip")
    if "bfloat16" in ds:
        raise DeepSpeedConfigError("bfloat16: use the \"bf16\" section (its enabled value follows train.precision)")
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if not isinstance(bf16, dict):
        raise DeepSpeedConfigError(f"bf16 must be an object like {{\"enabled\": \"auto\"}}, got {bf16!r}")
    want = tc.precision == "bf16" and device_type == "cuda"
    if bf16.get("enabled", "auto") not in ("auto", want):
        raise DeepSpeedConfigError(f"bf16.enabled: {bf16['enabled']!r} contradicts the run (train.precision="
                                   f"{tc.precision} on {device_type} gives {want}); set it to \"auto\"")
    bf16["enabled"] = want
    ds.setdefault("steps_per_print", 10**9)
    return ds
