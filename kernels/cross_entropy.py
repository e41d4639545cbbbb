"""The LM head and its cross-entropy in one op that never holds the (tokens x vocab) fp32 logits.

    linear_cross_entropy(hidden (T, d), weight (V, d), targets (T,), ignore_index=-100,
                         chunk_size=None, reduction="mean") -> loss

equals ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)`` (``reduction``
"sum" gives the summed loss, "sum_and_count" the pair (sum, number of counted targets): what a
trainer that all-reduces needs). Leading dims of ``hidden`` / ``targets`` are flattened.

It walks the tokens in chunks of ``chunk_size`` (default: about 2^26 logits, 256 MB in fp32, per
chunk): each chunk's logits come from one matmul in the inputs' dtype (bf16 under bf16 autocast or
with bf16 inputs, fp32 accumulation inside the GEMM), the log-sum-exp and the picked logit are taken
in fp32, and only the per-token log-sum-exp (T,) fp32 is kept for the backward, which recomputes
each chunk's logits, forms softmax - onehot in place and does the two matmuls (d hidden; d weight
summed over chunks in fp32). Peak extra memory is one chunk's logits, not T x V.

Forward and backward are ``hybridlab::`` torch.library ops (one graph node each under
``torch.compile``; plain torch inside, so they run on every device).
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["linear_cross_entropy", "default_ce_chunk"]

REDUCTIONS = ("mean", "sum", "sum_and_count")


def default_ce_chunk(vocab: int) -> int:
    """Tokens per chunk: ~2^26 logits (256 MB of fp32) per chunk, a multiple of 128, at least 128."""
    return max(128, (2**26 // max(vocab, 1)) // 128 * 128)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32  # float64 stays exact (gradcheck)


def _chunks(T: int, chunk: int):
    return [(s, min(s + chunk, T)) for s in range(0, T, chunk)]


@torch.library.custom_op("hybridlab::linear_cross_entropy", mutates_args=())
def _lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed loss, counted targets, log-sum-exp per token), all fp32 (fp64 for fp64 inputs)."""
    T, acc = hidden.shape[0], _acc(hidden)
    lse = torch.empty(T, device=hidden.device, dtype=acc)
    total = torch.zeros((), device=hidden.device, dtype=acc)
    for s, e in _chunks(T, chunk_size):
        logits = (hidden[s:e] @ weight.t()).to(acc)  # (C, V): the only large temporary
        lse[s:e] = torch.logsumexp(logits, dim=-1)
        tgt = targets[s:e]
        keep = tgt != ignore_index
        picked = logits.gather(1, torch.where(keep, tgt, 0)[:, None])[:, 0]
        total += torch.where(keep, lse[s:e] - picked, 0.0).sum()
        del logits
    count = (targets != ignore_index).sum().to(acc)
    return total, count, lse


@_lce_fwd.register_fake
def _(hidden, weight, targets, ignore_index, chunk_size):
    acc = _acc(hidden)
    return hidden.new_empty((), dtype=acc), hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


@torch.library.custom_op("hybridlab::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_sum: torch.Tensor,
             ignore_index: int, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """d hidden, d weight of ``grad_sum`` x the summed loss (logits recomputed chunk by chunk)."""
    T = hidden.shape[0]
    dh = torch.empty_like(hidden)
    acc = _acc(hidden)
    dw = torch.zeros(weight.shape, device=weight.device, dtype=acc)
    g = grad_sum.to(acc)
    for s, e in _chunks(T, chunk_size):
        h = hidden[s:e]
        probs = (h @ weight.t()).to(acc)
        probs.sub_(lse[s:e, None]).exp_()  # softmax, in place
        tgt = targets[s:e]
        keep = tgt != ignore_index
        rows = torch.arange(e - s, device=hidden.device)
        probs[rows, torch.where(keep, tgt, 0)] -= keep.to(probs.dtype)  # - onehot (only where counted)
        probs.mul_((keep.to(probs.dtype) * g)[:, None])
        dlogits = probs.to(hidden.dtype)
        del probs
        dh[s:e] = dlogits @ weight
        dw += (dlogits.t() @ h).to(acc)
    return dh, dw.to(weight.dtype)


@_lce_bwd.register_fake
def _(hidden, weight, targets, lse, grad_sum, ignore_index, chunk_size):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _lce_setup(ctx, inputs, output):
    hidden, weight, targets, ignore_index, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, targets, output[2])
    ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
    ctx.mark_non_differentiable(output[1], output[2])


def _lce_backward(ctx, grad_sum, _grad_count, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    if grad_sum is None:
        return None, None, None, None, None
    dh, dw = torch.ops.hybridlab.linear_cross_entropy_bwd(hidden, weight, targets, lse, grad_sum, ctx.ignore_index,
                                                          ctx.chunk_size)
    return dh, dw, None, None, None


torch.library.register_autograd("hybridlab::linear_cross_entropy", _lce_backward, setup_context=_lce_setup)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_size: int | None = None, reduction: str = "mean"):
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, chunked (see the module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (..., d) and weight (vocab, d) must share d; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1] or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integer class ids of shape {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(targets.shape)} {targets.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1; got {chunk_size}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):  # the op runs below autocast: cast as autocast would
        dtype = torch.get_autocast_dtype(hidden.device.type)
    elif weight.dtype != dtype:
        dtype = torch.promote_types(dtype, weight.dtype)
    total, count, _ = torch.ops.hybridlab.linear_cross_entropy(
        hidden.to(dtype), weight.to(dtype), targets, int(ignore_index), int(chunk_size or default_ce_chunk(weight.shape[0]))
    )
    if reduction == "sum":
        return total
    if reduction == "sum_and_count":
        return total, count
    return total / count.clamp(min=1.0)
