"""The CUDA code path of the row-wise ops, run on the CPU by the emulator (csrc/sim, built by cuda_sim_build.py):
dumo_engine._C's glue, launchers and kernels compiled as host C++, every thread a fiber, barriers and warp shuffles
emulated (a deadlock raises). Each op under each kernel variant (general kernels, fast path, option bits) against the
C++ CPU twin, which tests/test_rowwise.py checks against float64; device properties (SMs, resident blocks, shared
memory, reported spills) are set per test to drive the launchers' choices (tile plans, the shared-memory fallback,
the preload heuristic). What this cannot check -- speed, the compiled SASS, the memory model -- the GPU suite does.

CI sets DUMO_REQUIRE_CUDA_SIM=1: there a failed emulator build fails instead of skipping.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dumo_engine.ops import rowwise as rw

import cuda_sim_build
from test_rowwise import TUNED, check_tuned, check_variant_switch, inputs, rnd

C = rw.extension()


@pytest.fixture(scope="module")
def sim():
    if C is None:
        pytest.skip(f"C++ extension not built: {rw.extension_error()}")
    try:
        m = cuda_sim_build.build()
    except Exception as e:  # noqa: BLE001 - reported as the skip reason, or raised where required
        if os.environ.get("DUMO_REQUIRE_CUDA_SIM") == "1":
            raise
        pytest.skip(f"CUDA emulator not built: {type(e).__name__}: {e}")
    m.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)
    prev = m.cuda_fast_path()
    yield m
    m.cuda_fast_path(prev)
    m.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)


# kernel variants (csrc/rowwise_fast.h): 0 general kernels, 1 automatic, 2 / 3 without / with the next row's loads in
# flight; option bits 4 wide JVP, 8 planned backward tiles, 16 two rows per pass in the LayerNorm backward, 64 the
# gated residual's rows layout, 128 its cache-streaming hints, 256 the LayerNorm backward with a block of warps per
# row (taking precedence over 16)
VARIANTS = [0, 1, 2, 3, 2 | 4 | 8 | 64, 1 | 16 | 128, 1 | 8 | 16, 3 | 4 | 8 | 16 | 64 | 128, 1 | 256, 2 | 8 | 16 | 256]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES_ALL = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (F32, F16)]
DTYPES_TRAIN = [(F32, BF16), (BF16, BF16)]
UNUSUAL = [(BF16, F16), (F16, F32)]  # legal mixes the fast path leaves to the general kernels
FAST = [  # D % 8 == 0, D <= 2048: the fast path applies (forward / JVP chunks per lane NC = ceil(D / 256))
    ((2, 70, 384), DTYPES_ALL),  # rows cross a 64-row tile; partly filled chunks
    ((2, 9, 1152), DTYPES_ALL),  # DiT-XL/2 width: padding chunks in the forward, JVP and backward
    ((1, 5, 2048), DTYPES_TRAIN),  # the widest fast rows (dual backward: 144 KiB of shared memory)
    ((3, 6, 768), DTYPES_TRAIN),  # DiT-B/2 width
    ((2, 5, 40), DTYPES_TRAIN),  # narrow rows: most lanes idle
    ((1, 4, 1024), [(F32, BF16)]),  # NC = 4, no padding
    ((1, 3, 1536), [(BF16, BF16)]),  # NC = 6
    ((1, 3, 1600), [(F32, BF16)]),  # NC = 7 -> 8: a chunk of padding only
]
GENERAL = [((2, 5, 37), DTYPES_ALL), ((1, 3, 2560), DTYPES_TRAIN), ((2, 70, 384), UNUSUAL)]
CASES = ([(s, tx, tm, v) for s, dts in FAST for tx, tm in dts for v in VARIANTS]
         + [(s, tx, tm, 1) for s, dts in GENERAL for tx, tm in dts])


def tol(dtype):
    """(rtol, atol factor): the twin and the kernels both compute in float32, in different orders; a rounded
    output may differ by one unit in the last place of its dtype."""
    return {F32: (2e-5, 1e-6), BF16: (2 ** -7, 1e-5), F16: (2 ** -10, 1e-6)}[dtype]


def close(name, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    rtol, af = tol(want.dtype)
    g, w = got.double(), want.double()
    assert torch.isfinite(g).all(), f"{name}: non-finite output"
    atol = af * max(w.abs().max().item(), 1e-30)
    bad = (g - w).abs() > atol + rtol * w.abs()
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off, first at "
                           f"{tuple(bad.nonzero()[0].tolist())}: {g[bad][0].item()} vs {w[bad][0].item()}")


def operands(shape, tx, tm, seed=0):
    """test_rowwise's inputs (x, row-strided adaLN views and their tangents, branch tensors, gradients) plus the
    gated backward's gout in the residual dtype."""
    d = inputs(shape, tx, tm, "cpu", seed=seed)
    d["gout"] = rnd(*shape, dtype=tx, seed=seed + 8)
    return d


