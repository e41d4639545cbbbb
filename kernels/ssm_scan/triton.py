"""Triton backend of the trapezoidal SSM scan: chunked forward + backward.

Math (one head; rows i = (t, r) of a chunk flattened as i = t*R + r, so a
MIMO chunk of T = BLOCK/R positions has the same BLOCK x BLOCK tiles as a SISO
chunk of BLOCK positions). With h the state after the previous chunk and
(kp, vp) the previous position's key/value (the chunk before, or ``state``):

    h'   = alpha_0 h + beta_0 sum_r vp_r kp_r^T             (the chunk's first step's carry-in)
    L'_t = sum_{u=1..t} log_alpha_u                          (within the chunk, position 0 excluded)
    W[i,j] = gamma_s e^{L'_t-L'_s}[s<=t] + beta_{s+1} e^{L'_t-L'_{s+1}}[s+1<=t]   (t=i//R, s=j//R)
    y_i  = e^{L'_t} h' q_i + sum_j W[i,j] (q_i.k_j) v_j
    h_out = e^{L'_last} h' + sum_j W[last,j] v_j k_j^T

i.e. the trapezoid's "previous (k, v)" term is folded into the decay mask (one
set of dots, not two), and the one term that reaches across the chunk boundary
is folded into h'. The forward carries h in registers across the chunks of a
sequence (one program per (batch, head, headdim block)); when gradients are
needed it stores h' per chunk: (b, h, nchunks, P, N) in the inputs' dtype. The backward is two
passes, as chunked SSD backwards usually are: ``_bwd_dh_kernel`` walks the
chunks in reverse carrying only H = dLoss/dh' (one small dot per chunk, fp32 in
registers) and stores it per chunk boundary, (b, h, nchunks, P, N) in the
inputs' dtype (the dtype the dots consume it in); ``_bwd_chunk_kernel``
then computes every gradient of one chunk from h', H and the chunk's tiles,
one program per (batch, head, chunk), with no sequential dependency (see its
docstring for the formulas). Dots take the inputs' 16-bit dtype
with fp32 accumulation (fp32 inputs: IEEE fp32 dots).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from .._triton_utils import INTERPRET as _INTERPRET
from .._triton_utils import pow2 as _pow2
from .._triton_utils import tl, triton
from . import chunk_rows
from .reference import ScanState, check_inputs

__all__ = ["ssm_scan_triton"]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, acc=None):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _doc_keep(SEQ, seq_base, pos, L, HAS_SEQ: tl.constexpr):
    """Packed documents: 0.0 where a new document starts at ``pos`` (its alpha and beta are dropped:
    nothing crosses into it), 1.0 elsewhere (position 0, whose document a passed-in state belongs to,
    and positions past the end included)."""
    if HAS_SEQ:
        inb = (pos > 0) & (pos < L)
        cur = tl.load(SEQ + seq_base + pos, mask=inb, other=0)
        prv = tl.load(SEQ + seq_base + pos - 1, mask=inb, other=0)
        return tl.where(cur != prv, 0.0, 1.0)
    else:
        return 1.0


@triton.jit
def _chunk_docs(SEQ, seq_base, pos_i, pos0, L, T: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Per-row document ids; whether each row is still in the document of the chunk's carry-in
    (position pos0's); whether the chunk's last position is; and whether each row is in the last
    position's document (the masks as 1.0 / 0.0)."""
    if HAS_SEQ:
        sq = tl.load(SEQ + seq_base + pos_i, mask=pos_i < L, other=-1)
        s0 = tl.load(SEQ + seq_base + pos0)
        s_last = tl.load(SEQ + seq_base + tl.minimum(pos0 + T, L) - 1)
        return sq, tl.where(sq == s0, 1.0, 0.0), tl.where(s_last == s0, 1.0, 0.0), tl.where(sq == s_last, 1.0, 0.0)
    else:
        return pos_i * 0, 1.0, 1.0, 1.0


@triton.jit
def _chunk_vectors(LA, BETA, GAMMA, la_base, pos_i, t_i, r_i, L, NH, T: tl.constexpr,
                   SEQ, seq_base, pos0, HAS_SEQ: tl.constexpr):
    """Per-row L', L'_last, L'_{s+1}, gamma_s, beta_{s+1} and W[last, :] for one chunk, and its documents
    (see _chunk_docs): beta_{s+1} is 0 where s+1 starts a document, W[last, j] 0 outside the last's."""
    valid = pos_i < L
    la_row = tl.load(LA + la_base + pos_i * NH, mask=valid & (t_i > 0) & (r_i == 0), other=0.0)
    gam = tl.load(GAMMA + la_base + pos_i * NH, mask=valid, other=0.0)
    nmask = (t_i + 1 < T) & (pos_i + 1 < L)
    bnext = tl.load(BETA + la_base + (pos_i + 1) * NH, mask=nmask, other=0.0) * _doc_keep(SEQ, seq_base, pos_i + 1, L, HAS_SEQ)
    lanext = tl.load(LA + la_base + (pos_i + 1) * NH, mask=nmask, other=0.0)
    Lp = tl.cumsum(la_row, 0)
    Llast = tl.sum(la_row, 0)
    Lnext = Lp + lanext
    wlast = gam * tl.exp(Llast - Lp) + bnext * tl.exp(Llast - Lnext)
    sq, same0, same_last, in_last = _chunk_docs(SEQ, seq_base, pos_i, pos0, L, T, HAS_SEQ)
    return Lp, Llast, Lnext, gam, bnext, wlast * in_last, sq, same0, same_last, in_last


