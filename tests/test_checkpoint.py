"""Checkpoints: round trip, bit-exact resume, crash mid-save, corrupt and truncated files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dumo_engine import checkpoint as ckpt_io
from dumo_engine.train import build_model_from_config, read_log, train
from helpers import tiny_config


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip(tmp_path):
    """Weights, EMA, optimizer state and RNG come back exactly."""
    cfg = tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=0")
    res = train(cfg)
    path = ckpt_io.latest_checkpoint(str(tmp_path))
    assert path.endswith("step_00000003")
    ck = ckpt_io.load_checkpoint(path)
    assert _state_equal(ck["model"], res.model.state_dict())
    assert _state_equal(ck["ema"], res.ema.state_dict())
    assert not _state_equal(ck["model"], ck["ema"])  # EMA really is a different average
    model = build_model_from_config(cfg)
    ema = build_model_from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    torch.manual_seed(999)
    step = ckpt_io.restore(ck, model, ema, opt)
    assert step == 3
    assert _state_equal(model.state_dict(), res.model.state_dict())
    assert opt.param_groups[0]["lr"] == cfg.optim.lr  # hyper-parameters restored from JSON
    saved = ck["optimizer"]["state"]
    for pid, st in opt.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], saved[pid]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], saved[pid]["exp_avg_sq"])
    assert torch.equal(torch.get_rng_state(), ck["rng"]["torch_cpu"])


def test_resume_is_bit_exact(tmp_path):
    """A run stopped at step 4 and resumed to 8 logs exactly the losses of an uninterrupted 8-step run."""
    full = read_log(train(tiny_config(tmp_path / "full", "--train.steps=8", "--train.ckpt_every=4")).log_path)
    part = tmp_path / "part"
    train(tiny_config(part, "--train.steps=4", "--train.ckpt_every=4"))
    resumed = train(tiny_config(part, "--train.steps=8", "--train.ckpt_every=4"))
    rows = read_log(resumed.log_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for a, b in zip(full, rows):
        for k in ("loss", "mse_u", "mse_v", "grad_norm"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])  # bit-exact, not approximately equal
    full_w = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(str(tmp_path / "full")))
    res_w = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(str(part)))
    assert _state_equal(full_w["model"], res_w["model"]) and _state_equal(full_w["ema"], res_w["ema"])


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    """Log lines written after the last checkpoint of a killed run are replaced by the resumed run's."""
    train(tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=2", "--train.keep_checkpoints=5"))
    # simulate a crash after step 3 had been logged but before it was checkpointed
    root = tmp_path / "checkpoints"
    import shutil
    shutil.rmtree(root / "step_00000003")
    (root / "latest").write_text("step_00000002\n")
    res = train(tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=2"))
    assert [r["step"] for r in read_log(res.log_path)] == [1, 2, 3]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """If the process dies while writing a checkpoint, `latest` still names the previous, loadable one."""
    cfg = tiny_config(tmp_path, "--train.steps=2", "--train.ckpt_every=1")
    train(cfg)
    good = ckpt_io.latest_checkpoint(str(tmp_path))
    calls = {"n": 0}
    real_save = ckpt_io.save_file

    def dying_save(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # second file of the next checkpoint
            real_save(tensors, path, *a, **k)
            with open(path, "r+b") as f:  # leave a half-written file behind
                f.truncate(os.path.getsize(path) // 2)
            raise KeyboardInterrupt("killed mid-save")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_io, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=1"))
    assert ckpt_io.latest_checkpoint(str(tmp_path)) == good
    assert ckpt_io.load_checkpoint(good)["step"] == 2
    monkeypatch.undo()
    res = train(tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=1"))  # resumes from step 2
    assert res.step == 3
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith(".tmp")]  # debris cleaned


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "state_json", "latest"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, damage):
    """Truncated, bit-flipped or missing files raise CheckpointError naming the file, not a torch traceback."""
    train(tiny_config(tmp_path, "--train.steps=1"))
    path = ckpt_io.latest_checkpoint(str(tmp_path))
    target = os.path.join(path, "model.safetensors")
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) - 7)
        match = "model.safetensors"
    elif damage == "flip":
        data = bytearray(open(target, "rb").read())
        data[-5] ^= 0xFF
        open(target, "wb").write(bytes(data))
        match = "model.safetensors fails its sha256"
    elif damage == "delete":
        os.remove(target)
        match = "model.safetensors is missing"
    elif damage == "state_json":
        open(os.path.join(path, "state.json"), "w").write("{not json")
        match = "state.json is not valid JSON"
    else:
        (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
        with pytest.raises(ckpt_io.CheckpointError, match="step_00000099"):
            ckpt_io.latest_checkpoint(str(tmp_path))
        return
    with pytest.raises(ckpt_io.CheckpointError, match=match):
        ckpt_io.load_checkpoint(path)
    with pytest.raises(ckpt_io.CheckpointError):  # and a resume refuses it too
        train(tiny_config(tmp_path, "--train.steps=2"))


def test_truncated_safetensors_without_manifest_check(tmp_path):
    """Even with verification off, a truncated safetensors file is reported as corrupt, by name."""
    train(tiny_config(tmp_path, "--train.steps=1"))
    path = ckpt_io.latest_checkpoint(str(tmp_path))
    target = os.path.join(path, "ema.safetensors")
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(40)
    state = json.load(open(os.path.join(path, "state.json")))
    state["files"]["ema.safetensors"]["bytes"] = 40  # a manifest that agrees with the damage
    json.dump(state, open(os.path.join(path, "state.json"), "w"))
    assert size > 40
    with pytest.raises(ckpt_io.CheckpointError, match="cannot read ema.safetensors"):
        ckpt_io.load_checkpoint(path, verify=False)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    """Loading weights of a different model size names the mismatch."""
    train(tiny_config(tmp_path, "--train.steps=1"))
    ck = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(str(tmp_path)))
    other = tiny_config(tmp_path / "o", "--model.name=DiT-digits")
    m, e = build_model_from_config(other), build_model_from_config(other)
    with pytest.raises(ckpt_io.CheckpointError, match="do not fit"):
        ckpt_io.restore(ck, m, e, None)


def test_only_keep_newest(tmp_path):
    train(tiny_config(tmp_path, "--train.steps=4", "--train.ckpt_every=1", "--train.keep_checkpoints=2"))
    names = sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step_"))
    assert names == ["step_00000003", "step_00000004"]


def test_resume_log_matches_when_windows_and_checkpoints_misalign(tmp_path):
    """log_every=3, ckpt_every=2: the resumed run's log rows (steps and averaged values) equal the uninterrupted run's."""
    opts = ["--train.log_every=3", "--train.ckpt_every=2", "--train.keep_checkpoints=10"]
    full = read_log(train(tiny_config(tmp_path / "full", "--train.steps=6", *opts)).log_path)
    part = tmp_path / "part"
    train(tiny_config(part, "--train.steps=2", *opts))
    rows = read_log(train(tiny_config(part, "--train.steps=6", *opts)).log_path)
    assert [r["step"] for r in full] == [2, 3, 4, 6]
    assert [r["step"] for r in rows] == [r["step"] for r in full]
    for a, b in zip(full, rows):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]


