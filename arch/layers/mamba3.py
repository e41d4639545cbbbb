"""The Mamba-3 mixer (arXiv 2603.15569), SISO and MIMO.

Per token, one input projection gives z (gate), x, B, C, dt, A, λ and the
rotation angles θ. Then, per head h (P = headdim, N = d_state, R = rank):

    dt  = softplus(dt_raw + dt_bias)                   step size
    A   = -max(softplus(a_raw + a_bias), a_floor)      data-dependent, strictly negative
    λ   = sigmoid(λ_raw)                               trapezoid mix (Euler: no λ)
    k,q = RMSNorm(B), RMSNorm(C), + head-specific biases (init 1)
    φ_t = Σ_{s<=t} θ_s dt_s,  θ = π tanh(θ_raw)       cumulative phase (complex state)
    k,q = rotate the first rope_dims of d_state by φ_t
    v_r = x ⊙ W_x[h, r]   (MIMO rank-R input projection; SISO: v = x)

and the scan (``hybridlab.kernels.ssm_scan``) runs with log α = A dt,
β = (1-λ) dt e^{A dt}, γ = λ dt (Euler: β = 0, γ = dt). After it: the D skip,
the optional pre-gate grouped RMSNorm (one group per head), the SiLU gate
z_r = z ⊙ W_z[h, r], the rank-R output combination Σ_r W_o[h, r] ⊙ y_r, and
the output projection. No short convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.kernels import ScanState, ssm_scan

from ..spec import Mamba3Block
from .norm import rms_norm
from .rotary import apply_rotary


@dataclass
class Mamba3Cache:
    scan: ScanState  # h (b, H, P, N) fp32, last k (b, H, R, N), last v (b, H, R, P)
    phase: torch.Tensor  # (b, H, rope_dims // 2) fp32: the running φ


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class Mamba3(nn.Module):
    def __init__(self, d_model: int, blk: Mamba3Block, backend: str = "auto", norm_eps: float = 1e-5):
        super().__init__()
        self.blk, self.backend, self.eps = blk, backend, norm_eps
        self.d_inner = blk.d_inner(d_model)
        self.H, self.P, self.N, self.R = blk.heads(d_model), blk.headdim, blk.d_state, blk.rank
        self.n_angles = blk.rope_dims // 2
        H, P, N, R = self.H, self.P, self.N, self.R
        self.split = [self.d_inner, self.d_inner, R * N, R * N, H, H, H if blk.trapezoid else 0, self.n_angles]
        self.in_proj = nn.Linear(d_model, sum(self.split), bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj.is_output_proj = True

        dt = torch.exp(torch.rand(H) * (math.log(blk.dt_max) - math.log(blk.dt_min)) + math.log(blk.dt_min))
        self.dt_bias = nn.Parameter(inverse_softplus(dt.clamp(min=1e-4)))
        self.a_bias = nn.Parameter(inverse_softplus(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        if blk.bc_norm:
            self.b_norm = nn.Parameter(torch.ones(N))
            self.c_norm = nn.Parameter(torch.ones(N))
        if blk.bc_bias:
            self.b_bias = nn.Parameter(torch.ones(H, R, N))
            self.c_bias = nn.Parameter(torch.ones(H, R, N))
        if blk.mode == "mimo":
            self.mimo_x = nn.Parameter(torch.ones(H, R, P))
            self.mimo_z = nn.Parameter(torch.ones(H, R, P))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R))
        if blk.out_norm == "pre_gate_grouped":
            self.out_norm = nn.Parameter(torch.ones(H, P))

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> Mamba3Cache:
        H, P, N, R = self.H, self.P, self.N, self.R
        scan = ScanState(
            torch.zeros(batch, H, P, N, device=device, dtype=torch.float32),
            torch.zeros(batch, H, R, N, device=device, dtype=dtype),
            torch.zeros(batch, H, R, P, device=device, dtype=dtype),
        )
        return Mamba3Cache(scan, torch.zeros(batch, H, self.n_angles, device=device, dtype=torch.float32))

    def scan_inputs(self, u: torch.Tensor, phase0: torch.Tensor | None = None):
        """Project u and build the scan's (q, k, v, log α, β, γ); also z and the final phase."""
        b, l, _ = u.shape
        H, P, N, R = self.H, self.P, self.N, self.R
        blk = self.blk
        z, x, B, C, dt_raw, a_raw, lam_raw, theta_raw = torch.split(self.in_proj(u), self.split, dim=-1)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())  # (b, l, H)
        A = -F.softplus(a_raw.float() + self.a_bias.float()).clamp(min=blk.a_floor)
        log_alpha = A * dt
        if blk.trapezoid:
            lam = torch.sigmoid(lam_raw.float())
            beta = (1 - lam) * dt * torch.exp(log_alpha)
            gamma = lam * dt
        else:
            beta, gamma = torch.zeros_like(dt), dt

        B, C = B.view(b, l, 1, R, N), C.view(b, l, 1, R, N)
        if blk.bc_norm:
            B, C = rms_norm(B, self.b_norm, self.eps), rms_norm(C, self.c_norm, self.eps)
        if blk.bc_bias:
            k, q = B + self.b_bias.to(B.dtype), C + self.c_bias.to(C.dtype)
        else:
            k, q = B.expand(b, l, H, R, N), C.expand(b, l, H, R, N)

        phase = None
        if self.n_angles:
            theta = math.pi * torch.tanh(theta_raw.float())  # (b, l, n_angles)
            phase = torch.cumsum(theta[:, :, None, :] * dt[..., None], dim=1)  # (b, l, H, n_angles)
            if phase0 is not None:
                phase = phase + phase0[:, None]
            k = apply_rotary(k, phase[:, :, :, None, :])
            q = apply_rotary(q, phase[:, :, :, None, :])

        x = x.view(b, l, H, 1, P)
        v = x * self.mimo_x.to(x.dtype) if blk.mode == "mimo" else x
        return q.contiguous(), k.contiguous(), v.contiguous(), log_alpha, beta, gamma, z, phase

    def forward(self, u: torch.Tensor, cache: Mamba3Cache | None = None):
        b, l, _ = u.shape
        H, P = self.H, self.P
        q, k, v, log_alpha, beta, gamma, z, phase = self.scan_inputs(u, cache.phase if cache is not None else None)
        y, final = ssm_scan(
            q, k, v, log_alpha, beta, gamma, cache.scan if cache is not None else None,
            backend=self.backend, chunk_size=self.blk.chunk_size,
        )
        if cache is not None:
            cache.scan = final
            if phase is not None:
                cache.phase = phase[:, -1]
        return self.out_proj(self.output(y, v, z).reshape(b, l, H * P))

    def output(self, y, v, z):
        """D skip, pre-gate grouped norm, SiLU gate and the rank combination: (b, l, H, R, P) -> (b, l, H, P)."""
        b, l = y.shape[:2]
        y = y + self.D.to(y.dtype)[:, None, None] * v
        if self.blk.out_norm == "pre_gate_grouped":
            y = rms_norm(y, None, self.eps) * self.out_norm.to(y.dtype)[:, None, :]
        z = z.view(b, l, self.H, 1, self.P)
        if self.blk.mode == "mimo":
            z = z * self.mimo_z.to(z.dtype)
        y = y * F.silu(z)
        if self.blk.mode == "mimo":
            return (y * self.mimo_o.to(y.dtype)).sum(dim=3)
        return y[:, :, :, 0]
