"""Objectives: the MeanFlow identity on analytic fields, hand-computed losses for FlowMatching / MeanFlow / DuMo,
folded CFG, time sampling, tangent / target-velocity options and label dropout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dumo_engine.jvp import flow_map_jvp
from dumo_engine.objectives import OBJECTIVES, DuMo, FlowMatching, GuidanceConfig, MeanFlow
from dumo_engine.objectives.common import guided_target, logit_normal, sample_t_r

NUM_CLASSES = 5
NULL = NUM_CLASSES


def b4(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# analytic fields
# ----------------------------------------------------------------------------------------------------------------
class GaussianField:
    """Exact fields of z_t = (1 - t) x + t e for x ~ N(mu, s^2) independently per element (float64).

    m_t = (1 - t) mu, sig_t = sqrt((1 - t)^2 s^2 + t^2); flow map z_r = m_r + sig_r / sig_t (z_t - m_t).
    u = (z_t - z_r) / h written without the 1/h: u = -mu + (z - m_t) [(t + r) - (2 - t - r) s^2] / (sig_t (sig_t + sig_r)).
    """

    def __init__(self, shape, seed):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(*shape, generator=g, dtype=torch.float64)
        self.s = 0.3 + torch.rand(*shape, generator=g, dtype=torch.float64)

    def m(self, t):
        return (1 - b4(t)) * self.mu

    def sig(self, t):
        t = b4(t)
        return torch.sqrt((1 - t) ** 2 * self.s**2 + t**2)

    def v(self, z, t):
        tb = b4(t)
        return -self.mu + (z - self.m(t)) * (tb - (1 - tb) * self.s**2) / self.sig(t) ** 2

    def u(self, z, t, h):
        r = t - h
        tb, rb = b4(t), b4(r)
        st, sr = self.sig(t), self.sig(r)
        return -self.mu + (z - self.m(t)) * ((tb + rb) - (2 - tb - rb) * self.s**2) / (st * (st + sr))

    def flow(self, z, t, r):
        """Exact z_r from z_t."""
        return self.m(r) + self.sig(r) / self.sig(t) * (z - self.m(t))

    def fn(self, z, t, h):
        """fn(z, t, h) -> (v, u) in float64 (flow_map_jvp hands us fp32 primals: upcast exactly)."""
        z, t, h = z.double(), t.double(), h.double()
        return self.v(z, t), self.u(z, t, h)

    def model(self, z, t, h, y, heads="vu"):
        v, u = self.fn(z, t, h)
        return (v if "v" in heads else None), (u if "u" in heads else None)


class PointField:
    """Data = the single point x0: v(z, t) = u(z, t, h) = (z - x0) / t."""

    def __init__(self, x0):
        self.x0 = x0

    def fn(self, z, t, h):
        z, t = z.double(), t.double()
        w = (z - self.x0) / b4(t)
        return w, w + 0 * b4(h)

    def model(self, z, t, h, y, heads="vu"):
        v, u = self.fn(z, t, h)
        return (v if "v" in heads else None), (u if "u" in heads else None)


def field_inputs(seed, n=4, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *shape, generator=g)
    t = 0.1 + 0.85 * torch.rand(n, generator=g)
    r = t * torch.rand(n, generator=g)
    r[0] = 0.0  # one full step t -> 0
    return z, t, t - r


def test_gaussian_field_is_self_consistent():
    """Sanity of the analytic field itself: u equals (z_t - z_r)/h, and u -> v as h -> 0 (so the oracle is right)."""
    f = GaussianField((2, 3, 3), seed=0)
    z, t, h = (x.double() for x in field_inputs(1))
    torch.testing.assert_close(f.u(z, t, h), (z - f.flow(z, t, t - h)) / b4(h), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.u(z, t, torch.full_like(t, 1e-9)), f.v(z, t), rtol=1e-7, atol=1e-7)
    # v is the time derivative of the flow: d/dr z_r at r = t equals v
    eps = 1e-6
    dz = (f.flow(z, t, t + eps) - f.flow(z, t, t - eps)) / (2 * eps)
    torch.testing.assert_close(dz, f.v(z, t), rtol=1e-7, atol=1e-7)


def _identity_error(field, z, t, h, tangent, fn=None) -> float:
    zd, td, hd = z.double(), t.double(), h.double()
    _, _, dudt = flow_map_jvp(fn or field.fn, z, t, h, tangent)
    u_tgt = field.v(zd, td) - b4(hd.clamp(0, 1)) * dudt
    u_exact = field.u(zd, td, hd)
    return ((u_tgt - u_exact).norm() / u_exact.norm()).item()


def test_meanflow_identity_gaussian():
    """u = v - h du/dt with du/dt = JVP of the exact u along (v, 1, 1): exact on the Gaussian field."""
    f = GaussianField((2, 3, 3), seed=2)
    z, t, h = field_inputs(3)
    v = f.v(z.double(), t.double())
    assert _identity_error(f, z, t, h, v) < 1e-6


def test_meanflow_identity_gaussian_wrong_tangents_fail():
    """Control: zero velocity tangent, or a moving r (h without tangent), breaks the identity."""
    f = GaussianField((2, 3, 3), seed=2)
    z, t, h = field_inputs(3)
    v = f.v(z.double(), t.double())
    assert _identity_error(f, z, t, h, torch.zeros_like(v)) > 1e-2
    h_const = h.double().clone()
    assert _identity_error(f, z, t, h, v, fn=lambda z_, t_, h_: f.fn(z_, t_, h_const)) > 1e-2
    assert _identity_error(f, z, t, h, 2 * v) > 1e-2


def test_meanflow_identity_single_point():
    """Single data point: u = v = (z - x0)/t, du/dt = 0 along the true velocity; a zero tangent breaks it."""
    x0 = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = PointField(x0)
    z, t, h = field_inputs(5)
    v, _ = f.fn(z, t, h)
    _, _, dudt = flow_map_jvp(f.fn, z, t, h, v)
    assert dudt.abs().max() < 1e-5 * v.abs().max()
    u_tgt = v - b4(h.double().clamp(0, 1)) * dudt
    torch.testing.assert_close(u_tgt, v, rtol=1e-6, atol=1e-6)
    _, _, dudt0 = flow_map_jvp(f.fn, z, t, h, torch.zeros_like(v))
    assert ((v - b4(h.double()) * dudt0 - v).norm() / v.norm()).item() > 1e-2


def test_self_bootstrapped_dumo_loss_vanishes_on_exact_field():
    """End to end: DuMo with tangent = target = model velocity (its v head) and the exact Gaussian field as the
    model has L_u = 0 (the identity holds inside the loss); with the data tangent and target it does not."""
    f = GaussianField((2, 3, 3), seed=6)
    g = torch.Generator().manual_seed(7)
    x = f.mu + f.s * torch.randn(16, 2, 3, 3, generator=g, dtype=torch.float64)
    x = x.float()
    y = torch.randint(0, NUM_CLASSES, (16,), generator=g)
    obj = DuMo(NUM_CLASSES, equal_fraction=0.0, tangent="model", target_velocity="model", adaptive_p=0.0)
    torch.manual_seed(8)
    _, m_model = obj.loss(f.model, x, y)
    obj_data = DuMo(NUM_CLASSES, equal_fraction=0.0, adaptive_p=0.0)
    torch.manual_seed(8)
    _, m_data = obj_data.loss(f.model, x, y)
    assert m_model["mse_u"].item() < 1e-9
    assert m_data["mse_u"].item() > 1e-2


def test_single_point_meanflow_loss_vanishes_with_data_tangent():
    """Single-point data: the conditional velocity is the true one, so MeanFlow's data tangent gives L_u = 0."""
    x0 = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(9))
    f = PointField(x0.double())
    x = x0.expand(6, 2, 3, 3).clone()
    y = torch.arange(6) % NUM_CLASSES
    torch.manual_seed(10)
    loss, metrics = MeanFlow(NUM_CLASSES, equal_fraction=0.5, adaptive_p=0.0).loss(f.model, x, y)
    assert metrics["mse_u"].item() < 1e-9


