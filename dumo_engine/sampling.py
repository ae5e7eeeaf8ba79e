"""Samplers: u head in 1 or 2 steps (any time grid), v head with Euler or Heun in N steps.

A model is any callable model(z, t, h, y, heads=...) -> (v, u) with z (N, C, H, W), t and h (N,).
Guidance is trained into the model, so sampling does no CFG. Everything is deterministic given
the seed of the initial noise.
"""
from __future__ import annotations

from typing import Sequence

import torch


def initial_noise(shape: Sequence[int], seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """z_1 ~ N(0, I) from a private generator (CPU-drawn, so the same seed gives the same noise anywhere)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _full(z: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((z.shape[0],), float(value), device=z.device, dtype=torch.float32)


def _check_grid(times: Sequence[float]) -> list[float]:
    times = [float(s) for s in times]
    if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:])) or times[0] > 1 or times[-1] < 0:
        raise ValueError(f"time grid must decrease strictly within [0, 1], got {times}")
    return times


@torch.no_grad()
def sample_u(model, z: torch.Tensor, y: torch.Tensor, times: Sequence[float] = (1.0, 0.0)) -> torch.Tensor:
    """Flow-map steps along a decreasing grid: z_r = z_t - (t - r) u_hat(z_t, t, h = t - r)."""
    times = _check_grid(times)
    for t, r in zip(times, times[1:]):
        _, u = model(z, _full(z, t), _full(z, t - r), y, heads="u")
        z = z - (t - r) * u.to(z.dtype)
    return z


def sample_u_1step(model, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x = z_1 - u_hat(z_1, t=1, h=1)."""
    return sample_u(model, z, y, (1.0, 0.0))


def sample_u_2step(model, z: torch.Tensor, y: torch.Tensor, t_mid: float = 0.5) -> torch.Tensor:
    """t = 1 -> t_mid -> 0."""
    if not 0.0 < t_mid < 1.0:
        raise ValueError(f"t_mid must be in (0, 1), got {t_mid}")
    return sample_u(model, z, y, (1.0, t_mid, 0.0))


@torch.no_grad()
def sample_v(model, z: torch.Tensor, y: torch.Tensor, steps: int, solver: str = "euler", head: str = "v") -> torch.Tensor:
    """Integrate dz/dt = v_hat(z, t, h=0) from t = 1 to 0 in `steps` uniform steps.

    head="u" uses the u head at h = 0 as the velocity (MeanFlow's single output).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if head not in ("v", "u"):
        raise ValueError(f"head must be 'v' or 'u', got {head!r}")

    def vel(zz, t):
        v, u = model(zz, _full(zz, t), _full(zz, 0.0), y, heads=head)
        return (v if head == "v" else u).to(zz.dtype)

    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, s in zip(ts, ts[1:]):
        d = vel(z, t)
        z_next = z - (t - s) * d
        if solver == "heun":
            z_next = z - (t - s) * 0.5 * (d + vel(z_next, s))
        z = z_next
    return z


def sample(model, y: torch.Tensor, shape: Sequence[int], method: str, seed: int, t_mid: float = 0.5,
           steps: int = 20, velocity_head: str = "v") -> torch.Tensor:
    """One entry point: method in {"u1", "u2", "euler", "heun"}; shape excludes the batch."""
    z = initial_noise((y.shape[0], *shape), seed, device=y.device)
    if method == "u1":
        return sample_u_1step(model, z, y)
    if method == "u2":
        return sample_u_2step(model, z, y, t_mid)
    if method in ("euler", "heun"):
        return sample_v(model, z, y, steps, method, head=velocity_head)
    raise ValueError(f"unknown sampling method {method!r}; choose u1, u2, euler or heun")