def test_torn_log_line_does_not_block_resume(tmp_path):
    """A log line cut short by a kill is dropped on resume instead of failing it."""
    train(tiny_config(tmp_path, "--train.steps=2", "--train.ckpt_every=2"))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # torn
    res = train(tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=2"))
    assert [r["step"] for r in read_log(res.log_path)] == [1, 2, 3]


def test_damaged_latest_falls_back_to_previous_checkpoint(tmp_path, capsys):
    """With the newest checkpoint damaged, resume continues from the older kept one and says so."""
    train(tiny_config(tmp_path, "--train.steps=4", "--train.ckpt_every=2"))
    target = tmp_path / "checkpoints" / "step_00000004" / "optimizer.safetensors"
    with open(target, "r+b") as f:
        f.truncate(10)
    res = train(tiny_config(tmp_path, "--train.steps=5", "--train.ckpt_every=2"))
    out = capsys.readouterr().out
    assert "skipped a damaged checkpoint" in out and "optimizer.safetensors" in out
    assert "step_00000002 at step 2" in out
    assert res.step == 5 and [r["step"] for r in read_log(res.log_path)] == [1, 2, 3, 4, 5]


def test_fresh_run_into_used_directory_archives_the_old_one(tmp_path):
    """train.resume=false never deletes an earlier run: its checkpoints and log move to previous-N/."""
    first = train(tiny_config(tmp_path, "--train.steps=2", "--train.resume=false"))
    first_w = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(str(tmp_path)))["model"]
    (tmp_path / "samples_u1.png").write_bytes(b"grid")  # what the end-of-run evaluation writes
    train(tiny_config(tmp_path, "--train.steps=1", "--train.resume=false", "--train.seed=7"))
    archived = ckpt_io.load_checkpoint(str(tmp_path / "previous-1" / "checkpoints" / "step_00000002"))
    assert _state_equal(archived["model"], first_w) and _state_equal(first_w, first.model.state_dict())
    assert len(read_log(str(tmp_path / "previous-1" / "log.jsonl"))) == 2
    assert "seed: 0" in (tmp_path / "previous-1" / "config.yaml").read_text()
    assert (tmp_path / "previous-1" / "samples_u1.png").read_bytes() == b"grid"
    assert not (tmp_path / "samples_u1.png").exists()  # not left beside the new run as if it were its own
    assert "seed: 7" in (tmp_path / "config.yaml").read_text()
    assert ckpt_io.latest_checkpoint(str(tmp_path)).endswith("step_00000001")
    assert [r["step"] for r in read_log(str(tmp_path / "log.jsonl"))] == [1]


