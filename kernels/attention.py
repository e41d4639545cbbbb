"""Causal attention: one contract, backend dispatch.

    attention(q, k, v, causal=True) -> o      q: (b, lq, heads, d)  k, v: (b, lk, kv_heads, d)

GQA is handled here (kv heads are shared by heads // kv_heads query heads).
When lq < lk (decode / chunked prefill with a KV cache), queries sit at the
last lq positions. Backends: ``flash_attn`` (FA2/FA3), ``flash_attn_cute``
(flash-attn-4 on Hopper/Blackwell), ``sdpa`` (torch, everywhere).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ._deps import has_module

ATTN_BACKENDS = ("auto", "sdpa", "flash_attn", "flash_attn_cute")


def select_attention_backend(device, dtype=torch.bfloat16) -> tuple[str, str]:
    """The backend ``auto`` uses here, with the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa", f"no CUDA ({device.type}): torch SDPA"
    if dtype not in (torch.float16, torch.bfloat16):
        return "sdpa", f"{dtype} is not fp16/bf16: torch SDPA"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9 and has_module("flash_attn.cute"):
        return "flash_attn_cute", f"sm{major}x with flash-attn-4: CuTe DSL FlashAttention"
    if has_module("flash_attn"):
        return "flash_attn", "flash-attn installed: FlashAttention 2/3"
    return "sdpa", "flash-attn not installed: torch SDPA (cuDNN/flash inside)"


def attention(q, k, v, causal: bool = True, backend: str = "auto"):
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    if backend == "auto":
        backend, _ = select_attention_backend(q.device, q.dtype)
    if backend == "flash_attn_cute":
        fn = importlib.import_module("flash_attn.cute").flash_attn_func
        out = fn(q, k, v, causal=causal)
        return out[0] if isinstance(out, tuple) else out
    if backend == "flash_attn":
        return importlib.import_module("flash_attn").flash_attn_func(q, k, v, causal=causal)
    return _sdpa(q, k, v, causal)


def _sdpa(q, k, v, causal: bool):
    lq, lk = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        kt = kt.repeat_interleave(groups, dim=1)
        vt = vt.repeat_interleave(groups, dim=1)
    if not causal or lq == 1:
        o = F.scaled_dot_product_attention(qt, kt, vt)
    elif lq == lk:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:  # queries are the last lq positions of lk
        i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=j <= i)
    return o.transpose(1, 2)
