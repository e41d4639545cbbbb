"""Causal attention: one contract, backend dispatch.

    attention(q, k, v, causal=True, backend="auto", seq_idx=None) -> o
        q: (b, lq, heads, d)  k, v: (b, lk, kv_heads, d)

GQA is handled here (kv heads are shared by heads // kv_heads query heads).
When lq < lk (decode / chunked prefill with a KV cache), queries sit at the
last lq positions. Backends: ``flash_attn`` (FA2/FA3), ``flash_attn_cute``
(flash-attn-4 on Hopper/Blackwell), ``sdpa`` (torch, everywhere).

Packed documents: ``seq_idx`` (b, l) int, nondecreasing per row (lq == lk): a
query sees only keys of its own document (a block-diagonal causal mask). The
flash backends run it as varlen attention over the flattened batch
(``cu_seqlens``); SDPA takes the mask.

Under ``torch.compile`` nothing here breaks the graph: which packages are
installed is looked up once at import, the device's compute capability through
``torch.cuda.get_device_properties`` (which dynamo folds to a constant), SDPA and
FA2 (whose ops are torch.library ops) trace as they are, and flash-attn-4, when
asked for by name, runs as the ``hybridlab::flash_attn_cute`` custom op (forward
and backward one node each); ``auto`` takes SDPA under compile, and so do packed
documents (the masked SDPA: varlen needs a host sync per batch).
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


def attention(q, k, v, causal: bool = True, backend: str = "auto", seq_idx=None):
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    if backend == "auto":
        backend, _ = select_attention_backend(q.device, q.dtype)
        if backend == "flash_attn_cute" and torch.compiler.is_compiling():
            # under torch.compile, auto takes SDPA (flash / cuDNN kernels inside, traced by inductor as is)
            # until the flash-attn-4 op below has been measured on the device; ask for it by name meanwhile
            backend = "sdpa"
    if seq_idx is not None:
        b, lq = q.shape[:2]
        if k.shape[1] != lq or tuple(seq_idx.shape) != (b, lq):
            raise ValueError(f"attention: seq_idx must be (batch, seqlen) = ({b}, {lq}) with as many keys as queries; "
                             f"got seq_idx {tuple(seq_idx.shape)}, {k.shape[1]} keys")
        if not causal:
            raise ValueError("attention: packed documents (seq_idx) are for causal attention")
        if backend in ("flash_attn", "flash_attn_cute") and not torch.compiler.is_compiling():
            out = _varlen(q, k, v, seq_idx, backend)
            if out is not None:
                return out
        return _sdpa_packed(q, k, v, seq_idx)
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


# ---------------------------------------------------------------- packed documents


class VarlenInfo:
    """``cu_seqlens`` (n_segments + 1,) int32 over the flattened (b * l) tokens and the longest segment."""

    def __init__(self, seq_idx: torch.Tensor):
        b, l = seq_idx.shape
        new = torch.ones_like(seq_idx, dtype=torch.bool)
        new[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]  # every row starts a segment too
        starts = torch.nonzero(new.reshape(-1)).reshape(-1)
        end = torch.full((1,), b * l, dtype=starts.dtype, device=starts.device)
        self.cu_seqlens = torch.cat([starts, end]).to(torch.int32)
        self.max_seqlen = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())  # one host sync per batch


_VARLEN_CACHE: list = [None, None]  # (seq_idx, VarlenInfo): the layers of one forward share one seq_idx tensor


def varlen_info(seq_idx: torch.Tensor) -> VarlenInfo:
    if _VARLEN_CACHE[0] is not seq_idx:
        _VARLEN_CACHE[:] = [seq_idx, VarlenInfo(seq_idx)]
    return _VARLEN_CACHE[1]


_VARLEN_BROKEN: set = set()


def _varlen(q, k, v, seq_idx, backend: str):
    """flash-attn varlen over the flattened batch; None when this flash-attn has no usable varlen entry."""
    if backend in _VARLEN_BROKEN:
        return None
    mod = _fa4() if backend == "flash_attn_cute" else (_FA2 if _FA2 is not None else importlib.import_module("flash_attn"))
    fn = getattr(mod, "flash_attn_varlen_func", None)
    if fn is None:
        _VARLEN_BROKEN.add(backend)
        return None
    b, l, h, d = q.shape
    info = varlen_info(seq_idx)
    flat = [t.reshape(b * l, t.shape[2], t.shape[3]) for t in (q, k, v)]
    try:
        out = fn(*flat, cu_seqlens_q=info.cu_seqlens, cu_seqlens_k=info.cu_seqlens,
                 max_seqlen_q=info.max_seqlen, max_seqlen_k=info.max_seqlen, causal=True)
    except TypeError:  # another signature: the masked SDPA below is exact, only slower
        import warnings

        warnings.warn(f"attention: {backend} varlen call failed; packed documents use masked SDPA", stacklevel=2)
        _VARLEN_BROKEN.add(backend)
        return None
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(b, l, h, d)


def packed_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, 1, l, l) bool: query i sees key j when j <= i and both lie in one document."""
    l = seq_idx.shape[1]
    causal = torch.ones(l, l, dtype=torch.bool, device=seq_idx.device).tril()
    return ((seq_idx[:, :, None] == seq_idx[:, None, :]) & causal)[:, None]


def _sdpa_packed(q, k, v, seq_idx):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        kt = kt.repeat_interleave(groups, dim=1)
        vt = vt.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=packed_mask(seq_idx))
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