def run_all(m, d):
    """Every op of the module m (the emulator or the CPU twin) on the operands d, as a name -> tensor dict."""
    sv, cv, su, cu, g, _ = d["mods"]
    dsv, dcv, _, _, dg, _ = d["mods_dot"]
    out = {}
    y, mean, rstd = m.ln_mod_fwd(d["x"], [sv], [cv], 1e-6)
    out.update(y=y, mean=mean, rstd=rstd)
    yv, yu, mean2, rstd2 = m.ln_mod_fwd(d["x"], [sv, su], [cv, cu], 1e-6)
    out.update(dual_yv=yv, dual_yu=yu, dual_mean=mean2, dual_rstd=rstd2)
    for f32 in (True, False):
        out[f"jvp_f32={f32}"] = m.ln_mod_jvp(d["x"], d["x_dot"], mean, rstd, cv, dsv, dcv, f32)
    for k, v in zip(("gx", "gshift", "gscale"), m.ln_mod_bwd([d["gy"]], d["x"], mean, rstd, [cv])):
        out[k] = v
    for k, v in zip(("dual_gx", "gshift_v", "gshift_u", "gscale_v", "gscale_u"),
                    m.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean2, rstd2, [cv, cu])):
        out[k] = v
    out["gated"] = m.gated_fwd(d["x"], g, d["h"])
    out["gated_jvp"] = m.gated_jvp(d["x_dot"], g, dg, d["h"], d["h_dot"])
    out["gh"], out["gg"] = m.gated_bwd(d["gout"], g, d["h"])
    return out


@pytest.mark.parametrize("shape,tx,tm,variant", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_path_matches_cpu_twin(sim, shape, tx, tm, variant):
    """Forward (one and two modulations), JVP (float32 and modulation-dtype outputs), backward (one and two
    modulations) and the gated residual's three ops: the emulated CUDA launchers and kernels give the CPU twin's
    results."""
    sim.cuda_fast_path(variant)
    d = operands(shape, tx, tm, seed=variant)
    want = run_all(C, d)
    got = run_all(sim, d)
    for k in want:
        close(k, got[k], want[k])


@pytest.mark.parametrize("sms,per_sm", [(1, 1), (4, 2), (64, 2)])
@pytest.mark.parametrize("variant", [1 | 8, 3 | 8, 1 | 8 | 16, 1 | 8 | 256])
def test_planned_tiles_on_emulated_cards(sim, sms, per_sm, variant):
    """Planned backward tiles on cards of 1, 8 and 128 resident blocks: a sample per block with T > 64 (the kernel
    writes the column sums), and several tiles of other than 64 rows (partials + the column-sum kernel). The launch
    log shows each fast backward on the planned grid, and the column-sum kernel exactly when a sample spans tiles."""
    names = _kernel_names(sim)
    sim.sim_configure(sms=sms, blocks_per_sm=per_sm, smem_optin=227 * 1024, local_bytes=0)
    try:
        sim.cuda_fast_path(variant)
        for shape in [(2, 150, 384), (9, 130, 64)]:
            N, T, _ = shape
            d = operands(shape, F32, BF16, seed=sms)
            want = run_all(C, d)
            sim.sim_launches()
            got = run_all(sim, d)
            log = _launched(sim, names)
            for k in ("gx", "gshift", "gscale", "dual_gx", "gshift_v", "gshift_u", "gscale_v", "gscale_u", "gh", "gg"):
                close(k, got[k], want[k])
            tiles = C.bwd_tile_plan(N, T, sms * per_sm)[1]
            bwd = [grid for name, grid in log if "_bwd_pair" in name or "_bwd_wide" in name]
            assert len(bwd) == 3 and all(g == (N, tiles, 1) for g in bwd), (tiles, log)
            assert sum("_bwd_wide" in name for name, _ in log) == (2 if variant & 256 else 0), log
            assert sum("colsum_kernel" in name for name, _ in log) == (3 if tiles > 1 else 0), (tiles, log)
    finally:
        sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)


@pytest.mark.parametrize("smem_kib", [48, 100])
def test_backward_falls_back_when_shared_memory_is_short(sim, smem_kib):
    """A card whose per-block shared memory cannot hold the warp-pair backward's column sums (the dual layer needs
    110 KiB at D = 1152, 144 KiB at D = 2048) gets the general kernel, or with bit 256 the wide backward (column sums
    in registers, no dynamic shared memory): same results, no error."""
    sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=smem_kib * 1024, local_bytes=0)
    try:
        for variant in (1, 1 | 8 | 16, 1 | 256):
            sim.cuda_fast_path(variant)
            for shape in [(2, 9, 1152), (1, 5, 2048)]:
                d = operands(shape, BF16, BF16)
                want, got = run_all(C, d), run_all(sim, d)
                for k in want:
                    close(k, got[k], want[k])
    finally:
        sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)


