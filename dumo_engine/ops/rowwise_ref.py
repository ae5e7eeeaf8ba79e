"""Row-wise ops of a DiT block, pure PyTorch: the reference ("oracle") that the C++ CPU twins, the CUDA kernels
(csrc/) and the Triton kernels (ops/rowwise_triton.py) are tested and benchmarked against. Never copied: tests and
benchmarks import these functions.

Shapes. x is the token stream (N, T, D), contiguous. Per-sample modulation vectors (shift, scale, gate and their
tangents) are (N, D) with a unit last stride (row-strided views such as adaLN(c).chunk(6, dim=1) are fine).
Statistics mean, rstd are (N, T) float32. All math is float32 (float64 inputs stay float64 here, for checks).

Ops (n = (x - mean) * rstd, LayerNorm without affine as in DiT; "sum_t" sums over the T rows of a sample):
  ln_mod_fwd   y = n (1 + scale) + shift                                    -> (y, mean, rstd)
  ln_mod_jvp   n_dot = rstd (x_dot - mean_D(x_dot) - n mean_D(n x_dot))
               y_dot = n_dot (1 + scale) + n scale_dot + shift_dot          -> y_dot
  ln_mod_bwd   g = sum_k gy_k (1 + scale_k)  (k over one or two modulations of the same n: the dual final layer)
               gx = rstd (g - mean_D(g) - n mean_D(g n)); gshift_k = sum_t gy_k; gscale_k = sum_t gy_k n
  ln_dual_fwd  the dual final layer: one normalisation, two modulations     -> (y_v, y_u, mean, rstd)
  gated_fwd    out = x + g h                                                 -> out (dtype of x)
  gated_jvp    out_dot = x_dot + g_dot h + g h_dot                           -> out_dot (float32)
  gated_bwd    gx = gout; gh = gout g; gg = sum_t gout h                      -> (gh, gg)

Dtypes (what every implementation follows): x and gx in the residual dtype; shift/scale/gate, h, y, gh, gshift,
gscale, gg in their own dtypes; tangent streams (x_dot, out_dot) float32; y_dot in `out_dtype`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _f(t: torch.Tensor) -> torch.Tensor:
    """float32 math (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def ln_stats(x: torch.Tensor, eps: float):
    """(mean, rstd) over the last dim, fp32 math (two-pass variance)."""
    xf = _f(x)
    mean = xf.mean(-1)
    var = (xf - mean[..., None]).pow(2).mean(-1)
    return mean, torch.rsqrt(var + eps)


def _norm(x, mean, rstd):
    return (_f(x) - mean[..., None]) * rstd[..., None]


def ln_mod_fwd(x, shift, scale, eps: float = 1e-6, out_dtype=None):
    """(y, mean, rstd); y = LN(x) (1 + scale) + shift in out_dtype (default: shift's dtype)."""
    mean, rstd = ln_stats(x, eps)
    y = _norm(x, mean, rstd) * (1 + _f(scale)[:, None]) + _f(shift)[:, None]
    return y.to(out_dtype or shift.dtype), mean, rstd


def ln_mod_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype=None):
    """y_dot from the saved statistics (out_dtype default: x_dot's dtype)."""
    n = _norm(x, mean, rstd)
    xd = _f(x_dot)
    n_dot = rstd[..., None] * (xd - xd.mean(-1, keepdim=True) - n * (n * xd).mean(-1, keepdim=True))
    y_dot = n_dot * (1 + _f(scale)[:, None]) + n * _f(scale_dot)[:, None] + _f(shift_dot)[:, None]
    return y_dot.to(out_dtype or x_dot.dtype)


def ln_mod_bwd(gys, x, mean, rstd, scales):
    """gys, scales: sequences of one (block) or two (dual final layer) tensors. Returns (gx, [gshift_k], [gscale_k])."""
    n = _norm(x, mean, rstd)
    g = sum(_f(gy) * (1 + _f(s)[:, None]) for gy, s in zip(gys, scales))
    gx = rstd[..., None] * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))
    gshift = [_f(gy).sum(1).to(gy.dtype) for gy in gys]  # y_k, so gy_k, is in shift_k's dtype
    gscale = [(_f(gy) * n).sum(1).to(s.dtype) for gy, s in zip(gys, scales)]
    return gx.to(x.dtype), gshift, gscale


