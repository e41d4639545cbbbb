"""Rotary embeddings (half-split pairing): dims i and i + n/2 of the rotated part form a pair."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * angles.shape[-1]`` dims of x's last axis by ``angles``.

    ``angles`` broadcasts against ``x[..., :n_pairs]``; the rest of x passes
    through. Computed in float32, returned in x's dtype.
    """
    n = angles.shape[-1]
    if n == 0:
        return x
    xf = x.float()
    x1, x2, rest = xf[..., :n], xf[..., n : 2 * n], xf[..., 2 * n :]
    cos, sin = angles.cos(), angles.sin()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
    return out.to(x.dtype)


def position_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE angles, (len, head_dim // 2), for integer positions."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    return positions.float()[:, None] * inv_freq[None, :]
