"""DeepSpeed checkpoints through the engine's checkpoint API (checkpoint.py): same directory, atomic rename,
`latest` pointer, size + sha256 of every file in state.json, and consolidated weights any one process can load.

  checkpoints/step_00000100/
    model.safetensors  ema.safetensors     consolidated fp32 weights (rank 0): `dumo sample` / `dumo eval` load these
    deepspeed/ds/...                       DeepSpeed's own shards (module + ZeRO optimizer partitions, every rank)
    ema_shard_rank00000.safetensors ...    ZeRO 1-3: each rank's EMA partition (exact resume without a gather)
    rng_rank00000.safetensors ...          each rank's RNG state
    state.json                             {"kind": "deepspeed", "zero_stage", "world_size", "step", "files": ...}

All ranks write into one temporary directory (shared filesystem across nodes, as DeepSpeed requires); after a
barrier each rank fsyncs and hashes its share of the files, and rank 0 renames the directory into place and moves
`latest` (a failure there is raised on every rank, so none waits in a collective). A save killed at any point leaves
the previous checkpoint and pointer intact. Before a resume reads anything, every file's sha256 must match state.json
(truncation and corruption are reported by name). DeepSpeed writes its shards with torch.save; on resume its loader is
made to read them with torch.load(weights_only=True), which builds tensors and plain data only, with three of
DeepSpeed's own plain classes allowed (its loss scaler's settings, the ZeRO stage enum, a fragment's address: what
its ZeRO 0-3 shards hold, bf16 or fp32). No other object is built: a shard holding any other object (code to run, as
a crafted file would) is refused with a CheckpointError naming the file, so a run directory someone else could write
(state.json included) cannot run code in the resuming process.
Resuming needs the same ZeRO stage and world size (DeepSpeed's partitions are per rank).
"""
from __future__ import annotations

import contextlib
import os
import pickle
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import checkpoint as ckpt_io
from ..checkpoint import CheckpointError

DS_DIR, DS_TAG = "deepspeed", "ds"


def _rank_file(kind: str, rank: int) -> str:
    return f"{kind}_rank{rank:05d}.safetensors"


def save_ds_checkpoint(run_dir: str, step: int, backend, meta: Optional[dict] = None, keep: int = 2) -> Optional[str]:
    """Collective: every rank calls it. Returns the checkpoint directory on rank 0, None elsewhere."""
    rank = backend.rank
    root, name, tmp = backend.on_main(lambda: ckpt_io.stage_dir(run_dir, step))  # paths broadcast to every rank
    backend.engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG, client_state={"dumo_step": step},
                                   save_latest=False)
    model_sd, ema_sd = backend.full_state_dicts()  # collective gather to rank 0
    if backend.stage > 0:  # the EMA is partitioned like the optimizer state
        save_file(backend.ema.shard_tensors(), os.path.join(tmp, _rank_file("ema_shard", rank)))
    save_file(ckpt_io.rng_state(backend.device), os.path.join(tmp, _rank_file("rng", rank)))
    if backend.is_main:
        save_file(model_sd, os.path.join(tmp, "model.safetensors"))
        save_file(ema_sd, os.path.join(tmp, "ema.safetensors"))
    backend.barrier()
    # every rank fsyncs and hashes its share of the files (in parallel); rank 0 collects the records and publishes
    paths = sorted(os.path.join(d, f) for d, _, names in os.walk(tmp) for f in names)
    mine = {os.path.relpath(p, tmp): ckpt_io.file_record(p) for p in paths[rank::backend.world_size]}
    shares = [None] * backend.world_size
    dist.all_gather_object(shares, mine)
    files = {k: v for share in shares for k, v in sorted(share.items())}
    state = {"format": ckpt_io.FORMAT_VERSION, "kind": "deepspeed", "step": step, "files": files,
             "zero_stage": backend.stage, "world_size": backend.world_size, "micro_batch": backend.micro,
             "meta": meta or {}}
    final = backend.on_main(lambda: ckpt_io.publish(root, name, tmp, state, keep))
    return final if backend.is_main else None


def _deepspeed_safe_globals() -> list:
    """The non-torch classes DeepSpeed 0.19's ZeRO 0-3 shards hold (found by loading every stage's shards, bf16 and
    fp32, with weights_only=True): plain data, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_shard(path: str, map_location=None):
    """torch.load of one DeepSpeed shard with weights_only=True (tensors, plain data and _deepspeed_safe_globals);
    a file holding anything else raises CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint shard {path} holds objects other than tensors and plain data; refused "
                              f"(nothing in it was run): {_unpickler_reason(e)}") from None


def _unpickler_reason(e: Exception) -> str:
    """What torch's weights-only unpickler refused, its first sentence (the rest of torch's message suggests
    weights_only=False or allowlisting the object: not repeated here)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = [ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln]
    first = (found or [ln for ln in lines if "weights_only" not in ln] or ["an object it does not allow"])[0]
    return first.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def weights_only_loads(engine):
    """Within: DeepSpeed's checkpoint engine reads every shard through load_shard (its own load passes
    weights_only=False)."""
    ce = engine.checkpoint_engine
    if ce is None or not callable(getattr(ce, "load", None)):
        raise CheckpointError(f"DeepSpeed engine has no checkpoint engine to load through ({ce!r})")
    ce.load = load_shard  # an instance attribute: shadows the class's method
    try:
        yield
    finally:
        del ce.load


def resume_ds_checkpoint(run_dir: str, backend, check=None) -> tuple[int, Optional[str], list[str]]:
    """Collective. (step, path, skipped-damaged messages): the newest checkpoint that passes every check (rank 0
    verifies, all ranks load, after check(path, state), which raises on a mismatch, on every rank); (0, None, ...)
    when there is none."""
    def newest():
        ck, skipped = ckpt_io.load_newest_valid(run_dir)
        return None if ck is None else ck["path"], skipped

    path, skipped = backend.on_main(newest)
    if path is None:
        return 0, None, skipped
    state = ckpt_io.read_state(path)
    if state.get("kind") != "deepspeed":
        raise CheckpointError(f"checkpoint {path} was written by a one-process run; resume it without train.deepspeed, "
                              "or start the DeepSpeed run in a fresh train.out_dir")
    if check is not None:
        check(path, state)
    for key, have in (("zero_stage", backend.stage), ("world_size", backend.world_size)):
        if state.get(key) != have:
            raise CheckpointError(f"checkpoint {path} has {key}={state.get(key)} but this run has {have}: DeepSpeed's "
                                  "partitions are per rank; resume with the same ZeRO stage and number of ranks")
    if "micro_batch" in state and state["micro_batch"] != backend.micro:  # recorded since it is checked
        raise CheckpointError(f"checkpoint {path} was trained with a per-rank micro-batch of {state['micro_batch']} "
                              f"(train.micro_batch) but this run has {backend.micro}: other accumulation steps sum "
                              "the gradients in another order, so the resume would not continue the run bit for bit; "
                              "set train.micro_batch back, or train into a new train.out_dir")
    with weights_only_loads(backend.engine):
        load_path, _ = backend.engine.load_checkpoint(os.path.join(path, DS_DIR), tag=DS_TAG,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load {DS_DIR}/{DS_TAG}")
    ema_file = _rank_file("ema_shard", backend.rank) if backend.stage > 0 else "ema.safetensors"
    backend.ema.load_shards(load_file(os.path.join(path, ema_file)))
    rng_file = _rank_file("rng", backend.rank)
    ckpt_io.restore_rng(load_file(os.path.join(path, rng_file)), backend.device, f"checkpoint {path}: {rng_file}")
    return int(state["step"]), path, skipped
