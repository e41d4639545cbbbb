"""Causal attention: one contract, backend dispatch.

    attention(q, k, v, causal=True) -> o      q: (b, lq, heads, d)  k, v: (b, lk, kv_heads, d)

GQA is handled here (kv heads are shared by heads // kv_heads query heads).
When lq < lk (decode / chunked prefill with a KV cache), queries sit at the
last lq positions. Backends: ``flash_attn`` (FA2/FA3), ``flash_attn_cute``
(flash-attn-4 on Hopper/Blackwell), ``sdpa`` (torch, everywhere).

Under ``torch.compile`` nothing here breaks the graph: which packages are
installed is looked up once at import, the device's compute capability through
``torch.cuda.get_device_properties`` (which dynamo folds to a constant), SDPA and
FA2 (whose ops are torch.library ops) trace as they are, and flash-attn-4, when
asked for by name, runs as the ``hybridlab::flash_attn_cute`` custom op (forward
and backward one node each); ``auto`` takes SDPA under compile.
"""

from __future__ import annotations

import importlib
from typing import Tuple

import torch
import torch.nn.functional as F

from ._deps import has_module

ATTN_BACKENDS = ("auto", "sdpa", "flash_attn", "flash_attn_cute")

_HAS_FA_CUTE = has_module("flash_attn.cute")
_HAS_FA = has_module("flash_attn")
_FA2 = None
if _HAS_FA and torch.cuda.is_available():  # imported now: an import inside a traced call breaks the graph
    try:
        _FA2 = importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - a broken install must not stop hybridlab; select_attention_backend skips it
        _HAS_FA = False


def select_attention_backend(device, dtype=torch.bfloat16) -> tuple[str, str]:
    """The backend ``auto`` uses here, with the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa", f"no CUDA ({device.type}): torch SDPA"
    if dtype not in (torch.float16, torch.bfloat16):
        return "sdpa", f"{dtype} is not fp16/bf16: torch SDPA"
    major = torch.cuda.get_device_properties(device).major
    if major >= 9 and _HAS_FA_CUTE:
        return "flash_attn_cute", f"sm{major}x with flash-attn-4: CuTe DSL FlashAttention"
    if _HAS_FA:
        return "flash_attn", "flash-attn installed: FlashAttention 2/3"
    return "sdpa", "flash-attn not installed: torch SDPA (cuDNN/flash inside)"


def attention(q, k, v, causal: bool = True, backend: str = "auto"):
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    if backend == "auto":
        backend, _ = select_attention_backend(q.device, q.dtype)
        if backend == "flash_attn_cute" and torch.compiler.is_compiling():
            # under torch.compile, auto takes SDPA (flash / cuDNN kernels inside, traced by inductor as is)
            # until the flash-attn-4 op below has been measured on the device; ask for it by name meanwhile
            backend = "sdpa"
    if backend == "flash_attn_cute":
        if torch.compiler.is_compiling():
            return torch.ops.hybridlab.flash_attn_cute(q, k, v, causal)[0]
        out = _fa4().flash_attn_func(q, k, v, causal=causal)
        return out[0] if isinstance(out, tuple) else out
    if backend == "flash_attn":
        fa2 = _FA2 if _FA2 is not None else importlib.import_module("flash_attn")
        return fa2.flash_attn_func(q, k, v, causal=causal)
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


# ------------------------------------------------------------------ flash-attn-4 as a torch.library op


def _fa4():
    return importlib.import_module("flash_attn.cute")


def _fa4_interface():
    return importlib.import_module("flash_attn.cute.interface")


@torch.library.custom_op("hybridlab::flash_attn_cute", mutates_args=())
def _fa4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """flash-attn-4's forward -> (out (b, lq, H, d), its log-sum-exp for the backward)."""
    res = _fa4_interface()._flash_attn_fwd(q, k, v, causal=causal, return_lse=True)
    return res[0], res[1]


@_fa4_op.register_fake
def _(q, k, v, causal):
    # flash-attn-4 itself knows its outputs' shapes: under a fake mode it allocates them and launches nothing
    res = _fa4_interface()._flash_attn_fwd(q, k, v, causal=causal, return_lse=True)
    return res[0], res[1]


@torch.library.custom_op("hybridlab::flash_attn_cute_bwd", mutates_args=())
def _fa4_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                dout: torch.Tensor, causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    res = _fa4_interface()._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, None, causal)
    return res[0], res[1], res[2]


@_fa4_bwd_op.register_fake
def _(q, k, v, out, lse, dout, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup(ctx, inputs, output):
    q, k, v, causal = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.causal = causal
    ctx.mark_non_differentiable(output[1])


def _fa4_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.hybridlab.flash_attn_cute_bwd(q, k, v, out, lse, dout, ctx.causal)
    return dq, dk, dv, None


torch.library.register_autograd("hybridlab::flash_attn_cute", _fa4_backward, setup_context=_fa4_setup)