# ----------------------------------------------------------------------------------------------------------------
# stub model and hand-computed losses
# ----------------------------------------------------------------------------------------------------------------
P = dict(a=0.8, b=-0.3, g=0.35, c=0.6, d=0.4, e=-0.5, q=0.9)


def _wrapped(x) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


class Stub(nn.Module):
    """v = a x + b t + g h + ev[y];  u = c x + d t + e h + q x t h + eu[y]. Records every call."""

    def __init__(self, seed=0):
        super().__init__()
        for k, val in P.items():
            setattr(self, k, nn.Parameter(torch.tensor(val)))
        gen = torch.Generator().manual_seed(seed)
        self.ev = nn.Parameter(torch.randn(NUM_CLASSES + 1, generator=gen))
        self.eu = nn.Parameter(torch.randn(NUM_CLASSES + 1, generator=gen))
        self.calls = []

    def forward(self, x, t, h, y, heads="vu"):
        rec = {"heads": heads, "y": y.clone(), "n": x.shape[0]}
        if not _wrapped(h):
            rec["h"] = h.detach().clone()
        self.calls.append(rec)
        tb, hb = b4(t), b4(h)
        v = self.a * x + self.b * tb + self.g * hb + b4(self.ev[y]) if "v" in heads else None
        u = self.c * x + self.d * tb + self.e * hb + self.q * x * tb * hb + b4(self.eu[y]) if "u" in heads else None
        return v, u


