"""Fused forward + JVP pass (model(..., tangent=a) / forward_with_jvp) against the torch.func reference."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist

from dumo_engine.jvp import flow_map_jvp
from dumo_engine.models import DualHeadDiT, build_model
from dumo_engine.objectives import DuMo, GuidanceConfig, MeanFlow
from helpers import randomize_

NUM_CLASSES = 10


def make_model(kind: str, seed: int, h_in_trunk: bool = True) -> DualHeadDiT:
    torch.manual_seed(seed)
    if kind == "tiny":
        m = build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=NUM_CLASSES, h_in_trunk=h_in_trunk)
    else:  # odd: batch 3, 6x6, hidden 24, 3 heads (head dim 8), 3 channels
        m = DualHeadDiT(input_size=6, patch_size=2, in_channels=3, hidden_size=24, depth=2, num_heads=3,
                        num_classes=NUM_CLASSES, h_in_trunk=h_in_trunk)
    return randomize_(m, seed, std=0.2)


def make_inputs(m: DualHeadDiT, n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (n, m.in_channels, m.input_size, m.input_size)
    z = torch.randn(*shape, generator=g, dtype=dtype)
    a = torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype) * 0.8 + 0.15
    r = t * torch.rand(n, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES + 1, (n,), generator=g)
    return z, t, r, y, a


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind,n", [("tiny", 4), ("odd", 3)])
@pytest.mark.parametrize("heads", ["vu", "u"])
@pytest.mark.parametrize("h_in_trunk", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_reference(kind, n, heads, h_in_trunk, dtype, tol):
    """v, u and du/dt equal torch.func.jvp of the same model (float64 to 1e-12, fp32 to 2e-5)."""
    m = make_model(kind, 1, h_in_trunk).to(dtype)
    z, t, r, y, a = make_inputs(m, n, 2, dtype)
    v_ref, u_ref, d_ref = flow_map_jvp(lambda *i: m(*i, y, heads=heads), z, t, t - r, a)
    v, u, d = m.forward_with_jvp(z, t, r, y, a, heads=heads)
    assert d.dtype == dtype and not d.requires_grad and u.requires_grad
    assert d_ref.abs().max() > 0
    assert rel(d, d_ref) < tol and rel(u, u_ref) < tol
    if heads == "vu":
        assert rel(v, v_ref) < tol
    else:
        assert v is None and v_ref is None


def test_needs_the_u_head():
    m = make_model("tiny", 1)
    z, t, r, y, a = make_inputs(m, 2, 2)
    with pytest.raises(ValueError, match="u head"):
        m(z, t, t - r, y, heads="v", tangent=a)


def test_a_wrong_rule_would_be_caught():
    """Control: the reference comparison sees a tangent that ignores dt (h tangent only) as wrong."""
    m = make_model("tiny", 3).double()
    z, t, r, y, a = make_inputs(m, 3, 4, torch.float64)
    d_ref = flow_map_jvp(lambda *i: m(*i, y), z, t, t - r, a)[2]
    d_wrong = torch.func.jvp(lambda zz, hh: m(zz, t, hh, y)[1], (z, t - r), (a, torch.ones_like(t)))[1]
    assert rel(d_wrong, d_ref) > 1e-3


def _loss_grads(m, backend, tangent="data", guided=False, cls=DuMo, seed=5):
    g = GuidanceConfig(w=0.6, k=0.3, label_dropout=0.2) if guided else GuidanceConfig()
    obj = cls(NUM_CLASSES, guidance=g, tangent=tangent, jvp_backend=backend)
    z, _, _, y, _ = make_inputs(m, 6, 7)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, metrics = obj.loss(m, z, y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls,tangent,guided", [(DuMo, "data", False), (DuMo, "model", True), (MeanFlow, "data", True)])
def test_loss_and_every_gradient_match_reference(cls, tangent, guided):
    """The objective's loss and the gradient of every parameter agree between fused and torch.func."""
    m = make_model("tiny", 6)
    loss_ref, g_ref = _loss_grads(m, "func", tangent, guided, cls)
    loss_fused, g_fused = _loss_grads(m, "fused", tangent, guided, cls)
    assert math.isclose(loss_fused.item(), loss_ref.item(), rel_tol=1e-5)
    assert g_ref.keys() == g_fused.keys() and len(g_ref) > 10
    for k in g_ref:
        assert torch.allclose(g_fused[k], g_ref[k], rtol=1e-4, atol=1e-6), k


def _saved(fn):
    """(count, bytes) of the tensors autograd saves for backward while fn runs."""
    seen = []

    def pack(x):
        seen.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return len(seen), sum(seen), out


@pytest.mark.parametrize("heads", ["vu", "u"])
def test_tangent_saves_nothing_for_backward(heads):
    """The fused pass saves exactly what the plain primal forward saves: the tangent stores no activation."""
    m = make_model("tiny", 8)
    z, t, r, y, a = make_inputs(m, 4, 9)
    n_plain, b_plain, _ = _saved(lambda: m(z, t, t - r, y, heads=heads))
    n_fused, b_fused, out = _saved(lambda: m(z, t, t - r, y, heads=heads, tangent=a))
    assert n_plain > 0 and n_fused <= n_plain and b_fused <= b_plain
    n_ref, b_ref, _ = _saved(lambda: flow_map_jvp(lambda *i: m(*i, y, heads=heads), z, t, t - r, a))
    assert b_ref > b_plain  # torch.func saves tangent state too: what the fused pass avoids


