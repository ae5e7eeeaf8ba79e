"""Fused forward + JVP pass of the dual-head DiT: one ordinary forward returning (v_hat, u_hat, du/dt).

No torch.func: every module computes its primal output (recorded by autograd, exactly the graph of a
plain forward) and, under torch.no_grad, its tangent from the same inputs and weights. The tangent is
therefore never differentiated and no tangent activation is saved for backward, and the pass works
inside any wrapper (DDP, DeepSpeed) because it is reached through model.forward(..., tangent=...).

Tangents of the network inputs: (z, t, h) -> (tangent, 1, 1), i.e. (z, t, r) -> (tangent, 1, 0).
The tangent rules are written here in plain PyTorch; fused kernels replace them one by one and are
tested against this module and the torch.func reference (jvp/reference.py). On CUDA, attention runs
the Triton attention-JVP kernel (ops/attention_jvp.py: O and O_dot in one flash-style pass, flash
backward); the row-wise ops (LayerNorm+modulate, gated residual, dual final norm) run ops/rowwise.py:
CUDA C++ kernels or their C++ CPU twins (csrc/), one pass per tensor (DUMO_FUSED_ROWWISE=0: the rules below).
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

_GELU_K = math.sqrt(2.0 / math.pi)


def _amp_device(t: torch.Tensor) -> str:
    """The autocast device type for t ("meta" tensors, used to count FLOPs of sharded models, report as cpu)."""
    return t.device.type if t.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype for tangent math: fp32 for half precision, else unchanged (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------------------------------------------
# tangent rules (call under torch.no_grad; primal tensors are read, never recorded)
# ---------------------------------------------------------------------------------------------------
def silu_tangent(x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    # silu(x) = x s(x);  silu'(x) = s (1 + x (1 - s))
    x = _acc(x)
    s = torch.sigmoid(x)
    return x_dot * (s * (1 + x * (1 - s)))


def gelu_tanh_tangent(x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    # gelu(x) = x/2 (1 + th), th = tanh(k (x + 0.044715 x^3))
    # gelu'(x) = (1 + th)/2 + x/2 (1 - th^2) k (1 + 3 * 0.044715 x^2)
    x = _acc(x)
    th = torch.tanh(_GELU_K * (x + 0.044715 * x.pow(3)))
    d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_K * (1 + 3 * 0.044715 * x * x)
    return x_dot * d


def layernorm_modulate_tangent(x, x_dot, scale, shift_dot, scale_dot, eps: float):
    """Tangent of y = n (1 + scale) + shift, n = LayerNorm(x) without affine.

    n_dot = rstd (x_dot - mean(x_dot) - n mean(n x_dot));  y_dot = n_dot (1 + scale) + n scale_dot + shift_dot
    x, x_dot: (N, T, D); scale, shift_dot, scale_dot: (N, D).
    """
    from ..ops import rowwise_ref  # the one reference of this rule (the row-wise kernels are tested against it)

    mean, rstd = rowwise_ref.ln_stats(x, eps)  # fp32 (float64 stays float64)
    return rowwise_ref.ln_mod_jvp(x, x_dot, mean, rstd, scale, shift_dot, scale_dot,
                                  torch.promote_types(x_dot.dtype, rstd.dtype))


def attention_tangent(q, k, v, q_dot, k_dot, v_dot) -> torch.Tensor:
    """O_dot of O = softmax(q k^T / sqrt(d)) v; elementwise math in fp32 (the matmuls follow autocast). (N, H, T, d).

    S_dot = (q_dot k^T + q k_dot^T) / sqrt(d);  O_dot = P v_dot + (P o S_dot) v - rowsum(P o S_dot) O
    (the same quantities a flash-style kernel accumulates as acc_A, acc_B and mu).
    """
    q, k, v = _acc(q), _acc(k), _acc(v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (N, H, T, T)
    s_dot = (_acc(q_dot) @ k.transpose(-1, -2) + q @ _acc(k_dot).transpose(-1, -2)) * scale
    ps = p * s_dot
    o = p @ v
    return p @ _acc(v_dot) + ps @ v - ps.sum(-1, keepdim=True) * o


def timestep_embedder_jvp(emb, t: torch.Tensor, t_dot: torch.Tensor):
    """(emb(t), d emb(t)/dt * t_dot) for TimestepEmbedder: sinusoids of t * time_scale, then MLP.

    The primal runs the embedder's own pieces (the same ops as emb(t)), so its first layer's output
    is shared with the tangent instead of recomputed.
    """
    dim, half = emb.frequency_embedding_size, emb.frequency_embedding_size // 2
    lin0, act, lin2 = emb.mlp
    feat = emb.timestep_embedding(t * emb.time_scale, dim)  # (N, dim): [cos a, sin a]
    h0 = lin0(feat.to(lin0.weight.dtype))
    out = lin2(act(h0))
    with torch.no_grad():
        # d/dt [cos a, sin a] = [-sin a, cos a] * a_dot,  a_dot = t_dot * time_scale * f
        a_dot = (t_dot.to(feat.dtype) * emb.time_scale)[:, None] * emb.frequencies(t, dim)[None]
        feat_dot = torch.cat([-feat[:, half:2 * half] * a_dot, feat[:, :half] * a_dot], dim=-1)
        if dim % 2:
            feat_dot = F.pad(feat_dot, (0, 1))
        h0_dot = F.linear(feat_dot.to(lin0.weight.dtype), lin0.weight)
        out_dot = F.linear(silu_tangent(h0, h0_dot).to(lin2.weight.dtype), lin2.weight)
    return out, out_dot


class StackedLinear(torch.autograd.Function):
    """y = x W^T + b and y_dot = x_dot W^T from ONE GEMM over the stacked rows [x; x_dot].

    Saves only x and W for backward (what F.linear saves): y_dot is a stop-gradient output.
    Cost: 2 M K N FLOPs per stacked half, plus one copy of x and x_dot into the stacked buffer.
    """

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias):
        # compute dtype: the autocast dtype when autocast is on (as nn.Linear would), else x's
        dev = _amp_device(x)
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xs, w = x.to(dt), weight.to(dt)
            m = x.shape[0]
            out = torch.cat([xs, x_dot.to(dt)], dim=0) @ w.t()
            y = out[:m] + bias.to(dt) if bias is not None else out[:m].clone()
            y_dot = out[m:]
        ctx.save_for_backward(xs, w)  # what autocast's linear saves: the cast input and weight
        ctx.has_bias, ctx.w_dtype, ctx.x_dtype = bias is not None, weight.dtype, x.dtype
        ctx.mark_non_differentiable(y_dot)
        return y, y_dot

    @staticmethod
    def backward(ctx, gy, _gy_dot):
        xs, w = ctx.saved_tensors
        gy = gy.to(w.dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = (gy @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = (gy2.t() @ xs.reshape(-1, xs.shape[-1])).to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
        gb = gy2.sum(0).to(ctx.w_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, None, gw, gb


def stacked_linear_enabled() -> bool:
    """Opt-in until measured on a GPU (DUMO_STACKED_LINEAR=1): one GEMM for a Linear's primal and tangent."""
    return os.environ.get("DUMO_STACKED_LINEAR", "0") == "1"