def test_spill_reading_is_cached_per_device(sim):
    """Whether a kernel fits in registers is read per (kernel, device) (the compiled code differs between card
    architectures): in one process, a card whose kernels report 100 spilled bytes runs kAuto's wide JVP at D = 2048,
    the next card (no spill) the warp-per-row kernel, and a third like the first the wide one again; the first
    card's answer does not stick."""
    names = _kernel_names(sim)
    prev = sim.cuda_fast_path(1)
    try:
        for spill, want in ((100, "wide"), (0, "warp"), (100, "wide")):
            sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=spill)  # a new device
            d = operands((1, 3, 2048), F32, BF16)
            _, mean, rstd = sim.ln_mod_fwd(d["x"], [d["mods"][0]], [d["mods"][1]], 1e-6)
            sim.sim_launches()
            args = (d["x"], d["x_dot"], mean, rstd, d["mods"][1], d["mods_dot"][0], d["mods_dot"][1], True)
            close("jvp", sim.ln_mod_jvp(*args), C.ln_mod_jvp(*args))
            ks = [n for n, _ in _launched(sim, names)]
            assert ks and all(f"ln_mod_jvp_{want}<" in n for n in ks), (spill, ks)
    finally:
        sim.cuda_fast_path(prev)
        sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)


@pytest.mark.parametrize("spill", [0, 100])
def test_preload_choice_follows_reported_spills(sim, spill):
    """kAuto holds the next row in registers only in kernels that spill at most 16 bytes (read per kernel and device;
    each case runs in a fresh process configured before its first launch): with every kernel reporting
    100 spilled bytes it takes the one-row kernels, with 0 the preloading ones (and the two-rows and wide-backward
    options apply only at 0); its JVP is the wide layout at 100 and the warp-per-row kernel at 0 (the explicit
    base 3 runs the warp kernel either way); the results are the CPU twin's either way."""
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import test_cuda_sim as t, cuda_sim_build
sim = cuda_sim_build.build()
sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes={spill})
for v in (1, 1 | 16, 1 | 256):
    sim.cuda_fast_path(v)
    d = t.operands((2, 70, 768), t.F32, t.BF16)
    want, got = t.run_all(t.C, d), t.run_all(sim, d)
    for k in want:
        t.close(k, got[k], want[k])
names = t._kernel_names(sim)
for v in (1, 3):
    sim.cuda_fast_path(v)
    d = t.operands((1, 3, 2048), t.F32, t.BF16)
    _, mean, rstd = sim.ln_mod_fwd(d["x"], [d["mods"][0]], [d["mods"][1]], 1e-6)
    sim.sim_launches()
    got = sim.ln_mod_jvp(d["x"], d["x_dot"], mean, rstd, d["mods"][1], d["mods_dot"][0], d["mods_dot"][1], True)
    t.close("jvp", got, t.C.ln_mod_jvp(d["x"], d["x_dot"], mean, rstd, d["mods"][1], d["mods_dot"][0],
                                       d["mods_dot"][1], True))
    ks = [n for n, _ in t._launched(sim, names)]
    kind = [k for k in ("wide", "warp") if ks and all(f"ln_mod_jvp_{{k}}<" in n for n in ks)]
    print("JVP", v, kind[0] if kind else repr(ks))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    jvp = dict(line.split()[1:] for line in res.stdout.splitlines() if line.startswith("JVP"))
    assert jvp == {"1": "wide" if spill else "warp", "3": "warp"}, res.stdout


def test_cuda_only_checks_and_variant_switch(sim):
    """The glue's CUDA-only input checks and the kernel switch's argument check, which a CPU build never reaches."""
    x = torch.randn(1, 2, 4100)
    v = torch.randn(1, 4100)
    with pytest.raises(RuntimeError, match=r"hidden size 4100 exceeds the CUDA kernels' 4096"):
        sim.ln_mod_fwd(x, [v], [v], 1e-6)
    check_variant_switch(sim)


def test_emulator_checks_itself(sim):
    """The emulator's own checks: a warp-sum kernel with a warp that exits before the block's __syncthreads runs
    right; a kernel whose threads disagree on a barrier raises, naming it, instead of hanging; an exception in a
    thread reaches the caller."""
    assert sim.sim_selftest(0) == 0
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0, 0\).*waits at __syncthreads"):
        sim.sim_selftest(1)
    with pytest.raises(RuntimeError, match=r"thrown by thread 40"):
        sim.sim_selftest(2)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", [0, 1, 3 | 4 | 8 | 16 | 64 | 128, 1 | 8 | 256])
