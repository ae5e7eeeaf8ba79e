"""Row-wise ops of a DiT block with their JVP and backward: LayerNorm (no affine) + adaLN modulate, the gated
residual x + g h, and the dual final layer's shared normalisation feeding the v and u modulations.

Layout (Liger-Kernel order): implementations are elsewhere (C++ CPU twins and CUDA kernels in csrc/, bound as
dumo_engine._C; Triton kernels in rowwise_triton.py; the PyTorch reference in rowwise_ref.py, which has the
formulas, shapes, dtypes and the bytes each op must move); here: dispatch, autograd Functions, public functions.

Dispatch, per call, by the tensors' device (DUMO_ROWWISE_IMPL=auto|cuda|cpp|triton|torch forces one):
  CUDA tensors: CUDA extension -> Triton -> PyTorch reference;   CPU tensors: C++ CPU twin -> PyTorch reference.
A fallback (extension not built, float64 inputs, a dtype mix the kernels do not take, ...) warns once, naming the
cause; `last_impl()` says which implementation ran for each op, `implementation(x)` which one would run.

Public functions (all take impl=None for auto):
  layernorm_modulate(x, shift, scale, eps)            -> (y, mean, rstd)      differentiable in x, shift, scale
  layernorm_modulate_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype) -> y_dot   (no grad)
  dual_layernorm_modulate(x, shift_v, scale_v, shift_u, scale_u, eps) -> (y_v, y_u, mean, rstd)
  gated_residual(x, g, h)                             -> x + g h              differentiable in x, g, h
  gated_residual_jvp(x_dot, g, g_dot, h, h_dot)       -> x_dot + g_dot h + g h_dot  (float32, no grad)
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import rowwise_ref as ref

IMPLS = ("cuda", "cpp", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_CUDA_HIDDEN = 4096  # csrc/rowwise.h kMaxHidden

_ext = None
_ext_error: Optional[str] = None
_warned: set = set()
_last: dict = {}


def extension():
    """dumo_engine._C, or None (the reason is in extension_error())."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:  # torch first: the extension links against its libraries
            from .. import _C  # type: ignore[attr-defined]

            _ext = _C
        except Exception as e:  # not built (DUMO_BUILD_EXT=0, source tree without build_ext) or ABI mismatch
            _ext_error = f"dumo_engine._C is not importable ({type(e).__name__}: {e}); build it with `pip install -e .`"
    return _ext


def extension_error() -> Optional[str]:
    extension()
    return _ext_error


def _triton():
    from . import rowwise_triton

    return rowwise_triton if rowwise_triton.available() else None


def last_impl() -> dict:
    """{op name: implementation that ran last}."""
    return dict(_last)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def _kernel_reason(tensors, x_dot_like=()) -> Optional[str]:
    """Why the compiled kernels cannot take these tensors (None: they can)."""
    for t in tensors:
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            return f"dtype {t.dtype} (kernels take float32, bfloat16, float16)"
    for t in x_dot_like:
        if t.dtype != torch.float32:
            return f"tangent stream dtype {t.dtype} (kernels take float32)"
    return None


def implementation(x: torch.Tensor, impl: Optional[str] = None) -> str:
    """The implementation a call on tensors like x would use ("cuda", "cpp", "triton" or "torch")."""
    want = _requested(impl)
    if want not in IMPLS + ("auto",):
        raise ValueError(f"row-wise impl must be one of auto, {', '.join(IMPLS)}; got {want!r}")
    ext = extension()
    if want != "auto":
        if want == "cuda" and not (x.is_cuda and ext is not None and ext.with_cuda()):
            raise RuntimeError("row-wise impl 'cuda' needs CUDA tensors and dumo_engine._C built with CUDA"
                               + (f" ({_ext_error})" if ext is None else ""))
        if want == "cpp" and (x.is_cuda or ext is None):
            raise RuntimeError("row-wise impl 'cpp' needs CPU tensors and dumo_engine._C"
                               + (f" ({_ext_error})" if ext is None else ""))
        if want == "triton" and _triton() is None:
            raise RuntimeError("row-wise impl 'triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1)")
        return want
    if x.is_cuda:
        if ext is not None and ext.with_cuda():
            return "cuda"
        _warn_once("no-cuda-ext", "row-wise ops: CUDA extension unavailable ("
                   + (_ext_error or "dumo_engine._C was built without CUDA") + "); using Triton or PyTorch")
        return "triton" if _triton() is not None else "torch"
    if x.device.type == "cpu":
        if ext is not None:
            return "cpp"
        _warn_once("no-ext", f"row-wise ops: using the PyTorch reference on CPU because {_ext_error}")
    return "torch"


