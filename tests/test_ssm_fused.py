"""ssm_scan_fused: the scan with the Mamba-3 q/k/v preparation inside (issue 14 item 4).

* under TRITON_INTERPRET=1 (subprocess): the Triton kernels against the reference composition
  qk_prep_reference -> rank_expand_reference -> the scan reference (float64), values and the
  gradients of every input (B, C through a strided projection, the phase, norm weights, biases,
  x, mimo_x, log α, β, γ, the state) — R in {1, 2, 4}, with and without norm / bias / rotary,
  partial rotation (A odd) and full rotation (2A = N), non-power-of-two lengths, a carried state,
  packed documents; and the op saves no (b, l, H, R, N) / (b, l, H, R, P) tensor for backward;
  the kernels' sincos (one range reduction for both) against float64 sin/cos up to |x| = 1e4;
* the dispatcher: the torch backend is the reference chain, bad shapes raise;
* full-size bf16 / fp32 checks on CUDA (marked gpu).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_under_interpreter

from hybridlab.kernels import ScanState, ssm_scan, ssm_scan_fused
from hybridlab.kernels._deps import has_module
from hybridlab.kernels._triton_utils import sincos, tl, triton
from hybridlab.kernels.ssm_io import qk_prep_reference, rank_expand_reference


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fused_inputs(b, l, h, r, n, p, A, norm, bias, with_state, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    leaves = dict(proj=rnd(b, l, 2 * r * n + 3), xproj=rnd(b, l, h * p + 2), phase=rnd(b, l, h, A, scale=2.0) if A else None,
                  b_norm=rnd(n).abs() + 0.5 if norm else None, c_norm=rnd(n).abs() + 0.5 if norm else None,
                  b_bias=rnd(h, r, n) if bias else None, c_bias=rnd(h, r, n) if bias else None,
                  mimo_x=rnd(h, r, p) if r > 1 else None)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=g) - 1.0)
    la = -(torch.rand(h, generator=g) * 2 + 0.1) * dt
    lam = torch.sigmoid(torch.randn(b, l, h, generator=g))
    leaves.update(la=la, beta=(1 - lam) * dt * la.exp(), gamma=lam * dt)
    if with_state:
        leaves.update(h0=rnd(b, h, p, n, scale=0.5), k0=rnd(b, h, r, n, scale=n**-0.5), v0=rnd(b, h, r, p))
    return leaves, rnd(b, l, h, r, p), rnd(b, h, p, n)


def run_fused(leaves, dims, backend, dtype, chunk=None, docs=None, device="cpu"):
    b, l, h, r, n, p = dims
    ls = {k: (v.to(device=device, dtype=dtype if k not in ("la", "beta", "gamma", "h0", "phase") or dtype == torch.float64
                    else torch.float32).requires_grad_() if v is not None else None) for k, v in leaves.items()}
    P_ = ls["proj"]
    B, C = P_[..., 3 : 3 + r * n].view(b, l, r, n), P_[..., 3 + r * n :].view(b, l, r, n)
    x = ls["xproj"][..., 2:].view(b, l, h, p)
    st = ScanState(ls["h0"], ls["k0"], ls["v0"]) if "h0" in ls else None
    seq = torch.tensor(docs, dtype=torch.int32, device=device) if docs is not None else None
    y, fs = ssm_scan_fused(B, C, ls["phase"], ls["b_norm"], ls["c_norm"], ls["b_bias"], ls["c_bias"], x, ls["mimo_x"],
                           ls["la"], ls["beta"], ls["gamma"], st, eps=1e-5, seq_idx=seq, backend=backend, chunk_size=chunk)
    return ls, y, fs


def fused_case(b, l, h, r, n, p, A, norm, bias, with_state, chunk, docs=None, *, dtype=torch.float32, device="cpu", seed=0):
    """Relative errors of the Triton fused scan vs the float64 reference chain: y, the final state (h, k, v) and
    the gradient of every input."""
    leaves, dy, dh = fused_inputs(b, l, h, r, n, p, A, norm, bias, with_state, seed=seed)
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        ls, y, fs = run_fused(leaves, (b, l, h, r, n, p), backend, dt, chunk, docs, device=device)
        live = {k: v for k, v in ls.items() if v is not None}
        loss = ((y.double() * dy.to(device, torch.float64)).sum() + (fs.h.double() * dh.to(device, torch.float64)).sum()
                + (fs.k.double() ** 2).sum() + (fs.v.double() ** 2).sum())
        grads = torch.autograd.grad(loss, list(live.values()))
        out[backend] = dict(y=y, h=fs.h, k_last=fs.k, v_last=fs.v, **{"d" + k: g for k, g in zip(live, grads)})
    return {k: rel(out["triton"][k].cpu(), out["torch"][k].cpu()) for k in out["torch"]}


FUSED_CASES = [
    # b, l, h, r, n, p, A (angles), norm, bias, with_state, chunk (positions), docs
    (1, 19, 2, 1, 16, 16, 4, True, True, True, 16, None),  # SISO, two chunks
    (2, 13, 2, 2, 16, 16, 8, True, True, False, 8, None),  # every column rotated (2A = N)
    (1, 21, 1, 4, 32, 16, 5, True, False, True, 4, None),  # odd angle count, no bias, 6 chunks
    (1, 9, 2, 4, 16, 32, 0, False, True, False, 4, None),  # no rotary, no norm
    (1, 12, 2, 2, 24, 16, 3, False, False, True, 8, None),  # d_state 24 (not a power of two), bare
    (2, 20, 2, 2, 16, 16, 4, True, True, True, 8, [[0] * 3 + [1] * 9 + [2] * 8, [4] * 8 + [5] * 12]),  # packed
]


def saved_shapes_case(b=1, l=12, h=2, r=4, n=16, p=16, A=4):
    """Shapes the Triton fused op saves for backward (the (b, l, H, R, ·) ones must not be among them)."""
    leaves, _, _ = fused_inputs(b, l, h, r, n, p, A, True, True, False)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_fused(leaves, (b, l, h, r, n, p), "triton", torch.float32, chunk=4)
    forbidden = {(b, l, h, r, n), (b, l, h, r, p)}
    return [s for s in shapes if s in forbidden], shapes


@triton.jit
def _sincos_kernel(X, S, C, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sn, cs = sincos(tl.load(X + i, mask=i < n))
    tl.store(S + i, sn, mask=i < n)
    tl.store(C + i, cs, mask=i < n)


def sincos_errors():
    """Max abs error of the kernels' shared sincos vs float64 sin/cos, per input magnitude."""
    kernel = _sincos_kernel
    out = {}
    for scale in (1.0, 100.0, 1e4):
        x = (torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 2 - 1) * scale
        sn, cs = torch.empty_like(x), torch.empty_like(x)
        kernel[(4,)](x, sn, cs, 4096, BLOCK=1024)
        out[scale] = max((sn.double() - x.double().sin()).abs().max().item(), (cs.double() - x.double().cos()).abs().max().item())
    return out


