"""DuMo and MeanFlow: flow-map objectives that share one per-sample recipe (METHOD.md, steps 1-5).

DuMo: one pass, both heads, the u head's JVP; L = mean(L_u) + lambda_v mean(L_v), equal_fraction 0.
MeanFlow: one output (the u head; at h = 0 it is the velocity), equal_fraction 0.75, no v loss.
"""
from __future__ import annotations

import torch

from ..jvp import JVP_BACKENDS, flow_map_jvp
from ..objective_rules import flow_map_option_problem

# fused: the model's own forward + JVP pass (model(..., tangent=a)); func / forward_ad: the torch reference;
# auto: fused on CUDA, func elsewhere.
OBJECTIVE_JVP = ("auto", "fused") + JVP_BACKENDS
from .common import (Draws, GuidanceConfig, adaptive_weight, at_least_fp32, bcast, check_weighting, drop_labels,
                     guided_target, model_velocity, per_sample_sq, sample_t_r)

CHOICES = ("data", "model")


class _FlowMapObjective:
    name = "flow_map"
    velocity_head = "u"  # which head gives the velocity at h = 0 (used for CFG / model tangent)
    sampler_head = "u"
    heads = "u"  # heads computed in the JVP pass
    lambda_v = 0.0

    def __init__(self, num_classes: int, P_mean: float = -0.4, P_std: float = 1.0, equal_fraction: float = 0.0,
                 guidance: GuidanceConfig | None = None, adaptive_p: float = 1.0, adaptive_eps: float = 0.01,
                 tangent: str = "data", target_velocity: str = "data", jvp_backend: str = "auto",
                 jvp_autocast: bool = False):
        for key, val in (("tangent", tangent), ("target_velocity", target_velocity)):
            if val not in CHOICES:
                raise ValueError(f"objective.{key} must be one of {CHOICES}, got {val!r}")
        if jvp_backend not in OBJECTIVE_JVP:
            raise ValueError(f"objective.jvp_backend must be one of {OBJECTIVE_JVP}, got {jvp_backend!r}")
        if not 0.0 <= equal_fraction <= 1.0:
            raise ValueError(f"objective.equal_fraction must be in [0, 1], got {equal_fraction}")
        check_weighting(adaptive_p, adaptive_eps)
        self.null_class = num_classes
        self.P_mean, self.P_std, self.equal_fraction = P_mean, P_std, equal_fraction
        self.guidance = guidance or GuidanceConfig()
        self.adaptive_p, self.adaptive_eps = adaptive_p, adaptive_eps
        self.tangent, self.target_velocity, self.jvp_backend = tangent, target_velocity, jvp_backend
        # func / forward_ad only: run the reference pass under the caller's autocast instead of float32 (the
        # like-for-like baseline of a bf16 step in benchmarks/bench_train_step.py; float32 stays the oracle)
        self.jvp_autocast = jvp_autocast

    def draw(self, x: torch.Tensor) -> Draws:
        """This step's randomness for the (global) batch x: t, r, noise e, label-dropout uniforms, in this order."""
        t, r = sample_t_r(x.shape[0], self.P_mean, self.P_std, self.equal_fraction, x.device)
        d = Draws(t=t, r=r, e=torch.randn_like(x))
        if self.guidance.label_dropout > 0:
            d["u_drop"] = torch.rand(x.shape[0], device=x.device)
        return d

    def targets(self, model, x: torch.Tensor, y: torch.Tensor, draws: Draws | None = None):
        """Steps 1-3: (z, t, r, labels after dropout, guided velocity v_g, model velocity v_c or None).
        draws: this batch's rows of the step's randomness (default: drawn here for x)."""
        d = self.draw(x) if draws is None else draws
        t, r, e = d["t"], d["r"], d["e"]
        tb = bcast(t, x)
        z = (1 - tb) * x + tb * e
        v = e - x
        y, dropped = drop_labels(y, self.guidance.label_dropout, self.null_class, d.get("u_drop"))
        need_vc = self.tangent == "model" or self.target_velocity == "model"
        v_c = None
        if self.guidance.enabled:
            v_c, v_u = model_velocity(model, z, t, y, self.null_class, self.velocity_head, with_uncond=True)
            v_g = guided_target(v, v_c, v_u, t, dropped, self.guidance)
        else:
            v_g = v
            if need_vc:
                v_c, _ = model_velocity(model, z, t, y, self.null_class, self.velocity_head, with_uncond=False)
        return z, t, r, y, v_g, v_c

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, draws: Draws | None = None):
        z, t, r, y, v_g, v_c = self.targets(model, x, y, draws)
        a = v_g if self.tangent == "data" else v_c
        b = v_g if self.target_velocity == "data" else v_c
        heads = self.heads

        backend = self.jvp_backend
        if backend == "auto":
            backend = "fused" if z.is_cuda else "func"
        if backend == "fused":  # one ordinary forward: works through DDP / DeepSpeed wrappers
            v_hat, u_hat, dudt = model(z, t, t - r, y, heads=heads, tangent=a)
            dudt = at_least_fp32(dudt)
        else:
            def fn(z_, t_, h_):
                return model(z_, t_, h_, y, heads=heads)

            v_hat, u_hat, dudt = flow_map_jvp(fn, z, t, t - r, a, backend=backend, autocast=self.jvp_autocast)
        # u_tgt = sg(b - clip(t - r, 0, 1) du/dt)
        u_tgt = (b - bcast((t - r).clamp(0, 1), z) * dudt).detach()
        raw_u = per_sample_sq(u_hat - u_tgt)
        loss = adaptive_weight(raw_u, self.adaptive_p, self.adaptive_eps).mean()
        metrics = {"mse_u": raw_u.detach().mean()}
        if self.lambda_v > 0:
            raw_v = per_sample_sq(v_hat - v_g)
            loss = loss + self.lambda_v * adaptive_weight(raw_v, self.adaptive_p, self.adaptive_eps).mean()
            metrics["mse_v"] = raw_v.detach().mean()
        metrics["loss"] = loss.detach()
        return loss, metrics


class MeanFlow(_FlowMapObjective):
    name = "meanflow"

    def __init__(self, num_classes: int, equal_fraction: float = 0.75, **kw):
        super().__init__(num_classes, equal_fraction=equal_fraction, **kw)
        _check_options(self)


class DuMo(_FlowMapObjective):
    name = "dumo"
    velocity_head = "v"
    heads = "vu"

    # lambda_v = 4 won the digits comparison (benchmarks/RESULTS.md): 2-step FD 3.32 vs 3.74 at 1.0
    def __init__(self, num_classes: int, equal_fraction: float = 0.0, lambda_v: float = 4.0, **kw):
        if lambda_v < 0:
            raise ValueError(f"objective.lambda_v must be >= 0, got {lambda_v}")
        super().__init__(num_classes, equal_fraction=equal_fraction, **kw)
        self.lambda_v = lambda_v
        _check_options(self)


def _check_options(obj) -> None:
    problem = flow_map_option_problem(obj.name, obj.tangent, obj.target_velocity, obj.lambda_v,
                                      obj.guidance.enabled)
    if problem:
        raise ValueError(problem)