def linear_jvp(layer, x: torch.Tensor, x_dot: torch.Tensor):
    """(layer(x), x_dot W^T): stacked-rows GEMM when enabled, else two GEMMs (the tangent one under no_grad)."""
    if stacked_linear_enabled():
        return StackedLinear.apply(x, x_dot, layer.weight, layer.bias)
    y = layer(x)
    with torch.no_grad():
        return y, _lin_t(x_dot, layer)


def _lin_t(x_dot: torch.Tensor, layer) -> torch.Tensor:
    """Tangent of a Linear: x_dot W^T (no bias); under autocast the GEMM runs in its precision (x_dot is handed to
    autocast as it is: a bf16 tangent is not widened to the fp32 weight dtype only to be narrowed again)."""
    if torch.is_autocast_enabled(_amp_device(x_dot)):
        return F.linear(x_dot, layer.weight)
    return F.linear(x_dot.to(layer.weight.dtype), layer.weight)


# ---------------------------------------------------------------------------------------------------
# module passes: primal (recorded) + tangent (no grad)
# ---------------------------------------------------------------------------------------------------
def use_triton_attention(q: torch.Tensor) -> bool:
    """The Triton attention-JVP kernel on CUDA (DUMO_FUSED_ATTN=torch opts out); the PyTorch rule elsewhere."""
    if not q.is_cuda or os.environ.get("DUMO_FUSED_ATTN", "triton").lower() == "torch":
        return False
    from ..ops import attention_jvp as op

    if op.triton is None:  # said once: the fallback materialises (N, H, T, T) float32 P and P o S_dot per block
        if "no-triton" not in _WARNED:
            _WARNED.add("no-triton")
            warnings.warn("fused pass: the Triton attention-JVP kernel is unavailable (triton is not importable; "
                          "pip install 'dumo-engine[triton]'); using SDPA + attention_tangent, which materialises the "
                          "(N, H, T, T) attention probabilities and their tangent in float32", stacklevel=3)
        return False
    return True


