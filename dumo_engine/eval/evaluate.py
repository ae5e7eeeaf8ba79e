"""Sample a trained model class-conditionally and score it (digits main job)."""
from __future__ import annotations

import json
import os

import torch

from ..fsio import write_text_atomic
from ..sampling import sample
from .digits import DigitsJudge, save_grid

METHOD_NAMES = {"u1": "u head, 1 step", "u2": "u head, 2 steps", "euler": "v head, Euler", "heun": "v head, Heun"}


def generate(model, cfg, method: str, objective_name: str, labels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """Samples for `labels` with one of u1 | u2 | euler | heun.

    Flow matching has no flow-map head: its "u1"/"u2" are Euler in 1/2 steps on the v head, so the
    1- and 2-step rows of every objective compare the same budget of network evaluations.
    MeanFlow has one output (the u head); its velocity for Euler/Heun is the u head at h = 0.
    """
    s = cfg.sample
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    seed = s.seed if seed is None else seed
    velocity_head = "u" if objective_name == "meanflow" else "v"
    if objective_name == "flow_matching" and method in ("u1", "u2"):
        return sample(model, labels, shape, "euler", seed, steps=int(method[1]), velocity_head="v")
    return sample(model, labels, shape, method, seed, t_mid=s.t_mid, steps=s.v_steps, velocity_head=velocity_head)


def method_label(method: str, cfg) -> str:
    if method in ("euler", "heun"):
        return f"{METHOD_NAMES[method]} {cfg.sample.v_steps} steps"
    if method == "u2":
        return f"{METHOD_NAMES[method]} (t_mid={cfg.sample.t_mid:g})"
    return METHOD_NAMES[method]


def evaluate_digits(model, cfg, objective_name: str, out_dir: str | None = None, judge: DigitsJudge | None = None,
                    methods=None, verbose: bool = True) -> dict:
    """Score each sampling method; write a PNG grid per method (one row per class) into out_dir."""
    judge = judge or DigitsJudge(cfg.data.test_fraction, cfg.data.split_seed, per_class=cfg.sample.per_class)
    device = next(model.parameters()).device
    nc = cfg.model.num_classes
    labels = torch.arange(nc, device=device).repeat_interleave(cfg.sample.per_class)
    was_training = model.training
    model.eval()
    results = {"classifier_test_accuracy": judge.test_accuracy, "real_fd": judge.real_fd, "methods": {}}
    for method in methods or cfg.eval.methods:
        x = generate(model, cfg, method, objective_name, labels).float().cpu().numpy()
        scores = judge.score(x, labels.cpu().numpy())
        results["methods"][method] = scores
        if out_dir is not None:
            save_grid(os.path.join(out_dir, f"samples_{method}.png"), x, labels.cpu().numpy(),
                      cols=cfg.sample.grid_cols, num_classes=nc)
    model.train(was_training)
    if out_dir is not None:
        write_text_atomic(os.path.join(out_dir, "eval.json"), json.dumps(results, indent=1))
    if verbose:
        print(format_results(results, cfg))
    return results


def format_results(results: dict, cfg) -> str:
    lines = [f"digits classifier: held-out accuracy {results['classifier_test_accuracy']:.3f} | "
             f"FD real-train vs real-test {results['real_fd']:.2f} (floor)",
             f"{'sampler':<36} {'accuracy':>9} {'FD':>8}"]
    for method, s in results["methods"].items():
        fd = "n/a" if s["fd"] is None else f"{s['fd']:.2f}"
        bad = f"   {s['non_finite']} samples not finite" if s.get("non_finite") else ""
        lines.append(f"{method_label(method, cfg):<36} {s['accuracy']:>9.3f} {fd:>8}{bad}")
    return "\n".join(lines)
