"""The scan's per-(token, head) scalars from the layer's raw projections (b, l, H).

    scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid=None, *,
                      activation="heavy_tail", backend="auto") -> (dt, log_alpha, beta, gamma)

dt = softplus(dt_raw + dt_bias) (0 at invalid positions), A = -max(f(a_raw + a_bias), a_floor)
(no bias when ``a_bias`` is None), log α = A·dt, and the trapezoid's β = (1-λ)·dt·α, γ = λ·dt with
λ = sigmoid(lam_raw) (Euler, lam_raw None: β = 0, γ = dt); all float32 (b, l, H), float64 on the
reference for float64 inputs (the float64 interop checks need it).

``activation`` is f: ``heavy_tail`` (the official Mamba-3's, the default) is 1 + x for x >= 0 and
1 / (1 - x) for x < 0; ``softplus`` is the form before June 2026 (with a per-head ``a_bias``). The
Triton kernels do it per element, and the backward recomputes the forward instead of saving it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._triton_utils import param_grid, pow2, tl, token_rows, triton
from ..norm_rotary import at_least_fp32
from ._dispatch import check, io_backend, shape_of

__all__ = ["scan_coefficients", "scan_coefficients_reference", "scan_coefficients_triton", "A_ACTIVATIONS",
           "heavy_tail", "a_magnitude"]

A_ACTIVATIONS = ("heavy_tail", "softplus")


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """1 + u for u >= 0, 1 / (1 - u) for u < 0: positive, C1 at 0, linear growth (no exponential tail)."""
    return torch.where(u >= 0, 1 + u, 1 / (1 - u.clamp(max=0)))  # the clamp keeps the unused branch finite


def a_magnitude(u: torch.Tensor, activation: str) -> torch.Tensor:
    """|A| before the floor: ``activation`` applied to the A projection (+ its bias), in u's dtype."""
    return heavy_tail(u) if activation == "heavy_tail" else F.softplus(u)


a_activation = a_magnitude  # the name the kernels branch gave it (tests import both)


def scan_coefficients_reference(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor: float, valid=None,
                                activation: str = "heavy_tail"):
    """(b, l, H) raw projections -> (dt, log_alpha, beta, gamma), float32 (float64 for float64 inputs) (b, l, H);
    ``a_bias`` may be None."""
    f32 = at_least_fp32
    dt = F.softplus(f32(dt_raw) + f32(dt_bias))
    if valid is not None:
        dt = torch.where(valid[..., None], dt, torch.zeros_like(dt))
    u = f32(a_raw) + f32(a_bias) if a_bias is not None else f32(a_raw)
    A = -a_magnitude(u, activation).clamp(min=a_floor)
    log_alpha = A * dt
    if lam_raw is None:
        return dt, log_alpha, torch.zeros_like(dt), dt
    lam = torch.sigmoid(f32(lam_raw))
    return dt, log_alpha, (1 - lam) * dt * torch.exp(log_alpha), lam * dt


def scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor: float, valid=None, *,
                      activation: str = "heavy_tail", backend: str = "auto"):
    """dt, log α, β, γ (float32, (b, l, H)) from the raw (b, l, H) projections; ``valid`` (b, l) bool or None."""
    check(dt_raw.dim() == 3 and a_raw.shape == dt_raw.shape and (lam_raw is None or lam_raw.shape == dt_raw.shape),
          f"dt_raw, a_raw and lam_raw must share one (batch, seqlen, heads) shape; got {tuple(dt_raw.shape)}, {tuple(a_raw.shape)}"
          f" and {shape_of(lam_raw)}")
    h = dt_raw.shape[-1]
    check(dt_bias.shape == (h,) and (a_bias is None or a_bias.shape == (h,)),
          f"dt_bias and a_bias must be ({h},) (a_bias may be None); got {tuple(dt_bias.shape)} and {shape_of(a_bias)}")
    check(valid is None or valid.shape == dt_raw.shape[:2], f"valid must be {tuple(dt_raw.shape[:2])}")
    check(activation in A_ACTIVATIONS, f"unknown A activation {activation!r}; choose one of {', '.join(A_ACTIVATIONS)}")
    if io_backend(dt_raw, backend) == "triton":
        return scan_coefficients_triton(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation=activation)
    return scan_coefficients_reference(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation=activation)


# ------------------------------------------------------------------ Triton