def test_bf16_autocast_within_twice_pytorch_error():
    """Under bf16 autocast, the fused du/dt is within 2x the error of PyTorch's own JVP under the same autocast
    (torch.func.jvp through the model; a model cast to bf16 would be the other baseline, but bf16 conv2d under
    forward AD segfaults in torch 2.13 on CPU)."""
    m = make_model("tiny", 10)
    z, t, r, y, a = make_inputs(m, 8, 11)
    m64 = make_model("tiny", 10).double()
    d_exact = flow_map_jvp(lambda *i: m64(*i, y), z.double(), t.double(), (t - r).double(), a.double())[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, d_fused = m(z, t, t - r, y, tangent=a)
        d_torch = torch.func.jvp(lambda zz, tt, hh: m(zz, tt, hh, y)[1], (z, t, t - r),
                                 (a, torch.ones_like(t), torch.ones_like(t)))[1]
    err_fused, err_torch = rel(d_fused.double(), d_exact), rel(d_torch.double(), d_exact)
    assert err_torch > 0 and err_fused <= 2 * err_torch, (err_fused, err_torch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fused_pass_works_through_ddp():
    """Wrapped in DistributedDataParallel (gloo, one process), the fused DuMo step gives the unwrapped gradients;
    torch.func cannot see through the wrapper, which is why the fused pass goes through forward."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        m = make_model("tiny", 12)
        _, g_plain = _loss_grads(m, "fused")
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        obj = DuMo(NUM_CLASSES, jvp_backend="fused")
        z, _, _, y, _ = make_inputs(m, 6, 7)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss, _ = obj.loss(ddp, z, y)
        loss.backward()
        for k, p in m.named_parameters():
            if k in g_plain:
                assert torch.allclose(p.grad, g_plain[k], rtol=1e-5, atol=1e-7), k
    finally:
        dist.destroy_process_group()


def test_pinned_regression_losses_with_fused_path(tmp_path):
    """The seeded 10-step run pinned from the reference path is reproduced by the fused path."""
    from regression_run import ASSET, KEYS, OVERRIDES
    from dumo_engine.config import load_config
    from dumo_engine.train import read_log, train

    pinned = json.load(open(ASSET))["rows"]
    cfg = load_config(None, OVERRIDES + ["--objective.jvp_backend=fused", "--train.device=cpu",
                                         f"--train.out_dir={tmp_path}"])
    rows = read_log(train(cfg).log_path)
    for got, want in zip(rows, pinned):
        for k in KEYS:
            assert math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=1e-6), (got["step"], k, got[k], want[k])


def test_stacked_rows_linear_path(monkeypatch):
    """DUMO_STACKED_LINEAR=1 (one GEMM over [x; x_dot]): same outputs, same gradients, no extra saved tensors."""
    from dumo_engine.jvp import fused

    m = make_model("tiny", 13)
    z, t, r, y, a = make_inputs(m, 4, 14)
    ref = m.forward_with_jvp(z, t, r, y, a)
    n_plain, b_plain, _ = _saved(lambda: m(z, t, t - r, y))
    loss_ref, g_ref = _loss_grads(m, "fused")
    monkeypatch.setenv("DUMO_STACKED_LINEAR", "1")
    assert fused.stacked_linear_enabled()
    calls = {"n": 0}
    real = fused.StackedLinear.apply

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(fused.StackedLinear, "apply", counting)
    got = m.forward_with_jvp(z, t, r, y, a)
    assert calls["n"] == 4 * len(m.blocks)  # qkv, proj, fc1, fc2 of every block
    for x1, x2 in zip(got, ref):
        assert rel(x1, x2) < 1e-6
    n_st, b_st, _ = _saved(lambda: m(z, t, t - r, y, tangent=a))
    assert n_st <= n_plain and b_st <= b_plain
    loss_st, g_st = _loss_grads(m, "fused")
    assert math.isclose(loss_st.item(), loss_ref.item(), rel_tol=1e-6)
    for k in g_ref:
        assert torch.allclose(g_st[k], g_ref[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("stacked", ["0", "1"])
def test_under_bf16_autocast_dtypes_and_saved_bytes(monkeypatch, stacked):
    """Under bf16 autocast the fused pass keeps the primal in bf16 like a plain forward (same saved bytes), returns a
    non-differentiable tangent, and keeps the tangent stream in fp32."""
    from dumo_engine.jvp import fused

    monkeypatch.setenv("DUMO_STACKED_LINEAR", stacked)
    m = make_model("tiny", 15)
    z, t, r, y, a = make_inputs(m, 4, 16)
    lin = m.blocks[0].attn.qkv
    with torch.autocast("cpu", dtype=torch.bfloat16):
        n_plain, b_plain, (v0, u0) = _saved(lambda: m(z, t, t - r, y))
        n_f, b_f, (v1, u1, d1) = _saved(lambda: m(z, t, t - r, y, tangent=a))
        yl, yl_dot = fused.linear_jvp(lin, z.new_ones(3, lin.in_features), z.new_ones(3, lin.in_features))
    assert u1.dtype == u0.dtype == torch.bfloat16 and d1.dtype == torch.float32
    assert yl.dtype == torch.bfloat16 and not yl_dot.requires_grad and yl.requires_grad
    assert b_f <= b_plain and n_f <= n_plain
    assert rel(u1.float(), u0.float()) < 1e-2


@pytest.mark.parametrize("kind", ["tiny", "odd"])
@pytest.mark.parametrize("h_in_trunk", [True, False])
def test_whole_model_with_rowwise_ops_matches_reference(kind, h_in_trunk, monkeypatch):
    """The fused pass on the C++ row-wise ops (CPU twins here; CUDA kernels on a GPU) against the torch.func
    reference and against the same pass on the plain-PyTorch rules (DUMO_FUSED_ROWWISE=0): v, u, du/dt, the DuMo
    loss and every parameter gradient."""
    from dumo_engine.ops import rowwise as rw

    if rw.extension() is None:
        pytest.skip(f"C++ extension not built: {rw.extension_error()}")
    m = make_model(kind, 12, h_in_trunk)
    z, t, r, y, a = make_inputs(m, 3, 13)
    rw._last.clear()
    v, u, d = m.forward_with_jvp(z, t, r, y, a)
    ran = rw.last_impl()
    assert ran == {"ln_mod_fwd": "cpp", "ln_mod_jvp": "cpp", "gated_fwd": "cpp", "gated_jvp": "cpp",
                   "ln_dual_fwd": "cpp"}, ran
    v_ref, u_ref, d_ref = flow_map_jvp(lambda *i: m(*i, y), z, t, t - r, a)
    assert rel(v, v_ref) < 2e-5 and rel(u, u_ref) < 2e-5 and rel(d, d_ref) < 2e-5

    loss_k, g_k = _loss_grads(m, "fused", "model", True, DuMo)
    assert rw.last_impl().get("ln_dual_fwd") == "cpp"
    monkeypatch.setenv("DUMO_FUSED_ROWWISE", "0")
    rw._last.clear()
    loss_p, g_p = _loss_grads(m, "fused", "model", True, DuMo)
    assert rw.last_impl() == {}  # the plain rules ran
    loss_ref, g_ref = _loss_grads(m, "func", "model", True, DuMo)
    assert math.isclose(loss_k.item(), loss_ref.item(), rel_tol=1e-5)
    assert math.isclose(loss_k.item(), loss_p.item(), rel_tol=1e-5)
    assert g_k.keys() == g_ref.keys() == g_p.keys() and len(g_k) > 10
    for k in g_ref:
        assert torch.allclose(g_k[k], g_ref[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(g_k[k], g_p[k], rtol=1e-4, atol=1e-6), k


def test_cuda_without_triton_warns_once_naming_the_attention_fallback(monkeypatch):
    """On CUDA without triton the fused pass runs SDPA + attention_tangent (the (N, H, T, T) float32 probabilities and
    their tangent materialised per block): said once, naming the cause, instead of silently."""
    import warnings

    from dumo_engine.jvp import fused
    from dumo_engine.ops import attention_jvp as op

    class CudaQ:  # what use_triton_attention reads of a CUDA tensor (no GPU here)
        is_cuda = True

    monkeypatch.delenv("DUMO_FUSED_ATTN", raising=False)
    monkeypatch.setattr(fused, "_WARNED", set())
    monkeypatch.setattr(op, "triton", None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fused.use_triton_attention(CudaQ()) is False
        assert fused.use_triton_attention(CudaQ()) is False
    msgs = [str(m.message) for m in w]
    assert len(msgs) == 1 and "triton is not importable" in msgs[0] and "(N, H, T, T)" in msgs[0], msgs
    monkeypatch.setenv("DUMO_FUSED_ATTN", "torch")  # the opt-out is asked for: no warning
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        monkeypatch.setattr(fused, "_WARNED", set())
        assert fused.use_triton_attention(CudaQ()) is False
    assert not w


def test_fused_pass_follows_the_time_scale():
    """time_scale 1 (SiT's convention, for an exact SiT import): the fused pass's time-embedding tangent scales with
    it, as torch.func's does (v, u, du/dt agree)."""
    torch.manual_seed(0)
    m = randomize_(build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=10, time_scale=1.0), 3)
    assert m.t_embedder.time_scale == m.h_embedder.time_scale == 1.0
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        m = m.to(dtype)
        z, t, r, y, a = make_inputs(m, 3, 2, dtype)
        v_r, u_r, d_r = flow_map_jvp(lambda *i: m(*i, y, heads="vu"), z, t, t - r, a)
        v, u, d = m.forward_with_jvp(z, t, r, y, a, heads="vu")
        assert rel(d, d_r) < tol and rel(u, u_r) < tol and rel(v, v_r) < tol
