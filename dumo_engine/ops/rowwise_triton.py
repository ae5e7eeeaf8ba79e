"""Row-wise ops of a DiT block as Triton kernels: LayerNorm + adaLN modulation (forward, JVP, backward, the dual
final layer) and the gated residual (forward, JVP, backward). Same names, signatures, math and dtypes as the
PyTorch reference dumo_engine/ops/rowwise_ref.py (the oracle the tests compare against); see its docstring for the
formulas. All math is float32 whatever the storage dtypes (float32, bfloat16, float16, mixed freely).

Layout. Token streams x, x_dot, gy, gout, h, h_dot are (N, T, D) contiguous; per-sample vectors (shift, scale,
gate and their tangents) are (N, D) with a unit last stride and any row stride (views such as
adaLN(c).chunk(6, dim=1) are read in place: the row stride goes to the kernel); mean, rstd are (N, T) float32.
Grid (row tiles, N): a program handles BLOCK_R rows of one sample as a (BLOCK_R, BLOCK_D) register tile,
BLOCK_D = next_power_of_2(D) with masks, so per-sample vectors are loaded once per program and a row's
statistics come from the row in registers (two-pass mean/variance, not E[x^2] - E[x]^2). num_warps from BLOCK_D:
4 up to 1024, 8 up to 4096, 16 above. Small D packs several rows per program (up to 4096 elements per tile).

Backward column sums (gshift_k, gscale_k = sum_t gy_k n, gg = sum_t gout h) are deterministic, without atomics:
a program loops over TILE_T rows of one sample (BLOCK_R at a time), writes gx / gh for them in the same pass
(one read of gy, x / gout, h) and its fp32 column partials to a buffer (S, N, n_tiles, D); a second small kernel
(_colsum_kernel, one launch for all S sums) adds the n_tiles partials in a fixed order and writes each sum in its
output dtype. TILE_T grows (up to 64 rows) while the grid keeps at least ~512 programs (H100 sweep: fewer,
longer tiles beat more programs; the partials' traffic matters more than occupancy).

Cost: bandwidth-bound, one read of each input and one write of each output (rowwise_ref.rowwise_bytes), plus
the backward's partials (2 fp32 values per column per output per TILE_T rows). Element-wise FLOPs are negligible.
Measured on one H100 (triton 3.6, T = 256, N = 64 and 256, D = 384 / 1000 / 1152, bf16 or fp32 residual with bf16
modulation; CUDA-graph timing, median), as compulsory bytes / time: forward, JVP and gated ops 2.1-3.0 TB/s,
ln_mod_bwd 1.5-2.4, the dual backward 1.4-2.0, gated_bwd 2.0-2.8; 5-25x faster than the eager PyTorch reference.
Host overhead is 35-130 us a call (mostly Triton's Python launcher; the backward launches two kernels): at small
shapes use CUDA graphs or torch.compile around it.

Dispatch: CUDA tensors, or any tensors under TRITON_INTERPRET=1 (Triton's CPU interpreter, used by the CPU
tests; its float32 -> bfloat16 store truncates, so there bf16 outputs are staged in fp32 and rounded by torch).
available(x) says whether a call can run; otherwise the functions raise. float64 is rejected (the reference keeps
float64 for checks; these kernels are float32-math only).
"""
# kernel annotations stay strings: the module imports without triton
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _triton_jit
from ._triton_jit import interpret, jitted

try:  # optional dependency: pip install 'dumo-engine[triton]'
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (ImportError, or a broken install)
    triton = None
    tl = None