@triton.jit
def _softplus(u):
    # log(1 + e^u), overflow-free; torch's softplus switches to u above 20 (same to fp32 precision)
    return tl.where(u > 20.0, u, tl.log(1.0 + tl.exp(tl.minimum(u, 20.0))))


@triton.jit
def _a_act(u, SOFTPLUS: tl.constexpr):
    """f(u) and f'(u): softplus, or the heavy tail 1 + u (u >= 0) / 1 / (1 - u) (u < 0)."""
    if SOFTPLUS:
        return _softplus(u), tl.sigmoid(u)
    else:
        inv = 1.0 / (1.0 - tl.minimum(u, 0.0))
        return tl.where(u >= 0, 1.0 + u, inv), tl.where(u >= 0, 1.0, inv * inv)


@triton.jit
def _raw_a(AR, AB, t2, h2, m, s_tok, H, HAS_ABIAS: tl.constexpr):
    u = tl.load(AR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32)
    if HAS_ABIAS:
        u += tl.load(AB + h2, mask=h2 < H, other=0.0)
    return u


@triton.jit
def _coef_fwd_kernel(DTR, AR, LR, DTB, AB, VALID, DT, LA, BETA, GAMMA, n_tok, s_tok, H, a_floor,
                     BT: tl.constexpr, BH: tl.constexpr, TRAP: tl.constexpr, HAS_VALID: tl.constexpr,
                     HAS_ABIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    pid = tl.program_id(0)
    t2 = (pid * BT + tl.arange(0, BT))[:, None]
    h2 = tl.arange(0, BH)[None, :]
    m = (t2 < n_tok) & (h2 < H)
    u_dt = tl.load(DTR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + tl.load(DTB + h2, mask=h2 < H, other=0.0)
    dt = _softplus(u_dt)
    if HAS_VALID:
        dt = tl.where(tl.load(VALID + t2, mask=t2 < n_tok, other=0) != 0, dt, 0.0)
    f_a, _ = _a_act(_raw_a(AR, AB, t2, h2, m, s_tok, H, HAS_ABIAS), SOFTPLUS)
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
                     HAS_ABIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Recompute the forward per element and apply the chain rule; bias grads summed per program."""
    pid = tl.program_id(0)
    h2 = tl.arange(0, BH)[None, :]
    b_dt = tl.load(DTB + h2, mask=h2 < H, other=0.0)
    acc_dt = tl.zeros((BT, BH), dtype=tl.float32)
    acc_a = tl.zeros((BT, BH), dtype=tl.float32)
    for it in range(ITERS):
        t2 = ((pid * ITERS + it) * BT + tl.arange(0, BT))[:, None]
        m = (t2 < n_tok) & (h2 < H)
        u_dt = tl.load(DTR + t2 * s_tok + h2, mask=m, other=0.0).to(tl.float32) + b_dt
        dt = _softplus(u_dt)
        keep = m
        if HAS_VALID:
            keep = keep & (tl.load(VALID + t2, mask=t2 < n_tok, other=0) != 0)
            dt = tl.where(keep, dt, 0.0)
        f_a, df_a = _a_act(_raw_a(AR, AB, t2, h2, m, s_tok, H, HAS_ABIAS), SOFTPLUS)
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


def _meta(dt_raw):
    b, l, h = dt_raw.shape
    BH = pow2(h)
    return b, l, h, BH, max(1, 2048 // BH)


def _valid_i8(valid, like):
    return valid.reshape(-1).to(torch.int8) if valid is not None else like


@torch.library.custom_op("hybridlab::scan_coefficients", mutates_args=())
def _coef_op(dt_raw: torch.Tensor, a_raw: torch.Tensor, lam_raw: Optional[torch.Tensor], dt_bias: torch.Tensor,
             a_bias: Optional[torch.Tensor], valid: Optional[torch.Tensor], a_floor: float,
             softplus: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, l, h, BH, BT = _meta(dt_raw)
    outs = [torch.empty(b, l, h, device=dt_raw.device, dtype=torch.float32) for _ in range(4)]
    _coef_fwd_kernel[(triton.cdiv(b * l, BT),)](
        dt_raw, a_raw, lam_raw if lam_raw is not None else dt_raw, dt_bias, a_bias if a_bias is not None else dt_bias,
        _valid_i8(valid, dt_raw), *outs, b * l, dt_raw.stride(1), h, a_floor,
        BT=BT, BH=BH, TRAP=lam_raw is not None, HAS_VALID=valid is not None, HAS_ABIAS=a_bias is not None,
        SOFTPLUS=softplus, num_warps=4,
    )
    return tuple(outs)


@_coef_op.register_fake
def _(dt_raw, a_raw, lam_raw, dt_bias, a_bias, valid, a_floor, softplus):
    return tuple(dt_raw.new_empty(dt_raw.shape, dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("hybridlab::scan_coefficients_bwd", mutates_args=())
def _coef_bwd_op(dt_raw: torch.Tensor, a_raw: torch.Tensor, lam_raw: Optional[torch.Tensor], dt_bias: torch.Tensor,
                 a_bias: Optional[torch.Tensor], valid: Optional[torch.Tensor], g_dt: torch.Tensor, g_la: torch.Tensor,
                 g_beta: torch.Tensor, g_gamma: torch.Tensor, a_floor: float,
                 softplus: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d dt_raw, d a_raw, d lam_raw (empty without λ), d biases (2, H): dt_bias's, a_bias's)."""
    b, l, h, BH, BT = _meta(dt_raw)
    grads = [g.float().contiguous() for g in (g_dt, g_la, g_beta, g_gamma)]
    new = lambda t: torch.empty(b, l, h, device=t.device, dtype=t.dtype)  # noqa: E731  (dense (b, l, H) grads)
    d_dtr, d_ar = new(dt_raw), new(a_raw)
    d_lr = new(lam_raw) if lam_raw is not None else dt_raw.new_empty(0)
    progs, iters = param_grid(triton.cdiv(b * l, BT), 1)
    dbias = torch.empty(progs, 2, h, device=dt_raw.device, dtype=torch.float32)
    _coef_bwd_kernel[(progs,)](
        dt_raw, a_raw, lam_raw if lam_raw is not None else dt_raw, dt_bias, a_bias if a_bias is not None else dt_bias,
        _valid_i8(valid, dt_raw), *grads, d_dtr, d_ar, d_lr if lam_raw is not None else d_dtr, dbias,
        b * l, dt_raw.stride(1), h, a_floor, iters,
        BT=BT, BH=BH, TRAP=lam_raw is not None, HAS_VALID=valid is not None, HAS_ABIAS=a_bias is not None,
        SOFTPLUS=softplus, num_warps=4,
    )
    return d_dtr, d_ar, d_lr, dbias.sum(0)


@_coef_bwd_op.register_fake
def _(dt_raw, a_raw, lam_raw, dt_bias, a_bias, valid, g_dt, g_la, g_beta, g_gamma, a_floor, softplus):
    b, l, h = dt_raw.shape
    d_lr = lam_raw.new_empty(b, l, h) if lam_raw is not None else dt_raw.new_empty(0)
    return dt_raw.new_empty(b, l, h), a_raw.new_empty(b, l, h), d_lr, dt_raw.new_empty(2, h, dtype=torch.float32)


def _coef_setup(ctx, inputs, output):
    dt_raw, a_raw, lam_raw, dt_bias, a_bias, valid, a_floor, softplus = inputs
    ctx.save_for_backward(dt_raw, a_raw, lam_raw, dt_bias, a_bias, valid)
    ctx.a_floor, ctx.softplus = a_floor, softplus


def _coef_backward(ctx, g_dt, g_la, g_beta, g_gamma):
    dt_raw, a_raw, lam_raw, dt_bias, a_bias, valid = ctx.saved_tensors
    d_dtr, d_ar, d_lr, db = torch.ops.hybridlab.scan_coefficients_bwd(
        dt_raw, a_raw, lam_raw, dt_bias, a_bias, valid, g_dt, g_la, g_beta, g_gamma, ctx.a_floor, ctx.softplus
    )
    return (d_dtr, d_ar, d_lr if lam_raw is not None else None, db[0], db[1] if a_bias is not None else None,
            None, None, None)


torch.library.register_autograd("hybridlab::scan_coefficients", _coef_backward, setup_context=_coef_setup)


def scan_coefficients_triton(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid=None, activation="heavy_tail"):
    raws = [token_rows(t) if t is not None else None for t in (dt_raw, a_raw, lam_raw)]
    if len({t.stride(1) for t in raws if t is not None}) > 1:  # the kernels take one token stride for all three
        raws = [t.contiguous() if t is not None else None for t in raws]
    return torch.ops.hybridlab.scan_coefficients(
        *raws, dt_bias.float().contiguous(), a_bias.float().contiguous() if a_bias is not None else None, valid,
        float(a_floor), activation == "softplus",
    )
