"""Triton kernels of ``ssm_scan_fused``: the chunked scan with the Mamba-3 q/k/v preparation inside.

The plain kernels (``triton.py``) read q, k (b, l, H, R, N) and v (b, l, H, R, P). These read what
the layer's projection gives — B, C (b, l, R, N) shared by the heads, x (b, l, H, P), the phase
(b, l, H, A) — and build each chunk's tiles in registers, as ``qk_prep`` / ``rank_expand`` would:

    k = rot_φ(RMSNorm(B)·w_B + bias_B[h]),  q = rot_φ(RMSNorm(C)·w_C + bias_C[h]),  v = x ⊙ W_x[h]

(rotation pairs (i, i + A)). So no (b, l, H, R, ·) tensor is written to memory, forward or backward.
The math of the scan itself, the chunking (rows i = t·R + r) and the two-pass backward are those of
``triton.py`` (its helpers are shared); what changes is where the tiles come from and where their
gradients go:

* forward / backward pass 1 hold whole d_state rows, so a rotated tile is built elementwise from two
  loads of the same rows, at columns n and at their rotation partners;
* backward pass 2 walks d_state as pairs of (BLOCK, BW) tiles U, V whose columns are rotation
  partners (U in [0, A), V = U + A), then the unrotated rest two blocks at a time (rotation = 1), so
  that rotating the tiles and un-rotating their gradients are elementwise too;
* dq, dk are un-rotated in registers; d bias sums over the chunk's positions (fp32 atomics into
  (H, R, N)); the gradient of the normalized B/C sums over heads with fp32 atomics into (b, l, R, N)
  (programs run heads fastest, so a row's H adds meet in L2), and a small kernel then applies the
  RMSNorm backward; dφ and dx (Σ_r dv ⊙ W_x) are per (position, head), written once; d W_x sums
  over positions (atomics into (H, R, P)).

RMSNorm's 1/rms per (token, rank) row is computed by the forward (head 0's programs store it) and
read by the backward.

Launch parameters (headdim blocks, warps, pipeline stages, pass 2's column block) come from
``fused_config``: float32 runs its dots on the FMA units with operands staged through shared memory, so
it takes one stage and headdim in 32-wide blocks (several programs per head) to stay inside Hopper's
227 KiB. Every launch is built as a ``Launch`` first (``fwd_launches`` / ``bwd_launches``), which lets
the pre-check (``launch_check``), the resource report (kernels/bench/triton_resources.py) and the
tests' guard zones (tests/guard_zones.py) see exactly what would run. A shape class whose kernels cannot
launch here (pre-check verdict, or OutOfResources / a compile error at launch: ``_run_or_refuse``) is
refused once, with a RuntimeWarning, and runs the unfused Triton chain (``_unfused_fwd`` / ``_unfused_bwd``).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from .._triton_utils import INTERPRET as _INTERPRET
from .._triton_utils import pow2 as _pow2
from .._triton_utils import sincos, tl, token_rows, triton
from ..ssm_io.qk_prep import qk_prep_reference  # (importing ssm_io's op files registers the ops the fallback runs)
from ..ssm_io.rank_expand import rank_expand_reference  # noqa: F401
from .reference import ScanState, normalize_state
from .triton import (
    _block_rows,
    _chunk_docs,
    _chunk_scalar_grads,
    _chunk_vectors,
    _decay_b,
    _decay_g,
    _doc_keep,
    _dot,
    _head_program,
    _mask_phase,
    _next_chunk,
)

__all__ = ["ssm_scan_fused_triton", "fused_config", "launch_check", "shape_class"]

# ------------------------------------------------------------------ building q/k/v tiles
#
# d_state's columns as three tiles: the rotation pairs' halves lo = [0, A), hi = [A, 2A) and the
# unrotated rest [2A, N) (HAS_ROT / HAS_REST say which exist). Rotating is then elementwise between
# lo and hi, sin/cos are taken once per (row, angle) and shared by q and k, and every dot over
# d_state is a sum of (up to) three dots.


@triton.jit
def _row_rstd(X, row_off, rmask, n, nmask, N: tl.constexpr, eps):
    """1/rms of the rows at X + row_off (whole d_state rows: n covers [0, N))."""
    x = tl.load(X + row_off[:, None] + n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, 1) / N + eps)


@triton.jit
def _normed(X, row_off, rmask, rstd, W, BIAS, brow_off, cols, cmask, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """RMSNorm(x)·w + bias at columns ``cols`` of the rows at X + row_off (fp32)."""
    m = rmask[:, None] & cmask[None, :]
    a = tl.load(X + row_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        a = a * rstd[:, None] * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        a += tl.load(BIAS + brow_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return a


@triton.jit
def _angles(PH, ph_off, rmask, cols, cmask, sp_a):
    """sin, cos of the phase at angle columns ``cols`` of the rows' (batch, position, head) (0 -> 0, 1 when masked)."""
    ang = tl.load(PH + ph_off[:, None] + cols[None, :] * sp_a, mask=rmask[:, None] & cmask[None, :], other=0.0)
    return sincos(ang)


@triton.jit
def _prep3(X, row_off, rmask, rstd, W, BIAS, brow_off, sn, cs, a, amask, e, emask, A: tl.constexpr,
           HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr, HAS_REST: tl.constexpr,
           ROTATE: tl.constexpr = True):
    """The prepared rows as (lo, hi, rest) fp32 tiles (an absent tile comes back as another one, unused)."""
    if HAS_REST:
        re = _normed(X, row_off, rmask, rstd, W, BIAS, brow_off, e, emask, HAS_NORM, HAS_BIAS)
    if HAS_ROT:
        lo = _normed(X, row_off, rmask, rstd, W, BIAS, brow_off, a, amask, HAS_NORM, HAS_BIAS)
        hi = _normed(X, row_off, rmask, rstd, W, BIAS, brow_off, a + A, amask, HAS_NORM, HAS_BIAS)
        if ROTATE:
            lo, hi = lo * cs - hi * sn, lo * sn + hi * cs
        if not HAS_REST:
            re = lo
    else:
        lo = re
        hi = re
    return lo, hi, re


@triton.jit
def _dot3(x_lo, x_hi, x_re, y_lo, y_hi, y_re, IEEE: tl.constexpr, HAS_ROT: tl.constexpr, HAS_REST: tl.constexpr,
          TRANS_Y: tl.constexpr, acc=None):
    """Σ_tiles x_t @ y_t (^T): a contraction over d_state held as three column tiles."""
    if HAS_ROT:
        if TRANS_Y:
            acc = _dot(x_hi, tl.trans(y_hi), IEEE, _dot(x_lo, tl.trans(y_lo), IEEE, acc))
        else:
            acc = _dot(x_hi, y_hi, IEEE, _dot(x_lo, y_lo, IEEE, acc))
    if HAS_REST:
        if TRANS_Y:
            acc = _dot(x_re, tl.trans(y_re), IEEE, acc)
        else:
            acc = _dot(x_re, y_re, IEEE, acc)
    return acc


@triton.jit
def _load3(Ptr, row_off, rmask, a, amask, e, emask, A: tl.constexpr, HAS_ROT: tl.constexpr, HAS_REST: tl.constexpr):
    """(lo, hi, rest) tiles of a d_state-minor tensor's rows (fp32): ``_prep3`` with nothing to apply."""
    return _prep3(Ptr, row_off, rmask, 0.0, Ptr, Ptr, row_off, 0.0, 1.0, a, amask, e, emask, A, False, False, HAS_ROT,
                  HAS_REST, ROTATE=False)


@triton.jit
def _store3(Ptr, row_off, rmask, a, amask, e, emask, lo, hi, re, A: tl.constexpr, HAS_ROT: tl.constexpr,
            HAS_REST: tl.constexpr):
    ty = Ptr.dtype.element_ty
    if HAS_ROT:
        m = rmask[:, None] & amask[None, :]
        tl.store(Ptr + row_off[:, None] + a[None, :], lo.to(ty), mask=m)
        tl.store(Ptr + row_off[:, None] + A + a[None, :], hi.to(ty), mask=m)
    if HAS_REST:
        tl.store(Ptr + row_off[:, None] + e[None, :], re.to(ty), mask=rmask[:, None] & emask[None, :])


@triton.jit
def _uv_cols(it, NPAIR: tl.constexpr, A: tl.constexpr, N: tl.constexpr, BW: tl.constexpr):
    """Columns of d_state step ``it`` of backward pass 2: a rotation pair U = [u0, u0 + BW) ⊂ [0, A),
    V = U + A for it < NPAIR, else two blocks of the unrotated rest [2A, N). Returns both column
    vectors, their masks, and whether this step is a rotation pair."""
    w = tl.arange(0, BW)
    pair = it < NPAIR
    u0 = tl.where(pair, it * BW, 2 * A + (it - NPAIR) * 2 * BW)
    ucol = u0 + w
    vcol = tl.where(pair, ucol + A, ucol + BW)
    umask = tl.where(pair, ucol < A, ucol < N)
    vmask = tl.where(pair, ucol < A, vcol < N)
    return ucol, vcol, umask, vmask, pair


