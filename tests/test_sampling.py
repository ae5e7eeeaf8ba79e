"""Samplers on an analytic Gaussian field (exact flow map known) and on a tiny DualHeadDiT (determinism)."""
from __future__ import annotations

import pytest
import torch

from dumo_engine.models import build_model
from dumo_engine.sampling import initial_noise, sample, sample_u, sample_u_1step, sample_u_2step, sample_v

NUM_CLASSES = 10
SHAPE = (2, 3, 3)


def b4(x):
    return x.view(-1, 1, 1, 1)


class GaussianModel:
    """Exact fields of z_t = (1 - t) x + t e, x ~ N(mu, s^2) per element, as a sampler model (float64 inside).

    m_t = (1 - t) mu, sig_t = sqrt((1 - t)^2 s^2 + t^2), flow map z_r = m_r + sig_r / sig_t (z_t - m_t);
    u = (z_t - z_r)/h in a form without 1/h, v its h -> 0 limit. Records the (t, h) of each call.
    """

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
        self.s = 0.3 + torch.rand(*SHAPE, generator=g, dtype=torch.float64)
        self.calls = []

    def m(self, t):
        return (1 - b4(t)) * self.mu

    def sig(self, t):
        return torch.sqrt((1 - b4(t)) ** 2 * self.s**2 + b4(t) ** 2)

    def flow(self, z, t, r):
        t = torch.full((z.shape[0],), float(t), dtype=torch.float64)
        r = torch.full((z.shape[0],), float(r), dtype=torch.float64)
        return self.m(r) + self.sig(r) / self.sig(t) * (z.double() - self.m(t))

    def __call__(self, z, t, h, y, heads="vu"):
        self.calls.append((heads, t.clone(), h.clone()))
        z, t, h = z.double(), t.double(), h.double()
        r = t - h
        tb, rb = b4(t), b4(r)
        st, sr = self.sig(t), self.sig(r)
        v = -self.mu + (z - self.m(t)) * (tb - (1 - tb) * self.s**2) / st**2
        u = -self.mu + (z - self.m(t)) * ((tb + rb) - (2 - tb - rb) * self.s**2) / (st * (st + sr))
        return (v if "v" in heads else None), (u if "u" in heads else None)


def noise(dtype=torch.float64, n=5, seed=1):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


