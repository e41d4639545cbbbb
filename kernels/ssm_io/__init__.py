"""The Mamba-3 scan's input and output stages, fused: one contract each, a reference and a Triton kernel.

    qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps) -> (q, k)
        B, C (b, l, R, N) shared by the heads -> RMSNorm, + per-head bias (H, R, N),
        rotate dims (i, i + A) by phase (b, l, H, A) -> q, k (b, l, H, R, N)
    scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation) -> (dt, log_alpha, beta, gamma)
        the scan's per-(token, head) scalars from the raw projections (b, l, H); lam_raw None: Euler;
        A = -max(f(a_raw [+ a_bias]), a_floor), f = heavy_tail (official) or softplus; a_bias None: no bias
    cumulative_phase(theta, dt, seq_idx=None) -> phase
        θ (b, l, A) shared by the heads, dt (b, l, H) -> φ (b, l, H, A) = Σ_{s<=t} θ_s·dt_s (fp32);
        with seq_idx (b, l) (packed documents) the sum restarts at 0 at every document start
    rank_expand(x, mimo_x) -> v
        x (b, l, H, P), mimo_x (H, R, P) -> the scan's value v = x ⊙ mimo_x (b, l, H, R, P)
    gated_output(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps) -> (b, l, H, P)
        y (b, l, H, R, P) from the scan; x, z (b, l, H, P) ->
        Σ_r mimo_o ⊙ norm(y + D·x⊙mimo_x) ⊙ silu(z ⊙ mimo_z)

``None`` turns a stage off (no norm, no bias, no rotary, SISO). Backends:
``torch`` (``reference.py``, the layer's original op chain) and ``triton``
(``triton.py``: one kernel each way, fp32 inside, parameter gradients
included). ``auto`` picks triton on CUDA (or under TRITON_INTERPRET=1) for
16/32-bit floats, torch otherwise (float64 gradcheck runs on the reference).
"""

from __future__ import annotations

import importlib
import os

import torch

from .._deps import has_module
from .reference import (
    A_ACTIVATIONS,
    cumulative_phase_reference,
    gated_output_reference,
    qk_prep_reference,
    rank_expand_reference,
    scan_coefficients_reference,
)

__all__ = ["scan_coefficients", "cumulative_phase", "qk_prep", "rank_expand", "gated_output", "io_backend", "IO_BACKENDS"]

IO_BACKENDS = ("auto", "torch", "triton")


def _triton_ok(t: torch.Tensor) -> bool:
    if not has_module("triton") or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def io_backend(t: torch.Tensor, backend: str = "auto") -> str:
    """The backend these stages run on for tensors like ``t``."""
    if backend not in IO_BACKENDS:
        raise ValueError(f"ssm_io: unknown backend {backend!r}; choose one of {', '.join(IO_BACKENDS)}")
    if backend == "auto":
        return "triton" if _triton_ok(t) else "torch"
    if backend == "triton" and not _triton_ok(t):
        raise RuntimeError("ssm_io: backend 'triton' needs CUDA (or TRITON_INTERPRET=1), triton, and fp16/bf16/fp32 tensors")
    return backend


def _kernels():
    return importlib.import_module(".triton", __name__)


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"ssm_io: {msg}")


def scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor: float, valid=None, *,
                      activation: str = "heavy_tail", backend: str = "auto"):
    """dt, log α, β, γ (float32, (b, l, H)) from the raw (b, l, H) projections; ``valid`` (b, l) bool or None.

    ``activation`` turns the A projection into |A|: ``heavy_tail`` (the official layer) or ``softplus``;
    ``a_bias`` (H,) is added before it, or None.
    """
    _check(dt_raw.dim() == 3 and a_raw.shape == dt_raw.shape and (lam_raw is None or lam_raw.shape == dt_raw.shape),
           f"dt_raw, a_raw and lam_raw must share one (batch, seqlen, heads) shape; got {tuple(dt_raw.shape)}, {tuple(a_raw.shape)}"
           f" and {tuple(lam_raw.shape) if lam_raw is not None else None}")
    h = dt_raw.shape[-1]
    _check(dt_bias.shape == (h,) and (a_bias is None or a_bias.shape == (h,)), f"dt_bias and a_bias must be ({h},)")
    _check(valid is None or valid.shape == dt_raw.shape[:2], f"valid must be {tuple(dt_raw.shape[:2])}")
    _check(activation in A_ACTIVATIONS, f"unknown A activation {activation!r}; choose one of {', '.join(A_ACTIVATIONS)}")
    if io_backend(dt_raw, backend) == "triton":
        return _kernels().scan_coefficients_triton(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation)
    return scan_coefficients_reference(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation)


