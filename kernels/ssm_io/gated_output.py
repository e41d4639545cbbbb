"""The scan's output stage: D skip, pre-gate grouped RMSNorm, SiLU gate and the MIMO rank combination.

    gated_output(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps) -> (b, l, H, P)
        y (b, l, H, R, P) from the scan; x, z (b, l, H, P) ->
        Σ_r mimo_o ⊙ norm(y + D·x⊙mimo_x) ⊙ silu(z ⊙ mimo_z)

The reference rounds to the activations' dtype after each step, as the layer always has; the Triton
kernel (one program per (token block, head)) keeps the D skip, the norm, the gate and the rank sum in
fp32 registers, reads y once and writes the rank-combined result; its backward recomputes the
forward's rows and sums the parameter gradients in registers.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .._triton_utils import env_pair, param_grid, pow2, tl, token_block, token_rows, triton
from ..norm_rotary import rms_norm
from ._dispatch import check, io_backend, shape_of

__all__ = ["gated_output", "gated_output_reference", "gated_output_triton"]


def gated_output_reference(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps: float):
    """y (b, l, H, R, P), x and z (b, l, H, P) -> (b, l, H, P) in y's dtype.

    ``norm_w`` (H, P) or None (no pre-gate norm); ``mimo_*`` (H, R, P) or None
    (SISO, R = 1).
    """
    b, l, h, r, p = y.shape
    x = x.reshape(b, l, h, 1, p)
    v = x * mimo_x.to(x.dtype) if mimo_x is not None else x
    y = y + D.to(y.dtype)[:, None, None] * v
    if norm_w is not None:
        y = rms_norm(y, None, eps) * norm_w.to(y.dtype)[:, None, :]
    z = z.reshape(b, l, h, 1, p)
    if mimo_z is not None:
        z = z * mimo_z.to(z.dtype)
    y = y * F.silu(z)
    if mimo_o is not None:
        return (y * mimo_o.to(y.dtype)).sum(dim=3)
    return y[:, :, :, 0]


def gated_output(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps: float, *, backend: str = "auto"):
    """D skip + pre-gate grouped RMSNorm + SiLU gate + rank combination -> (b, l, H, P)."""
    check(y.dim() == 5, f"y must be (batch, seqlen, heads, rank, headdim); got {tuple(y.shape)}")
    b, l, h, r, p = y.shape
    for name, t in (("x", x), ("z", z)):
        check(t.numel() == b * l * h * p and t.shape[:2] == (b, l), f"{name} must be ({b}, {l}, {h}, {p}); got {tuple(t.shape)}")
    check(D.shape == (h,), f"D must be ({h},); got {tuple(D.shape)}")
    check(norm_w is None or norm_w.shape == (h, p), f"norm_w must be ({h}, {p}); got {shape_of(norm_w)}")
    mimo = (mimo_x, mimo_z, mimo_o)
    check(all(m is None for m in mimo) or all(m is not None and m.shape == (h, r, p) for m in mimo),
          f"mimo_x/z/o must all be None (SISO) or all ({h}, {r}, {p})")
    check(mimo_x is not None or r == 1, f"rank {r} needs the MIMO projections mimo_x/z/o")
    if io_backend(y, backend) == "triton":
        return gated_output_triton(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps)
    return gated_output_reference(y, x.reshape(b, l, h, p), z.reshape(b, l, h, p), D, norm_w, mimo_x, mimo_z, mimo_o, eps)


# ------------------------------------------------------------------ Triton

# (fp32 elements per (BT, R, P) tile, warps): no register spills at the bench shapes (ptxas -v, sm_90a)
_OUT_FWD = env_pair("HYBRIDLAB_IO_OUT_FWD", "2048,4")
_OUT_BWD = env_pair("HYBRIDLAB_IO_OUT_BWD", "1024,4")


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
    RP, BP = pow2(r), max(pow2(p), 16)
    BT = token_block(RP, BP, budget)
    return b, l, h, r, p, RP, BP, BT, (triton.cdiv(b * l, BT), h)


def _opt(t, dummy):
    return t if t is not None else dummy


@torch.library.custom_op("hybridlab::gated_output", mutates_args=())
def _out_op(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor, norm_w: Optional[torch.Tensor],
            mimo_x: Optional[torch.Tensor], mimo_z: Optional[torch.Tensor], mimo_o: Optional[torch.Tensor],
            eps: float) -> torch.Tensor:
    """y (b, l, H, R, P) contiguous, x and z (b, l, H, P) token rows -> (b, l, H, P) in y's dtype."""
    b, l, h, r, p, RP, BP, BT, grid = _out_meta(y, _OUT_FWD[0])
    out = torch.empty(b, l, h, p, device=y.device, dtype=y.dtype)
    mimo = mimo_x is not None
    _out_fwd_kernel[grid](
        y, x, z, D, _opt(norm_w, D), _opt(mimo_x, D), _opt(mimo_z, D), _opt(mimo_o, D), out,
        b * l, x.stride(1), z.stride(1), h, eps,
        R=r, P=p, RP=RP, BP=BP, BT=BT, HAS_NORM=norm_w is not None, MIMO=mimo, num_warps=_OUT_FWD[1],
    )
    return out