def V(z, t, h, y, ev):
    return P["a"] * z + P["b"] * b4(t) + P["g"] * b4(h) + b4(ev[y])


def U(z, t, h, y, eu):
    return P["c"] * z + P["d"] * b4(t) + P["e"] * b4(h) + P["q"] * z * b4(t) * b4(h) + b4(eu[y])


def dU(z, t, h, a):
    """JVP of U along (z, t, h) -> (a, 1, 1)."""
    tb, hb = b4(t), b4(h)
    return P["c"] * a + P["d"] + P["e"] + P["q"] * (a * tb * hb + z * hb + z * tb)


def draws(seed, kind, n, shape, P_mean=-0.4, P_std=1.0, equal_fraction=0.0, label_dropout=0.1):
    """The objective's random numbers, drawn again in its order: t (and r), noise, label dropout."""
    torch.manual_seed(seed)
    if kind == "flow_matching":
        t = torch.sigmoid(torch.randn(n) * P_std + P_mean)
        r = t.clone()
    else:
        a = torch.sigmoid(torch.randn(n) * P_std + P_mean)
        b = torch.sigmoid(torch.randn(n) * P_std + P_mean)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        k = int(round(equal_fraction * n))
        if k > 0:
            idx = torch.randperm(n)[:k]
            r[idx] = t[idx]
    e = torch.randn(n, *shape)
    dropped = torch.rand(n) < label_dropout if label_dropout > 0 else torch.zeros(n, dtype=torch.bool)
    return t.double(), r.double(), e.double(), dropped


def weight(L, p, eps):
    return L if p == 0 else L / (L + eps) ** p


def expected(kind, stub, x, y, seed, *, guidance=GuidanceConfig(), p=1.0, eps=0.01, equal_fraction=0.0,
             lambda_v=1.0, tangent="data", target_velocity="data"):
    """Hand computation (float64) of the loss and its pieces, for the Stub model."""
    n, shape = x.shape[0], tuple(x.shape[1:])
    t, r, e, dropped = draws(seed, kind, n, shape, equal_fraction=equal_fraction,
                             label_dropout=guidance.label_dropout)
    ev, eu = stub.ev.detach().double(), stub.eu.detach().double()
    x = x.double()
    z = (1 - b4(t)) * x + b4(t) * e
    v = e - x
    y = torch.where(dropped, torch.full_like(y, NULL), y)
    zero = torch.zeros_like(t)
    h = t - r
    vel = V if kind in ("flow_matching", "dumo") else (lambda z_, t_, h_, y_, _: U(z_, t_, h_, y_, eu))
    table = ev
    v_c = vel(z, t, zero, y, table)
    v_u = vel(z, t, zero, torch.full_like(y, NULL), table)
    active = (t >= guidance.t_lo) & (t <= guidance.t_hi) & ~dropped
    w, k = guidance.w, guidance.k
    v_g = torch.where(b4(active), w * v + k * v_c + (1 - w - k) * v_u, v)
    out = dict(t=t, r=r, dropped=dropped, active=active, z=z, v=v, v_g=v_g, v_c=v_c, y=y, h=h)
    if kind == "flow_matching":
        v_hat = V(z, t, zero, y, ev)
        L = (v_hat - v_g).pow(2).flatten(1).sum(1)
        out.update(loss=weight(L, p, eps).mean(), L_v=L, v_hat=v_hat)
        return out
    A = v_g if tangent == "data" else v_c
    B = v_g if target_velocity == "data" else v_c
    u_hat = U(z, t, h, y, eu)
    u_tgt = B - b4(h.clamp(0, 1)) * dU(z, t, h, A)
    Lu = (u_hat - u_tgt).pow(2).flatten(1).sum(1)
    loss = weight(Lu, p, eps).mean()
    out.update(u_hat=u_hat, u_tgt=u_tgt, L_u=Lu)
    if kind == "dumo":
        v_hat = V(z, t, h, y, ev)
        Lv = (v_hat - v_g).pow(2).flatten(1).sum(1)
        loss = loss + lambda_v * weight(Lv, p, eps).mean()
        out.update(v_hat=v_hat, L_v=Lv)
    out["loss"] = loss
    return out