def _requested(impl: Optional[str]) -> str:
    """The implementation asked for: impl, else $DUMO_ROWWISE_IMPL, else "auto" (lower case)."""
    return (impl or os.environ.get("DUMO_ROWWISE_IMPL", "") or "auto").lower()


def _choose(op: str, x: torch.Tensor, impl: Optional[str], tensors, x_dot_like=(), extra_reason=None) -> str:
    chosen = implementation(x, impl)
    if chosen in ("cuda", "cpp", "triton"):
        reason = extra_reason or _kernel_reason(tensors, x_dot_like) or _hidden_reason(x, impl)
        forced = _requested(impl) != "auto"
        if reason is not None and not forced:  # a forced implementation raises its own error naming the problem
            _warn_once(f"{op}:{reason}", f"{op}: PyTorch reference instead of {chosen} because of {reason}")
            chosen = "torch"
    _last[op] = chosen
    return chosen


def _mod_dtype_reason(dtypes) -> Optional[str]:
    dtypes = list(dtypes)
    return None if len(set(dtypes)) == 1 else f"mixed modulation dtypes {sorted(map(str, set(dtypes)))}"


def _hidden_reason(x, impl=None) -> Optional[str]:
    """The CUDA kernels take hidden sizes up to _MAX_CUDA_HIDDEN (every op; the CPU twins and Triton have no such
    limit, so it is a reason only where the CUDA extension would run)."""
    D = x.shape[-1] if x.dim() else 0
    if x.is_cuda and D > _MAX_CUDA_HIDDEN and _requested(impl) == "auto" and implementation(x) == "cuda":
        return f"hidden size {D} > {_MAX_CUDA_HIDDEN}"
    return None


# ---------------------------------------------------------------------------------------------------
# kernel-level calls (no autograd), one per op and implementation
# ---------------------------------------------------------------------------------------------------
def _ln_fwd(x, shifts, scales, eps, impl):
    """(which, [y_k...] + [mean, rstd]) for one or two modulations; y_k in the modulation dtype. The implementation
    that ran is returned, not read back from last_impl(): another thread's call may have replaced it there."""
    op = "ln_mod_fwd" if len(shifts) == 1 else "ln_dual_fwd"
    which = _choose(op, x, impl, [x, *shifts, *scales],
                    extra_reason=_mod_dtype_reason([t.dtype for t in (*shifts, *scales)]))
    if which in ("cuda", "cpp"):
        return which, extension().ln_mod_fwd(x, list(shifts), list(scales), float(eps))
    mod = _triton() if which == "triton" else ref
    if len(shifts) == 1:
        return which, list(mod.ln_mod_fwd(x, shifts[0], scales[0], eps))
    return which, list(mod.ln_dual_fwd(x, shifts[0], scales[0], shifts[1], scales[1], eps))


def _ln_bwd(gys, x, mean, rstd, scales, which):
    gys = [g.contiguous() for g in gys]
    if which in ("cuda", "cpp"):
        out = extension().ln_mod_bwd(gys, x, mean, rstd, list(scales))
        k = len(gys)
        return out[0], out[1:1 + k], out[1 + k:]
    mod = _triton() if which == "triton" else ref
    return mod.ln_mod_bwd(gys, x, mean, rstd, list(scales))


def _gated_bwd(gout, g, h, which):
    gout = gout.contiguous()
    if which in ("cuda", "cpp"):
        gh, gg = extension().gated_bwd(gout, g, h)
        return gh, gg
    mod = _triton() if which == "triton" else ref
    return mod.gated_bwd(gout, g, h)


