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


def scan_recurrent(q, k, v, log_alpha, beta, gamma, state=None):
    """The contract, one position at a time. Returns (y, ScanState)."""
    st = check_inputs(q, k, v, log_alpha, beta, gamma, state)
    acc = accum_dtype(q)
    h, k_prev, v_prev = st.h.to(acc), st.k.to(acc), st.v.to(acc)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    beta, gamma = beta.to(acc), gamma.to(acc)
    alpha = log_alpha.to(acc).exp()
    ys = []
    for t in range(q.shape[1]):
        k_t, v_t = kf[:, t], vf[:, t]  # (b, h, r, n), (b, h, r, p)
        prev = torch.einsum("bhrp,bhrn->bhpn", v_prev, k_prev)
        cur = torch.einsum("bhrp,bhrn->bhpn", v_t, k_t)
        h = (
            alpha[:, t, :, None, None] * h
            + beta[:, t, :, None, None] * prev
            + gamma[:, t, :, None, None] * cur
        )
        ys.append(torch.einsum("bhpn,bhrn->bhrp", h, qf[:, t]))
        k_prev, v_prev = k_t, v_t
    y = torch.stack(ys, dim=1).to(v.dtype)
    return y, ScanState(h, k[:, -1], v[:, -1])


def scan_chunked(q, k, v, log_alpha, beta, gamma, state=None, chunk_size: int = 64):
    """The same scan in chunks of ``chunk_size`` positions, as dense matmuls."""
    st = check_inputs(q, k, v, log_alpha, beta, gamma, state)
    b, l, nh, r, n = q.shape
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
        decay = torch.exp(diff.masked_fill(~causal, float("-inf")))  # (b, h, T, T)
        qc = qf[:, c0:c1].permute(0, 2, 1, 3, 4)  # (b, h, T, r, n)
        kc = keys[:, c0:c1].permute(0, 2, 1, 3, 4)  # (b, h, T, 2r, n)
        vc = vals[:, c0:c1].permute(0, 2, 1, 3, 4)  # (b, h, T, 2r, p)
        scores = torch.einsum("bhtrn,bhsjn->bhtrsj", qc, kc) * decay[:, :, :, None, :, None]
        y_intra = torch.einsum("bhtrsj,bhsjp->bhtrp", scores, vc)
        y_inter = torch.einsum("bhtrn,bhpn->bhtrp", qc, h) * L.exp()[..., None, None]
        ys.append((y_intra + y_inter).permute(0, 2, 1, 3, 4))
        # Carry the state to the chunk's end.
        to_end = torch.exp(L[..., -1:] - L)  # (b, h, T)
        h = L[..., -1].exp()[..., None, None] * h + torch.einsum("bhs,bhsjp,bhsjn->bhpn", to_end, vc, kc)
    y = torch.cat(ys, dim=1).to(v.dtype)
    return y, ScanState(h, k[:, -1], v[:, -1])
