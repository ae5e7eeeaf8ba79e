"""Attention with its forward-mode tangent in one flash-style pass: (q, k, v, q_dot, k_dot, v_dot) -> (o, o_dot).

Layout in this file (Liger-Kernel order): Triton kernels (forward+JVP, flash backward), host launchers and the
PyTorch fallbacks, torch custom ops dumo::attention_jvp / dumo::attention_jvp_bwd (fake impls for torch.compile;
register_autograd plays the role of the autograd.Function), public function.

Math (scale = 1/sqrt(d); all accumulation in fp32). Per query row, over key blocks j with an online softmax:
  S      = q k^T * scale                           S_dot = (q_dot k^T + q k_dot^T) * scale
  m_new  = max(m, rowmax S_j)     alpha = exp(m - m_new)     p = exp(S_j - m_new)   (unnormalised P)
  l      = alpha l     + rowsum p                  acc_O = alpha acc_O + p V_j
  mu     = alpha mu    + rowsum(p o S_dot_j)       acc_A = alpha acc_A + p V_dot_j
                                                   acc_B = alpha acc_B + (p o S_dot_j) V_j
  O      = acc_O / l
  O_dot  = (acc_A + acc_B - mu O) / l
which is O_dot = P V_dot + (P o S_dot) V - rowsum(P o S_dot) O with P = softmax(S), i.e.
dumo_engine.jvp.fused.attention_tangent (the reference). mu and acc_B carry the same exp(m_old - m_new)
rescaling as l and acc_O because they are sums of p-weighted terms. lse = m + log(l) is saved for backward.

Backward (gradients of o only; o_dot is a stop-gradient output; the primal flash backward): P = exp(S - lse)
recomputed from the saved log-sum-exp, dV = P^T dO, dP = dO V^T, D = rowsum(dO o O), dS = P o (dP - D),
dQ = dS K scale, dK = dS^T Q scale. Triton (two kernels, no atomics) where the forward ran Triton, else PyTorch
(materialises P per head; DUMO_ATTN_JVP_BWD=torch forces it).

Cost, inputs (N, H, T, d) (T_k = T for self-attention), 2 FLOPs per multiply-add, elementwise work not counted:
  primal forward   S = q k^T, P V                                    4 N H T^2 d
  tangent extra    q_dot k^T, q k_dot^T, P V_dot, (P o S_dot) V      8 N H T^2 d
  forward total    (attention_jvp_flops)                            12 N H T^2 d  (3x the plain forward)
  backward         S recompute, dV, dP, dQ, dK                       10 N H T^2 d  (Triton: S, dP twice, 14)
  bytes (compulsory HBM traffic of the forward, attention_jvp_bytes): read q, k, v, q_dot, k_dot, v_dot and
  write o, o_dot: 8 N H T d * elem_size, plus the fp32 lse 4 N H T. K/V re-reads per query block come from L2.
At (N=32, H=16, T=256, d=72) bf16: 29.0 GFLOP and 0.152 GB per call, 191 FLOP/byte: near an H100's ridge point
(790 TFLOP/s / 3.35 TB/s = 236), so both the tensor cores and the loads matter; d=72 runs 128-wide tiles (the
padding costs 44% of the MMA work).

Dispatch: Triton on CUDA tensors, or under TRITON_INTERPRET=1 (CPU tests); otherwise (triton not importable,
no CUDA and no interpreter, fp64, head dim > 256, or DUMO_ATTN_JVP_IMPL=torch) the plain-PyTorch path
(math SDPA + attention_tangent) with one warning naming the fallback.
Tuning: DUMO_ATTN_JVP_BLOCKS="BLOCK_M,BLOCK_N,num_warps,num_stages" overrides the block heuristic.
"""
# kernel annotations stay strings: the module imports without triton
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from . import _triton_jit
from ._triton_jit import interpret, jitted

try:  # optional dependency: pip install 'dumo-engine[triton]'
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install: the torch fallback still works
    triton = None
    tl = None