_WARNED: set = set()


def _attention_jvp(attn, x, x_dot):
    N, T, D = x.shape
    qkv, qkv_dot = linear_jvp(attn.qkv, x.reshape(N * T, D), x_dot.reshape(N * T, D))
    q, k, v = qkv.reshape(N, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    qkv_dot = qkv_dot.reshape(N, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    if use_triton_attention(q):
        from ..ops.attention_jvp import attention_jvp

        # one flash-style pass: O (with its flash backward) and O_dot (stop-gradient output)
        o, o_dot = attention_jvp(q, k, v, *qkv_dot.to(q.dtype).unbind(0))
    else:
        o = F.scaled_dot_product_attention(q, k, v)
        with torch.no_grad():
            o_dot = attention_tangent(q, k, v, *qkv_dot.unbind(0))
    out, out_dot = linear_jvp(attn.proj, o.transpose(1, 2).reshape(N * T, D), o_dot.transpose(1, 2).reshape(N * T, D))
    return out.reshape(N, T, D), out_dot.reshape(N, T, D)


def rowwise_enabled(x: torch.Tensor) -> bool:
    """Row-wise ops (LayerNorm+modulate, gated residual, dual final norm) through ops/rowwise.py: C++/CUDA
    kernels, one pass per tensor, on by default (measured faster: benchmarks/RESULTS.md); DUMO_FUSED_ROWWISE=0
    keeps the plain-PyTorch rules below. float64 (finite-difference checks) always takes the PyTorch rules."""
    return os.environ.get("DUMO_FUSED_ROWWISE", "1") != "0" and x.dtype in (torch.float32, torch.bfloat16,
                                                                           torch.float16)


def _block_jvp(blk, x, x_dot, c, silu_c_dot):
    mods = blk.adaLN_modulation(c).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    with torch.no_grad():
        mods_dot = _lin_t(silu_c_dot, blk.adaLN_modulation[1]).chunk(6, dim=1)
        shift_msa_d, scale_msa_d, gate_msa_d, shift_mlp_d, scale_mlp_d, gate_mlp_d = mods_dot
    if rowwise_enabled(x):
        return _block_jvp_rowwise(blk, x, x_dot, mods, mods_dot)
    from ..models.dit import modulate

    with torch.no_grad():
        a_in_dot = layernorm_modulate_tangent(x, x_dot, scale_msa, shift_msa_d, scale_msa_d, blk.norm1.eps)
    a_out, a_out_dot = _attention_jvp(blk.attn, modulate(blk.norm1(x), shift_msa, scale_msa), a_in_dot)
    x_new = x + gate_msa.unsqueeze(1) * a_out
    with torch.no_grad():
        # gated residual: (x + g h)' = x_dot + g_dot h + g h_dot
        x_dot = x_dot + gate_msa_d.unsqueeze(1) * a_out + gate_msa.unsqueeze(1) * a_out_dot
        m_in_dot = layernorm_modulate_tangent(x_new, x_dot, scale_mlp, shift_mlp_d, scale_mlp_d, blk.norm2.eps)
    N, T, D = x_new.shape
    h1, h1_dot = linear_jvp(blk.mlp.fc1, modulate(blk.norm2(x_new), shift_mlp, scale_mlp).reshape(N * T, D),
                            m_in_dot.reshape(N * T, D))
    out, out_dot = _mlp_tail_jvp(blk, h1, h1_dot)
    out, out_dot = out.reshape(N, T, D), out_dot.reshape(N, T, D)
    x_out = x_new + gate_mlp.unsqueeze(1) * out
    with torch.no_grad():
        x_dot = x_dot + gate_mlp_d.unsqueeze(1) * out + gate_mlp.unsqueeze(1) * out_dot
    return x_out, x_dot


def _mlp_tail_jvp(blk, h1, h1_dot):
    a1 = blk.mlp.act(h1)
    with torch.no_grad():
        a1_dot = gelu_tanh_tangent(h1, h1_dot)
    return linear_jvp(blk.mlp.fc2, a1, a1_dot)


def _block_jvp_rowwise(blk, x, x_dot, mods, mods_dot):
    """The same block with the row-wise ops: each LayerNorm+modulate and each gated residual is one kernel for the
    primal (differentiable) and one for the tangent, reading the adaLN chunks in place. The modulated inputs and
    their tangents leave in the modulation dtype (bf16 under autocast: what the next GEMM reads)."""
    from ..ops import rowwise as rw

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    shift_msa_d, scale_msa_d, gate_msa_d, shift_mlp_d, scale_mlp_d, gate_mlp_d = mods_dot
    a_in, mean, rstd = rw.layernorm_modulate(x, shift_msa, scale_msa, blk.norm1.eps)
    a_in_dot = rw.layernorm_modulate_jvp(x, x_dot, mean, rstd, scale_msa, shift_msa_d, scale_msa_d, a_in.dtype)
    a_out, a_out_dot = _attention_jvp(blk.attn, a_in, a_in_dot)
    x_new = rw.gated_residual(x, gate_msa, a_out)
    x_dot = rw.gated_residual_jvp(x_dot, gate_msa, gate_msa_d, a_out, a_out_dot.to(a_out.dtype))
    m_in, mean, rstd = rw.layernorm_modulate(x_new, shift_mlp, scale_mlp, blk.norm2.eps)
    m_in_dot = rw.layernorm_modulate_jvp(x_new, x_dot, mean, rstd, scale_mlp, shift_mlp_d, scale_mlp_d, m_in.dtype)
    N, T, D = x_new.shape
    h1, h1_dot = linear_jvp(blk.mlp.fc1, m_in.reshape(N * T, D), m_in_dot.reshape(N * T, D))
    out, out_dot = _mlp_tail_jvp(blk, h1, h1_dot)
    out, out_dot = out.reshape(N, T, D), out_dot.reshape(N, T, D)
    x_out = rw.gated_residual(x_new, gate_mlp, out)
    x_dot = rw.gated_residual_jvp(x_dot, gate_mlp, gate_mlp_d, out, out_dot.to(out.dtype))
    return x_out, x_dot


def _final_layer_jvp(head, x, x_dot, c, silu_c_dot):
    from ..models.dit import modulate

    shift, scale = head.adaLN_modulation(c).chunk(2, dim=1)
    y = head.linear(modulate(head.norm_final(x), shift, scale))
    with torch.no_grad():
        shift_d, scale_d = _lin_t(silu_c_dot, head.adaLN_modulation[1]).chunk(2, dim=1)
        in_dot = layernorm_modulate_tangent(x, x_dot, scale, shift_d, scale_d, head.norm_final.eps)
        y_dot = _final_linear_t(head, in_dot)
    return y, y_dot


def _final_linear_t(head, in_dot):
    with torch.autocast(_amp_device(in_dot), enabled=False):  # tiny GEMM (D -> p*p*C): du/dt leaves in fp32
        return F.linear(in_dot, head.linear.weight.to(in_dot.dtype))


def _heads_jvp_rowwise(model, x, x_dot, c_v, c_u, silu_cu_dot, heads):
    """(v or None, u, u_dot) from the dual final layer: one normalisation of the trunk output feeds both heads'
    modulations (one kernel), and only the u head gets a tangent (from the saved statistics)."""
    from ..ops import rowwise as rw

    vh, uh = model.v_head, model.u_head
    shift_u, scale_u = uh.adaLN_modulation(c_u).chunk(2, dim=1)
    if "v" in heads:
        shift_v, scale_v = vh.adaLN_modulation(c_v).chunk(2, dim=1)
        y_v, y_u, mean, rstd = rw.dual_layernorm_modulate(x, shift_v, scale_v, shift_u, scale_u, uh.norm_final.eps)
        v = vh.linear(y_v)
    else:
        v = None
        y_u, mean, rstd = rw.layernorm_modulate(x, shift_u, scale_u, uh.norm_final.eps)
    u = uh.linear(y_u)
    with torch.no_grad():
        shift_d, scale_d = _lin_t(silu_cu_dot, uh.adaLN_modulation[1]).chunk(2, dim=1)
        in_dot = rw.layernorm_modulate_jvp(x, x_dot, mean, rstd, scale_u, shift_d, scale_d, torch.float32)
        u_dot = _final_linear_t(uh, in_dot)
    return v, u, u_dot


def dit_forward_jvp(model, x, t, h, y, x_dot, heads: str = "vu"):
    """(v_hat or None, u_hat, du/dt) for DualHeadDiT `model`; tangents (x_dot, 1, 1) for (x, t, h)."""
    if "u" not in heads:
        raise ValueError("the JVP pass needs the u head: heads must contain 'u'")
    ones = torch.ones_like(t)
    tokens = model.x_embedder(x) + model.pos_embed
    with torch.no_grad():
        pe = model.x_embedder.proj
        # the tangent residual stream stays in fp32 (float64 stays float64), as in the reference
        tok_dot = _acc(F.conv2d(x_dot.to(pe.weight.dtype), pe.weight, None, stride=pe.stride)).flatten(2).transpose(1, 2)
    te, te_dot = timestep_embedder_jvp(model.t_embedder, t, ones)
    he, he_dot = timestep_embedder_jvp(model.h_embedder, h, ones)
    ye = model.y_embedder(y)
    if model.h_in_trunk:
        c_v = c_u = te + he + ye
        c_v_dot = c_u_dot = te_dot + he_dot
    else:
        c_v, c_v_dot = te + ye, te_dot
        c_u, c_u_dot = c_v + he, te_dot + he_dot
    if rowwise_enabled(tokens):  # the row-wise kernels take contiguous (N, T, D) streams (one copy per forward)
        tokens, tok_dot = tokens.contiguous(), tok_dot.contiguous()
    with torch.no_grad():  # SiLU of c feeds every adaLN: its tangent is computed once
        silu_cv_dot = silu_tangent(c_v, c_v_dot)
        silu_cu_dot = silu_cv_dot if c_u is c_v else silu_tangent(c_u, c_u_dot)
    for blk in model.blocks:
        tokens, tok_dot = _block_jvp(blk, tokens, tok_dot, c_v, silu_cv_dot)
    if rowwise_enabled(tokens) and model.v_head.norm_final.eps == model.u_head.norm_final.eps:
        v, u, u_dot = _heads_jvp_rowwise(model, tokens, tok_dot, c_v, c_u, silu_cu_dot, heads)
        return (model.unpatchify(v) if v is not None else None), model.unpatchify(u), model.unpatchify(u_dot).detach()
    v = model.unpatchify(model.v_head(tokens, c_v)) if "v" in heads else None  # no v tangent: not needed
    u, u_dot = _final_layer_jvp(model.u_head, tokens, tok_dot, c_u, silu_cu_dot)
    return v, model.unpatchify(u), model.unpatchify(u_dot).detach()