# ---------------------------------------------------------------------------------------------------
# autograd Functions
# ---------------------------------------------------------------------------------------------------
class _LayerNormModulate(torch.autograd.Function):
    """y_k = LN(x) (1 + scale_k) + shift_k for k < K (K = 1: a block's norm; 2: the dual final layer).
    Inputs flattened as (x, eps, impl, shift_1, scale_1[, shift_2, scale_2]); outputs (y_1[, y_2], mean, rstd)."""

    @staticmethod
    def forward(ctx, x, eps, impl, *mods):
        shifts, scales = list(mods[0::2]), list(mods[1::2])
        ctx.which, out = _ln_fwd(x, shifts, scales, eps, impl)
        ctx.k = len(shifts)
        mean, rstd = out[-2], out[-1]
        ctx.save_for_backward(x, mean, rstd, *scales)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    @once_differentiable  # the kernels' backward builds no graph: a double backward raises instead of dropping terms
    def backward(ctx, *grads):
        x, mean, rstd, *scales = ctx.saved_tensors
        gys = grads[:ctx.k]
        live = [i for i, g in enumerate(gys) if g is not None]
        if not live:
            return (None, None, None) + (None,) * (2 * ctx.k)
        gx, gsh, gsc = _ln_bwd([gys[i] for i in live], x, mean, rstd, [scales[i] for i in live], ctx.which)
        mod_grads = [None] * (2 * ctx.k)
        for j, i in enumerate(live):
            mod_grads[2 * i], mod_grads[2 * i + 1] = gsh[j], gsc[j]
        return (gx, None, None, *mod_grads)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, h, impl):
        which = _choose("gated_fwd", x, impl, [x, g, h],
                        extra_reason=_mod_dtype_reason([g.dtype, h.dtype]))
        if which in ("cuda", "cpp"):
            out = extension().gated_fwd(x, g, h)
        else:
            out = (_triton() if which == "triton" else ref).gated_fwd(x, g, h)
        ctx.which = which
        ctx.save_for_backward(g, h)
        return out

    @staticmethod
    @once_differentiable  # as above (gx = gout would stay differentiable while gg and gh did not)
    def backward(ctx, gout):
        g, h = ctx.saved_tensors
        need_x, need_g, need_h = ctx.needs_input_grad[:3]
        gh = gg = None
        if need_g or need_h:
            gh, gg = _gated_bwd(gout, g, h, ctx.which)
        return (gout if need_x else None), (gg if need_g else None), (gh if need_h else None), None


# ---------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------
def layernorm_modulate(x, shift, scale, eps: float = 1e-6, impl: Optional[str] = None):
    """(y, mean, rstd): y = LN(x) (1 + scale) + shift in shift's dtype; mean/rstd (N, T) float32, no grad."""
    return _LayerNormModulate.apply(x, eps, impl, shift, scale)


def dual_layernorm_modulate(x, shift_v, scale_v, shift_u, scale_u, eps: float = 1e-6, impl: Optional[str] = None):
    """(y_v, y_u, mean, rstd): the dual final layer's one normalisation feeding both heads' modulations."""
    return _LayerNormModulate.apply(x, eps, impl, shift_v, scale_v, shift_u, scale_u)


@torch.no_grad()
def layernorm_modulate_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype=None,
                           impl: Optional[str] = None):
    """y_dot from the saved statistics; out_dtype: float32 (default) or scale's dtype."""
    out_dtype = out_dtype or torch.float32
    reason = (_mod_dtype_reason([scale.dtype, shift_dot.dtype, scale_dot.dtype])
              or (None if out_dtype in (torch.float32, scale.dtype) else f"out_dtype {out_dtype}"))
    which = _choose("ln_mod_jvp", x, impl, [x, scale, shift_dot, scale_dot], [x_dot], extra_reason=reason)
    if which in ("cuda", "cpp"):
        return extension().ln_mod_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype == torch.float32)
    mod = _triton() if which == "triton" else ref
    return mod.ln_mod_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype)


def gated_residual(x, g, h, impl: Optional[str] = None):
    """out = x + g[:, None] h in x's dtype."""
    return _GatedResidual.apply(x, g, h, impl)


@torch.no_grad()
def gated_residual_jvp(x_dot, g, g_dot, h, h_dot, impl: Optional[str] = None):
    """out_dot = x_dot + g_dot h + g h_dot, float32."""
    which = _choose("gated_jvp", x_dot, impl, [g, g_dot, h, h_dot], [x_dot],
                    extra_reason=_mod_dtype_reason([g.dtype, g_dot.dtype, h.dtype, h_dot.dtype]))
    if which in ("cuda", "cpp"):
        return extension().gated_jvp(x_dot, g, g_dot, h, h_dot)
    mod = _triton() if which == "triton" else ref
    return mod.gated_jvp(x_dot, g, g_dot, h, h_dot)
