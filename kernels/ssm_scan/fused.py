"""The scan with the Mamba-3 layer's q/k/v preparation inside (MIMO and SISO): one op, a reference, Triton kernels.

    ssm_scan_fused(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma,
                   state=None, *, eps, seq_idx=None, cu_seqlens=None, backend="auto", chunk_size=None)
        -> (y (b, l, H, R, P), ScanState)

      B, C (b, l, R, N) shared by the heads; phase (b, l, H, A) fp32 or None; b_norm, c_norm (N,) or
      None; b_bias, c_bias (H, R, N) or None; x (b, l, H, P); mimo_x (H, R, P), or None for SISO (R = 1);
      log_alpha, beta, gamma (b, l, H); state as for ``ssm_scan`` (its k, v are post-preparation).

It computes exactly ``ssm_scan(*qk_prep(B, C, phase, ...), rank_expand(x, mimo_x), log_alpha, beta,
gamma, state)`` — that composition of the references is ``ssm_scan_fused_reference``, the torch
backend — but the ``triton`` backend (``triton_fused.py``) builds q, k, v in registers, so the
(b, l, H, R, N) / (b, l, H, R, P) tensors of the unfused chain never reach memory, forward or
backward. Packed documents (``seq_idx`` / ``cu_seqlens``) as for ``ssm_scan``. ``auto`` picks
triton on CUDA (or under TRITON_INTERPRET=1) when the kernels take the sizes, else torch.

Where the fused kernels cannot launch on the GPU at hand for a shape class (dtype, rank, d_state,
headdim, heads, angles, which optional inputs, chunk; e.g. more shared memory than the device has),
the triton backend runs the unfused Triton chain qk_prep -> rank_expand -> ssm_scan for that class
instead, with one RuntimeWarning naming it. Decided inside the op (nothing of it is traced, so no graph
break under torch.compile) the first time the class is seen: ``triton_fused.launch_check`` compiles the
class's kernels and checks their shared memory / registers against the device; behind it, an
OutOfResources (or compile error) raised when the fused kernels are launched also refuses the class and
reruns the call on the unfused chain (nothing was written yet). HYBRIDLAB_SSM_FUSED_MAX_SHARED=BYTES
lowers the limit checked against (to exercise the fallback). The kernels' launch configs per (dtype,
d_state, rank, headdim) are ``triton_fused.fused_config``; ``python -m
hybridlab.kernels.bench.triton_resources`` prints their shared memory, registers and spills for Hopper,
compiled on any machine (and the driver's figures on a GPU).
"""

from __future__ import annotations

import importlib
import os

import torch

from .._triton_utils import KERNEL_DTYPES, triton_usable
from ..ssm_io.qk_prep import check_qk_args, qk_prep_reference
from ..ssm_io.rank_expand import rank_expand_reference
from . import _TRITON_FILE, _packed_args, ssm_scan, triton_supports  # the package defines these before importing us

# imported now, not inside a traced call: it registers the hybridlab::ssm_scan_fused ops
_kernels = importlib.import_module(".triton_fused", __package__) if _TRITON_FILE else None

__all__ = ["ssm_scan_fused", "ssm_scan_fused_reference", "FUSED_BACKENDS", "fused_supported"]

FUSED_BACKENDS = ("auto", "torch", "triton")

# HYBRIDLAB_SSM_FUSED=0 turns the Triton fused path off (auto then takes torch here, and the Mamba-3 layer the
# unfused chain qk_prep -> rank_expand -> ssm_scan): an escape hatch and an A/B switch, read once at import.
# Unset, 16-bit inputs on a GPU also take the unfused chain, because it is faster there: on one H200 (2026-12-01,
# triton 3.6, hybrid-1in4-440m, seq 2048 x 8, bf16) a training step took 372 ms unfused and 600 ms fused (the
# fused backward chunk kernel 16.4 ms a layer against ~6 ms for the unfused backward kernels together: it rebuilds
# q/k per head from B/C in every d_state block). The fused kernels are correct in 16-bit too (since the 16-wide
# backward blocks, triton_fused.fused_config); HYBRIDLAB_SSM_FUSED=1 forces them. fp32 takes them by default.
_SWITCH = os.environ.get("HYBRIDLAB_SSM_FUSED", "")
ENABLED = _SWITCH != "0"
FORCED = _SWITCH == "1"


