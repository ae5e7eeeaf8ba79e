"""Config validation, overrides, dry run, and the CLI end to end on a tiny run."""
from __future__ import annotations

import os

import pytest
import yaml

from dumo_engine.cli import main
from dumo_engine.config import ConfigError, load_config, parse_override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


@pytest.mark.parametrize("override,key", [
    (["--optim.lrr=1e-3"], "optim.lrr"),
    (["--nosection.x=1"], "nosection"),
    (["--train.steps=ten"], "train.steps"),
    (["--train.steps=1.5"], "train.steps"),
    (["--optim.lr=-1e-4"], "optim.lr"),
    (["--optim.lr=0"], "optim.lr"),
    (["--model.name=DiT-H/2"], "model.name"),
    (["--objective.tangent=both"], "objective.tangent"),
    (["--train.resume=yes please"], "train.resume"),
    (["--objective.equal_fraction=1.5"], "objective.equal_fraction"),
    (["--sample.t_mid=1.0"], "sample.t_mid"),
    (["--eval.methods=[u1,u3]"], "eval.methods"),
    (["--model.input_size=7"], "model.input_size"),
    (["--model.input_size=16"], "model.input_size"),
    (["--model.in_channels=3"], "model.in_channels"),
    (["--model.num_classes=9"], "model.num_classes"),
    (["--optim.beta1=1.0"], "optim.beta1"),
    (["--data.test_fraction=0"], "data.test_fraction"),
    (["--train.batch_size=5000"], "train.batch_size"),
    (["--objective.name=flow_matching", "--objective.equal_fraction=0.5"], "objective.equal_fraction"),
    (["--objective.cfg_k=0.5", "--objective.label_dropout=0"], "objective.label_dropout"),
    (["--optim.grad_clip=.nan"], "optim.grad_clip"),  # NaN fails every range comparison: refused as not finite
    (["--objective.lambda_v=.nan"], "objective.lambda_v"),
    (["--objective.cfg_w=.nan"], "objective.cfg_w"),
    (["--objective.P_mean=.inf"], "objective.P_mean"),
    (["--optim.weight_decay=1e999"], "optim.weight_decay"),
    (["--train.seed=100000000000000"], "train.seed"),
    (["--data.split_seed=-1"], "data.split_seed"),
    (["--sample.seed=4294967296"], "sample.seed"),
    (["--data.test_fraction=0.001"], "data.test_fraction"),  # 2 held-out images for 10 classes
    (["--data.test_fraction=0.999", "--train.batch_size=1"], "data.test_fraction"),
    (["--model.time_scale=0"], "model.time_scale"),
    (["--train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["--model.pretrained_source=sat"], "model.pretrained_source"),
    (["--model.pretrained=w.safetensors", "--model.pretrained_source=sit"], "model.time_scale=1"),
    # combinations that cannot learn (dumo_engine/objective_rules.py): refused before anything is built
    (["--objective.name=meanflow", "--objective.target_velocity=model"], "objective.target_velocity=model"),
    (["--objective.lambda_v=0", "--objective.tangent=model"], "objective.lambda_v=0"),
    (["--objective.lambda_v=0", "--objective.cfg_w=0.5", "--objective.cfg_k=0.3"], "objective.lambda_v=0"),
    # settings the chosen objective would drop without a word
    (["--objective.name=meanflow", "--objective.lambda_v=9"], "objective.lambda_v=9.0 has no effect"),
    (["--objective.name=flow_matching", "--objective.tangent=model"], "objective.tangent='model' has no effect"),
    (["--objective.name=flow_matching", "--objective.target_velocity=model"], "objective.target_velocity"),
    (["--objective.name=flow_matching", "--objective.jvp_backend=forward_ad"], "objective.jvp_backend"),
    (["--objective.adaptive_eps=0"], "objective.adaptive_eps must be > 0"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DIGITS, override)


def test_bad_yaml_file_names_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(p)
    p.write_text("optim:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_parse_and_apply():
    assert parse_override("--optim.lr=1e-3") == ("optim.lr", 1e-3)
    # a text setting keeps text that YAML would read as a number
    assert load_config(None, ["--train.out_dir=1e3"]).train.out_dir == "1e3"
    assert load_config(None, ["--train.out_dir=2026"]).train.out_dir == "2026"
    assert load_config(None, ["--model.pretrained=0.5"]).model.pretrained == "0.5"
    assert load_config(None, ["--model.pretrained=null"]).model.pretrained is None
    with pytest.raises(ConfigError, match="train.out_dir is empty"):
        load_config(None, ["--train.out_dir="])
    assert parse_override("--train.resume=false") == ("train.resume", False)
    cfg = load_config(DIGITS, ["--optim.lr=3e-4", "--train.steps=7", "--objective.equal_fraction=null",
                               "--eval.methods=[u1]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.eval.methods == ["u1"]
    assert cfg.objective.equal_fraction is None
    assert load_config(DIGITS).optim.lr == 1e-3  # the YAML's "1.0e-3" is a number


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--config", DIGITS, "--dry-run", "--train.steps=3"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# ")[0])
    assert resolved["train"]["steps"] == 3 and resolved["model"]["name"] == "DiT-digits"
    assert "dry run" in out


def test_cli_bad_override_exits_2_naming_key(capsys):
    assert main(["train", "--config", DIGITS, "--optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_train_sample_eval(tmp_path, capsys):
    """dumo train (with the end-of-run eval), then sample and eval from the saved run."""
    run = tmp_path / "run"
    args = ["train", "--config", DIGITS, "--model.name=DiT-tiny", "--train.steps=3", "--train.batch_size=16",
            f"--train.out_dir={run}", "--train.progress=false", "--sample.per_class=5", "--sample.v_steps=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "u head, 1 step" in out
    for m in ("u1", "u2", "euler"):
        assert (run / f"samples_{m}.png").is_file()
    assert (run / "config.yaml").is_file() and (run / "eval.json").is_file()
    assert main(["sample", "--run", str(run), "--method", "u1", "--labels", "0,3,10", "--seed", "5"]) == 0
    import numpy as np
    x = np.load(run / "sample_u1_step3.npy")
    assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()
    assert main(["eval", "--run", str(run), "--sample.per_class=4"]) == 0
    assert main(["sample", "--run", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--labels", "1,x"]) == 2
    assert "--labels: '1,x' is not a comma-separated list of integers" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--seed", "-3"]) == 2
    assert "--seed must be in [0, 2**32)" in capsys.readouterr().err
    # settings that shaped the run cannot change at sample/eval time: another model (it sampled different images,
    # or failed on shapes), the data split (eval scored against training images), the objective
    for cmd, over, key in (("sample", "--model.name=DiT-digits", "model.name"),
                           ("sample", "--model.h_in_trunk=false", "model.h_in_trunk"),
                           ("sample", "--objective.name=flow_matching", "objective.name"),
                           ("eval", "--data.split_seed=3", "data.split_seed"),
                           ("eval", "--data.test_fraction=0.5", "data.test_fraction")):
        assert main([cmd, "--run", str(run), over]) == 2, over
        err = capsys.readouterr().err
        assert f"{over[2:].split('=')[0]}=" in err and "was trained with " + key in err and "Traceback" not in err
    # --out is checked before sampling: a directory, an extension PIL cannot write; --labels '' is an error
    assert main(["sample", "--run", str(run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "grid.txt")]) == 2
    assert "unknown image extension .txt" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--labels", ""]) == 2
    assert "--labels: '' is not" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "g.png")]) == 0 and (tmp_path / "g.png").is_file()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written through a temporary file, renamed
    # a run directory whose config.yaml is empty or not YAML: named, not a traceback
    for text, msg in (("", "must be a non-empty mapping"), ("model: [unclosed", "not valid YAML")):
        (run / "config.yaml").write_text(text)
        assert main(["eval", "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda_names_the_key(tmp_path, capsys):
    assert main(["train", "--config", DIGITS, "--train.device=cuda", f"--train.out_dir={tmp_path}"]) == 2
    assert "train.device" in capsys.readouterr().err


def test_cli_sample_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    """dumo sample / eval take the newest checkpoint that verifies, as a resume does: a damaged newest one (or a
    missing `latest` pointer) falls back to the older kept one, with a warning naming it."""
    run = tmp_path / "run"
    assert main(["train", "--config", DIGITS, "--model.name=DiT-tiny", "--train.steps=2", "--train.ckpt_every=1",
                 "--train.batch_size=16", f"--train.out_dir={run}", "--train.progress=false",
                 "--eval.at_end=false"]) == 0
    (run / "checkpoints" / "step_00000002" / "state.json").write_text("{")
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--method", "u1", "--labels", "1,2"]) == 0
    err = capsys.readouterr().err
    assert "skipped a damaged checkpoint" in err and "step_00000002" in err
    assert (run / "sample_u1_step1.npy").is_file()
    (run / "checkpoints" / "latest").unlink()
    assert main(["sample", "--run", str(run), "--method", "u1", "--labels", "3"]) == 0


def test_cli_train_notes_and_deepspeed_dry_run(tmp_path, capsys):
    """Without --config the built-in defaults are named; a dry run checks the DeepSpeed JSON too (a missing file
    is an error there, not at launch); a resume with nothing left to train says so."""
    assert main(["train", "--dry-run"]) == 0
    assert "no --config: the built-in defaults" in capsys.readouterr().err
    assert main(["train", "--config", DIGITS, "--dry-run", f"--train.deepspeed={tmp_path / 'nope.json'}"]) == 2
    assert "DeepSpeed config not found" in capsys.readouterr().err
    ds = os.path.join(os.path.dirname(DIGITS), "deepspeed", "zero2.json")
    assert main(["train", "--config", DIGITS, "--dry-run", f"--train.deepspeed={ds}"]) == 0
    assert "zero2.json checked for 1 rank(s)" in capsys.readouterr().out
    run = tmp_path / "run"
    args = ["train", "--config", DIGITS, "--model.name=DiT-tiny", "--train.steps=1", "--train.batch_size=16",
            f"--train.out_dir={run}", "--train.progress=false", "--eval.at_end=false", "--train.resume=true"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "train.steps=1 is not past the checkpoint's step 1: nothing to train" in capsys.readouterr().out
