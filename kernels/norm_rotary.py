"""RMSNorm and rotary in plain PyTorch: the one home of both (layers and kernel references use them)."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype when that is wider (float64 runs stay float64)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalize the last dim in float32 (float64 for float64 x), return in x's dtype."""
    xf = at_least_fp32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``2 * angles.shape[-1]`` dims of x's last axis by ``angles``.

    Pair i is dims (i, i + n) of the rotated part (half-split, n = angles.shape[-1]), or
    (2i, 2i + 1) with ``interleaved``. ``angles`` broadcasts against ``x[..., :n]``;
    the rest of x passes through. Computed in float32 (float64 for float64 x), returned in x's dtype.
    """
    n = angles.shape[-1]
    if n == 0:
        return x
    xf = at_least_fp32(x)
    angles = angles.to(xf.dtype) if angles.dtype != xf.dtype and xf.dtype == torch.float64 else angles
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        pairs = xf[..., : 2 * n].unflatten(-1, (n, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        rot = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return torch.cat([rot, xf[..., 2 * n :]], dim=-1).to(x.dtype)
    x1, x2, rest = xf[..., :n], xf[..., n : 2 * n], xf[..., 2 * n :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
    return out.to(x.dtype)
