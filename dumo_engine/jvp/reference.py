"""Reference forward + JVP pass: the oracle for the fused kernels.

The flow-map target needs du/dt along the trajectory: with (z, t, r) moving with tangents (a, 1, 0)
and the network conditioned on h = t - r, the tangents of the network inputs are (a, 1, 1) for
(z, t, h). One call returns the primal outputs (carrying autograd state for the loss) and the
tangent of u (never differentiated: the u target is under stop-gradient).

Two implementations that must agree (tests check them against each other and against central
finite differences in float64): torch.func.jvp and torch.autograd.forward_ad. Both run in fp32
with autocast disabled, whatever precision the rest of the step uses; autocast=True instead runs them
under the caller's autocast (the like-for-like baseline for a bf16 step in benchmarks, not the oracle).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD

# fn(z, t, h) -> (v or None, u)
FlowMapFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[Optional[torch.Tensor], torch.Tensor]]
JVP_BACKENDS = ("func", "forward_ad")


def _jvp_func(fn: FlowMapFn, primals, tangents):
    def u_with_v_aux(z, t, h):
        v, u = fn(z, t, h)
        return u, ([] if v is None else [v])  # aux must be a pytree of tensors

    u, dudt, aux = torch.func.jvp(u_with_v_aux, primals, tangents, has_aux=True)
    return (aux[0] if aux else None), u, dudt


def _jvp_forward_ad(fn: FlowMapFn, primals, tangents):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, d) for p, d in zip(primals, tangents)]
        v, u = fn(*duals)
        u, dudt = fwAD.unpack_dual(u)
        v = fwAD.unpack_dual(v).primal if v is not None else None
    if dudt is None:  # u does not depend on the inputs at all
        dudt = torch.zeros_like(u)
    return v, u, dudt


def flow_map_jvp(
    fn: FlowMapFn,
    z: torch.Tensor,  # (N, C, H, W)
    t: torch.Tensor,  # (N,)
    h: torch.Tensor,  # (N,) = t - r
    tangent_z: torch.Tensor,  # (N, C, H, W): dz/dt
    backend: str = "func",
    autocast: bool = False,
):
    """Returns (v, u, du/dt) with du/dt the JVP of u along (z, t, h) -> (tangent_z, 1, 1), in fp32.

    v and u keep their autograd graph (gradients reach the parameters); du/dt is detached.
    autocast: keep the caller's autocast for the pass (its GEMMs in bf16 under a bf16 autocast; du/dt is still
    returned in fp32) instead of running it in fp32.
    """
    if backend not in JVP_BACKENDS:
        raise ValueError(f"unknown jvp backend {backend!r}; choose one of {JVP_BACKENDS}")
    device_type = z.device.type
    # fp32 at least (half precision is upcast); float64 stays float64 for the finite-difference oracle
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    primals = (z.to(dtype), t.to(dtype), h.to(dtype))
    tangents = (tangent_z.to(dtype).detach(), torch.ones_like(primals[1]), torch.ones_like(primals[2]))
    # autocast=True: the caller's context as it is (its dtype too); otherwise autocast off for the pass
    ctx = contextlib.nullcontext() if autocast else torch.autocast(device_type=device_type, enabled=False)
    with ctx:
        if backend == "func":
            v, u, dudt = _jvp_func(fn, primals, tangents)
        else:
            v, u, dudt = _jvp_forward_ad(fn, primals, tangents)
    return v, u, dudt.detach().to(dtype)