def test_resume_with_changed_training_settings_is_refused(tmp_path, capsys):
    """A resume continues the same run: changed optimizer (or model, objective, data, batch, seed) settings are
    refused by name, before any weight is loaded, and the run's config.yaml is left as it was; settings that do not
    shape the trajectory (steps, logging, the JVP backend) may change."""
    from dumo_engine.config import ConfigError

    train(tiny_config(tmp_path, "--train.steps=2"))
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.beta2=0\.95, optim\.lr=0\.002; this run has optim\.beta2=0\.5, "
                                          r"optim\.lr=0\.0002"):
        train(tiny_config(tmp_path, "--train.steps=3", "--optim.lr=2e-4", "--optim.beta2=0.5"))
    with pytest.raises(ConfigError, match=r"model\.name='DiT-tiny'.*model\.name='DiT-digits'"):
        train(tiny_config(tmp_path, "--train.steps=3", "--model.name=DiT-digits"))
    with pytest.raises(ConfigError, match=r"train\.seed=0.*train\.seed=3"):
        train(tiny_config(tmp_path, "--train.steps=3", "--train.seed=3"))
    assert (tmp_path / "config.yaml").read_text() == before
    res = train(tiny_config(tmp_path, "--train.steps=3", "--train.log_every=2", "--objective.jvp_backend=forward_ad"))
    assert res.step == 3 and "resumed from" in capsys.readouterr().out
    state = ckpt_io.read_state(ckpt_io.latest_checkpoint(str(tmp_path)))
    assert state["meta"]["config"]["optim.lr"] == 0.002 and "train.steps" not in state["meta"]["config"]