def ln_dual_fwd(x, shift_v, scale_v, shift_u, scale_u, eps: float = 1e-6, out_dtype=None):
    """(y_v, y_u, mean, rstd): the dual final layer's shared normalisation feeding both heads."""
    mean, rstd = ln_stats(x, eps)
    n = _norm(x, mean, rstd)
    y_v = n * (1 + _f(scale_v)[:, None]) + _f(shift_v)[:, None]
    y_u = n * (1 + _f(scale_u)[:, None]) + _f(shift_u)[:, None]
    return y_v.to(out_dtype or shift_v.dtype), y_u.to(out_dtype or shift_u.dtype), mean, rstd


def gated_fwd(x, g, h):
    """out = x + g h, in x's dtype."""
    return (_f(x) + _f(g)[:, None] * _f(h)).to(x.dtype)


def gated_jvp(x_dot, g, g_dot, h, h_dot):
    """out_dot = x_dot + g_dot h + g h_dot, float32 (float64 stays float64)."""
    return _f(x_dot) + _f(g_dot)[:, None] * _f(h) + _f(g)[:, None] * _f(h_dot)


def gated_bwd(gout, g, h):
    """(gh, gg): gh = gout g in h's dtype, gg = sum_t gout h in g's dtype (gx is gout itself)."""
    gf = _f(gout)
    return (gf * _f(g)[:, None]).to(h.dtype), (gf * _f(h)).sum(1).to(g.dtype)


# ---------------------------------------------------------------------------------------------------
# the plain model expressions (what DiTBlock / FinalLayer compute), in the inputs' own dtypes: PyTorch's own precision
# for the tests' 2x rule, differentiable by autograd and torch.func, and the baseline the benchmarks time
# ---------------------------------------------------------------------------------------------------
def model_ln_mod(x, shift, scale, eps: float = 1e-6):
    from ..models.dit import modulate

    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def model_ln_dual(x, shift_v, scale_v, shift_u, scale_u, eps: float = 1e-6):
    from ..models.dit import modulate

    n = F.layer_norm(x, x.shape[-1:], eps=eps)
    return modulate(n, shift_v, scale_v), modulate(n, shift_u, scale_u)


def model_gated(x, g, h):
    return x + g.unsqueeze(1) * h


def model_gated_jvp(x_dot, g, g_dot, h, h_dot):
    return x_dot + g_dot.unsqueeze(1) * h + g.unsqueeze(1) * h_dot


# ---------------------------------------------------------------------------------------------------
# cost model: bytes each op must move (each input read once, each output written once)
# ---------------------------------------------------------------------------------------------------
def rowwise_bytes(op: str, N: int, T: int, D: int, x_size: int, m_size: int, y_size: int | None = None) -> float:
    """Compulsory bytes for one call. x_size: residual/row element size; m_size: modulation/branch element size;
    y_size: output element size where it differs (y of ln_mod_fwd, y_dot of ln_mod_jvp). Tangent streams are fp32."""
    R, y_size = N * T, (m_size if y_size is None else y_size)
    per_row_stats = 8  # mean + rstd, fp32
    if op == "ln_mod_fwd":
        return R * D * (x_size + y_size) + R * per_row_stats + 2 * N * D * m_size
    if op == "ln_mod_jvp":
        return R * D * (x_size + 4 + y_size) + R * per_row_stats + 3 * N * D * m_size
    if op == "ln_mod_bwd":
        return R * D * (m_size + x_size + x_size) + R * per_row_stats + 3 * N * D * m_size
    if op == "ln_dual_fwd":
        return R * D * (x_size + 2 * y_size) + R * per_row_stats + 4 * N * D * m_size
    if op == "ln_dual_bwd":
        return R * D * (2 * m_size + 2 * x_size) + R * per_row_stats + 6 * N * D * m_size
    if op == "gated_fwd":
        return R * D * (x_size + m_size + x_size) + N * D * m_size
    if op == "gated_jvp":
        return R * D * (4 + 2 * m_size + 4) + 2 * N * D * m_size
    if op == "gated_bwd":
        return R * D * (x_size + m_size + m_size) + 2 * N * D * m_size
    raise ValueError(f"unknown row-wise op {op!r}")
