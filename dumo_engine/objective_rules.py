"""Option combinations of the flow-map objectives that cannot train (torch-free: config validation uses it too).

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