@triton.jit
def _prep_uv(X, row_off, rmask, rstd, W, BIAS, brow_off, sn, cs, ucol, vcol, umask, vmask,
             HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr):
    """Prepared U, V tiles (sin, cos: the U columns' angles, 0 and 1 off the rotation pairs)."""
    aU = _normed(X, row_off, rmask, rstd, W, BIAS, brow_off, ucol, umask, HAS_NORM, HAS_BIAS)
    aV = _normed(X, row_off, rmask, rstd, W, BIAS, brow_off, vcol, vmask, HAS_NORM, HAS_BIAS)
    if HAS_ROT:
        return aU * cs - aV * sn, aU * sn + aV * cs
    else:
        return aU, aV


@triton.jit
def _value_rows(X, MX, x_off, rmask, hd, r_i, p, pmask, R: tl.constexpr, P: tl.constexpr, MIMO: tl.constexpr):
    """v rows: x (rows of x at x_off) ⊙ W_x[h, r] (MIMO), or x (SISO), fp32."""
    m = rmask[:, None] & pmask[None, :]
    v = tl.load(X + x_off[:, None] + p[None, :], mask=m, other=0.0).to(tl.float32)
    if MIMO:
        v = v * tl.load(MX + (hd * R + r_i)[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    return v


@triton.jit
def _per_position(x, T: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(T·R, C) rows -> (T, C): the sum over each position's R rows."""
    if R == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (T, R, C)), 1)


@triton.jit
def _per_rank(x, T: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(T·R, C) rows -> (R, C): the sum over positions for each rank."""
    if R == 1:
        return tl.sum(x, 0)[None, :]
    else:
        return tl.sum(tl.reshape(x, (T, R, C)), 0)


# ------------------------------------------------------------------ forward


# The arguments that change with the batch and the length (not the model) are not specialised on (triton
# would otherwise compile again whenever e.g. L is or is not a multiple of 16): one compile per shape class.
_SIZE_ARGS = ["L", "NCHUNKS", "sp_b", "rstd_c_off"]


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _fused_fwd_kernel(
    Bp, Cp, PH, BW_, CW_, BB_, CB_, X, MX, LA, BETA, GAMMA, H0, K0, V0, SEQ, Y, HF, HS, RSTD,
    L, NH, NCHUNKS, s_bc, s_x, sp_b, sp_l, sp_h, sp_a, eps, rstd_c_off,
    R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
    BN: tl.constexpr, BA: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr,
    STORE_STATES: tl.constexpr, IEEE: tl.constexpr, HAS_SEQ: tl.constexpr,
    B_NORM: tl.constexpr, C_NORM: tl.constexpr, B_BIAS: tl.constexpr, C_BIAS: tl.constexpr, HAS_ROT: tl.constexpr,
    HAS_REST: tl.constexpr, MIMO: tl.constexpr,
):
    """As ``triton._fwd_kernel``, with q, k, v (and the carry-in's previous k, v) built from B, C, x and h
    held as the three column tiles."""
    bb, hd, t_i, r_i, n, p, nmask, pmask = _head_program(NH, R, N, P, BN, BP, BLOCK)
    T: tl.constexpr = BLOCK // R
    RP: tl.constexpr = 16
    DT = Bp.dtype.element_ty
    la_base = bb * L * NH + hd
    st_base = bb * NH + hd
    y_base = bb * L * NH * R * P + hd * R * P
    rr = tl.arange(0, RP)
    a = tl.arange(0, BA)
    amask = a < A
    e = 2 * A + tl.arange(0, BE)
    emask = e < N
    brow_i = (hd * R + r_i) * N
    brow_r = (hd * R + rr) * N
    rstd_writer = ((t_i * 0 + hd) == 0) & ((t_i * 0 + tl.program_id(1)) == 0)  # head 0's rows (vector masks)
    st_row = st_base * P * N + p * N

    h_lo, h_hi, h_re = _load3(H0, st_row, pmask, a, amask, e, emask, A, HAS_ROT, HAS_REST)

    for c in range(NCHUNKS):
        pos0 = c * T
        pos_i = pos0 + t_i
        valid = pos_i < L
        tok_i = bb * L + pos_i
        # --- carry-in: h' = alpha_0 h + beta_0 sum_r vp_r kp_r^T (0 where a document starts at pos0)
        keep0 = _doc_keep(SEQ, bb * L, pos0, L, HAS_SEQ)
        a0 = tl.exp(tl.load(LA + la_base + pos0 * NH)) * keep0
        b0 = tl.load(BETA + la_base + pos0 * NH) * keep0
        prev_ok = (rr < R) & (rr * 0 + c > 0)  # the previous position's rows (the chunk before) ...
        st_ok = (rr < R) & (rr * 0 + c == 0)  # ... or the state's
        prow = (bb * L + pos0 - 1) * s_bc + rr * N
        rstd_p = rr * 0.0
        if B_NORM:
            rstd_p = _row_rstd(Bp, prow, prev_ok, n, nmask, N, eps)
        sn_p = 0.0
        cs_p = 1.0
        if HAS_ROT:
            sn_p, cs_p = _angles(PH, bb * sp_b + (pos0 - 1) * sp_l + hd * sp_h + rr * 0, prev_ok, a, amask, sp_a)
        kp_lo, kp_hi, kp_re = _prep3(Bp, prow, prev_ok, rstd_p, BW_, BB_, brow_r, sn_p, cs_p, a, amask, e, emask, A,
                                     B_NORM, B_BIAS, HAS_ROT, HAS_REST)
        s_lo, s_hi, s_re = _load3(K0, st_base * R * N + rr * N, st_ok, a, amask, e, emask, A, HAS_ROT, HAS_REST)
        vp = _value_rows(X, MX, (bb * L + pos0 - 1) * s_x + hd * P + rr * 0, prev_ok, hd, rr, p, pmask, R, P, MIMO)
        vp += tl.load(V0 + st_base * R * P + rr[:, None] * P + p[None, :], mask=st_ok[:, None] & pmask[None, :],
                      other=0.0).to(tl.float32)
        vpT = tl.trans(vp.to(DT))
        if HAS_ROT:
            h_lo = a0 * h_lo + b0 * _dot(vpT, (kp_lo + s_lo).to(DT), IEEE)
            h_hi = a0 * h_hi + b0 * _dot(vpT, (kp_hi + s_hi).to(DT), IEEE)
        if HAS_REST:
            h_re = a0 * h_re + b0 * _dot(vpT, (kp_re + s_re).to(DT), IEEE)
        if STORE_STATES:
            _store3(HS, (st_base * NCHUNKS + c) * P * N + p * N, pmask, a, amask, e, emask, h_lo, h_hi, h_re, A,
                    HAS_ROT, HAS_REST)
        # --- tiles, built from B, C, x
        rows = tok_i * s_bc + r_i * N
        rstd_c = t_i * 0.0
        rstd_b = t_i * 0.0
        if B_NORM:
            rstd_b = _row_rstd(Bp, rows, valid, n, nmask, N, eps)
            tl.store(RSTD + tok_i * R + r_i, rstd_b, mask=valid & rstd_writer)
        if C_NORM:
            rstd_c = _row_rstd(Cp, rows, valid, n, nmask, N, eps)
            tl.store(RSTD + rstd_c_off + tok_i * R + r_i, rstd_c, mask=valid & rstd_writer)
        sn = 0.0
        cs = 1.0
        if HAS_ROT:
            sn, cs = _angles(PH, bb * sp_b + pos_i * sp_l + hd * sp_h, valid, a, amask, sp_a)  # shared by q and k
        q_lo, q_hi, q_re = _prep3(Cp, rows, valid, rstd_c, CW_, CB_, brow_i, sn, cs, a, amask, e, emask, A,
                                  C_NORM, C_BIAS, HAS_ROT, HAS_REST)
        k_lo, k_hi, k_re = _prep3(Bp, rows, valid, rstd_b, BW_, BB_, brow_i, sn, cs, a, amask, e, emask, A,
                                  B_NORM, B_BIAS, HAS_ROT, HAS_REST)
        q_lo, q_hi, q_re = q_lo.to(DT), q_hi.to(DT), q_re.to(DT)
        k_lo, k_hi, k_re = k_lo.to(DT), k_hi.to(DT), k_re.to(DT)
        v = _value_rows(X, MX, tok_i * s_x + hd * P, valid, hd, r_i, p, pmask, R, P, MIMO).to(DT)
        Lp, Llast, Lnext, gam, bnext, wlast, sq, same0, same_last, _in_last = _chunk_vectors(
            LA, BETA, GAMMA, la_base, pos_i, t_i, r_i, L, NH, T, SEQ, bb * L, pos0, HAS_SEQ)
        # --- outputs
        y = _dot3(q_lo, q_hi, q_re, h_lo.to(DT), h_hi.to(DT), h_re.to(DT), IEEE, HAS_ROT, HAS_REST, True)
        y = (tl.exp(Lp) * same0)[:, None] * y
        S = _dot3(q_lo, q_hi, q_re, k_lo, k_hi, k_re, IEEE, HAS_ROT, HAS_REST, True)
        W = gam[None, :] * _decay_g(Lp, t_i, sq, HAS_SEQ) + bnext[None, :] * _decay_b(Lp, Lnext, t_i, sq, HAS_SEQ)
        M = (S * W).to(DT)
        y = _dot(M, v, IEEE, y)
        tl.store(Y + y_base + pos_i[:, None] * (NH * R * P) + r_i[:, None] * P + p[None, :], y.to(Y.dtype.element_ty),
                 mask=valid[:, None] & pmask[None, :])
        # --- state to the chunk's end
        vwT = tl.trans((v.to(tl.float32) * wlast[:, None]).to(DT))
        decay = tl.exp(Llast) * same_last
        if HAS_ROT:
            h_lo = _dot(vwT, k_lo, IEEE, decay * h_lo)
            h_hi = _dot(vwT, k_hi, IEEE, decay * h_hi)
        if HAS_REST:
            h_re = _dot(vwT, k_re, IEEE, decay * h_re)

    _store3(HF, st_row, pmask, a, amask, e, emask, h_lo, h_hi, h_re, A, HAS_ROT, HAS_REST)


# ------------------------------------------------------------------ backward pass 1: the dH chain


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _fused_bwd_dh_kernel(
    Cp, PH, CW_, CB_, RSTD, DY, LA, BETA, K0, V0, SEQ, DHF, DHS, DH0, DK0P, DV0,
    L, NH, NCHUNKS, s_bc, sp_b, sp_l, sp_h, sp_a, rstd_c_off,
    R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
    BN: tl.constexpr, BA: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr,
    IEEE: tl.constexpr, HAS_SEQ: tl.constexpr, C_NORM: tl.constexpr, C_BIAS: tl.constexpr, HAS_ROT: tl.constexpr,
    HAS_REST: tl.constexpr,
):
    """As ``triton._bwd_dh_kernel``, with q built from C and H held as the three column tiles."""
    bb, hd, t_i, r_i, n, p, nmask, pmask = _head_program(NH, R, N, P, BN, BP, BLOCK)
    T: tl.constexpr = BLOCK // R
    DT = Cp.dtype.element_ty
    la_base = bb * L * NH + hd
    st_base = bb * NH + hd
    v_base = bb * L * NH * R * P + hd * R * P
    brow_i = (hd * R + r_i) * N
    a = tl.arange(0, BA)
    amask = a < A
    e = 2 * A + tl.arange(0, BE)
    emask = e < N
    st_row = st_base * P * N + p * N

    H_lo, H_hi, H_re = _load3(DHF, st_row, pmask, a, amask, e, emask, A, HAS_ROT, HAS_REST)
    a_nx = tl.zeros([], dtype=tl.float32) + 1.0
    for ii in range(NCHUNKS):
        c = NCHUNKS - 1 - ii
        _store3(DHS, (st_base * NCHUNKS + c) * P * N + p * N, pmask, a, amask, e, emask, H_lo, H_hi, H_re, A,
                HAS_ROT, HAS_REST)
        pos0 = c * T
        pos_i = pos0 + t_i
        valid = pos_i < L
        tok_i = bb * L + pos_i
        la_row = tl.load(LA + la_base + pos_i * NH, mask=valid & (t_i > 0) & (r_i == 0), other=0.0)
        Lp = tl.cumsum(la_row, 0)
        Llast = tl.sum(la_row, 0)
        _sq, same0, same_last, _in_last = _chunk_docs(SEQ, bb * L, pos_i, pos0, L, T, HAS_SEQ)
        rstd_c = t_i * 0.0
        if C_NORM:
            rstd_c = tl.load(RSTD + rstd_c_off + tok_i * R + r_i, mask=valid, other=0.0)
        sn = 0.0
        cs = 1.0
        if HAS_ROT:
            sn, cs = _angles(PH, bb * sp_b + pos_i * sp_l + hd * sp_h, valid, a, amask, sp_a)
        q_lo, q_hi, q_re = _prep3(Cp, tok_i * s_bc + r_i * N, valid, rstd_c, CW_, CB_, brow_i, sn, cs, a, amask, e, emask,
                                  A, C_NORM, C_BIAS, HAS_ROT, HAS_REST)
        dy = tl.load(DY + v_base + pos_i[:, None] * (NH * R * P) + r_i[:, None] * P + p[None, :],
                     mask=valid[:, None] & pmask[None, :], other=0.0)
        dyeT = tl.trans((dy.to(tl.float32) * (tl.exp(Lp) * same0)[:, None]).to(DT))
        decay = tl.exp(Llast) * same_last * a_nx
        if HAS_ROT:
            H_lo = _dot(dyeT, q_lo.to(DT), IEEE, decay * H_lo)
            H_hi = _dot(dyeT, q_hi.to(DT), IEEE, decay * H_hi)
        if HAS_REST:
            H_re = _dot(dyeT, q_re.to(DT), IEEE, decay * H_re)
        a_nx = tl.exp(tl.load(LA + la_base + pos0 * NH)) * _doc_keep(SEQ, bb * L, pos0, L, HAS_SEQ)

    b0 = tl.load(BETA + la_base)
    _store3(DH0, st_row, pmask, a, amask, e, emask, a_nx * H_lo, a_nx * H_hi, a_nx * H_re, A, HAS_ROT, HAS_REST)
    for r in tl.static_range(R):
        k_row = K0 + st_base * R * N + r * N
        v0 = tl.load(V0 + st_base * R * P + r * P + p, mask=pmask, other=0.0).to(tl.float32)
        dv0 = tl.zeros([BP], dtype=tl.float32)
        dk_row = ((st_base * tl.num_programs(1) + tl.program_id(1)) * R + r) * N
        if HAS_ROT:
            k_lo = tl.load(k_row + a, mask=amask, other=0.0).to(tl.float32)
            k_hi = tl.load(k_row + A + a, mask=amask, other=0.0).to(tl.float32)
            dv0 += tl.sum(H_lo * k_lo[None, :], 1) + tl.sum(H_hi * k_hi[None, :], 1)
            tl.store(DK0P + dk_row + a, b0 * tl.sum(H_lo * v0[:, None], 0), mask=amask)
            tl.store(DK0P + dk_row + A + a, b0 * tl.sum(H_hi * v0[:, None], 0), mask=amask)
        if HAS_REST:
            k_re = tl.load(k_row + e, mask=emask, other=0.0).to(tl.float32)
            dv0 += tl.sum(H_re * k_re[None, :], 1)
            tl.store(DK0P + dk_row + e, b0 * tl.sum(H_re * v0[:, None], 0), mask=emask)
        tl.store(DV0 + st_base * R * P + r * P + p, b0 * dv0, mask=pmask)


# ------------------------------------------------------------------ backward pass 2: one chunk's gradients


@triton.jit
def _state_uv(DHS, HS, st_off, p, pmask, ucol, vcol, umask, vmask, N: tl.constexpr):
    """H = H_{c+1} and h' at the U and V columns, (BP, BW) each."""
    pu = p[:, None] * N + ucol[None, :]
    pv = p[:, None] * N + vcol[None, :]
    mu = pmask[:, None] & umask[None, :]
    mv = pmask[:, None] & vmask[None, :]
    return (tl.load(DHS + st_off + pu, mask=mu, other=0.0), tl.load(DHS + st_off + pv, mask=mv, other=0.0),
            tl.load(HS + st_off + pu, mask=mu, other=0.0), tl.load(HS + st_off + pv, mask=mv, other=0.0))


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _fused_bwd_chunk_kernel(
    Bp, Cp, PH, BW_, CW_, BB_, CB_, X, MX, LA, BETA, GAMMA, K0, V0, SEQ, RSTD, HS, DHS, DY,
    GB, GC, DBB, DCB, DPH, DX, DMX, DLA, DBETA, DGAMMA, SCR,
    L, NH, NCHUNKS, s_bc, s_x, sp_b, sp_l, sp_h, sp_a, rstd_c_off,
    R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
    BW: tl.constexpr, NPAIR: tl.constexpr, NIT: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr,
    IEEE: tl.constexpr, HAS_SEQ: tl.constexpr, B_NORM: tl.constexpr, C_NORM: tl.constexpr,
    B_BIAS: tl.constexpr, C_BIAS: tl.constexpr, HAS_ROT: tl.constexpr, MIMO: tl.constexpr,
):
    """As ``triton._bwd_chunk_kernel`` (see its docstring for the formulas), with q, k, v built from B, C, x
    and their gradients taken back through the preparation: see the module docstring. One program per
    (batch, chunk, head), heads fastest."""
    pid = tl.program_id(0)
    hd = (pid % NH).to(tl.int64)
    c = (pid // NH) % NCHUNKS
    bb = (pid // (NH * NCHUNKS)).to(tl.int64)
    T: tl.constexpr = BLOCK // R
    RP: tl.constexpr = 16
    DT = Bp.dtype.element_ty

    i = tl.arange(0, BLOCK)
    t_i = i // R
    r_i = i % R
    p = tl.arange(0, BP)
    rr = tl.arange(0, RP)
    r_ar = tl.arange(0, R)
    pmask = p < P
    la_base = bb * L * NH + hd
    st_base = bb * NH + hd
    st_off = (st_base * NCHUNKS + c) * P * N
    brow_i = (hd * R + r_i) * N
    brow_r = (hd * R + rr) * N

    pos0 = c * T
    pos_i = pos0 + t_i
    valid = pos_i < L
    tok_i = bb * L + pos_i
    rows = tok_i * s_bc + r_i * N
    ph_rows = bb * sp_b + pos_i * sp_l + hd * sp_h
    y_off = (bb * L * NH * R * P + hd * R * P) + pos_i[:, None] * (NH * R * P) + r_i[:, None] * P + p[None, :]
    v_mask = valid[:, None] & pmask[None, :]
    v = _value_rows(X, MX, tok_i * s_x + hd * P, valid, hd, r_i, p, pmask, R, P, MIMO).to(DT)
    dy = tl.load(DY + y_off, mask=v_mask, other=0.0)
    rstd_b = t_i * 0.0
    rstd_c = t_i * 0.0
    rstd_p = rr * 0.0
    if B_NORM:
        rstd_b = tl.load(RSTD + tok_i * R + r_i, mask=valid, other=0.0)
    if C_NORM:
        rstd_c = tl.load(RSTD + rstd_c_off + tok_i * R + r_i, mask=valid, other=0.0)
    Lp, Llast, Lnext, gam, bnext, wlast, sq, same0, same_last, in_last = _chunk_vectors(
        LA, BETA, GAMMA, la_base, pos_i, t_i, r_i, L, NH, T, SEQ, bb * L, pos0, HAS_SEQ)
    eL = tl.exp(Lp) * same0
    eLast = tl.exp(Llast) * same_last
    a_nx, b_nx = _next_chunk(LA, BETA, la_base, pos0, L, NH, T, SEQ, bb * L, HAS_SEQ)
    g_last = eLast * a_nx

    # previous position's (k, v) rows (this chunk's carry-in): the chunk before, or the state
    prev_ok = (rr < R) & (rr * 0 + c > 0)
    st_ok = (rr < R) & (rr * 0 + c == 0)
    prow = (bb * L + pos0 - 1) * s_bc + rr * N
    pph = bb * sp_b + (pos0 - 1) * sp_l + hd * sp_h + rr * 0
    if B_NORM:
        rstd_p = tl.load(RSTD + (bb * L + pos0 - 1) * R + rr, mask=prev_ok, other=0.0)
    vp = _value_rows(X, MX, (bb * L + pos0 - 1) * s_x + hd * P + rr * 0, prev_ok, hd, rr, p, pmask, R, P, MIMO)
    vp += tl.load(V0 + st_base * R * P + rr[:, None] * P + p[None, :], mask=st_ok[:, None] & pmask[None, :],
                  other=0.0).to(tl.float32)
    vp = vp.to(DT)

    # --- pass over d_state: S = Q K^T, KH = K H^T, and the carry-in contractions
    S = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    KH = tl.zeros([BLOCK, BP], dtype=tl.float32)
    QKP = tl.zeros([BLOCK, RP], dtype=tl.float32)  # q_i . kp_r
    HKP = tl.zeros([BP, RP], dtype=tl.float32)  # H kp_r
    hH = tl.zeros([BP], dtype=tl.float32)  # <H, h'> by rows
    for it in range(NIT):
        ucol, vcol, umask, vmask, pair = _uv_cols(it, NPAIR, A, N, BW)
        sn = 0.0
        cs = 1.0
        if HAS_ROT:
            sn, cs = _angles(PH, ph_rows, valid, ucol, umask & pair, sp_a)  # shared by q and k
        qU, qV = _prep_uv(Cp, rows, valid, rstd_c, CW_, CB_, brow_i, sn, cs, ucol, vcol, umask, vmask, C_NORM, C_BIAS, HAS_ROT)
        kU, kV = _prep_uv(Bp, rows, valid, rstd_b, BW_, BB_, brow_i, sn, cs, ucol, vcol, umask, vmask, B_NORM, B_BIAS, HAS_ROT)
        if HAS_ROT:
            sn, cs = _angles(PH, pph, prev_ok, ucol, umask & pair, sp_a)
        kpU, kpV = _prep_uv(Bp, prow, prev_ok, rstd_p, BW_, BB_, brow_r, sn, cs, ucol, vcol, umask, vmask, B_NORM, B_BIAS,
                            HAS_ROT)
        k0_off = st_base * R * N + rr[:, None] * N
        kpU += tl.load(K0 + k0_off + ucol[None, :], mask=st_ok[:, None] & umask[None, :], other=0.0).to(tl.float32)
        kpV += tl.load(K0 + k0_off + vcol[None, :], mask=st_ok[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        HcU, HcV, hpU, hpV = _state_uv(DHS, HS, st_off, p, pmask, ucol, vcol, umask, vmask, N)
        qU, qV, kU, kV, kpU, kpV = qU.to(DT), qV.to(DT), kU.to(DT), kV.to(DT), kpU.to(DT), kpV.to(DT)
        S = _dot(qV, tl.trans(kV), IEEE, _dot(qU, tl.trans(kU), IEEE, S))
        KH = _dot(kV, tl.trans(HcV), IEEE, _dot(kU, tl.trans(HcU), IEEE, KH))
        QKP = _dot(qV, tl.trans(kpV), IEEE, _dot(qU, tl.trans(kpU), IEEE, QKP))
        HKP = _dot(HcV, tl.trans(kpV), IEEE, _dot(HcU, tl.trans(kpU), IEEE, HKP))
        hH += tl.sum(HcU.to(tl.float32) * hpU.to(tl.float32), 1) + tl.sum(HcV.to(tl.float32) * hpV.to(tl.float32), 1)

    # --- intra-chunk: mask gradients
    dgam, dbet, vec, scr, ij, ji = _mask_phase(dy, v, S, Lp, Lnext, t_i, sq, gam, bnext, SCR, pid, BLOCK, IEEE, HAS_SEQ)

    # --- dv: intra + through h_out (and the next chunk's carry-in); then dx = sum_r dv W_x, d W_x
    vf = v.to(tl.float32)
    z = tl.sum(vf * KH, 1)  # v_j^T H k_j
    omega = a_nx * wlast + tl.where(t_i == T - 1, b_nx, 0.0)
    MT = tl.load(scr + ji)
    dv = _dot(MT, dy, IEEE) + omega[:, None] * KH
    tt = tl.arange(0, T)
    pos_t = pos0 + tt
    valid_t = pos_t < L
    if MIMO:
        xr = tl.load(X + (tok_i * s_x + hd * P)[:, None] + p[None, :], mask=v_mask, other=0.0).to(tl.float32)
        mx = tl.load(MX + (hd * R + r_i)[:, None] * P + p[None, :], mask=v_mask, other=0.0).to(tl.float32)
        dmx = _per_rank(dv * xr, T, R, BP)
        tl.atomic_add(DMX + (hd * R + r_ar)[:, None] * P + p[None, :], dmx, mask=(r_ar[:, None] < R) & pmask[None, :],
                      sem="relaxed")
        dx = _per_position(dv * mx, T, R, BP)
    else:
        dx = dv
    tl.store(DX + ((bb * L + pos_t) * NH + hd)[:, None] * P + p[None, :], dx.to(DX.dtype.element_ty),
             mask=valid_t[:, None] & pmask[None, :])

    # --- second pass over d_state: dq, dk, taken back through the rotation, the bias and (after the
    # heads are summed) the norm. The atomics are relaxed: only their sum matters (no ordering), so
    # they compile to fire-and-forget reductions.
    dS = tl.load(scr + BLOCK * BLOCK + ij)
    dST = tl.load(scr + BLOCK * BLOCK + ji)
    vq = tl.zeros([BLOCK], dtype=tl.float32)
    g_row = (tok_i * R + r_i) * N
    for it in range(NIT):
        ucol, vcol, umask, vmask, pair = _uv_cols(it, NPAIR, A, N, BW)
        sn = 0.0
        cs = 1.0
        if HAS_ROT:
            sn, cs = _angles(PH, ph_rows, valid, ucol, umask & pair, sp_a)
        qU, qV = _prep_uv(Cp, rows, valid, rstd_c, CW_, CB_, brow_i, sn, cs, ucol, vcol, umask, vmask, C_NORM, C_BIAS, HAS_ROT)
        kU, kV = _prep_uv(Bp, rows, valid, rstd_b, BW_, BB_, brow_i, sn, cs, ucol, vcol, umask, vmask, B_NORM, B_BIAS, HAS_ROT)
        HcU, HcV, hpU, hpV = _state_uv(DHS, HS, st_off, p, pmask, ucol, vcol, umask, vmask, N)
        dqiU = eL[:, None] * _dot(dy, hpU.to(DT), IEEE)
        dqiV = eL[:, None] * _dot(dy, hpV.to(DT), IEEE)
        vq += tl.sum(qU * dqiU, 1) + tl.sum(qV * dqiV, 1)
        dqU = _dot(dS, kU.to(DT), IEEE) + dqiU
        dqV = _dot(dS, kV.to(DT), IEEE) + dqiV
        dkU = _dot(dST, qU.to(DT), IEEE) + omega[:, None] * _dot(v, HcU.to(DT), IEEE)
        dkV = _dot(dST, qV.to(DT), IEEE) + omega[:, None] * _dot(v, HcV.to(DT), IEEE)
        mU = valid[:, None] & umask[None, :]
        mV = valid[:, None] & vmask[None, :]
        if HAS_ROT:  # dφ = Σ dV·out_U − dU·out_V over q and k, per position (rotated columns only)
            dph = _per_position(dqV * qU - dqU * qV + dkV * kU - dkU * kV, T, R, BW)
            tl.store(DPH + (bb * sp_b + pos_t * sp_l + hd * sp_h)[:, None] + ucol[None, :] * sp_a, dph,
                     mask=valid_t[:, None] & (umask & pair)[None, :])
            daU = dqU * cs + dqV * sn
            dqV = dqV * cs - dqU * sn
            dqU = daU
            daU = dkU * cs + dkV * sn
            dkV = dkV * cs - dkU * sn
            dkU = daU
        b_row = (hd * R + r_ar)[:, None] * N
        bmU = (r_ar[:, None] < R) & umask[None, :]
        bmV = (r_ar[:, None] < R) & vmask[None, :]
        if C_BIAS:
            tl.atomic_add(DCB + b_row + ucol[None, :], _per_rank(dqU, T, R, BW), mask=bmU, sem="relaxed")
            tl.atomic_add(DCB + b_row + vcol[None, :], _per_rank(dqV, T, R, BW), mask=bmV, sem="relaxed")
        if B_BIAS:
            tl.atomic_add(DBB + b_row + ucol[None, :], _per_rank(dkU, T, R, BW), mask=bmU, sem="relaxed")
            tl.atomic_add(DBB + b_row + vcol[None, :], _per_rank(dkV, T, R, BW), mask=bmV, sem="relaxed")
        tl.atomic_add(GC + g_row[:, None] + ucol[None, :], dqU, mask=mU, sem="relaxed")
        tl.atomic_add(GC + g_row[:, None] + vcol[None, :], dqV, mask=mV, sem="relaxed")
        tl.atomic_add(GB + g_row[:, None] + ucol[None, :], dkU, mask=mU, sem="relaxed")
        tl.atomic_add(GB + g_row[:, None] + vcol[None, :], dkV, mask=mV, sem="relaxed")
    vec += vq

    _chunk_scalar_grads(dgam, dbet, vec, vq, z, hH, dy, vp, eL, QKP, HKP, a_nx, g_last, Llast, Lp, Lnext, wlast, in_last,
                        t_i, pos0, L, NH, BETA, la_base, SEQ, bb * L, DLA, DBETA, DGAMMA, T, R, IEEE, HAS_SEQ)


# ------------------------------------------------------------------ the norm's backward, after the heads are summed


@triton.jit(do_not_specialize=["n_rows", "rstd_off"])
def _norm_bwd_kernel(X, W, RSTD, G, DX, DW_PART, n_rows, s_bc, rstd_off,
                     R: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rows (token, rank) of B or C: with g = Σ_h d(normed x) (fp32), dx = rstd (w g - x̂ mean(x̂ w g)),
    x̂ = x rstd, and this program's part of dw = Σ_rows g x̂ (no norm: dx = g)."""
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BR + tl.arange(0, BR)  # int64: token x s_bc passes 2^31 at ~250k tokens of a 8k-wide projection
    n = tl.arange(0, BN)
    m = (row < n_rows)[:, None] & (n < N)[None, :]
    g = tl.load(G + row[:, None] * N + n[None, :], mask=m, other=0.0)
    if HAS_NORM:
        x = tl.load(X + ((row // R) * s_bc + (row % R) * N)[:, None] + n[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rstd_off + row, mask=row < n_rows, other=0.0)
        xh = x * rstd[:, None]
        w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
        tl.store(DW_PART + pid * N + n, tl.sum(g * xh, 0), mask=n < N)
        gw = g * w[None, :]
        dx = rstd[:, None] * (gw - xh * (tl.sum(xh * gw, 1) / N)[:, None])
    else:
        dx = g
    tl.store(DX + row[:, None] * N + n[None, :], dx.to(DX.dtype.element_ty), mask=m)


# ------------------------------------------------------------------ launch
#
# Every launch is first built as a ``Launch`` (kernel, grid, arguments, constexprs, warps, stages) by
# ``fwd_launches`` / ``bwd_launches``, then run. The same builders, given "meta" tensors, tell
# ``kernels/bench/triton_resources.py`` (and the dispatcher's pre-check) exactly what would be
# compiled, without a GPU or any memory.


class Launch(NamedTuple):
    kernel: object  # the @triton.jit function
    grid: tuple
    args: tuple
    meta: dict  # constexpr arguments
    num_warps: int
    num_stages: int

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta, num_warps=self.num_warps, num_stages=self.num_stages)

    def warmup(self):
        """Compile (or fetch from the cache) without launching; returns triton's CompiledKernel."""
        return self.kernel.warmup(*self.args, grid=self.grid, **self.meta, num_warps=self.num_warps,
                                  num_stages=self.num_stages)


@dataclass(frozen=True)
class FusedConfig:
    """Launch parameters of the fused kernels for one (dtype, d_state, rank) class (see ``fused_config``)."""

    fwd_bp: int  # headdim block of the forward (programs per (batch, head) = P / fwd_bp)
    fwd_warps: int
    fwd_stages: int
    dh_bp: int  # headdim block of backward pass 1
    dh_warps: int
    dh_stages: int
    bw: int  # d_state column block of backward pass 2 (two per step)
    bwd_warps: int
    bwd_stages: int


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def fused_config(dtype: torch.dtype, n: int, r: int, p: int) -> FusedConfig:
    """The launch parameters for these sizes: chosen so that every kernel's shared memory stays well
    under Hopper's 227 KiB (``kernels/bench/triton_resources.py`` checks it per case) with few
    register spills; environment variables override them for experiments (HYBRIDLAB_SSM_FUSED_FWD_BP,
    _FWD_WARPS, _FWD_STAGES, _DH_BP, _DH_WARPS, _BW, _BWD_WARPS)."""
    bp = max(_pow2(p), 16)
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units with their operands staged through shared memory, and a
        # two-stage pipeline of the forward's chunk loop doubles that: 357 / 393 KiB (R 1 / 4, d_state 128,
        # headdim 64) on sm_90, more than the 227 KiB a block may have (the first H200 run's OutOfResources).
        # One stage and two headdim blocks per head: 88 KiB, no heavy spills; backward pass 2 in 16-wide
        # column blocks: 100 KiB and ~1 KB of spills where 32-wide ones spilled ~29 KB (ptxas fell back to 32
        # registers).
        cfg = dict(fwd_bp=min(bp, 32), fwd_warps=8, fwd_stages=1, bw=16)
    else:
        # 16-bit: the forward's two stages take 164 / 180 KiB (R 1 / 4, d_state 128). Backward pass 2 in 16-wide
        # column blocks, as fp32: with 32-wide ones (bf16, 8 warps, triton 3.6, sm_90) compute-sanitizer showed an
        # invalid 512-byte __shared__ read in _fused_bwd_chunk_kernel (the illegal memory access of the first H200
        # runs); 16-wide blocks (or 4 warps) matched the float64 reference to 5e-3 with no guard-zone violation.
        cfg = dict(fwd_bp=bp, fwd_warps=8, fwd_stages=2, bw=16)
    # backward pass 2 holds whole headdim rows: at fp32 headdim 128 eight warps leave ptxas 32 registers and ~31 KB of
    # spills per thread (triton 3.6, sm_90, d_state 128); sixteen warps: 64 registers, ~4.5 KB
    wide_fp32 = dtype == torch.float32 and bp >= 128
    cfg.update(dh_bp=min(bp, 32), dh_warps=4, dh_stages=2, bwd_warps=16 if wide_fp32 else 8, bwd_stages=1)
    env = dict(fwd_bp="HYBRIDLAB_SSM_FUSED_FWD_BP", fwd_warps="HYBRIDLAB_SSM_FUSED_FWD_WARPS",
               fwd_stages="HYBRIDLAB_SSM_FUSED_FWD_STAGES", bwd_stages="HYBRIDLAB_SSM_FUSED_BWD_STAGES", dh_bp="HYBRIDLAB_SSM_DH_BP", dh_warps="HYBRIDLAB_SSM_DH_WARPS",
               bw="HYBRIDLAB_SSM_FUSED_BW", bwd_warps="HYBRIDLAB_SSM_FUSED_BWD_WARPS")
    for key, name in env.items():
        v = _env_int(name)
        if v is not None:
            cfg[key] = v
    cfg["fwd_bp"] = max(16, min(bp, _pow2(cfg["fwd_bp"])))
    cfg["dh_bp"] = max(16, min(bp, _pow2(cfg["dh_bp"])))
    return FusedConfig(**cfg)


def _uv_plan(n: int, A: int, bw: int) -> tuple[int, int, int]:
    """(BW, NPAIR, NIT) of backward pass 2: BW-wide column blocks (a power of two >= 16), NPAIR rotation
    pair steps covering [0, A), then steps of two blocks over [2A, N)."""
    bw = max(16, min(_pow2(bw), _pow2(A) if A else _pow2(n)))
    npair = -(-A // bw)
    return bw, npair, npair + -(-(n - 2 * A) // (2 * bw))


def _meta(B, x, phase, block):
    b, l, r, n = B.shape
    nh, p = x.shape[2], x.shape[3]
    A = phase.shape[-1] if phase is not None else 0
    return b, l, r, n, nh, p, A, -(-l // (block // r))


def _phase_args(phase):
    return tuple(phase.stride()) if phase is not None else (0, 0, 0, 0)


def _flags(b_norm, c_norm, b_bias, c_bias, phase, mimo_x):
    A = phase.shape[-1] if phase is not None else 0
    return dict(B_NORM=b_norm is not None, C_NORM=c_norm is not None, B_BIAS=b_bias is not None, C_BIAS=c_bias is not None,
                HAS_ROT=A > 0, MIMO=mimo_x is not None)


def _tiles(n: int, A: int) -> dict:
    """Widths of the (lo, hi, rest) column tiles of the forward and backward pass 1 (powers of two >= 16,
    the tensor cores' smallest K), and whether the rest exists."""
    return dict(BA=max(16, _pow2(A)) if A else 16, BE=max(16, _pow2(n - 2 * A)) if n > 2 * A else 16, HAS_REST=n > 2 * A)


def _warps(w: int) -> int:
    return 4 if _INTERPRET else w


def fwd_launches(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq, eps, block,
                 store):
    """-> ((y, h_final, h' per chunk, rstd), [Launch]) of the forward."""
    b, l, r, n, nh, p, A, nchunks = _meta(B, x, phase, block)
    dev = B.device
    cfg = fused_config(B.dtype, n, r, p)
    y = torch.empty(b, l, nh, r, p, device=dev, dtype=B.dtype)
    hf = torch.empty(b, nh, p, n, device=dev, dtype=torch.float32)
    hs = torch.empty(b, nh, nchunks, p, n, device=dev, dtype=B.dtype) if store else B.new_empty(0)
    # [0]: B's rows, [1]: C's (zeros where a side has no norm: every output is defined)
    rstd = torch.zeros(2, b, l, r, device=dev, dtype=torch.float32)
    ieee = B.dtype == torch.float32
    BN = max(_pow2(n), 16)
    any_t = la  # stands in for an absent optional tensor (never read: its flag is off)
    opt = lambda t: t if t is not None else any_t  # noqa: E731
    launch = Launch(
        _fused_fwd_kernel, (b * nh, -(-p // cfg.fwd_bp)),
        (B, C, opt(phase), opt(b_norm), opt(c_norm), opt(b_bias), opt(c_bias), x, opt(mimo_x), la, beta, gamma, h0, k0, v0,
         opt(seq), y, hf, hs if store else hf, rstd, l, nh, nchunks, B.stride(1), x.stride(1), *_phase_args(phase), eps,
         b * l * r),
        dict(R=r, N=n, P=p, A=A, BN=BN, BP=cfg.fwd_bp, BLOCK=block, STORE_STATES=store, IEEE=ieee, HAS_SEQ=seq is not None,
             **_flags(b_norm, c_norm, b_bias, c_bias, phase, mimo_x), **_tiles(n, A)),
        _warps(cfg.fwd_warps), cfg.fwd_stages,
    )
    return (y, hf, hs, rstd), [launch]


def _fused_fwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq, eps, block, store):
    args = (B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq, eps, block, store)
    sc = shape_class(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, seq, block, store)
    if not launch_check(sc):
        outs, launches = fwd_launches(*args)
        if _run_or_refuse(sc, launches):
            return outs
    return _unfused_fwd(*args)


def _run(launches):
    """Launch in order (one seam: tests/guard_zones.py runs them inside guard zones instead)."""
    for launch in launches:
        launch()


def _cannot_launch_errors() -> tuple:
    """The exceptions that mean "this kernel cannot be built or launched here" (raised before it runs, so
    nothing was written yet that the fallback would not overwrite): triton's OutOfResources (shared memory,
    registers, threads), its compile errors, a ptxas failure. Looked up by name: they moved between releases."""
    found = []
    for mod, name in (("triton.runtime.errors", "OutOfResources"), ("triton.compiler.errors", "CompilationError"),
                      ("triton.runtime.errors", "PTXASError"), ("triton.backends.nvidia.compiler", "PTXASError")):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(dict.fromkeys(found))


_CANNOT_LAUNCH = _cannot_launch_errors()


def _run_or_refuse(sc, launches) -> bool:
    """Run the fused launches; True when they ran. When one of them cannot be built or launched (the safety net
    behind ``launch_check``'s pre-check: e.g. a driver that refuses what the metadata said fits), the class is
    marked as not launchable, with the one warning, and False tells the caller to take the unfused chain."""
    try:
        _run(launches)
        return True
    except _CANNOT_LAUNCH as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        _refuse(sc, f"{type(e).__name__}: {first.strip()[:200]}")
        return False


def _norm_rows(n: int) -> int:
    """Rows per program of the norm's backward (a ~4096-element fp32 tile)."""
    return max(1, min(64, 4096 // max(_pow2(n), 16)))


def bwd_launches(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq, hs, rstd, dy, dhf,
                 eps, block):
    """-> (buffers, [Launch]) of the backward: pass 1 (the dH chain), pass 2 (every chunk), the norm's backward of
    B and of C. The buffers are finished by ``_bwd_finish``."""
    b, l, r, n, nh, p, A, nchunks = _meta(B, x, phase, block)
    dev, f32 = B.device, torch.float32
    cfg = fused_config(B.dtype, n, r, p)
    ieee = B.dtype == torch.float32
    flags = _flags(b_norm, c_norm, b_bias, c_bias, phase, mimo_x)
    any_t = la
    opt = lambda t: t if t is not None else any_t  # noqa: E731
    seq_t = opt(seq)
    BN, BP = max(_pow2(n), 16), max(_pow2(p), 16)
    # pass 1: the dH chain
    dhs = torch.empty(b, nh, nchunks, p, n, device=dev, dtype=B.dtype)
    dh0 = torch.empty(b, nh, p, n, device=dev, dtype=f32)
    dv0 = torch.empty(b, nh, r, p, device=dev, dtype=f32)
    npb = -(-p // cfg.dh_bp)
    dk0p = torch.empty(b, nh, npb, r, n, device=dev, dtype=f32)
    rstd_c_off = b * l * r
    launches = [Launch(
        _fused_bwd_dh_kernel, (b * nh, npb),
        (C, opt(phase), opt(c_norm), opt(c_bias), rstd, dy, la, beta, k0, v0, seq_t, dhf, dhs, dh0, dk0p, dv0,
         l, nh, nchunks, C.stride(1), *_phase_args(phase), rstd_c_off),
        dict(R=r, N=n, P=p, A=A, BN=BN, BP=cfg.dh_bp, BLOCK=block, IEEE=ieee, HAS_SEQ=seq is not None,
             C_NORM=flags["C_NORM"], C_BIAS=flags["C_BIAS"], HAS_ROT=flags["HAS_ROT"], **_tiles(n, A)),
        _warps(cfg.dh_warps), cfg.dh_stages,
    )]
    # pass 2: every chunk's gradients, heads fastest
    gb = torch.zeros(b, l, r, n, device=dev, dtype=f32)
    gc = torch.zeros(b, l, r, n, device=dev, dtype=f32)
    dbb = torch.zeros(nh, r, n, device=dev, dtype=f32) if b_bias is not None else None
    dcb = torch.zeros(nh, r, n, device=dev, dtype=f32) if c_bias is not None else None
    dph = torch.empty_like(phase) if phase is not None else None
    dx = torch.empty(b, l, nh, p, device=dev, dtype=x.dtype)
    dmx = torch.zeros(nh, r, p, device=dev, dtype=f32) if mimo_x is not None else None
    dla, dbeta, dgamma = (torch.empty(b, l, nh, device=dev, dtype=f32) for _ in range(3))
    scr = torch.empty(b * nchunks * nh, 2, block, block, device=dev, dtype=B.dtype)
    bw, npair, nit = _uv_plan(n, A, cfg.bw)
    launches.append(Launch(
        _fused_bwd_chunk_kernel, (b * nchunks * nh,),
        (B, C, opt(phase), opt(b_norm), opt(c_norm), opt(b_bias), opt(c_bias), x, opt(mimo_x), la, beta, gamma, k0, v0,
         seq_t, rstd, hs, dhs, dy, gb, gc, opt(dbb), opt(dcb), opt(dph), dx, opt(dmx), dla, dbeta, dgamma, scr,
         l, nh, nchunks, B.stride(1), x.stride(1), *_phase_args(phase), rstd_c_off),
        dict(R=r, N=n, P=p, A=A, BW=bw, NPAIR=npair, NIT=nit, BP=BP, BLOCK=block, IEEE=ieee, HAS_SEQ=seq is not None,
             **flags),
        _warps(cfg.bwd_warps), cfg.bwd_stages,
    ))
    # the norm's backward on the head-summed gradients
    BR = _norm_rows(n)
    nrows = b * l * r
    nprog = -(-nrows // BR)
    norm = []
    for X, w, g, off in ((B, b_norm, gb, 0), (C, c_norm, gc, rstd_c_off)):
        dX = torch.empty(b, l, r, n, device=dev, dtype=X.dtype)
        dw = torch.empty(nprog, n, device=dev, dtype=f32) if w is not None else None
        launches.append(Launch(_norm_bwd_kernel, (nprog,), (X, opt(w), rstd, g, dX, dw if dw is not None else g, nrows,
                                                            X.stride(1), off),
                               dict(R=r, N=n, BN=BN, BR=BR, HAS_NORM=w is not None), 4, 1))
        norm.append((dX, dw, w))
    bufs = dict(norm=norm, dph=dph, dbb=dbb, dcb=dcb, dx=dx, dmx=dmx, dla=dla, dbeta=dbeta, dgamma=dgamma, dh0=dh0,
                dk0p=dk0p, dv0=dv0)
    return bufs, launches


def _bwd_finish(bufs, B, b_bias, c_bias, mimo_x, k0, v0):
    empty = lambda: B.new_empty(0)  # noqa: E731  (one per absent gradient: a custom op's outputs may not alias)
    (dB, dbw, bw_), (dC, dcw, cw_) = bufs["norm"]
    dk0p = bufs["dk0p"]
    dk0 = dk0p[:, :, 0] if dk0p.shape[2] == 1 else dk0p.sum(2)
    cast = lambda g, t: g.to(t.dtype) if t is not None else empty()  # noqa: E731
    return [dB, dC, bufs["dph"] if bufs["dph"] is not None else empty(),
            dbw.sum(0).to(bw_.dtype) if dbw is not None else empty(),
            dcw.sum(0).to(cw_.dtype) if dcw is not None else empty(),
            cast(bufs["dbb"], b_bias), cast(bufs["dcb"], c_bias), bufs["dx"], cast(bufs["dmx"], mimo_x), bufs["dla"],
            bufs["dbeta"], bufs["dgamma"], bufs["dh0"], dk0.to(k0.dtype), bufs["dv0"].to(v0.dtype)]


def _fused_bwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq, hs, rstd, dy, dhf,
               eps, block):
    sc = shape_class(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, seq, block, True)
    # A refusal is kept per class and the forward's class (store=True) is the backward's: the backward of an
    # unfused forward (rstd zeros, which the fused kernels would read) is never fused. A fused forward whose
    # backward is refused at launch leaves h' per chunk that the unfused backward reads as its own (same layout).
    if not launch_check(sc):
        bufs, launches = bwd_launches(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq,
                                      hs, rstd, dy, dhf, eps, block)
        if _run_or_refuse(sc, launches):
            return _bwd_finish(bufs, B, b_bias, c_bias, mimo_x, k0, v0)
    return _unfused_bwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq, hs, dy, dhf,
                        eps, block)


# ------------------------------------------------------------------ can the kernels launch here?


class ShapeClass(NamedTuple):
    """What decides the fused kernels' compiled code (not the batch or the length): one launch check each."""

    device: int  # CUDA device index
    dtype: torch.dtype  # B, C, x
    r: int
    n: int
    p: int
    nh: int
    A: int
    s_bc: int  # token strides of B/C and x, and the phase's strides but the batch's (specialised on by triton)
    s_x: int
    sp: tuple
    params: tuple  # dtypes of b_norm, c_norm, b_bias, c_bias, mimo_x (None: absent)
    block: int
    seq: bool
    store: bool  # the forward stores states (a backward follows)


def shape_class(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, seq, block, store) -> ShapeClass:
    """The ``ShapeClass`` of the op's arguments (B, C, x as token rows, the phase dense, as the kernels get them)."""
    sp = tuple(int(v) for v in phase.stride()[1:]) if phase is not None else (1, 1, 1)
    params = tuple(t.dtype if t is not None else None for t in (b_norm, c_norm, b_bias, c_bias, mimo_x))
    b, l, r, n, nh, p, A, _ = _meta(B, x, phase, block)
    return ShapeClass(B.device.index or 0, B.dtype, r, n, p, nh, A, B.stride(1), x.stride(1), sp, params, block,
                      seq is not None, bool(store))


def class_launches(sc: ShapeClass) -> list:
    """The launches of one forward (+ backward when ``sc.store``) of this class, on meta tensors (no memory)."""
    m, f32, dt = "meta", torch.float32, sc.dtype
    r, n, p, nh, A = sc.r, sc.n, sc.p, sc.nh, sc.A
    l = 2 * (sc.block // r)  # two chunks: the length is not specialised on
    strided = lambda shape, stride: torch.empty(  # noqa: E731
        1 + sum((a - 1) * b for a, b in zip(shape, stride)), device=m, dtype=dt).as_strided(shape, stride)
    B = strided((1, l, r, n), (l * sc.s_bc, sc.s_bc, n, 1))
    C = strided((1, l, r, n), (l * sc.s_bc, sc.s_bc, n, 1))
    x = strided((1, l, nh, p), (l * sc.s_x, sc.s_x, p, 1))
    phase = None
    if A:
        shape, stride = (1, l, nh, A), (0, *sc.sp)
        span = 1 + sum((a - 1) * b for a, b in zip(shape[1:], stride[1:]))
        phase = torch.empty(span, device=m, dtype=f32).as_strided(shape, (span, *sc.sp))
    shapes = ((n,), (n,), (nh, r, n), (nh, r, n), (nh, r, p))
    pr = [torch.empty(s, device=m, dtype=d) if d is not None else None for s, d in zip(shapes, sc.params)]
    la = torch.empty(1, l, nh, device=m, dtype=f32)
    h0 = torch.empty(1, nh, p, n, device=m, dtype=f32)
    k0, v0 = torch.empty(1, nh, r, n, device=m, dtype=dt), torch.empty(1, nh, r, p, device=m, dtype=dt)
    seq = torch.empty(1, l, device=m, dtype=torch.int32) if sc.seq else None
    (y, hf, hs, rstd), launches = fwd_launches(B, C, phase, pr[0], pr[1], pr[2], pr[3], x, pr[4], la, la, la, h0, k0, v0,
                                               seq, 1e-5, sc.block, sc.store)
    if sc.store:
        launches += bwd_launches(B, C, phase, pr[0], pr[1], pr[2], pr[3], x, pr[4], la, la, la, k0, v0, seq, hs, rstd, y,
                                 hf, 1e-5, sc.block)[1]
    return launches


_REGS_PER_BLOCK = 65536  # sm_70 .. sm_100
_CHECKED: dict = {}
PROBE_NOTES: list = []  # where the pre-check could not run (its machinery, not a kernel, failed): for diagnostics


def _describe(sc: ShapeClass) -> str:
    feats = [nm for nm, t in zip(("b_norm", "c_norm", "b_bias", "c_bias", "mimo_x"), sc.params) if t is not None]
    return (f"{str(sc.dtype).replace('torch.', '')} R={sc.r} d_state={sc.n} headdim={sc.p} heads={sc.nh} angles={sc.A} "
            f"chunk={sc.block // sc.r}{' packed' if sc.seq else ''}{' training' if sc.store else ' inference'}"
            f"{' with ' + '/'.join(feats) if feats else ''}")


def launch_check(sc: ShapeClass) -> str:
    """'' when every kernel of this class compiles and fits the GPU, else why not, with a warning (once per
    class): the op then runs the unfused chain qk_prep -> rank_expand -> ssm_scan for it. Decided inside the
    op, the first time a class is seen (so nothing of it is traced: no graph break under torch.compile, any
    dynamic shapes), and kept per class."""
    why = _CHECKED.get(sc)
    if why is None:
        why = _probe(sc)
        if why:
            _refuse(sc, why)
        else:
            _CHECKED[sc] = ""
    return why


def _refuse(sc: ShapeClass, why: str) -> None:
    """Mark the class as not launchable (every later call of it takes the unfused chain) and warn, once."""
    if _CHECKED.get(sc):
        return
    _CHECKED[sc] = why
    warnings.warn(f"ssm_scan_fused: the fused Triton kernels cannot run {_describe(sc)} on this GPU ({why}); "
                  "using the unfused chain qk_prep -> rank_expand -> ssm_scan for this shape", RuntimeWarning,
                  stacklevel=3)


def _max_shared(device: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    max_shared = int(props["max_shared_mem"])
    cap = os.environ.get("HYBRIDLAB_SSM_FUSED_MAX_SHARED")
    return min(max_shared, int(cap)) if cap else max_shared


def _probe(sc: ShapeClass) -> str:
    """Compile every kernel of the class (``warmup``: through triton's cache, so the launch that follows reuses
    the binary) and check it against the device: shared memory, registers, threads. '' or why not. Nothing
    to check under the interpreter. HYBRIDLAB_SSM_FUSED_MAX_SHARED (bytes) lowers the shared-memory limit
    checked against (to exercise the fallback on a GPU). Where the probe itself cannot run (a triton whose
    warmup API differs), it answers '' and the launch's own OutOfResources is the safety net
    (``_run_or_refuse``)."""
    if _INTERPRET:
        return ""
    try:
        with torch.cuda.device(sc.device):
            max_shared = _max_shared(sc.device)
            launches = class_launches(sc)
    except Exception as e:  # noqa: BLE001 - no verdict possible here: the launch decides
        PROBE_NOTES.append(f"{_describe(sc)}: building the launches: {type(e).__name__}: {e}")
        return ""
    for launch in launches:
        name = launch.kernel.__name__.strip("_")
        try:
            with torch.cuda.device(sc.device):
                compiled = launch.warmup()
        except _CANNOT_LAUNCH as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            return f"{name}: {type(e).__name__}: {first.strip()[:200]}"
        except Exception as e:  # noqa: BLE001 - the probe's machinery, not the kernel: let the launch decide
            PROBE_NOTES.append(f"{_describe(sc)}: {name}.warmup: {type(e).__name__}: {e}")
            return ""
        shared = getattr(getattr(compiled, "metadata", None), "shared", None)
        if shared is not None and int(shared) > max_shared:
            return f"{name} needs {int(shared)} B of shared memory, the limit is {max_shared} B"
        try:
            with torch.cuda.device(sc.device):
                compiled._init_handles()  # loads it: raises OutOfResources for shared memory / registers / threads
        except _CANNOT_LAUNCH as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            return f"{name}: {type(e).__name__}: {first.strip()[:200]}"
        except Exception as e:  # noqa: BLE001
            PROBE_NOTES.append(f"{_describe(sc)}: {name}._init_handles: {type(e).__name__}: {e}")
            continue
        regs = (getattr(compiled, "n_regs", 0) or 0) * launch.num_warps * 32
        if regs > _REGS_PER_BLOCK:
            return f"{name} needs {regs} registers per block, the GPU has {_REGS_PER_BLOCK}"
    return ""


def _unfused_fwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq, eps, block,
                 store):
    """The op's outputs from the unfused Triton chain: y, h_final, and the scan's h' per chunk as the op's h'
    (the same tensor: (b, H, nchunks, P, N) in B's dtype); rstd unused (zeros)."""
    b, l, r, n, nh, p, A, nchunks = _meta(B, x, phase, block)
    q, k = torch.ops.hybridlab.qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, nh, eps)
    v = torch.ops.hybridlab.rank_expand(x, mimo_x) if mimo_x is not None else x[:, :, :, None].contiguous()
    y, hf, hs = torch.ops.hybridlab.ssm_scan(q, k, v, la, beta, gamma, h0, k0, v0, seq, block, store)
    return y, hf, hs, torch.zeros(2, b, l, r, device=B.device, dtype=torch.float32)


def _unfused_bwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq, hs, dy, dhf, eps,
                 block):
    """The op's gradients through the unfused chain's backward ops (q, k, v recomputed; h' from the forward)."""
    nh = x.shape[2]
    q, k = torch.ops.hybridlab.qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, nh, eps)
    v = torch.ops.hybridlab.rank_expand(x, mimo_x) if mimo_x is not None else x[:, :, :, None].contiguous()
    dq, dk, dv, dla, dbeta, dgamma, dh0, dk0, dv0 = torch.ops.hybridlab.ssm_scan_bwd(q, k, v, la, beta, gamma, k0, v0, seq,
                                                                                     hs, dy, dhf, block)
    del q, k, v
    dB, dC, dph, dbw, dcw, dbb, dcb = torch.ops.hybridlab.qk_prep_bwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, dq, dk,
                                                                      nh, eps)
    if mimo_x is not None:
        dx, dmx = torch.ops.hybridlab.rank_expand_bwd(x, mimo_x, dv)
    else:
        dx, dmx = dv[:, :, :, 0].contiguous(), B.new_empty(0)
    return [dB, dC, dph, dbw, dcw, dbb, dcb, dx, dmx, dla, dbeta, dgamma, dh0, dk0, dv0]


# ------------------------------------------------------------------ torch.library ops


@torch.library.custom_op("hybridlab::ssm_scan_fused", mutates_args=())
def _fused_op(B: torch.Tensor, C: torch.Tensor, phase: Optional[torch.Tensor], b_norm: Optional[torch.Tensor],
              c_norm: Optional[torch.Tensor], b_bias: Optional[torch.Tensor], c_bias: Optional[torch.Tensor],
              x: torch.Tensor, mimo_x: Optional[torch.Tensor], la: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
              h0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, seq_idx: Optional[torch.Tensor], eps: float,
              block: int, store_states: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y (b, l, H, R, P), h_final, h' per chunk (empty unless store_states), 1/rms of B's and C's rows)."""
    return _fused_fwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq_idx, eps,
                      block, store_states)


@_fused_op.register_fake
def _(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq_idx, eps, block, store_states):
    b, l, r, n, nh, p, A, nchunks = _meta(B, x, phase, block)
    f32 = torch.float32
    hs = B.new_empty(b, nh, nchunks, p, n) if store_states else B.new_empty(0)
    return B.new_empty(b, l, nh, r, p), B.new_empty(b, nh, p, n, dtype=f32), hs, B.new_empty(2, b, l, r, dtype=f32)


@torch.library.custom_op("hybridlab::ssm_scan_fused_bwd", mutates_args=())
def _fused_bwd_op(B: torch.Tensor, C: torch.Tensor, phase: Optional[torch.Tensor], b_norm: Optional[torch.Tensor],
                  c_norm: Optional[torch.Tensor], b_bias: Optional[torch.Tensor], c_bias: Optional[torch.Tensor],
                  x: torch.Tensor, mimo_x: Optional[torch.Tensor], la: torch.Tensor, beta: torch.Tensor,
                  gamma: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, seq_idx: Optional[torch.Tensor], hs: torch.Tensor,
                  rstd: torch.Tensor, dy: torch.Tensor, dhf: torch.Tensor, eps: float, block: int) -> List[torch.Tensor]:
    """-> [dB, dC, dphase, d b_norm, d c_norm, d b_bias, d c_bias, dx, d mimo_x, d log_alpha, d beta, d gamma, dh0, dk0,
    dv0] (empty tensors for the absent optional inputs)."""
    return _fused_bwd(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq_idx, hs, rstd,
                      dy.contiguous(), dhf.float().contiguous(), eps, block)


@_fused_bwd_op.register_fake
def _(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq_idx, hs, rstd, dy, dhf, eps, block):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else B.new_empty(0)  # noqa: E731
    b, l, r, n = B.shape
    nh, p = x.shape[2], x.shape[3]
    f32 = torch.float32
    return [B.new_empty(b, l, r, n), C.new_empty(b, l, r, n), torch.empty_like(phase) if phase is not None else B.new_empty(0),
            like(b_norm), like(c_norm), like(b_bias), like(c_bias), x.new_empty(b, l, nh, p), like(mimo_x),
            *(la.new_empty(b, l, nh, dtype=f32) for _ in range(3)), B.new_empty(b, nh, p, n, dtype=f32),
            torch.empty_like(k0), torch.empty_like(v0)]


def _fused_setup(ctx, inputs, output):
    (B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, h0, k0, v0, seq_idx, eps, block,
     store_states) = inputs
    if not store_states:
        raise RuntimeError("hybridlab::ssm_scan_fused: a backward needs store_states=True in the forward")
    ctx.save_for_backward(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, la, beta, gamma, k0, v0, seq_idx,
                          output[2], output[3])
    ctx.eps, ctx.block = eps, block
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, dy, dhf, _dhs, _drstd):
    saved = ctx.saved_tensors
    B, x, hs = saved[0], saved[7], saved[15]
    if dy is None:
        dy = B.new_zeros(B.shape[0], B.shape[1], x.shape[2], B.shape[2], x.shape[3])
    if dhf is None:
        dhf = B.new_zeros(hs.shape[0], hs.shape[1], hs.shape[3], hs.shape[4], dtype=torch.float32)
    grads = torch.ops.hybridlab.ssm_scan_fused_bwd(*saved, dy, dhf, ctx.eps, ctx.block)
    optional = {2: saved[2], 3: saved[3], 4: saved[4], 5: saved[5], 6: saved[6], 8: saved[8]}
    grads = [None if i in optional and optional[i] is None else g for i, g in enumerate(grads)]
    return (*grads[:12], *grads[12:], None, None, None, None)


torch.library.register_autograd("hybridlab::ssm_scan_fused", _fused_backward, setup_context=_fused_setup)


def _dense_phase(phase):
    """The phase as the kernels take it: fp32, and dense (dphase shares its strides; a broadcast one is copied)."""
    phase = phase.float()
    if torch.empty_like(phase).stride() != phase.stride():
        phase = phase.contiguous()
    return phase


def ssm_scan_fused_triton(B, C, phase, b_norm, c_norm, b_bias, c_bias, x, mimo_x, log_alpha, beta, gamma, state, *,
                          eps: float, seq_idx=None, chunk_size=None, last_kv: bool = True):
    """The ``triton`` backend of ``ssm_scan_fused`` (arguments checked by the dispatcher): ``(y, ScanState)``."""
    b, l, r, n = B.shape
    nh, p = x.shape[2], x.shape[3]
    st = normalize_state(state, b, nh, r, n, p, B.device, B.dtype, x.dtype)
    block = _block_rows(r, chunk_size)
    la, be, ga = (t.float().contiguous() for t in (log_alpha, beta, gamma))
    h0, k0, v0 = st.h.float().contiguous(), st.k.to(B.dtype).contiguous(), st.v.to(B.dtype).contiguous()
    if phase is not None:
        phase = _dense_phase(phase)
    params = [t.contiguous() if t is not None else None for t in (b_norm, c_norm, b_bias, c_bias, mimo_x)]
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    Bt, Ct, xt = token_rows(B), token_rows(C), token_rows(x)
    if Bt.stride(1) != Ct.stride(1):  # the kernels take one token stride for B and C
        Bt, Ct = Bt.contiguous(), Ct.contiguous()
    leaves = (Bt, Ct, phase, *params, xt, la, be, ga, h0, k0, v0)
    store = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    y, hf, _, _ = torch.ops.hybridlab.ssm_scan_fused(
        Bt, Ct, phase, params[0], params[1], params[2], params[3], xt, params[4], la, be, ga, h0, k0, v0, seq, float(eps),
        block, store,
    )
    if not last_kv:
        return y, ScanState(hf, None, None)
    # the last position's k, v (what a continuation's carry-in needs) from the reference prep of one position
    _, k_last = qk_prep_reference(B[:, -1:], C[:, -1:], phase[:, -1:] if phase is not None else None, b_norm, c_norm,
                                  b_bias, c_bias, nh, eps)
    x_last = x[:, -1, :, None, :]
    v_last = x_last * mimo_x.to(x.dtype) if mimo_x is not None else x_last
    return y, ScanState(hf, k_last[:, 0], v_last)
