"""`dumo train | sample | eval`.

  dumo train --config configs/digits.yaml [--dry-run] [--section.key=value ...]
  dumo sample --run runs/digits [--method u2] [--labels 0,1,2] [--seed 0] [--out grid.png]
  dumo eval --run runs/digits [--section.key=value ...]
  dumo plan-memory --model DiT-XL/2 --zero 2 --gpus 8 --micro-batch 32 [--gpu-mem-gib 80] [--precision bf16]
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from .config import ConfigError, from_dict, load_config, read_config_file, to_dict


def _load_run(run_dir: str, overrides=()):
    """Config and model (EMA weights unless sample.use_ema=false) of a finished or running run."""
    from . import checkpoint as ckpt_io
    from .config import apply_overrides
    from .train import build_model_from_config, training_settings

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not a run directory: config.yaml is missing")
    raw = read_config_file(path, allow_empty=False)
    # the settings that shaped the run (model, objective, data split, optimizer, ...) are what the weights were
    # trained with: an override of one would sample a different model, or score against training images
    was = training_settings(from_dict(raw))
    cfg = apply_overrides(from_dict(raw), overrides)
    now = training_settings(cfg)
    changed = [k for k in sorted(now) if was.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"{', '.join(f'{k}={now[k]!r}' for k in changed)}: {run_dir} was trained with "
                          f"{', '.join(f'{k}={was.get(k)!r}' for k in changed)}; sampling and evaluation take the "
                          "trained settings (sample.*, eval.* and where it runs, such as train.device, may change)")
    ck, skipped = ckpt_io.load_newest_valid(run_dir)  # as a resume: a damaged newest one falls back to an older one
    if ck is None:
        raise ckpt_io.CheckpointError(f"{run_dir} has no checkpoint yet")
    for msg in skipped:
        print(f"warning: skipped a damaged checkpoint: {msg}", file=sys.stderr)
    latest = ck["path"]
    model = build_model_from_config(cfg)
    which = "ema" if cfg.sample.use_ema else "model"
    try:
        model.load_state_dict(ck[which], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ckpt_io.CheckpointError(f"{latest}: its {which} weights do not fit model.name={cfg.model.name} of "
                                      f"{path} (and the overrides given): {' '.join(first[:3])[:400]}") from None
    return cfg, model.eval(), ck["step"]


# Set by a DeepSpeed run: the process leaves through os._exit once its files are closed. Interpreter teardown after a
# gloo/DeepSpeed run intermittently aborts ("terminate called without an active exception": a C++ thread object
# destroyed while joinable), which the launcher reports as a failed rank although the run had finished.
_HARD_EXIT = False


def cmd_train(args, overrides) -> int:
    cfg = load_config(args.config, overrides)
    if args.config is None:
        print(f"note: no --config: the built-in defaults ({cfg.model.name}, {cfg.train.steps} steps x batch "
              f"{cfg.train.batch_size}, into {cfg.train.out_dir}); configs/digits.yaml is the preset", file=sys.stderr)
    if cfg.train.deepspeed:  # its JSON is checked before anything is built (on every rank)
        from .distributed.ds_config import load_ds_config, resolve_ds_config
        from .train import resolve_device

        world = int(os.environ.get("WORLD_SIZE", "1"))
        resolve_ds_config(load_ds_config(cfg.train.deepspeed), cfg, world, resolve_device(cfg.train.device).type)
    if args.dry_run:
        from .train import build_model_from_config
        import torch

        with torch.device("meta"):
            n = sum(p.numel() for p in build_model_from_config(cfg).parameters())
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        ds = f"; {cfg.train.deepspeed} checked for {os.environ.get('WORLD_SIZE', '1')} rank(s)" if cfg.train.deepspeed else ""
        print(f"# {cfg.model.name}: {n / 1e6:.2f}M parameters{ds}; dry run, nothing trained")
        return 0
    from .eval import evaluate_digits
    from .train import train

    result = train(cfg)
    if cfg.train.deepspeed:  # every rank is done communicating: close the process group in step
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        global _HARD_EXIT
        _HARD_EXIT = True
    if result.rank != 0:  # DeepSpeed: rank 0 samples and scores the consolidated weights
        return 0
    if cfg.eval.at_end and cfg.data.dataset == "digits":
        model = result.ema if cfg.sample.use_ema else result.model
        evaluate_digits(model, cfg, cfg.objective.name, out_dir=result.run_dir)
        print(f"sample grids and eval.json written to {result.run_dir}")
    return 0


def cmd_sample(args, overrides) -> int:
    import numpy as np
    import torch

    from .eval.digits import image_format, save_grid
    from .eval.evaluate import generate
    from .fsio import write_bytes_atomic

    cfg, model, step = _load_run(args.run, overrides)
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {args.seed}")
    out = args.out or os.path.join(args.run, f"sample_{args.method}_step{step}.png")
    if args.out is not None and (os.path.isdir(out) or not os.path.basename(out)):  # checked before sampling
        raise ConfigError(f"--out {out!r} is a directory; name a file")
    if args.labels is not None:
        try:
            labels = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise ConfigError(f"--labels: {args.labels!r} is not a comma-separated list of integers") from None
        bad = [v for v in labels if not 0 <= v <= cfg.model.num_classes]
        if bad:
            raise ConfigError(f"--labels: {bad} out of range 0..{cfg.model.num_classes} ({cfg.model.num_classes} = NULL)")
        y = torch.tensor(labels)
    else:
        try:
            image_format(out)
        except ValueError as e:
            raise ConfigError(f"--out: {e}") from None
        y = torch.arange(cfg.model.num_classes).repeat_interleave(cfg.sample.grid_cols)
    x = generate(model, cfg, args.method, cfg.objective.name, y, seed=args.seed).numpy()
    if args.labels is not None:
        write_bytes_atomic(os.path.splitext(out)[0] + ".npy", lambda f: np.save(f, x))
        print(f"{len(x)} samples -> {os.path.splitext(out)[0]}.npy")
    else:
        save_grid(out, x, y.numpy(), cols=cfg.sample.grid_cols, num_classes=cfg.model.num_classes)
        print(f"grid -> {out}")
    return 0


def cmd_eval(args, overrides) -> int:
    from .eval import evaluate_digits

    cfg, model, step = _load_run(args.run, overrides)
    print(f"evaluating {args.run} at step {step}")
    evaluate_digits(model, cfg, cfg.objective.name, out_dir=args.run)
    return 0


def cmd_plan_memory(args, overrides) -> int:
    from .distributed.memory import format_plan, plan
    from .models import DIT_SIZES

    if overrides:
        raise ConfigError(f"plan-memory takes no --section.key overrides, got {' '.join(overrides)}")
    if args.model not in DIT_SIZES:
        raise ConfigError(f"--model: unknown model {args.model!r}; known: {', '.join(DIT_SIZES)}")
    if args.zero is not None and args.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero: {args.zero} is not one of 0, 1, 2, 3")
    for key in ("gpus", "micro_batch"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.gpu_mem_gib <= 0:
        raise ConfigError(f"--gpu-mem-gib must be > 0, got {args.gpu_mem_gib}")
    n, act, plans = plan(args.model, args.gpus, args.micro_batch, args.precision, args.input_size, args.in_channels,
                         args.num_classes)
    print(format_plan(args.model, args.gpus, args.micro_batch, args.gpu_mem_gib, args.precision, n, act, plans,
                      highlight=args.zero))
    return 0


def main(argv=None) -> int:
    overrides_help = ("Any setting can follow as --section.key=value (e.g. --train.steps=200 --optim.lr=5e-4); the "
                      "sections and keys are those of the YAML presets (configs/digits.yaml).")
    p = argparse.ArgumentParser(prog="dumo", description="DuMo training and sampling engine. " + overrides_help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{train,sample,eval,plan-memory}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("train", help="train a model (then sample and score it on digits)", epilog=overrides_help)
    t.add_argument("--config", help="YAML preset, e.g. configs/digits.yaml (none: the built-in defaults)")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config (and the DeepSpeed JSON, for WORLD_SIZE ranks), print it and exit")
    s = sub.add_parser("sample", help="sample from a run's newest usable checkpoint", formatter_class=fmt,
                       epilog="sample.* and eval.* settings may follow as overrides (e.g. --sample.v_steps=50); "
                              "the settings the run was trained with may not change")
    s.add_argument("--run", required=True, help="the run directory (train.out_dir)")
    s.add_argument("--method", default="u2", choices=["u1", "u2", "euler", "heun"],
                   help="u1/u2: the u head in 1 or 2 steps; euler/heun: the v head, sample.v_steps steps")
    s.add_argument("--labels", help="comma-separated class labels; the samples are saved as an array (--out with "
                                    ".npy in place of its extension). Default: a grid of every class")
    s.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's sample.seed)")
    s.add_argument("--out", help="image file for the grid (.png), default RUN/sample_<method>_step<N>.png")
    e = sub.add_parser("eval", help="score a run's newest usable checkpoint (digits)",
                       epilog="sample.* and eval.* settings may follow as overrides")
    e.add_argument("--run", required=True, help="the run directory (train.out_dir)")
    m = sub.add_parser("plan-memory", help="predicted per-GPU memory for each ZeRO stage, and which fit",
                       formatter_class=fmt)
    m.add_argument("--model", default="DiT-XL/2")
    m.add_argument("--zero", type=int, default=None, help="the stage to mark (all four are printed)")
    m.add_argument("--gpus", type=int, default=8)
    m.add_argument("--micro-batch", type=int, default=32, help="images per GPU per micro-step")
    m.add_argument("--gpu-mem-gib", type=float, default=80.0)
    m.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    m.add_argument("--input-size", type=int, default=32, help="latent side (SD-VAE: 256 px -> 32)")
    m.add_argument("--in-channels", type=int, default=4)
    m.add_argument("--num-classes", type=int, default=1000)
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if not a.startswith("--local_rank")]  # the deepspeed launcher adds it; LOCAL_RANK is set too
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        p.error(f"unrecognised arguments: {' '.join(unknown)} (overrides look like --section.key=value)")
    try:
        cmds = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "plan-memory": cmd_plan_memory}
        rc = cmds[args.cmd](args, overrides)
        if _HARD_EXIT:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return rc
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .checkpoint import CheckpointError
        from .models import CheckpointFormatError

        if isinstance(e, (CheckpointError, CheckpointFormatError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
