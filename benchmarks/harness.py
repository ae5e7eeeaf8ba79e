"""Shared benchmark harness (STYLE.md habit 6).

  timing = measure(fn, warmup=3, iters=20)      # fn runs the work once; CUDA is synchronised around it
  row = Row(op="attention_jvp", shape="B32 H16 N256 D72", dtype="bf16", impl="triton", timing=timing,
            flops=..., bytes_moved=..., ref_ms=...)
  emit([row, ...], out="benchmarks/out/attention_jvp.jsonl")   # prints a markdown table, appends JSONL

Each row: op | shape | dtype | impl | ms (median, p20-p80) | TFLOP/s or GB/s | speedup vs reference, with
device, date and commit. Nothing here asserts a time.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import time
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "unknown"


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    iters: int


def pin_cpu_allocator() -> Optional[str]:
    """glibc malloc: keep freed memory in the process (mmap threshold 32 MiB, its maximum; trim threshold 1 GiB).
    With glibc's dynamic thresholds, whether a freed output of a few MiB goes back to the OS -- to be faulted in again,
    page by page, on the next call -- depends on the allocation history: the C++ dual forward at XL/2 rows took 1.2 or
    7-8.6 ms (4,710 minor faults per call) by which ops ran before it, and PyTorch's reference moved by 2x the same
    way. Pinned, CPU op timings do not depend on what ran before. Returns a label for the device line (None: not
    glibc, nothing changed)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return None
    return "glibc malloc pinned (mmap threshold 32 MiB, trim 1 GiB)" if ok else None


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], warmup: int = 3, iters: int = 20, device_type: Optional[str] = None) -> Timing:
    """Median and p20/p80 wall time of fn() over `iters` runs after `warmup` runs."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    _sync(device_type)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device_type)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def q(p: float) -> float:
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return Timing(q(0.5), q(0.2), q(0.8), iters)


def measure_events(fn: Callable[[], object], warmup: int = 5, iters: int = 50) -> Timing:
    """CUDA: median and p20/p80 of per-call device time from CUDA events (no host sync inside the timed region;
    for kernels of tens of microseconds, where a host timer would add the launch and sync latency)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in pairs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in pairs)

    def q(p: float) -> float:
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return Timing(q(0.5), q(0.2), q(0.8), iters)


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    timing: Timing
    flops: float = 0.0  # per call
    bytes_moved: float = 0.0  # per call
    ref_ms: Optional[float] = None  # the reference implementation's median, for the speedup column
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. img/s, peak memory, MFU

    def cells(self) -> list[str]:
        t = self.timing
        rate = ""
        if self.flops:
            rate = f"{self.flops / (t.median_ms * 1e-3) / 1e12:.3f} TFLOP/s"
        elif self.bytes_moved:
            rate = f"{self.bytes_moved / (t.median_ms * 1e-3) / 1e9:.1f} GB/s"
        speed = f"{self.ref_ms / t.median_ms:.2f}x" if self.ref_ms else ""
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.extra.items())
        return [self.op, self.shape, self.dtype, self.impl, f"{t.median_ms:.3f} ({t.p20_ms:.3f}-{t.p80_ms:.3f})",
                rate, speed, extra]


HEADER = ["op", "shape", "dtype", "impl", "ms median (p20-p80)", "rate", "speedup vs ref", "notes"]


def emit(rows: list[Row], out: Optional[str] = None, device: Optional[str] = None, command: str = "") -> str:
    """Print rows as a markdown table with device/date/commit; append them as JSONL to `out`."""
    meta = {"device": device or device_name(), "date": datetime.date.today().isoformat(), "commit": commit(),
            "torch": torch.__version__, "command": command}
    lines = [f"device: {meta['device']} | date: {meta['date']} | commit: {meta['commit']} | torch {meta['torch']}",
             f"command: {command}" if command else "", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    text = "\n".join(ln for ln in lines if ln is not None)
    print(text, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            for r in rows:
                d = dataclasses.asdict(r)
                f.write(json.dumps({**meta, **d}) + "\n")
    return text


def peak_memory_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
