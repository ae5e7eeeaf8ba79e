"""The comparison benchmark runs end to end (tiny budget) and prints its table; no timing is checked."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_objectives_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "compare_objectives.py"), "--steps", "2",
           "--seeds", "0,1", "--variants", "fm,dumo", "--per-class", "3", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("| fm | 2 |") for ln in lines) and any(ln.startswith("| dumo | 2 |") for ln in lines)
    assert any(ln.startswith("| dumo | ") and "±" in ln for ln in lines if "t_mid" not in ln)
    assert sorted(os.listdir(tmp_path)) == ["dumo_seed0", "dumo_seed1", "fm_seed0", "fm_seed1"]
    # a second call reuses the cached runs instead of retraining
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "seed 0:" not in again.stdout


def test_bench_train_step_cpu_smoke(tmp_path):
    """bench_train_step runs its cases on CPU and writes one JSONL row each (no timing checked)."""
    import json
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train_step.py"), "--cpu", "--models", "DiT-tiny",
           "--batch", "4", "--iters", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["flow_matching", "dumo_reference", "dumo_fused", "dumo_fused_torch_rowwise",
                                         "dumo_fused_stacked"]
    assert all(r["timing"]["median_ms"] > 0 and r["flops"] > 0 and "commit" in r for r in rows)
    assert rows[2]["ref_ms"] == rows[1]["timing"]["median_ms"]


def test_bench_attention_jvp_cpu_smoke(tmp_path):
    """bench_attention_jvp on CPU: a row per implementation; only the forward-JVP rows carry the JVP's compulsory
    bytes (the SDPA forward row moves fewer; it recorded the JVP's before)."""
    import json
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention_jvp.py"), "--shapes", "1,2,16,8",
           "--iters", "2", "--warmup", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["reference_jvp", "sdpa_fwd", "torch_fallback"]
    from dumo_engine.ops.attention_jvp import attention_jvp_bytes
    assert rows["sdpa_fwd"]["bytes_moved"] == 0.0
    assert rows["reference_jvp"]["bytes_moved"] == rows["torch_fallback"]["bytes_moved"] == attention_jvp_bytes(
        1, 2, 16, 8, elem_size=4)
    assert all(r["timing"]["median_ms"] > 0 and r["flops"] > 0 for r in rows.values())


def test_bench_rowwise_cpu_smoke(tmp_path):
    """bench_rowwise runs every op for PyTorch and the C++ twin on CPU, one JSONL row each with its bytes."""
    import json
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_rowwise.py"), "--cpu", "--quick", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    ops = ["ln_mod_fwd", "ln_mod_jvp", "ln_mod_bwd", "ln_dual_fwd", "ln_dual_bwd", "gated_fwd", "gated_jvp", "gated_bwd"]
    assert [(r["op"], r["impl"]) for r in rows] == [(op, impl) for op in ops for impl in ("pytorch", "cpp")]
    assert all(r["timing"]["median_ms"] > 0 and r["bytes_moved"] > 0 for r in rows)
    assert all(r["ref_ms"] for r in rows if r["impl"] == "cpp")
    # rowwise_table.py pivots the rows: one line per op, the two implementations side by side
    with open(out, "a") as f:
        f.write("not json\n")  # a damaged line is reported and skipped, not fatal
    tab = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "rowwise_table.py"), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert tab.returncode == 0, tab.stderr[-2000:]
    assert "not JSON" in tab.stderr
    lines = [ln for ln in tab.stdout.splitlines() if ln.startswith("| odd |")]
    assert sorted(ln.split(" | ")[1] for ln in lines) == sorted(ops)
    by_op = {ln.split(" | ")[1]: ln for ln in lines}
    r0 = next(r for r in rows if r["op"] == "ln_mod_jvp" and r["impl"] == "cpp")
    assert f"{r0['timing']['median_ms']:.3f}" in by_op["ln_mod_jvp"].split(" | ")[4]


def test_bench_zero_cpu_smoke(tmp_path):
    """bench_zero launches DDP and a ZeRO stage on 2 CPU ranks and records img/s and peak memory for each."""
    import json
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_zero.py"), "--ranks", "2", "--model", "DiT-tiny",
           "--batch", "4", "--steps", "1", "--variants", "ddp,zero3", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["ddp", "zero3"], res.stdout[-3000:]
    assert all(r["extra"]["img_s"] > 0 and r["extra"]["peak_rss_gib"] > 0 and r["extra"]["ranks"] == 2 for r in rows)
    assert rows[1]["ref_ms"] == rows[0]["timing"]["median_ms"]


