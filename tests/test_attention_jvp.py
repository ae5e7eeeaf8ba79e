"""dumo::attention_jvp (Triton, dumo_engine/ops/attention_jvp.py) against the reference tangent rule.

Without CUDA the kernel runs under Triton's CPU interpreter on tiny shapes (TRITON_INTERPRET=1 is set below,
before triton is imported; the op also reads it per call and jits its kernel lazily). With CUDA the same
tests run the compiled kernel, and the gpu-marked tests add real DiT shapes.
References: fp64 softmax attention + jvp.fused.attention_tangent (the oracle), torch.func.jvp and forward_ad
through math SDPA, and PyTorch in the tested dtype for the "at most 2x PyTorch's own error" rule.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede any triton import; GPU sessions keep the compiler
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from dumo_engine.jvp.fused import attention_tangent  # noqa: E402

mod = importlib.import_module("dumo_engine.ops.attention_jvp")
attention_jvp = mod.attention_jvp

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_KERNEL = mod.triton is not None and (DEV == "cuda" or mod._interpret())
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="triton not importable")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# the interpreter converts 0-d numpy arrays to int (numpy deprecation), nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def make_inputs(shape, dtype=torch.float32, seed=0, k_len=None, device=DEV):
    """Six fresh N(0,1) tensors (q, k, v, q_dot, k_dot, v_dot); k/v (and their tangents) may have another T."""
    g = torch.Generator().manual_seed(seed)
    N, H, T, D = shape
    kshape = (N, H, k_len or T, D)
    shapes = [shape, kshape, kshape, shape, kshape, kshape]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def reference_jvp(q, k, v, q_dot, k_dot, v_dot):
    """(o, o_dot) by torch.func.jvp through math SDPA: the reference (benchmarks/bench_attention_jvp.py times it)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q_dot, k_dot, v_dot))


def reference(xs, grad_o):
    """(o, o_dot, dq, dk, dv) in fp64 from the same (rounded) inputs: softmax attention + attention_tangent."""
    x64 = [x.detach().double() for x in xs]
    q, k, v = (x.requires_grad_(True) for x in x64[:3])
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), grad_o.double())
    o_dot = attention_tangent(*(x.detach() for x in x64))
    return o.detach(), o_dot, dq, dk, dv


