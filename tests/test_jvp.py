"""Reference JVP (flow_map_jvp): backends agree, match finite differences, keep gradients, ignore autocast.

Float64 checks: flow_map_jvp keeps float64 inputs in float64 (half precision is upcast to fp32) and the time
embedding follows a float64 t, so a model.double() is checked against float64 central finite differences.
"""
from __future__ import annotations

import math

import pytest
import torch

from dumo_engine.jvp import JVP_BACKENDS, flow_map_jvp
from dumo_engine.models import DualHeadDiT, build_model
from dumo_engine.models.dit import TimestepEmbedder

from helpers import randomize_

NUM_CLASSES = 10


def make_model(kind: str, seed: int) -> DualHeadDiT:
    torch.manual_seed(seed)
    if kind == "tiny":  # DiT-tiny preset: hidden 32, depth 2, 2 heads, patch 2
        m = build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=NUM_CLASSES)
    else:  # odd shape: 6x6 input, 3x3 tokens, hidden 24 over 3 heads
        m = DualHeadDiT(input_size=6, patch_size=2, in_channels=4, hidden_size=24, depth=2, num_heads=3,
                        num_classes=NUM_CLASSES)
    return randomize_(m, seed)


SHAPES = {"tiny": (2, 8), "odd": (3, 6)}  # kind -> (batch, input size)


def make_inputs(kind: str, seed: int):
    """Float32 inputs (exactly representable, so .double() of them is exact)."""
    n, s = SHAPES[kind]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, s, s, generator=g)
    t = torch.rand(n, generator=g) * 0.8 + 0.1
    h = t * torch.rand(n, generator=g)
    y = torch.randint(0, NUM_CLASSES + 1, (n,), generator=g)
    a = torch.randn(n, 4, s, s, generator=g)
    return z, t, h, y, a


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _timestep_embedding_follow_dtype(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@pytest.mark.parametrize("kind", ["tiny", "odd"])
@pytest.mark.parametrize("heads", ["vu", "u"])
def test_backends_agree_float32(kind, heads):
    """torch.func.jvp and forward_ad give the same v, u and du/dt in float32 (nonzero heads)."""
    model = make_model(kind, 1)
    z, t, h, y, a = make_inputs(kind, 2)

    def fn(z_, t_, h_):
        return model(z_, t_, h_, y, heads=heads)

    res = {b: flow_map_jvp(fn, z, t, h, a, backend=b) for b in JVP_BACKENDS}
    (v1, u1, d1), (v2, u2, d2) = res["func"], res["forward_ad"]
    assert d1.shape == d2.shape == u1.shape == z.shape
    assert d1.dtype == d2.dtype == torch.float32
    assert d1.abs().max() > 0
    assert rel(d2, d1) < 1e-5
    assert rel(u2, u1) < 1e-6
    with torch.no_grad():
        v_ref, u_ref = model(z, t, h, y, heads=heads)
    assert rel(u1, u_ref) < 1e-6
    if heads == "u":
        assert v1 is None and v2 is None
    else:
        assert rel(v1, v_ref) < 1e-6 and rel(v2, v_ref) < 1e-6


def _central_fd(model, z, t, h, y, a, heads, eps=1e-6):
    """Richardson-extrapolated central difference of u along (z, t, h) -> (a, 1, 1), float64."""
    def d(e):
        with torch.no_grad():
            up = model(z + e * a, t + e, h + e, y, heads=heads)[1]
            dn = model(z - e * a, t - e, h - e, y, heads=heads)[1]
        return (up - dn) / (2 * e)

    return (4 * d(eps) - d(2 * eps)) / 3


@pytest.mark.parametrize("kind", ["tiny", "odd"])
@pytest.mark.parametrize("heads", ["vu", "u"])
def test_backends_match_finite_differences_float64(kind, heads):
    """Both backends equal central finite differences of the float64 model along (a, 1, 1)."""
    model = make_model(kind, 3).double()
    z, t, h, y, a = make_inputs(kind, 4)

    def fn(z_, t_, h_):
        return model(z_, t_, h_, y, heads=heads)

    z64, t64, h64, a64 = z.double(), t.double(), h.double(), a.double()
    fd = _central_fd(model, z64, t64, h64, y, a64, heads)
    assert fd.abs().max() > 0
    for backend in JVP_BACKENDS:
        v, u, dudt = flow_map_jvp(fn, z64, t64, h64, a64, backend=backend)
        assert dudt.dtype == torch.float64
        assert rel(dudt, fd) < 1e-7, backend


def test_finite_differences_detect_a_wrong_tangent():
    """Control: the FD comparison is sensitive; dropping the h tangent (r moving with t) gives a different du/dt."""
    model = make_model("odd", 3).double()
    z, t, h, y, a = make_inputs("odd", 4)
    z64, t64, h64, a64 = z.double(), t.double(), h.double(), a.double()
    fd = _central_fd(model, z64, t64, h64, y, a64, "u")
    h_frozen = h64.clone()

    def fn_no_h(z_, t_, h_):  # h carries no tangent
        return model(z_.double(), t_.double(), h_frozen, y, heads="u")

    _, _, d = flow_map_jvp(fn_no_h, z, t, h, a)
    assert rel(d, fd) > 1e-3


@pytest.mark.parametrize("kind", ["tiny", "odd"])
def test_float32_jvp_close_to_float64_fd(kind):
    """The default fp32 path (shipped model, fp32 time embedding) is within fp32-level error of float64 FD."""
    model = make_model(kind, 5)
    z, t, h, y, a = make_inputs(kind, 6)
    _, _, d = flow_map_jvp(lambda z_, t_, h_: model(z_, t_, h_, y), z, t, h, a)
    assert d.dtype == torch.float32
    model64 = make_model(kind, 5).double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TimestepEmbedder, "timestep_embedding", staticmethod(_timestep_embedding_follow_dtype))
        fd = _central_fd(model64, z.double(), t.double(), h.double(), y, a.double(), "vu")
    assert rel(d.double(), fd) < 5e-4  # measured 2e-5 (tiny), 3e-5 (odd)