def test_bench_rowwise_goes_on_after_a_failing_kernel(monkeypatch, tmp_path, capsys):
    """One implementation raising (a kernel error on the GPU) costs its own row only: the later ops' rows are still
    measured and written, and the failure is printed with its op."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_rowwise as b

    real = b.our_fn

    def our_fn(op, d, impl):
        if op == "ln_mod_fwd" and impl == "cpp":
            raise RuntimeError("planted kernel failure")
        return real(op, d, impl)

    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(b, "our_fn", our_fn)
    monkeypatch.setattr(sys, "argv", ["bench_rowwise.py", "--cpu", "--quick", "--default-malloc", "--out", str(out)])
    b.main()
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    done = {(r["op"], r["impl"]) for r in rows}
    assert ("ln_mod_fwd", "pytorch") in done and ("ln_mod_fwd", "cpp") not in done
    assert {("gated_bwd", "cpp"), ("ln_dual_bwd", "cpp")} <= done
    assert "cpp ln_mod_fwd" in capsys.readouterr().out


def test_bench_rowwise_compile_baseline_writes_our_output_dtypes(monkeypatch):
    """The torch.compile baseline has our kernels' output contract: for the LayerNorm-family ops its outputs are in
    the modulation dtype (bf16 here, as ours: checked against the C++ twins) where the eager reference writes float32,
    and the backward graph takes bf16 incoming gradients; the gated ops are compiled as they are. torch.compile is
    replaced by the identity (what is checked is the wrapped expression, not inductor)."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_rowwise as b

    monkeypatch.setattr(torch, "compile", lambda f, dynamic=None: f)
    tx, tm = torch.float32, torch.bfloat16
    d = b.make_inputs(2, 5, 40, tx, tm, torch.device("cpu"))

    def tensors(out):
        if isinstance(out, torch.Tensor):
            return [out]
        return [t for o in out for t in tensors(o)] if isinstance(out, (list, tuple)) else []

    for op in b.OPS:
        eager = tensors(b.reference_fns(op, d)())
        compiled = tensors(b.reference_fns(op, d, b.compiled_as_ours(op, tm))())
        ours = tensors(b.our_fn(op, d, "cpp")[0]())
        assert len(eager) == len(compiled) and eager, op
        if op in ("ln_mod_fwd", "ln_mod_jvp", "ln_dual_fwd"):
            n = 2 if op == "ln_dual_fwd" else 1
            assert [t.dtype for t in eager] == [torch.float32] * n, op  # why the contract is needed
            assert [t.dtype for t in compiled] == [t.dtype for t in ours[:n]] == [tm] * n, op
            for c, e in zip(compiled, eager):
                assert torch.equal(c, e.to(tm)), op
        else:  # backward and gated ops: gradients / outputs in the leaves' dtypes either way
            assert [t.dtype for t in compiled] == [t.dtype for t in eager], op
            for c, e in zip(compiled, eager):
                torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_train_step_flops_count_cpu_attention():
    """forward_flops_per_img counts the attention on CPU too (torch's FlopCounterMode has no formula for the CPU
    flash kernel, so B/2 counted 43.6 instead of 46.0 GFLOP/img): equal to the count with the math backend, whose
    matmuls torch counts, and more than the linears alone."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_train_step import forward_flops_per_img

    from dumo_engine.models import build_model

    m = build_model("DiT-digits", input_size=8, in_channels=1, num_classes=10)
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    t = torch.rand(2)
    math_count = FlopCounterMode(display=False)
    plain = FlopCounterMode(display=False)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH), math_count:
            m(x, t, t * 0.5, y)
        with plain:
            m(x, t, t * 0.5, y)
    ours = forward_flops_per_img(m, x, y)
    assert ours == math_count.get_total_flops() / 2
    assert ours > plain.get_total_flops() / 2


def test_reference_autocast_objective_option_reaches_the_jvp(monkeypatch):
    """DuMo(jvp_autocast=True) hands autocast=True to the reference pass (bench_train_step's like-for-like
    baseline); the default keeps the float32 oracle."""
    import torch

    from dumo_engine.objectives import DuMo, flow_map as fm

    seen = []
    real = fm.flow_map_jvp

    def spy(*a, **kw):
        seen.append(kw.get("autocast"))
        return real(*a, **kw)

    monkeypatch.setattr(fm, "flow_map_jvp", spy)
    from dumo_engine.models import build_model

    m = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=10)
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    DuMo(10, jvp_backend="func").loss(m, x, y)
    DuMo(10, jvp_backend="func", jvp_autocast=True).loss(m, x, y)
    assert seen == [False, True]


def test_compare_objectives_refuses_a_cached_run_with_other_settings(tmp_path):
    """A cached run counts only with the settings asked for: one trained for 600 steps at batch 64 was returned for
    a 50-step, batch-16 request, under a header that said 50 x 16."""
    import argparse
    import json

    import pytest

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compare_objectives as co

    d = tmp_path / "fm_seed0"
    d.mkdir()
    cached = {"variant": "fm", "seed": 0, "steps": 600, "batch_size": 64, "train_s": 1.0, "scores": {}}
    (d / "compare.json").write_text(json.dumps(cached))
    args = argparse.Namespace(out=str(tmp_path), steps=50, batch_size=16, per_class=4)
    with pytest.raises(SystemExit, match="was made with"):
        co.run_one("fm", 0, args, judge=None)
    args.steps, args.batch_size = 600, 64  # an older cache (no "settings"): steps and batch decide
    assert co.run_one("fm", 0, args, judge=None) == cached
    settings = co.VARIANTS["fm"] + ["--train.steps=600", "--train.batch_size=64", "--train.seed=0",
                                    "--sample.per_class=4"]
    (d / "compare.json").write_text(json.dumps({**cached, "settings": settings}))
    assert co.run_one("fm", 0, args, judge=None)["settings"] == settings
    args.per_class = 8
    with pytest.raises(SystemExit, match="was made with"):
        co.run_one("fm", 0, args, judge=None)

