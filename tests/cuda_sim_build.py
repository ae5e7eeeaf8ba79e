"""Builds the CUDA emulator extension for tests (csrc/sim): dumo_engine._C's glue (rowwise.cpp, bindings.cpp), CUDA
launchers and kernels (the three .cu files, included by csrc/sim/sim_*.cpp) compiled as host C++ with -DDUMO_CUDA_SIM
against csrc/sim/cuda_sim.h, so that every op runs the CUDA code path on CPU tensors. It needs only the CUDA
runtime's headers (for the bf16/fp16 types and the runtime declarations), never a GPU or libcudart.

  python tests/cuda_sim_build.py      # build (or reuse) it and print where
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "dumo_cuda_sim"
HEADERS = ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h")


def _nvcc_include_dirs() -> list[str]:
    """The include directories nvcc itself uses (`nvcc -dryrun` prints them), when nvcc is on PATH."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return []
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r'-I"?([^"\s]+)"?', out.stdout + out.stderr)


def cuda_include_dir() -> str | None:
    """A directory with the CUDA runtime headers: $CUDA_HOME / $CUDA_PATH, nvcc's own include path, or the copy
    that the triton wheel ships (triton/backends/nvidia/include)."""
    cands = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += _nvcc_include_dirs()
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include"))
    except ImportError:
        pass
    for d in cands:
        if all(os.path.isfile(os.path.join(d, h)) for h in HEADERS):
            return d
    return None


def build(verbose: bool = False):
    """Build (or load the cached build of) the emulator extension; returns the module. Raises RuntimeError naming
    what is missing."""
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("no CUDA runtime headers found (set CUDA_HOME, put nvcc on PATH, or install triton, whose "
                           f"wheel ships them): need {', '.join(HEADERS)}")
    from torch.utils.cpp_extension import load

    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.join(csrc, f) for f in ("rowwise.cpp", "bindings.cpp", "rowwise_cpu.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "sim", "*.cpp")))
    build_dir = os.path.join(ROOT, "build", NAME)
    os.makedirs(build_dir, exist_ok=True)
    return load(name=NAME, sources=sources, build_directory=build_dir, verbose=verbose,
                extra_include_paths=[csrc, inc],
                extra_cflags=["-O1", "-fno-strict-aliasing", "-fopenmp", "-DDUMO_CUDA_SIM", "-DDUMO_WITH_CUDA"],
                extra_ldflags=["-fopenmp"])


if __name__ == "__main__":
    m = build(verbose="-v" in sys.argv)
    print(m.__file__)
