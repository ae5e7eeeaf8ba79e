"""DeepSpeed ZeRO (dumo_engine/distributed): 2 processes on 127.0.0.1 over gloo, CPU only.

A seeded tiny DuMo run (fused JVP through the engine) on 2 ranks, for each ZeRO stage 0-3, must give the loss curve
and the final model and EMA weights of the one-process run with the same global batch; a run saved at step k and
resumed must equal the uninterrupted one; the consolidated export must load and sample in one process; bad DeepSpeed
configs must fail before training with a message naming the key.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dumo_engine.config import load_config
from dumo_engine.distributed.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_DIR = os.path.join(ROOT, "configs", "deepspeed")
try:
    import deepspeed  # noqa: F401

    DS_ERROR = None
except Exception as e:  # the README's test command installs it: its absence fails these tests, it never skips them
    DS_ERROR = f"deepspeed is not importable ({type(e).__name__}: {e}); pip install -e '.[test,triton,deepspeed]'"


def needs_ds(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        if DS_ERROR:
            pytest.fail(DS_ERROR)
        return fn(*a, **kw)

    return wrapper

STEPS = 4
RUN = ["--config", os.path.join(ROOT, "configs", "digits.yaml"), "--model.name=DiT-tiny", "--train.batch_size=8",
       "--train.log_every=1", "--train.ckpt_every=2", "--eval.at_end=false", "--train.progress=false",
       "--objective.jvp_backend=fused", "--train.resume=true", "--train.threads=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out_dir, ranks: int, stage=None, steps=STEPS, extra=(), check=True, launcher="torchrun"):
    args = [*RUN, f"--train.out_dir={out_dir}", f"--train.steps={steps}", *extra]
    if stage is not None:
        args.append(f"--train.deepspeed={os.path.join(DS_DIR, f'zero{stage}.json')}")
    if ranks == 1:
        cmd = [sys.executable, "-m", "dumo_engine.cli", "train", *args]
    elif launcher == "deepspeed":  # it passes --local_rank=N to each process
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={ranks}", f"--master_port={_port()}",
               "--module", "dumo_engine.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", "-m", "dumo_engine.cli", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if check:
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res


def _log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def _weights(out_dir, step=STEPS):
    d = os.path.join(out_dir, "checkpoints", f"step_{step:08d}")
    return load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(d, "ema.safetensors"))


def _assert_same_run(a_dir, b_dir, atol):
    la, lb = _log(a_dir), _log(b_dir)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for ra, rb in zip(la, lb):
        for key in ("loss", "mse_u", "mse_v", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key, ra[key], rb[key])
    for wa, wb in zip(_weights(a_dir), _weights(b_dir)):
        assert wa.keys() == wb.keys() and len(wa) > 10
        for k in wa:
            assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=atol), (k, (wa[k] - wb[k]).abs().max().item())


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    _train(out, 1)
    return out


@needs_ds
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_one_process(stage, one_process_run, tmp_path):
    """Same global batch of 8: 2 ranks x micro-batch 4 (stage 1: x 2 micro-batches of 2, gradient accumulation)."""
    extra = ["--train.micro_batch=2"] if stage == 1 else []
    _train(tmp_path / "ds", 2, stage, extra=extra)
    state = json.load(open(tmp_path / "ds" / "checkpoints" / f"step_{STEPS:08d}" / "state.json"))
    assert state["kind"] == "deepspeed" and state["zero_stage"] == stage and state["world_size"] == 2
    _assert_same_run(one_process_run, tmp_path / "ds", atol=1e-6)


@needs_ds
@pytest.mark.slow
def test_zero3_with_every_parameter_partitioned(one_process_run, tmp_path):
    """DiT-tiny's parameters are all under zero3.json's persistence threshold (kept whole on every rank); with the
    threshold at 0 every parameter is partitioned, gathered for the forward and the sharded EMA, and the run still
    equals the one-process run."""
    cfg = json.load(open(os.path.join(DS_DIR, "zero3.json")))
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_all.json"
    path.write_text(json.dumps(cfg))
    _train(tmp_path / "ds", 2, None, extra=[f"--train.deepspeed={path}"])
    _assert_same_run(one_process_run, tmp_path / "ds", atol=1e-6)


@needs_ds
@pytest.mark.slow
def test_deepspeed_launcher(one_process_run, tmp_path):
    """The same run under the deepspeed launcher (which adds --local_rank) instead of torchrun."""
    _train(tmp_path / "ds", 2, 2, launcher="deepspeed")
    _assert_same_run(one_process_run, tmp_path / "ds", atol=1e-6)


@needs_ds
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_resume_on_two_ranks_matches_uninterrupted(stage, tmp_path):
    """Save at step 2 with 2 ranks, stop, resume to step 4: the same log rows and bit-identical weights and EMA."""
    _train(tmp_path / "full", 2, stage)
    _train(tmp_path / "cut", 2, stage, steps=2)
    res = _train(tmp_path / "cut", 2, stage)
    assert "resumed from" in res.stdout and "step_00000002 at step 2" in res.stdout
    for wa, wb in zip(_weights(tmp_path / "full"), _weights(tmp_path / "cut")):
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    assert [r["loss"] for r in _log(tmp_path / "full")] == [r["loss"] for r in _log(tmp_path / "cut")]


@needs_ds
@pytest.mark.slow
def test_damaged_shard_falls_back_to_the_previous_checkpoint(tmp_path):
    """A DeepSpeed shard of the newest checkpoint is corrupted: the resume skips that checkpoint (sha256), says so,
    continues from the previous one, and ends where the uninterrupted run ended."""
    _train(tmp_path / "full", 2, 2)
    run = tmp_path / "hit"
    _train(run, 2, 2)
    shard_dir = run / "checkpoints" / f"step_{STEPS:08d}" / "deepspeed" / "ds"
    shard = sorted(shard_dir.iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = _train(run, 2, 2)
    assert "skipped a damaged checkpoint" in res.stdout and "fails its sha256 check" in res.stdout
    assert "step_00000002 at step 2" in res.stdout
    for wa, wb in zip(_weights(tmp_path / "full"), _weights(run)):
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


class _RunsCodeWhenUnpickled:
    """What a crafted shard could hold: unpickling it calls open(marker, "w") (any callable would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@needs_ds
@pytest.mark.slow
def test_shards_are_loaded_weights_only(tmp_path):
    """ZeRO-0 on one rank: a resume with another learning rate is refused (every rank checks the checkpoint's
    settings); a resume works (its shards hold tensors and plain data only); then the newest shard is
    replaced by one that runs code when unpickled, and state.json's size and sha256 are rewritten to match (as
    whoever could write the run directory could): the resume refuses it by name and nothing in it ran."""
    from dumo_engine import checkpoint as ckpt_io

    run = tmp_path / "run"
    _train(run, 1, 0, steps=2)
    res = _train(run, 1, 0, steps=3, extra=["--optim.lr=5e-4"], check=False)  # not the run's lr: refused
    assert res.returncode == 2 and "optim.lr=0.001; this run has optim.lr=0.0005" in res.stderr, res.stderr[-2000:]
    res = _train(run, 1, 0, steps=3, extra=["--train.micro_batch=4"], check=False)  # 2 accumulation steps, not 1
    assert res.returncode == 2 and "per-rank micro-batch of 8 (train.micro_batch) but this run has 4" in res.stderr, \
        res.stderr[-2000:]
    res = _train(run, 1, 0, steps=3)
    assert "step_00000002 at step 2" in res.stdout, res.stdout[-2000:]
    ck = run / "checkpoints" / "step_00000003"
    shard = ck / "deepspeed" / "ds" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "ran"
    torch.save({"module": _RunsCodeWhenUnpickled(str(marker))}, shard)
    state = json.loads((ck / "state.json").read_text())
    state["files"]["deepspeed/ds/mp_rank_00_model_states.pt"] = ckpt_io.file_record(str(shard))
    (ck / "state.json").write_text(json.dumps(state))
    res = _train(run, 1, 0, steps=4, check=False)
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-3000:])
    assert "mp_rank_00_model_states.pt holds objects other than tensors and plain data; refused" in res.stderr
    assert "GLOBAL io.open" in res.stderr, res.stderr[-2000:]
    assert "weights_only` set to `False`" not in res.stderr and "allowlist" not in res.stderr
    assert not marker.exists()


