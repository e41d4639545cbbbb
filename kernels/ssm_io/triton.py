"""Triton kernels for the Mamba-3 scan's input and output stages (forward + backward).

The stages are elementwise or row-wise around the scan, so the reference's
chain of PyTorch ops (each reading and writing (b, l, H, R, ·) tensors, several
in fp32, and each saving its inputs for backward) becomes one pass each way:

* ``scan_coefficients``: dt, A, log α, β, γ per (token, head) from the raw
  projections, recomputed in the backward.
* ``cumulative_phase``: one program per (batch, head block) walks the sequence
  in chunks, carrying the running phase (backward: suffix sums).
* ``qk_prep``: one program per block of BT tokens holds the block's normalized
  B (or C), (BT, R, N), in registers and walks the heads, writing each head's
  biased and rotated copy: B/C is read once, not H times, and the backward sums
  the heads' gradients in registers (no atomics). Columns are held as three
  tiles — the rotation pairs' halves [0, A), [A, 2A) and the rest — so rotating
  is elementwise and sin/cos are computed once per angle.
* ``rank_expand`` (MIMO): v = x ⊙ W_x per (token block, head).
* ``gated_output``: one program per (token block, head): D skip, grouped
  RMSNorm, SiLU gate and the rank sum in registers; reads y once, writes the
  rank-combined (b, l, H, P) result.

Parameter gradients accumulate elementwise in registers over a program's token
blocks and are reduced once, then summed over programs by torch (a few MB).
Everything is fp32 inside; outputs round once to the activations' dtype. Tile
sizes keep every kernel free of register spills (ptxas -v, sm_90a).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["scan_coefficients_triton", "cumulative_phase_triton", "qk_prep_triton", "rank_expand_triton", "gated_output_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (b, l, ...) as the kernels address it: (b, l) flatten to one token axis with stride
    ``t.stride(1)`` and each token's trailing dims are dense (a view of a projection's slice passes
    as is; anything else is copied)."""
    dense = 1
    for dim in range(t.dim() - 1, 1, -1):
        if t.stride(dim) != dense:
            return t.contiguous()
        dense *= t.shape[dim]
    return t if t.stride(0) == t.shape[1] * t.stride(1) else t.contiguous()


def _env_pair(name: str, default: str) -> tuple[int, int]:
    budget, warps = os.environ.get(name, default).split(",")
    return int(budget), int(warps)


# Per kernel: (fp32 elements per (BT, R, cols) tile, warps). Sized so that the tiles each kernel keeps
# live fit in registers (ptxas -v for sm_90a: no spills at the bench shapes); overridable for tuning.
_QK_FWD = _env_pair("HYBRIDLAB_IO_QK_FWD", "2048,4")
_QK_BWD = _env_pair("HYBRIDLAB_IO_QK_BWD", "2048,4")
_QK_DBIAS = _env_pair("HYBRIDLAB_IO_QK_DBIAS", "2048,4")
_OUT_FWD = _env_pair("HYBRIDLAB_IO_OUT_FWD", "2048,4")
_OUT_BWD = _env_pair("HYBRIDLAB_IO_OUT_BWD", "1024,4")