Y = torch.zeros(5, dtype=torch.long)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_u_one_step_is_the_exact_flow_map(dtype, tol):
    """x = z_1 - u(z_1, t=1, h=1) lands on the exact endpoint mu + s z_1 (one call, t = 1, h = 1)."""
    f = GaussianModel(2)
    z1 = noise(dtype)
    x = sample_u_1step(f, z1, Y)
    assert x.dtype == dtype
    exact = f.mu + f.s * z1.double()
    torch.testing.assert_close(x.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(f.flow(z1, 1.0, 0.0), exact, rtol=1e-12, atol=1e-12)  # the oracle itself
    assert len(f.calls) == 1
    heads, t, h = f.calls[0]
    assert heads == "u" and torch.all(t == 1) and torch.all(h == 1)


@pytest.mark.parametrize("t_mid", [0.5, 0.3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_u_two_step_is_exact(t_mid, dtype, tol):
    """1 -> t_mid -> 0: the intermediate point is the exact z_{t_mid}, the endpoint the exact z_0."""
    f = GaussianModel(3)
    z1 = noise(dtype)
    x = sample_u_2step(f, z1, Y, t_mid=t_mid)
    torch.testing.assert_close(x.double(), f.mu + f.s * z1.double(), rtol=tol, atol=tol)
    mid = sample_u(f, z1, Y, (1.0, t_mid))
    torch.testing.assert_close(mid.double(), f.flow(z1, 1.0, t_mid), rtol=tol, atol=tol)
    (_, t_a, h_a), (_, t_b, h_b) = f.calls[:2]
    torch.testing.assert_close(t_a, torch.ones(5))
    torch.testing.assert_close(h_a, torch.full((5,), 1 - t_mid))
    torch.testing.assert_close(t_b, torch.full((5,), t_mid))
    torch.testing.assert_close(h_b, torch.full((5,), t_mid))


def test_u_arbitrary_grid_is_exact():
    """Any decreasing grid of flow-map steps composes to the exact endpoint."""
    f = GaussianModel(4)
    z1 = noise()
    x = sample_u(f, z1, Y, (1.0, 0.8, 0.45, 0.1, 0.0))
    torch.testing.assert_close(x, f.mu + f.s * z1, rtol=1e-6, atol=1e-6)
    assert len(f.calls) == 4


def test_u_sampler_detects_a_wrong_model():
    """Control: a u head that is off by a little gives a visibly wrong one-step endpoint."""
    f = GaussianModel(5)

    def wrong(z, t, h, y, heads="vu"):
        v, u = f(z, t, h, y, heads)
        return v, u * 1.01

    z1 = noise()
    assert (sample_u_1step(wrong, z1, Y) - (f.mu + f.s * z1)).abs().max() > 1e-3


def _err(x, f, z1):
    return (x.double() - (f.mu + f.s * z1.double())).abs().max().item()


def test_v_sampler_converges_and_heun_beats_euler():
    """Euler on dz/dt = v approaches the exact endpoint (first order); Heun is far more accurate (second order)."""
    f = GaussianModel(6)
    z1 = noise()
    e = {n: _err(sample_v(f, z1, Y, n, "euler"), f, z1) for n in (10, 20, 400)}
    hn = {n: _err(sample_v(f, z1, Y, n, "heun"), f, z1) for n in (10, 20)}
    assert e[400] < 0.02 and e[400] < e[20] / 15 < e[10] / 15  # -> 0 like 1/N (measured 4.3/N)
    assert 1.6 < e[10] / e[20] < 2.4  # first order
    assert 2.8 < hn[10] / hn[20] < 5.0  # second order (measured 3.4)
    assert hn[10] < e[10] / 10 and hn[20] < e[20] / 10


def test_v_sampler_calls_the_velocity_at_h_zero():
    """sample_v calls the v head at h = 0 on the uniform grid 1, 1 - 1/N, ..., 1/N (Euler: N calls)."""
    f = GaussianModel(7)
    sample_v(f, noise(), Y, 4, "euler")
    assert [c[0] for c in f.calls] == ["v"] * 4
    torch.testing.assert_close(torch.stack([c[1][0] for c in f.calls]), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    assert all(torch.count_nonzero(c[2]) == 0 for c in f.calls)
    f.calls.clear()
    sample_v(f, noise(), Y, 4, "heun")
    assert len(f.calls) == 8


def test_v_sampler_with_u_head_at_h_zero():
    """head="u" integrates the u head at h = 0, which for the exact field equals the v head."""
    f = GaussianModel(8)
    z1 = noise()
    a = sample_v(f, z1, Y, 6, "heun", head="v")
    b = sample_v(f, z1, Y, 6, "heun", head="u")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert {c[0] for c in f.calls} == {"v", "u"}


def test_sample_entry_point_on_exact_field():
    """sample(method="u1"/"u2") draws z_1 from the seed and returns the exact endpoint for that noise."""
    f = GaussianModel(9)
    y = torch.zeros(3, dtype=torch.long)
    z1 = initial_noise((3, *SHAPE), seed=11)
    for method in ("u1", "u2"):
        x = sample(f, y, SHAPE, method, seed=11, t_mid=0.4)
        torch.testing.assert_close(x.double(), f.mu + f.s * z1.double(), rtol=1e-5, atol=1e-5)


def test_initial_noise_is_seeded_privately():
    """initial_noise depends only on the seed (not the global RNG) and different seeds differ."""
    torch.manual_seed(0)
    a = initial_noise((2, 3, 4, 4), 5)
    torch.manual_seed(1)
    torch.randn(10)
    b = initial_noise((2, 3, 4, 4), 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, initial_noise((2, 3, 4, 4), 6))
    assert initial_noise((2, 3), 5, dtype=torch.float64).dtype == torch.float64


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    model = build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("method", ["u1", "u2", "euler", "heun"])
def test_sample_is_deterministic_given_seed(tiny_dit, method):
    """Same seed -> identical samples (whatever the global RNG does); another seed -> different samples."""
    y = torch.tensor([0, 3, NUM_CLASSES])
    torch.manual_seed(100)
    a = sample(tiny_dit, y, (4, 8, 8), method, seed=7, steps=3)
    torch.manual_seed(200)
    b = sample(tiny_dit, y, (4, 8, 8), method, seed=7, steps=3)
    c = sample(tiny_dit, y, (4, 8, 8), method, seed=8, steps=3)
    assert a.shape == (3, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the model really acts: the sample is not just the initial noise
    assert not torch.allclose(a, initial_noise((3, 4, 8, 8), 7), atol=1e-3)


def test_sample_methods_differ(tiny_dit):
    """u1, u2, euler and heun are different samplers (same noise, different outputs)."""
    y = torch.tensor([1, 2])
    outs = {m: sample(tiny_dit, y, (4, 8, 8), m, seed=3, steps=2) for m in ("u1", "u2", "euler", "heun")}
    names = list(outs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not torch.allclose(outs[names[i]], outs[names[j]]), (names[i], names[j])


@pytest.mark.parametrize("call", [
    lambda f, z: sample_u_2step(f, z, Y, t_mid=0.0),
    lambda f, z: sample_u_2step(f, z, Y, t_mid=1.0),
    lambda f, z: sample_u_2step(f, z, Y, t_mid=1.5),
    lambda f, z: sample_u_2step(f, z, Y, t_mid=-0.2),
    lambda f, z: sample(f, Y, SHAPE, "u2", seed=0, t_mid=1.0),
    lambda f, z: sample_v(f, z, Y, 0),
    lambda f, z: sample_v(f, z, Y, -3, "heun"),
    lambda f, z: sample(f, Y, SHAPE, "euler", seed=0, steps=0),
    lambda f, z: sample_v(f, z, Y, 4, "rk4"),
    lambda f, z: sample(f, Y, SHAPE, "ddim", seed=0),
    lambda f, z: sample_u(f, z, Y, (1.0, 0.5, 0.5, 0.0)),
    lambda f, z: sample_u(f, z, Y, (1.0, 1.2, 0.0)),
    lambda f, z: sample_u(f, z, Y, (0.0, 1.0)),
    lambda f, z: sample_u(f, z, Y, (1.0,)),
], ids=["t_mid0", "t_mid1", "t_mid1.5", "t_mid-0.2", "sample_t_mid1", "steps0", "steps-3", "sample_steps0",
        "solver_rk4", "method_ddim", "grid_repeat", "grid_up", "grid_increasing", "grid_single"])
def test_bad_arguments_raise_value_error(call):
    """Out-of-range t_mid, steps < 1, unknown solver/method and bad time grids raise ValueError, before any call."""
    f = GaussianModel(10)
    with pytest.raises(ValueError):
        call(f, noise())
    assert f.calls == []


def test_sampler_head_is_checked():
    """A head other than "v" or "u" is a named error (it failed later with AttributeError on None)."""
    from dumo_engine.sampling import sample

    model = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="head must be 'v' or 'u', got 'V'"):
        sample(model, torch.tensor([1, 2]), (1, 8, 8), "euler", 0, velocity_head="V")