def batch(seed, n=6, shape=(2, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def close(a, b, rtol=2e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=1e-6)


def test_flow_matching_plain_mse_by_hand():
    """FlowMatching, p = 0, no dropout, no CFG: loss = mean_i sum (v_hat - (e - x))^2, written out explicitly."""
    x, y = batch(0, n=3)
    stub = Stub(1)
    obj = FlowMatching(NUM_CLASSES, adaptive_p=0.0, guidance=GuidanceConfig(label_dropout=0.0))
    torch.manual_seed(123)
    loss, metrics = obj.loss(stub, x, y)
    torch.manual_seed(123)
    t = torch.sigmoid(torch.randn(3) * 1.0 - 0.4).double()
    e = torch.randn(3, 2, 2, 2).double()
    xd = x.double()
    total = 0.0
    for i in range(3):
        zi = (1 - t[i]) * xd[i] + t[i] * e[i]
        v_hat = 0.8 * zi - 0.3 * t[i] + 0.35 * 0.0 + stub.ev[y[i]].item()
        total += ((v_hat - (e[i] - xd[i])) ** 2).sum().item()
    close(loss, total / 3)
    close(metrics["mse_v"], total / 3)
    assert [c["heads"] for c in stub.calls] == ["v"] and torch.equal(stub.calls[0]["y"], y)
    assert torch.count_nonzero(stub.calls[0]["h"]) == 0


def test_flow_matching_guided_adaptive_by_hand():
    """FlowMatching with CFG in [0.3, 0.7], label dropout 0.4 and adaptive weighting p = 1."""
    x, y = batch(1, n=8)
    g = GuidanceConfig(w=0.5, k=0.3, t_lo=0.3, t_hi=0.7, label_dropout=0.4)
    stub = Stub(2)
    obj = FlowMatching(NUM_CLASSES, guidance=g, adaptive_p=1.0, adaptive_eps=0.01)
    torch.manual_seed(7)
    loss, _ = obj.loss(stub, x, y)
    ref = expected("flow_matching", stub, x, y, 7, guidance=g, p=1.0, eps=0.01)
    # the batch exercises every case: inside/outside the interval, dropped/kept
    assert ref["active"].any() and (~ref["active"] & ~ref["dropped"]).any() and ref["dropped"].any()
    close(loss, ref["loss"])
    # CFG pass: one no-grad call with [y_dropped, NULL] at h = 0, then the training pass
    assert [c["heads"] for c in stub.calls] == ["v", "v"]
    cfg = stub.calls[0]
    assert cfg["n"] == 16 and torch.equal(cfg["y"], torch.cat([ref["y"], torch.full_like(y, NULL)]))


@pytest.mark.parametrize("p,eps", [(0.0, 0.01), (0.75, 1e-3)])
def test_meanflow_by_hand(p, eps):
    """MeanFlow (u head only, equal_fraction 0.5 via randperm, label dropout 0.3): hand-computed loss."""
    x, y = batch(3, n=8)
    g = GuidanceConfig(label_dropout=0.3)
    stub = Stub(3)
    obj = MeanFlow(NUM_CLASSES, equal_fraction=0.5, guidance=g, adaptive_p=p, adaptive_eps=eps)
    torch.manual_seed(11)
    loss, metrics = obj.loss(stub, x, y)
    ref = expected("meanflow", stub, x, y, 11, guidance=g, p=p, eps=eps, equal_fraction=0.5)
    assert (ref["h"] == 0).sum() >= 4 and (ref["h"] > 0).any() and ref["dropped"].any()
    close(loss, ref["loss"])
    close(metrics["mse_u"], ref["L_u"].mean())
    assert "mse_v" not in metrics
    assert [c["heads"] for c in stub.calls] == ["u"]
    assert torch.equal(stub.calls[0]["y"], ref["y"])


def test_dumo_plain_mse_by_hand():
    """DuMo, p = 0, lambda_v = 0.5, no dropout/CFG: mean(L_u) + 0.5 mean(L_v), u_tgt = v - clip(t - r) du/dt."""
    x, y = batch(4)
    g = GuidanceConfig(label_dropout=0.0)
    stub = Stub(4)
    obj = DuMo(NUM_CLASSES, guidance=g, adaptive_p=0.0, lambda_v=0.5)
    torch.manual_seed(5)
    loss, metrics = obj.loss(stub, x, y)
    ref = expected("dumo", stub, x, y, 5, guidance=g, p=0.0, lambda_v=0.5)
    close(loss, ref["L_u"].mean() + 0.5 * ref["L_v"].mean())
    close(loss, ref["loss"])
    close(metrics["mse_u"], ref["L_u"].mean())
    close(metrics["mse_v"], ref["L_v"].mean())
    assert [c["heads"] for c in stub.calls] == ["vu"]  # one pass, both heads, no extra calls


def test_dumo_guided_adaptive_by_hand():
    """DuMo with CFG (w 0.6, k 0.3, t in [0.2, 0.8]), label dropout 0.5, p = 1: hand-computed loss."""
    x, y = batch(5, n=8)
    g = GuidanceConfig(w=0.6, k=0.3, t_lo=0.2, t_hi=0.8, label_dropout=0.5)
    stub = Stub(5)
    obj = DuMo(NUM_CLASSES, guidance=g, adaptive_p=1.0, adaptive_eps=0.01, lambda_v=1.0)
    torch.manual_seed(10)
    loss, _ = obj.loss(stub, x, y)
    ref = expected("dumo", stub, x, y, 10, guidance=g, p=1.0, eps=0.01)
    assert ref["active"].any() and (~ref["active"] & ~ref["dropped"]).any() and ref["dropped"].any()
    close(loss, ref["loss"])
    assert [c["heads"] for c in stub.calls] == ["v", "vu"]
    assert torch.count_nonzero(stub.calls[0]["h"]) == 0  # CFG uses the v head at h = 0


def test_dumo_gradient_by_hand():
    """d loss / d params: u_tgt, the adaptive weights and the CFG target are all stop-gradient."""
    x, y = batch(6, n=8)
    g = GuidanceConfig(w=0.6, k=0.3, t_lo=0.0, t_hi=0.9, label_dropout=0.3)
    stub = Stub(6)
    p, eps, lam = 1.0, 0.01, 0.7
    obj = DuMo(NUM_CLASSES, guidance=g, adaptive_p=p, adaptive_eps=eps, lambda_v=lam)
    torch.manual_seed(13)
    loss, _ = obj.loss(stub, x, y)
    loss.backward()
    ref = expected("dumo", stub, x, y, 13, guidance=g, p=p, eps=eps, lambda_v=lam)
    n = x.shape[0]
    z, t, h, yy = ref["z"], ref["t"], ref["h"], ref["y"]
    wu = 1 / (ref["L_u"] + eps) ** p  # per-sample weights, constants
    wv = 1 / (ref["L_v"] + eps) ** p
    ru = 2 * (ref["u_hat"] - ref["u_tgt"]) * b4(wu) / n
    rv = 2 * lam * (ref["v_hat"] - ref["v_g"]) * b4(wv) / n
    ones = torch.ones_like(z)
    grads = {
        "c": (ru * z).sum(), "d": (ru * b4(t)).sum(), "e": (ru * b4(h)).sum(), "q": (ru * z * b4(t * h)).sum(),
        "a": (rv * z).sum(), "b": (rv * b4(t)).sum(), "g": (rv * b4(h)).sum(),
        "eu": torch.zeros(NUM_CLASSES + 1, dtype=torch.float64).index_add_(0, yy, (ru * ones).flatten(1).sum(1)),
        "ev": torch.zeros(NUM_CLASSES + 1, dtype=torch.float64).index_add_(0, yy, (rv * ones).flatten(1).sum(1)),
    }
    for name, want in grads.items():
        got = getattr(stub, name).grad
        assert got is not None, name
        close(got, want, rtol=1e-4)
    assert ref["dropped"].any()


@pytest.mark.parametrize("cls,tangent,target", [
    (DuMo, "model", "data"), (DuMo, "data", "model"), (DuMo, "model", "model"),
    (MeanFlow, "model", "data"),
])
def test_model_tangent_and_target_velocity(cls, tangent, target):
    """tangent / target_velocity = "model" use the velocity head at h = 0 (v head for DuMo, u head for MeanFlow),
    from one extra no-grad call; the loss matches the hand computation and differs from (data, data)."""
    x, y = batch(7)
    g = GuidanceConfig(label_dropout=0.0)
    kind = cls.name
    stub = Stub(7)
    obj = cls(NUM_CLASSES, guidance=g, adaptive_p=0.0, tangent=tangent, target_velocity=target)
    torch.manual_seed(17)
    loss, _ = obj.loss(stub, x, y)
    ref = expected(kind, stub, x, y, 17, guidance=g, p=0.0, equal_fraction=obj.equal_fraction,
                   tangent=tangent, target_velocity=target, lambda_v=obj.lambda_v)
    close(loss, ref["loss"])
    vel_call, jvp_call = stub.calls
    assert vel_call["heads"] == ("v" if cls is DuMo else "u") and vel_call["n"] == x.shape[0]
    assert torch.count_nonzero(vel_call["h"]) == 0
    assert jvp_call["heads"] == ("vu" if cls is DuMo else "u")
    data_ref = expected(kind, stub, x, y, 17, guidance=g, p=0.0, equal_fraction=obj.equal_fraction,
                        lambda_v=obj.lambda_v)
    assert not torch.allclose(ref["loss"], data_ref["loss"], rtol=1e-3)


def test_data_options_make_no_extra_call():
    """With tangent = target = "data" and guidance off, DuMo calls the model exactly once."""
    x, y = batch(8)
    stub = Stub(8)
    DuMo(NUM_CLASSES, guidance=GuidanceConfig(label_dropout=0.0)).loss(stub, x, y)
    assert [c["heads"] for c in stub.calls] == ["vu"]


def test_meanflow_model_target_is_refused():
    """MeanFlow's velocity is its own u head at h = 0, so target_velocity = "model" makes a u target that never sees
    the data: u = 0 has zero loss, and a zero-initialised model stays there. Refused, naming the option."""
    with pytest.raises(ValueError, match="target_velocity=model needs a trained velocity head"):
        MeanFlow(NUM_CLASSES, target_velocity="model")
    with pytest.raises(ValueError, match="target_velocity=model"):
        MeanFlow(NUM_CLASSES, tangent="model", target_velocity="model")
    MeanFlow(NUM_CLASSES, tangent="model")  # the u head's velocity as the tangent only: the target keeps the data


@pytest.mark.parametrize("kwargs,named", [
    (dict(tangent="model"), "tangent=model"), (dict(target_velocity="model"), "target_velocity=model"),
    (dict(guidance=GuidanceConfig(w=0.5, k=0.3)), "guidance"),
])
def test_dumo_without_v_loss_refuses_options_that_read_the_v_head(kwargs, named):
    """lambda_v = 0 leaves the v head at its initial output; an option that reads it (the model tangent or target,
    guidance) is refused, naming it. Without those, lambda_v = 0 is allowed (the v head is then unused)."""
    assert GuidanceConfig(w=0.5, k=0.3).enabled
    with pytest.raises(ValueError, match=f"lambda_v=0 leaves the v head untrained, but {named}"):
        DuMo(NUM_CLASSES, lambda_v=0.0, **kwargs)
    DuMo(NUM_CLASSES, lambda_v=0.0, guidance=GuidanceConfig(label_dropout=0.0))
    DuMo(NUM_CLASSES, lambda_v=0.5, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(tangent="velocity"), dict(target_velocity="Data"), dict(equal_fraction=1.5), dict(equal_fraction=-0.1),
])
@pytest.mark.parametrize("cls", [DuMo, MeanFlow])
def test_invalid_options_raise(cls, kwargs):
    """Invalid option strings / fractions raise ValueError naming the option."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(NUM_CLASSES, **kwargs)


def test_invalid_lambda_v_and_backend_raise():
    """lambda_v < 0 and an unknown jvp backend raise ValueError at construction."""
    with pytest.raises(ValueError, match="lambda_v"):
        DuMo(NUM_CLASSES, lambda_v=-1.0)
    with pytest.raises(ValueError, match="jvp_backend.*nope"):
        DuMo(NUM_CLASSES, jvp_backend="nope")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("guided", [False, True])
def test_label_dropout_one_nulls_every_label(name, guided):
    """label_dropout = 1.0: every model call sees only the NULL class (CFG pass included)."""
    x, y = batch(10)
    g = GuidanceConfig(w=0.5, k=0.3, label_dropout=1.0) if guided else GuidanceConfig(label_dropout=1.0)
    stub = Stub(10)
    torch.manual_seed(21)
    OBJECTIVES[name](NUM_CLASSES, guidance=g).loss(stub, x, y)
    assert len(stub.calls) == (2 if guided else 1)
    for call in stub.calls:
        assert torch.all(call["y"] == NULL), call["heads"]


def test_label_dropout_rate_and_default():
    """The default GuidanceConfig drops ~10% of labels; the kept ones are unchanged."""
    x, y = batch(11, n=4000, shape=(1, 1, 1))
    stub = Stub(11)
    torch.manual_seed(22)
    FlowMatching(NUM_CLASSES).loss(stub, x, y)
    seen = stub.calls[0]["y"]
    frac = (seen == NULL).float().mean().item()
    assert 0.08 < frac < 0.12
    assert torch.equal(seen[seen != NULL], y[seen != NULL])


# ----------------------------------------------------------------------------------------------------------------
# CFG target, time sampling
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,k,t_lo,t_hi", [(1.0, 0.5, 0.0, 1.0), (0.2, 0.92, 0.0, 0.75), (0.6, 0.3, 0.25, 0.625)])
def test_guided_target_formula(w, k, t_lo, t_hi):
    """v_g = w v + k v_c + (1-w-k) v_u on kept rows with t in [t_lo, t_hi]; v on dropped rows and outside."""
    gen = torch.Generator().manual_seed(30)
    n = 12
    v, v_c, v_u = (torch.randn(n, 2, 3, 3, generator=gen) for _ in range(3))
    t = torch.rand(n, generator=gen)
    t[:3] = torch.tensor([t_lo, t_hi, 0.5 * (t_lo + t_hi)])  # interval ends (fp32-exact) are inside
    dropped = torch.rand(n, generator=gen) < 0.3
    dropped[2] = True
    out = guided_target(v, v_c, v_u, t, dropped, GuidanceConfig(w=w, k=k, t_lo=t_lo, t_hi=t_hi))
    for i in range(n):
        inside = t_lo <= t[i].item() <= t_hi and not dropped[i]
        want = w * v[i] + k * v_c[i] + (1 - w - k) * v_u[i] if inside else v[i]
        torch.testing.assert_close(out[i], want, rtol=1e-6, atol=1e-6)
    assert GuidanceConfig(w=w, k=k).enabled and not GuidanceConfig().enabled


@pytest.mark.parametrize("f,n", [(0.0, 1000), (0.25, 1000), (0.75, 1000), (0.5, 7), (1.0, 50), (0.3, 5)])
def test_sample_t_r_equal_fraction(f, n):
    """Exactly round(f n) rows have r == t (natural ties are ~impossible); r <= t; t, r in (0, 1)."""
    torch.manual_seed(40)
    t, r = sample_t_r(n, -0.4, 1.0, f, "cpu")
    assert t.shape == r.shape == (n,)
    assert (r <= t).all()
    assert ((t > 0) & (t < 1) & (r > 0) & (r < 1)).all()
    assert int((r == t).sum()) == int(round(f * n))


def test_sample_t_r_is_random_over_rows():
    """The r = t rows are a random subset (not always the first rows) and t, r are otherwise independent draws."""
    torch.manual_seed(41)
    t, r = sample_t_r(1000, -0.4, 1.0, 0.5, "cpu")
    eq = (r == t).float()
    assert 0.3 < eq[:500].mean().item() < 0.7 and 0.3 < eq[500:].mean().item() < 0.7
    torch.manual_seed(42)
    t2, r2 = sample_t_r(1000, -0.4, 1.0, 0.5, "cpu")
    assert not torch.equal(r == t, r2 == t2)


def test_logit_normal_statistics():
    """logit of the samples has mean ~ -0.4 and std ~ 1; pooled (t, r) with f = 0 are the same distribution."""
    torch.manual_seed(43)
    s = logit_normal(40000, -0.4, 1.0, "cpu")
    lg = torch.log(s) - torch.log1p(-s)
    assert abs(lg.mean().item() + 0.4) < 0.03 and abs(lg.std().item() - 1.0) < 0.03
    t, r = sample_t_r(20000, -0.4, 1.0, 0.0, "cpu")
    pooled = torch.cat([t, r]).double()
    lg = torch.log(pooled) - torch.log1p(-pooled)
    assert abs(lg.mean().item() + 0.4) < 0.03 and abs(lg.std().item() - 1.0) < 0.03
    # t is the max of two draws: its logit mean is mean + std / sqrt(pi)
    lt = torch.log(t.double()) - torch.log1p(-t.double())
    assert abs(lt.mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.05


def test_guidance_for_model_sizes():
    """Per-size ImageNet guidance from METHOD.md; unknown sizes get guidance off."""
    xl = GuidanceConfig.for_model("DiT-XL/2")
    assert (xl.w, xl.k, xl.t_lo, xl.t_hi, xl.enabled) == (0.2, 0.92, 0.0, 0.75, True)
    b = GuidanceConfig.for_model("DiT-B/2")
    assert (b.w, b.k, b.t_hi) == (1.0, 0.5, 1.0)
    assert GuidanceConfig.for_model("DiT-L/2").t_hi == 0.8
    assert not GuidanceConfig.for_model("DiT-digits").enabled


# ----------------------------------------------------------------------------------------------------------------
# float64 runs, refused settings, METHOD.md's constants
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["func", "fused"])
def test_float64_runs_keep_float64(backend):
    """A float64 model and batch (finite-difference checks) keep float64 through the CFG velocities, du/dt and the
    squared errors: the loss is float64 and equals the float32 run's to float32 accuracy only."""
    from dumo_engine.models import build_model
    from dumo_engine.objectives.common import model_velocity

    torch.manual_seed(0)
    model = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=NUM_CLASSES).double()
    for p in model.parameters():  # the zero-initialised heads and adaLN would make every output exact
        p.data.normal_(0, 0.2)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, NULL - 1])
    obj = DuMo(NUM_CLASSES, guidance=GuidanceConfig(w=0.6, k=0.2), jvp_backend=backend)
    draws = obj.draw(x.float())
    d64 = type(draws)({k: (v.double() if v.is_floating_point() else v) for k, v in draws.items()})
    loss64, m = obj.loss(model, x, y, d64)
    assert loss64.dtype == torch.float64 and m["mse_u"].dtype == torch.float64
    v_c, v_u = model_velocity(model, x, d64["t"], y, NULL, "v", with_uncond=True)
    assert v_c.dtype == v_u.dtype == torch.float64
    loss32, _ = obj.loss(model.float(), x.float(), y, draws)
    assert abs(loss64.item() - loss32.item()) < 1e-4 * abs(loss64.item())