def _token_block(rank_pad: int, cols: int, budget: int) -> int:
    """Tokens per program: about ``budget`` fp32 elements per (BT, R, cols) tile."""
    bt = max(1, min(64, budget // (rank_pad * cols)))
    return 1 << (bt.bit_length() - 1)  # a power of two (tl.arange)


# ------------------------------------------------------------------ q/k preparation
#
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


_PARAM_PROGRAMS = int(os.environ.get("HYBRIDLAB_IO_BWD_PROGRAMS", "4096"))  # programs that sum parameter grads


def _param_grid(n_blocks: int, heads: int) -> tuple[int, int]:
    """(programs per head, token blocks per program) for a (token blocks, heads) grid of ~_PARAM_PROGRAMS."""
    iters = max(1, triton.cdiv(n_blocks * heads, _PARAM_PROGRAMS))
    return triton.cdiv(n_blocks, iters), iters


def _phase_strides(phase) -> tuple[int, int, int, int]:
    return tuple(phase.stride()) if phase is not None else (0, 0, 0, 0)


def _qk_launch_meta(X, phase, budget):
    b, l, r, n = X.shape
    A = phase.shape[-1] if phase is not None else 0
    RP = _pow2(r)
    BA, BR = _pow2(A) if A else 1, _pow2(n - 2 * A) if n > 2 * A else 1
    return dict(b=b, l=l, r=r, n=n, A=A, RP=RP, BA=BA, BR=BR, BT=_token_block(RP, BA * 2 + BR, budget))


class QKPrepFn(torch.autograd.Function):
    """(B, C, phase, b_norm, c_norm, b_bias, c_bias) -> (q, k), fused forward and backward."""

    @staticmethod
    def forward(ctx, B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps):
        B, C = _token_rows(B), _token_rows(C)
        m = _qk_launch_meta(B, phase, _QK_FWD[0])
        ph = phase if phase is not None else torch.zeros(1, device=B.device)
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
        ctx.save_for_backward(B, C, phase, b_norm, c_norm, b_bias, c_bias)
        ctx.heads, ctx.eps = heads, eps
        return outs[0], outs[1]

    @staticmethod
    def backward(ctx, dq, dk):
        B, C, phase, b_norm, c_norm, b_bias, c_bias = ctx.saved_tensors
        heads, eps = ctx.heads, ctx.eps
        m = _qk_launch_meta(B, phase, _QK_BWD[0])
        ntok = m["b"] * m["l"]
        nprog = triton.cdiv(ntok, m["BT"])
        dev = B.device
        dphase = torch.empty_like(phase) if phase is not None else torch.zeros(1, device=dev)  # phase's strides
        ph = phase if phase is not None else dphase
        grads = []
        for i, (X, w, bias, dout) in enumerate(((C, c_norm, c_bias, dq), (B, b_norm, b_bias, dk))):
            if dout is None:
                dout = torch.zeros(m["b"], m["l"], heads, m["r"], m["n"], device=dev, dtype=X.dtype)
            dout = dout.contiguous()
            dX = torch.empty(m["b"], m["l"], m["r"], m["n"], device=dev, dtype=X.dtype)
            dw = torch.empty(nprog, m["n"], device=dev, dtype=torch.float32) if w is not None else None
            _qk_bwd_kernel[(nprog,)](
                X, w if w is not None else X, bias if bias is not None else X, ph,
                dout, dX, dw if dw is not None else dX, dphase,
                ntok, X.stride(1), heads, eps, m["l"], *_phase_strides(phase),
                R=m["r"], N=m["n"], A=m["A"], RP=m["RP"], BA=m["BA"], BR=m["BR"], BT=m["BT"],
                HAS_NORM=w is not None, HAS_BIAS=bias is not None, ACC_DPH=i == 1, num_warps=_QK_BWD[1],
            )
            dbias = None
            if bias is not None:
                bt = _token_block(m["RP"], m["BA"] * 2 + m["BR"], _QK_DBIAS[0])
                progs, iters = _param_grid(triton.cdiv(ntok, bt), heads)
                dbias = torch.empty(progs, heads, m["r"], m["n"], device=dev, dtype=torch.float32)
                _qk_dbias_kernel[(progs, heads)](
                    ph, dout, dbias, ntok, heads, iters, m["l"], *_phase_strides(phase),
                    R=m["r"], N=m["n"], A=m["A"], RP=m["RP"], BA=m["BA"], BR=m["BR"], BT=bt, num_warps=_QK_DBIAS[1],
                )
            grads.append((dX, dw.sum(0).to(w.dtype) if dw is not None else None, dbias.sum(0).to(bias.dtype) if dbias is not None else None))
        (dC, dcw, dcb), (dB, dbw, dbb) = grads
        return dB, dC, dphase if phase is not None else None, dbw, dcw, dbb, dcb, None, None


def qk_prep_triton(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads: int, eps: float):
    if phase is not None:  # any strides (the layer hands a (b, H, A, l)-major view); dense, so dphase can share them
        phase = phase.float()
        if torch.empty_like(phase).stride() != phase.stride():  # e.g. broadcast: not dense
            phase = phase.contiguous()
    params = [t.contiguous() if t is not None else None for t in (b_norm, c_norm, b_bias, c_bias)]
    return QKPrepFn.apply(B, C, phase, *params, heads, float(eps))


# ------------------------------------------------------------------ gated output


@triton.jit
def _out_tiles(Y, X, Z, Dp, NW, MX, MZ, t3, r3, c3, h, n_tok, sx_tok, sz_tok, H, eps,
               R: tl.constexpr, P: tl.constexpr, HAS_NORM: tl.constexpr, MIMO: tl.constexpr):
    """Recompute the forward's rows: v, D-skipped y, rstd, normalized y, x, z and the gate input."""
    tmask = t3 < n_tok
    rmask = r3 < R
    cmask = c3 < P
    y = tl.load(Y + ((t3 * H + h) * R + r3) * P + c3, mask=tmask & rmask & cmask, other=0.0).to(tl.float32)
    x = tl.load(X + t3 * sx_tok + h * P + c3, mask=tmask & cmask, other=0.0).to(tl.float32)
    z = tl.load(Z + t3 * sz_tok + h * P + c3, mask=tmask & cmask, other=0.0).to(tl.float32)
    if MIMO:
        prow = (h * R + r3) * P + c3
        v = x * tl.load(MX + prow, mask=rmask & cmask, other=0.0).to(tl.float32)
        zr = z * tl.load(MZ + prow, mask=rmask & cmask, other=0.0).to(tl.float32)
    else:
        v = x
        zr = z
    yr = y + tl.load(Dp + h).to(tl.float32) * v
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(yr * yr, axis=2) / P + eps)[:, :, None]
        yn = yr * rstd * tl.load(NW + h * P + c3, mask=cmask, other=0.0).to(tl.float32)
    else:
        rstd = yr
        yn = yr
    return x, z, v, yr, rstd, yn, zr


@triton.jit
def _out_fwd_kernel(
    Y, X, Z, Dp, NW, MX, MZ, MO, OUT, n_tok, sx_tok, sz_tok, H, eps,
    R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr,
    HAS_NORM: tl.constexpr, MIMO: tl.constexpr,
):
    pid, h = tl.program_id(0), tl.program_id(1)
    t3 = (pid * BT + tl.arange(0, BT))[:, None, None]
    r3 = tl.arange(0, RP)[None, :, None]
    c3 = tl.arange(0, BP)[None, None, :]
    x, z, v, yr, rstd, yn, zr = _out_tiles(Y, X, Z, Dp, NW, MX, MZ, t3, r3, c3, h, n_tok, sx_tok, sz_tok, H, eps, R, P, HAS_NORM, MIMO)
    o = yn * zr * tl.sigmoid(zr)
    if MIMO:
        o = o * tl.load(MO + (h * R + r3) * P + c3, mask=(r3 < R) & (c3 < P), other=0.0).to(tl.float32)
    o = tl.sum(o, axis=1)
    t2 = (pid * BT + tl.arange(0, BT))[:, None]
    c2 = tl.arange(0, BP)[None, :]
    tl.store(OUT + (t2 * H + h) * P + c2, o.to(OUT.dtype.element_ty), mask=(t2 < n_tok) & (c2 < P))


@triton.jit
def _out_bwd_kernel(
    Y, X, Z, Dp, NW, MX, MZ, MO, DOUT, DY, DX, DZ, DD_PART, DNW_PART, DMX_PART, DMZ_PART, DMO_PART,
    n_tok, sx_tok, sz_tok, H, eps, ITERS,
    R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr,
    HAS_NORM: tl.constexpr, MIMO: tl.constexpr,
):
    """One head, ITERS token blocks: dy, dx, dz per row; parameter gradients summed in registers."""
    pid, h = tl.program_id(0), tl.program_id(1)
    r3 = tl.arange(0, RP)[None, :, None]
    c3 = tl.arange(0, BP)[None, None, :]
    rmask, cmask = r3 < R, c3 < P
    r2 = tl.arange(0, RP)[:, None]
    c2 = tl.arange(0, BP)[None, :]
    prow = (h * R + r3) * P + c3
    d = tl.load(Dp + h).to(tl.float32)
    if MIMO:
        mx = tl.load(MX + prow, mask=rmask & cmask, other=0.0).to(tl.float32)
        mz = tl.load(MZ + prow, mask=rmask & cmask, other=0.0).to(tl.float32)
        mo = tl.load(MO + prow, mask=rmask & cmask, other=0.0).to(tl.float32)
    if HAS_NORM:
        nw = tl.load(NW + h * P + c3, mask=cmask, other=0.0).to(tl.float32)
    # parameter gradients accumulate elementwise; reduced over tokens once, after the loop
    acc_mx = tl.zeros((BT, RP, BP), dtype=tl.float32)
    acc_mz = tl.zeros((BT, RP, BP), dtype=tl.float32)
    acc_mo = tl.zeros((BT, RP, BP), dtype=tl.float32)
    acc_nw = tl.zeros((BT, RP, BP), dtype=tl.float32)
    acc_d = tl.zeros((BT, RP, BP), dtype=tl.float32)
    for it in range(ITERS):
        t0 = (pid * ITERS + it) * BT
        t3 = (t0 + tl.arange(0, BT))[:, None, None]
        tmask = t3 < n_tok
        x, z, v, yr, rstd, yn, zr = _out_tiles(Y, X, Z, Dp, NW, MX, MZ, t3, r3, c3, h, n_tok, sx_tok, sz_tok, H, eps, R, P, HAS_NORM, MIMO)
        do = tl.load(DOUT + (t3 * H + h) * P + c3, mask=tmask & cmask, other=0.0).to(tl.float32)  # (BT, 1, BP)
        sg = tl.sigmoid(zr)
        g = zr * sg
        if MIMO:
            acc_mo += do * yn * g
            do = do * mo
        dyn = do * g
        dzr = do * yn * sg * (1.0 + zr * (1.0 - sg))
        if MIMO:
            dz = tl.sum(dzr * mz, axis=1)
            acc_mz += dzr * z
        else:
            dz = tl.sum(dzr, axis=1)
        if HAS_NORM:
            acc_nw += dyn * yr * rstd
            gw = dyn * nw
            dyr = rstd * gw - yr * (rstd * rstd * rstd) * (tl.sum(yr * gw, axis=2)[:, :, None] / P)
        else:
            dyr = dyn
        tl.store(DY + ((t3 * H + h) * R + r3) * P + c3, dyr.to(DY.dtype.element_ty), mask=tmask & rmask & cmask)
        acc_d += dyr * v
        dv = dyr * d
        if MIMO:
            dx = tl.sum(dv * mx, axis=1)
            acc_mx += dv * x
        else:
            dx = tl.sum(dv, axis=1)
        t2 = (t0 + tl.arange(0, BT))[:, None]
        omask = (t2 < n_tok) & (c2 < P)
        tl.store(DX + (t2 * H + h) * P + c2, dx.to(DX.dtype.element_ty), mask=omask)
        tl.store(DZ + (t2 * H + h) * P + c2, dz.to(DZ.dtype.element_ty), mask=omask)
    slot = pid * H + h
    tl.store(DD_PART + slot, tl.sum(tl.sum(tl.sum(acc_d, axis=2), axis=1), axis=0))
    if HAS_NORM:
        c1 = tl.arange(0, BP)
        tl.store(DNW_PART + slot * P + c1, tl.sum(tl.sum(acc_nw, axis=0), axis=0), mask=c1 < P)
    if MIMO:
        ppart = (slot * R + r2) * P + c2
        pmask = (r2 < R) & (c2 < P)
        tl.store(DMX_PART + ppart, tl.sum(acc_mx, axis=0), mask=pmask)
        tl.store(DMZ_PART + ppart, tl.sum(acc_mz, axis=0), mask=pmask)
        tl.store(DMO_PART + ppart, tl.sum(acc_mo, axis=0), mask=pmask)


def _out_meta(y, budget):
    b, l, h, r, p = y.shape
    RP, BP = _pow2(r), max(_pow2(p), 16)
    BT = _token_block(RP, BP, budget)
    return b, l, h, r, p, RP, BP, BT, (triton.cdiv(b * l, BT), h)


class GatedOutputFn(torch.autograd.Function):
    """(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o) -> (b, l, H, P), fused forward and backward."""

    @staticmethod
    def forward(ctx, y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps):
        b, l, h, r, p, RP, BP, BT, grid = _out_meta(y, _OUT_FWD[0])
        ctx.shapes = (x.shape, z.shape)
        y = y.contiguous()
        x, z = _token_rows(x.reshape(b, l, h, p)), _token_rows(z.reshape(b, l, h, p))
        out = torch.empty(b, l, h, p, device=y.device, dtype=y.dtype)
        mimo = mimo_x is not None
        _out_fwd_kernel[grid](
            y, x, z, D, norm_w if norm_w is not None else D, mimo_x if mimo else D, mimo_z if mimo else D,
            mimo_o if mimo else D, out, b * l, x.stride(1), z.stride(1), h, eps,
            R=r, P=p, RP=RP, BP=BP, BT=BT, HAS_NORM=norm_w is not None, MIMO=mimo, num_warps=_OUT_FWD[1],
        )
        ctx.save_for_backward(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o = ctx.saved_tensors
        b, l, h, r, p, RP, BP, BT, grid = _out_meta(y, _OUT_BWD[0])
        dev, f32 = y.device, torch.float32
        mimo = mimo_x is not None
        progs, iters = _param_grid(grid[0], h)  # each program walks `iters` token blocks of one head
        grid = (progs, h)
        dy = torch.empty_like(y)
        dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
        dz = torch.empty(b, l, h, p, device=dev, dtype=z.dtype)
        dD = torch.empty(grid[0], h, device=dev, dtype=f32)
        dnw = torch.empty(grid[0], h, p, device=dev, dtype=f32) if norm_w is not None else None
        dm = [torch.empty(grid[0], h, r, p, device=dev, dtype=f32) if mimo else None for _ in range(3)]
        _out_bwd_kernel[grid](
            y, x, z, D, norm_w if norm_w is not None else D, mimo_x if mimo else D, mimo_z if mimo else D,
            mimo_o if mimo else D, dout.contiguous(), dy, dx, dz, dD, dnw if dnw is not None else dD,
            *(t if t is not None else dD for t in dm), b * l, x.stride(1), z.stride(1), h, ctx.eps, iters,
            R=r, P=p, RP=RP, BP=BP, BT=BT, HAS_NORM=norm_w is not None, MIMO=mimo, num_warps=_OUT_BWD[1],
        )
        total = lambda part, like: part.sum(0).to(like.dtype) if part is not None else None  # noqa: E731
        return (
            dy, dx.view(ctx.shapes[0]), dz.view(ctx.shapes[1]), total(dD, D), total(dnw, norm_w),
            total(dm[0], mimo_x), total(dm[1], mimo_z), total(dm[2], mimo_o), None,
        )


def gated_output_triton(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps: float):
    params = [t.contiguous() if t is not None else None for t in (D, norm_w, mimo_x, mimo_z, mimo_o)]
    return GatedOutputFn.apply(y, x, z, *params, float(eps))


# ------------------------------------------------------------------ cumulative phase


@triton.jit
def _phase_fwd_kernel(TH, DT, PH, L, H, A, BL: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr):
    """φ[b, t, h, a] = Σ_{s<=t} θ[b, s, a]·dt[b, s, h]: one (batch, head block), chunks of BL positions
    in order, the running sum carried in registers."""
    b, hb = tl.program_id(0), tl.program_id(1)
    l3 = tl.arange(0, BL)[:, None, None]
    h3 = (hb * HB + tl.arange(0, HB))[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    carry = tl.zeros((1, HB, BA), dtype=tl.float32)
    for c0 in range(0, L, BL):
        pos = c0 + l3
        th = tl.load(TH + (b * L + pos) * A + a3, mask=(pos < L) & (a3 < A), other=0.0)
        dt = tl.load(DT + (b * L + pos) * H + h3, mask=(pos < L) & (h3 < H), other=0.0)
        run = tl.cumsum(th * dt, axis=0) + carry
        tl.store(PH + ((b * L + pos) * H + h3) * A + a3, run, mask=(pos < L) & (h3 < H) & (a3 < A))
        carry = tl.sum(tl.where(pos == tl.minimum(c0 + BL, L) - 1, run, 0.0), axis=0)[None]


@triton.jit
def _phase_bwd_kernel(TH, DT, DPH, DTH_PART, DDT, L, H, A, BL: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr):
    """Reverse: g[t] = Σ_{s>=t} dφ[s]; dθ[t, a] = Σ_h g·dt (this head block's part), ddt[t, h] = Σ_a g·θ."""
    b, hb = tl.program_id(0), tl.program_id(1)
    l3 = tl.arange(0, BL)[:, None, None]
    h3 = (hb * HB + tl.arange(0, HB))[None, :, None]
    a3 = tl.arange(0, BA)[None, None, :]
    l2 = tl.arange(0, BL)[:, None]
    carry = tl.zeros((1, HB, BA), dtype=tl.float32)
    for i in range(0, tl.cdiv(L, BL)):
        c0 = (tl.cdiv(L, BL) - 1 - i) * BL
        pos = c0 + l3
        m = (pos < L) & (h3 < H) & (a3 < A)
        d = tl.load(DPH + ((b * L + pos) * H + h3) * A + a3, mask=m, other=0.0)
        g = tl.sum(d, axis=0)[None] - tl.cumsum(d, axis=0) + d + carry  # suffix sums
        carry = tl.sum(d, axis=0)[None] + carry
        th = tl.load(TH + (b * L + pos) * A + a3, mask=(pos < L) & (a3 < A), other=0.0)
        dt = tl.load(DT + (b * L + pos) * H + h3, mask=(pos < L) & (h3 < H), other=0.0)
        h2 = (hb * HB + tl.arange(0, HB))[None, :]
        tl.store(DDT + (b * L + c0 + l2) * H + h2, tl.sum(g * th, axis=2), mask=(c0 + l2 < L) & (h2 < H))
        a2 = tl.arange(0, BA)[None, :]
        tl.store(DTH_PART + ((hb * tl.num_programs(0) + b) * L + c0 + l2) * A + a2, tl.sum(g * dt, axis=1), mask=(c0 + l2 < L) & (a2 < A))


_PHASE_HB = 4  # heads per program (the grid is batch x head blocks; each program walks the sequence)


class CumulativePhaseFn(torch.autograd.Function):
    """(θ (b, l, A), dt (b, l, H)) -> φ (b, l, H, A), fp32."""

    @staticmethod
    def forward(ctx, theta, dt):
        b, l, A = theta.shape
        H = dt.shape[-1]
        BA = _pow2(A)
        BL = max(1, min(64, 4096 // (_PHASE_HB * BA)))
        BL = 1 << (BL.bit_length() - 1)
        phase = torch.empty(b, l, H, A, device=theta.device, dtype=torch.float32)
        _phase_fwd_kernel[(b, triton.cdiv(H, _PHASE_HB))](theta, dt, phase, l, H, A, BL=BL, HB=_PHASE_HB, BA=BA, num_warps=4)
        ctx.save_for_backward(theta, dt)
        ctx.meta = (BL, BA)
        return phase

    @staticmethod
    def backward(ctx, dphase):
        theta, dt = ctx.saved_tensors
        BL, BA = ctx.meta
        b, l, A = theta.shape
        H = dt.shape[-1]
        nhb = triton.cdiv(H, _PHASE_HB)
        dth = torch.empty(nhb, b, l, A, device=theta.device, dtype=torch.float32)
        ddt = torch.empty(b, l, H, device=theta.device, dtype=torch.float32)
        _phase_bwd_kernel[(b, nhb)](theta, dt, dphase.contiguous(), dth, ddt, l, H, A, BL=BL, HB=_PHASE_HB, BA=BA, num_warps=4)
        return dth.sum(0), ddt


def cumulative_phase_triton(theta, dt):
    return CumulativePhaseFn.apply(theta.float().contiguous(), dt.float().contiguous())


# ------------------------------------------------------------------ MIMO rank expansion


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


class RankExpandFn(torch.autograd.Function):
    """x (b, l, H, P), w (H, R, P) -> v = x ⊙ w (b, l, H, R, P) in x's dtype."""

    @staticmethod
    def forward(ctx, x, w):
        b, l, h, p = x.shape
        r = w.shape[1]
        RP, BP = _pow2(r), max(_pow2(p), 16)
        BT = _token_block(RP, BP, _OUT_FWD[0])
        v = torch.empty(b, l, h, r, p, device=x.device, dtype=x.dtype)
        _expand_fwd_kernel[(triton.cdiv(b * l, BT), h)](x, w, v, b * l, x.stride(1), h, R=r, P=p, RP=RP, BP=BP, BT=BT, num_warps=_OUT_FWD[1])
        ctx.save_for_backward(x, w)
        return v

    @staticmethod
    def backward(ctx, dv):
        x, w = ctx.saved_tensors
        b, l, h, p = x.shape
        r = w.shape[1]
        RP, BP = _pow2(r), max(_pow2(p), 16)
        BT = _token_block(RP, BP, _OUT_FWD[0])
        progs, iters = _param_grid(triton.cdiv(b * l, BT), h)
        dx = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
        dw = torch.empty(progs, h, r, p, device=x.device, dtype=torch.float32)
        _expand_bwd_kernel[(progs, h)](x, w, dv.contiguous(), dx, dw, b * l, x.stride(1), h, iters,
                                       R=r, P=p, RP=RP, BP=BP, BT=BT, num_warps=_OUT_FWD[1])
        return dx, dw.sum(0).to(w.dtype)


def rank_expand_triton(x, w):
    return RankExpandFn.apply(_token_rows(x), w.contiguous())


# ------------------------------------------------------------------ scan coefficients


@triton.jit
def _softplus(u):
    # log(1 + e^u), overflow-free; torch's softplus switches to u above 20 (same to fp32 precision)
    return tl.where(u > 20.0, u, tl.log(1.0 + tl.exp(tl.minimum(u, 20.0))))


@triton.jit
def _a_magnitude(u, HEAVY: tl.constexpr):
    """|A| before the floor and its derivative: heavy tail (1 + u, or 1 / (1 - u) below 0) or softplus."""
    if HEAVY:
        r = 1.0 / (1.0 - tl.minimum(u, 0.0))
        return tl.where(u >= 0.0, 1.0 + u, r), tl.where(u >= 0.0, 1.0, r * r)
    else:
        return _softplus(u), tl.sigmoid(u)


@triton.jit
def _coef_fwd_kernel(DTR, AR, LR, DTB, AB, VALID, DT, LA, BETA, GAMMA, n_tok, s_tok, H, a_floor,
                     BT: tl.constexpr, BH: tl.constexpr, TRAP: tl.constexpr, HAS_VALID: tl.constexpr,
                     HEAVY: tl.constexpr, HAS_AB: tl.constexpr):
    pid = tl.program_id(0)
    t2 = (pid * BT + tl.arange(0, BT))[:, None]
    h2 = tl.arange(0, BH)[None, :]
    m = (t2 < n_tok) & (h2 < H)
    u_dt = tl.load(DTR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + tl.load(DTB + h2, mask=h2 < H, other=0.0)
    u_a = tl.load(AR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32)
    if HAS_AB:
        u_a += tl.load(AB + h2, mask=h2 < H, other=0.0)
    dt = _softplus(u_dt)
    if HAS_VALID:
        dt = tl.where(tl.load(VALID + t2, mask=t2 < n_tok, other=0) != 0, dt, 0.0)
    f_a, _ = _a_magnitude(u_a, HEAVY)
    la = -tl.maximum(f_a, a_floor) * dt
    o = t2 * H + h2
    tl.store(DT + o, dt, mask=m)
    tl.store(LA + o, la, mask=m)
    if TRAP:
        lam = tl.sigmoid(tl.load(LR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32))
        tl.store(BETA + o, (1.0 - lam) * dt * tl.exp(la), mask=m)
        tl.store(GAMMA + o, lam * dt, mask=m)
    else:
        tl.store(BETA + o, tl.zeros_like(dt), mask=m)
        tl.store(GAMMA + o, dt, mask=m)


@triton.jit
def _coef_bwd_kernel(DTR, AR, LR, DTB, AB, VALID, G_DT, G_LA, G_BETA, G_GAMMA, D_DTR, D_AR, D_LR, DB_PART,
                     n_tok, s_tok, H, a_floor, ITERS,
                     BT: tl.constexpr, BH: tl.constexpr, TRAP: tl.constexpr, HAS_VALID: tl.constexpr,
                     HEAVY: tl.constexpr, HAS_AB: tl.constexpr):
    """Recompute the forward per element and apply the chain rule; bias grads summed per program."""
    pid = tl.program_id(0)
    h2 = tl.arange(0, BH)[None, :]
    b_dt = tl.load(DTB + h2, mask=h2 < H, other=0.0)
    b_a = tl.zeros((1, BH), dtype=tl.float32)
    if HAS_AB:
        b_a = tl.load(AB + h2, mask=h2 < H, other=0.0)
    acc_dt = tl.zeros((BT, BH), dtype=tl.float32)
    acc_a = tl.zeros((BT, BH), dtype=tl.float32)
    for it in range(ITERS):
        t2 = ((pid * ITERS + it) * BT + tl.arange(0, BT))[:, None]
        m = (t2 < n_tok) & (h2 < H)
        u_dt = tl.load(DTR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + b_dt
        u_a = tl.load(AR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + b_a
        dt = _softplus(u_dt)
        keep = m
        if HAS_VALID:
            keep = keep & (tl.load(VALID + t2, mask=t2 < n_tok, other=0) != 0)
            dt = tl.where(keep, dt, 0.0)
        f_a, df_a = _a_magnitude(u_a, HEAVY)
        a_abs = tl.maximum(f_a, a_floor)
        la = -a_abs * dt
        o = t2 * H + h2
        g_la = tl.load(G_LA + o, mask=m, other=0.0)
        g_dt = tl.load(G_DT + o, mask=m, other=0.0)
        if TRAP:
            lam = tl.sigmoid(tl.load(LR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32))
            e = tl.exp(la)
            g_beta = tl.load(G_BETA + o, mask=m, other=0.0)
            g_gamma = tl.load(G_GAMMA + o, mask=m, other=0.0)
            g_la += g_beta * (1.0 - lam) * dt * e  # d beta / d log_alpha = beta
            g_dt += g_beta * (1.0 - lam) * e + g_gamma * lam
            d_lam = (g_gamma - g_beta * e) * dt
            tl.store(D_LR + o, (d_lam * lam * (1.0 - lam)).to(D_LR.dtype.element_ty), mask=m)
        else:
            g_dt += tl.load(G_GAMMA + o, mask=m, other=0.0)  # gamma = dt
        g_dt += -a_abs * g_la
        d_udt = tl.where(keep, g_dt * tl.sigmoid(u_dt), 0.0)
        d_ua = tl.where(m & (f_a >= a_floor), -g_la * dt * df_a, 0.0)
        tl.store(D_DTR + o, d_udt.to(D_DTR.dtype.element_ty), mask=m)
        tl.store(D_AR + o, d_ua.to(D_AR.dtype.element_ty), mask=m)
        acc_dt += d_udt
        acc_a += d_ua
    h1 = tl.arange(0, BH)
    tl.store(DB_PART + (pid * 2) * H + h1, tl.sum(acc_dt, axis=0), mask=h1 < H)
    tl.store(DB_PART + (pid * 2 + 1) * H + h1, tl.sum(acc_a, axis=0), mask=h1 < H)


class ScanCoefficientsFn(torch.autograd.Function):
    """(dt_raw, a_raw, lam_raw, dt_bias, a_bias) (b, l, H) -> (dt, log α, β, γ) fp32 (b, l, H); a_bias may be None."""

    @staticmethod
    def forward(ctx, dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation):
        b, l, h = dt_raw.shape
        trap = lam_raw is not None
        BH = _pow2(h)
        BT = max(1, 2048 // BH)
        outs = [torch.empty(b, l, h, device=dt_raw.device, dtype=torch.float32) for _ in range(4)]
        vmask = valid.reshape(-1).to(torch.int8) if valid is not None else dt_raw
        _coef_fwd_kernel[(triton.cdiv(b * l, BT),)](
            dt_raw, a_raw, lam_raw if trap else dt_raw, dt_bias, a_bias if a_bias is not None else dt_bias, vmask,
            *outs, b * l, dt_raw.stride(1), h, float(a_floor), BT=BT, BH=BH, TRAP=trap, HAS_VALID=valid is not None,
            HEAVY=activation == "heavy_tail", HAS_AB=a_bias is not None, num_warps=4,
        )
        ctx.save_for_backward(dt_raw, a_raw, lam_raw, dt_bias, a_bias, vmask if valid is not None else None)
        ctx.a_floor, ctx.trap, ctx.has_valid, ctx.activation = float(a_floor), trap, valid is not None, activation
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_dt, g_la, g_beta, g_gamma):
        dt_raw, a_raw, lam_raw, dt_bias, a_bias, vmask = ctx.saved_tensors
        b, l, h = dt_raw.shape
        BH = _pow2(h)
        BT = max(1, 2048 // BH)
        zeros = None
        grads = []
        for g in (g_dt, g_la, g_beta, g_gamma):
            if g is None:
                zeros = zeros if zeros is not None else torch.zeros(b, l, h, device=dt_raw.device, dtype=torch.float32)
                g = zeros
            grads.append(g.float().contiguous())
        new = lambda t: torch.empty(b, l, h, device=t.device, dtype=t.dtype)  # noqa: E731  (dense (b, l, H) grads)
        d_dtr, d_ar = new(dt_raw), new(a_raw)
        d_lr = new(lam_raw) if ctx.trap else d_dtr
        progs, iters = _param_grid(triton.cdiv(b * l, BT), 1)
        dbias = torch.empty(progs, 2, h, device=dt_raw.device, dtype=torch.float32)
        _coef_bwd_kernel[(progs,)](
            dt_raw, a_raw, lam_raw if ctx.trap else dt_raw, dt_bias, a_bias if a_bias is not None else dt_bias,
            vmask if ctx.has_valid else dt_raw, *grads, d_dtr, d_ar, d_lr, dbias, b * l, dt_raw.stride(1), h,
            ctx.a_floor, iters, BT=BT, BH=BH, TRAP=ctx.trap, HAS_VALID=ctx.has_valid,
            HEAVY=ctx.activation == "heavy_tail", HAS_AB=a_bias is not None, num_warps=4,
        )
        db = dbias.sum(0)
        d_ab = db[1].to(a_bias.dtype) if a_bias is not None else None
        return d_dtr, d_ar, d_lr if ctx.trap else None, db[0].to(dt_bias.dtype), d_ab, None, None, None


def scan_coefficients_triton(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid=None, activation="heavy_tail"):
    raws = [_token_rows(t) if t is not None else None for t in (dt_raw, a_raw, lam_raw)]
    if len({t.stride(1) for t in raws if t is not None}) > 1:  # the kernels take one token stride for all three
        raws = [t.contiguous() if t is not None else None for t in raws]
    ab = a_bias.float().contiguous() if a_bias is not None else None
    return ScanCoefficientsFn.apply(*raws, dt_bias.float().contiguous(), ab, a_floor, valid, activation)
