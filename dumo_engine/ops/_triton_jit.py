"""Lazy triton.jit shared by the Triton op modules.

triton.jit picks the interpreter or the compiler when it decorates, so kernels are jitted on first use, keyed by
(module, name, interpreter flag): TRITON_INTERPRET may be set after a module is imported (the CPU tests do that).
"""
from __future__ import annotations

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