__all__ = ["available", "gated_bwd", "gated_fwd", "gated_jvp", "ln_dual_fwd", "ln_mod_bwd", "ln_mod_fwd",
           "ln_mod_jvp"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_D = 32768  # a row lives in registers: 16 warps x 32 lanes x 64 fp32 values
_TILE_ELEMS = 4096  # row kernels: elements of one (BLOCK_R, BLOCK_D) tile when D is small (H100 sweep)
_BWD_TILE_ELEMS = 1024  # backward: smaller tiles, it keeps up to four (BLOCK_R, BLOCK_D) fp32 accumulators
_BWD_MIN_PROGRAMS = 512  # backward: TILE_T doubles only while the grid keeps this many programs
_BWD_MAX_TILE_T = 64


# ---------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, jitted lazily by _jitted). Grid (row tiles, N); n = program_id(1).
# ---------------------------------------------------------------------------------------------------
# mean = sum_d x / D;  var = sum_d (x - mean)^2 / D (two-pass, row in registers);  rstd = 1 / sqrt(var + eps)
# n = (x - mean) rstd;  y_k = n (1 + scale_k) + shift_k   (k = 1, or k = 1, 2 for the dual final layer)
def _ln_fwd_kernel(
    X, Y1, Y2, MEAN, RSTD, SH1, SC1, SH2, SC2,
    s_sh1, s_sc1, s_sh2, s_sc2, T, D, eps,
    DUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)  # n * a row stride may pass 2^31 (4c7f9bb's attention bug)
    offs_t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask = mask_t[:, None] & mask_d[None, :]
    rows = n.to(tl.int64) * T + offs_t
    offs = rows[:, None] * D + offs_d[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    nrm = xc * rstd[:, None]
    tl.store(MEAN + rows, mean, mask=mask_t)
    tl.store(RSTD + rows, rstd, mask=mask_t)

    sh = tl.load(SH1 + n * s_sh1 + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sc = tl.load(SC1 + n * s_sc1 + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    y = nrm * (1.0 + sc[None, :]) + sh[None, :]
    tl.store(Y1 + offs, y.to(Y1.dtype.element_ty), mask=mask)
    if DUAL:
        sh2 = tl.load(SH2 + n * s_sh2 + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        sc2 = tl.load(SC2 + n * s_sc2 + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y2 = nrm * (1.0 + sc2[None, :]) + sh2[None, :]
        tl.store(Y2 + offs, y2.to(Y2.dtype.element_ty), mask=mask)


# n = (x - mean) rstd (saved statistics);  n_dot = rstd (x_dot - mean_D(x_dot) - n mean_D(n x_dot))
# y_dot = n_dot (1 + scale) + n scale_dot + shift_dot
def _ln_jvp_kernel(
    X, XD, MEAN, RSTD, SC, SHD, SCD, YD,
    s_mn, s_mt, s_rn, s_rt, s_sc, s_shd, s_scd, T, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)  # n * a row stride may pass 2^31 (4c7f9bb's attention bug)
    offs_t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask = mask_t[:, None] & mask_d[None, :]
    rows = n.to(tl.int64) * T + offs_t
    offs = rows[:, None] * D + offs_d[None, :]

    mean = tl.load(MEAN + n * s_mn + offs_t * s_mt, mask=mask_t, other=0.0)
    rstd = tl.load(RSTD + n * s_rn + offs_t * s_rt, mask=mask_t, other=0.0)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xd = tl.load(XD + offs, mask=mask, other=0.0).to(tl.float32)
    nrm = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    m_xd = tl.sum(xd, axis=1) / D
    m_nxd = tl.sum(nrm * xd, axis=1) / D
    n_dot = rstd[:, None] * (xd - m_xd[:, None] - nrm * m_nxd[:, None])

    sc = tl.load(SC + n * s_sc + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    shd = tl.load(SHD + n * s_shd + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    scd = tl.load(SCD + n * s_scd + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    yd = n_dot * (1.0 + sc[None, :]) + nrm * scd[None, :] + shd[None, :]
    tl.store(YD + offs, yd.to(YD.dtype.element_ty), mask=mask)


# n = (x - mean) rstd;  g = sum_k gy_k (1 + scale_k);  gx = rstd (g - mean_D(g) - n mean_D(g n))
# column partials over this program's TILE_T rows t of sample n (finished by a fixed-order sum over tiles):
#   PART[2k] = sum_t gy_k  (-> gshift_k),   PART[2k+1] = sum_t gy_k n  (-> gscale_k)
def _ln_bwd_kernel(
    GY1, GY2, X, MEAN, RSTD, SC1, SC2, GX, PART,
    s_mn, s_mt, s_rn, s_rt, s_sc1, s_sc2, s_ps, n_tiles, T, D,
    DUAL: tl.constexpr, TILE_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)  # n * a row stride may pass 2^31 (4c7f9bb's attention bug)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    sc1 = tl.load(SC1 + n * s_sc1 + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sc2 = tl.load(SC2 + n * s_sc2 + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # SC2 is SC1 unless DUAL
    acc_sh1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_sc1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_sh2 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_sc2 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in tl.range(0, TILE_T, BLOCK_R):
        offs_t = tile * TILE_T + r0 + tl.arange(0, BLOCK_R)
        mask_t = offs_t < T
        mask = mask_t[:, None] & mask_d[None, :]
        rows = n.to(tl.int64) * T + offs_t
        offs = rows[:, None] * D + offs_d[None, :]

        mean = tl.load(MEAN + n * s_mn + offs_t * s_mt, mask=mask_t, other=0.0)
        rstd = tl.load(RSTD + n * s_rn + offs_t * s_rt, mask=mask_t, other=0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        nrm = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        gy1 = tl.load(GY1 + offs, mask=mask, other=0.0).to(tl.float32)
        g = gy1 * (1.0 + sc1[None, :])
        acc_sh1 += gy1
        acc_sc1 += gy1 * nrm
        if DUAL:
            gy2 = tl.load(GY2 + offs, mask=mask, other=0.0).to(tl.float32)
            g += gy2 * (1.0 + sc2[None, :])
            acc_sh2 += gy2
            acc_sc2 += gy2 * nrm
        m_g = tl.sum(g, axis=1) / D
        m_gn = tl.sum(g * nrm, axis=1) / D
        gx = rstd[:, None] * (g - m_g[:, None] - nrm * m_gn[:, None])
        tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=mask)

    part = PART + (n.to(tl.int64) * n_tiles + tile) * D + offs_d
    tl.store(part, tl.sum(acc_sh1, axis=0), mask=mask_d)
    tl.store(part + s_ps, tl.sum(acc_sc1, axis=0), mask=mask_d)
    if DUAL:
        tl.store(part + 2 * s_ps, tl.sum(acc_sh2, axis=0), mask=mask_d)
        tl.store(part + 3 * s_ps, tl.sum(acc_sc2, axis=0), mask=mask_d)


# out = x + g h   (in x's dtype)
def _gated_fwd_kernel(
    X, G, H, OUT, s_g, T, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)  # n * a row stride may pass 2^31 (4c7f9bb's attention bug)
    offs_t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < T)[:, None] & mask_d[None, :]
    offs = (n.to(tl.int64) * T + offs_t)[:, None] * D + offs_d[None, :]
    g = tl.load(G + n * s_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    out = x + g[None, :] * h
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


# out_dot = x_dot + g_dot h + g h_dot   (float32)
def _gated_jvp_kernel(
    XD, G, GD, H, HD, OUT, s_g, s_gd, T, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)  # n * a row stride may pass 2^31 (4c7f9bb's attention bug)
    offs_t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < T)[:, None] & mask_d[None, :]
    offs = (n.to(tl.int64) * T + offs_t)[:, None] * D + offs_d[None, :]
    g = tl.load(G + n * s_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    gd = tl.load(GD + n * s_gd + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    xd = tl.load(XD + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    hd = tl.load(HD + offs, mask=mask, other=0.0).to(tl.float32)
    out = xd + gd[None, :] * h + g[None, :] * hd
    tl.store(OUT + offs, out, mask=mask)


# gh = gout g  (h's dtype);  column partials over this program's TILE_T rows: PART = sum_t gout h  (-> gg)
def _gated_bwd_kernel(
    GOUT, G, H, GH, PART, s_g, n_tiles, T, D,
    TILE_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)  # n * a row stride may pass 2^31 (4c7f9bb's attention bug)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    g = tl.load(G + n * s_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in tl.range(0, TILE_T, BLOCK_R):
        offs_t = tile * TILE_T + r0 + tl.arange(0, BLOCK_R)
        mask = (offs_t < T)[:, None] & mask_d[None, :]
        offs = (n.to(tl.int64) * T + offs_t)[:, None] * D + offs_d[None, :]
        go = tl.load(GOUT + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(GH + offs, (go * g[None, :]).to(GH.dtype.element_ty), mask=mask)
        acc += go * h
    part = PART + (n.to(tl.int64) * n_tiles + tile) * D + offs_d
    tl.store(part, tl.sum(acc, axis=0), mask=mask_d)


# OUT[s, n, d] = sum_tile PART[s, n, tile, d] in OUT's dtype: the backward's column sums finished in a fixed order
# (a (BLOCK_T, BLOCK_C) tile per step, then a tree sum over BLOCK_T): deterministic, no atomics
def _colsum_kernel(
    PART, OUT, n_tiles, D,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)  # s * N + n
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    mask_c = offs_c < D
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        mask = ((t0 + offs_t) < n_tiles)[:, None] & mask_c[None, :]
        acc += tl.load(PART + (row * n_tiles + t0 + offs_t)[:, None] * D + offs_c[None, :], mask=mask, other=0.0)
    tl.store(OUT + row * D + offs_c, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=mask_c)


# ---------------------------------------------------------------------------------------------------
# host side: jitting, block configs, checks
# ---------------------------------------------------------------------------------------------------
# kernels are jitted lazily (TRITON_INTERPRET may be set after import): see _triton_jit.py
_interpret, _jitted = interpret, jitted


def _cdiv(a: int, b: int) -> int:  # plain Python: triton.cdiv is a constexpr_function, slow to call on the host
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def available(x: torch.Tensor | None = None) -> bool:
    """True when the kernels can run: triton importable and (x on CUDA, or TRITON_INTERPRET=1). Without x: a
    CUDA device exists or the interpreter is on."""
    if triton is None:
        return False
    if _interpret():
        return True
    return x.is_cuda if x is not None else torch.cuda.is_available()


def _small_blocks() -> bool:
    """Under the interpreter small tiles keep CPU tests fast and exercise several tiles and the tail masks."""
    return _interpret()


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)


def _row_config(T: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, num_warps) of the per-row kernels (forward, JVP)."""
    block_d = _next_pow2(D)
    if _small_blocks():
        return block_d, 4, 1
    block_r = max(1, min(16, _TILE_ELEMS // block_d, _next_pow2(T)))
    return block_d, block_r, _num_warps(block_d)


def _bwd_config(N: int, T: int, D: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_D, BLOCK_R, TILE_T, n_tiles, num_warps) of the backward kernels."""
    block_d = _next_pow2(D)
    if _small_blocks():
        block_r, tile_t = 2, 4
    else:
        block_r = max(1, min(8, _BWD_TILE_ELEMS // block_d, _next_pow2(T)))
        tile_t = block_r
        while (tile_t < _BWD_MAX_TILE_T and tile_t < T
               and N * _cdiv(T, 2 * tile_t) >= _BWD_MIN_PROGRAMS):
            tile_t *= 2
    return block_d, block_r, tile_t, _cdiv(T, tile_t), _num_warps(block_d)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rowwise_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"rowwise_triton: {name} has unsupported dtype {t.dtype} "
                        f"(supported: float32, bfloat16, float16)")


def _check_stream(name: str, t, like: torch.Tensor | None = None) -> tuple[int, int, int]:
    """A token stream: (N, T, D), contiguous, same shape and device as `like`."""
    _check_tensor(name, t)
    if t.dim() != 3:
        raise ValueError(f"rowwise_triton: {name} must be (N, T, D), got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"rowwise_triton: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        _check_device(name, t, like)
    if not t.is_contiguous():
        raise ValueError(f"rowwise_triton: {name} must be contiguous (N, T, D); got strides {t.stride()}")
    N, T, D = t.shape
    if D == 0:
        raise ValueError(f"rowwise_triton: {name} has D = 0")
    if D > _MAX_D:
        raise ValueError(f"rowwise_triton: {name} has D = {D} > {_MAX_D} (a row must fit in registers)")
    return N, T, D


def _check_vec(name: str, v, like: torch.Tensor) -> None:
    """A per-sample vector: (N, D) with unit last stride, any row stride."""
    _check_tensor(name, v)
    N, _, D = like.shape
    if v.dim() != 2 or tuple(v.shape) != (N, D):
        raise ValueError(f"rowwise_triton: {name} must be (N, D) = {(N, D)}, got shape {tuple(v.shape)}")
    if D > 1 and v.stride(1) != 1:
        raise ValueError(f"rowwise_triton: {name} must have a unit last stride, got strides {v.stride()}")
    _check_device(name, v, like)


def _check_stats(name: str, s, like: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"rowwise_triton: {name} must be a torch.Tensor, got {type(s).__name__}")
    if s.dtype != torch.float32:
        raise TypeError(f"rowwise_triton: {name} must be float32 (saved statistics), got {s.dtype}")
    if tuple(s.shape) != tuple(like.shape[:2]):
        raise ValueError(f"rowwise_triton: {name} must be (N, T) = {tuple(like.shape[:2])}, "
                         f"got shape {tuple(s.shape)}")
    _check_device(name, s, like)


def _check_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"rowwise_triton: {name} is on {t.device} but x is on {like.device}")


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"rowwise_triton: out_dtype {out_dtype} is unsupported (supported: float32, bfloat16, "
                        f"float16)")
    return out_dtype


def _check_backend(x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("rowwise_triton: triton is not importable (pip install 'dumo-engine[triton]'); "
                           "use dumo_engine.ops.rowwise_ref")
    if not x.is_cuda and not _interpret():
        raise RuntimeError(f"rowwise_triton: x is a {x.device.type} tensor; the kernels need CUDA tensors or "
                           f"TRITON_INTERPRET=1")


_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the kernels put samples (S * N for the column sums)


def _grid(x: int, y: int) -> tuple:
    """A launch grid, checked: past CUDA's grid-y limit the launch would fail with a bare "invalid argument"."""
    if y > _MAX_GRID_Y:
        raise ValueError(f"rowwise_triton: {y} programs on grid axis 1 (samples, or sample x output sums) exceed "
                         f"CUDA's {_MAX_GRID_Y}; split the batch (the CUDA extension and the reference have no such "
                         "limit)")
    return (x, y)


def _launch(kernel, grid: tuple, like: torch.Tensor, *args, **meta) -> None:
    """kernel[grid](*args, **meta) on like's CUDA device (Triton launches on the current one; _triton_jit.on_device)."""
    with _triton_jit.on_device(like):
        _jitted(kernel)[grid](*args, **meta)


def _stage(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of a kernel output: the interpreter truncates fp32 -> bf16, so there bf16 is staged in fp32
    and rounded (round-to-nearest-even) by torch."""
    return torch.float32 if (dtype == torch.bfloat16 and _interpret()) else dtype


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(like.shape, dtype=_stage(dtype), device=like.device)


def _column_sums(part: torch.Tensor, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """part (S, N, n_tiles, D) fp32 partials -> [(N, D) sum over tiles in dtypes[s]], one launch."""
    S, N, n_tiles, D = part.shape
    one = all(dt == dtypes[0] for dt in dtypes)
    out = torch.empty((S, N, D), dtype=_stage(dtypes[0]) if one else torch.float32, device=part.device)
    block_t = min(32, _next_pow2(n_tiles))
    block_c = max(16, min(_next_pow2(D), 4096 // block_t))
    _launch(_colsum_kernel, _grid(_cdiv(D, block_c), S * N), part,
            part, out, n_tiles, D, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return [o.to(dt) for o, dt in zip(out.unbind(0), dtypes)]


# ---------------------------------------------------------------------------------------------------
# public functions (same names, signatures and return conventions as rowwise_ref)
# ---------------------------------------------------------------------------------------------------
def _ln_fwd(x, mods, eps, out_dtypes):
    """mods: [(shift, scale)] (one or two); returns ([y_k], mean, rstd)."""
    N, T, D = x.shape
    ys = [_empty(x, dt) for dt in out_dtypes]
    mean = torch.empty((N, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if N * T > 0:
        block_d, block_r, num_warps = _row_config(T, D)
        (sh1, sc1), (sh2, sc2) = mods[0], mods[-1]
        _launch(_ln_fwd_kernel, _grid(_cdiv(T, block_r), N), x,
            x, ys[0], ys[-1], mean, rstd, sh1, sc1, sh2, sc2,
            sh1.stride(0), sc1.stride(0), sh2.stride(0), sc2.stride(0), T, D, float(eps),
            DUAL=len(mods) == 2, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return [y.to(dt) for y, dt in zip(ys, out_dtypes)], mean, rstd


def ln_mod_fwd(x, shift, scale, eps: float = 1e-6, out_dtype=None):
    """(y, mean, rstd); y = LN(x) (1 + scale) + shift in out_dtype (default: shift's dtype)."""
    _check_stream("x", x)
    _check_vec("shift", shift, x)
    _check_vec("scale", scale, x)
    _check_backend(x)
    (y,), mean, rstd = _ln_fwd(x, [(shift, scale)], eps, [_check_out_dtype(out_dtype, shift.dtype)])
    return y, mean, rstd


def ln_dual_fwd(x, shift_v, scale_v, shift_u, scale_u, eps: float = 1e-6, out_dtype=None):
    """(y_v, y_u, mean, rstd): the dual final layer's shared normalisation feeding both heads."""
    _check_stream("x", x)
    for name, v in (("shift_v", shift_v), ("scale_v", scale_v), ("shift_u", shift_u), ("scale_u", scale_u)):
        _check_vec(name, v, x)
    _check_backend(x)
    dts = [_check_out_dtype(out_dtype, shift_v.dtype), _check_out_dtype(out_dtype, shift_u.dtype)]
    (y_v, y_u), mean, rstd = _ln_fwd(x, [(shift_v, scale_v), (shift_u, scale_u)], eps, dts)
    return y_v, y_u, mean, rstd


def ln_mod_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype=None):
    """y_dot from the saved statistics (out_dtype default: x_dot's dtype)."""
    N, T, D = _check_stream("x", x)
    _check_stream("x_dot", x_dot, x)
    _check_stats("mean", mean, x)
    _check_stats("rstd", rstd, x)
    for name, v in (("scale", scale), ("shift_dot", shift_dot), ("scale_dot", scale_dot)):
        _check_vec(name, v, x)
    _check_backend(x)
    dt = _check_out_dtype(out_dtype, x_dot.dtype)
    y_dot = _empty(x, dt)
    if N * T > 0:
        block_d, block_r, num_warps = _row_config(T, D)
        _launch(_ln_jvp_kernel, _grid(_cdiv(T, block_r), N), x,
            x, x_dot, mean, rstd, scale, shift_dot, scale_dot, y_dot,
            *mean.stride(), *rstd.stride(), scale.stride(0), shift_dot.stride(0), scale_dot.stride(0), T, D,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return y_dot.to(dt)


def ln_mod_bwd(gys: Sequence[torch.Tensor], x, mean, rstd, scales: Sequence[torch.Tensor]):
    """gys, scales: sequences of one (block) or two (dual final layer) tensors. Returns (gx, [gshift_k], [gscale_k])
    with gx in x's dtype, gshift_k in gy_k's (y_k's, so shift_k's) dtype and gscale_k in scale_k's, as the reference."""
    gys, scales = list(gys), list(scales)
    if len(gys) != len(scales) or len(gys) not in (1, 2):
        raise ValueError(f"rowwise_triton: gys and scales must both hold 1 or 2 tensors, got {len(gys)} gys and "
                         f"{len(scales)} scales")
    N, T, D = _check_stream("x", x)
    for k, (gy, s) in enumerate(zip(gys, scales)):
        _check_stream(f"gys[{k}]", gy, x)
        _check_vec(f"scales[{k}]", s, x)
    _check_stats("mean", mean, x)
    _check_stats("rstd", rstd, x)
    _check_backend(x)
    K = len(gys)
    dtypes = [dt for gy, s in zip(gys, scales) for dt in (gy.dtype, s.dtype)]  # gshift_k in gy_k's (= shift_k's)
    gx = _empty(x, x.dtype)
    if N * T == 0:
        sums = [torch.zeros((N, D), dtype=dt, device=x.device) for dt in dtypes]
    else:
        block_d, block_r, tile_t, n_tiles, num_warps = _bwd_config(N, T, D)
        part = torch.empty((2 * K, N, n_tiles, D), dtype=torch.float32, device=x.device)
        _launch(_ln_bwd_kernel, _grid(n_tiles, N), x,
            gys[0], gys[-1], x, mean, rstd, scales[0], scales[-1], gx, part,
            *mean.stride(), *rstd.stride(), scales[0].stride(0), scales[-1].stride(0), part.stride(0), n_tiles,
            T, D, DUAL=K == 2, TILE_T=tile_t, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
        sums = _column_sums(part, dtypes)
    return gx.to(x.dtype), sums[0::2], sums[1::2]


def gated_fwd(x, g, h):
    """out = x + g h, in x's dtype."""
    N, T, D = _check_stream("x", x)
    _check_vec("g", g, x)
    _check_stream("h", h, x)
    _check_backend(x)
    out = _empty(x, x.dtype)
    if N * T > 0:
        block_d, block_r, num_warps = _row_config(T, D)
        _launch(_gated_fwd_kernel, _grid(_cdiv(T, block_r), N), x,
            x, g, h, out, g.stride(0), T, D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return out.to(x.dtype)


def gated_jvp(x_dot, g, g_dot, h, h_dot):
    """out_dot = x_dot + g_dot h + g h_dot, float32."""
    N, T, D = _check_stream("x_dot", x_dot)
    _check_vec("g", g, x_dot)
    _check_vec("g_dot", g_dot, x_dot)
    _check_stream("h", h, x_dot)
    _check_stream("h_dot", h_dot, x_dot)
    _check_backend(x_dot)
    out = torch.empty(x_dot.shape, dtype=torch.float32, device=x_dot.device)
    if N * T > 0:
        block_d, block_r, num_warps = _row_config(T, D)
        _launch(_gated_jvp_kernel, _grid(_cdiv(T, block_r), N), x_dot,
            x_dot, g, g_dot, h, h_dot, out, g.stride(0), g_dot.stride(0), T, D,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return out


def gated_bwd(gout, g, h):
    """(gh, gg): gh = gout g in h's dtype, gg = sum_t gout h in g's dtype (gx is gout itself)."""
    N, T, D = _check_stream("gout", gout)
    _check_vec("g", g, gout)
    _check_stream("h", h, gout)
    _check_backend(gout)
    gh = _empty(h, h.dtype)
    if N * T == 0:
        gg = torch.zeros((N, D), dtype=torch.float32, device=gout.device)
    else:
        block_d, block_r, tile_t, n_tiles, num_warps = _bwd_config(N, T, D)
        part = torch.empty((1, N, n_tiles, D), dtype=torch.float32, device=gout.device)
        _launch(_gated_bwd_kernel, _grid(n_tiles, N), gout,
            gout, g, h, gh, part, g.stride(0), n_tiles, T, D,
            TILE_T=tile_t, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
        (gg,) = _column_sums(part, [g.dtype])
    return gh.to(h.dtype), gg.to(g.dtype)
