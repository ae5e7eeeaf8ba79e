"""Each hand-written tangent rule of the fused pass against torch.func.jvp of its primal, in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dumo_engine.jvp.fused import (attention_tangent, gelu_tanh_tangent, layernorm_modulate_tangent, silu_tangent,
                                   timestep_embedder_jvp)
from dumo_engine.models.dit import TimestepEmbedder, modulate
from helpers import randomize_

G = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def close(a, b, tol=1e-12):
    assert ((a - b).norm() / b.norm()).item() < tol


def test_silu_and_gelu():
    x, xd = rnd(5, 7) * 3, rnd(5, 7)
    close(silu_tangent(x, xd), torch.func.jvp(F.silu, (x,), (xd,))[1])
    close(gelu_tanh_tangent(x, xd), torch.func.jvp(lambda a: F.gelu(a, approximate="tanh"), (x,), (xd,))[1])
    # the tanh approximation is not the erf GELU: the rule must not match that one
    assert ((gelu_tanh_tangent(x, xd) - torch.func.jvp(F.gelu, (x,), (xd,))[1]).norm() > 1e-6)


@pytest.mark.parametrize("d", [8, 72])
def test_layernorm_modulate(d):
    x, xd = rnd(2, 5, d) * 2 + 0.5, rnd(2, 5, d)
    shift, scale, sd, cd = rnd(2, d), rnd(2, d), rnd(2, d), rnd(2, d)

    def f(x_, shift_, scale_):
        return modulate(F.layer_norm(x_, (d,), eps=1e-6), shift_, scale_)

    ref = torch.func.jvp(f, (x, shift, scale), (xd, sd, cd))[1]
    close(layernorm_modulate_tangent(x, xd, scale, sd, cd, 1e-6), ref)


@pytest.mark.parametrize("t_len,d", [(7, 8), (16, 72)])
def test_attention(t_len, d):
    q, k, v = rnd(2, 3, t_len, d), rnd(2, 3, t_len, d), rnd(2, 3, t_len, d)
    qd, kd, vd = rnd(2, 3, t_len, d), rnd(2, 3, t_len, d), rnd(2, 3, t_len, d)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qd, kd, vd))[1]
    close(attention_tangent(q, k, v, qd, kd, vd), ref)


def test_timestep_embedder():
    emb = randomize_(TimestepEmbedder(24), 3).double()
    t, td = torch.rand(6, generator=G, dtype=torch.float64), rnd(6)
    out, out_dot = timestep_embedder_jvp(emb, t, td)
    ref_out, ref_dot = torch.func.jvp(emb, (t,), (td,))
    close(out, ref_out)
    close(out_dot, ref_dot, 1e-10)  # sin/cos of t * 1000: a little more rounding than the rest
    assert out.requires_grad and not out_dot.requires_grad