def test_other_scheduling_orders(sim, order, variant):
    """Fibers switch only at barriers and shuffles, so the order in which runnable threads go next decides which
    unsynchronised shared-memory orderings a run sees: reverse and greedy orders expose a missing barrier or a
    single-buffered exchange that the forward order hides; reverse and greedy-high also run the blocks last first,
    which exposes a block writing rows of the next block or sample. The kernels give the twin's results under each."""
    sim.sim_order(order)
    try:
        sim.cuda_fast_path(variant)
        for shape, (tx, tm) in [((2, 70, 384), (F32, BF16)), ((2, 9, 1152), (BF16, BF16))]:
            d = operands(shape, tx, tm, seed=order)
            want, got = run_all(C, d), run_all(sim, d)
            for k in want:
                close(k, got[k], want[k])
    finally:
        sim.sim_order(0)


@pytest.mark.parametrize("variant", [1, 1 | 8 | 16 | 64 | 128])
def test_unaligned_and_empty_inputs(sim, variant):
    """Operands that are not 16-byte aligned take the general kernels' scalar path (the emulator checks every
    16-byte access for alignment); T = 0 and N = 0 give empty outputs and zero column sums."""
    sim.cuda_fast_path(variant)
    N, T, D = 2, 70, 384
    flat = torch.randn(N * T * D + 1)
    d = operands((N, T, D), F32, F32)
    d["x"] = flat[1:].view(N, T, D)  # 4 bytes past an aligned buffer: contiguous but not 16-byte aligned
    assert d["x"].data_ptr() % 16 != 0
    want, got = run_all(C, d), run_all(sim, d)
    for k in want:
        close(k, got[k], want[k])
    for n, t in ((3, 0), (0, 5)):
        d = operands((n, t, 24), F32, BF16)
        want, got = run_all(C, d), run_all(sim, d)
        for k in want:
            assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


