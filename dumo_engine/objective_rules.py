"""Objective settings that cannot train, one rule each, shared by config validation and the objectives' own
constructors (torch-free: the config imports it).

MeanFlow's velocity is its own u head at h = 0, so target_velocity = "model" would give a u target,
sg(u(z, t, 0)) - (t - r) du/dt, that never sees the data: u = 0 has zero loss, and the zero-initialised
model starts there. DuMo's v head is trained only by lambda_v L_v: at lambda_v = 0 it keeps its initial
output, so the options that read it (the model tangent or target, guidance: steps 3-5 of the method) cannot.
"""
from __future__ import annotations

from typing import Optional


def flow_map_option_problem(name: str, tangent: str, target_velocity: str, lambda_v: float,
                            guided: bool) -> Optional[str]:
    """Why this objective configuration cannot learn (None: it can). name: "meanflow" or "dumo"."""
    if name == "meanflow" and target_velocity == "model":
        return ("objective.target_velocity=model needs a trained velocity head: MeanFlow's velocity is its own u "
                "head at h = 0, so the u target would never see the data (u = 0 has zero loss); use "
                "target_velocity=data, or objective.name=dumo")
    if name == "dumo" and lambda_v == 0:
        uses_v = [what for what, on in (("tangent=model", tangent == "model"),
                                        ("target_velocity=model", target_velocity == "model"),
                                        ("guidance", guided)) if on]
        if uses_v:
            return (f"objective.lambda_v=0 leaves the v head untrained, but {' and '.join(uses_v)} read its "
                    "velocity; set lambda_v > 0, or use tangent=data, target_velocity=data and no guidance")
    return None


def weighting_problem(p: float, eps: float) -> Optional[str]:
    """The adaptive weight L / sg((L + eps)^p) needs p >= 0, and eps > 0 when p > 0 (a zero loss would give 0/0)."""
    if p < 0:
        return f"objective.adaptive_p must be >= 0, got {p}"
    if eps < 0 or (p > 0 and eps == 0):
        return (f"objective.adaptive_eps must be > 0 with adaptive_p = {p} > 0 (the weight L / (L + eps)^p of a "
                f"sample with zero loss would be 0/0), got {eps}")
    return None


def guidance_problem(w: float, k: float, t_lo: float, t_hi: float, label_dropout: float) -> Optional[str]:
    """Folded CFG needs a guidance interval inside [0, 1], a dropout rate in [0, 1], and, when on (w, k not 1, 0),
    label dropout > 0: the unconditional branch reads the NULL class, which only dropped labels train."""
    if not 0.0 <= label_dropout <= 1.0:
        return f"objective.label_dropout must be in [0, 1], got {label_dropout}"
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        return (f"objective.cfg_t_lo / cfg_t_hi: the guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got "
                f"[{t_lo}, {t_hi}]")
    if not (w == 1.0 and k == 0.0) and label_dropout == 0.0:
        return ("guidance (objective.cfg_w, objective.cfg_k) needs label_dropout > 0 (objective.label_dropout): "
                "otherwise the NULL class that the unconditional branch uses is never trained")
    return None