@triton.jit
def _decay_g(Lp, t_i, sq, HAS_SEQ: tl.constexpr):
    """Dg[i, j] = e^{L'_t - L'_s} [s <= t] (and [same document])."""
    keep = t_i[:, None] >= t_i[None, :]
    if HAS_SEQ:
        keep = keep & (sq[:, None] == sq[None, :])
    return tl.exp(tl.where(keep, Lp[:, None] - Lp[None, :], float("-inf")))


@triton.jit
def _decay_b(Lp, Lnext, t_i, sq, HAS_SEQ: tl.constexpr):
    """Db[i, j] = e^{L'_t - L'_{s+1}} [s < t] (and [same document]; beta_{s+1} is 0 where s+1 starts one)."""
    keep = t_i[:, None] > t_i[None, :]
    if HAS_SEQ:
        keep = keep & (sq[:, None] == sq[None, :])
    return tl.exp(tl.where(keep, Lp[:, None] - Lnext[None, :], float("-inf")))


@triton.jit
def _head_program(NH, R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                  BLOCK: tl.constexpr):
    """A (batch·head, headdim block) program's coordinates: batch, head, each chunk row's position and
    rank (rows i = t·R + r), the d_state and headdim indices and their masks."""
    pid_bh = tl.program_id(0)
    bb = (pid_bh // NH).to(tl.int64)
    hd = (pid_bh % NH).to(tl.int64)
    i = tl.arange(0, BLOCK)
    n = tl.arange(0, BN)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    return bb, hd, i // R, i % R, n, p, n < N, p < P


@triton.jit
def _head_bases(bb, hd, L, NH, R: tl.constexpr, N: tl.constexpr, P: tl.constexpr):
    """Strides over l of q/k and v, and where (batch bb, head hd) starts in q/k, v, the (b, l, H)
    scalars and the per-(batch, head) states."""
    sql = NH * R * N
    svl = NH * R * P
    return sql, svl, bb * L * sql + hd * R * N, bb * L * svl + hd * R * P, bb * L * NH + hd, bb * NH + hd


@triton.jit
def _fwd_kernel(
    Q, K, V, LA, BETA, GAMMA, H0, K0, V0, SEQ, Y, HF, HS,
    L, NH, NCHUNKS,
    R: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BN: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr,
    STORE_STATES: tl.constexpr, IEEE: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    bb, hd, t_i, r_i, n, p, nmask, pmask = _head_program(NH, R, N, P, BN, BP, BLOCK)
    T: tl.constexpr = BLOCK // R
    DT = Q.dtype.element_ty

    sql, svl, qk_base, v_base, la_base, st_base = _head_bases(bb, hd, L, NH, R, N, P)

    # initial state h (BP x BN) fp32
    h = tl.load(H0 + st_base * P * N + p[:, None] * N + n[None, :], mask=pmask[:, None] & nmask[None, :], other=0.0)

    for c in range(NCHUNKS):
        pos0 = c * T
        pos_i = pos0 + t_i
        valid = pos_i < L
        # --- carry-in: h' = alpha_0 h + beta_0 sum_r vp_r kp_r^T (0 where a document starts at pos0)
        keep0 = _doc_keep(SEQ, bb * L, pos0, L, HAS_SEQ)
        a0 = tl.exp(tl.load(LA + la_base + pos0 * NH)) * keep0
        b0 = tl.load(BETA + la_base + pos0 * NH) * keep0
        h = a0 * h
        for r in tl.static_range(R):
            if c == 0:
                kp = tl.load(K0 + st_base * R * N + r * N + n, mask=nmask, other=0.0).to(tl.float32)
                vp = tl.load(V0 + st_base * R * P + r * P + p, mask=pmask, other=0.0).to(tl.float32)
            else:
                kp = tl.load(K + qk_base + (pos0 - 1) * sql + r * N + n, mask=nmask, other=0.0).to(tl.float32)
                vp = tl.load(V + v_base + (pos0 - 1) * svl + r * P + p, mask=pmask, other=0.0).to(tl.float32)
            h += (b0 * vp)[:, None] * kp[None, :]
        if STORE_STATES:
            tl.store(HS + (st_base * NCHUNKS + c) * P * N + p[:, None] * N + n[None, :], h.to(HS.dtype.element_ty),
                     mask=pmask[:, None] & nmask[None, :])
        # --- tiles
        qk_off = qk_base + pos_i[:, None] * sql + r_i[:, None] * N + n[None, :]
        qk_mask = valid[:, None] & nmask[None, :]
        q = tl.load(Q + qk_off, mask=qk_mask, other=0.0)
        k = tl.load(K + qk_off, mask=qk_mask, other=0.0)
        v = tl.load(V + v_base + pos_i[:, None] * svl + r_i[:, None] * P + p[None, :],
                    mask=valid[:, None] & pmask[None, :], other=0.0)
        Lp, Llast, Lnext, gam, bnext, wlast, sq, same0, same_last, _in_last = _chunk_vectors(
            LA, BETA, GAMMA, la_base, pos_i, t_i, r_i, L, NH, T, SEQ, bb * L, pos0, HAS_SEQ)
        # --- outputs
        y = (tl.exp(Lp) * same0)[:, None] * _dot(q, tl.trans(h.to(DT)), IEEE)
        S = _dot(q, tl.trans(k), IEEE)
        W = gam[None, :] * _decay_g(Lp, t_i, sq, HAS_SEQ) + bnext[None, :] * _decay_b(Lp, Lnext, t_i, sq, HAS_SEQ)
        M = (S * W).to(DT)
        y = _dot(M, v, IEEE, y)
        tl.store(Y + v_base + pos_i[:, None] * svl + r_i[:, None] * P + p[None, :], y.to(Y.dtype.element_ty),
                 mask=valid[:, None] & pmask[None, :])
        # --- state to the chunk's end
        vw = (v.to(tl.float32) * wlast[:, None]).to(DT)
        h = _dot(tl.trans(vw), k, IEEE, (tl.exp(Llast) * same_last) * h)

    tl.store(HF + st_base * P * N + p[:, None] * N + n[None, :], h, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _bwd_dh_kernel(
    Q, DY, LA, BETA, K0, V0, SEQ, DHF, DHS, DH0, DK0P, DV0,
    L, NH, NCHUNKS,
    R: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BN: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr,
    IEEE: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    """Backward pass 1: the sequential chain of state gradients, nothing else.

    H_c = dLoss/dh'_c (the carry-in of chunk c) obeys
        H_c = e^{L'_last,c} a'_c H_{c+1} + (dY_c * e^{L'})^T Q_c
    (a'_c = alpha of chunk c+1's first position; 1 and H = dh_final after the
    last chunk). Row p of H depends only on column p of dY, so programs split
    over headdim blocks. Stores DHS[c] = H_{c+1}, the gradient chunk c's
    parallel kernel needs, and the initial-state gradients from H_0:
    dh0 = alpha_0 H_0, dv0_r = beta_0 H_0 k0_r, dk0_r = beta_0 H_0^T v0_r
    (dk0 partial per headdim block, summed on the host). Packed documents mask the
    terms that cross a document start (see _chunk_docs): a'_c is 0 where chunk c+1
    starts one, e^{L'_last} where chunk c holds one, e^{L'} in rows past one.
    """
    bb, hd, t_i, r_i, n, p, nmask, pmask = _head_program(NH, R, N, P, BN, BP, BLOCK)
    T: tl.constexpr = BLOCK // R
    DT = Q.dtype.element_ty
    pn_mask = pmask[:, None] & nmask[None, :]
    pn_off = p[:, None] * N + n[None, :]

    sql, svl, qk_base, v_base, la_base, st_base = _head_bases(bb, hd, L, NH, R, N, P)

    H = tl.load(DHF + st_base * P * N + pn_off, mask=pn_mask, other=0.0)
    a_nx = tl.zeros([], dtype=tl.float32) + 1.0
    for ii in range(NCHUNKS):
        c = NCHUNKS - 1 - ii
        tl.store(DHS + (st_base * NCHUNKS + c) * P * N + pn_off, H.to(DHS.dtype.element_ty), mask=pn_mask)
        pos0 = c * T
        pos_i = pos0 + t_i
        valid = pos_i < L
        la_row = tl.load(LA + la_base + pos_i * NH, mask=valid & (t_i > 0) & (r_i == 0), other=0.0)
        Lp = tl.cumsum(la_row, 0)
        Llast = tl.sum(la_row, 0)
        _sq, same0, same_last, _in_last = _chunk_docs(SEQ, bb * L, pos_i, pos0, L, T, HAS_SEQ)
        q = tl.load(Q + qk_base + pos_i[:, None] * sql + r_i[:, None] * N + n[None, :],
                    mask=valid[:, None] & nmask[None, :], other=0.0)
        dy = tl.load(DY + v_base + pos_i[:, None] * svl + r_i[:, None] * P + p[None, :],
                     mask=valid[:, None] & pmask[None, :], other=0.0)
        dye = (dy.to(tl.float32) * (tl.exp(Lp) * same0)[:, None]).to(DT)
        H = _dot(tl.trans(dye), q, IEEE, (tl.exp(Llast) * same_last * a_nx) * H)
        a_nx = tl.exp(tl.load(LA + la_base + pos0 * NH)) * _doc_keep(SEQ, bb * L, pos0, L, HAS_SEQ)

    b0 = tl.load(BETA + la_base)
    tl.store(DH0 + st_base * P * N + pn_off, a_nx * H, mask=pn_mask)
    for r in tl.static_range(R):
        k0 = tl.load(K0 + st_base * R * N + r * N + n, mask=nmask, other=0.0).to(tl.float32)
        v0 = tl.load(V0 + st_base * R * P + r * P + p, mask=pmask, other=0.0).to(tl.float32)
        tl.store(DV0 + st_base * R * P + r * P + p, b0 * tl.sum(H * k0[None, :], 1), mask=pmask)
        tl.store(DK0P + ((st_base * tl.num_programs(1) + tl.program_id(1)) * R + r) * N + n,
                 b0 * tl.sum(H * v0[:, None], 0), mask=nmask)


@triton.jit
def _rows_to_pos(x, t_i, T: tl.constexpr, SHIFT: tl.constexpr):
    """out[t] = sum of x over the rows of position t - SHIFT (0 where there is none)."""
    tt = tl.arange(0, T)
    return tl.sum(tl.where(t_i[:, None] + SHIFT == tt[None, :], x[:, None], 0.0), 0)


@triton.jit
def _state_block(Q, K, DHS, HS, qk_row, valid, p, pmask, st_off, n, nmask, N: tl.constexpr):
    """One d_state block of the chunk kernel: q, k rows (BLOCK, BNB) and H, h' (BP, BNB), with q/k's
    offsets and mask for the stores."""
    qk_off = qk_row[:, None] + n[None, :]
    qk_mask = valid[:, None] & nmask[None, :]
    pn_off = p[:, None] * N + n[None, :]
    pn_mask = pmask[:, None] & nmask[None, :]
    q = tl.load(Q + qk_off, mask=qk_mask, other=0.0)
    k = tl.load(K + qk_off, mask=qk_mask, other=0.0)
    Hc = tl.load(DHS + st_off + pn_off, mask=pn_mask, other=0.0)
    hp = tl.load(HS + st_off + pn_off, mask=pn_mask, other=0.0)
    return qk_off, qk_mask, q, k, Hc, hp


@triton.jit
def _next_chunk(LA, BETA, la_base, pos0, L, NH, T: tl.constexpr, SEQ, seq_base, HAS_SEQ: tl.constexpr):
    """alpha, beta of the next chunk's first position (1, 0 after the last chunk; 0, 0 where it starts a document)."""
    nx = pos0 + T
    has_nx = nx < L
    keep_nx = _doc_keep(SEQ, seq_base, nx, L, HAS_SEQ)
    a_nx = tl.exp(tl.load(LA + la_base + nx * NH, mask=has_nx, other=0.0)) * keep_nx
    b_nx = tl.load(BETA + la_base + nx * NH, mask=has_nx, other=0.0) * keep_nx
    return a_nx, b_nx


@triton.jit
def _mask_phase(dy, v, S, Lp, Lnext, t_i, sq, gam, bnext, SCR, pid, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                HAS_SEQ: tl.constexpr):
    """The intra-chunk mask's gradients (gamma, beta_{s+1} per column; the log-alpha vector before its
    reverse cumsum), and M = S * W, dS = dM * W through a per-program scratch (L2): a dot whose result
    feeds another dot gets a (num_warps, 1) warp layout, which for 64-row tiles replicates every tile
    across the two warp groups (twice the registers); with the chain cut, the mask phase runs on
    unreplicated (4, 2) tiles. Returns the scratch and its (i, j) / (j, i) offsets."""
    i = tl.arange(0, BLOCK)
    dM = _dot(dy, tl.trans(v), IEEE)
    dW = dM * S
    Dx = _decay_g(Lp, t_i, sq, HAS_SEQ)
    dgam = tl.sum(dW * Dx, 0)
    W = gam[None, :] * Dx
    Dx = _decay_b(Lp, Lnext, t_i, sq, HAS_SEQ)
    dbet = tl.sum(dW * Dx, 0)
    W += bnext[None, :] * Dx
    dMM = dW * W
    vec = tl.sum(dMM, 1) - tl.sum(dMM, 0)
    ij = i[:, None] * BLOCK + i[None, :]
    ji = i[None, :] * BLOCK + i[:, None]
    scr = SCR + pid.to(tl.int64) * (2 * BLOCK * BLOCK)
    DT = SCR.dtype.element_ty
    tl.store(scr + ij, (S * W).to(DT))
    tl.store(scr + BLOCK * BLOCK + ij, (dM * W).to(DT))
    tl.debug_barrier()
    return dgam, dbet, vec, scr, ij, ji


@triton.jit
def _chunk_scalar_grads(dgam, dbet, vec, vq, z, hH, dy, vp, eL, QKP, HKP, a_nx, g_last, Llast, Lp, Lnext, wlast, in_last,
                        t_i, pos0, L, NH, BETA, la_base, SEQ, seq_base, DLA, DBETA, DGAMMA,
                        T: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Finish and store one chunk's log-alpha / beta / gamma gradients: the terms through h_out (z = v^T H k per
    row, hH = <H, h'> by headdim rows), the carry-in's (position 0: d log_alpha_0 = <H_c, h'> - b0 d beta_0,
    d beta_0 = sum_r vp_r^T H_c kp_r), then per position (the R rows summed), the reverse cumsum, and 0 at a
    document's first position (nothing carries into it)."""
    az = a_nx * z
    dgam += az * tl.exp(Llast - Lp) * in_last
    dbet += tl.where(t_i < T - 1, az * tl.exp(Llast - Lnext) * in_last, 0.0)
    vec -= az * wlast
    hH_s = tl.sum(hH, 0)
    scal_last = tl.sum(az * wlast, 0) + g_last * hH_s

    keep0 = _doc_keep(SEQ, seq_base, pos0, L, HAS_SEQ)
    b0 = tl.load(BETA + la_base + pos0 * NH) * keep0
    DVP = _dot(dy, tl.trans(vp), IEEE)  # (BLOCK, RP): dy_i . vp_r
    db0 = tl.sum(tl.sum(eL[:, None] * QKP * DVP, 1), 0) + g_last * tl.sum(tl.sum(HKP * tl.trans(vp).to(tl.float32), 1), 0)
    dla0 = (tl.sum(vq, 0) + g_last * hH_s - b0 * db0) * keep0
    db0 = db0 * keep0

    tt = tl.arange(0, T)
    pos_t = pos0 + tt
    valid_t = pos_t < L
    if R == 1:
        dgam_t = dgam
        vec_t = vec
    else:
        dgam_t = _rows_to_pos(dgam, t_i, T, 0)
        vec_t = _rows_to_pos(vec, t_i, T, 0)
    dbet_sh = _rows_to_pos(dbet, t_i, T, 1)  # column s's beta_{s+1} term -> position s+1
    keep_t = _doc_keep(SEQ, seq_base, pos_t, L, HAS_SEQ)
    beta_t = tl.load(BETA + la_base + pos_t * NH, mask=valid_t & (tt > 0), other=0.0) * keep_t
    rc = tl.cumsum(vec_t, 0, reverse=True)
    first = tt == 0
    dla_t = tl.where(first, dla0, (rc + scal_last - beta_t * dbet_sh) * keep_t)
    dbeta_t = tl.where(first, db0, dbet_sh * keep_t)
    out_off = la_base + pos_t * NH
    tl.store(DLA + out_off, dla_t, mask=valid_t)
    tl.store(DBETA + out_off, dbeta_t, mask=valid_t)
    tl.store(DGAMMA + out_off, dgam_t, mask=valid_t)


@triton.jit
def _bwd_chunk_kernel(
    Q, K, V, LA, BETA, GAMMA, K0, V0, SEQ, HS, DHS, DY,
    DQ, DK, DV, DLA, DBETA, DGAMMA, SCR,
    L, NH, NCHUNKS,
    R: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BN: tl.constexpr, BNB: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr,
    IEEE: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    """Backward pass 2: every gradient of one chunk, chunks in parallel.

    Inputs besides the chunk's tiles: h' (HS[c], stored by the forward) and
    H = H_{c+1} (DHS[c], from pass 1). With a', b' = alpha, beta of the next
    chunk's first position (1, 0 after the last chunk), G = a' H the gradient
    of this chunk's h_out, omega_j = a' W[last, j] + b' [j at the last
    position] and M = S * W:
      dQ = (dM*W) K + e^{L'} * (dY h'),      dM = dY V^T
      dK = (dM*W)^T Q + (V*omega) H
      dV = M^T dY + omega * (K H^T)
    gamma / beta / log_alpha from the decay mask (a reverse cumsum over the
    chunk's positions; the beta_{s+1} terms land one position later), and the
    chunk's carry-in h' = a0 h + b0 sum_r vp_r kp_r^T through
    H_c = (dY e^{L'})^T Q + e^{L'_last} G, contracted without forming it:
      <H_c, h'>        = sum_i q_i . dQinter_i + e^{L'_last} a' <H, h'>
      vp^T H_c kp      = sum_i e^{L'_i} (dy_i . vp)(q_i . kp) + e^{L'_last} a' vp^T H kp
      d log_alpha_0 = <H_c, h'> - b0 d beta_0,   d beta_0 = sum_r vp_r^T H_c kp_r.
    d_state is walked in blocks of BNB twice (contractions over it first, then
    dq / dk), so that no (BLOCK, N) or (P, N) fp32 tile is held whole. Packed
    documents: every term that crosses a document start is masked as in the
    forward (a', b' are 0 where the next chunk starts one; e^{L'} past one; the
    decay matrices and W[last, :] within one), and the log_alpha / beta gradients
    of a document's first position are 0 (nothing carries into it).
    """
    pid = tl.program_id(0)
    c = pid % NCHUNKS
    pid_bh = pid // NCHUNKS
    bb = (pid_bh // NH).to(tl.int64)
    hd = (pid_bh % NH).to(tl.int64)
    T: tl.constexpr = BLOCK // R
    RP: tl.constexpr = 16  # the R previous-position rows, padded to a dot-friendly 16
    DT = Q.dtype.element_ty

    i = tl.arange(0, BLOCK)
    t_i = i // R
    r_i = i % R
    nb0 = tl.arange(0, BNB)
    p = tl.arange(0, BP)
    rr = tl.arange(0, RP)
    pmask = p < P

    sql, svl, qk_base, v_base, la_base, st_base = _head_bases(bb, hd, L, NH, R, N, P)
    st_off = (st_base * NCHUNKS + c) * P * N

    pos0 = c * T
    pos_i = pos0 + t_i
    valid = pos_i < L
    qk_row = qk_base + pos_i * sql + r_i * N
    v_off = v_base + pos_i[:, None] * svl + r_i[:, None] * P + p[None, :]
    v_mask = valid[:, None] & pmask[None, :]
    v = tl.load(V + v_off, mask=v_mask, other=0.0)
    dy = tl.load(DY + v_off, mask=v_mask, other=0.0)
    Lp, Llast, Lnext, gam, bnext, wlast, sq, same0, same_last, in_last = _chunk_vectors(
        LA, BETA, GAMMA, la_base, pos_i, t_i, r_i, L, NH, T, SEQ, bb * L, pos0, HAS_SEQ)
    eL = tl.exp(Lp) * same0
    eLast = tl.exp(Llast) * same_last
    a_nx, b_nx = _next_chunk(LA, BETA, la_base, pos0, L, NH, T, SEQ, bb * L, HAS_SEQ)
    g_last = eLast * a_nx

    # previous position's (k, v) rows (this chunk's carry-in): the chunk before, or the state
    rmask_prev = (rr < R) & (rr * 0 + c > 0)  # rows of the chunk before
    rmask_st = (rr < R) & (rr * 0 + c == 0)  # rows of the state
    prev_qk = qk_base + (pos0 - 1) * sql + rr * N
    vp = tl.load(V + v_base + (pos0 - 1) * svl + rr[:, None] * P + p[None, :],
                 mask=rmask_prev[:, None] & pmask[None, :], other=0.0)
    vp += tl.load(V0 + st_base * R * P + rr[:, None] * P + p[None, :],
                  mask=rmask_st[:, None] & pmask[None, :], other=0.0)

    # --- pass over d_state: S = Q K^T, KH = K H^T, and the carry-in contractions
    S = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    KH = tl.zeros([BLOCK, BP], dtype=tl.float32)
    QKP = tl.zeros([BLOCK, RP], dtype=tl.float32)  # q_i . kp_r
    HKP = tl.zeros([BP, RP], dtype=tl.float32)  # H kp_r
    hH = tl.zeros([BP], dtype=tl.float32)  # <H, h'> by rows
    for n0 in range(0, BN, BNB):
        n = n0 + nb0
        nmask = n < N
        qk_off, qk_mask, q, k, Hc, hp = _state_block(Q, K, DHS, HS, qk_row, valid, p, pmask, st_off, n, nmask, N)
        kp = tl.load(K + prev_qk[:, None] + n[None, :], mask=rmask_prev[:, None] & nmask[None, :], other=0.0)
        kp += tl.load(K0 + st_base * R * N + rr[:, None] * N + n[None, :],
                      mask=rmask_st[:, None] & nmask[None, :], other=0.0)
        S = _dot(q, tl.trans(k), IEEE, S)
        KH = _dot(k, tl.trans(Hc), IEEE, KH)
        QKP = _dot(q, tl.trans(kp), IEEE, QKP)
        HKP = _dot(Hc, tl.trans(kp), IEEE, HKP)
        hH += tl.sum(Hc.to(tl.float32) * hp.to(tl.float32), 1)

    # --- intra-chunk: mask gradients
    dgam, dbet, vec, scr, ij, ji = _mask_phase(dy, v, S, Lp, Lnext, t_i, sq, gam, bnext, SCR, pid, BLOCK, IEEE, HAS_SEQ)

    # --- dv: intra + through h_out (and the next chunk's carry-in)
    vf = v.to(tl.float32)
    z = tl.sum(vf * KH, 1)  # v_j^T H k_j
    omega = a_nx * wlast + tl.where(t_i == T - 1, b_nx, 0.0)
    MT = tl.load(scr + ji)
    dv = _dot(MT, dy, IEEE) + omega[:, None] * KH
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=v_mask)

    # --- second pass over d_state: dq (inter through h' + intra), dk; every dot's A operand
    # comes from memory (the loaded dS / dS^T, dY, V), so all stay unreplicated
    dS = tl.load(scr + BLOCK * BLOCK + ij)
    dST = tl.load(scr + BLOCK * BLOCK + ji)
    vq = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, BN, BNB):
        n = n0 + nb0
        nmask = n < N
        qk_off, qk_mask, q, k, Hc, hp = _state_block(Q, K, DHS, HS, qk_row, valid, p, pmask, st_off, n, nmask, N)
        dqi = eL[:, None] * _dot(dy, hp.to(DT), IEEE)
        vq += tl.sum(q.to(tl.float32) * dqi, 1)
        dq = _dot(dS, k, IEEE) + dqi
        tl.store(DQ + qk_off, dq.to(DQ.dtype.element_ty), mask=qk_mask)
        dk = _dot(dST, q, IEEE) + omega[:, None] * _dot(v, Hc, IEEE)
        tl.store(DK + qk_off, dk.to(DK.dtype.element_ty), mask=qk_mask)
    vec += vq

    _chunk_scalar_grads(dgam, dbet, vec, vq, z, hH, dy, vp, eL, QKP, HKP, a_nx, g_last, Llast, Lp, Lnext, wlast, in_last,
                        t_i, pos0, L, NH, BETA, la_base, SEQ, bb * L, DLA, DBETA, DGAMMA, T, R, IEEE, HAS_SEQ)


# ------------------------------------------------------------------ launch / autotune

_FWD_CONFIGS = [
    triton.Config({"BP": 64}, num_warps=8, num_stages=2),
    triton.Config({"BP": 32}, num_warps=8, num_stages=2),
    triton.Config({"BP": 32}, num_warps=4, num_stages=2),
]
_BWD_CONFIGS = [
    triton.Config({}, num_warps=8, num_stages=1),
    triton.Config({}, num_warps=4, num_stages=1),
    triton.Config({}, num_warps=8, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=2),
]
_KEY = ["R", "N", "P", "BLOCK", "IEEE", "STORE_STATES", "HAS_SEQ"]

_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_KEY)(_fwd_kernel)
# pass 2 of the backward (chunk-parallel); pass 1 (the dH chain) is small and runs one fixed config
_bwd_tuned = triton.autotune(configs=_BWD_CONFIGS, key=["R", "N", "P", "BLOCK", "IEEE", "HAS_SEQ"])(_bwd_chunk_kernel)

# Fixed launch configs (the ones measured in BENCHMARKS.md), overridable for experiments.
_DH_BP = int(os.environ.get("HYBRIDLAB_SSM_DH_BP", "32"))  # headdim block of the dH chain
_DH_WARPS = int(os.environ.get("HYBRIDLAB_SSM_DH_WARPS", "4"))
_CHUNK_BN = int(os.environ.get("HYBRIDLAB_SSM_BWD_BN", "64"))  # d_state block of pass 2
_BWD_WARPS = int(os.environ.get("HYBRIDLAB_SSM_BWD_WARPS", "8"))

# Autotuning is opt-in (HYBRIDLAB_SSM_AUTOTUNE=1; not yet exercised on a GPU): by default one
# fixed config (the one measured in BENCHMARKS.md). Below this much work (programs x chunks) the
# fixed config is used even then.
_AUTOTUNE = os.environ.get("HYBRIDLAB_SSM_AUTOTUNE") == "1"
_TUNE_MIN_WORK = int(os.environ.get("HYBRIDLAB_SSM_TUNE_MIN_WORK", "4096")) if _AUTOTUNE else 1 << 62


def _block_rows(r: int, chunk_size: int | None) -> int:
    rows, why = chunk_rows(r, chunk_size)
    if why:
        raise ValueError(f"ssm_scan triton: {why} (chunk_size {chunk_size}, rank {r})")
    return rows


def _fwd(q, k, v, la, beta, gamma, h0, k0, v0, seq, block, store_states):
    b, l, nh, r, n = q.shape
    p = v.shape[-1]
    T = block // r
    nchunks = triton.cdiv(l, T)
    y = torch.empty_like(v)
    hf = torch.empty(b, nh, p, n, device=q.device, dtype=torch.float32)
    # h' for the backward in the inputs' dtype: its dots consume it in that dtype anyway, and for MIMO
    # (4x the chunks) the fp32 copy was the largest tensor the forward wrote.
    hs = torch.empty(b, nh, nchunks, p, n, device=q.device, dtype=q.dtype) if store_states else q.new_empty(0)
    ieee = q.dtype == torch.float32
    BN, BPf = max(_pow2(n), 16), max(_pow2(p), 16)
    args = (q, k, v, la, beta, gamma, h0, k0, v0, seq if seq is not None else la, y, hf, hs if store_states else hf,
            l, nh, nchunks)
    meta = dict(R=r, N=n, P=p, BN=BN, BLOCK=block, STORE_STATES=store_states, IEEE=ieee, HAS_SEQ=seq is not None)
    if _INTERPRET or q.device.type != "cuda" or b * nh * nchunks < _TUNE_MIN_WORK or BPf < 64:
        _fwd_kernel[(b * nh, 1)](*args, BP=BPf, **meta, num_warps=4 if _INTERPRET else 8, num_stages=2)
    else:
        _fwd_tuned[lambda m: (b * nh, triton.cdiv(p, m["BP"]))](*args, **meta)
    return y, hf, hs


def _bwd(q, k, v, la, beta, gamma, k0, v0, seq, hs, dy, dhf, block):
    b, l, nh, r, n = q.shape
    p = v.shape[-1]
    T = block // r
    nchunks = triton.cdiv(l, T)
    dev = q.device
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dla, dbeta, dgamma = (torch.empty(b, l, nh, device=dev, dtype=torch.float32) for _ in range(3))
    dhs = torch.empty(b, nh, nchunks, p, n, device=dev, dtype=q.dtype)  # H_{c+1}, in the dots' dtype
    dh0 = torch.empty(b, nh, p, n, device=dev, dtype=torch.float32)
    dv0 = torch.empty(b, nh, r, p, device=dev, dtype=torch.float32)
    ieee = q.dtype == torch.float32
    has_seq = seq is not None
    seq = seq if has_seq else la
    BN, BP = max(_pow2(n), 16), max(_pow2(p), 16)
    BPs = max(min(BP, _pow2(_DH_BP)), 16)
    npb = triton.cdiv(p, BPs)
    dk0p = torch.empty(b, nh, npb, r, n, device=dev, dtype=torch.float32)
    # pass 1: the sequential dH chain (reverse over chunks)
    _bwd_dh_kernel[(b * nh, npb)](
        q, dy, la, beta, k0, v0, seq, dhf, dhs, dh0, dk0p, dv0, l, nh, nchunks,
        R=r, N=n, P=p, BN=BN, BP=BPs, BLOCK=block, IEEE=ieee, HAS_SEQ=has_seq,
        num_warps=4 if _INTERPRET else _DH_WARPS, num_stages=2,
    )
    # pass 2: all chunks in parallel
    scr = torch.empty(b * nh * nchunks, 2, block, block, device=dev, dtype=q.dtype)
    args = (q, k, v, la, beta, gamma, k0, v0, seq, hs, dhs, dy, dq, dk, dv, dla, dbeta, dgamma, scr, l, nh, nchunks)
    meta = dict(R=r, N=n, P=p, BN=BN, BNB=min(BN, _CHUNK_BN), BP=BP, BLOCK=block, IEEE=ieee, HAS_SEQ=has_seq)
    grid = (b * nh * nchunks,)
    if _INTERPRET or dev.type != "cuda" or b * nh * nchunks < _TUNE_MIN_WORK:
        _bwd_chunk_kernel[grid](*args, **meta, num_warps=4 if _INTERPRET else _BWD_WARPS, num_stages=1)
    else:
        _bwd_tuned[grid](*args, **meta)
    dk0 = dk0p[:, :, 0] if npb == 1 else dk0p.sum(2)
    return dq, dk, dv, dla, dbeta, dgamma, dh0, dk0.to(k0.dtype), dv0.to(v0.dtype)


# ------------------------------------------------------------------ torch.library ops (one graph node each under torch.compile)


@torch.library.custom_op("hybridlab::ssm_scan", mutates_args=())
def _scan_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, la: torch.Tensor, beta: torch.Tensor,
             gamma: torch.Tensor, h0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, seq_idx: Optional[torch.Tensor],
             block: int, store_states: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, h_final, h' per chunk for the backward (empty unless store_states)). Contiguous inputs; q/k/v
    one 16/32-bit dtype, la/beta/gamma/h0 fp32, k0/v0 in q's dtype, seq_idx (b, l) int32 or None."""
    return _fwd(q, k, v, la, beta, gamma, h0, k0, v0, seq_idx, block, store_states)


@_scan_op.register_fake
def _(q, k, v, la, beta, gamma, h0, k0, v0, seq_idx, block, store_states):
    b, l, nh, r, n = q.shape
    p = v.shape[-1]
    nchunks = -(-l // (block // r))
    hs = q.new_empty(b, nh, nchunks, p, n) if store_states else q.new_empty(0)
    return torch.empty_like(v), q.new_empty(b, nh, p, n, dtype=torch.float32), hs


@torch.library.custom_op("hybridlab::ssm_scan_bwd", mutates_args=())
def _scan_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, la: torch.Tensor, beta: torch.Tensor,
                 gamma: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, seq_idx: Optional[torch.Tensor],
                 hs: torch.Tensor, dy: torch.Tensor, dhf: torch.Tensor, block: int) -> List[torch.Tensor]:
    """-> [dq, dk, dv, d log_alpha, d beta, d gamma, dh0, dk0, dv0]."""
    return list(_bwd(q, k, v, la, beta, gamma, k0, v0, seq_idx, hs, dy.contiguous(), dhf.float().contiguous(), block))


@_scan_bwd_op.register_fake
def _(q, k, v, la, beta, gamma, k0, v0, seq_idx, hs, dy, dhf, block):
    b, l, nh, r, n = q.shape
    p = v.shape[-1]
    f32 = torch.float32
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *(la.new_empty(b, l, nh, dtype=f32) for _ in range(3)),
            q.new_empty(b, nh, p, n, dtype=f32), torch.empty_like(k0), torch.empty_like(v0)]


def _scan_setup(ctx, inputs, output):
    q, k, v, la, beta, gamma, h0, k0, v0, seq_idx, block, store_states = inputs
    if not store_states:  # the wrapper stores h' whenever an input needs a gradient
        raise RuntimeError("hybridlab::ssm_scan: a backward needs store_states=True in the forward")
    ctx.save_for_backward(q, k, v, la, beta, gamma, k0, v0, seq_idx, output[2])
    ctx.block = block
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dy, dhf, _dhs):
    q, k, v, la, beta, gamma, k0, v0, seq_idx, hs = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(v)
    if dhf is None:
        dhf = q.new_zeros(hs.shape[0], hs.shape[1], hs.shape[3], hs.shape[4], dtype=torch.float32)
    grads = torch.ops.hybridlab.ssm_scan_bwd(q, k, v, la, beta, gamma, k0, v0, seq_idx, hs, dy, dhf, ctx.block)
    return (*grads, None, None, None)


torch.library.register_autograd("hybridlab::ssm_scan", _scan_backward, setup_context=_scan_setup)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def ssm_scan_triton(q, k, v, log_alpha, beta, gamma, state=None, *, chunk_size: int | None = None, seq_idx=None):
    """The ``triton`` backend: returns ``(y, ScanState(h, k_last, v_last))``.

    ``seq_idx`` (b, l) int, nondecreasing per row: packed documents (see the package docstring)."""
    st = check_inputs(q, k, v, log_alpha, beta, gamma, state)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"ssm_scan triton: q/k/v must be fp16, bf16 or fp32; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("ssm_scan triton: q, k and v must share one dtype")
    block = _block_rows(q.shape[3], chunk_size)
    la, be, ga = (t.float().contiguous() for t in (log_alpha, beta, gamma))
    h0, k0, v0 = st.h.float().contiguous(), st.k.to(q.dtype).contiguous(), st.v.to(q.dtype).contiguous()
    q, k_, v_ = q.contiguous(), k.contiguous(), v.contiguous()
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    store = _needs_grad(q, k_, v_, la, be, ga, h0, k0, v0)
    y, hf, _ = torch.ops.hybridlab.ssm_scan(q, k_, v_, la, be, ga, h0, k0, v0, seq, block, store)
    return y, ScanState(hf, k[:, -1], v[:, -1])
