"""Pieces shared by the objectives: time sampling, label dropout, folded CFG target, weighting."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective_rules import guidance_problem, weighting_problem


@dataclass
class GuidanceConfig:
    """Classifier-free guidance folded into training (MeanFlow's scheme).

    v_g = w v + k v_hat(z, t, 0 | y) + (1 - w - k) v_hat(z, t, 0 | NULL) for t in [t_lo, t_hi] on rows
    that kept their label; v_g = v elsewhere. w=1, k=0 turns guidance off (no extra passes).
    """

    w: float = 1.0
    k: float = 0.0
    t_lo: float = 0.0
    t_hi: float = 1.0
    label_dropout: float = 0.1

    def __post_init__(self):
        problem = guidance_problem(self.w, self.k, self.t_lo, self.t_hi, self.label_dropout)
        if problem:
            raise ValueError(problem)

    @property
    def enabled(self) -> bool:
        return not (self.w == 1.0 and self.k == 0.0)

    @classmethod
    def for_model(cls, name: str, label_dropout: float = 0.1) -> "GuidanceConfig":
        """MeanFlow's ImageNet-256 guidance for a model size (METHOD.md); sizes without one get guidance off."""
        w, k, t_lo, t_hi = GUIDANCE_BY_SIZE.get(name, (1.0, 0.0, 0.0, 1.0))
        return cls(w=w, k=k, t_lo=t_lo, t_hi=t_hi, label_dropout=label_dropout)


# (w, k, t_lo, t_hi) for ImageNet 256, from MeanFlow's recipe as METHOD.md lists it.
GUIDANCE_BY_SIZE = {
    "DiT-B/2": (1.0, 0.5, 0.0, 1.0),
    "DiT-L/2": (0.2, 0.92, 0.0, 0.8),
    "DiT-XL/2": (0.2, 0.92, 0.0, 0.75),
}


def logit_normal(n: int, mean: float, std: float, device) -> torch.Tensor:
    """sigmoid(N(mean, std^2)) samples, (n,)."""
    return torch.sigmoid(torch.randn(n, device=device) * std + mean)


def sample_t_r(n: int, mean: float, std: float, equal_fraction: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """t, r independent logit-normal, ordered so r <= t; exactly round(equal_fraction * n) random rows get r = t."""
    a = logit_normal(n, mean, std, device)
    b = logit_normal(n, mean, std, device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    n_equal = int(round(equal_fraction * n))
    if n_equal > 0:
        idx = torch.randperm(n, device=device)[:n_equal]
        r = r.clone()
        r[idx] = t[idx]
    return t, r


def drop_labels(y: torch.Tensor, p: float, null_class: int,
                u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace labels by NULL with probability p; returns (labels, dropped mask). u: pre-drawn U(0,1) per row."""
    if p <= 0:
        return y, torch.zeros_like(y, dtype=torch.bool)
    dropped = (torch.rand(y.shape, device=y.device) if u is None else u) < p
    return torch.where(dropped, torch.full_like(y, null_class), y), dropped


class Draws(dict):
    """The random numbers of one training step, drawn for the GLOBAL batch in a fixed order (so one process and
    any number of data-parallel ranks consume the RNG identically), then sliced per rank / micro-batch.
    Keys: t, r (N,), e (noise, shape of x), u_drop (N,) or absent."""

    def rows(self, start: int, stop: int) -> "Draws":
        return Draws({k: v[start:stop] for k, v in self.items()})


def bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) matching like's rank."""
    return x.view(-1, *([1] * (like.ndim - 1)))


def guided_target(v: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, t: torch.Tensor,
                  dropped: torch.Tensor, g: GuidanceConfig) -> torch.Tensor:
    """v_g = w v + k v_cond + (1 - w - k) v_uncond inside the t-interval on kept-label rows, else v."""
    v_g = g.w * v + g.k * v_cond + (1.0 - g.w - g.k) * v_uncond
    active = (t >= g.t_lo) & (t <= g.t_hi) & ~dropped
    return torch.where(bcast(active, v), v_g, v)


@torch.no_grad()
def model_velocity(model, z, t, y, null_class: int, head: str, with_uncond: bool):
    """No-grad velocity at h = 0 for labels y (and NULL), batched in one call; returns (v_cond, v_uncond|None)."""
    n = z.shape[0]
    if with_uncond:
        zz, tt = torch.cat([z, z]), torch.cat([t, t])
        yy = torch.cat([y, torch.full_like(y, null_class)])
    else:
        zz, tt, yy = z, t, y
    v, u = model(zz, tt, torch.zeros_like(tt), yy, heads=head)
    out = at_least_fp32(v if head == "v" else u)
    return (out[:n], out[n:]) if with_uncond else (out, None)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is float64 (a float64 run, finite-difference checks, keeps its precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sample_sq(err: torch.Tensor) -> torch.Tensor:
    """||err||^2 summed over all but the batch dimension, (N,)."""
    return at_least_fp32(err).pow(2).flatten(1).sum(1)


def check_weighting(p: float, eps: float) -> None:
    """ValueError where the adaptive weight cannot be computed (objective_rules.weighting_problem)."""
    problem = weighting_problem(p, eps)
    if problem:
        raise ValueError(problem)


def adaptive_weight(loss: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """L / sg((L + eps)^p), per sample (p = 0 leaves L unchanged)."""
    if p == 0:
        return loss
    return loss / (loss.detach() + eps).pow(p)