@needs_ds
@pytest.mark.slow
def test_export_loads_and_samples_in_one_process(tmp_path):
    """The consolidated weights of a ZeRO-3 run load into a plain model and `dumo sample` works on one process;
    resuming it without DeepSpeed is refused with a message that says why."""
    run = tmp_path / "z3"
    _train(run, 2, 3, steps=2)
    from dumo_engine import checkpoint as ckpt_io
    from dumo_engine.train import build_model_from_config

    ck = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(str(run)))
    assert ck["kind"] == "deepspeed" and ck["step"] == 2
    model = build_model_from_config(load_config(RUN[1], ["--model.name=DiT-tiny"]))
    model.load_state_dict(ck["ema"], strict=True)
    out = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "dumo_engine.cli", "sample", "--run", str(run), "--method", "u2",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.stat().st_size > 0
    res = _train(run, 1, None, steps=3, check=False)  # same run directory, no DeepSpeed
    assert res.returncode == 2 and "written by a DeepSpeed run (ZeRO-3, 2 ranks)" in res.stderr


_BF16_MASTERS = r"""
import os, sys, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from dumo_engine.config import load_config
from dumo_engine.distributed import engine as E
from dumo_engine.train import build_model_from_config

deepspeed = E.init_process_group(torch.device("cpu"))
real_resolve = E.resolve_ds_config


def resolve_bf16(*a, **kw):  # CPU runs train in fp32: force DeepSpeed's bf16 on to test the backend's bf16 paths
    ds = real_resolve(*a, **kw)
    ds["bf16"]["enabled"] = True
    return ds


E.resolve_ds_config = resolve_bf16
for stage in (0, 2, 3):
    cfg = load_config(sys.argv[2], ["--model.name=DiT-tiny", "--train.batch_size=2", "--optim.lr=0.1",
                                    "--optim.weight_decay=0.1", f"--train.deepspeed={sys.argv[3]}/zero{stage}.json"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    for p in model.parameters():  # random everywhere (the zero-initialised layers round exactly)
        p.data.normal_(0, 0.3)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    be = E.DeepSpeedBackend(cfg, model, torch.device("cpu"))
    params = [p for p in be.engine.module.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in params)

    def master(n, p):
        if stage == 0:
            return E.stage0_master(p, be.ema.masters)
        return deepspeed.utils.safe_get_full_fp32_param(p)

    # the masters (and the EMA built from them) start from the exact fp32 weights, not their bf16 roundings
    exact = sum(int(torch.equal(master(n, p).detach().cpu(), init[n])) for n, p in be.engine.module.named_parameters())
    assert exact == len(params), (stage, exact, len(params), "masters start from rounded weights")
    _, ema0 = be.full_state_dicts()
    assert all(torch.equal(ema0[n], init[n]) for n in init), (stage, "EMA starts from rounded weights")
    if stage == 0:  # DeepSpeed's setup step (zero gradients) is forgotten: AdamW starts at step 0
        assert len(be.optimizer.optimizer.state) == 0, "the setup step's Adam state survived"
    # the first update is AdamW's first step: lr * sign-like m/sqrt(v) = lr * g/|g| (+ decay), as one process has it
    if stage < 3:  # a loss on the parameters alone (no forward needed at stages 0-2)
        g = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in
             enumerate(be.engine.module.named_parameters())}
        loss = sum((p.float() * g[n]).sum() for n, p in be.engine.module.named_parameters())
        be.engine.backward(loss)
        be.engine.step()
        ref = build_model_from_config(cfg)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(init[n])
        opt = torch.optim.AdamW(ref.parameters(), lr=0.1, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=0.1)
        for n, p in ref.named_parameters():
            p.grad = g[n].bfloat16().float()  # the bf16 gradients DeepSpeed steps on
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
        opt.step()
        for n, p in be.engine.module.named_parameters():
            torch.testing.assert_close(master(n, p).detach().cpu(), dict(ref.named_parameters())[n].detach(),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"stage {stage} {n}: {m}")
        for _ in range(2):
            loss = sum((p.float() - 0.3).pow(2).sum() for p in params)
            be.engine.backward(loss)
            be.engine.step()
            be.ema.update(0.0)  # decay 0: the EMA is its source
    model_sd, ema_sd = be.full_state_dicts()
    rounded = 0
    for n, p in be.engine.module.named_parameters():
        m = master(n, p)
        assert m.dtype == torch.float32, (stage, n)
        assert torch.equal(model_sd[n], m.detach().cpu()), (stage, n, "export is not the fp32 master")
        if stage < 3:
            assert torch.equal(ema_sd[n], m.detach().cpu()), (stage, n, "EMA is not of the fp32 master")
        rounded += int(not torch.equal(m.detach().cpu(), p.detach().float().cpu()))
    assert rounded > 0, (stage, "masters equal their bf16 roundings: the check could not tell them apart")
    print("stage", stage, type(be.optimizer).__name__, "ok", rounded)
    be.engine.destroy()
"""