def ssm_scan_fused_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma, state=None, *,
                             eps: float, seq_idx=None, chunk_size=None, scan_backend: str = "torch"):
    """The unfused chain: qk_prep -> rank_expand -> ssm_scan, all on the torch references."""
    q, k = qk_prep_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, x.shape[2], eps)
    v = rank_expand_reference(x, mimo_x) if mimo_x is not None else x[:, :, :, None]
    return ssm_scan(q, k, v, log_alpha, beta, gamma, state, backend=scan_backend, chunk_size=chunk_size, seq_idx=seq_idx)


def gpu_dtype_refusal(is_cuda: bool, dtype: torch.dtype, forced: bool) -> str | None:
    """Why the fused kernels are not used for this dtype on this device by default (see FORCED), or None."""
    if is_cuda and dtype != torch.float32 and not forced:
        return (f"{dtype} on a GPU: the unfused chain is faster there (measured on an H200); "
                "HYBRIDLAB_SSM_FUSED=1 forces the fused kernels")
    return None


def fused_supported(B, x, mimo_x, chunk_size=None) -> tuple[bool, str]:
    """Whether the Triton kernels take these tensors (device, dtype, sizes), and why not."""
    if not ENABLED:
        return False, "off (HYBRIDLAB_SSM_FUSED=0)"
    if not (_TRITON_FILE and triton_usable(B)):
        return False, "needs CUDA (or TRITON_INTERPRET=1) and triton"
    if B.dtype not in KERNEL_DTYPES or x.dtype != B.dtype:
        return False, f"B/C/x must share one fp16/bf16/fp32 dtype; got {B.dtype} and {x.dtype}"
    why = gpu_dtype_refusal(B.is_cuda, B.dtype, FORCED)
    if why:
        return False, why
    r = B.shape[2]
    if r > 16:
        return False, f"rank {r} > 16"
    return triton_supports(x.shape[-1], B.shape[-1], r, chunk_size)


def _check(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma):
    if x.dim() != 4:
        raise ValueError(f"ssm_scan_fused: x must be (batch, seqlen, heads, headdim); got {tuple(x.shape)}")
    b, l, nh, p = x.shape
    check_qk_args(B, C, phase, b_norm, c_norm, b_bias, c_bias, nh)
    if B.shape[:2] != (b, l):
        raise ValueError(f"ssm_scan_fused: B/C must be ({b}, {l}, rank, d_state) like x; got {tuple(B.shape)}")
    r = B.shape[2]
    if mimo_x is None and r != 1:
        raise ValueError(f"ssm_scan_fused: rank {r} needs mimo_x (heads, rank, headdim)")
    if mimo_x is not None and tuple(mimo_x.shape) != (nh, r, p):
        raise ValueError(f"ssm_scan_fused: mimo_x must be ({nh}, {r}, {p}); got {tuple(mimo_x.shape)}")
    for name, t in (("log_alpha", log_alpha), ("beta", beta), ("gamma", gamma)):
        if t.shape != (b, l, nh):
            raise ValueError(f"ssm_scan_fused: {name} must be (batch, seqlen, heads) = ({b}, {l}, {nh}); got {tuple(t.shape)}")


def ssm_scan_fused(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma, state=None, *,
                   eps: float, seq_idx=None, cu_seqlens=None, backend: str = "auto", chunk_size: int | None = None,
                   last_kv: bool = True):
    """The scan of the Mamba-3 layer from its projections; returns ``(y, ScanState(h, k_last, v_last))``.

    ``last_kv=False``: the returned state's k, v are None (a training step that drops the state skips
    preparing the last position's k, v)."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"ssm_scan_fused: unknown backend {backend!r}; choose one of {', '.join(FUSED_BACKENDS)}")
    _check(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma)
    seq_idx = _packed_args(seq_idx, cu_seqlens, x)
    if backend == "auto":
        backend = "triton" if fused_supported(B, x, mimo_x, chunk_size)[0] else "torch"
    if backend == "triton":
        ok, why = fused_supported(B, x, mimo_x, chunk_size)
        if not ok:
            raise RuntimeError(f"ssm_scan_fused: backend 'triton': {why}")
        return _kernels.ssm_scan_fused_triton(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma,
                                              state, eps=eps, seq_idx=seq_idx, chunk_size=chunk_size, last_kv=last_kv)
    y, final = ssm_scan_fused_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma, state,
                                        eps=eps, seq_idx=seq_idx, chunk_size=chunk_size)
    return y, final if last_kv else final._replace(k=None, v=None)
