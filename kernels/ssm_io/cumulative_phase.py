"""The data-dependent rotary's phase: φ_t = Σ_{s<=t} θ_s·dt_s per head (θ (b, l, A) is shared, dt (b, l, H) per head).

    cumulative_phase(theta, dt, *, seq_idx=None, backend="auto") -> phase (b, l, H, A) float32

``seq_idx`` (b, l) int, nondecreasing per row (packed documents): the sum restarts at 0 at every
position where it changes, so each document gets the phase it gets alone. The Triton kernels run
one program per (batch, head block) that walks the sequence in chunks, carrying the running phase
in registers (backward: suffix sums, walked from the end); with ``seq_idx`` both are segmented
scans that drop the carry at document boundaries.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._triton_utils import floor_pow2, pow2, tl, triton
from ._dispatch import check, io_backend

__all__ = ["cumulative_phase", "cumulative_phase_reference", "cumulative_phase_triton"]


def cumulative_phase_reference(theta: torch.Tensor, dt: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """θ (b, l, A) and dt (b, l, H), float32 (float64 stays float64) -> φ (b, l, H, A) in their dtype.

    ``seq_idx`` (b, l) int, nondecreasing per row: φ restarts at 0 where it changes."""
    # Built (b, H, A, l)-major so that the cumsum runs along memory (torch's fast inner scan); the
    # returned view is (b, l, H, A), which qk_prep reads with its strides.
    steps = dt.transpose(1, 2)[:, :, None, :] * theta.transpose(1, 2)[:, None, :, :]
    if seq_idx is None:
        return torch.cumsum(steps, dim=-1).permute(0, 3, 1, 2)
    # Segmented sum: the running total minus its value just before the document began. In float64,
    # so that subtracting a long prefix loses nothing a document alone would keep.
    l = seq_idx.shape[1]
    total = torch.cumsum(steps.double(), dim=-1)
    pos = torch.arange(l, device=seq_idx.device)
    new = torch.ones_like(seq_idx, dtype=torch.bool)
    new[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values  # (b, l) first position of t's document
    before = torch.where(start > 0, start - 1, torch.zeros_like(start))
    offset = torch.gather(total, -1, before[:, None, None, :].expand_as(total))
    offset = torch.where((start > 0)[:, None, None, :], offset, torch.zeros_like(offset))
    return (total - offset).to(steps.dtype).permute(0, 3, 1, 2)


def cumulative_phase(theta, dt, *, seq_idx=None, backend: str = "auto"):
    """The data-dependent rotary's phase, φ (b, l, H, A) float32 (any strides; qk_prep takes it as is).

    ``seq_idx`` (b, l) int, nondecreasing per row: the phase restarts at 0 at each document start."""
    check(theta.dim() == 3 and dt.dim() == 3 and theta.shape[:2] == dt.shape[:2],
          f"theta must be (batch, seqlen, A) and dt (batch, seqlen, heads); got {tuple(theta.shape)} and {tuple(dt.shape)}")
    check(seq_idx is None or (isinstance(seq_idx, torch.Tensor) and seq_idx.shape == theta.shape[:2]
                              and not seq_idx.dtype.is_floating_point),
          f"seq_idx must be a (batch, seqlen) = {tuple(theta.shape[:2])} integer tensor")
    if io_backend(theta, backend) == "triton":
        return cumulative_phase_triton(theta, dt, seq_idx=seq_idx)
    return cumulative_phase_reference(theta, dt, seq_idx)


# ------------------------------------------------------------------ Triton


@triton.jit
def _seg_add(av, af, bv, bf):
    """Segmented sum: (value, flag) pairs, a set flag starts a new segment (associative)."""
    return tl.where(bf != 0, bv, av + bv), tl.maximum(af, bf)


@triton.jit
def _phase_fwd_kernel(TH, DT, SEQ, PH, L, H, A, BL: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr,
                      HAS_SEQ: tl.constexpr):
    """φ[b, t, h, a] = Σ_{s<=t} θ[b, s, a]·dt[b, s, h]: one (batch, head block), chunks of BL positions
    in order, the running sum carried in registers (and dropped at a document start)."""
    b, hb = tl.program_id(0), tl.program_id(1)
    l3 = tl.arange(0, BL)[:, None, None]
    h3 = (hb * HB + tl.arange(0, HB))[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    carry = tl.zeros((1, HB, BA), dtype=tl.float32)
    for c0 in range(0, L, BL):
        pos = c0 + l3
        th = tl.load(TH + (b * L + pos) * A + a3, mask=(pos < L) & (a3 < A), other=0.0)
        dt = tl.load(DT + (b * L + pos) * H + h3, mask=(pos < L) & (h3 < H), other=0.0)
        x = th * dt
        if HAS_SEQ:
            cur = tl.load(SEQ + b * L + pos, mask=pos < L, other=0)
            prv = tl.load(SEQ + b * L + pos - 1, mask=(pos > 0) & (pos < L), other=0)
            start = ((pos > 0) & (pos < L) & (cur != prv)).to(tl.int32) + tl.zeros((BL, HB, BA), dtype=tl.int32)
            run, seen = tl.associative_scan((x, start), 0, _seg_add)
            run += tl.where(seen == 0, carry, 0.0)
        else:
            run = tl.cumsum(x, axis=0) + carry
        tl.store(PH + ((b * L + pos) * H + h3) * A + a3, run, mask=(pos < L) & (h3 < H) & (a3 < A))
        carry = tl.sum(tl.where(pos == tl.minimum(c0 + BL, L) - 1, run, 0.0), axis=0)[None]


@triton.jit
def _phase_bwd_kernel(TH, DT, SEQ, DPH, DTH_PART, DDT, L, H, A, BL: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr,
                      HAS_SEQ: tl.constexpr):
    """Reverse: g[t] = Σ_{s>=t} dφ[s] (within t's document); dθ[t, a] = Σ_h g·dt (this head block's
    part), ddt[t, h] = Σ_a g·θ. With documents, each block is loaded back to front (j = 0 is its last
    position), so the suffix sums are a forward segmented scan whose segments start at document ends."""
    b, hb = tl.program_id(0), tl.program_id(1)
    j3 = tl.arange(0, BL)[:, None, None]
    h3 = (hb * HB + tl.arange(0, HB))[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    j2 = tl.arange(0, BL)[:, None]
    h2 = (hb * HB + tl.arange(0, HB))[None, :]
    a2 = tl.arange(0, BA)[None, :]
    carry = tl.zeros((1, HB, BA), dtype=tl.float32)
    for i in range(0, tl.cdiv(L, BL)):
        c0 = (tl.cdiv(L, BL) - 1 - i) * BL
        if HAS_SEQ:
            pos = c0 + BL - 1 - j3
            pos2 = c0 + BL - 1 - j2
        else:
            pos = c0 + j3
            pos2 = c0 + j2
        m = (pos < L) & (h3 < H) & (a3 < A)
        d = tl.load(DPH + ((b * L + pos) * H + h3) * A + a3, mask=m, other=0.0)
        if HAS_SEQ:
            cur = tl.load(SEQ + b * L + pos, mask=pos < L, other=0)
            nxt = tl.load(SEQ + b * L + pos + 1, mask=pos + 1 < L, other=0)
            end = ((pos + 1 < L) & (cur != nxt)).to(tl.int32) + tl.zeros((BL, HB, BA), dtype=tl.int32)
            g, seen = tl.associative_scan((d, end), 0, _seg_add)
            g += tl.where(seen == 0, carry, 0.0)
            carry = tl.sum(tl.where(pos == c0, g, 0.0), axis=0)[None]
        else:
            g = tl.sum(d, axis=0)[None] - tl.cumsum(d, axis=0) + d + carry  # suffix sums
            carry = tl.sum(d, axis=0)[None] + carry
        th = tl.load(TH + (b * L + pos) * A + a3, mask=(pos < L) & (a3 < A), other=0.0)
        dt = tl.load(DT + (b * L + pos) * H + h3, mask=(pos < L) & (h3 < H), other=0.0)
        tl.store(DDT + (b * L + pos2) * H + h2, tl.sum(g * th, axis=2), mask=(pos2 < L) & (h2 < H))
        tl.store(DTH_PART + ((hb * tl.num_programs(0) + b) * L + pos2) * A + a2, tl.sum(g * dt, axis=1),
                 mask=(pos2 < L) & (a2 < A))


_PHASE_HB = 4  # heads per program (the grid is batch x head blocks; each program walks the sequence)


def _phase_meta(theta, dt):
    b, l, A = theta.shape
    H = dt.shape[-1]
    BA = pow2(A)
    return b, l, A, H, BA, floor_pow2(max(1, min(64, 4096 // (_PHASE_HB * BA))))


@torch.library.custom_op("hybridlab::cumulative_phase", mutates_args=())
def _phase_op(theta: torch.Tensor, dt: torch.Tensor, seq_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """θ (b, l, A), dt (b, l, H) fp32 contiguous, seq_idx (b, l) int32 or None -> φ (b, l, H, A) fp32."""
    b, l, A, H, BA, BL = _phase_meta(theta, dt)
    phase = torch.empty(b, l, H, A, device=theta.device, dtype=torch.float32)
    _phase_fwd_kernel[(b, triton.cdiv(H, _PHASE_HB))](theta, dt, seq_idx if seq_idx is not None else dt, phase, l, H, A,
                                                      BL=BL, HB=_PHASE_HB, BA=BA, HAS_SEQ=seq_idx is not None, num_warps=4)
    return phase


@_phase_op.register_fake
def _(theta, dt, seq_idx):
    b, l, A = theta.shape
    return theta.new_empty(b, l, dt.shape[-1], A, dtype=torch.float32)


@torch.library.custom_op("hybridlab::cumulative_phase_bwd", mutates_args=())
def _phase_bwd_op(theta: torch.Tensor, dt: torch.Tensor, seq_idx: Optional[torch.Tensor],
                  dphase: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    b, l, A, H, BA, BL = _phase_meta(theta, dt)
    nhb = triton.cdiv(H, _PHASE_HB)
    dth = torch.empty(nhb, b, l, A, device=theta.device, dtype=torch.float32)
    ddt = torch.empty(b, l, H, device=theta.device, dtype=torch.float32)
    _phase_bwd_kernel[(b, nhb)](theta, dt, seq_idx if seq_idx is not None else dt, dphase.contiguous(), dth, ddt, l, H, A,
                                BL=BL, HB=_PHASE_HB, BA=BA, HAS_SEQ=seq_idx is not None, num_warps=4)
    return dth.sum(0), ddt


@_phase_bwd_op.register_fake
def _(theta, dt, seq_idx, dphase):
    return torch.empty_like(theta), torch.empty_like(dt)


def _phase_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _phase_backward(ctx, dphase):
    theta, dt, seq_idx = ctx.saved_tensors
    dth, ddt = torch.ops.hybridlab.cumulative_phase_bwd(theta, dt, seq_idx, dphase)
    return dth, ddt, None


torch.library.register_autograd("hybridlab::cumulative_phase", _phase_backward, setup_context=_phase_setup)


def cumulative_phase_triton(theta, dt, *, seq_idx=None):
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return torch.ops.hybridlab.cumulative_phase(theta.float().contiguous(), dt.float().contiguous(), seq)