@needs_ds
def test_bf16_export_and_ema_are_of_the_fp32_masters(tmp_path):
    """Under bf16 the module's parameters are rounded copies: the EMA and the exported weights must come from
    DeepSpeed's fp32 masters (ZeRO-0: the unfused optimizer's fp32_groups; ZeRO-2: the flat partitions), bit for bit."""
    script = tmp_path / "bf16_masters.py"
    script.write_text(_BF16_MASTERS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(script), str(_port()), RUN[1], DS_DIR], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "stage 0 FP16_UnfusedOptimizer ok" in res.stdout and "stage 2 " in res.stdout, res.stdout[-2000:]
    assert "stage 3 " in res.stdout, res.stdout[-2000:]


def test_stage0_master_refuses_rounded_weights():
    from dumo_engine.distributed.engine import stage0_master, stage0_masters

    p32, p16 = torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)
    assert stage0_master(p32, {}) is p32  # fp32 runs: the module's weights are the masters
    with pytest.raises(RuntimeError, match=r"bfloat16 parameter of shape \(3,\) has no fp32 master"):
        stage0_master(p16, {})

    class Wrapper:
        fp16_groups, fp32_groups = [[p16]], [[torch.ones(3)]]

    masters = stage0_masters(Wrapper())
    assert stage0_master(p16, masters) is Wrapper.fp32_groups[0][0]
    Wrapper.fp32_groups = [[torch.ones(4)]]
    with pytest.raises(RuntimeError, match=r"fp32 master of shape \(4,\).*parameter of shape \(3,\)"):
        stage0_masters(Wrapper())


