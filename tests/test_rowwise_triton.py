"""Row-wise Triton kernels (dumo_engine/ops/rowwise_triton.py) against the PyTorch reference ops/rowwise_ref.py.

Without CUDA the kernels run under Triton's CPU interpreter on tiny shapes (TRITON_INTERPRET=1 is set below,
before triton is imported; the module jits its kernels lazily). With CUDA the same tests run the compiled
kernels, and the gpu-marked test adds DiT shapes.
Rules: float32 outputs match the reference run on the same inputs to ~1e-5 relative; bf16/fp16 outputs are at
most 2x as far from the float64 reference (rowwise_ref on the inputs cast to float64) as the reference computed
from the same low-precision inputs (fp32 math, rounded once), plus a tiny floor.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from dumo_engine.ops import rowwise_ref as ref  # pure torch: imports no triton

if not torch.cuda.is_available():  # must precede any triton import; GPU sessions keep the compiler
    os.environ.setdefault("TRITON_INTERPRET", "1")

tri = importlib.import_module("dumo_engine.ops.rowwise_triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_KERNEL = tri.available(torch.empty(0, device=DEV))
pytestmark = [
    pytest.mark.skipif(not HAS_KERNEL, reason="triton not importable (or no CUDA and no interpreter)"),
    # the interpreter converts 0-d numpy arrays to int (numpy deprecation), nothing of ours
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (shape, x dtype (residual stream), modulation/branch dtype, per-sample vectors as row-strided chunk views)
CASES = {
    "fp32": ((2, 6, 48), F32, F32, False),
    "fp32-odd-strided": ((3, 5, 37), F32, F32, True),
    "bf16-strided": ((2, 6, 48), BF16, BF16, True),
    "fp16-odd": ((3, 5, 37), F16, F16, False),
    "mixed-x32-bf16-strided": ((2, 6, 48), F32, BF16, True),  # fp32 residual stream under bf16 autocast
}
case_ids = pytest.mark.parametrize("case", list(CASES))


class Gen:
    """Fresh N(0, 1) inputs; per-sample vectors from one (N, k D) tensor chunked, when strided, like adaLN."""

    def __init__(self, case, seed):
        self.shape, self.xdt, self.mdt, self.strided = CASES[case] if isinstance(case, str) else case
        self.g = torch.Generator().manual_seed(seed)

    def rows(self, dtype=None):
        return torch.randn(self.shape, generator=self.g).to(DEV, dtype or self.xdt)

    def vecs(self, k, dtype=None, scale=0.5):
        N, _, D = self.shape
        dt = dtype or self.mdt
        if self.strided:
            c = (scale * torch.randn(N, (k + 1) * D, generator=self.g)).to(DEV, dt)
            vs = list(c.chunk(k + 1, dim=1))[1:]  # skip the first chunk: nonzero offsets too
            assert all(v.stride(0) == (k + 1) * D for v in vs)
            return vs
        return [(scale * torch.randn(N, D, generator=self.g)).to(DEV, dt) for _ in range(k)]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res += _tensors(o)
    return res


def _f64(a):
    if isinstance(a, torch.Tensor):
        return a.double()
    if isinstance(a, (list, tuple)):
        return type(a)(_f64(x) for x in a)
    return a


def check(name, *args, **kw):
    """Run tri.<name> and ref.<name>; compare dtypes, shapes and values (rules in the module docstring)."""
    ours = _tensors(getattr(tri, name)(*args, **kw))
    same = _tensors(getattr(ref, name)(*args, **kw))
    kw64 = {k: v for k, v in kw.items() if k != "out_dtype"}
    exact = _tensors(getattr(ref, name)(*_f64(args), **kw64))
    assert len(ours) == len(same) == len(exact)
    for i, (o, s, e) in enumerate(zip(ours, same, exact)):
        what = f"{name} output {i}"
        assert o.dtype == s.dtype, f"{what}: dtype {o.dtype}, reference {s.dtype}"
        assert o.shape == s.shape, f"{what}: shape {tuple(o.shape)}, reference {tuple(s.shape)}"
        assert o.device == s.device
        assert torch.isfinite(o).all(), what
        if o.dtype == torch.float32:
            torch.testing.assert_close(o, s, rtol=1e-5, atol=1e-5 * (1 + s.abs().max().item()), msg=what)
        else:
            err = (o.double() - e).abs().max().item()
            err_ref = (s.double() - e).abs().max().item()
            floor = 1e-6 * (1 + e.abs().max().item())
            assert err <= 2 * err_ref + floor, f"{what}: error {err:.3g} vs the reference's own {err_ref:.3g}"
    return ours


# ---------------------------------------------------------------------------------------------------
# LayerNorm + modulation
# ---------------------------------------------------------------------------------------------------
@case_ids
def test_ln_mod_fwd(case):
    gen = Gen(case, 0)
    x = gen.rows() * 2 + 0.5  # nonzero mean
    shift, scale = gen.vecs(2)
    check("ln_mod_fwd", x, shift, scale)


def test_ln_mod_fwd_out_dtype_and_eps():
    gen = Gen("mixed-x32-bf16-strided", 1)
    x = gen.rows()
    shift, scale = gen.vecs(2)
    (y, *_) = check("ln_mod_fwd", x, shift, scale, eps=1e-2, out_dtype=torch.float16)
    assert y.dtype == torch.float16


@case_ids
def test_ln_dual_fwd(case):
    gen = Gen(case, 2)
    x = gen.rows() - 0.3
    check("ln_dual_fwd", x, *gen.vecs(4))


@case_ids
def test_ln_mod_jvp(case):
    gen = Gen(case, 3)
    x = gen.rows()
    x_dot = gen.rows(F32)  # tangent streams are fp32
    _, mean, rstd = ref.ln_mod_fwd(x, *gen.vecs(2))
    scale, shift_dot, scale_dot = gen.vecs(3)
    check("ln_mod_jvp", x, x_dot, mean, rstd, scale, shift_dot, scale_dot)
    check("ln_mod_jvp", x, x_dot, mean, rstd, scale, shift_dot, scale_dot, out_dtype=gen.mdt)


@case_ids
def test_ln_mod_bwd(case):
    gen = Gen(case, 4)
    x = gen.rows() + 1.0
    _, mean, rstd = ref.ln_mod_fwd(x, *gen.vecs(2))
    gy = gen.rows(gen.mdt)  # gy in y's dtype (shift's)
    (scale,) = gen.vecs(1)
    check("ln_mod_bwd", [gy], x, mean, rstd, [scale])


def test_ln_mod_bwd_mixed_modulation_dtypes():
    """shift float32 (so y and gy float32) with scale bfloat16: each gradient in its own input's dtype, as the
    reference's (gshift was rounded to scale's bfloat16: 0.011 max error on the shift gradient)."""
    gen = Gen("fp32", 12)
    x = gen.rows()
    _, mean, rstd = ref.ln_mod_fwd(x, *gen.vecs(2))
    (scale,) = gen.vecs(1, BF16)
    gx, gsh, gsc = check("ln_mod_bwd", [gen.rows(F32)], x, mean, rstd, [scale])
    assert gsh.dtype == F32 and gsc.dtype == BF16


@pytest.mark.parametrize("case", ["fp32-odd-strided", "mixed-x32-bf16-strided"])
def test_ln_dual_bwd(case):
    gen = Gen(case, 5)
    x = gen.rows()
    _, mean, rstd = ref.ln_mod_fwd(x, *gen.vecs(2))
    gys = [gen.rows(gen.mdt), gen.rows(gen.mdt)]
    check("ln_mod_bwd", gys, x, mean, rstd, gen.vecs(2))


def test_ln_mod_bwd_matches_autograd():
    """The backward formulas themselves, independently of rowwise_ref: autograd through a float64 LayerNorm."""
    gen = Gen("fp32-odd-strided", 6)
    x = gen.rows()
    shift_v, scale_v, shift_u, scale_u = gen.vecs(4)
    gys = [gen.rows(), gen.rows()]
    _, _, mean, rstd = tri.ln_dual_fwd(x, shift_v, scale_v, shift_u, scale_u)
    gx, gshift, gscale = tri.ln_mod_bwd(gys, x, mean, rstd, [scale_v, scale_u])
    leaves = [t.detach().double().requires_grad_(True) for t in (x, shift_v, scale_v, shift_u, scale_u)]
    xx, sv, cv, su, cu = leaves
    n = torch.nn.functional.layer_norm(xx, xx.shape[-1:], eps=1e-6)
    loss = ((n * (1 + cv[:, None]) + sv[:, None]) * gys[0].double()).sum() \
        + ((n * (1 + cu[:, None]) + su[:, None]) * gys[1].double()).sum()
    want = torch.autograd.grad(loss, leaves)
    for got, w in zip([gx, gshift[0], gscale[0], gshift[1], gscale[1]], want):
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# gated residual
# ---------------------------------------------------------------------------------------------------
@case_ids
def test_gated_fwd(case):
    gen = Gen(case, 7)
    x = gen.rows()
    (g,) = gen.vecs(1)
    check("gated_fwd", x, g, gen.rows(gen.mdt))


@case_ids
def test_gated_jvp(case):
    gen = Gen(case, 8)
    x_dot = gen.rows(F32)
    g, g_dot = gen.vecs(2)
    check("gated_jvp", x_dot, g, g_dot, gen.rows(gen.mdt), gen.rows(gen.mdt))


@case_ids
def test_gated_bwd(case):
    gen = Gen(case, 9)
    gout = gen.rows()
    (g,) = gen.vecs(1)
    check("gated_bwd", gout, g, gen.rows(gen.mdt))


# ---------------------------------------------------------------------------------------------------
# block configs, determinism, edge cases
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 40, 48), (1, 3, 1000)])
def test_gpu_block_configs(shape, monkeypatch):
    """The GPU tile heuristics (several rows per program, several row tiles per sample; BLOCK_D 1024 for D=1000),
    also under the interpreter (which otherwise uses small test tiles)."""
    monkeypatch.setattr(tri, "_small_blocks", lambda: False)
    gen = Gen((shape, BF16, BF16, True), 10)
    x = gen.rows()
    shift, scale, g, g_dot = gen.vecs(4)
    _, mean, rstd = check("ln_mod_fwd", x, shift, scale)
    check("ln_mod_jvp", x, gen.rows(F32), mean, rstd, scale, shift, g)
    check("ln_mod_bwd", [gen.rows(), gen.rows()], x, mean, rstd, [scale, g])
    check("gated_jvp", gen.rows(F32), g, g_dot, x, gen.rows())
    check("gated_bwd", x, g, gen.rows())


@pytest.mark.parametrize("dtypes", [[F32, F32], [BF16, F32]])
def test_column_sums(dtypes):
    """The partial-sum reduction alone, with more tiles than one step of it (n_tiles > BLOCK_T)."""
    part = torch.randn(2, 3, 70, 37, generator=torch.Generator().manual_seed(13)).to(DEV)
    got = tri._column_sums(part, dtypes)
    for k, (o, dt) in enumerate(zip(got, dtypes)):
        assert o.dtype == dt and o.shape == (3, 37)
        tol = 1e-5 if dt == F32 else 2.0 ** -8  # bf16: one rounding of the fp32 sum
        torch.testing.assert_close(o.float(), part[k].sum(1), rtol=tol, atol=tol)


def test_bwd_deterministic():
    gen = Gen("bf16-strided", 11)
    x, gy, h = gen.rows(), gen.rows(), gen.rows()
    scale, g = gen.vecs(2)
    _, mean, rstd = tri.ln_mod_fwd(x, scale, scale)
    a = _tensors(tri.ln_mod_bwd([gy], x, mean, rstd, [scale])) + _tensors(tri.gated_bwd(gy, g, h))
    b = _tensors(tri.ln_mod_bwd([gy], x, mean, rstd, [scale])) + _tensors(tri.gated_bwd(gy, g, h))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_empty_rows():
    x = torch.randn(2, 0, 8, device=DEV)
    s = torch.randn(2, 8, device=DEV)
    y, mean, rstd = tri.ln_mod_fwd(x, s, s)
    assert y.shape == x.shape and mean.shape == (2, 0)
    gx, (gsh,), (gsc,) = tri.ln_mod_bwd([x], x, mean, rstd, [s])
    assert gx.shape == x.shape and torch.equal(gsh, torch.zeros_like(s)) and torch.equal(gsc, torch.zeros_like(s))
    gh, gg = tri.gated_bwd(x, s, x)
    assert gh.shape == x.shape and torch.equal(gg, torch.zeros_like(s))


def test_available():
    assert tri.available() and tri.available(torch.empty(1, device=DEV))


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from dumo_engine.ops import rowwise_triton as m\n"
            "import torch\n"
            "assert m.triton is None and not m.available()\n"
            "x = torch.randn(1, 2, 4); s = torch.randn(1, 4)\n"
            "try:\n    m.ln_mod_fwd(x, s, s)\nexcept RuntimeError as e:\n    assert 'triton' in str(e)\n"
            "else:\n    raise SystemExit('no error')\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _bad_inputs():
    x = torch.randn(2, 3, 8, device=DEV)
    s = torch.randn(2, 8, device=DEV)
    mean, rstd = torch.zeros(2, 3, device=DEV), torch.ones(2, 3, device=DEV)
    c = torch.randn(2, 16, device=DEV)
    return [
        ("x has unsupported dtype torch.float64", TypeError, lambda: tri.ln_mod_fwd(x.double(), s, s)),
        ("shift has unsupported dtype torch.float64", TypeError, lambda: tri.ln_mod_fwd(x, s.double(), s)),
        ("h has unsupported dtype torch.int64", TypeError, lambda: tri.gated_fwd(x, s, x.long())),
        ("x must be contiguous", ValueError, lambda: tri.ln_mod_fwd(x.transpose(0, 1).contiguous()
                                                                    .transpose(0, 1), s, s)),
        ("x must be (N, T, D)", ValueError, lambda: tri.ln_mod_fwd(x[0], s, s)),
        ("scale must be (N, D)", ValueError, lambda: tri.ln_mod_fwd(x, s, s[:1])),
        ("scale must have a unit last stride", ValueError, lambda: tri.ln_mod_fwd(x, s, c[:, ::2])),
        ("h has shape", ValueError, lambda: tri.gated_fwd(x, s, x[:, :2])),
        ("x_dot has shape", ValueError, lambda: tri.ln_mod_jvp(x, x[:1], mean, rstd, s, s, s)),
        ("mean must be float32", TypeError, lambda: tri.ln_mod_jvp(x, x, mean.half(), rstd, s, s, s)),
        ("rstd must be (N, T)", ValueError, lambda: tri.ln_mod_bwd([x], x, mean, rstd[:, :2], [s])),
        ("gys and scales", ValueError, lambda: tri.ln_mod_bwd([x, x], x, mean, rstd, [s])),
        ("gys and scales", ValueError, lambda: tri.ln_mod_bwd([x] * 3, x, mean, rstd, [s] * 3)),
        ("out_dtype torch.float64", TypeError, lambda: tri.ln_mod_fwd(x, s, s, out_dtype=torch.float64)),
        ("g_dot is on meta", ValueError, lambda: tri.gated_jvp(x, s, s.to("meta"), x, x)),
        ("gys[1] is on meta", ValueError, lambda: tri.ln_mod_bwd([x, x.to("meta")], x, mean, rstd, [s, s])),
    ]


@pytest.mark.parametrize("i", range(len(_bad_inputs())))
def test_bad_inputs_raise(i):
    msg, exc, call = _bad_inputs()[i]
    with pytest.raises(exc, match=re.escape(msg)):
        call()


# ---------------------------------------------------------------------------------------------------
# GPU: DiT shapes with the compiled kernels
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("D", [384, 1152])
@pytest.mark.parametrize("xdt", [BF16, F32])
def test_dit_shapes_gpu(D, xdt):
    gen = Gen(((8, 256, D), xdt, BF16, True), 12)
    x = gen.rows()
    shift, scale, g, g_dot = gen.vecs(4)
    _, mean, rstd = check("ln_mod_fwd", x, shift, scale)
    check("ln_dual_fwd", x, shift, scale, g, g_dot)
    check("ln_mod_jvp", x, gen.rows(F32), mean, rstd, scale, shift, g)
    check("ln_mod_bwd", [gen.rows(BF16)], x, mean, rstd, [scale])
    check("ln_mod_bwd", [gen.rows(BF16), gen.rows(BF16)], x, mean, rstd, [scale, g])
    check("gated_fwd", x, g, gen.rows(BF16))
    check("gated_jvp", gen.rows(F32), g, g_dot, gen.rows(BF16), gen.rows(BF16))
    check("gated_bwd", x, g, gen.rows(BF16))


def test_grid_y_limit_raises_a_named_error(monkeypatch):
    """Samples (and sample x output sums for the column sums) go on grid axis 1, whose CUDA limit is 65535: past it
    the launch failed with a bare "invalid argument" (the dual backward from N = 16384). Now a named error, checked
    here with the limit lowered."""
    gen = Gen("fp32", 13)
    x = gen.rows()
    _, mean, rstd = ref.ln_mod_fwd(x, *gen.vecs(2))
    monkeypatch.setattr(tri, "_MAX_GRID_Y", 7)  # N = 2: dual column sums need 4 x 2 = 8 programs on axis 1
    tri.ln_mod_bwd([gen.rows()], x, mean, rstd, gen.vecs(1))  # single: 2 x 2 = 4, fits
    with pytest.raises(ValueError, match="8 programs on grid axis 1"):
        tri.ln_mod_bwd([gen.rows(), gen.rows()], x, mean, rstd, gen.vecs(2))
    monkeypatch.setattr(tri, "_MAX_GRID_Y", 1)
    with pytest.raises(ValueError, match="2 programs on grid axis 1"):
        tri.gated_fwd(x, *gen.vecs(1), gen.rows())


def test_every_launch_runs_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device and its stream: each op's kernels (the column sums too) launch
    inside _triton_jit.on_device of their operands, so a cuda:1 tensor's kernels run on cuda:1."""
    from helpers import record_launches

    seen, launched = record_launches(monkeypatch, tri)
    gen = Gen("fp32", 21)
    x = gen.rows()
    shift, scale, g, g_dot = gen.vecs(4)
    _, mean, rstd = tri.ln_mod_fwd(x, shift, scale)
    tri.ln_dual_fwd(x, shift, scale, g, g_dot)
    tri.ln_mod_jvp(x, gen.rows(), mean, rstd, scale, shift, g)
    tri.ln_mod_bwd([gen.rows(), gen.rows()], x, mean, rstd, [scale, g])
    tri.gated_fwd(x, g, gen.rows())
    tri.gated_jvp(gen.rows(), g, g_dot, gen.rows(), gen.rows())
    tri.gated_bwd(x, g, gen.rows())
    assert sorted(set(launched)) == ["_colsum_kernel", "_gated_bwd_kernel", "_gated_fwd_kernel", "_gated_jvp_kernel",
                                     "_ln_bwd_kernel", "_ln_fwd_kernel", "_ln_jvp_kernel"]
    assert len(seen) == len(launched) == 9 and set(seen) == {x.device}
