"""Training checkpoints: safetensors + JSON only (nothing is ever unpickled), written atomically.

Layout of run_dir/checkpoints/:
  step_00000100/  model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors  state.json
  latest          one line: the name of the newest complete checkpoint directory

A checkpoint is written to a temporary directory, fsynced, then renamed into place; only then is
`latest` replaced (temp file + os.replace). A process killed at any point leaves the previous
checkpoint complete and `latest` pointing at it. state.json carries the size and sha256 of every
file, so truncation or corruption is reported by name instead of failing deep inside torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .fsio import fsync_dir, write_text_atomic

FORMAT_VERSION = 1
FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or from an incompatible run."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _state_dict_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views: store plain CPU copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            key = f"state.{pid}.{name}"
            if isinstance(val, torch.Tensor):
                tensors[key] = val.detach().to("cpu").contiguous().clone()
            else:
                scalars[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def _cuda_index(device: Optional[torch.device]) -> Optional[int]:
    """The CUDA device index a run trains on (None: not a CUDA run)."""
    if device is None or torch.device(device).type != "cuda":
        return None
    idx = torch.device(device).index
    return torch.cuda.current_device() if idx is None else idx


def rng_state(device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and on a CUDA run the state of the device it trains on ("torch_cuda"): only that
    generator draws for the run, and a resume may see other devices (fewer, or numbered otherwise)."""
    out = {"torch_cpu": torch.get_rng_state()}
    idx = _cuda_index(device)
    if idx is not None:
        out["torch_cuda"] = torch.cuda.get_rng_state(idx)
    return out


def set_rng_state(states: dict[str, torch.Tensor], device: Optional[torch.device] = None) -> None:
    """Restore rng_state's states; the CUDA one into the device this run trains on. A checkpoint written before the
    CUDA state was per run ("torch_cuda_<i>" for every visible device) gives that device's own entry. A CUDA state
    without a CUDA run (or the reverse) is left alone: a change of device is allowed, and not bit-exact."""
    torch.set_rng_state(states["torch_cpu"])
    idx = _cuda_index(device)
    if idx is None:
        return
    state = states.get("torch_cuda", states.get(f"torch_cuda_{idx}"))
    if state is not None:
        torch.cuda.set_rng_state(state, idx)


def restore_rng(states: dict[str, torch.Tensor], device: Optional[torch.device], what: str) -> None:
    """set_rng_state, a state that does not load being a CheckpointError naming `what` (the checkpoint or file)."""
    try:
        set_rng_state(states, device)
    except (KeyError, RuntimeError, TypeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{what}: its RNG state does not load ({e!r})") from None


def step_dirs(root: str) -> list[str]:
    """The names of root's checkpoint directories (step_<digits>), oldest step first (by number: a step past
    99,999,999 has nine digits and would sort first by name)."""
    names = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()]
    return sorted(names, key=lambda d: int(d[5:]))


def stage_dir(run_dir: str, step: int) -> tuple[str, str, str]:
    """(checkpoints root, final name, fresh temporary directory) for checkpoint `step`; debris of a killed save is
    removed first (one writer per run directory: rank 0 under DeepSpeed)."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    for stale in os.listdir(root):
        if stale.startswith(".tmp_"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = os.path.join(root, f".tmp_{name}_{os.getpid()}")
    os.makedirs(tmp)
    return root, name, tmp


def file_record(path: str) -> dict:
    """fsync a written file and return its size and sha256 (what state.json records)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def publish(root: str, name: str, tmp: str, state: dict, keep: int) -> str:
    """Write state.json into tmp, rename tmp to its final name, then point `latest` at it (each step atomic)."""
    final = os.path.join(root, name)
    _write_json_atomic(os.path.join(tmp, "state.json"), state)
    for d, _, _ in sorted(os.walk(tmp), key=lambda w: -w[0].count(os.sep)):  # deepest first: DeepSpeed's shard dirs
        fsync_dir(d)
    old = None
    if os.path.exists(final):  # re-saving a step (after resuming from an older checkpoint): move the old one aside
        old = f"{tmp}_replaced"  # a .tmp_ name: a save killed before the rmtree below leaves it for stage_dir
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    write_text_atomic(os.path.join(root, "latest"), name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep, protect=name)
    return final


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: Optional[dict] = None, keep: int = 2,
                    device: Optional[torch.device] = None) -> str:
    """Write checkpoint `step` atomically; returns its directory. Older ones beyond `keep` are removed. device: the
    one the run trains on (its CUDA generator is saved)."""
    root, name, tmp = stage_dir(run_dir, step)
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    parts = {
        "model.safetensors": _state_dict_tensors(model.state_dict()),
        "ema.safetensors": _state_dict_tensors(ema.state_dict()),
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": rng_state(device),
    }
    files = {}
    for fname, tensors in parts.items():
        path = os.path.join(tmp, fname)
        save_file(tensors, path)
        files[fname] = file_record(path)
    state = {"format": FORMAT_VERSION, "step": step, "files": files, "optimizer": opt_meta, "meta": meta or {}}
    return publish(root, name, tmp, state, keep)


