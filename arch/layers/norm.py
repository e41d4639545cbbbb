"""RMSNorm, and the grouped RMSNorm used before the Mamba-3 output gate."""

from __future__ import annotations

import torch
from torch import nn

from hybridlab.kernels.norm_rotary import rms_norm

__all__ = ["rms_norm", "RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)
