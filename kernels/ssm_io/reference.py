"""Plain-PyTorch references for the Mamba-3 scan's input and output stages.

* ``qk_prep_reference`` — B/C (shared by all heads) to the scan's per-head k/q:
  RMSNorm over d_state, the head-specific bias, then the data-dependent rotary
  with the cumulative phase (half-split pairs: dims i and i + A, A = n_angles).
* ``scan_coefficients_reference`` — the per-(token, head) scalars of the scan:
  dt = softplus(dt_raw + dt_bias) (0 at invalid positions), A = -max(f(a_raw
  [+ a_bias]), a_floor) with f the heavy tail (1 + u for u >= 0, 1 / (1 - u)
  below: the official layer) or softplus, log α = A·dt, and the trapezoid's
  β = (1-λ)·dt·α, γ = λ·dt with λ = sigmoid(lam_raw) (Euler, lam_raw None:
  β = 0, γ = dt).
* ``cumulative_phase_reference`` — the rotary phase φ_t = Σ_{s<=t} θ_s·dt_s,
  per head (dt is per head, θ is shared); with ``seq_idx`` (packed documents)
  the sum restarts at 0 at every document start.
* ``rank_expand_reference`` — the MIMO rank projection of the scan's value,
  v_r = x ⊙ W_x[h, r].
* ``gated_output_reference`` — the scan's y to the output projection's input:
  D skip (v = x ⊙ W_x for MIMO), the optional pre-gate grouped RMSNorm (one
  group per head and rank), the SiLU gate (z ⊙ W_z for MIMO) and the rank
  combination Σ_r W_o ⊙ y_r.

They round to the activations' dtype after each step, exactly as the layer
always has; the fused Triton kernels (``triton.py``) keep fp32 inside and round
once, so the two agree to the activations' precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..norm_rotary import apply_rotary, at_least_fp32, rms_norm


A_ACTIVATIONS = ("heavy_tail", "softplus")


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """1 + u for u >= 0, 1 / (1 - u) for u < 0: positive, C1 at 0, linear growth (no exponential tail)."""
    return torch.where(u >= 0, 1 + u, 1 / (1 - u.clamp(max=0)))  # the clamp keeps the unused branch finite


def a_magnitude(u: torch.Tensor, activation: str) -> torch.Tensor:
    """|A| before the floor: ``activation`` applied to the A projection (+ its bias)."""
    return heavy_tail(u) if activation == "heavy_tail" else F.softplus(u)


def scan_coefficients_reference(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor: float, valid=None,
                                activation: str = "heavy_tail"):
    """(b, l, H) raw projections -> (dt, log_alpha, beta, gamma), float32 (float64 for float64 inputs) (b, l, H);
    ``a_bias`` may be None."""
    f32 = at_least_fp32
    dt = F.softplus(f32(dt_raw) + f32(dt_bias))
    if valid is not None:
        dt = torch.where(valid[..., None], dt, torch.zeros_like(dt))
    u = f32(a_raw) + f32(a_bias) if a_bias is not None else f32(a_raw)
    A = -a_magnitude(u, activation).clamp(min=a_floor)
    log_alpha = A * dt
    if lam_raw is None:
        return dt, log_alpha, torch.zeros_like(dt), dt
    lam = torch.sigmoid(f32(lam_raw))
    return dt, log_alpha, (1 - lam) * dt * torch.exp(log_alpha), lam * dt


def cumulative_phase_reference(theta: torch.Tensor, dt: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """θ (b, l, A) and dt (b, l, H), float32 -> φ (b, l, H, A) float32.

    ``seq_idx`` (b, l) int, nondecreasing per row: φ restarts at 0 where it changes."""
    # Built (b, H, A, l)-major so that the cumsum runs along memory (torch's fast inner scan); the
    # returned view is (b, l, H, A), which qk_prep reads with its strides.
    steps = dt.transpose(1, 2)[:, :, None, :] * theta.transpose(1, 2)[:, None, :, :]
    if seq_idx is None:
        return torch.cumsum(steps, dim=-1).permute(0, 3, 1, 2)
    # Segmented sum: the running total minus its value just before the document began. In float64,
    # so that subtracting a long prefix loses nothing a document alone would keep.
    b, l = seq_idx.shape
    total = torch.cumsum(steps.double(), dim=-1)
    pos = torch.arange(l, device=seq_idx.device)
    new = torch.ones_like(seq_idx, dtype=torch.bool)
    new[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values  # (b, l) first position of t's document
    before = torch.where(start > 0, start - 1, torch.zeros_like(start))
    offset = torch.gather(total, -1, before[:, None, None, :].expand_as(total))
    offset = torch.where((start > 0)[:, None, None, :], offset, torch.zeros_like(offset))
    return (total - offset).to(steps.dtype).permute(0, 3, 1, 2)


def qk_prep_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int, eps: float):
    """(B, C) (b, l, R, N) -> (q, k) (b, l, H, R, N), in B's dtype.

    ``phase`` (b, l, H, A) float32 or None (no rotary); ``*_norm`` (N,) or None
    (no RMSNorm); ``*_bias`` (H, R, N) or None (no bias).
    """
    b, l, r, n = B.shape
    out = []
    for X, w, bias in ((C, c_norm, c_bias), (B, b_norm, b_bias)):
        X = X.reshape(b, l, 1, r, n)
        if w is not None:
            X = rms_norm(X, w, eps)
        X = X + bias.to(X.dtype) if bias is not None else X.expand(b, l, heads, r, n)
        if phase is not None and phase.shape[-1]:
            X = apply_rotary(X, phase[:, :, :, None, :])
        out.append(X.contiguous())
    return out[0], out[1]


def rank_expand_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (b, l, H, P), w (H, R, P) -> v (b, l, H, R, P) in x's dtype."""
    return (x[:, :, :, None] * w.to(x.dtype)).contiguous()


def gated_output_reference(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps: float):
    """y (b, l, H, R, P), x and z (b, l, H, P) -> (b, l, H, P) in y's dtype.

    ``norm_w`` (H, P) or None (no pre-gate norm); ``mimo_*`` (H, R, P) or None
    (SISO, R = 1).
    """
    b, l, h, r, p = y.shape
    x = x.reshape(b, l, h, 1, p)
    v = x * mimo_x.to(x.dtype) if mimo_x is not None else x
    y = y + D.to(y.dtype)[:, None, None] * v
    if norm_w is not None:
        y = rms_norm(y, None, eps) * norm_w.to(y.dtype)[:, None, :]
    z = z.reshape(b, l, h, 1, p)
    if mimo_z is not None:
        z = z * mimo_z.to(z.dtype)
    y = y * F.silu(z)
    if mimo_o is not None:
        return (y * mimo_o.to(y.dtype)).sum(dim=3)
    return y[:, :, :, 0]