def cumulative_phase(theta, dt, *, seq_idx=None, backend: str = "auto"):
    """The data-dependent rotary's phase, φ (b, l, H, A) float32 (any strides; qk_prep takes it as is).

    ``seq_idx`` (b, l) int, nondecreasing per row: the phase restarts at 0 at each document start."""
    _check(theta.dim() == 3 and dt.dim() == 3 and theta.shape[:2] == dt.shape[:2],
           f"theta must be (batch, seqlen, A) and dt (batch, seqlen, heads); got {tuple(theta.shape)} and {tuple(dt.shape)}")
    _check(seq_idx is None or (isinstance(seq_idx, torch.Tensor) and seq_idx.shape == theta.shape[:2]
                               and not seq_idx.dtype.is_floating_point),
           f"seq_idx must be a (batch, seqlen) = {tuple(theta.shape[:2])} integer tensor")
    if io_backend(theta, backend) == "triton":
        packed = {"seq_idx": seq_idx} if seq_idx is not None else {}  # the Triton kernel takes it as a keyword
        return _kernels().cumulative_phase_triton(theta, dt, **packed)
    return cumulative_phase_reference(theta, dt, seq_idx)


def qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int, eps: float, *, backend: str = "auto"):
    """B/C RMSNorm + head bias + data-dependent rotary -> (q, k), each (b, l, H, R, N)."""
    _check(B.dim() == 4 and C.shape == B.shape, f"B and C must both be (batch, seqlen, rank, d_state); got {tuple(B.shape)} and {tuple(C.shape)}")
    b, l, r, n = B.shape
    for name, w in (("b_norm", b_norm), ("c_norm", c_norm)):
        _check(w is None or w.shape == (n,), f"{name} must be ({n},); got {tuple(w.shape) if w is not None else None}")
    for name, w in (("b_bias", b_bias), ("c_bias", c_bias)):
        _check(w is None or w.shape == (heads, r, n), f"{name} must be ({heads}, {r}, {n}); got {tuple(w.shape) if w is not None else None}")
    if phase is not None:
        _check(phase.dim() == 4 and phase.shape[:3] == (b, l, heads) and 2 * phase.shape[3] <= n,
               f"phase must be ({b}, {l}, {heads}, A) with 2A <= {n}; got {tuple(phase.shape)}")
    if io_backend(B, backend) == "triton":
        return _kernels().qk_prep_triton(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps)
    return qk_prep_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps)


def rank_expand(x, w, *, backend: str = "auto"):
    """The MIMO rank projection of the scan's value: v (b, l, H, R, P) = x[..., None, :] ⊙ w."""
    _check(x.dim() == 4 and w.dim() == 3 and w.shape[0] == x.shape[2] and w.shape[2] == x.shape[3],
           f"x must be (batch, seqlen, heads, headdim) and w (heads, rank, headdim); got {tuple(x.shape)} and {tuple(w.shape)}")
    if io_backend(x, backend) == "triton":
        return _kernels().rank_expand_triton(x, w)
    return rank_expand_reference(x, w)


def gated_output(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps: float, *, backend: str = "auto"):
    """D skip + pre-gate grouped RMSNorm + SiLU gate + rank combination -> (b, l, H, P)."""
    _check(y.dim() == 5, f"y must be (batch, seqlen, heads, rank, headdim); got {tuple(y.shape)}")
    b, l, h, r, p = y.shape
    for name, t in (("x", x), ("z", z)):
        _check(t.numel() == b * l * h * p and t.shape[:2] == (b, l), f"{name} must be ({b}, {l}, {h}, {p}); got {tuple(t.shape)}")
    _check(D.shape == (h,), f"D must be ({h},); got {tuple(D.shape)}")
    _check(norm_w is None or norm_w.shape == (h, p), f"norm_w must be ({h}, {p}); got {tuple(norm_w.shape) if norm_w is not None else None}")
    mimo = (mimo_x, mimo_z, mimo_o)
    _check(all(m is None for m in mimo) or all(m is not None and m.shape == (h, r, p) for m in mimo),
           f"mimo_x/z/o must all be None (SISO) or all ({h}, {r}, {p})")
    _check(mimo_x is not None or r == 1, f"rank {r} needs the MIMO projections mimo_x/z/o")
    if io_backend(y, backend) == "triton":
        return _kernels().gated_output_triton(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps)
    return gated_output_reference(y, x.reshape(b, l, h, p), z.reshape(b, l, h, p), D, norm_w, mimo_x, mimo_z, mimo_o, eps)