_SUPPORTED_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------------
# cost model (used by benchmarks/bench_attention_jvp.py)
# ---------------------------------------------------------------------------------------------------
def attention_jvp_flops(N: int, H: int, T: int, d: int, T_k: Optional[int] = None, backward: bool = False) -> float:
    """FLOPs of one forward (primal 4 + tangent 8 = 12 N H T T_k d); backward adds 10 N H T T_k d."""
    T_k = T if T_k is None else T_k
    return float((12 + (10 if backward else 0)) * N * H * T * T_k * d)


def attention_jvp_bytes(N: int, H: int, T: int, d: int, elem_size: int = 2, T_k: Optional[int] = None) -> float:
    """Compulsory HBM bytes of one forward: read q, q_dot (T) and k, v, k_dot, v_dot (T_k); write o, o_dot, lse."""
    T_k = T if T_k is None else T_k
    return float(N * H * d * elem_size * (2 * T + 4 * T_k + 2 * T) + 4 * N * H * T)


# ---------------------------------------------------------------------------------------------------
# Triton kernel: one program = one (batch*head, query block); loops over all key blocks
# ---------------------------------------------------------------------------------------------------
def _attn_jvp_fwd_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE,
    sq_n, sq_h, sq_t, sq_d, sk_n, sk_h, sk_t, sk_d, sv_n, sv_h, sv_t, sv_d,
    sqd_n, sqd_h, sqd_t, sqd_d, skd_n, skd_h, skd_t, skd_d, svd_n, svd_h, svd_t, svd_d,
    so_n, so_h, so_t, so_d, sod_n, sod_h, sod_t, sod_d, sl_n, sl_h, sl_t,
    H, T_q, T_k, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = (pid_bh // H).to(tl.int64)  # int64: n * stride passes 2^31 elements at large batches
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T_q
    mask_d = offs_d < D  # head dim padded to a power of 2 (72 -> 128): masked lanes load 0
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=mask_md, other=0.0)
    qd = tl.load(QD + n * sqd_n + h * sqd_h + offs_m[:, None] * sqd_t + offs_d[None, :] * sqd_d, mask=mask_md,
                 other=0.0)
    # DOT_FP32 (set only under the interpreter, half-precision inputs): the interpreter's tl.dot on bf16 tiles
    # multiplies their raw bits, so tiles go to fp32 first. On a GPU tiles stay in their dtype (fp32 accumulate).
    if DOT_FP32:
        q = q.to(tl.float32)
        qd = qd.to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x log2 e): m and S2 below are in log2 units

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + n * sk_n + h * sk_h
    kd_base = KD + n * skd_n + h * skd_h
    v_base = V + n * sv_n + h * sv_h
    vd_base = VD + n * svd_n + h * svd_h
    for start_n in range(0, T_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < T_k
        mask_dn = mask_d[:, None] & mask_n[None, :]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        kt = tl.load(k_base + cols[None, :] * sk_t + offs_d[:, None] * sk_d, mask=mask_dn, other=0.0)  # (D, N)
        kdt = tl.load(kd_base + cols[None, :] * skd_t + offs_d[:, None] * skd_d, mask=mask_dn, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :] * sv_d, mask=mask_nd, other=0.0)  # (N, D)
        vd = tl.load(vd_base + cols[:, None] * svd_t + offs_d[None, :] * svd_d, mask=mask_nd, other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            kdt = kdt.to(tl.float32)
            v = v.to(tl.float32)
            vd = vd.to(tl.float32)

        s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # q k^T (unscaled), fp32
        s_dot = (tl.dot(qd, kt, input_precision=DOT_PRECISION)
                 + tl.dot(q, kdt, input_precision=DOT_PRECISION)) * scale  # S_dot; 0 on masked columns
        s2 = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))  # finite: every block has at least one valid column
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s2 - m_new[:, None])  # unnormalised P; exactly 0 on masked columns
        ps = p * s_dot  # P o S_dot
        # the running sums l, mu, acc_O, acc_A, acc_B all carry the same rescaling alpha
        l_i = l_i * alpha + tl.sum(p, 1)
        mu_i = mu_i * alpha + tl.sum(ps, 1)
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc_a = acc_a * alpha[:, None] + tl.dot(p.to(vd.dtype), vd, input_precision=DOT_PRECISION)
        acc_b = acc_b * alpha[:, None] + tl.dot(ps.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    # O_dot = (acc_A + acc_B - mu O) / l
    o_dot = (acc_a + acc_b - mu_i[:, None] * o) * inv_l[:, None]
    # (under the interpreter the launcher passes fp32 O/OD buffers: its fp32 -> bf16 cast truncates)
    tl.store(O + n * so_n + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
             o.to(O.dtype.element_ty), mask=mask_md)
    tl.store(OD + n * sod_n + h * sod_h + offs_m[:, None] * sod_t + offs_d[None, :] * sod_d,
             o_dot.to(OD.dtype.element_ty), mask=mask_md)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log log-sum-exp of S
    tl.store(LSE + n * sl_n + h * sl_h + offs_m * sl_t, lse, mask=mask_m)


def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_n, sq_h, sq_t, sq_d, sk_n, sk_h, sk_t, sk_d, sv_n, sv_h, sv_t, sv_d, sdo_n, sdo_h, sdo_t, sdo_d,
    sl_n, sl_h, sl_t, sdk_n, sdk_h, sdk_t, sdk_d, sdv_n, sdv_h, sdv_t, sdv_d,
    H, T_q, T_k, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # one program = one key block; loops over query blocks:
    # P = exp(S - lse), dV += P^T dO, dS = P o (dO V^T - delta), dK += dS^T Q scale   (delta = rowsum(dO o O))
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = (pid_bh // H).to(tl.int64)  # int64: n * stride passes 2^31 elements at large batches
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < T_k
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + n * sk_n + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=mask_nd, other=0.0)
    v = tl.load(V + n * sv_n + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=mask_nd, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, T_q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < T_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + n * sq_n + h * sq_h + rows[:, None] * sq_t + offs_d[None, :] * sq_d, mask=mask_md, other=0.0)
        do = tl.load(DO + n * sdo_n + h * sdo_h + rows[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=mask_md,
                     other=0.0)
        lse = tl.load(LSE + n * sl_n + h * sl_h + rows * sl_t, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + n * sl_n + h * sl_h + rows * sl_t, mask=mask_m, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (M, N)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * scale
    tl.store(DK + n * sdk_n + h * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + n * sdv_n + h * sdv_h + offs_n[:, None] * sdv_t + offs_d[None, :] * sdv_d,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_n, sq_h, sq_t, sq_d, sk_n, sk_h, sk_t, sk_d, sv_n, sv_h, sv_t, sv_d, sdo_n, sdo_h, sdo_t, sdo_d,
    sl_n, sl_h, sl_t, sdq_n, sdq_h, sdq_t, sdq_d,
    H, T_q, T_k, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # one program = one query block; loops over key blocks: dQ += dS K scale
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = (pid_bh // H).to(tl.int64)  # int64: n * stride passes 2^31 elements at large batches
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T_q
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + n * sq_n + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=mask_md, other=0.0)
    do = tl.load(DO + n * sdo_n + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=mask_md,
                 other=0.0)
    lse = tl.load(LSE + n * sl_n + h * sl_h + offs_m * sl_t, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + n * sl_n + h * sl_h + offs_m * sl_t, mask=mask_m, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < T_k
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + n * sk_n + h * sk_h + cols[:, None] * sk_t + offs_d[None, :] * sk_d, mask=mask_nd, other=0.0)
        v = tl.load(V + n * sv_n + h * sv_h + cols[:, None] * sv_t + offs_d[None, :] * sv_d, mask=mask_nd, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + n * sdq_n + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------------
# kernels are jitted lazily (TRITON_INTERPRET may be set after import): see _triton_jit.py
_interpret, _jitted = interpret, jitted


def _block_config(block_d: int, interpret: bool, elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): env override, else a small heuristic.

    Picked without a GPU from ptxas -v on sm_90a (triton 3.6, bf16): the forward keeps three fp32
    (BLOCK_M, BLOCK_D) accumulators in registers, so 4 warps spill (220 B/thread at d=64, 1.7 KB at d=128) and
    8 warps with a 64-row query block do not (d=64, BLOCK_N=64: 0 B in all three kernels; d=128 (72 pads to 128),
    BLOCK_N=32: 16 B forward, 8 B dK/dV, 0 B dQ); shared memory at most 96 KB. fp32 inputs use exact ("ieee")
    FMA dots, not tensor cores: 32x32 blocks with 8 warps keep their spills small (d=64: 20 B forward; d=128:
    1.5 KB forward, 7.8 KB dK/dV) where 64-row blocks spill 20 KB. fp32 is the correctness path, bf16 the fast one.
    Timing sweeps on a GPU are still to do (benchmarks/bench_attention_jvp.py --sweep).
    Under the interpreter small blocks keep CPU tests fast and exercise several key blocks and the tail masks.
    """
    env = os.environ.get("DUMO_ATTN_JVP_BLOCKS")
    if env:
        return _parse_blocks(env)
    if interpret:
        return 16, 16, 1, 1
    if elem_size >= 4:
        return 32, 32, 8, 2
    return (64, 64, 8, 2) if block_d <= 64 else (64, 32, 8, 2)


def _parse_blocks(env: str) -> tuple[int, int, int, int]:
    """DUMO_ATTN_JVP_BLOCKS checked: tl.arange needs power-of-two blocks and tl.dot at least 16 rows/columns; Triton
    takes 1..32 warps (a power of two) and at least one pipeline stage."""
    form = f"DUMO_ATTN_JVP_BLOCKS must be 'BLOCK_M,BLOCK_N,num_warps,num_stages' (integers), got {env!r}"
    try:
        bm, bn, w, st = (int(x) for x in env.split(","))
    except ValueError as e:
        raise ValueError(form) from e
    for name, val in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{form}: {name}={val} is not a power of two >= 16 (tl.dot's minimum)")
    if w not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{form}: num_warps={w} is not one of 1, 2, 4, 8, 16, 32")
    if st < 1:
        raise ValueError(f"{form}: num_stages={st} must be >= 1")
    return bm, bn, w, st


def _launch(launch, cfg: tuple[int, int, int, int], strict: bool = False):
    """launch(cfg); if the compiler reports too little shared memory/registers, retry smaller configs (strict: no
    retry, the error propagates: a benchmark sweep must time the config it names)."""
    bm, bn, w, _ = cfg
    fallbacks = [] if strict else [(bm, max(16, bn // 2), w, 1), (32, 32, 4, 1)]
    for attempt in [cfg] + fallbacks:
        try:
            return launch(attempt)
        except triton.runtime.OutOfResources as e:
            if strict or attempt is fallbacks[-1]:
                raise
            warnings.warn(f"attention_jvp: block config {attempt} is out of resources ({e}); trying a smaller one")


def _kernel_flags(q: torch.Tensor, interpret: bool) -> dict:
    return dict(DOT_FP32=interpret and q.dtype != torch.float32,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 inputs: no TF32 rounding


_INT32_LIMIT = 2**31
_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the kernels put batch x heads


def _int32_safe(name: str, t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when an element offset inside one (batch, head) slice reaches 2^31: the kernels
    widen only the batch and head offsets to int64 (the tile offsets, in the inner loops, stay int32)."""
    def span(u):
        return sum((n - 1) * abs(st) for n, st in zip(u.shape[2:], u.stride()[2:]) if n > 0)

    if span(t) < _INT32_LIMIT:
        return t
    c = t.contiguous()
    if span(c) >= _INT32_LIMIT:
        raise ValueError(f"attention_jvp: {name} {tuple(t.shape)} has element offsets of 2^31 or more inside one "
                         "(batch, head) slice, even contiguous; the kernels index inside a slice in int32")
    return c


def _batch_chunks(N: int, H: int):
    """Batch slices whose N_chunk * H programs fit on grid axis 1 (one slice below the limit)."""
    if H > _MAX_GRID_Y:
        raise ValueError(f"attention_jvp: {H} heads exceed CUDA's grid-y limit {_MAX_GRID_Y}")
    step = max(1, _MAX_GRID_Y // H)
    return [slice(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def attention_jvp_fwd_triton(q, k, v, q_dot, k_dot, v_dot, blocks: Optional[tuple[int, int, int, int]] = None,
                             strict: bool = False):
    """Launch the fused kernel; returns (o, o_dot, lse) with o, o_dot contiguous (N, H, T, d), lse fp32 (N, H, T).
    blocks: a (BLOCK_M, BLOCK_N, num_warps, num_stages) config; strict: no smaller config if it does not fit."""
    q, k, v, q_dot, k_dot, v_dot = (_int32_safe(n, t) for n, t in zip(_NAMES, (q, k, v, q_dot, k_dot, v_dot)))
    N, H, T_q, D = q.shape
    T_k = k.shape[2]
    interpret = _interpret()
    # the interpreter rounds fp32 -> bf16 by truncation: there the kernel writes fp32 and torch rounds (RTNE)
    out_dtype = torch.float32 if interpret else q.dtype
    o = torch.empty((N, H, T_q, D), dtype=out_dtype, device=q.device)
    o_dot = torch.empty_like(o)
    lse = torch.empty((N, H, T_q), dtype=torch.float32, device=q.device)
    if N * H * T_q == 0:
        return o.to(q.dtype), o_dot.to(q.dtype), lse
    block_d = max(16, triton.next_power_of_2(D))

    def launch(cfg):
        bm, bn, num_warps, num_stages = cfg
        with _triton_jit.on_device(q):
            for b in _batch_chunks(N, H):
                _jitted(_attn_jvp_fwd_kernel)[(triton.cdiv(T_q, bm), (b.stop - b.start) * H)](
                    q[b], k[b], v[b], q_dot[b], k_dot[b], v_dot[b], o[b], o_dot[b], lse[b],
                    *q.stride(), *k.stride(), *v.stride(), *q_dot.stride(), *k_dot.stride(), *v_dot.stride(),
                    *o.stride(), *o_dot.stride(), *lse.stride(),
                    H, T_q, T_k, D, 1.0 / math.sqrt(D),
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **_kernel_flags(q, interpret),
                    num_warps=num_warps, num_stages=num_stages)

    _launch(launch, blocks or _block_config(block_d, interpret, q.element_size()), strict)
    return o.to(q.dtype), o_dot.to(q.dtype), lse


def attention_bwd_triton(do, q, k, v, o, lse, blocks: Optional[tuple[int, int, int, int]] = None):
    """Flash backward of o = softmax(q k^T scale) v from the saved lse: (dq, dk, dv) in the inputs' dtype.

    Two kernels (dK/dV over key blocks, dQ over query blocks) so that no atomics are needed; both recompute P.
    """
    do, q, k, v = (_int32_safe(n, t) for n, t in (("do", do), ("q", q), ("k", k), ("v", v)))
    N, H, T_q, D = q.shape
    T_k = k.shape[2]
    interpret = _interpret()
    out_dtype = torch.float32 if interpret else q.dtype  # see attention_jvp_fwd_triton
    dq = torch.empty((N, H, T_q, D), dtype=out_dtype, device=q.device)
    dk = torch.empty((N, H, T_k, D), dtype=out_dtype, device=q.device)
    dv = torch.empty_like(dk)
    if N * H * T_q == 0:
        return dq.to(q.dtype).zero_(), dk.to(k.dtype).zero_(), dv.to(v.dtype).zero_()
    lse = lse.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (N, H, T_q) = rowsum(dO o O), strides of lse
    block_d = max(16, triton.next_power_of_2(D))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride())
    scale = 1.0 / math.sqrt(D)

    def launch(cfg):
        bm, bn, num_warps, num_stages = cfg
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **_kernel_flags(q, interpret), num_warps=num_warps,
                      num_stages=num_stages)
        with _triton_jit.on_device(q):
            for b in _batch_chunks(N, H):
                nh = (b.stop - b.start) * H
                _jitted(_attn_bwd_dkdv_kernel)[(triton.cdiv(T_k, bn), nh)](
                    q[b], k[b], v[b], do[b], lse[b], delta[b], dk[b], dv[b], *strides, *dk.stride(), *dv.stride(),
                    H, T_q, T_k, D, scale, **common)
                _jitted(_attn_bwd_dq_kernel)[(triton.cdiv(T_q, bm), nh)](
                    q[b], k[b], v[b], do[b], lse[b], delta[b], dq[b], *strides, *dq.stride(), H, T_q, T_k, D, scale,
                    **common)

    _launch(launch, blocks or _block_config(block_d, interpret, q.element_size()))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_jvp_fwd_torch(q, k, v, q_dot, k_dot, v_dot):
    """Plain-PyTorch (o, o_dot, lse): math-level SDPA, the reference tangent rule and the log-sum-exp."""
    from ..jvp.fused import attention_tangent

    o = F.scaled_dot_product_attention(q, k, v).contiguous()
    o_dot = attention_tangent(q, k, v, q_dot, k_dot, v_dot).to(q.dtype).contiguous()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp((q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return o, o_dot, lse.float().contiguous()


_WARNED: set = set()


def _fallback_reason(q: torch.Tensor) -> Optional[str]:
    """Why the Triton kernel cannot run on these inputs (None: it can)."""
    if os.environ.get("DUMO_ATTN_JVP_IMPL", "").lower() == "torch":
        return "DUMO_ATTN_JVP_IMPL=torch"
    if triton is None:
        return "triton is not importable (pip install 'dumo-engine[triton]')"
    if q.dtype not in _SUPPORTED_KERNEL_DTYPES:
        return f"dtype {q.dtype} has no Triton kernel"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    if q.device.type != "cuda" and not _interpret():
        return f"{q.device.type} tensors without TRITON_INTERPRET=1"
    return None


def _attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot):
    reason = _fallback_reason(q)
    if reason is None:
        return attention_jvp_fwd_triton(q, k, v, q_dot, k_dot, v_dot)
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"attention_jvp: using the PyTorch fallback (math SDPA + attention_tangent) because {reason}",
                      stacklevel=3)
    return attention_jvp_fwd_torch(q, k, v, q_dot, k_dot, v_dot)


# ---------------------------------------------------------------------------------------------------
# PyTorch backward: gradients of o w.r.t. q, k, v from the saved lse (fp32; the fallback's and the oracle)
# ---------------------------------------------------------------------------------------------------
def attention_bwd_torch(do, q, k, v, o, lse):
    # P = exp(S - lse); dV = P^T dO; dS = P o (dO V^T - rowsum(dO o O)); dQ = dS K scale; dK = dS^T Q scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf, dof, of = (t.to(acc) for t in (q, k, v, do, o))
    p = torch.exp(qf @ kf.transpose(-1, -2) * scale - lse.to(acc).unsqueeze(-1))  # (N, H, T, T_k)
    dv = p.transpose(-1, -2) @ dof
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------------
# input checks (shared by the public function, the real and the fake op)
# ---------------------------------------------------------------------------------------------------
_NAMES = ("q", "k", "v", "q_dot", "k_dot", "v_dot")


def check_inputs(q, k, v, q_dot, k_dot, v_dot) -> None:
    """Raise TypeError/ValueError with the offending tensor's name for any device/dtype/shape mismatch."""
    ts = (q, k, v, q_dot, k_dot, v_dot)
    for name, t in zip(_NAMES, ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_jvp: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention_jvp: {name} must be 4-D (N, H, T, d), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"attention_jvp: {name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"attention_jvp: {name} has dtype {t.dtype} but q has {q.dtype}; all six must agree")
        if t.device != q.device:
            raise ValueError(f"attention_jvp: {name} is on {t.device} but q is on {q.device}; all six must agree")
    N, H, _, D = q.shape
    if k.shape[:2] != (N, H) or k.shape[3] != D:
        raise ValueError(f"attention_jvp: k has shape {tuple(k.shape)}, incompatible with q {tuple(q.shape)} "
                         "(N, H and d must match)")
    if v.shape != k.shape:
        raise ValueError(f"attention_jvp: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    for name, t, p in (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)):
        if t.shape != p.shape:
            raise ValueError(f"attention_jvp: {name} has shape {tuple(t.shape)} but its primal has {tuple(p.shape)}")
    if D == 0 or k.shape[2] == 0:
        raise ValueError(f"attention_jvp: empty head dim or key sequence (q {tuple(q.shape)}, k {tuple(k.shape)})")


# ---------------------------------------------------------------------------------------------------
# torch custom op: dumo::attention_jvp -> (o, o_dot, lse); fake impl for torch.compile; autograd for o only
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("dumo::attention_jvp", mutates_args=())
def _attention_jvp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                      k_dot: torch.Tensor, v_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_inputs(q, k, v, q_dot, k_dot, v_dot)
    return _attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot)


@_attention_jvp_op.register_fake
def _(q, k, v, q_dot, k_dot, v_dot):
    check_inputs(q, k, v, q_dot, k_dot, v_dot)
    N, H, T, D = q.shape  # outputs are contiguous whatever the input strides, as in the real impl
    return q.new_empty((N, H, T, D)), q.new_empty((N, H, T, D)), q.new_empty((N, H, T), dtype=torch.float32)


@torch.library.custom_op("dumo::attention_jvp_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # same dispatch as the forward (the fallback warning was given there); DUMO_ATTN_JVP_BWD=torch forces PyTorch
    if _fallback_reason(q) is None and os.environ.get("DUMO_ATTN_JVP_BWD", "").lower() != "torch":
        return attention_bwd_triton(do, q, k, v, o, lse)
    return attention_bwd_torch(do, q, k, v, o, lse)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, o_dot, lse = output
    ctx.save_for_backward(q, k, v, o, lse)  # what a plain flash forward saves; no tangent is kept
    ctx.mark_non_differentiable(o_dot, lse)


def _backward(ctx, grad_o, grad_o_dot, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        return None, None, None, None, None, None
    dq, dk, dv = _attention_bwd_op(grad_o, q, k, v, o, lse)
    return dq, dk, dv, None, None, None


_attention_jvp_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------
def attention_jvp(q, k, v, q_dot, k_dot, v_dot) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(q k^T / sqrt(d)) v and its tangent o_dot along (q_dot, k_dot, v_dot), in one pass.

    Inputs (N, H, T, d) (k, v may have another T), any strides, one dtype (fp16/bf16/fp32 run the kernel) and
    one device. o is differentiable w.r.t. q, k, v; o_dot is not (stop-gradient, nothing saved for it).
    Forward-mode AD through it (torch.func.jvp, forward_ad dual tensors) is refused: the op has no forward-mode
    formula, and PyTorch would otherwise give o a zero tangent without a word.
    """
    check_inputs(q, k, v, q_dot, k_dot, v_dot)
    for name, t in zip(_NAMES, (q, k, v, q_dot, k_dot, v_dot)):
        if fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"attention_jvp: {name} carries a forward-mode tangent (torch.func.jvp or "
                                      "torch.autograd.forward_ad); the op has no forward-mode rule. It computes the "
                                      "tangent itself: pass the tangents as q_dot, k_dot, v_dot, or use "
                                      "F.scaled_dot_product_attention (math backend) under forward-mode AD")
    o, o_dot, _ = _attention_jvp_op(q, k, v, q_dot, k_dot, v_dot)
    return o, o_dot
