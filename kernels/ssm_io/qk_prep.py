"""B/C to the scan's per-head q/k: RMSNorm over d_state, the head-specific bias, the data-dependent rotary.

    qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps) -> (q, k)
        B, C (b, l, R, N) shared by the heads -> RMSNorm, + per-head bias (H, R, N),
        rotate dims (i, i + A) by phase (b, l, H, A) -> q (from C), k (from B), each (b, l, H, R, N)

``None`` turns a stage off (no norm, no bias, no rotary). The reference rounds to B's dtype after
each step, as the layer always has. The Triton kernel holds a block of BT tokens' normalized B (or
C), (BT, R, N), in registers and walks the heads, writing each head's biased and rotated copy: B/C
is read once, not H times, and the backward sums the heads' gradients in registers (no atomics).
Columns are held as three tiles — the rotation pairs' halves [0, A), [A, 2A) and the rest — so
rotating is elementwise and sin/cos are computed once per angle.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._triton_utils import env_pair, param_grid, pow2, tl, token_block, token_rows, triton
from ..norm_rotary import apply_rotary, rms_norm
from ._dispatch import check, io_backend, shape_of

__all__ = ["qk_prep", "qk_prep_reference", "qk_prep_triton"]


def qk_prep_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int, eps: float):
    """(B, C) (b, l, R, N) -> (q, k) (b, l, H, R, N), in B's dtype.

    ``phase`` (b, l, H, A) float32 or None (no rotary); ``*_norm`` (N,) or None
    (no RMSNorm); ``*_bias`` (H, R, N) or None (no bias).
    """
    b, l, r, n = B.shape
    out = []
    for X, w, bias in ((C, c_norm, c_bias), (B, b_norm, b_bias)):
        X = X.reshape(b, l, 1, r, n)
        if w is not None:
            X = rms_norm(X, w, eps)
        X = X + bias.to(X.dtype) if bias is not None else X.expand(b, l, heads, r, n)
        if phase is not None and phase.shape[-1]:
            X = apply_rotary(X, phase[:, :, :, None, :])
        out.append(X.contiguous())
    return out[0], out[1]


def check_qk_args(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int) -> None:
    """The shapes qk_prep (and the fused scan, which does the same inside) accepts; ValueError otherwise."""
    check(B.dim() == 4 and C.shape == B.shape, f"B and C must both be (batch, seqlen, rank, d_state); got {tuple(B.shape)} and {tuple(C.shape)}")
    b, l, r, n = B.shape
    for name, w in (("b_norm", b_norm), ("c_norm", c_norm)):
        check(w is None or w.shape == (n,), f"{name} must be ({n},); got {shape_of(w)}")
    for name, w in (("b_bias", b_bias), ("c_bias", c_bias)):
        check(w is None or w.shape == (heads, r, n), f"{name} must be ({heads}, {r}, {n}); got {shape_of(w)}")
    if phase is not None:
        check(phase.dim() == 4 and phase.shape[:3] == (b, l, heads) and 2 * phase.shape[3] <= n,
              f"phase must be ({b}, {l}, {heads}, A) with 2A <= {n}; got {tuple(phase.shape)}")


def qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int, eps: float, *, backend: str = "auto"):
    """B/C RMSNorm + head bias + data-dependent rotary -> (q, k), each (b, l, H, R, N)."""
    check_qk_args(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads)
    if io_backend(B, backend) == "triton":
        return qk_prep_triton(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps)
    return qk_prep_reference(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps)


# ------------------------------------------------------------------ Triton

# Per kernel: (fp32 elements per (BT, R, cols) tile, warps). Sized so that the tiles each kernel keeps
# live fit in registers (ptxas -v for sm_90a: no spills at the bench shapes); overridable for tuning.
_QK_FWD = env_pair("HYBRIDLAB_IO_QK_FWD", "2048,4")
_QK_BWD = env_pair("HYBRIDLAB_IO_QK_BWD", "2048,4")
_QK_DBIAS = env_pair("HYBRIDLAB_IO_QK_DBIAS", "2048,4")

# Columns of a (BT, R, N) block are held as three tiles: the rotation pairs' halves lo = [0, A) and
# hi = [A, 2A), and the unrotated rest [2A, N). Rotating is then elementwise between lo and hi, and
# sin/cos are computed once per angle, not per column.


@triton.jit
def _cols3(base, mask, a3, e3, A: tl.constexpr, N: tl.constexpr):
    """Load [0, A), [A, 2A) and [2A, N) of the rows at ``base`` as three fp32 tiles."""
    lo = tl.load(base + a3, mask=mask & (a3 < A), other=0.0).to(tl.float32)
    hi = tl.load(base + A + a3, mask=mask & (a3 < A), other=0.0).to(tl.float32)
    rest = tl.load(base + e3, mask=mask & (e3 < N), other=0.0).to(tl.float32)
    return lo, hi, rest


@triton.jit
def _store3(base, mask, a3, e3, lo, hi, rest, A: tl.constexpr, N: tl.constexpr):
    ty = base.dtype.element_ty
    tl.store(base + a3, lo.to(ty), mask=mask & (a3 < A))
    tl.store(base + A + a3, hi.to(ty), mask=mask & (a3 < A))
    tl.store(base + e3, rest.to(ty), mask=mask & (e3 < N))


@triton.jit
def _normed_rows(X, W, t3, r3, a3, e3, n_tok, stride_tok, eps,
                 R: tl.constexpr, N: tl.constexpr, A: tl.constexpr, HAS_NORM: tl.constexpr):
    """x (three tiles), rstd (BT, RP, 1) and the normalized x·rstd·w (three tiles)."""
    m = (t3 < n_tok) & (r3 < R)
    lo, hi, rest = _cols3(X + t3 * stride_tok + r3 * N, m, a3, e3, A, N)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(lo * lo, axis=2) + tl.sum(hi * hi, axis=2) + tl.sum(rest * rest, axis=2)) / N + eps)[:, :, None]
        w_lo, w_hi, w_rest = _cols3(W, True, a3, e3, A, N)
        return lo, hi, rest, rstd, lo * rstd * w_lo, hi * rstd * w_hi, rest * rstd * w_rest
    else:
        return lo, hi, rest, lo, lo, hi, rest


@triton.jit
def _qk_tiles(pid, n_tok, R: tl.constexpr, A: tl.constexpr, RP: tl.constexpr, BA: tl.constexpr, BR: tl.constexpr,
              BT: tl.constexpr):
    """Index tiles of one token block: tokens (BT, 1, 1), ranks (1, RP, 1), pair columns [0, A) and the
    rest's columns [2A, ...) (1, 1, ·), and the (token, rank) mask."""
    t3 = (pid * BT + tl.arange(0, BT))[:, None, None]
    r3 = tl.arange(0, RP)[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    e3 = 2 * A + tl.arange(0, BR)[None, None, :]
    return t3, r3, a3, e3, (t3 < n_tok) & (r3 < R)


@triton.jit
def _head_inputs(lo, hi, rest, BIAS, ph_ptr, h, t3, r3, a3, e3, n_tok,
                 R: tl.constexpr, N: tl.constexpr, A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Head h's pre-rotation rows (normalized x + its bias, three tiles) and the cos/sin of its angles."""
    if HAS_BIAS:
        b_lo, b_hi, b_rest = _cols3(BIAS + (h * R + r3) * N, r3 < R, a3, e3, A, N)
        lo, hi, rest = lo + b_lo, hi + b_hi, rest + b_rest
    ang = tl.load(ph_ptr, mask=(t3 < n_tok) & (a3 < A), other=0.0)
    return lo, hi, rest, tl.cos(ang), tl.sin(ang)


@triton.jit
def _qk_fwd_kernel(
    X, W, BIAS, PH, OUT, n_tok, stride_tok, H, eps, L, sp_b, sp_l, sp_h, sp_a,
    R: tl.constexpr, N: tl.constexpr, A: tl.constexpr, RP: tl.constexpr, BA: tl.constexpr, BR: tl.constexpr,
    BT: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    t3, r3, a3, e3, m = _qk_tiles(pid, n_tok, R, A, RP, BA, BR, BT)
    ph_tok = (t3 // L) * sp_b + (t3 % L) * sp_l + a3 * sp_a  # phase (b, l, H, A) may be strided
    _x, _y, _z, _r, lo, hi, rest = _normed_rows(X, W, t3, r3, a3, e3, n_tok, stride_tok, eps, R, N, A, HAS_NORM)
    for h in range(H):
        a_lo, a_hi, a_rest, cs, sn = _head_inputs(lo, hi, rest, BIAS, PH + ph_tok + h * sp_h, h, t3, r3, a3, e3, n_tok,
                                                  R, N, A, HAS_BIAS)
        _store3(OUT + ((t3 * H + h) * R + r3) * N, m, a3, e3, a_lo * cs - a_hi * sn, a_lo * sn + a_hi * cs, a_rest, A, N)


@triton.jit
def _qk_bwd_kernel(
    X, W, BIAS, PH, DOUT, DX, DW_PART, DPH, n_tok, stride_tok, H, eps, L, sp_b, sp_l, sp_h, sp_a,
    R: tl.constexpr, N: tl.constexpr, A: tl.constexpr, RP: tl.constexpr, BA: tl.constexpr, BR: tl.constexpr,
    BT: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DPH: tl.constexpr,
):
    """d(out) per head -> dX (heads summed in registers), dW partials and dphase (dBias: _qk_dbias_kernel).

    With a = norm(x) + bias and out = rot_φ(a): da = rot_{-φ}(dout) and, per pair,
    dφ = Σ_r dout_hi·out_lo − dout_lo·out_hi.
    """
    pid = tl.program_id(0)
    t3, r3, a3, e3, m = _qk_tiles(pid, n_tok, R, A, RP, BA, BR, BT)
    x_lo, x_hi, x_rest, rstd, lo, hi, rest = _normed_rows(X, W, t3, r3, a3, e3, n_tok, stride_tok, eps, R, N, A, HAS_NORM)
    d_lo = tl.zeros((BT, RP, BA), dtype=tl.float32)
    d_hi = tl.zeros((BT, RP, BA), dtype=tl.float32)
    d_rest = tl.zeros((BT, RP, BR), dtype=tl.float32)
    a2 = tl.arange(0, BA)[None, :]
    t2 = (pid * BT + tl.arange(0, BT))[:, None]
    ph_tok = (t3 // L) * sp_b + (t3 % L) * sp_l + a3 * sp_a
    dph_tok = (t2 // L) * sp_b + (t2 % L) * sp_l + a2 * sp_a  # dphase has phase's strides
    for h in range(H):
        a_lo, a_hi, a_rest, cs, sn = _head_inputs(lo, hi, rest, BIAS, PH + ph_tok + h * sp_h, h, t3, r3, a3, e3, n_tok,
                                                  R, N, A, HAS_BIAS)
        do_lo, do_hi, do_rest = _cols3(DOUT + ((t3 * H + h) * R + r3) * N, m, a3, e3, A, N)
        if A > 0:
            dph = tl.sum(do_hi * (a_lo * cs - a_hi * sn) - do_lo * (a_lo * sn + a_hi * cs), axis=1)  # (BT, BA)
            pptr = DPH + dph_tok + h * sp_h
            pmask = (t2 < n_tok) & (a2 < A)
            if ACC_DPH:
                dph += tl.load(pptr, mask=pmask, other=0.0)
            tl.store(pptr, dph, mask=pmask)
        d_lo += do_lo * cs + do_hi * sn
        d_hi += do_hi * cs - do_lo * sn
        d_rest += do_rest
    if HAS_NORM:
        w_lo, w_hi, w_rest = _cols3(W, True, a3, e3, A, N)
        a1 = tl.arange(0, BA)
        e1 = 2 * A + tl.arange(0, BR)
        wrow = DW_PART + pid * N
        tl.store(wrow + a1, tl.sum(tl.sum(d_lo * x_lo * rstd, axis=0), axis=0), mask=a1 < A)
        tl.store(wrow + A + a1, tl.sum(tl.sum(d_hi * x_hi * rstd, axis=0), axis=0), mask=a1 < A)
        tl.store(wrow + e1, tl.sum(tl.sum(d_rest * x_rest * rstd, axis=0), axis=0), mask=e1 < N)
        d_lo, d_hi, d_rest = d_lo * w_lo, d_hi * w_hi, d_rest * w_rest
        proj = (tl.sum(x_lo * d_lo, axis=2) + tl.sum(x_hi * d_hi, axis=2) + tl.sum(x_rest * d_rest, axis=2))[:, :, None] / N
        r3c = rstd * rstd * rstd * proj
        d_lo, d_hi, d_rest = rstd * d_lo - x_lo * r3c, rstd * d_hi - x_hi * r3c, rstd * d_rest - x_rest * r3c
    _store3(DX + (t3 * R + r3) * N, m, a3, e3, d_lo, d_hi, d_rest, A, N)


@triton.jit
def _qk_dbias_kernel(
    PH, DOUT, DBIAS_PART, n_tok, H, ITERS, L, sp_b, sp_l, sp_h, sp_a,
    R: tl.constexpr, N: tl.constexpr, A: tl.constexpr, RP: tl.constexpr, BA: tl.constexpr, BR: tl.constexpr,
    BT: tl.constexpr,
):
    """dBias[h] = Σ_tokens rot_{-φ}(dout_h): one head and ITERS token blocks per program, summed
    elementwise in registers and reduced once (a per-head sum inside the head loop of _qk_bwd_kernel
    would cost a cross-thread reduction and an atomic per head and block)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    r3 = tl.arange(0, RP)[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    e3 = 2 * A + tl.arange(0, BR)[None, None, :]
    acc_lo = tl.zeros((BT, RP, BA), dtype=tl.float32)
    acc_hi = tl.zeros((BT, RP, BA), dtype=tl.float32)
    acc_rest = tl.zeros((BT, RP, BR), dtype=tl.float32)
    for it in range(ITERS):
        t3 = ((pid * ITERS + it) * BT + tl.arange(0, BT))[:, None, None]
        ang = tl.load(PH + (t3 // L) * sp_b + (t3 % L) * sp_l + a3 * sp_a + h * sp_h, mask=(t3 < n_tok) & (a3 < A), other=0.0)
        cs, sn = tl.cos(ang), tl.sin(ang)
        do_lo, do_hi, do_rest = _cols3(DOUT + ((t3 * H + h) * R + r3) * N, (t3 < n_tok) & (r3 < R), a3, e3, A, N)
        acc_lo += do_lo * cs + do_hi * sn
        acc_hi += do_hi * cs - do_lo * sn
        acc_rest += do_rest
    r2 = tl.arange(0, RP)[:, None]
    a2 = tl.arange(0, BA)[None, :]
    e2 = 2 * A + tl.arange(0, BR)[None, :]
    base = DBIAS_PART + ((pid * H + h) * R + r2) * N
    tl.store(base + a2, tl.sum(acc_lo, axis=0), mask=(r2 < R) & (a2 < A))
    tl.store(base + A + a2, tl.sum(acc_hi, axis=0), mask=(r2 < R) & (a2 < A))
    tl.store(base + e2, tl.sum(acc_rest, axis=0), mask=(r2 < R) & (e2 < N))


def _phase_strides(phase) -> tuple[int, int, int, int]:
    return tuple(phase.stride()) if phase is not None else (0, 0, 0, 0)


def _phase_or_standin(phase, like):
    """The phase pointer's argument: without a rotary (A = 0) every angle load is masked off, but its dtype
    still types the loads, and the cos/sin of a 16-bit value do not compile: an fp32 stand-in."""
    return phase if phase is not None else torch.zeros(1, device=like.device, dtype=torch.float32)


def _qk_launch_meta(X, phase, budget):
    b, l, r, n = X.shape
    A = phase.shape[-1] if phase is not None else 0
    RP = pow2(r)
    BA, BR = pow2(A) if A else 1, pow2(n - 2 * A) if n > 2 * A else 1
    return dict(b=b, l=l, r=r, n=n, A=A, RP=RP, BA=BA, BR=BR, BT=token_block(RP, BA * 2 + BR, budget))


@torch.library.custom_op("hybridlab::qk_prep", mutates_args=())
def _qk_op(B: torch.Tensor, C: torch.Tensor, phase: Optional[torch.Tensor], b_norm: Optional[torch.Tensor],
           c_norm: Optional[torch.Tensor], b_bias: Optional[torch.Tensor], c_bias: Optional[torch.Tensor], heads: int,
           eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """B, C (b, l, R, N) token rows; phase (b, l, H, A) fp32, dense with any strides -> (q, k) (b, l, H, R, N)."""
    m = _qk_launch_meta(B, phase, _QK_FWD[0])
    ph = _phase_or_standin(phase, B)
    outs = []
    for X, w, bias in ((C, c_norm, c_bias), (B, b_norm, b_bias)):
        out = torch.empty(m["b"], m["l"], heads, m["r"], m["n"], device=X.device, dtype=X.dtype)
        _qk_fwd_kernel[(triton.cdiv(m["b"] * m["l"], m["BT"]),)](
            X, w if w is not None else X, bias if bias is not None else X, ph, out,
            m["b"] * m["l"], X.stride(1), heads, eps, m["l"], *_phase_strides(phase),
            R=m["r"], N=m["n"], A=m["A"], RP=m["RP"], BA=m["BA"], BR=m["BR"], BT=m["BT"],
            HAS_NORM=w is not None, HAS_BIAS=bias is not None, num_warps=_QK_FWD[1],
        )
        outs.append(out)
    return outs[0], outs[1]


@_qk_op.register_fake
def _(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps):
    b, l, r, n = B.shape
    return B.new_empty(b, l, heads, r, n), B.new_empty(b, l, heads, r, n)


@torch.library.custom_op("hybridlab::qk_prep_bwd", mutates_args=())
def _qk_bwd_op(B: torch.Tensor, C: torch.Tensor, phase: Optional[torch.Tensor], b_norm: Optional[torch.Tensor],
               c_norm: Optional[torch.Tensor], b_bias: Optional[torch.Tensor], c_bias: Optional[torch.Tensor],
               dq: torch.Tensor, dk: torch.Tensor, heads: int, eps: float) -> List[torch.Tensor]:
    """-> [dB, dC, dphase (phase's strides), d b_norm, d c_norm, d b_bias, d c_bias] (empty where absent)."""
    m = _qk_launch_meta(B, phase, _QK_BWD[0])
    ntok = m["b"] * m["l"]
    nprog = triton.cdiv(ntok, m["BT"])
    dev = B.device
    none = lambda: B.new_empty(0)  # noqa: E731  (a fresh one each time: outputs may not alias)
    dphase = torch.empty_like(phase) if phase is not None else none()  # phase's strides
    ph = _phase_or_standin(phase, B)
    grads = []
    for i, (X, w, bias, dout) in enumerate(((C, c_norm, c_bias, dq), (B, b_norm, b_bias, dk))):
        dout = dout.contiguous()
        dX = torch.empty(m["b"], m["l"], m["r"], m["n"], device=dev, dtype=X.dtype)
        dw = torch.empty(nprog, m["n"], device=dev, dtype=torch.float32) if w is not None else None
        _qk_bwd_kernel[(nprog,)](
            X, w if w is not None else X, bias if bias is not None else X, ph,
            dout, dX, dw if dw is not None else dX, dphase if phase is not None else dX,
            ntok, X.stride(1), heads, eps, m["l"], *_phase_strides(phase),
            R=m["r"], N=m["n"], A=m["A"], RP=m["RP"], BA=m["BA"], BR=m["BR"], BT=m["BT"],
            HAS_NORM=w is not None, HAS_BIAS=bias is not None, ACC_DPH=i == 1, num_warps=_QK_BWD[1],
        )
        dbias = none()
        if bias is not None:
            bt = token_block(m["RP"], m["BA"] * 2 + m["BR"], _QK_DBIAS[0])
            progs, iters = param_grid(triton.cdiv(ntok, bt), heads)
            part = torch.empty(progs, heads, m["r"], m["n"], device=dev, dtype=torch.float32)
            _qk_dbias_kernel[(progs, heads)](
                ph, dout, part, ntok, heads, iters, m["l"], *_phase_strides(phase),
                R=m["r"], N=m["n"], A=m["A"], RP=m["RP"], BA=m["BA"], BR=m["BR"], BT=bt, num_warps=_QK_DBIAS[1],
            )
            dbias = part.sum(0).to(bias.dtype)
        grads.append((dX, dw.sum(0).to(w.dtype) if dw is not None else none(), dbias))
    (dC, dcw, dcb), (dB, dbw, dbb) = grads
    return [dB, dC, dphase, dbw, dcw, dbb, dcb]


@_qk_bwd_op.register_fake
def _(B, C, phase, b_norm, c_norm, b_bias, c_bias, dq, dk, heads, eps):
    like = lambda t: torch.empty_like(t) if t is not None else B.new_empty(0)  # noqa: E731
    return [B.new_empty(B.shape), C.new_empty(C.shape), like(phase), like(b_norm), like(c_norm), like(b_bias), like(c_bias)]


def _qk_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.heads, ctx.eps = inputs[7], inputs[8]


def _qk_backward(ctx, dq, dk):
    saved = ctx.saved_tensors
    grads = torch.ops.hybridlab.qk_prep_bwd(*saved, dq, dk, ctx.heads, ctx.eps)
    return (*(g if t is not None else None for g, t in zip(grads, saved)), None, None)


torch.library.register_autograd("hybridlab::qk_prep", _qk_backward, setup_context=_qk_setup)


def qk_prep_triton(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int, eps: float):
    if phase is not None:  # any strides (the layer hands a (b, H, A, l)-major view); dense, so dphase can share them
        phase = phase.float()
        if torch.empty_like(phase).stride() != phase.stride():  # e.g. broadcast: not dense
            phase = phase.contiguous()
    params = [t.contiguous() if t is not None else None for t in (b_norm, c_norm, b_bias, c_bias)]
    return torch.ops.hybridlab.qk_prep(token_rows(B), token_rows(C), phase, *params, heads, float(eps))