def _prune(root: str, keep: int, protect: str) -> None:
    done = step_dirs(root)
    for d in done[: max(0, len(done) - max(keep, 1))]:
        if d != protect:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def has_checkpoints(run_dir: str) -> bool:
    """Whether run_dir holds any checkpoint directory (complete or not: load_newest_valid decides which loads)."""
    root = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(root) and bool(step_dirs(root))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = os.path.join(run_dir, "checkpoints")
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not text (damaged)") from None
    path = os.path.join(root, name)
    if not name or not os.path.isdir(path):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory")
    return path


def load_newest_valid(run_dir: str) -> tuple[Optional[dict], list[str]]:
    """The newest checkpoint of a run that loads and verifies, falling back to older kept ones.

    Returns (checkpoint or None when the run has none, messages about the ones skipped). Raises
    CheckpointError only when checkpoints exist and none of them is usable.
    """
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None, []
    candidates = step_dirs(root)[::-1]
    problems: list[str] = []
    try:
        pointed = latest_checkpoint(run_dir)
    except CheckpointError as e:
        pointed = None
        problems.append(str(e))
    if pointed is not None:  # the pointer's target first, then the rest newest first
        name = os.path.basename(pointed)
        candidates = [name] + [c for c in candidates if c != name]
    for name in candidates:
        try:
            return load_checkpoint(os.path.join(root, name)), problems
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("no usable checkpoint in " + root + ":\n  " + "\n  ".join(problems))
    return None, []


def verify_files(path: str, state: dict, verify: bool = True) -> None:
    """Every file state.json lists exists with its recorded size (and sha256 when verify)."""
    files = state["files"]  # checked by read_state
    for fname, expect in files.items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} is missing")
        size = os.path.getsize(fpath)
        if size != expect["bytes"]:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {fname} has {size} bytes, expected {expect['bytes']}")
        if verify and _sha256(fpath) != expect["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {fname} fails its sha256 check")


def read_state(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: state.json is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: unknown format {state.get('format') if isinstance(state, dict) else state!r}")
    _check_state(path, state)
    return state


def _check_state(path: str, state: dict) -> None:
    """state.json's fields have the types the loaders use, and its file names stay inside the checkpoint."""
    def bad(what: str):
        return CheckpointError(f"checkpoint {path} is corrupt: state.json {what}")

    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"has no valid step ({step!r})")
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("lists no files")
    for fname, rec in files.items():
        parts = fname.split("/") if isinstance(fname, str) else []
        if not parts or fname.startswith("/") or "\\" in fname or any(q in ("", ".", "..") for q in parts):
            raise bad(f"names a file outside the checkpoint: {fname!r}")
        size = rec.get("bytes") if isinstance(rec, dict) else None
        digest = rec.get("sha256") if isinstance(rec, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str) \
                or len(digest) != 64:
            raise bad(f"has no valid size and sha256 for {fname}: {rec!r}")
    kind = state.get("kind", "local")
    if kind not in ("local", "deepspeed"):
        raise bad(f"has an unknown kind {kind!r}")
    if not isinstance(state.get("meta", {}), dict):
        raise bad("meta is not an object")
    if kind == "local":
        opt = state.get("optimizer")
        if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) \
                or not isinstance(opt.get("scalars"), dict):
            raise bad("has no optimizer param_groups and scalars")


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """Read and verify a checkpoint directory; returns tensors and metadata (no torch objects built).

    A one-process checkpoint gives model, ema, optimizer and rng; a DeepSpeed one (state "kind": "deepspeed") gives
    its consolidated model and ema (what `dumo sample` needs) after every file it lists passed its checks."""
    state = read_state(path)
    kind = state.get("kind", "local")
    required = FILES if kind == "local" else ("model.safetensors", "ema.safetensors")
    for fname in required:
        if fname not in state.get("files", {}):
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} is missing")
    verify_files(path, state, verify)
    out: dict[str, Any] = {"step": state["step"], "meta": state.get("meta", {}), "path": path, "kind": kind,
                           "state": state}
    for fname in required:
        try:
            out[fname.split(".")[0]] = load_file(os.path.join(path, fname), device="cpu")
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {fname} ({e})") from None
    if kind == "local":
        try:
            out["optimizer"] = optimizer_from_flat(out["optimizer"], state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: its optimizer state does not parse ({e!r})") from None
    return out


def restore(ckpt: dict, model: torch.nn.Module, ema: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
            device: Optional[torch.device] = None) -> int:
    """Load a checkpoint read by load_checkpoint into live objects (and the RNG: the CUDA one into device's);
    returns its step."""
    if ckpt.get("kind", "local") != "local":
        st = ckpt.get("state", {})
        raise CheckpointError(f"checkpoint {ckpt['path']} was written by a DeepSpeed run (ZeRO-{st.get('zero_stage')}, "
                              f"{st.get('world_size')} ranks): resume it with train.deepspeed on as many ranks "
                              "(its model and ema weights load anywhere, e.g. dumo sample)")
    for name, module in (("model", model), ("ema", ema)):
        try:
            module.load_state_dict(ckpt[name], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {ckpt['path']}: {name} weights do not fit this model: {e}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt['path']}: optimizer state does not fit: {e}") from None
    restore_rng(ckpt["rng"], device, f"checkpoint {ckpt['path']}")
    return int(ckpt["step"])
