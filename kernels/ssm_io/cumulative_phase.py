"""The data-dependent rotary's phase: φ_t = Σ_{s<=t} θ_s·dt_s per head (θ (b, l, A) is shared, dt (b, l, H) per head).

    cumulative_phase(theta, dt) -> phase (b, l, H, A) float32

The Triton kernels run one program per (batch, head block) that walks the sequence in chunks,
carrying the running phase in registers (backward: suffix sums).
"""

from __future__ import annotations

import torch

from .._triton_utils import floor_pow2, pow2, tl, triton
from ._dispatch import check, io_backend

__all__ = ["cumulative_phase", "cumulative_phase_reference", "cumulative_phase_triton"]


def cumulative_phase_reference(theta: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """θ (b, l, A) and dt (b, l, H), float32 -> φ (b, l, H, A) float32."""
    # Built (b, H, A, l)-major so that the cumsum runs along memory (torch's fast inner scan); the
    # returned view is (b, l, H, A), which qk_prep reads with its strides.
    steps = dt.transpose(1, 2)[:, :, None, :] * theta.transpose(1, 2)[:, None, :, :]
    return torch.cumsum(steps, dim=-1).permute(0, 3, 1, 2)


def cumulative_phase(theta, dt, *, backend: str = "auto"):
    """The data-dependent rotary's phase, φ (b, l, H, A) float32 (any strides; qk_prep takes it as is)."""
    check(theta.dim() == 3 and dt.dim() == 3 and theta.shape[:2] == dt.shape[:2],
          f"theta must be (batch, seqlen, A) and dt (batch, seqlen, heads); got {tuple(theta.shape)} and {tuple(dt.shape)}")
    if io_backend(theta, backend) == "triton":
        return cumulative_phase_triton(theta, dt)
    return cumulative_phase_reference(theta, dt)


# ------------------------------------------------------------------ Triton


@triton.jit
def _phase_fwd_kernel(TH, DT, PH, L, H, A, BL: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr):
    """φ[b, t, h, a] = Σ_{s<=t} θ[b, s, a]·dt[b, s, h]: one (batch, head block), chunks of BL positions
    in order, the running sum carried in registers."""
    b, hb = tl.program_id(0), tl.program_id(1)
    l3 = tl.arange(0, BL)[:, None, None]
    h3 = (hb * HB + tl.arange(0, HB))[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    carry = tl.zeros((1, HB, BA), dtype=tl.float32)
    for c0 in range(0, L, BL):
        pos = c0 + l3
        th = tl.load(TH + (b * L + pos) * A + a3, mask=(pos < L) & (a3 < A), other=0.0)
        dt = tl.load(DT + (b * L + pos) * H + h3, mask=(pos < L) & (h3 < H), other=0.0)
        run = tl.cumsum(th * dt, axis=0) + carry
        tl.store(PH + ((b * L + pos) * H + h3) * A + a3, run, mask=(pos < L) & (h3 < H) & (a3 < A))
        carry = tl.sum(tl.where(pos == tl.minimum(c0 + BL, L) - 1, run, 0.0), axis=0)[None]


@triton.jit
def _phase_bwd_kernel(TH, DT, DPH, DTH_PART, DDT, L, H, A, BL: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr):
    """Reverse: g[t] = Σ_{s>=t} dφ[s]; dθ[t, a] = Σ_h g·dt (this head block's part), ddt[t, h] = Σ_a g·θ."""
    b, hb = tl.program_id(0), tl.program_id(1)
    l3 = tl.arange(0, BL)[:, None, None]
    h3 = (hb * HB + tl.arange(0, HB))[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    l2 = tl.arange(0, BL)[:, None]
    carry = tl.zeros((1, HB, BA), dtype=tl.float32)
    for i in range(0, tl.cdiv(L, BL)):
        c0 = (tl.cdiv(L, BL) - 1 - i) * BL
        pos = c0 + l3
        m = (pos < L) & (h3 < H) & (a3 < A)
        d = tl.load(DPH + ((b * L + pos) * H + h3) * A + a3, mask=m, other=0.0)
        g = tl.sum(d, axis=0)[None] - tl.cumsum(d, axis=0) + d + carry  # suffix sums
        carry = tl.sum(d, axis=0)[None] + carry
        th = tl.load(TH + (b * L + pos) * A + a3, mask=(pos < L) & (a3 < A), other=0.0)
        dt = tl.load(DT + (b * L + pos) * H + h3, mask=(pos < L) & (h3 < H), other=0.0)
        h2 = (hb * HB + tl.arange(0, HB))[None, :]
        tl.store(DDT + (b * L + c0 + l2) * H + h2, tl.sum(g * th, axis=2), mask=(c0 + l2 < L) & (h2 < H))
        a2 = tl.arange(0, BA)[None, :]
        tl.store(DTH_PART + ((hb * tl.num_programs(0) + b) * L + c0 + l2) * A + a2, tl.sum(g * dt, axis=1), mask=(c0 + l2 < L) & (a2 < A))


_PHASE_HB = 4  # heads per program (the grid is batch x head blocks; each program walks the sequence)


class CumulativePhaseFn(torch.autograd.Function):
    """(θ (b, l, A), dt (b, l, H)) -> φ (b, l, H, A), fp32."""

    @staticmethod
    def forward(ctx, theta, dt):
        b, l, A = theta.shape
        H = dt.shape[-1]
        BA = pow2(A)
        BL = floor_pow2(max(1, min(64, 4096 // (_PHASE_HB * BA))))
        phase = torch.empty(b, l, H, A, device=theta.device, dtype=torch.float32)
        _phase_fwd_kernel[(b, triton.cdiv(H, _PHASE_HB))](theta, dt, phase, l, H, A, BL=BL, HB=_PHASE_HB, BA=BA, num_warps=4)
        ctx.save_for_backward(theta, dt)
        ctx.meta = (BL, BA)
        return phase

    @staticmethod
    def backward(ctx, dphase):
        theta, dt = ctx.saved_tensors
        BL, BA = ctx.meta
        b, l, A = theta.shape
        H = dt.shape[-1]
        nhb = triton.cdiv(H, _PHASE_HB)
        dth = torch.empty(nhb, b, l, A, device=theta.device, dtype=torch.float32)
        ddt = torch.empty(b, l, H, device=theta.device, dtype=torch.float32)
        _phase_bwd_kernel[(b, nhb)](theta, dt, dphase.contiguous(), dth, ddt, l, H, A, BL=BL, HB=_PHASE_HB, BA=BA, num_warps=4)
        return dth.sum(0), ddt


def cumulative_phase_triton(theta, dt):
    return CumulativePhaseFn.apply(theta.float().contiguous(), dt.float().contiguous())
