"""The scan's per-(token, head) scalars from the layer's raw projections (b, l, H).

    scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid) -> (dt, log_alpha, beta, gamma)

dt = softplus(dt_raw + dt_bias) (0 at invalid positions), A = -max(softplus(a_raw + a_bias),
a_floor), log α = A·dt, and the trapezoid's β = (1-λ)·dt·α, γ = λ·dt with λ = sigmoid(lam_raw)
(Euler, lam_raw None: β = 0, γ = dt); all float32. The Triton kernels do it per element, and the
backward recomputes the forward instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton_utils import param_grid, pow2, tl, token_rows, triton
from ._dispatch import check, io_backend

__all__ = ["scan_coefficients", "scan_coefficients_reference", "scan_coefficients_triton"]


def scan_coefficients_reference(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor: float, valid=None):
    """(b, l, H) raw projections -> (dt, log_alpha, beta, gamma), float32 (b, l, H)."""
    dt = F.softplus(dt_raw.float() + dt_bias.float())
    if valid is not None:
        dt = torch.where(valid[..., None], dt, torch.zeros_like(dt))
    A = -F.softplus(a_raw.float() + a_bias.float()).clamp(min=a_floor)
    log_alpha = A * dt
    if lam_raw is None:
        return dt, log_alpha, torch.zeros_like(dt), dt
    lam = torch.sigmoid(lam_raw.float())
    return dt, log_alpha, (1 - lam) * dt * torch.exp(log_alpha), lam * dt


def scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor: float, valid=None, *, backend: str = "auto"):
    """dt, log α, β, γ (float32, (b, l, H)) from the raw (b, l, H) projections; ``valid`` (b, l) bool or None."""
    check(dt_raw.dim() == 3 and a_raw.shape == dt_raw.shape and (lam_raw is None or lam_raw.shape == dt_raw.shape),
          f"dt_raw, a_raw and lam_raw must share one (batch, seqlen, heads) shape; got {tuple(dt_raw.shape)}, {tuple(a_raw.shape)}"
          f" and {tuple(lam_raw.shape) if lam_raw is not None else None}")
    h = dt_raw.shape[-1]
    check(dt_bias.shape == (h,) and a_bias.shape == (h,), f"dt_bias and a_bias must be ({h},)")
    check(valid is None or valid.shape == dt_raw.shape[:2], f"valid must be {tuple(dt_raw.shape[:2])}")
    if io_backend(dt_raw, backend) == "triton":
        return scan_coefficients_triton(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid)
    return scan_coefficients_reference(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid)


# ------------------------------------------------------------------ Triton


@triton.jit
def _softplus(u):
    # log(1 + e^u), overflow-free; torch's softplus switches to u above 20 (same to fp32 precision)
    return tl.where(u > 20.0, u, tl.log(1.0 + tl.exp(tl.minimum(u, 20.0))))


@triton.jit
def _coef_fwd_kernel(DTR, AR, LR, DTB, AB, VALID, DT, LA, BETA, GAMMA, n_tok, s_tok, H, a_floor,
                     BT: tl.constexpr, BH: tl.constexpr, TRAP: tl.constexpr, HAS_VALID: tl.constexpr):
    pid = tl.program_id(0)
    t2 = (pid * BT + tl.arange(0, BT))[:, None]
    h2 = tl.arange(0, BH)[None, :]
    m = (t2 < n_tok) & (h2 < H)
    u_dt = tl.load(DTR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + tl.load(DTB + h2, mask=h2 < H, other=0.0)
    u_a = tl.load(AR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + tl.load(AB + h2, mask=h2 < H, other=0.0)
    dt = _softplus(u_dt)
    if HAS_VALID:
        dt = tl.where(tl.load(VALID + t2, mask=t2 < n_tok, other=0) != 0, dt, 0.0)
    la = -tl.maximum(_softplus(u_a), a_floor) * dt
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
                     BT: tl.constexpr, BH: tl.constexpr, TRAP: tl.constexpr, HAS_VALID: tl.constexpr):
    """Recompute the forward per element and apply the chain rule; bias grads summed per program."""
    pid = tl.program_id(0)
    h2 = tl.arange(0, BH)[None, :]
    b_dt = tl.load(DTB + h2, mask=h2 < H, other=0.0)
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
        sp_a = _softplus(u_a)
        a_abs = tl.maximum(sp_a, a_floor)
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
        d_ua = tl.where(sp_a >= a_floor, -g_la * dt * tl.sigmoid(u_a), 0.0)
        tl.store(D_DTR + o, d_udt.to(D_DTR.dtype.element_ty), mask=m)
        tl.store(D_AR + o, d_ua.to(D_AR.dtype.element_ty), mask=m)
        acc_dt += d_udt
        acc_a += d_ua
    h1 = tl.arange(0, BH)
    tl.store(DB_PART + (pid * 2) * H + h1, tl.sum(acc_dt, axis=0), mask=h1 < H)
    tl.store(DB_PART + (pid * 2 + 1) * H + h1, tl.sum(acc_a, axis=0), mask=h1 < H)


class ScanCoefficientsFn(torch.autograd.Function):
    """(dt_raw, a_raw, lam_raw, dt_bias, a_bias) (b, l, H) -> (dt, log α, β, γ) fp32 (b, l, H)."""

    @staticmethod
    def forward(ctx, dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid):
        b, l, h = dt_raw.shape
        trap = lam_raw is not None
        BH = pow2(h)
        BT = max(1, 2048 // BH)
        outs = [torch.empty(b, l, h, device=dt_raw.device, dtype=torch.float32) for _ in range(4)]
        vmask = valid.reshape(-1).to(torch.int8) if valid is not None else dt_raw
        _coef_fwd_kernel[(triton.cdiv(b * l, BT),)](
            dt_raw, a_raw, lam_raw if trap else dt_raw, dt_bias, a_bias, vmask, *outs, b * l, dt_raw.stride(1), h,
            float(a_floor), BT=BT, BH=BH, TRAP=trap, HAS_VALID=valid is not None, num_warps=4,
        )
        ctx.save_for_backward(dt_raw, a_raw, lam_raw, dt_bias, a_bias, vmask if valid is not None else None)
        ctx.a_floor, ctx.trap, ctx.has_valid = float(a_floor), trap, valid is not None
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_dt, g_la, g_beta, g_gamma):
        dt_raw, a_raw, lam_raw, dt_bias, a_bias, vmask = ctx.saved_tensors
        b, l, h = dt_raw.shape
        BH = pow2(h)
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
        progs, iters = param_grid(triton.cdiv(b * l, BT), 1)
        dbias = torch.empty(progs, 2, h, device=dt_raw.device, dtype=torch.float32)
        _coef_bwd_kernel[(progs,)](
            dt_raw, a_raw, lam_raw if ctx.trap else dt_raw, dt_bias, a_bias, vmask if ctx.has_valid else dt_raw,
            *grads, d_dtr, d_ar, d_lr, dbias, b * l, dt_raw.stride(1), h, ctx.a_floor, iters,
            BT=BT, BH=BH, TRAP=ctx.trap, HAS_VALID=ctx.has_valid, num_warps=4,
        )
        db = dbias.sum(0)
        return d_dtr, d_ar, d_lr if ctx.trap else None, db[0].to(dt_bias.dtype), db[1].to(a_bias.dtype), None, None


def scan_coefficients_triton(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid=None):
    raws = [token_rows(t) if t is not None else None for t in (dt_raw, a_raw, lam_raw)]
    if len({t.stride(1) for t in raws if t is not None}) > 1:  # the kernels take one token stride for all three
        raws = [t.contiguous() if t is not None else None for t in raws]
    return ScanCoefficientsFn.apply(*raws, dt_bias.float().contiguous(), a_bias.float().contiguous(), a_floor, valid)
