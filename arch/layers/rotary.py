"""Rotary embeddings (half-split pairing): dims i and i + n/2 of the rotated part form a pair."""

from __future__ import annotations

import torch

from hybridlab.kernels.norm_rotary import apply_rotary

__all__ = ["apply_rotary", "position_angles"]


def position_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE angles, (len, head_dim // 2), for integer positions."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    return positions.float()[:, None] * inv_freq[None, :]
