"""Causal GQA attention with RoPE and a preallocated KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlab.kernels.attention import attention

from ..spec import AttentionBlock
from .rotary import apply_rotary, position_angles


@dataclass
class KVCache:
    k: torch.Tensor  # (batch, max_len, kv_heads, head_dim)
    v: torch.Tensor
    length: int = 0


class Attention(nn.Module):
    def __init__(self, d_model: int, blk: AttentionBlock, backend: str = "auto"):
        super().__init__()
        self.heads, self.kv_heads = blk.heads, blk.resolved_kv_heads()
        self.head_dim = blk.resolved_head_dim(d_model)
        self.rope_theta = blk.rope_theta
        self.backend = backend
        self.q_proj = nn.Linear(d_model, self.heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d_model, bias=False)
        self.o_proj.is_output_proj = True

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, max_len, self.kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x, cache: KVCache | None = None):
        b, l, _ = x.shape
        start = cache.length if cache is not None else 0
        q = self.q_proj(x).view(b, l, self.heads, self.head_dim)
        k, v = self.kv_proj(x).view(b, l, 2, self.kv_heads, self.head_dim).unbind(2)
        ang = position_angles(torch.arange(start, start + l, device=x.device), self.head_dim, self.rope_theta)
        ang = ang[None, :, None, :]
        q, k = apply_rotary(q, ang), apply_rotary(k, ang)
        if cache is not None:
            if start + l > cache.k.shape[1]:
                raise ValueError(f"KV cache holds {cache.k.shape[1]} positions; {start + l} needed")
            cache.k[:, start : start + l] = k
            cache.v[:, start : start + l] = v
            cache.length = start + l
            k, v = cache.k[:, : start + l], cache.v[:, : start + l]
        o = attention(q, k, v, causal=True, backend=self.backend)
        return self.o_proj(o.reshape(b, l, self.heads * self.head_dim))