@pytest.mark.parametrize("backend", JVP_BACKENDS)
def test_gradients_flow_from_primals_and_dudt_is_detached(backend):
    """v and u carry autograd to the parameters (nonzero grads, right head each); du/dt is detached."""
    model = make_model("tiny", 7)
    z, t, h, y, a = make_inputs("tiny", 8)
    a = a.requires_grad_()  # even a tangent with history must not leak into du/dt
    v, u, dudt = flow_map_jvp(lambda z_, t_, h_: model(z_, t_, h_, y), z, t, h, a, backend=backend)
    assert not dudt.requires_grad and dudt.grad_fn is None
    assert u.requires_grad and v.requires_grad

    u.pow(2).sum().backward(retain_graph=True)
    for name, p in model.named_parameters():
        if name.startswith("v_head."):
            assert p.grad is None or p.grad.abs().sum() == 0, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)

    v.pow(2).sum().backward()
    for name, p in model.named_parameters():
        if not name.startswith("u_head."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.u_head.parameters())


@pytest.mark.parametrize("backend", JVP_BACKENDS)
def test_autocast_bf16_does_not_change_jvp(backend):
    """Under bf16 autocast the JVP still runs in fp32: du/dt is float32 and equals the no-autocast result."""
    model = make_model("tiny", 9)
    z, t, h, y, a = make_inputs("tiny", 10)

    def fn(z_, t_, h_):
        return model(z_, t_, h_, y)

    v0, u0, d0 = flow_map_jvp(fn, z, t, h, a, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v1, u1, d1 = flow_map_jvp(fn, z, t, h, a, backend=backend)
        _, u_bf16 = model(z, t, h, y)
        # bf16 inputs (as a bf16 training step would pass) are upcast, not kept in bf16
        _, _, d2 = flow_map_jvp(fn, z.bfloat16(), t, h, a.bfloat16(), backend=backend)
    assert u_bf16.dtype == torch.bfloat16  # control: autocast really is active outside the JVP
    assert d1.dtype == u1.dtype == v1.dtype == d2.dtype == torch.float32
    torch.testing.assert_close(d1, d0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u1, u0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-6)
    _, _, d2_ref = flow_map_jvp(fn, z.bfloat16().float(), t, h, a.bfloat16().float(), backend=backend)
    torch.testing.assert_close(d2, d2_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", JVP_BACKENDS)
def test_constant_u_gives_zero_dudt(backend):
    """A u that ignores its inputs has du/dt = 0 with u's shape (forward_ad's no-tangent path included)."""
    const = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z, t, h, _, a = make_inputs("tiny", 11)
    v, u, dudt = flow_map_jvp(lambda z_, t_, h_: (None, const), z, t, h, a, backend=backend)
    assert v is None and torch.equal(u, const)
    assert dudt.shape == const.shape and torch.count_nonzero(dudt) == 0


def test_unknown_backend_raises():
    """An unknown backend name raises ValueError naming it."""
    z, t, h, _, a = make_inputs("tiny", 12)
    with pytest.raises(ValueError, match="bogus"):
        flow_map_jvp(lambda z_, t_, h_: (None, z_), z, t, h, a, backend="bogus")


# ----------------------------------------------------------------------------------------------------------------
# float64 end to end (these were bugs once: fp32 downcast in flow_map_jvp and an fp32 time embedding)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", JVP_BACKENDS)
def test_flow_map_jvp_accepts_float64_model(backend):
    """A float64 model with float64 inputs: du/dt comes back float64 and equals float64 finite differences."""
    model = make_model("odd", 13).double()
    z, t, h, y, a = (x.double() if x.is_floating_point() else x for x in make_inputs("odd", 14))
    _, _, dudt = flow_map_jvp(lambda z_, t_, h_: model(z_, t_, h_, y, heads="u"), z, t, h, a, backend=backend)
    assert dudt.dtype == torch.float64
    assert rel(dudt, _central_fd(model, z, t, h, y, a, "u")) < 1e-7


def test_time_embedding_honours_float64():
    """t_embedder of a float64 model is float64-accurate (same as the dtype-following sinusoid formula)."""
    torch.manual_seed(15)
    emb = randomize_(TimestepEmbedder(16), 15).double()
    t = torch.rand(5, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    ref = emb.mlp(_timestep_embedding_follow_dtype(t * emb.time_scale, emb.frequency_embedding_size))
    err = (emb(t) - ref).abs().max().item()
    assert err < 1e-12, f"max abs error {err:.2e}"


def test_reference_under_the_callers_autocast():
    """autocast=True keeps the caller's bf16 autocast for the reference pass (the like-for-like baseline of a bf16
    step): its GEMMs run in bf16, so its outputs differ from the float32 oracle's by bf16 rounding, not more; du/dt
    comes back float32. Without the flag the pass is float32 under the same context, bit for bit the oracle's."""
    m = randomize_(build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=10), seed=3)
    g = torch.Generator().manual_seed(4)
    z, a = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    h, y = 0.4 * t, torch.randint(0, 10, (4,), generator=g)

    def fn(z_, t_, h_):
        return m(z_, t_, h_, y, heads="vu")

    v32, u32, d32 = flow_map_jvp(fn, z, t, h, a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v0, u0, d0 = flow_map_jvp(fn, z, t, h, a)
        vb, ub, db = flow_map_jvp(fn, z, t, h, a, autocast=True)
    assert torch.equal(d0, d32) and torch.equal(u0, u32)
    assert db.dtype == torch.float32 and ub.dtype == torch.bfloat16
    for got, want in ((vb, v32), (ub, u32), (db, d32)):
        err = ((got.float() - want).norm() / want.norm()).item()
        assert 1e-4 < err < 3e-2, err