def test_adaptive_eps_zero_is_refused():
    """eps = 0 with p > 0 weighs a zero-loss sample 0/0 (NaN): refused by every objective; p = 0 needs no eps."""
    from dumo_engine.objectives.common import adaptive_weight

    assert torch.isnan(adaptive_weight(torch.tensor([0.0, 2.0]), 1.0, 0.0))[0]  # what it would compute
    for cls in (DuMo, MeanFlow, FlowMatching):
        with pytest.raises(ValueError, match="adaptive_eps must be > 0 with adaptive_p = 1.0"):
            cls(NUM_CLASSES, adaptive_p=1.0, adaptive_eps=0.0)
        with pytest.raises(ValueError, match="adaptive_p must be >= 0"):
            cls(NUM_CLASSES, adaptive_p=-1.0)
        cls(NUM_CLASSES, adaptive_p=0.0, adaptive_eps=0.0)


@pytest.mark.parametrize("kw,match", [
    (dict(label_dropout=1.5), r"label_dropout must be in \[0, 1\]"),
    (dict(t_lo=0.9, t_hi=0.1), r"0 <= t_lo <= t_hi <= 1"),
    (dict(t_hi=1.2), r"0 <= t_lo <= t_hi <= 1"),
    (dict(w=0.5, k=0.3, label_dropout=0.0), "needs label_dropout > 0"),
])
def test_guidance_config_is_checked(kw, match):
    """The Python API refuses what the config refuses: a guidance interval out of order, dropout outside [0, 1],
    guidance without label dropout (the NULL class would never be trained)."""
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**kw)


