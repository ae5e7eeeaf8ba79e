"""CUDA checks (skipped without a GPU): bf16 training step, fp32 JVP under autocast, fused AdamW path."""
from __future__ import annotations

import pytest
import torch

from dumo_engine.jvp import flow_map_jvp
from dumo_engine.models import build_model
from dumo_engine.objectives import DuMo, GuidanceConfig
from dumo_engine.train import autocast_ctx

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _randomized(seed: int):
    torch.manual_seed(seed)
    m = build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def test_jvp_on_cuda_matches_cpu_reference(monkeypatch):
    """The reference JVP on CUDA (flash/efficient SDPA off under forward AD, fp32 inside autocast) is as accurate as
    the CPU result: both against float64 math on the CPU, CUDA's error at most 2x the CPU float32 error (+ 1e-4).

    Not CUDA against CPU float32 directly: the tangent output is ill-conditioned in t (the sinusoidal time
    embedding's high frequencies; a 1e-7 relative change of t moves it by ~2e-2 here), so float32 on the CPU is
    itself off by up to ~5e-3 from float64 and two correct float32 results differ by that much."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would exceed the fp32 tolerance
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    m = _randomized(0)
    g = torch.Generator().manual_seed(1)
    z, a = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.rand(4, generator=g) * 0.8 + 0.1
    h = t * 0.5
    y = torch.randint(0, 10, (4,), generator=g)
    cpu = flow_map_jvp(lambda *i: m(*i, y, heads="vu"), z, t, h, a)
    m64 = _randomized(0).double()
    exact = flow_map_jvp(lambda *i: m64(*i, y, heads="vu"), z.double(), t.double(), h.double(), a.double())
    mc = m.cuda()
    with autocast_ctx(torch.device("cuda"), "bf16"):
        gpu = flow_map_jvp(lambda *i: mc(*i, y.cuda(), heads="vu"), z.cuda(), t.cuda(), h.cuda(), a.cuda())
    assert gpu[2].dtype == torch.float32
    for name, c, g_, e in zip(("v", "u", "du"), cpu, gpu, exact):
        cpu_err = (c.double() - e).abs().max().item()
        gpu_err = (g_.detach().cpu().double() - e).abs().max().item()
        assert gpu_err <= 2 * cpu_err + 1e-4, f"{name}: CUDA error {gpu_err:.3g} > 2x CPU float32 error {cpu_err:.3g}"


def test_bf16_dumo_step_on_cuda():
    """A DuMo step with folded CFG under bf16 autocast runs, gives finite loss and gradients."""
    m = _randomized(2).cuda()
    obj = DuMo(10, guidance=GuidanceConfig(w=0.5, k=0.3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x = torch.randn(16, 4, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    with autocast_ctx(torch.device("cuda"), "bf16"):
        loss, metrics = obj.loss(m, x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pass_with_triton_attention_matches_reference(monkeypatch, dtype):
    """On CUDA the fused pass uses the Triton attention-JVP kernel: outputs, du/dt and gradients match the
    fused pass with the PyTorch attention rule (fp32 tight; bf16 autocast within 2% of the tangent norm)."""
    from dumo_engine.jvp.fused import use_triton_attention

    m = _randomized(3).cuda()
    g = torch.Generator().manual_seed(4)
    z, a = torch.randn(4, 4, 8, 8, generator=g).cuda(), torch.randn(4, 4, 8, 8, generator=g).cuda()
    t = (torch.rand(4, generator=g) * 0.8 + 0.1).cuda()
    y = torch.randint(0, 10, (4,), generator=g).cuda()
    assert use_triton_attention(z)
    results = {}
    for impl in ("triton", "torch"):
        monkeypatch.setenv("DUMO_FUSED_ATTN", impl)
        m.zero_grad(set_to_none=True)
        ctx = autocast_ctx(torch.device("cuda"), "bf16") if dtype == torch.bfloat16 else torch.autocast("cuda", enabled=False)
        with ctx:
            v, u, d = m(z, t, t * 0.5, y, tangent=a)
        (v.float().square().mean() + u.float().square().mean()).backward()
        results[impl] = (v.float(), u.float(), d.float(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for x1, x2 in zip(results["triton"][:3], results["torch"][:3]):
        assert ((x1 - x2).norm() / x2.norm()).item() < tol
    for g1, g2 in zip(results["triton"][3], results["torch"][3]):
        assert ((g1 - g2).norm() / (g2.norm() + 1e-12)).item() < tol * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pass_with_cuda_rowwise_kernels_matches_plain_rules(monkeypatch, dtype):
    """On CUDA the fused pass runs the CUDA row-wise kernels (csrc/): outputs, du/dt and gradients match the same
    pass on the plain-PyTorch row-wise rules (DUMO_FUSED_ROWWISE=0), at DiT-B's hidden size (fp32 tight; bf16
    autocast within 2% of each norm)."""
    from dumo_engine.models import DualHeadDiT
    from dumo_engine.ops import rowwise as rw

    if rw.extension() is None or not rw.extension().with_cuda():
        pytest.fail(f"dumo_engine._C with CUDA kernels is not built: {rw.extension_error()}")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(5)
    m = DualHeadDiT(input_size=16, patch_size=2, in_channels=4, hidden_size=768, depth=2, num_heads=12,
                    num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m = m.cuda()
    g = torch.Generator().manual_seed(6)
    z, a = torch.randn(3, 4, 16, 16, generator=g).cuda(), torch.randn(3, 4, 16, 16, generator=g).cuda()
    t = (torch.rand(3, generator=g) * 0.8 + 0.1).cuda()
    y = torch.randint(0, 10, (3,), generator=g).cuda()
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DUMO_FUSED_ROWWISE", flag)
        rw._last.clear()
        m.zero_grad(set_to_none=True)
        ctx = autocast_ctx(torch.device("cuda"), "bf16") if dtype == torch.bfloat16 else torch.autocast("cuda", enabled=False)
        with ctx:
            v, u, d = m(z, t, t * 0.5, y, tangent=a)
        (v.float().square().mean() + u.float().square().mean()).backward()
        if flag == "1":
            assert set(rw.last_impl().values()) == {"cuda"}, rw.last_impl()
        results[flag] = (v.float(), u.float(), d.float(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for x1, x2 in zip(results["1"][:3], results["0"][:3]):
        assert ((x1 - x2).norm() / x2.norm()).item() < tol
    for g1, g2 in zip(results["1"][3], results["0"][3]):
        assert ((g1 - g2).norm() / (g2.norm() + 1e-12)).item() < tol * 5
