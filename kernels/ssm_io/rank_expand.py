"""MIMO rank expansion of the scan's value: v (b, l, H, R, P) = x (b, l, H, P)[..., None, :] ⊙ W_x (H, R, P).

The reference is the layer's original broadcast; the Triton kernels write v per (token block, head)
and, backward, dx = Σ_r dv ⊙ W_x per row with dW_x summed in registers over a program's token
blocks.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._triton_utils import env_pair, param_grid, pow2, tl, token_block, token_rows, triton
from ._dispatch import check, io_backend

__all__ = ["rank_expand", "rank_expand_reference", "rank_expand_triton"]


def rank_expand_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (b, l, H, P), w (H, R, P) -> v (b, l, H, R, P) in x's dtype."""
    return (x[:, :, :, None] * w.to(x.dtype)).contiguous()


def rank_expand(x, w, *, backend: str = "auto"):
    """The MIMO rank projection of the scan's value: v (b, l, H, R, P) = x[..., None, :] ⊙ w."""
    check(x.dim() == 4 and w.dim() == 3 and w.shape[0] == x.shape[2] and w.shape[2] == x.shape[3],
          f"x must be (batch, seqlen, heads, headdim) and w (heads, rank, headdim); got {tuple(x.shape)} and {tuple(w.shape)}")
    if io_backend(x, backend) == "triton":
        return rank_expand_triton(x, w)
    return rank_expand_reference(x, w)


# ------------------------------------------------------------------ Triton

_EXPAND = env_pair("HYBRIDLAB_IO_EXPAND", "2048,4")  # (fp32 elements per (BT, R, P) tile, warps)


@triton.jit
def _expand_fwd_kernel(X, W, V, n_tok, sx_tok, H, R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr,
                       BP: tl.constexpr, BT: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    t3 = (pid * BT + tl.arange(0, BT))[:, None, None]
    r3 = tl.arange(0, RP)[None, :, None]
    c3 = tl.arange(0, BP)[None, None, :]
    x = tl.load(X + t3 * sx_tok + h * P + c3, mask=(t3 < n_tok) & (c3 < P), other=0.0).to(tl.float32)
    w = tl.load(W + (h * R + r3) * P + c3, mask=(r3 < R) & (c3 < P), other=0.0).to(tl.float32)
    tl.store(V + ((t3 * H + h) * R + r3) * P + c3, (x * w).to(V.dtype.element_ty), mask=(t3 < n_tok) & (r3 < R) & (c3 < P))


@triton.jit
def _expand_bwd_kernel(X, W, DV, DX, DW_PART, n_tok, sx_tok, H, ITERS, R: tl.constexpr, P: tl.constexpr,
                       RP: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr):
    """dx = Σ_r dv·w per row; dw summed elementwise over this program's ITERS token blocks."""
    pid, h = tl.program_id(0), tl.program_id(1)
    r3 = tl.arange(0, RP)[None, :, None]
    c3 = tl.arange(0, BP)[None, None, :]
    w = tl.load(W + (h * R + r3) * P + c3, mask=(r3 < R) & (c3 < P), other=0.0).to(tl.float32)
    acc = tl.zeros((BT, RP, BP), dtype=tl.float32)
    c2 = tl.arange(0, BP)[None, :]
    for it in range(ITERS):
        t0 = (pid * ITERS + it) * BT
        t3 = (t0 + tl.arange(0, BT))[:, None, None]
        dv = tl.load(DV + ((t3 * H + h) * R + r3) * P + c3, mask=(t3 < n_tok) & (r3 < R) & (c3 < P), other=0.0).to(tl.float32)
        x = tl.load(X + t3 * sx_tok + h * P + c3, mask=(t3 < n_tok) & (c3 < P), other=0.0).to(tl.float32)
        acc += dv * x
        t2 = (t0 + tl.arange(0, BT))[:, None]
        tl.store(DX + (t2 * H + h) * P + c2, tl.sum(dv * w, axis=1).to(DX.dtype.element_ty), mask=(t2 < n_tok) & (c2 < P))
    r2 = tl.arange(0, RP)[:, None]
    tl.store(DW_PART + ((pid * H + h) * R + r2) * P + c2, tl.sum(acc, axis=0), mask=(r2 < R) & (c2 < P))


def _expand_meta(x, w):
    b, l, h, p = x.shape
    r = w.shape[1]
    RP, BP = pow2(r), max(pow2(p), 16)
    return b, l, h, p, r, RP, BP, token_block(RP, BP, _EXPAND[0])


@torch.library.custom_op("hybridlab::rank_expand", mutates_args=())
def _expand_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (b, l, H, P) (token rows: any token stride), w (H, R, P) -> v = x ⊙ w (b, l, H, R, P) in x's dtype."""
    b, l, h, p, r, RP, BP, BT = _expand_meta(x, w)
    v = torch.empty(b, l, h, r, p, device=x.device, dtype=x.dtype)
    _expand_fwd_kernel[(triton.cdiv(b * l, BT), h)](x, w, v, b * l, x.stride(1), h, R=r, P=p, RP=RP, BP=BP, BT=BT,
                                                    num_warps=_EXPAND[1])
    return v


@_expand_op.register_fake
def _(x, w):
    b, l, h, p = x.shape
    return x.new_empty(b, l, h, w.shape[1], p)


@torch.library.custom_op("hybridlab::rank_expand_bwd", mutates_args=())
def _expand_bwd_op(x: torch.Tensor, w: torch.Tensor, dv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    b, l, h, p, r, RP, BP, BT = _expand_meta(x, w)
    progs, iters = param_grid(triton.cdiv(b * l, BT), h)
    dx = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    dw = torch.empty(progs, h, r, p, device=x.device, dtype=torch.float32)
    _expand_bwd_kernel[(progs, h)](x, w, dv.contiguous(), dx, dw, b * l, x.stride(1), h, iters,
                                   R=r, P=p, RP=RP, BP=BP, BT=BT, num_warps=_EXPAND[1])
    return dx, dw.sum(0).to(w.dtype)


@_expand_bwd_op.register_fake
def _(x, w, dv):
    return x.new_empty(x.shape), torch.empty_like(w)


def _expand_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expand_backward(ctx, dv):
    return tuple(torch.ops.hybridlab.rank_expand_bwd(*ctx.saved_tensors, dv))


torch.library.register_autograd("hybridlab::rank_expand", _expand_backward, setup_context=_expand_setup)


def rank_expand_triton(x, w):
    return torch.ops.hybridlab.rank_expand(token_rows(x), w.contiguous())
