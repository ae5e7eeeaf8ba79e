"""Lazy triton.jit shared by the Triton op modules.

triton.jit picks the interpreter or the compiler when it decorates, so kernels are jitted on first use, keyed by
(module, name, interpreter flag): TRITON_INTERPRET may be set after a module is imported (the CPU tests do that).
"""
from __future__ import annotations

import contextlib
import os

_CACHE: dict = {}


def interpret() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def jitted(fn):
    """triton.jit(fn), once per (module, name, interpreter flag)."""
    import triton

    key = (fn.__module__, fn.__qualname__, interpret())
    if key not in _CACHE:
        _CACHE[key] = triton.jit(fn)
    return _CACHE[key]


def on_device(t):
    """The context to launch a kernel on tensor t's device in: Triton launches on the *current* CUDA device and its
    current stream, so without it a cuda:1 tensor's kernel would run on device 0's stream (a fault, or no ordering
    with PyTorch's work on cuda:1). Nothing for CPU tensors (the interpreter)."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
