"""Flow matching baseline: v head only, r = t (h = 0)."""
from __future__ import annotations

import torch

from .common import (Draws, GuidanceConfig, adaptive_weight, bcast, check_weighting, drop_labels, guided_target,
                     logit_normal, model_velocity, per_sample_sq)


class FlowMatching:
    name = "flow_matching"
    velocity_head = "v"  # sampling: v head at h = 0
    sampler_head = "v"

    def __init__(self, num_classes: int, P_mean: float = -0.4, P_std: float = 1.0,
                 guidance: GuidanceConfig | None = None, adaptive_p: float = 1.0, adaptive_eps: float = 0.01):
        check_weighting(adaptive_p, adaptive_eps)
        self.null_class = num_classes
        self.P_mean, self.P_std = P_mean, P_std
        self.guidance = guidance or GuidanceConfig()
        self.adaptive_p, self.adaptive_eps = adaptive_p, adaptive_eps

    def draw(self, x: torch.Tensor) -> Draws:
        """This step's randomness for the (global) batch x: t, noise e, label-dropout uniforms, in this order."""
        d = Draws(t=logit_normal(x.shape[0], self.P_mean, self.P_std, x.device), e=torch.randn_like(x))
        if self.guidance.label_dropout > 0:
            d["u_drop"] = torch.rand(x.shape[0], device=x.device)
        return d

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, draws: Draws | None = None):
        d = self.draw(x) if draws is None else draws
        t, e = d["t"], d["e"]
        tb = bcast(t, x)
        z = (1 - tb) * x + tb * e  # (N, C, H, W)
        v = e - x
        y, dropped = drop_labels(y, self.guidance.label_dropout, self.null_class, d.get("u_drop"))
        if self.guidance.enabled:
            v_c, v_u = model_velocity(model, z, t, y, self.null_class, "v", with_uncond=True)
            v = guided_target(v, v_c, v_u, t, dropped, self.guidance)
        v_hat, _ = model(z, t, torch.zeros_like(t), y, heads="v")
        raw = per_sample_sq(v_hat - v)
        loss = adaptive_weight(raw, self.adaptive_p, self.adaptive_eps).mean()
        return loss, {"loss": loss.detach(), "mse_v": raw.detach().mean()}