def test_resume_of_a_checkpoint_older_than_a_setting(tmp_path):
    """A setting added after a checkpoint was written (model.time_scale) is absent from its state.json: that run had
    the default, so a resume at the default goes on and one at another value is refused, naming the setting."""
    from dumo_engine.config import ConfigError

    train(tiny_config(tmp_path, "--train.steps=2"))
    path = os.path.join(ckpt_io.latest_checkpoint(str(tmp_path)), "state.json")
    state = json.load(open(path))
    assert state["meta"]["config"].pop("model.time_scale") == 1000.0
    json.dump(state, open(path, "w"))
    with pytest.raises(ConfigError, match=r"model\.time_scale=1000\.0; this run has model\.time_scale=1\.0"):
        train(tiny_config(tmp_path, "--train.steps=3", "--model.time_scale=1"))
    assert train(tiny_config(tmp_path, "--train.steps=3")).step == 3


@pytest.mark.parametrize("edit,match", [
    (lambda st: st["files"]["model.safetensors"].pop("bytes"), "no valid size and sha256 for model.safetensors"),
    (lambda st: st.pop("step"), "no valid step"),
    (lambda st: st.update(step="3"), "no valid step"),
    (lambda st: st.pop("optimizer"), "no optimizer param_groups"),
    (lambda st: st["files"].update({"../../x": st["files"]["rng.safetensors"]}), "outside the checkpoint"),
    (lambda st: st["optimizer"]["scalars"].update({"nodots": 1}), "optimizer state does not parse"),
])
def test_malformed_state_json_falls_back(tmp_path, capsys, edit, match):
    """A state.json that parses but is malformed is a damaged checkpoint: named, skipped, the older one used."""
    train(tiny_config(tmp_path, "--train.steps=4", "--train.ckpt_every=2"))
    path = os.path.join(tmp_path, "checkpoints", "step_00000004", "state.json")
    state = json.load(open(path))
    edit(state)
    json.dump(state, open(path, "w"))
    with pytest.raises(ckpt_io.CheckpointError, match=match):
        ckpt_io.load_checkpoint(os.path.dirname(path))
    res = train(tiny_config(tmp_path, "--train.steps=5", "--train.ckpt_every=2"))
    out = capsys.readouterr().out
    assert "skipped a damaged checkpoint" in out and "step_00000002 at step 2" in out and res.step == 5


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    """Past step 99,999,999 the names get a ninth digit: pruning and the fallback order go by number, not name."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    for name in ("step_99999998", "step_99999999", "step_100000000", "step_junk"):
        (root / name).mkdir()
    assert ckpt_io.step_dirs(str(root)) == ["step_99999998", "step_99999999", "step_100000000"]
    ckpt_io._prune(str(root), keep=2, protect="step_100000000")
    assert sorted(os.listdir(root)) == ["step_100000000", "step_99999999", "step_junk"]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    """Resuming from an older checkpoint after the newest was damaged re-saves that step: the new directory
    replaces the damaged one and no debris is left."""
    train(tiny_config(tmp_path, "--train.steps=4", "--train.ckpt_every=2"))
    damaged = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"
    damaged.write_bytes(b"x")
    res = train(tiny_config(tmp_path, "--train.steps=4", "--train.ckpt_every=2"))
    assert res.step == 4
    ck = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(str(tmp_path)))
    assert ck["step"] == 4 and _state_equal(ck["model"], res.model.state_dict())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]


def test_cuda_rng_state_is_the_training_devices(monkeypatch):
    """The CUDA generator saved and restored is the training device's: by index, so a resume sees the right state
    with another number of visible devices (the state of every device, sorted by name, put device 10's state into
    device 2 with 12 GPUs, and failed with a bare IndexError on fewer). CUDA is mocked: no GPU here."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: torch.full((4,), i, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, i: calls.append((int(st[0]), i)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    st = ckpt_io.rng_state(torch.device("cuda", 10))
    assert sorted(st) == ["torch_cpu", "torch_cuda"] and int(st["torch_cuda"][0]) == 10
    ckpt_io.set_rng_state(st, torch.device("cuda", 0))  # resumed where one device is visible
    assert calls == [(10, 0)]
    # a checkpoint written before: every visible device's state, "torch_cuda_<i>"
    legacy = {"torch_cpu": torch.get_rng_state(),
              **{f"torch_cuda_{i}": torch.full((4,), i, dtype=torch.uint8) for i in range(12)}}
    calls.clear()
    ckpt_io.set_rng_state(legacy, torch.device("cuda", 10))
    assert calls == [(10, 10)]
    calls.clear()
    ckpt_io.set_rng_state(legacy, torch.device("cuda"))  # no index: the current device
    assert calls == [(2, 2)]
    calls.clear()
    ckpt_io.set_rng_state(st, torch.device("cpu"))  # a device change: the CPU generator only
    assert calls == [] and sorted(ckpt_io.rng_state(torch.device("cpu"))) == ["torch_cpu"]