def _kernel_names(sim) -> dict[int, str]:
    """Offsets of the module's functions -> demangled names (nm), to read the emulator's launch log."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found: cannot name the launched kernels")
    out = subprocess.run([nm, "-C", "--defined-only", sim.__file__], capture_output=True, text=True, timeout=120)
    names = {}
    for line in out.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            names[int(parts[0], 16)] = parts[2]
    return names


def _launched(sim, names):
    """(kernel name, grid) of the launches since the last call."""
    return [(names.get(int(k[1:]), k) if k.startswith("@") else k, grid) for k, grid, _, _ in sim.sim_launches()]


def test_each_variant_runs_its_kernels(sim):
    """The launch log names the kernels each call ran, so no variant can pass by silently falling back: the general
    kernels only under 0, the warp-per-row forward and warp-pair backward under 1, the wide JVP with bit 4, the
    two-row backward with bit 16, the backward with a block of warps per row with bit 256 (before 16, and where
    shared memory is short: it needs none), a sample per block without the column-sum kernel with bit 8 where the
    plan says one tile, the general backward when shared memory is short, the general kernels for odd D, and the
    gated forward and JVP by rows with bit 64 and with the cache hint with bit 128 (neither under base 0)."""
    names = _kernel_names(sim)
    sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)

    def ran(variant, shape, op, dtypes=(F32, BF16)):
        sim.cuda_fast_path(variant)
        d = operands(shape, *dtypes)
        sv, cv, su, cu, _, _ = d["mods"]
        dsv, dcv = d["mods_dot"][:2]
        y, mean, rstd = sim.ln_mod_fwd(d["x"], [sv, su], [cv, cu], 1e-6)[1:] if op == "dual" else \
            sim.ln_mod_fwd(d["x"], [sv], [cv], 1e-6)
        sim.sim_launches()  # only the op of interest below
        if op == "fwd":
            sim.ln_mod_fwd(d["x"], [sv], [cv], 1e-6)
        elif op == "jvp":
            sim.ln_mod_jvp(d["x"], d["x_dot"], mean, rstd, cv, dsv, dcv, True)
        elif op == "bwd":
            sim.ln_mod_bwd([d["gy"]], d["x"], mean, rstd, [cv])
        elif op == "dual":
            sim.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean, rstd, [cv, cu])
        return _launched(sim, names)

    def kernels(log):  # "void ns::(anonymous namespace)::kernel<args>(params)" -> "kernel<args>"
        out = []
        for name, _ in log:
            m = re.search(r"(\w+<[^()]*>)\(", name)
            out.append(m.group(1) if m else name)
        return out

    try:
        assert kernels(ran(0, (2, 70, 384), "fwd")) == ["ln_mod_fwd_kernel<float, __nv_bfloat16, true, 1>"]
        assert [k.split("<")[0] for k in kernels(ran(0, (2, 70, 384), "bwd"))] == ["ln_mod_bwd_kernel", "colsum_kernel"]
        assert kernels(ran(1, (2, 70, 384), "fwd")) == ["ln_mod_fwd_warp<float, __nv_bfloat16, 2, 1, 4>"]
        assert kernels(ran(1, (2, 70, 384), "jvp")) == ["ln_mod_jvp_warp<float, __nv_bfloat16, float, 2>"]
        assert kernels(ran(1 | 4, (2, 70, 384), "jvp")) == ["ln_mod_jvp_wide<float, __nv_bfloat16, float, 1>"]
        log = ran(1, (2, 70, 384), "bwd")  # 64-row tiles: two per sample, then the column-sum kernel
        assert kernels(log) == ["ln_mod_bwd_pair<float, __nv_bfloat16, 1, 1, true>", "colsum_kernel<__nv_bfloat16>"]
        assert log[0][1] == (2, 2, 1)
        assert kernels(ran(2, (2, 70, 384), "bwd"))[0] == "ln_mod_bwd_pair<float, __nv_bfloat16, 1, 1, false>"
        assert kernels(ran(1 | 16, (2, 70, 384), "dual"))[0] == "ln_mod_bwd_pair2<float, __nv_bfloat16, 1, 2>"
        log = ran(1 | 256, (2, 70, 384), "bwd")  # a block of 2 warps per row (D = 384), 64-row tiles
        assert kernels(log) == ["ln_mod_bwd_wide<float, __nv_bfloat16, 2, 1>", "colsum_kernel<__nv_bfloat16>"]
        assert log[0][1] == (2, 2, 1)
        assert kernels(ran(1 | 16 | 256, (2, 70, 384), "dual"))[0] == "ln_mod_bwd_wide<float, __nv_bfloat16, 2, 2>"
        log = ran(1 | 8 | 256, (8, 130, 64), "bwd")  # one warp per row; a sample per block, no column-sum kernel
        assert kernels(log) == ["ln_mod_bwd_wide<float, __nv_bfloat16, 1, 1>"] and log[0][1] == (8, 1, 1)
        assert C.bwd_tile_plan(8, 130, 8) == [132, 1]  # the emulated card: 4 SMs x 2 blocks
        log = ran(1 | 8, (8, 130, 64), "bwd")  # a sample per block: column sums written by the kernel
        assert kernels(log) == ["ln_mod_bwd_pair<float, __nv_bfloat16, 1, 1, true>"] and log[0][1] == (8, 1, 1)
        assert C.bwd_tile_plan(9, 130, 8) == [44, 3]  # 9 samples on 8 slots: three tiles of 44 rows fill best
        log = ran(1 | 8, (9, 130, 64), "bwd")
        assert kernels(log)[1] == "colsum_kernel<__nv_bfloat16>" and log[0][1] == (9, 3, 1)
        assert [k.split("<")[0] for k in kernels(ran(1, (2, 5, 37), "bwd"))] == ["ln_mod_bwd_kernel", "colsum_kernel"]
        d = operands((2, 70, 384), F32, BF16)  # the gated forward and JVP: flat or by rows, with or without hints
        g, g_dot = d["mods"][4], d["mods_dot"][4]
        for v, fwd, jvp in ((1, "gated_fwd_kernel<float, __nv_bfloat16, true, false>",
                             "gated_jvp_kernel<__nv_bfloat16, true, false>"),
                            (1 | 128, "gated_fwd_kernel<float, __nv_bfloat16, true, true>",
                             "gated_jvp_kernel<__nv_bfloat16, true, true>"),
                            (1 | 64, "gated_fwd_rows<float, __nv_bfloat16, false>",
                             "gated_jvp_rows<__nv_bfloat16, false>"),
                            (1 | 64 | 128, "gated_fwd_rows<float, __nv_bfloat16, true>",
                             "gated_jvp_rows<__nv_bfloat16, true>"),
                            (64 | 128, "gated_fwd_kernel<float, __nv_bfloat16, true, false>",  # base 0: general only
                             "gated_jvp_kernel<__nv_bfloat16, true, false>")):
            sim.cuda_fast_path(v)
            sim.sim_launches()
            sim.gated_fwd(d["x"], g, d["h"])
            sim.gated_jvp(d["x_dot"], g, g_dot, d["h"], d["h_dot"])
            log = _launched(sim, names)
            assert kernels(log) == [fwd, jvp], (v, log)
            if v & 64 and v & 3:  # D / 8 = 48 threads x 5 rows, 40 rows per block: 2 x 2 blocks
                assert log[0][1] == log[1][1] == (2, 2, 1), log
        sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=100 * 1024, local_bytes=0)
        assert kernels(ran(1, (2, 9, 1152), "dual"))[0].startswith("ln_mod_bwd_kernel<")  # 110 KiB > 100 KiB
        assert kernels(ran(1, (2, 9, 1152), "bwd"))[0].startswith("ln_mod_bwd_pair<")  # 55 KiB fits
        assert kernels(ran(1 | 256, (2, 9, 1152), "dual"))[0] == "ln_mod_bwd_wide<float, __nv_bfloat16, 5, 2>"
    finally:
        sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)


@pytest.mark.parametrize("variant", [1 | 256, 2 | 8 | 256])
def test_wide_backward_across_tiles(sim, variant):
    """The wide LayerNorm backward (bit 256) where a sample spans tiles at 5 and 8 warps per row (DiT-XL/2's D =
    1152, and D = 2048): one and two modulations against the CPU twin, with partials and the column-sum kernel."""
    names = _kernel_names(sim)
    sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)
    sim.cuda_fast_path(variant)
    for shape, (tx, tm), g in [((2, 70, 1152), (BF16, BF16), 5), ((1, 70, 2048), (F32, BF16), 8)]:
        d = operands(shape, tx, tm, seed=g)
        sv, cv, su, cu = d["mods"][:4]
        for gys, sc in (([d["gy"]], [cv]), ([d["gy"], d["gy2"]], [cv, cu])):
            mods = ([sv], [cv]) if len(gys) == 1 else ([sv, su], [cv, cu])
            stats = C.ln_mod_fwd(d["x"], *mods, 1e-6)[-2:]
            want = C.ln_mod_bwd(gys, d["x"], *stats, sc)
            sim.sim_launches()
            got = sim.ln_mod_bwd(gys, d["x"], *stats, sc)
            log = _launched(sim, names)
            for i, (a, b) in enumerate(zip(got, want)):
                close(f"{shape} nmod={len(gys)} out {i}", a, b)
            tiles = C.bwd_tile_plan(shape[0], 70, 8)[1] if variant & 8 else 2
            kern = [grid for name, grid in log if f"ln_mod_bwd_wide<{'float' if tx == F32 else '__nv_bfloat16'}, "
                    f"__nv_bfloat16, {g}, {len(gys)}>" in name]
            assert kern == [(shape[0], tiles, 1)], log
            assert sum("colsum_kernel" in name for name, _ in log) == (tiles > 1), log


def test_tuned_variant_matches_its_choice(sim):
    """The tuned variant (the default) on the emulator: each key measured once, the choice one of its candidates,
    the tuned ops bit-identical to a repeat and to the chosen variant run explicitly (check_tuned; every variant
    matches the CPU twin at these shapes and dtypes in test_cuda_path_matches_cpu_twin)."""
    sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)
    assert (F32, BF16) in dict(FAST)[2, 70, 384] and (BF16, BF16) in dict(FAST)[2, 9, 1152]
    check_tuned(sim, "cpu", [((2, 70, 384), (F32, BF16)), ((2, 9, 1152), (BF16, BF16))])


def _record(sim, op):
    """The tuned variant's (first) record of op."""
    return next(r for r in sim.cuda_tuned() if r["op"] == op)