def torch_same_dtype(xs, grad_o):
    """PyTorch's own result in the inputs' dtype: torch.func.jvp through math SDPA, autograd for the grads."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in xs[:3])
    o, o_dot = reference_jvp(*(x.detach() for x in xs))
    with sdpa_kernel(SDPBackend.MATH):
        dq, dk, dv = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad_o)
    return o, o_dot, dq, dk, dv


def ours(xs, grad_o):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in xs[:3])
    o, o_dot = attention_jvp(q, k, v, *xs[3:])
    assert not o_dot.requires_grad  # the tangent is a stop-gradient output
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), grad_o)
    return o.detach(), o_dot, dq, dk, dv


NAMES = ("o", "o_dot", "dq", "dk", "dv")


def check_against_reference(xs, dtype):
    grad_o = torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(7)).to(xs[0].device, dtype)
    got = ours(xs, grad_o)
    ref = reference(xs, grad_o)
    for name, g, r in zip(NAMES, got, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
    if dtype == torch.float32:
        for name, g, r in zip(NAMES, got, ref):
            torch.testing.assert_close(g.double(), r, **FP32_TOL, msg=lambda m: f"{name}: {m}")
        return
    # half precision: error vs fp64 at most 2x PyTorch's own error in the same dtype (+ a tiny floor)
    pt = torch_same_dtype(xs, grad_o)
    for name, g, p, r in zip(NAMES, got, pt, ref):
        err = (g.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-5, f"{name} {dtype}: kernel err {err:.3g} > 2x PyTorch err {pt_err:.3g}"
        assert err <= 2e-2 * r.abs().max().item() + 1e-5, f"{name} {dtype}: err {err:.3g} too large"


# ---------------------------------------------------------------------------------------------------
# values and gradients: every dtype and head dim (72 pads the d block to 128), masked sequence tails
# ---------------------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("seq", [17, 40])
def test_values_and_grads(dtype, head_dim, seq):
    xs = make_inputs((2 if seq == 17 else 1, 2, seq, head_dim), dtype, seed=head_dim + seq)
    check_against_reference(xs, dtype)


@needs_kernel
def test_odd_shape_and_cross_attention():
    """Odd shape (3 heads, T=23, d=40) and a key length different from the query length."""
    check_against_reference(make_inputs((2, 3, 23, 40), seed=1), torch.float32)
    check_against_reference(make_inputs((1, 2, 11, 24), seed=2, k_len=29), torch.float32)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 2, 17, 72), (2, 3, 23, 40)], ids=["dit-like", "odd"])
def test_tangent_matches_torch_func_jvp_and_forward_ad(shape):
    """The tangent equals torch.func.jvp and torch.autograd.forward_ad of math SDPA (fp32, fresh inputs)."""
    xs = make_inputs(shape, seed=3)
    o, o_dot = attention_jvp(*xs)
    o_f, o_dot_f = reference_jvp(*xs)
    with sdpa_kernel(SDPBackend.MATH):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(xs[:3], xs[3:])]
            o_a, o_dot_a = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals))
    for want, want_dot in ((o_f, o_dot_f), (o_a, o_dot_a)):
        torch.testing.assert_close(o, want, **FP32_TOL)
        torch.testing.assert_close(o_dot, want_dot, **FP32_TOL)


@needs_kernel
def test_non_contiguous_inputs():
    """Strided views (the DiT qkv permute, and a transpose) give the same result as contiguous copies."""
    N, T, H, D = 2, 19, 2, 72
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(N, T, 3, H, D, generator=g).to(DEV).permute(2, 0, 3, 1, 4)  # (3, N, H, T, D) view
    qkv_dot = torch.randn(N, T, 3, H, D, generator=g).to(DEV).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    qd, kd, vd = qkv_dot.unbind(0)
    vd = torch.randn(N, H, D, T, generator=g).to(DEV).transpose(-1, -2)  # a transposed view
    xs = [q, k, v, qd, kd, vd]
    assert not any(x.is_contiguous() for x in xs)
    o, o_dot = attention_jvp(*xs)
    o_c, o_dot_c = attention_jvp(*(x.contiguous() for x in xs))
    assert o.is_contiguous() and o_dot.is_contiguous()
    torch.testing.assert_close(o, o_c, rtol=0, atol=0)
    torch.testing.assert_close(o_dot, o_dot_c, rtol=0, atol=0)
    check_against_reference(xs, torch.float32)


@needs_kernel
def test_offsets_past_2_31_elements():
    """A per-sample stride of 2^30 elements (a large batch of qkv views): sample 2 starts 2^31 elements past sample 0,
    beyond int32. The kernels index in int64: the forward (O, O_dot, lse) and the backward (dQ, dK, dV) of every
    sample match the reference on contiguous copies; 2^31 elements before sample 2 holds a decoy, which an int32
    offset that wrapped would read. The buffer is 8 GiB of address space, almost all of it never touched."""
    N, H, T, D = 3, 1, 16, 16
    sn, off = 2**30, 2**31
    big = torch.empty(off + (N - 1) * sn + T * D, dtype=torch.float16, device=DEV)
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(N, H, T, D, generator=g).half().to(DEV) for _ in range(7)]
    q = big.as_strided((N, H, T, D), (sn, T * D, D, 1), off)
    q.copy_(data[0])
    big[: T * D].fill_(30.0)  # where q[2] would be read from after a wrap
    k, v, qd, kd, vd, do = data[1:]
    o, od, lse = mod.attention_jvp_fwd_triton(q, k, v, qd, kd, vd)
    o_r, od_r, lse_r = mod.attention_jvp_fwd_triton(data[0], k, v, qd, kd, vd)
    for n in range(N):  # the same kernel on contiguous inputs: identical results expected
        torch.testing.assert_close(lse[n], lse_r[n], rtol=0, atol=0)
        torch.testing.assert_close(o[n], o_r[n], rtol=0, atol=0)
        torch.testing.assert_close(od[n], od_r[n], rtol=0, atol=0)
    want = mod.attention_jvp_fwd_torch(*(t.float() for t in (data[0], k, v, qd, kd, vd)))
    torch.testing.assert_close(lse.float(), want[2].float(), rtol=1e-3, atol=1e-3)
    grads = mod.attention_bwd_triton(do, q, k, v, o, lse)
    grads_r = mod.attention_bwd_triton(do, data[0], k, v, o, lse)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    del big


@needs_kernel
def test_sequence_offsets_past_2_31_elements():
    """A sequence stride of 2^27 elements: row 16 lies 2^31 elements past row 0, beyond the kernels' int32 tile
    offsets. Such operands run on contiguous copies (the forward's q and the backward's dO here), so every row matches
    the kernel on contiguous inputs; a wrapped offset would read the decoy at the buffer's start."""
    N, H, T, D = 1, 1, 17, 16
    st, off = 2**27, 2**31
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(N, H, T, D, generator=g).half().to(DEV) for _ in range(7)]
    bufs, views = [], []
    for x in (data[0], data[6]):  # q for the forward, dO for the backward
        big = torch.empty(off + (T - 1) * st + D, dtype=torch.float16, device=DEV)
        view = big.as_strided((N, H, T, D), (T * st, T * st, st, 1), off)
        view.copy_(x)
        big[:D].fill_(30.0)
        bufs.append(big)
        views.append(view)
    q, do = views
    k, v, qd, kd, vd = data[1:6]
    got = mod.attention_jvp_fwd_triton(q, k, v, qd, kd, vd)
    want = mod.attention_jvp_fwd_triton(data[0], k, v, qd, kd, vd)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    o, lse = want[0], want[2]
    for a, b in zip(mod.attention_bwd_triton(do, q, k, v, o, lse), mod.attention_bwd_triton(data[6], data[0], k, v,
                                                                                            o, lse)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    del bufs


def test_int32_guard_refuses_a_slice_it_cannot_index():
    """A (batch, head) slice whose last element sits 2^31 or more past its first cannot be indexed in int32 even
    when contiguous: a clear error; at 2^31 - 1 it runs as it is. Shapes only (_int32_safe reads shape and strides):
    nothing of that size is allocated."""
    big = _Shape((1, 1, 2**21 + 1, 2**10), (2**31 + 2**10, 2**31 + 2**10, 2**10, 1))
    with pytest.raises(ValueError, match=r"q \(1, 1, 2097153, 1024\) has element offsets of 2\^31 or more inside"):
        mod._int32_safe("q", big)
    edge = _Shape((1, 1, 2**21, 2**10), (2**31, 2**31, 2**10, 1))  # largest offset 2^31 - 1
    assert mod._int32_safe("q", edge) is edge


class _Shape:
    """Shape and strides only, as _int32_safe reads them; contiguous() returns itself (already contiguous)."""

    def __init__(self, shape, stride):
        self.shape, self._stride = shape, stride

    def stride(self):
        return self._stride

    def contiguous(self):
        return self


@needs_kernel
def test_batch_heads_past_the_grid_limit_are_launched_in_chunks(monkeypatch):
    """N * H past CUDA's grid-y limit (65535; 4 here, so that the interpreter stays fast) runs in batch chunks
    (2, 2, 1 samples with H = 2): forward and backward equal the one-launch results exactly."""
    xs = make_inputs((5, 2, 9, 16), seed=11)
    do = torch.randn(5, 2, 9, 16, generator=torch.Generator().manual_seed(12)).to(DEV)
    want = mod.attention_jvp_fwd_triton(*xs)
    want_g = mod.attention_bwd_triton(do, *xs[:3], want[0], want[2])
    monkeypatch.setattr(mod, "_MAX_GRID_Y", 4)
    assert [(b.start, b.stop) for b in mod._batch_chunks(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    got = mod.attention_jvp_fwd_triton(*xs)
    got_g = mod.attention_bwd_triton(do, *xs[:3], want[0], want[2])
    for a, b in zip((*got, *got_g), (*want, *want_g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="5 heads exceed CUDA's grid-y limit 4"):
        mod._batch_chunks(1, 5)


@needs_kernel
def test_launches_run_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: every launch (forward, both backward kernels) happens inside
    _triton_jit.on_device(q); on_device of a cuda:1 tensor is torch.cuda.device(1)."""
    from dumo_engine.ops import _triton_jit
    from helpers import record_launches

    seen, launched = record_launches(monkeypatch, mod)
    xs = make_inputs((1, 2, 9, 16), seed=2)
    o, _, lse = mod.attention_jvp_fwd_triton(*xs)
    mod.attention_bwd_triton(torch.ones_like(o), *xs[:3], o, lse)
    assert seen == [xs[0].device] * 2
    assert launched == ["_attn_jvp_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]

    class FakeCuda:
        is_cuda, device = True, torch.device("cuda", 1)

    monkeypatch.undo()
    assert _triton_jit.on_device(FakeCuda()).idx == 1


@pytest.mark.parametrize("use", ["func", "forward_ad"])
def test_forward_mode_ad_through_the_op_is_refused(use):
    """The op has no forward-mode rule: PyTorch would give o a zero tangent silently; it raises instead."""
    xs = make_inputs((1, 1, 5, 8), seed=4, device="cpu")
    with pytest.raises(NotImplementedError, match="q carries a forward-mode tangent"):
        if use == "func":
            torch.func.jvp(lambda q: attention_jvp(q, *xs[1:])[0], (xs[0],), (torch.ones_like(xs[0]),))
        else:
            with fwAD.dual_level():
                attention_jvp(fwAD.make_dual(xs[0], torch.ones_like(xs[0])), *xs[1:])


@pytest.mark.parametrize("env,match", [
    ("24,16,1,1", r"BLOCK_M=24 is not a power of two >= 16"),
    ("16,8,1,1", r"BLOCK_N=8 is not a power of two >= 16"),
    ("16,16,3,1", r"num_warps=3 is not one of"),
    ("16,16,4,0", r"num_stages=0 must be >= 1"),
    ("16,16,4", r"must be 'BLOCK_M,BLOCK_N,num_warps,num_stages'"),
])
def test_block_override_is_checked(monkeypatch, env, match):
    monkeypatch.setenv("DUMO_ATTN_JVP_BLOCKS", env)
    with pytest.raises(ValueError, match=match):
        mod._block_config(64, False, 2)
    monkeypatch.setenv("DUMO_ATTN_JVP_BLOCKS", "32,64,8,3")
    assert mod._block_config(64, False, 2) == (32, 64, 8, 3)


# ---------------------------------------------------------------------------------------------------
# custom op: schema/fake/autograd registration, torch.compile tracing, saved tensors
# ---------------------------------------------------------------------------------------------------
@needs_kernel
def test_opcheck():
    xs = make_inputs((1, 2, 9, 16), seed=5)
    for x in xs[:3]:
        x.requires_grad_(True)
    torch.library.opcheck(torch.ops.dumo.attention_jvp.default, tuple(xs))


@needs_kernel
def test_backward_op_opcheck_and_triton_matches_torch(monkeypatch):
    """dumo::attention_jvp_bwd: opcheck, and the Triton flash backward equals the PyTorch one (incl. stride-0 dO)."""
    q, k, v, _, _, _ = make_inputs((1, 2, 21, 24), seed=13, k_len=18)
    o, _, lse = torch.ops.dumo.attention_jvp(q, k, v, q, k, v)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).to(DEV)
    torch.library.opcheck(torch.ops.dumo.attention_jvp_bwd.default, (do, q, k, v, o, lse))
    for grad_out in (do, torch.ones(1, device=DEV).expand(q.shape)):  # the second is what o.sum() sends
        got = torch.ops.dumo.attention_jvp_bwd(grad_out, q, k, v, o, lse)
        want = mod.attention_bwd_torch(grad_out, q, k, v, o, lse)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32_TOL)


@needs_kernel
def test_torch_compile_traces_the_op():
    xs = make_inputs((1, 2, 9, 16), seed=6)

    def f(q, k, v, qd, kd, vd):
        o, o_dot = attention_jvp(q, k, v, qd, kd, vd)
        return o * 2, o_dot + 1

    q, k, v = (x.clone().requires_grad_(True) for x in xs[:3])
    o, o_dot = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, *xs[3:])
    o_e, o_dot_e = f(*xs)
    torch.testing.assert_close(o, o_e)
    torch.testing.assert_close(o_dot, o_dot_e)
    o.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@needs_kernel
def test_saves_only_the_primal_tensors():
    """Backward keeps q, k, v, o and lse (what a flash forward keeps): nothing for the tangent."""
    xs = make_inputs((1, 2, 9, 16), seed=8)
    q, k, v = (x.clone().requires_grad_(True) for x in xs[:3])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        o, o_dot = attention_jvp(q, k, v, *xs[3:])
    assert len(saved) == 5 and o.requires_grad and not o_dot.requires_grad


# ---------------------------------------------------------------------------------------------------
# fallback and input checks
# ---------------------------------------------------------------------------------------------------
def _expect_fallback(xs, match):
    mod._WARNED.clear()
    with pytest.warns(UserWarning, match=match):
        o, o_dot = attention_jvp(*xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        attention_jvp(*xs)
    ref = reference(xs, torch.zeros_like(xs[0]))
    tol = FP32_TOL if xs[0].dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o.double(), ref[0], **tol)
    torch.testing.assert_close(o_dot.double(), ref[1], **tol)


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(mod, "triton", None)
    _expect_fallback(make_inputs((1, 2, 13, 24), seed=9), "triton is not importable")


def test_fallback_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _expect_fallback(make_inputs((1, 2, 13, 24), seed=10, device="cpu"), "TRITON_INTERPRET")


def test_fallback_fp64_and_its_gradients():
    """fp64 has no kernel: the PyTorch path runs, and the op's backward passes gradcheck there."""
    xs = make_inputs((1, 2, 5, 8), torch.float64, seed=11)
    _expect_fallback(xs, "float64")
    q, k, v = (x.clone().requires_grad_(True) for x in xs[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(lambda q, k, v: attention_jvp(q, k, v, *xs[3:])[0], (q, k, v))


@pytest.mark.parametrize("case,err,match", [
    ("dtype", ValueError, "k_dot has dtype torch.float16"),
    ("device", ValueError, "v is on meta"),
    ("rank", ValueError, "q must be 4-D"),
    ("tangent_shape", ValueError, "q_dot has shape"),
    ("head_dim", ValueError, "k has shape"),
    ("kv_len", ValueError, "v has shape"),
    ("type", TypeError, "v_dot must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(case, err, match):
    q, k, v, qd, kd, vd = make_inputs((1, 2, 8, 16), device="cpu")
    if case == "dtype":
        kd = kd.half()
    elif case == "device":
        v = v.to("meta")
    elif case == "rank":
        q = q[0]
    elif case == "tangent_shape":
        qd = qd[:, :, :4]
    elif case == "head_dim":
        k = k[..., :8]
    elif case == "kv_len":
        v = v[:, :, :4]
    elif case == "type":
        vd = vd.numpy()
    with pytest.raises(err, match=match):
        attention_jvp(q, k, v, qd, kd, vd)


def test_cost_model():
    assert mod.attention_jvp_flops(32, 16, 256, 72) == 12 * 32 * 16 * 256 * 256 * 72
    assert mod.attention_jvp_flops(1, 1, 4, 8, backward=True) == 22 * 16 * 8
    assert mod.attention_jvp_bytes(1, 1, 4, 8, elem_size=2) == 8 * 4 * 8 * 2 + 4 * 4


# ---------------------------------------------------------------------------------------------------
# real DiT shapes on a GPU (compiled kernel)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [
    ((4, 16, 256, 72), torch.bfloat16),   # XL/2 attention at 256px
    ((2, 16, 1024, 64), torch.bfloat16),  # B/2, L/2 at 512px
    ((2, 4, 1000, 128), torch.float16),   # not a multiple of any block
    ((2, 4, 333, 72), torch.float32),
], ids=["xl2-bf16", "t1024-d64-bf16", "t1000-d128-fp16", "t333-d72-fp32"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_shapes_on_gpu(shape, dtype):
    check_against_reference(make_inputs(shape, dtype, seed=12, device="cuda"), dtype)
