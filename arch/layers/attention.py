"""Causal GQA attention with RoPE and a preallocated KV cache.

Options (AttentionBlock): RoPE over the first ``rope_dim`` dims of each head
(half-split or interleaved pairs, 0: none), biases on the q/k/v and output
projections, and a softmax scale other than 1/sqrt(head_dim) (applied by
scaling q, so every attention backend takes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.kernels.attention import attention

from ..spec import AttentionBlock
from .rotary import apply_rotary, position_angles


@dataclass
class KVCache:
    """Preallocated keys/values, head-major: (batch, kv_heads, capacity, head_dim).

    Head-major so that a decode step reads each head's keys as one contiguous
    block (no copies for the batched matmuls of ``decode_attention``); capacity
    is ``max_len`` rounded up to a multiple of ``DECODE_CHUNK`` beyond it.
    ``pad`` (b,) long: left-padding per row (keys before it are masked).

    ``pos`` (1,) long on the device, when set, makes one-token steps shape-static
    (CUDA graphs): the write position comes from it and attention runs over the
    whole buffer with ``bias`` (b or 1, capacity; the cache dtype), 0 for a visible
    key and -inf otherwise, kept up to date in place. ``HybridLM.forward`` advances ``pos``.
    """

    k: torch.Tensor  # (batch, kv_heads, capacity, head_dim)
    v: torch.Tensor
    length: int = 0
    pad: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def make_static(self, pos: torch.Tensor) -> None:
        self.pos = pos
        rows = self.pad.shape[0] if self.pad is not None else 1
        self.bias = torch.empty(rows, self.capacity, device=self.k.device, dtype=self.k.dtype)
        self.reset_bias(self.length)

    def reset_bias(self, length: int) -> None:
        """Keys [pad, length) visible, the rest masked."""
        if self.bias is None:
            return
        j = torch.arange(self.capacity, device=self.k.device)[None, :]
        keep = j < length
        if self.pad is not None:
            keep = keep & (j >= self.pad[:, None])
        self.bias.copy_(torch.zeros((), device=self.k.device).masked_fill(~keep, float("-inf")).expand_as(self.bias))


def document_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) long: each token's position inside its document (0 at every document start)."""
    l = seq_idx.shape[1]
    pos = torch.arange(l, device=seq_idx.device).expand_as(seq_idx)
    new = torch.ones_like(seq_idx, dtype=torch.bool)
    new[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values
    return pos - start


DECODE_CHUNK = 512  # keys per split of the decode step's P @ V (parallelism for small batches)


class Attention(nn.Module):
    def __init__(self, d_model: int, blk: AttentionBlock, backend: str = "auto"):
        super().__init__()
        self.heads, self.kv_heads = blk.heads, blk.resolved_kv_heads()
        self.head_dim = blk.resolved_head_dim(d_model)
        self.rope_theta, self.rope_dim, self.rope_interleaved = blk.rope_theta, blk.resolved_rope_dim(d_model), blk.rope_interleaved
        # the kernels scale scores by 1/sqrt(head_dim): another scale rides on q
        self.q_scale = None if blk.softmax_scale is None else blk.softmax_scale * math.sqrt(self.head_dim)
        self.backend = backend
        self.q_proj = nn.Linear(d_model, self.heads * self.head_dim, bias=blk.qkv_bias)
        self.kv_proj = nn.Linear(d_model, 2 * self.kv_heads * self.head_dim, bias=blk.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d_model, bias=blk.out_bias)
        self.o_proj.is_output_proj = True
        for lin in (self.q_proj, self.kv_proj, self.o_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _rotate(self, q, k, positions):
        """RoPE on the first rope_dim dims of each head; q scaled when the softmax scale is not the default."""
        if self.rope_dim:
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            if positions.dim() == 1:  # one position per column, shared by the rows
                ang = position_angles(positions, self.rope_dim, self.rope_theta, dtype)[None, :, None, :]
            else:  # (b, l): per-row positions (packed documents count from 0 each)
                b, l = positions.shape
                ang = position_angles(positions.reshape(-1), self.rope_dim, self.rope_theta, dtype).view(b, l, 1, -1)
            q, k = apply_rotary(q, ang, self.rope_interleaved), apply_rotary(k, ang, self.rope_interleaved)
        if self.q_scale is not None:
            q = q * self.q_scale
        return q, k

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        cap = max_len if max_len <= DECODE_CHUNK else -(-max_len // DECODE_CHUNK) * DECODE_CHUNK
        shape = (batch, self.kv_heads, cap, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x, cache: KVCache | None = None, seq_idx: torch.Tensor | None = None):
        """``seq_idx`` (b, l) int, nondecreasing per row: packed documents. Each attends only within
        itself (block-diagonal causal mask) and its positions count from 0, as if run alone."""
        b, l, _ = x.shape
        if seq_idx is not None and cache is not None:
            raise ValueError("attention: packed documents (seq_idx) cannot be decoded with a KV cache")
        if cache is not None and cache.pos is not None and l == 1:
            return self._static_step(x, cache)
        start = cache.length if cache is not None else 0
        q = self.q_proj(x).view(b, l, self.heads, self.head_dim)
        k, v = self.kv_proj(x).view(b, l, 2, self.kv_heads, self.head_dim).unbind(2)
        positions = torch.arange(start, start + l, device=x.device) if seq_idx is None else document_positions(seq_idx)
        q, k = self._rotate(q, k, positions)
        if cache is not None:
            if start + l > cache.capacity:
                raise ValueError(f"KV cache holds {cache.capacity} positions; {start + l} needed")
            cache.k[:, :, start : start + l] = k.transpose(1, 2)
            cache.v[:, :, start : start + l] = v.transpose(1, 2)
            cache.length = start + l
            cache.reset_bias(start + l)
            k, v = cache.k[:, :, : start + l].transpose(1, 2), cache.v[:, :, : start + l].transpose(1, 2)
            if self.backend != "sdpa" and x.is_cuda:  # flash kernels want (b, l, h, d) contiguous
                k, v = k.contiguous(), v.contiguous()
        if cache is not None and cache.pad is not None:
            o = _masked_attention(q, k, v, start, cache.pad)
        else:
            o = attention(q, k, v, causal=True, backend=self.backend, seq_idx=seq_idx)
        return self.o_proj(o.reshape(b, l, self.heads * self.head_dim))

    def _static_step(self, x, cache: KVCache):
        """One token at position ``cache.pos`` (a device tensor): no host sync, fixed shapes."""
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.heads, self.head_dim)
        k, v = self.kv_proj(x).view(b, 1, 2, self.kv_heads, self.head_dim).unbind(2)
        q, k = self._rotate(q, k, cache.pos)
        cache.k.index_copy_(2, cache.pos, k.transpose(1, 2))
        cache.v.index_copy_(2, cache.pos, v.transpose(1, 2))
        cache.bias.index_fill_(1, cache.pos, 0.0)
        cache.length += 1
        o = decode_attention(q, cache.k, cache.v, cache.bias)
        return self.o_proj(o.reshape(b, 1, self.heads * self.head_dim))


_BMM_OUT_DTYPE = [True]


def _bmm_f32(a, b):
    """a @ b with fp32 output (bf16/fp16 operands on CUDA: cuBLAS, fp32 accumulate; else upcast)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _BMM_OUT_DTYPE[0]:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _BMM_OUT_DTYPE[0] = False  # this torch has no bmm(out_dtype=): upcast (correct, slower)
    return torch.bmm(a.float(), b.float())


DECODE_IMPL = "auto"  # "auto", "sdpa" or "split"; see decode_attention (bench decode times both)


def decode_attention(q, k, v, bias, impl: str | None = None):
    """One query per row over a head-major KV buffer.

    q (b, 1, H, d); k, v (b, Hkv, L, d); bias (b or 1, L) (0 visible, -inf masked).
    GQA without copies: the H // Hkv query heads of a kv head ride in the query axis.

    * ``sdpa``: ``scaled_dot_product_attention`` with the additive mask (PyTorch's
      memory-efficient kernel);
    * ``split``: split-KV from batched matmuls: scores and softmax in fp32, P in the
      value dtype (as flash kernels do), P @ V in chunks of ``DECODE_CHUNK`` keys
      (fp32 partial sums) so that small batches spread over the whole GPU.
    * ``auto``: ``split`` for GQA with few (batch x kv-head) rows, else ``sdpa`` —
      measured on an H100 (BENCHMARKS.md, Decode): SDPA's kernel was 3x slower for
      GQA at batch 1 (16k context), the split form slower everywhere else.
    """
    b, _, nh, d = q.shape
    hkv, L = k.shape[1], k.shape[2]
    g = nh // hkv
    impl = impl or DECODE_IMPL
    if impl == "auto":
        impl = "split" if g > 1 and b * hkv <= 32 else "sdpa"
    if impl == "sdpa":
        o = F.scaled_dot_product_attention(q.view(b, hkv, g, d), k, v, attn_mask=bias.view(bias.shape[0], 1, 1, L).to(q.dtype))
        return o.reshape(b, 1, nh, d)
    B = b * hkv
    scores = _bmm_f32(q.view(B, g, d), k.view(B, L, d).transpose(1, 2))  # (B, g, L)
    scores = scores.view(b, hkv, g, L).mul_(d ** -0.5).add_(bias.view(bias.shape[0], 1, 1, L))
    probs = torch.softmax(scores, dim=-1)
    C = DECODE_CHUNK if L % DECODE_CHUNK == 0 else L
    S = L // C
    p = torch.empty((B, S, g, C), device=q.device, dtype=v.dtype)
    p.copy_(probs.view(B, g, S, C).transpose(1, 2))
    o = _bmm_f32(p.view(B * S, g, C), v.view(B * S, C, d))  # (B*S, g, d)
    o = o.view(B, S, g, d).sum(1) if S > 1 else o.view(B, g, d)
    return o.to(q.dtype).view(b, 1, nh, d)


def _masked_attention(q, k, v, start: int, pad: torch.Tensor):
    """Causal attention with left padding: query i (position start + i) sees keys j with pad <= j <= start + i.

    A padded query position sees only itself (its output is never used, but must stay finite).
    """
    lq, lk = q.shape[1], k.shape[1]
    i = torch.arange(lq, device=q.device)[:, None] + start
    j = torch.arange(lk, device=q.device)[None, :]
    keep = (j <= i)[None] & ((j >= pad[:, None, None]) | (j == i)[None])  # (b, lq, lk)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        kt = kt.repeat_interleave(groups, dim=1)
        vt = vt.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep[:, None])
    return o.transpose(1, 2)
