"""Plain-PyTorch reference for the trapezoidal SSM scan (DESIGN.md §3).

Two forms that must agree:

* ``scan_recurrent`` — the step-by-step recurrence, literally the contract; the
  decode form (one token at a time).
* ``scan_chunked`` — the matmul form that the Triton kernel follows. Within a
  chunk of T positions, with L_t = sum_{u<=t} log_alpha_u (inclusive),

      h_t = e^{L_t} h_in + sum_{s<=t} e^{L_t - L_s} (gamma_s v_s k_s^T + beta_s v_{s-1} k_{s-1}^T)

  so the trapezoid is a Mamba-2 style SSD whose inputs are the current (k, v)
  weighted by gamma and the previous (k, v) weighted by beta. The previous
  (k, v) of a chunk's first position comes from the chunk before (or from
  ``state``), which is why ``state`` carries the last (k, v) besides h.

Both accumulate in float32 (float64 for float64 inputs, so gradcheck works) and
return y in v's dtype.

Packed documents: ``seq_idx`` (batch, seqlen) int, nondecreasing along each row,
names the document of every position. Where it changes, the new document starts
from nothing: h is reset (no carry from the previous document) and the
trapezoid's previous-token (beta) term is dropped, so each document gives what
it gives alone. A passed-in ``state`` belongs to the row's first document only;
the returned state is that of the row's last document. ``cu_seqlens``
(n_docs + 1,) for a single-row batch says the same thing as offsets
(``seq_idx_from_cu_seqlens``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ScanState(NamedTuple):
    """What a sequence hands to its continuation.

    h: (batch, heads, headdim, d_state) float32 — the SSM state.
    k: (batch, heads, rank, d_state), v: (batch, heads, rank, headdim) — the
    last position's key/value, needed by the next step's beta term.
    """

    h: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def check_inputs(q, k, v, log_alpha, beta, gamma, state=None) -> ScanState:
    """Validate shapes against the contract; return a full ScanState (zeros if none)."""
    if q.dim() != 5 or k.shape != q.shape:
        raise ValueError(
            f"ssm_scan: q and k must both be (batch, seqlen, heads, rank, d_state); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, l, h, r, n = q.shape
    if v.dim() != 5 or v.shape[:4] != (b, l, h, r):
        raise ValueError(f"ssm_scan: v must be (batch, seqlen, heads, rank, headdim) = ({b}, {l}, {h}, {r}, P); got {tuple(v.shape)}")
    for name, t in (("log_alpha", log_alpha), ("beta", beta), ("gamma", gamma)):
        if t.shape != (b, l, h):
            raise ValueError(f"ssm_scan: {name} must be (batch, seqlen, heads) = ({b}, {l}, {h}); got {tuple(t.shape)}")
    if l < 1:
        raise ValueError("ssm_scan: seqlen must be at least 1")
    p = v.shape[-1]
    return normalize_state(state, b, h, r, n, p, q.device, k.dtype, v.dtype)


def check_seq_idx(seq_idx, b: int, l: int, device=None):
    """Validate a (batch, seqlen) integer ``seq_idx`` (None passes); returns it as int32.

    Monotonicity is the caller's promise (checking it would cost a device sync per call)."""
    if seq_idx is None:
        return None
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != (b, l):
        shape = tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__
        raise ValueError(f"ssm_scan: seq_idx must be a (batch, seqlen) = ({b}, {l}) integer tensor; got {shape}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool or seq_idx.is_complex():
        raise ValueError(f"ssm_scan: seq_idx must hold integers; got {seq_idx.dtype}")
    if device is not None and seq_idx.device != torch.device(device):
        raise ValueError(f"ssm_scan: seq_idx is on {seq_idx.device}, the inputs on {device}")
    return seq_idx.to(torch.int32)


def seq_idx_from_cu_seqlens(cu_seqlens, b: int, l: int) -> torch.Tensor:
    """``cu_seqlens`` (n_docs + 1,) offsets [0, ..., l] of a single-row batch -> seq_idx (1, l) int32."""
    if b != 1:
        raise ValueError(f"ssm_scan: cu_seqlens describes a single-row batch; got batch {b} (pass seq_idx instead)")
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"ssm_scan: cu_seqlens must be a 1-D integer tensor of n_docs + 1 >= 2 offsets; got {tuple(cu.shape)} {cu.dtype}")
    if not torch.compiler.is_compiling():  # a host sync: checked in eager mode only
        offs = cu.tolist()
        if offs[0] != 0 or offs[-1] != l or any(a > c for a, c in zip(offs, offs[1:])):
            raise ValueError(f"ssm_scan: cu_seqlens must rise from 0 to seqlen {l}; got {offs}")
    pos = torch.arange(l, device=cu.device)
    # the document of position t: how many document starts after the first lie at or before t
    return torch.bucketize(pos, cu[1:-1].to(pos.dtype), right=True).to(torch.int32)[None]