_INTERP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    import test_ssm_fused as t
    fails = []
    for case in t.FUSED_CASES:
        errs = t.fused_case(*case)
        print(case[:11], {k: f"{v:.1e}" for k, v in errs.items()})
        fails += [(case[:11], k, v) for k, v in errs.items() if not v < 1e-4]
    errs = t.sincos_errors()
    print("sincos max abs err by |x| scale:", errs)
    fails += [("sincos", k, v) for k, v in errs.items() if not v < 3e-7]
    bad, shapes = t.saved_shapes_case()
    print("saved for backward:", shapes)
    if bad:
        fails.append(("saved (b, l, H, R, .) tensors", bad))
    print("FAILS", fails)
    sys.exit(1 if fails else 0)
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_fused_triton_interpreter_matches_reference():
    run_under_interpreter(_INTERP_SCRIPT)


# ---------------------------------------------------------------- dispatcher (CPU)


def test_torch_backend_is_the_reference_chain():
    b, l, h, r, n, p, A = 2, 10, 2, 2, 8, 4, 2
    leaves, _, _ = fused_inputs(b, l, h, r, n, p, A, True, True, True, seed=3)
    ls, y, fs = run_fused(leaves, (b, l, h, r, n, p), "torch", torch.float64)
    P_ = ls["proj"]
    B, C = P_[..., 3 : 3 + r * n].view(b, l, r, n), P_[..., 3 + r * n :].view(b, l, r, n)
    x = ls["xproj"][..., 2:].view(b, l, h, p)
    q, k = qk_prep_reference(B, C, ls["phase"], ls["b_norm"], ls["c_norm"], ls["b_bias"], ls["c_bias"], h, 1e-5)
    y2, fs2 = ssm_scan(q, k, rank_expand_reference(x, ls["mimo_x"]), ls["la"], ls["beta"], ls["gamma"],
                       ScanState(ls["h0"], ls["k0"], ls["v0"]), backend="torch_recurrent")
    assert rel(y, y2) < 1e-12 and rel(fs.h, fs2.h) < 1e-12 and rel(fs.k, fs2.k) < 1e-12