def _offset(names, kernel):
    """The emulator's name ('@offset') of the one kernel whose demangled name starts with `kernel`."""
    hits = [off for off, name in names.items() if re.search(r"(^|\W)" + re.escape(kernel) + r"\(", name)]
    assert len(hits) == 1, (kernel, [names[h] for h in hits])
    return f"@{hits[0]}"


def test_tuned_variant_runs_the_fastest_candidate(sim):
    """The measurement decides: with emulated launch costs (what CUDA events read in the emulator: 1 ms per launch
    unless set), a key runs the candidate whose launches cost least -- the wide JVP when its kernel is cheap, the
    two-row dual backward when that kernel is, planned tiles where a sample per block saves the column-sum launch --
    and the automatic choice (first) on a tie. The measuring call launches every candidate 1 + 5 times and the choice
    once more, last; later calls launch only the choice. A later candidate replaces the best so far only when 2%
    faster. While a CUDA graph is being captured, or when events cannot be created, an unmeasured key runs the
    automatic choice unmeasured (leaving no error behind); a measured one keeps its choice. Operands the fast path
    does not take (unaligned) are not measured; the caller's bits are part of the key."""
    names = _kernel_names(sim)
    wide = _offset(names, "ln_mod_jvp_wide<float, __nv_bfloat16, float, 1>")
    warp = _offset(names, "ln_mod_jvp_warp<float, __nv_bfloat16, float, 2>")
    two = _offset(names, "ln_mod_bwd_pair2<float, __nv_bfloat16, 1, 2>")
    sim.sim_configure(sms=4, blocks_per_sm=2, smem_optin=227 * 1024, local_bytes=0)  # a new device: no keys
    prev = sim.cuda_fast_path(TUNED)
    try:
        sim.cuda_tune_reset()
        d = operands((2, 70, 384), F32, BF16)
        sv, cv, su, cu, g = d["mods"][:5]
        dsv, dcv = d["mods_dot"][:2]
        _, mean, rstd = sim.ln_mod_fwd(d["x"], [sv], [cv], 1e-6)
        rec = {(r["op"], r["nmod"]): r for r in sim.cuda_tuned()}
        assert rec["ln_mod_fwd", 1]["candidates"] == [1, 2, 3, 0] and rec["ln_mod_fwd", 1]["variant"] == 1
        assert rec["ln_mod_fwd", 1]["ms"] == [1.0] * 4  # a tie: the automatic choice stays

        def jvp():
            return sim.ln_mod_jvp(d["x"], d["x_dot"], mean, rstd, cv, dsv, dcv, True)

        sim.sim_kernel_cost(wide, 0.25)
        sim.sim_launches()
        first = jvp()
        launched = [k for k, *_ in sim.sim_launches()]
        assert launched.count(wide) == 1 + 5 + 1 and launched.count(warp) == 1 + 5 and len(launched) == 3 * 6 + 1
        assert launched[-1] == wide and sim.sim_capture_mode() == 0  # the choice ran last; capture mode restored
        r = _record(sim, "ln_mod_jvp")
        assert r["candidates"] == [1, 1 | 4, 0] and r["ms"] == [1.0, 0.25, 1.0] and r["variant"] == 1 | 4
        again = jvp()
        assert [k for k, *_ in sim.sim_launches()] == [wide] and torch.equal(first, again)
        close("jvp", first, C.ln_mod_jvp(d["x"], d["x_dot"], mean, rstd, cv, dsv, dcv, True))

        sim.sim_capturing(True)  # a measured key keeps its choice during a capture ...
        jvp()
        assert [k for k, *_ in sim.sim_launches()] == [wide]
        sim.cuda_tune_reset()  # ... an unmeasured one runs the automatic choice, and stays unmeasured
        jvp()
        assert [k for k, *_ in sim.sim_launches()] == [warp] and sim.cuda_tuned() == []
        sim.sim_capturing(False)
        sim.sim_kernel_cost(warp, 0.5)  # now the one-warp kernel is cheaper than the general one, the wide dearer
        sim.sim_kernel_cost(wide, 2.0)
        jvp()
        assert [r["variant"] for r in sim.cuda_tuned() if r["op"] == "ln_mod_jvp"] == [1]
        sim.sim_kernel_cost(warp, 1.0)  # a later candidate must be 2% faster than the best so far to replace it
        for cost, want in ((0.99, 1), (0.97, 1 | 4)):
            sim.cuda_tune_reset()
            sim.sim_kernel_cost(wide, cost)
            jvp()
            assert _record(sim, "ln_mod_jvp")["variant"] == want, (cost, want)
        sim.cuda_tune_reset()
        sim.sim_event_failure(True)  # no events: the automatic choice, unmeasured, and no error left behind
        try:
            sim.sim_launches()
            jvp()
            assert [k for k, *_ in sim.sim_launches()] == [warp] and sim.cuda_tuned() == []
            sim.gated_fwd(d["x"], g, d["h"])  # the next op's launch check finds no stale error
        finally:
            sim.sim_event_failure(False)
        flat = torch.randn(d["x"].numel() + 1)  # x not 16-byte aligned: no fast path, nothing measured
        xu = flat[1:].view(d["x"].shape).copy_(d["x"])
        sim.ln_mod_jvp(xu, d["x_dot"], mean, rstd, cv, dsv, dcv, True)
        assert sim.cuda_tuned() == []
        jvp()
        prev2 = sim.cuda_fast_path(2 | 32)  # the caller's bits are part of the key: another measurement
        try:
            jvp()
        finally:
            sim.cuda_fast_path(prev2)
        assert sorted(r["candidates"][0] for r in sim.cuda_tuned() if r["op"] == "ln_mod_jvp") == [1, 2]

        sim.sim_kernel_cost(two, 0.25)  # the dual backward (2 tiles per sample + column sums): two rows per pass
        _, mean2, rstd2 = sim.ln_mod_fwd(d["x"], [sv, su], [cv, cu], 1e-6)[1:]
        sim.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean2, rstd2, [cv, cu])
        r = _record(sim, "ln_mod_bwd")
        assert r["candidates"] == [1, 2, 3, 2 | 8, 3 | 8, 1 | 16, 1 | 8 | 16, 1 | 256, 1 | 8 | 256, 0], r
        assert r["ms"] == [2.0] * 5 + [1.25, 1.25] + [2.0] * 3 and r["variant"] == 1 | 16, r  # tie: first
        sim.sim_launches()
        sim.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean2, rstd2, [cv, cu])
        assert sim.sim_launches()[0][0] == two
        wide_bwd = _offset(names, "ln_mod_bwd_wide<float, __nv_bfloat16, 2, 2>")
        sim.sim_kernel_cost(wide_bwd, 0.125)  # now the dual backward with a block of warps per row is cheapest
        sim.cuda_tune_reset()
        sim.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean2, rstd2, [cv, cu])
        r = _record(sim, "ln_mod_bwd")
        assert r["ms"][-3:] == [1.125, 1.125, 2.0] and r["variant"] == 1 | 256, r
        sim.sim_launches()
        sim.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean2, rstd2, [cv, cu])
        assert sim.sim_launches()[0][0] == wide_bwd

        sim.sim_kernel_cost("", 0)  # every launch 1 ms again: at N = 8, T = 130 on 8 slots planned tiles put a
        e = operands((8, 130, 64), F32, BF16)  # sample per block and save the column-sum launch
        sim.gated_bwd(e["gout"], e["mods"][4], e["h"])
        r = _record(sim, "gated_bwd")
        assert r["candidates"] == [1, 1 | 8, 0] and r["ms"] == [2.0, 1.0, 2.0] and r["variant"] == 1 | 8, r
        sim.sim_kernel_cost(_offset(names, "gated_fwd_rows<float, __nv_bfloat16, true>"), 0.5)  # rows, streaming
        sim.gated_fwd(e["x"], e["mods"][4], e["h"])
        r = _record(sim, "gated_fwd")
        assert r["candidates"] == [1, 1 | 128, 1 | 64, 1 | 64 | 128] and r["variant"] == 1 | 64 | 128, r
    finally:
        sim.sim_capturing(False)
        sim.sim_event_failure(False)
        sim.sim_kernel_cost("", 0)
        sim.cuda_tune_reset()
        sim.cuda_fast_path(prev)