def test_resume_needs_no_pretrained_file(tmp_path):
    """A fine-tuning run resumes after its model.pretrained file is gone (the checkpoint overwrites those weights);
    without a checkpoint to resume, the missing file is a named error."""
    import safetensors.torch

    cfg = tiny_config(tmp_path / "src", "--train.steps=1")
    src = train(cfg).model
    sd = {k.replace("v_head.", "final_layer."): v.contiguous() for k, v in src.state_dict().items()
          if not k.startswith(("h_embedder.", "u_head."))}
    weights = tmp_path / "dit.safetensors"
    safetensors.torch.save_file(sd, str(weights))
    run = tmp_path / "ft"
    train(tiny_config(run, "--train.steps=2", f"--model.pretrained={weights}"))
    want = train(tiny_config(tmp_path / "straight", "--train.steps=4", f"--model.pretrained={weights}"))
    weights.unlink()
    res = train(tiny_config(run, "--train.steps=4", f"--model.pretrained={weights}"))
    assert res.step == 4 and _state_equal(res.model.state_dict(), want.model.state_dict())
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "step_00000002").mkdir(parents=True)  # a checkpoint directory that does not load
    with pytest.raises(ckpt_io.CheckpointError, match="no usable checkpoint"):
        train(tiny_config(empty, "--train.steps=4", f"--model.pretrained={weights}"))


def test_damaged_inputs_give_named_errors(tmp_path):
    """A `latest` pointer that is not text falls back to the other checkpoints; a log row that is JSON but not an
    object is dropped on resume; an out_dir naming a file is a config error."""
    from dumo_engine.config import ConfigError

    train(tiny_config(tmp_path, "--train.steps=2", "--train.ckpt_every=1"))
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('"x"\n[1]\n{"step": "3"}\n')
    res = train(tiny_config(tmp_path, "--train.steps=3", "--train.ckpt_every=1"))
    assert res.step == 3 and [r["step"] for r in read_log(res.log_path)] == [1, 2, 3]
    afile = tmp_path / "a_file"
    afile.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        train(tiny_config(afile, "--train.steps=1"))


def test_publish_fsyncs_every_directory_deepest_first(tmp_path, monkeypatch):
    """A checkpoint's subdirectories (DeepSpeed's shard directories) are fsynced before the rename, deepest first."""
    synced = []
    monkeypatch.setattr(ckpt_io, "fsync_dir", lambda d: synced.append(os.path.relpath(d, tmp_path)))
    root, name, tmp = ckpt_io.stage_dir(str(tmp_path), 5)
    os.makedirs(os.path.join(tmp, "deepspeed", "ds"))
    with open(os.path.join(tmp, "deepspeed", "ds", "shard.pt"), "w") as f:
        f.write("x")
    ckpt_io.publish(root, name, tmp, {"step": 5, "files": {}}, keep=2)
    t = os.path.relpath(tmp, tmp_path)
    assert synced[:3] == [os.path.join(t, "deepspeed", "ds"), os.path.join(t, "deepspeed"), t]