@_out_op.register_fake
def _(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps):
    b, l, h, r, p = y.shape
    return y.new_empty(b, l, h, p)


@torch.library.custom_op("hybridlab::gated_output_bwd", mutates_args=())
def _out_bwd_op(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor, norm_w: Optional[torch.Tensor],
                mimo_x: Optional[torch.Tensor], mimo_z: Optional[torch.Tensor], mimo_o: Optional[torch.Tensor],
                dout: torch.Tensor, eps: float) -> List[torch.Tensor]:
    """-> [dy, dx, dz, dD, d norm_w, d mimo_x, d mimo_z, d mimo_o] (empty tensors for the absent ones)."""
    b, l, h, r, p, RP, BP, BT, grid = _out_meta(y, _OUT_BWD[0])
    dev, f32 = y.device, torch.float32
    mimo = mimo_x is not None
    progs, iters = param_grid(grid[0], h)  # each program walks `iters` token blocks of one head
    dy = torch.empty_like(y)
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    dz = torch.empty(b, l, h, p, device=dev, dtype=z.dtype)
    dD = torch.empty(progs, h, device=dev, dtype=f32)
    dnw = torch.empty(progs, h, p, device=dev, dtype=f32) if norm_w is not None else None
    dm = [torch.empty(progs, h, r, p, device=dev, dtype=f32) if mimo else None for _ in range(3)]
    _out_bwd_kernel[(progs, h)](
        y, x, z, D, _opt(norm_w, D), _opt(mimo_x, D), _opt(mimo_z, D), _opt(mimo_o, D), dout.contiguous(),
        dy, dx, dz, dD, _opt(dnw, dD), *(_opt(t, dD) for t in dm), b * l, x.stride(1), z.stride(1), h, eps, iters,
        R=r, P=p, RP=RP, BP=BP, BT=BT, HAS_NORM=norm_w is not None, MIMO=mimo, num_warps=_OUT_BWD[1],
    )
    total = lambda part, like: part.sum(0).to(like.dtype) if part is not None else y.new_empty(0)  # noqa: E731
    return [dy, dx, dz, total(dD, D), total(dnw, norm_w), total(dm[0], mimo_x), total(dm[1], mimo_z), total(dm[2], mimo_o)]


@_out_bwd_op.register_fake
def _(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, dout, eps):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else y.new_empty(0)  # noqa: E731
    b, l, h, r, p = y.shape
    return [torch.empty_like(y), x.new_empty(b, l, h, p), z.new_empty(b, l, h, p), like(D), like(norm_w), like(mimo_x),
            like(mimo_z), like(mimo_o)]


def _out_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.eps = inputs[8]


def _out_backward(ctx, dout):
    saved = ctx.saved_tensors
    grads = torch.ops.hybridlab.gated_output_bwd(*saved, dout, ctx.eps)
    return (*grads[:4], *(g if t is not None else None for g, t in zip(grads[4:], saved[4:])), None)


torch.library.register_autograd("hybridlab::gated_output", _out_backward, setup_context=_out_setup)


def gated_output_triton(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps: float):
    b, l, h, r, p = y.shape
    x, z = token_rows(x.reshape(b, l, h, p)), token_rows(z.reshape(b, l, h, p))
    params = [t.contiguous() if t is not None else None for t in (D, norm_w, mimo_x, mimo_z, mimo_o)]
    return torch.ops.hybridlab.gated_output(y.contiguous(), x, z, *params, float(eps))