def test_bench_notes_the_tuned_choice(sim, monkeypatch, tmp_path):
    """bench_rowwise's "cuda" rows carry what the tuned variant chose for that op and shape, from cuda_tuned()'s
    records (here the emulator's), and rowwise_table.py shows it beside the timings."""
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)
    import bench_rowwise
    import rowwise_table

    monkeypatch.setattr(bench_rowwise.rw, "extension", lambda: sim)
    prev = sim.cuda_fast_path(TUNED)
    try:
        sim.cuda_tune_reset()
        d = operands((2, 70, 384), F32, BF16)
        sv, cv, su, cu = d["mods"][:4]
        _, mean, rstd = sim.ln_mod_fwd(d["x"], [sv, su], [cv, cu], 1e-6)[1:]
        sim.ln_mod_bwd([d["gy"], d["gy2"]], d["x"], mean, rstd, [cv, cu])
        rec = _record(sim, "ln_mod_bwd")
        note = bench_rowwise.tuned_note("ln_dual_bwd", 2, 70, 384, F32, BF16)
        assert note == f"tuned {rec['variant']} (" + ", ".join(
            f"{v}: {ms:.3f}" for v, ms in zip(rec["candidates"], rec["ms"])) + ")"
        assert bench_rowwise.tuned_note("ln_mod_bwd", 2, 70, 384, F32, BF16) is None  # one modulation: not run
        assert bench_rowwise.tuned_note("ln_dual_bwd", 2, 70, 384, BF16, BF16) is None  # other dtypes
        assert bench_rowwise.tuned_note("gated_fwd", 2, 70, 384, F32, BF16) is None  # not run
        sim.cuda_fast_path(1)
        assert bench_rowwise.tuned_note("ln_dual_bwd", 2, 70, 384, F32, BF16) is None  # tuning off
    finally:
        sim.cuda_tune_reset()
        sim.cuda_fast_path(prev)
    row = {"shape": "XL/2 N2 T70 D384", "op": "ln_dual_bwd", "dtype": "fp32+bf16", "timing": {"median_ms": 0.25}}
    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({**row, "impl": "cuda", "extra": {"note": note, "of_copy_bw": "80%"}}) + "\n")
        f.write(json.dumps({**row, "impl": "cuda-general", "timing": {"median_ms": 0.5}}) + "\n")
    cells, impls, _ = rowwise_table.load(str(path))
    lines = rowwise_table.table(cells, impls)
    assert lines[0].endswith("| fastest CUDA | tuned choice (candidate: ms) |")
    assert lines[2] == f"| XL/2 | ln_dual_bwd | fp32+bf16 | 0.250 (80%) | 0.500 | cuda | {note} |"


def test_gated_rows_edge_shapes(sim):
    """The gated residual by rows at its geometry's edges: D = 8 (one thread per row, 256 rows a block) and more
    samples than a grid's y dimension holds (N = 65536: the flat kernel instead, by the launch log); the results are
    the CPU twin's."""
    names = _kernel_names(sim)
    prev = sim.cuda_fast_path(1 | 64 | 128)
    try:
        for shape, kernel in (((2, 300, 8), "gated_fwd_rows<"), ((65536, 1, 8), "gated_fwd_kernel<")):
            d = operands(shape, F32, BF16)
            g, g_dot = d["mods"][4], d["mods_dot"][4]
            sim.sim_launches()
            got = sim.gated_fwd(d["x"], g, d["h"])
            assert _launched(sim, names)[0][0].split("::")[-1].startswith(kernel)
            close("gated", got, C.gated_fwd(d["x"], g, d["h"]))
            close("gated_jvp", sim.gated_jvp(d["x_dot"], g, g_dot, d["h"], d["h_dot"]),
                  C.gated_jvp(d["x_dot"], g, g_dot, d["h"], d["h_dot"]))
    finally:
        sim.cuda_fast_path(prev)