@pytest.mark.parametrize("bad", ["x3d", "bc_batch", "no_mimo", "mimo_shape", "la_shape", "backend"])
def test_bad_arguments_raise(bad):
    b, l, h, r, n, p = 1, 6, 2, 2, 8, 4
    B, C, x = torch.randn(b, l, r, n), torch.randn(b, l, r, n), torch.randn(b, l, h, p)
    mx, la = torch.randn(h, r, p), torch.zeros(b, l, h)
    kw = {}
    if bad == "x3d":
        x = x.flatten(2)
    elif bad == "bc_batch":
        B, C = B.expand(2, -1, -1, -1), C.expand(2, -1, -1, -1)
    elif bad == "no_mimo":
        mx = None
    elif bad == "mimo_shape":
        mx = torch.randn(h, r, p + 1)
    elif bad == "la_shape":
        la = torch.zeros(b, l, h + 1)
    elif bad == "backend":
        kw = dict(backend="cute")
    with pytest.raises(ValueError, match="ssm_scan_fused|ssm_io"):
        ssm_scan_fused(B, C, None, None, None, None, None, x, mx, la, la, la, eps=1e-5, **kw)


def test_triton_backend_without_cuda_raises():
    import os

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton is usable here")
    B, x, la = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), torch.zeros(1, 4, 1)
    with pytest.raises(RuntimeError, match="triton"):
        ssm_scan_fused(B, B, None, None, None, None, None, x, None, la, la, la, eps=1e-5, backend="triton")


# ---------------------------------------------------------------- CUDA, full size

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r,n", [(1, 128), (4, 128), (4, 64), (2, 64)])
def test_fused_gpu_matches_reference(r, n, dtype):
    """The layer's shapes (64 heads x 64, A = N/4, norm + bias, chunk 64/R), 2 x 1000 tokens, with state."""
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for nm, e in fused_case(2, 1000, 64, r, n, 64, n // 4, True, True, True, None, dtype=dtype, device="cuda").items():
        assert e < tol, f"{nm}: rel err {e:.2e}"


@gpu
@needs_cuda
def test_fused_gpu_packed_documents():
    docs = [[0] * 300 + [1] * 1 + [2] * 255 + [3] * 444, [7] * 1000]
    for nm, e in fused_case(2, 1000, 8, 4, 128, 64, 32, True, True, True, None, docs, device="cuda").items():
        assert e < 1e-4, f"{nm}: rel err {e:.2e}"
