"""Rotary embeddings: dims i and i + n/2 of the rotated part form a pair (or 2i and 2i + 1, interleaved)."""

from __future__ import annotations

import torch

from hybridlab.kernels.norm_rotary import apply_rotary

__all__ = ["apply_rotary", "position_angles"]


def position_angles(positions: torch.Tensor, rope_dim: int, theta: float, dtype=torch.float32) -> torch.Tensor:
    """Standard RoPE angles, (len, rope_dim // 2), for integer positions (frequencies over the rotated dims).

    float32 (as flash-attn's RotaryEmbedding computes them), float64 for float64 models."""
    # 1 / theta^(2i / d) in this order of operations (as flash-attn's RotaryEmbedding computes it)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, device=positions.device, dtype=dtype) / rope_dim))
    return positions.to(dtype)[:, None] * inv_freq[None, :]
