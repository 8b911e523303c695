"""Pure-PyTorch reference of CoupledScan: the readable statement of the math (DESIGN.md section 2).

Runs on any device, differentiates through autograd, and is what every fast implementation (the
Triton kernels, the TensorRT plugin, the portable ONNX) is tested against. It loops over time and
keeps only the current state, so memory stays O(batch * E * N) in the forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import coupling_scale as _kappa


def rank_delta(delta_low, delta_proj):
    """delta from Mamba's rank-R form: delta_low (b, M, L, R) @ delta_proj (M, R, E) per modality,
    in delta_low's dtype (what the Triton kernel forms inside, with float32 math)."""
    return torch.einsum("bmlr,mre->bmle", delta_low, delta_proj.to(delta_low.dtype))


def coupled_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                           delta_softplus=False, coupling_scale=None, initial_state=None,
                           return_final_state=False):
    """Shapes as in DESIGN.md section 3: u, delta, z (b, M, L, E); B, C (b, M, L, N); A (M, E, N);
    D, delta_bias (M, E); initial_state (b, E, N). State math is float32 whatever the input dtype."""
    out_dtype = u.dtype
    batch, M, L, E = u.shape
    N = A.shape[-1]
    kappa = _kappa(coupling_scale, M)

    u32, dt = u.float(), delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None, :]
    if delta_softplus:
        dt = F.softplus(dt)
    A32, B32, C32 = A.float(), B.float(), C.float()

    c = (torch.zeros(batch, E, N, device=u.device, dtype=torch.float32)
         if initial_state is None else initial_state.float())
    ys = []
    for t in range(L):
        dt_t = dt[:, :, t, :, None]                               # (b, M, E, 1)
        # h[m,t] = exp(dt*A) * c[t-1] + dt * B * u   (every chain reads the shared coupled state)
        h = torch.exp(dt_t * A32) * c[:, None] + dt_t * B32[:, :, t, None, :] * u32[:, :, t, :, None]
        c = kappa * h.sum(dim=1)                                  # c[t] = kappa * sum_m h[m,t]
        ys.append((h * C32[:, :, t, None, :]).sum(-1))            # (b, M, E)
    y = torch.stack(ys, dim=2) if L else u32.new_zeros(batch, M, 0, E)
    if D is not None:
        y = y + D.float()[None, :, None, :] * u32
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, c) if return_final_state else y
