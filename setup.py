"""Builds the C++/CUDA extension dumo_engine._C (csrc/); all other metadata is in pyproject.toml.

- Always: the C++ CPU twins (CppExtension), so the same code path is tested on machines without a GPU.
- When torch is a CUDA build and nvcc is found (CUDA_HOME): a CUDAExtension that also compiles csrc/*.cu, for
  TORCH_CUDA_ARCH_LIST (default "8.0;9.0a": A100 and H100/H200).
- DUMO_BUILD_EXT=0 skips the extension (the package then runs its Triton/PyTorch paths and says so);
  DUMO_BUILD_CUDA=0 builds the CPU twins only even where CUDA is available.
The package imports without the extension: dumo_engine.ops.rowwise falls back with one warning naming the cause.
"""
import glob
import os

from setuptools import setup


def ext_modules_and_cmdclass():
    if os.environ.get("DUMO_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch's headers ask for
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("DUMO_BUILD_CUDA", "1") != "0")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cu = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "*.cu")))
        ext = CUDAExtension(
            "dumo_engine._C", sources + cu,
            define_macros=[("DUMO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("dumo_engine._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