# ---------------------------------------------------------------------------------------------------
# bad DeepSpeed configs: caught before training, the key named
# ---------------------------------------------------------------------------------------------------
def _cfg(*over):
    return load_config(os.path.join(ROOT, "configs", "digits.yaml"),
                       ["--train.batch_size=8", f"--train.deepspeed={DS_DIR}/zero2.json", *over])


def test_shipped_configs_resolve():
    for stage in range(4):
        ds = resolve_ds_config(load_ds_config(os.path.join(DS_DIR, f"zero{stage}.json")), _cfg(), 2, "cuda")
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4, 1)
        assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    ds = resolve_ds_config(load_ds_config(os.path.join(DS_DIR, "zero2.json")), _cfg("--train.micro_batch=1"), 4, "cpu")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["bf16"]["enabled"]) == (1, 2, False)


@pytest.mark.parametrize("ds,over,world,match", [
    ({"zero_optimization": {"stage": 4}}, [], 2, r"zero_optimization.stage: 4 is not one of 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": "two"}}, [], 2, r"zero_optimization.stage: 'two' is not one of"),
    ({}, [], 3, r"train.batch_size=8 does not divide over 3 ranks"),
    ({}, ["--train.micro_batch=3"], 2, r"train.micro_batch=3 x 2 ranks does not divide train.batch_size=8"),
    ({"train_batch_size": 16}, [], 2, r"train_batch_size: 16 in the DeepSpeed config contradicts the run"),
    ({"train_micro_batch_size_per_gpu": 2}, [], 2, r"train_micro_batch_size_per_gpu: 2 .* contradicts"),
    ({"optimizer": {"type": "Adam"}}, [], 2, r"optimizer: not supported here"),
    ({"fp16": {"enabled": True}}, [], 2, r"fp16.enabled: fp16 training is not supported"),
    ({"bf16": {"enabled": True}}, [], 2, r"bf16.enabled: True contradicts the run \(train.precision=bf16 on cpu"),
    ({"bf16": None}, [], 2, r"bf16 must be an object"),
    ({"bfloat16": {"enabled": True}}, [], 2, r"bfloat16: use the \"bf16\" section"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, [], 2,
     r"zero_optimization.offload_param: not supported here"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, [], 2,
     r"zero_optimization.offload_optimizer: not supported here"),
    ({"checkpoint": {"use_node_local_storage": True}}, [], 2, r"checkpoint: not supported here"),
    # DeepSpeed's old offload names, and sections that change precision or batches behind the run's back
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, [], 2, r"zero_optimization.cpu_offload: not supported"),
    ({"zero_optimization": {"stage": 3, "cpu_offload_param": True}}, [], 2, r"zero_optimization.cpu_offload_param"),
    ({"managed_gradient_accumulation": False}, ["--train.micro_batch=2"], 2,
     r"managed_gradient_accumulation: only true is supported"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, [], 2, r"torch_autocast: not supported here"),
    ({"amp": {"enabled": True}}, [], 2, r"amp: not supported here"),
    ({"elasticity": {"enabled": True}}, [], 2, r"elasticity: not supported here"),
    ({"data_types": {"grad_accum_dtype": "fp32"}}, [], 2, r"data_types.grad_accum_dtype: not supported here"),
    ({"fp16": True}, [], 2, r"fp16 must be an object"),
    # the message says where the contradicted number comes from when train.micro_batch is 0
    ({"train_micro_batch_size_per_gpu": 2}, [], 2, r"train.batch_size / world size \(train.micro_batch 0\) gives 4"),
])
def test_bad_deepspeed_config_names_the_key(ds, over, world, match):
    with pytest.raises(DeepSpeedConfigError, match=match):
        resolve_ds_config(ds, _cfg(*over), world, "cpu")