def doc_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) bool: True where a new document starts (never at t = 0, whose document the state belongs to)."""
    new = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    new[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return new


def normalize_state(state, b, h, r, n, p, device, k_dtype, v_dtype) -> ScanState:
    """Accept None, a bare h tensor, or an (h, k, v) tuple; return a ScanState."""
    if state is None:
        return ScanState(
            torch.zeros(b, h, p, n, device=device, dtype=torch.float32),
            torch.zeros(b, h, r, n, device=device, dtype=k_dtype),
            torch.zeros(b, h, r, p, device=device, dtype=v_dtype),
        )
    if isinstance(state, torch.Tensor):
        state = (state, None, None)
    hs, ks, vs = state
    if hs.shape != (b, h, p, n):
        raise ValueError(f"ssm_scan: state.h must be (batch, heads, headdim, d_state) = ({b}, {h}, {p}, {n}); got {tuple(hs.shape)}")
    if ks is None:
        ks = torch.zeros(b, h, r, n, device=device, dtype=k_dtype)
    if vs is None:
        vs = torch.zeros(b, h, r, p, device=device, dtype=v_dtype)
    if ks.shape != (b, h, r, n) or vs.shape != (b, h, r, p):
        raise ValueError(
            f"ssm_scan: state.k must be ({b}, {h}, {r}, {n}) and state.v ({b}, {h}, {r}, {p}); got {tuple(ks.shape)} and {tuple(vs.shape)}"
        )
    return ScanState(hs if hs.dtype == torch.float64 else hs.float(), ks, vs)


def accum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def scan_recurrent(q, k, v, log_alpha, beta, gamma, state=None, seq_idx=None):
    """The contract, one position at a time. Returns (y, ScanState)."""
    st = check_inputs(q, k, v, log_alpha, beta, gamma, state)
    seq_idx = check_seq_idx(seq_idx, q.shape[0], q.shape[1], q.device)
    acc = accum_dtype(q)
    h, k_prev, v_prev = st.h.to(acc), st.k.to(acc), st.v.to(acc)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    beta, gamma = beta.to(acc), gamma.to(acc)
    alpha = log_alpha.to(acc).exp()
    keep = None if seq_idx is None else (~doc_starts(seq_idx)).to(acc)  # (b, l): 0 where a document starts
    ys = []
    for t in range(q.shape[1]):
        k_t, v_t = kf[:, t], vf[:, t]  # (b, h, r, n), (b, h, r, p)
        prev = torch.einsum("bhrp,bhrn->bhpn", v_prev, k_prev)
        cur = torch.einsum("bhrp,bhrn->bhpn", v_t, k_t)
        if keep is not None:  # a new document: nothing carried, no previous-token term
            h = h * keep[:, t, None, None, None]
            prev = prev * keep[:, t, None, None, None]
        h = (
            alpha[:, t, :, None, None] * h
            + beta[:, t, :, None, None] * prev
            + gamma[:, t, :, None, None] * cur
        )
        ys.append(torch.einsum("bhpn,bhrn->bhrp", h, qf[:, t]))
        k_prev, v_prev = k_t, v_t
    y = torch.stack(ys, dim=1).to(v.dtype)
    return y, ScanState(h, k[:, -1], v[:, -1])


def scan_chunked(q, k, v, log_alpha, beta, gamma, state=None, chunk_size: int = 64, seq_idx=None):
    """The same scan in chunks of ``chunk_size`` positions, as dense matmuls."""
    st = check_inputs(q, k, v, log_alpha, beta, gamma, state)
    b, l, nh, r, n = q.shape
    seq_idx = check_seq_idx(seq_idx, b, l, q.device)
    if seq_idx is not None:  # the previous-token term does not cross into a new document
        beta = beta * (~doc_starts(seq_idx)).to(beta.dtype)[..., None]
    acc = accum_dtype(q)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    # The previous position's (k, v): shift right by one, the state's (k, v) first.
    k_prev = torch.cat([st.k.to(acc).unsqueeze(1), kf[:, :-1]], dim=1)
    v_prev = torch.cat([st.v.to(acc).unsqueeze(1), vf[:, :-1]], dim=1)
    # Fold the trapezoid weights into the values; keys of both terms side by side (2R).
    keys = torch.cat([kf, k_prev], dim=3)  # (b, l, h, 2r, n)
    vals = torch.cat([vf * gamma.to(acc)[..., None, None], v_prev * beta.to(acc)[..., None, None]], dim=3)
    la = log_alpha.to(acc)

    h = st.h.to(acc)
    ys = []
    for c0 in range(0, l, chunk_size):
        c1 = min(c0 + chunk_size, l)
        T = c1 - c0
        L = torch.cumsum(la[:, c0:c1], dim=1).transpose(1, 2)  # (b, h, T)
        # decay[t, s] = e^{L_t - L_s} for s <= t, else 0 (mask before exp: no inf*0).
        diff = L[..., :, None] - L[..., None, :]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if seq_idx is None:
            decay = torch.exp(diff.masked_fill(~causal, float("-inf")))  # (b, h, T, T)
            carry_in = carry_out = None
        else:
            # s feeds t only inside one document; h_in reaches the positions of the document that was
            # running when the chunk began (the state's, for the first chunk); the chunk hands on
            # only what its last document wrote.
            sid = seq_idx[:, c0:c1]
            same = (sid[:, :, None] == sid[:, None, :]) & causal  # (b, T, T)
            decay = torch.exp(diff.masked_fill(~same[:, None], float("-inf")))
            run_id = seq_idx[:, c0 - 1 : c0] if c0 > 0 else seq_idx[:, :1]
            carry_in = (sid == run_id).to(acc)  # (b, T)
            carry_out = (sid == sid[:, -1:]).to(acc)  # (b, T)
        qc = qf[:, c0:c1].permute(0, 2, 1, 3, 4)  # (b, h, T, r, n)
        kc = keys[:, c0:c1].permute(0, 2, 1, 3, 4)  # (b, h, T, 2r, n)
        vc = vals[:, c0:c1].permute(0, 2, 1, 3, 4)  # (b, h, T, 2r, p)
        scores = torch.einsum("bhtrn,bhsjn->bhtrsj", qc, kc) * decay[:, :, :, None, :, None]
        y_intra = torch.einsum("bhtrsj,bhsjp->bhtrp", scores, vc)
        in_w = L.exp() if carry_in is None else L.exp() * carry_in[:, None]  # (b, h, T)
        y_inter = torch.einsum("bhtrn,bhpn->bhtrp", qc, h) * in_w[..., None, None]
        ys.append((y_intra + y_inter).permute(0, 2, 1, 3, 4))
        # Carry the state to the chunk's end.
        to_end = torch.exp(L[..., -1:] - L)  # (b, h, T)
        h_w = L[..., -1].exp()
        if carry_out is not None:
            to_end = to_end * carry_out[:, None]
            h_w = h_w * carry_in[:, None, -1]  # h_in survives only if the last position is still its document
        h = h_w[..., None, None] * h + torch.einsum("bhs,bhsjp,bhsjn->bhpn", to_end, vc, kc)
    y = torch.cat(ys, dim=1).to(v.dtype)
    return y, ScanState(h, k[:, -1], v[:, -1])