def test_defaults_are_method_md():
    """METHOD.md's constants, as the code's defaults (lambda_v is 4, not METHOD's 1.0: chosen by measurement,
    benchmarks/RESULTS.md)."""
    import inspect

    from dumo_engine import sampling
    from dumo_engine.config import ObjectiveConfig, SampleConfig

    assert MeanFlow(NUM_CLASSES).equal_fraction == 0.75 and DuMo(NUM_CLASSES).equal_fraction == 0.0
    for obj in (DuMo(NUM_CLASSES), MeanFlow(NUM_CLASSES), FlowMatching(NUM_CLASSES)):
        assert (obj.P_mean, obj.P_std, obj.adaptive_p, obj.adaptive_eps) == (-0.4, 1.0, 1.0, 0.01)
        assert obj.guidance == GuidanceConfig(w=1.0, k=0.0, t_lo=0.0, t_hi=1.0, label_dropout=0.1)
    o = ObjectiveConfig()
    assert (o.P_mean, o.P_std, o.adaptive_p, o.adaptive_eps, o.label_dropout) == (-0.4, 1.0, 1.0, 0.01, 0.1)
    assert (o.cfg_w, o.cfg_k, o.cfg_t_lo, o.cfg_t_hi, o.lambda_v) == (1.0, 0.0, 0.0, 1.0, 4.0)
    assert SampleConfig().t_mid == 0.5
    assert inspect.signature(sampling.sample_u_2step).parameters["t_mid"].default == 0.5
    assert inspect.signature(sampling.sample).parameters["t_mid"].default == 0.5