def test_fp16_section_switched_off_is_accepted():
    """An fp16 section that is off (explicitly, or empty: DeepSpeed's default) is dropped, not refused."""
    for fp16 in ({}, {"enabled": False}, {"enabled": "auto"}):
        assert "fp16" not in resolve_ds_config({"fp16": fp16}, _cfg(), 2, "cpu")


def test_numbers_take_the_runs_type():
    """A JSON 4.0 that agrees with the run is accepted and stored as the run's int (DeepSpeed and the shard
    arithmetic need ints)."""
    ds = resolve_ds_config({"train_micro_batch_size_per_gpu": 4.0, "train_batch_size": 8}, _cfg(), 2, "cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and isinstance(ds["train_micro_batch_size_per_gpu"], int)


def test_micro_batch_needs_deepspeed_and_func_jvp_is_refused():
    from dumo_engine.config import ConfigError

    with pytest.raises(ConfigError, match="train.micro_batch applies to DeepSpeed runs only"):
        _cfg("--train.micro_batch=2", "--train.deepspeed=null")
    with pytest.raises(ConfigError, match="jvp_backend=func cannot run under train.deepspeed"):
        _cfg("--train.deepspeed=x.json", "--objective.jvp_backend=func")


@needs_ds
def test_bad_config_fails_before_training_from_the_cli(tmp_path):
    """2 ranks, a global batch that does not divide: exit code 2, the message, and no step trained."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 6}))
    res = _train(tmp_path / "run", 2, None, extra=[f"--train.deepspeed={bad}"], check=False)
    assert res.returncode != 0
    assert "train_batch_size: 6 in the DeepSpeed config contradicts the run" in res.stderr
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")


# ---------------------------------------------------------------------------------------------------
# dumo plan-memory
# ---------------------------------------------------------------------------------------------------
def test_model_state_accounting():
    """The ZeRO paper's accounting: bf16 2+2+12 bytes per parameter, partitioned stage by stage; the fp32 EMA is
    partitioned with the optimizer state."""
    from dumo_engine.distributed.memory import model_state_bytes

    P, G = 1000, 4
    s0, s1, s2, s3 = (model_state_bytes(P, s, G) for s in range(4))
    assert s0 == {"weights": 2000, "grads": 2000, "optimizer": 12000, "ema": 4000}
    assert s1 == {"weights": 2000, "grads": 2000, "optimizer": 3000, "ema": 1000}
    assert s2 == {"weights": 2000, "grads": 500, "optimizer": 3000, "ema": 1000}
    assert s3 == {"weights": 500, "grads": 500, "optimizer": 3000, "ema": 1000}
    assert model_state_bytes(P, 0, 1, "fp32") == {"weights": 4000, "grads": 4000, "optimizer": 8000, "ema": 4000}
    # fp32 at ZeRO-1/2: DeepSpeed's optimizer keeps its own fp32 copy of the partition (12 B); ZeRO-3 reuses it (8 B)
    assert model_state_bytes(P, 1, G, "fp32") == {"weights": 4000, "grads": 4000, "optimizer": 3000, "ema": 1000}
    assert model_state_bytes(P, 2, G, "fp32") == {"weights": 4000, "grads": 1000, "optimizer": 3000, "ema": 1000}
    assert model_state_bytes(P, 3, G, "fp32") == {"weights": 1000, "grads": 1000, "optimizer": 2000, "ema": 1000}
    with pytest.raises(ValueError, match="--zero: 4 is not one of"):
        model_state_bytes(P, 4, G)


def test_plan_memory_cli():
    """Activations come from a meta-device count (the fused pass saves no more than the plain forward); the table
    marks the asked stage and says which fit."""
    from dumo_engine.cli import main
    from dumo_engine.distributed.memory import activation_bytes_per_image

    act = activation_bytes_per_image("DiT-S/2", 32, 4, 1000)
    assert 0 < act["dumo_fused"] <= act["plain"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan-memory", "--model", "DiT-S/2", "--zero", "3", "--gpus", "2", "--micro-batch", "4",
                     "--gpu-mem-gib", "1"]) == 0
    out = buf.getvalue()
    assert "| 3 <- |" in out and "fits:" in out and "DiT-S/2" in out
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["plan-memory", "--zero", "5"]) == 2
    assert "--zero: 5 is not one of 0, 1, 2, 3" in err.getvalue()


@needs_ds
def test_one_process_world_takes_a_free_port():
    """A DeepSpeed run without a launcher is a world of one on 127.0.0.1: it picks a free port, so two such runs on
    one host (or a port another program holds, 29500 here when it is free to hold) do not collide."""
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 29500))
        held.listen()
    except OSError:
        pass  # someone else holds it already: the check is the same
    code = ("import os, torch\n"
            "from dumo_engine.distributed import engine as E\n"
            "E.init_process_group(torch.device('cpu'))\n"
            "print('port', os.environ['MASTER_PORT'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=dict(env, OMP_NUM_THREADS="1"), cwd=ROOT)
    finally:
        held.close()
    assert res.returncode == 0, res.stderr[-2000:]
    port = int(res.stdout.split("port", 1)[1].split()[0])
    assert port != 29500


_REDUCE = r"""
import sys, torch, torch.distributed as dist
from dumo_engine.distributed import engine as E

E.init_process_group(torch.device("cpu"))
be = E.DeepSpeedBackend.__new__(E.DeepSpeedBackend)  # only the metric reductions: no engine needed
be.device, be.world_size, rank = torch.device("cpu"), dist.get_world_size(), dist.get_rank()
peak = be.reduce_max(torch.tensor(1.5 + rank)).item()
mean = be.reduce_mean(torch.tensor(1.5 + rank)).item()
assert (peak, mean) == (2.5, 2.0), (rank, peak, mean)
open(f"{sys.argv[1]}/rank{rank}.ok", "w").close()  # a file per rank: their printed lines interleave
dist.destroy_process_group()
"""


@needs_ds
def test_logged_peak_memory_is_the_largest_over_ranks(tmp_path):
    """max_mem_gib is each log window's largest peak over ranks (reduce_max), not rank 0's; metrics are means."""
    script = tmp_path / "reduce.py"
    script.write_text(_REDUCE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_port()}", str(script), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()
