"""ssm_scan_fused: the scan with the Mamba-3 q/k/v preparation inside (issue 14 item 4).

* under TRITON_INTERPRET=1 (subprocess): the Triton kernels against the reference composition
  qk_prep_reference -> rank_expand_reference -> the scan reference (float64), values and the
  gradients of every input (B, C through a strided projection, the phase, norm weights, biases,
  x, mimo_x, log α, β, γ, the state) — R in {1, 2, 4}, with and without norm / bias / rotary,
  partial rotation (A odd) and full rotation (2A = N), non-power-of-two lengths, a carried state,
  packed documents; and the op saves no (b, l, H, R, N) / (b, l, H, R, P) tensor for backward;
  the kernels' sincos (one range reduction for both) against float64 sin/cos up to |x| = 1e4;
* guard zones (tests/guard_zones.py): every tensor the kernels touch is a view into a larger buffer
  whose margins and gaps are NaN, so an unmasked out-of-range read makes an output NaN and a write
  out of range changes a margin — over the cases above and over the GPU tests' shapes scaled down for
  the interpreter (64 heads, d_state 128 with 32 angles, lengths that are not a multiple of the chunk,
  state on and off, packed documents); the harness itself catches a planted read and write past the end;
* the fallback: when the fused kernels cannot launch for a shape class, the op runs the unfused chain
  qk_prep -> rank_expand -> ssm_scan (values and gradients as the reference) with one warning;
  HYBRIDLAB_SSM_FUSED=0 keeps the fused path off;
* the dispatcher: the torch backend is the reference chain, bad shapes raise;
* the kernels' shared memory and spills for Hopper (kernels/bench/triton_resources.py: compiled for
  sm_90 on this CPU, when triton's ptxas is here);
* full-size bf16 / fp32 checks on CUDA (marked gpu), each in its own process (a fault cannot poison
  the others) with CUDA_LAUNCH_BLOCKING=1 and guard zones on the device.
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


# The GPU tests' shapes (64 heads, d_state 128 with 32 angles, 1000 tokens: 15 full chunks and a partial one, a state)
# scaled down for the interpreter, keeping their edges: the head count, d_state / angles (two column steps in backward
# pass 2), a length that is not a multiple of the chunk, state on and off, the packed case's documents.
GUARD_CASES = [
    # b, l, h, r, n, p, A, norm, bias, with_state, chunk, docs
    (1, 10, 64, 1, 16, 16, 4, True, True, True, 16, None),  # 64 heads, SISO, one partial chunk, state
    (1, 23, 3, 1, 128, 16, 32, True, True, False, 16, None),  # d_state 128 / 32 angles (the layer's), no state
    (2, 21, 2, 4, 128, 16, 32, True, True, True, 4, None),  # MIMO R=4, N 128, 6 chunks (last partial), state
    (2, 30, 1, 4, 32, 16, 8, True, True, True, 4,
     [[0] * 9 + [1] * 1 + [2] * 7 + [3] * 13, [7] * 30]),  # the packed GPU case's structure: a 1-token document
]


# headdim split over several programs per head (the fp32 forward's config on the GPU: 64 in two 32-wide blocks), here
# forced to 16-wide blocks: headdim 32 (two full blocks) and 24 (a masked tail block), MIMO and SISO, packed
GUARD_SPLIT_P_CASES = [
    (1, 23, 2, 2, 32, 24, 8, True, True, True, 8, None),
    (2, 20, 2, 1, 16, 32, 4, True, True, True, 16, [[0] * 5 + [1] * 15, [3] * 20]),
]


def guarded_fused_case(*case, **kw):
    """``fused_case`` with every kernel of the fused op run inside guard zones; -> (errors, violations)."""
    import importlib

    from guard_zones import guard_fused

    with guard_fused(importlib.import_module("hybridlab.kernels.ssm_scan.triton_fused")) as violations:
        errs = fused_case(*case, **kw)
    return errs, violations


_INTERP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    import test_ssm_fused as t
    fails = []
    for case in t.FUSED_CASES:
        errs, bad = t.guarded_fused_case(*case)
        print(case[:11], {k: f"{v:.1e}" for k, v in errs.items()}, bad)
        fails += [(case[:11], k, v) for k, v in errs.items() if not v < 1e-4] + [(case[:11], v) for v in bad]
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


_GUARD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    import test_ssm_fused as t
    fails = []
    import os
    for case, split in [(c, False) for c in t.GUARD_CASES] + [(c, True) for c in t.GUARD_SPLIT_P_CASES]:
        if split:  # headdim in 16-wide blocks: several programs per head in the forward and backward pass 1
            os.environ.update(HYBRIDLAB_SSM_FUSED_FWD_BP="16", HYBRIDLAB_SSM_DH_BP="16")
        errs, bad = t.guarded_fused_case(*case)
        print(case[:11], "split P" if split else "", max(errs.values()), bad)
        fails += [(case[:11], k, v) for k, v in errs.items() if not v < 1e-4] + [(case[:11], v) for v in bad]
    print("FAILS", fails)
    sys.exit(1 if fails else 0)
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_fused_kernels_stay_in_bounds_at_the_gpu_tests_shapes():
    """No read or write outside any tensor, every output element written, at the GPU tests' edge structure."""
    run_under_interpreter(_GUARD_SCRIPT)


@triton.jit
def _shifted_copy_kernel(X, Y, n, READ_SHIFT: tl.constexpr, WRITE_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i + WRITE_SHIFT, tl.load(X + i + READ_SHIFT, mask=i < n), mask=i < n)


def harness_catches(read_shift: int, write_shift: int) -> list:
    """Violations the guard-zone harness reports for a copy that reads / writes that far past the tensors' ends."""
    from guard_zones import guarded_launches

    from hybridlab.kernels.ssm_scan.triton_fused import Launch

    x, y = torch.randn(10), torch.zeros(10)
    bad: list = []
    guarded_launches([Launch(_shifted_copy_kernel, (1,), (x, y, 10), dict(READ_SHIFT=read_shift, WRITE_SHIFT=write_shift,
                                                                          BLOCK=16), 1, 1)], bad)
    return bad


def unfused_chain_outputs(case, *, seed=0):
    """y, the final state and every input's gradient of the case through the unfused Triton chain, called
    directly: qk_prep -> rank_expand -> ssm_scan on their triton backends (what the fallback must equal)."""
    from hybridlab.kernels.ssm_io import qk_prep, rank_expand

    b, l, h, r, n, p, A, norm, bias, with_state, chunk, docs = case
    leaves, dy, dh = fused_inputs(b, l, h, r, n, p, A, norm, bias, with_state, seed=seed)
    ls = {k: v.clone().requires_grad_() if v is not None else None for k, v in leaves.items()}
    B, C = ls["proj"][..., 3 : 3 + r * n].view(b, l, r, n), ls["proj"][..., 3 + r * n :].view(b, l, r, n)
    x = ls["xproj"][..., 2:].view(b, l, h, p)
    q, k = qk_prep(B, C, ls["phase"], ls["b_norm"], ls["c_norm"], ls["b_bias"], ls["c_bias"], h, 1e-5, backend="triton")
    v = rank_expand(x, ls["mimo_x"], backend="triton") if r > 1 else x[:, :, :, None]
    st = ScanState(ls["h0"], ls["k0"], ls["v0"]) if "h0" in ls else None
    seq = torch.tensor(docs, dtype=torch.int32) if docs is not None else None
    y, fs = ssm_scan(q, k, v, ls["la"], ls["beta"], ls["gamma"], st, backend="triton", chunk_size=chunk, seq_idx=seq)
    return _outputs_and_grads(ls, y, fs, dy, dh)


def _outputs_and_grads(ls, y, fs, dy, dh):
    live = {k: v for k, v in ls.items() if v is not None}
    # the final state's h only: k_last / v_last are built outside the op, the same on either path
    loss = (y * dy).sum() + (fs.h * dh).sum()
    grads = torch.autograd.grad(loss, list(live.values()))
    return dict(y=y.detach(), h=fs.h.detach(), **{"d" + k: g for k, g in zip(live, grads)})


def fused_triton_outputs(case, *, seed=0):
    """The same through ``ssm_scan_fused(backend="triton")``."""
    b, l, h, r, n, p, A, norm, bias, with_state, chunk, docs = case
    leaves, dy, dh = fused_inputs(b, l, h, r, n, p, A, norm, bias, with_state, seed=seed)
    ls, y, fs = run_fused(leaves, (b, l, h, r, n, p), "triton", torch.float32, chunk, docs)
    return _outputs_and_grads(ls, y, fs, dy, dh)


def fallback_case(case, mode: str):
    """Force "the fused kernels cannot launch" for the case's class (``mode``: "probe" = the pre-check's verdict,
    "fwd-launch" / "bwd-launch" = an OutOfResources raised when the forward's / backward's fused kernels are
    launched) and compare the op with the unfused chain. -> (max relative difference over y, h and every gradient,
    fallback warnings, the unfused forward / backward calls)."""
    import importlib
    import warnings

    from triton.runtime.errors import OutOfResources

    tf = importlib.import_module("hybridlab.kernels.ssm_scan.triton_fused")
    saved = tf._probe, tf._run, tf._unfused_fwd, tf._unfused_bwd
    used: list = []
    kernel = {"fwd-launch": "_fused_fwd_kernel", "bwd-launch": "_fused_bwd_chunk_kernel"}.get(mode)

    def run(launches):
        if any(la.kernel.__name__ == kernel for la in launches):
            raise OutOfResources(300000, 232448, "shared memory")
        saved[1](launches)

    if mode == "probe":
        tf._probe = lambda sc: "simulated: 300000 B of shared memory"
    tf._run = run
    tf._unfused_fwd = lambda *a: (used.append("fwd"), saved[2](*a))[1]
    tf._unfused_bwd = lambda *a: (used.append("bwd"), saved[3](*a))[1]
    tf._CHECKED.clear()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = [fused_triton_outputs(case, seed=s) for s in (0, 1)]  # the class twice: one warning
    finally:
        tf._probe, tf._run, tf._unfused_fwd, tf._unfused_bwd = saved
        tf._CHECKED.clear()
    want = [unfused_chain_outputs(case, seed=s) for s in (0, 1)]
    diff = max(rel(g[k], u[k]) for g, u in zip(got, want) for k in u)
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning) and "unfused chain" in str(x.message)]
    return diff, msgs, used


def compiled_fallback_case(case):
    """The op under ``torch.compile(fullgraph=True)`` (a graph break raises) with the class refused by the pre-check:
    -> (max relative difference from the unfused chain over y, h and every gradient, fallback warnings)."""
    import importlib
    import warnings

    tf = importlib.import_module("hybridlab.kernels.ssm_scan.triton_fused")
    b, l, h, r, n, p, A, norm, bias, with_state, chunk, docs = case
    leaves, dy, dh = fused_inputs(b, l, h, r, n, p, A, norm, bias, with_state)
    names = [k for k, v in leaves.items() if v is not None]

    def f(*vals):
        ls = dict(zip(names, vals))
        B, C = ls["proj"][..., 3 : 3 + r * n].view(b, l, r, n), ls["proj"][..., 3 + r * n :].view(b, l, r, n)
        x = ls["xproj"][..., 2:].view(b, l, h, p)
        st = ScanState(ls["h0"], ls["k0"], ls["v0"]) if "h0" in ls else None
        y, fs = ssm_scan_fused(B, C, ls.get("phase"), ls.get("b_norm"), ls.get("c_norm"), ls.get("b_bias"),
                               ls.get("c_bias"), x, ls.get("mimo_x"), ls["la"], ls["beta"], ls["gamma"], st, eps=1e-5,
                               backend="triton", chunk_size=chunk)
        return y, fs.h

    saved = tf._probe
    tf._probe = lambda sc: "simulated: 300000 B of shared memory"
    tf._CHECKED.clear()
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ls = {k: leaves[k].clone().requires_grad_() for k in names}
            y, hf = torch.compile(f, backend="aot_eager", fullgraph=True)(*ls.values())
            got = _outputs_and_grads(ls, y, ScanState(hf, None, None), dy, dh)
    finally:
        tf._probe = saved
        tf._CHECKED.clear()
    want = unfused_chain_outputs(case)
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning) and "unfused chain" in str(x.message)]
    return max(rel(got[k], want[k]) for k in want), msgs


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    import test_ssm_fused as t
    fails = []
    # one case per way of refusing (each costs two fused + two unfused runs under the interpreter):
    # the pre-check's verdict on MIMO R=4 with a state and odd angles; an OutOfResources at the forward's launch on
    # packed documents (both: every call unfused, bit-for-bit the chain); at the backward's launch only, on SISO (the
    # first call's forward was fused, so its values are the fused kernels', to rounding; the second call is unfused)
    for case, mode, want_used in ((t.FUSED_CASES[2], "probe", ["fwd", "bwd"] * 2),
                                  (t.FUSED_CASES[5], "fwd-launch", ["fwd", "bwd"] * 2),
                                  (t.FUSED_CASES[0], "bwd-launch", ["bwd", "fwd", "bwd"])):
        diff, msgs, used = t.fallback_case(case, mode)
        print(mode, case[:7], f"max rel |fallback - unfused chain| {diff:.1e}", used, msgs)
        r, n, p = case[3], case[4], case[5]
        if not diff < (1e-5 if mode == "bwd-launch" else 1e-7):
            fails.append((mode, case[:7], "differs from the unfused chain", diff))
        if len(msgs) != 1 or f"R={r} d_state={n} headdim={p}" not in msgs[0]:
            fails.append((mode, case[:7], "one warning naming the class", msgs))
        if used != want_used:
            fails.append((mode, case[:7], "the unfused chain ran", used))
    # the same decision under torch.compile(fullgraph=True): made inside the op, so no graph break
    diff, msgs = t.compiled_fallback_case(t.FUSED_CASES[2])
    print("compiled", f"max rel |fallback - unfused chain| {diff:.1e}", msgs)
    if not diff < 1e-7 or len(msgs) != 1:
        fails.append(("compiled fallback", diff, msgs))
    print("FAILS", fails)
    sys.exit(1 if fails else 0)
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_unlaunchable_class_falls_back_to_the_unfused_chain():
    """A shape class whose fused kernels cannot launch (the pre-check's verdict, or an OutOfResources when the
    forward's or only the backward's kernels are launched) gives the unfused Triton chain's values and gradients,
    with one RuntimeWarning naming the class (not one per call); also under torch.compile(fullgraph=True)."""
    run_under_interpreter(_FALLBACK_SCRIPT)


_HARNESS_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, TESTS_DIR)
    import importlib
    import test_ssm_fused as t
    fails = []
    clean, over_read, over_write = t.harness_catches(0, 0), t.harness_catches(1, 0), t.harness_catches(0, 1)
    print("harness:", clean, over_read, over_write)
    if clean or not any("not finite" in v for v in over_read) or not any("guard elements written" in v for v in over_write):
        fails.append(("guard-zone harness", clean, over_read, over_write))

    print("FAILS", fails)
    sys.exit(1 if fails else 0)
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_guard_harness_catches_planted_out_of_range_accesses():
    """The guard-zone harness flags a planted out-of-range read and write, and nothing on a clean copy."""
    run_under_interpreter(_HARNESS_SCRIPT)


_OFF_SCRIPT = textwrap.dedent(
    """
    import importlib, torch
    from hybridlab.kernels import ssm_scan_fused
    from hybridlab.kernels.ssm_scan.fused import fused_supported
    tf = importlib.import_module("hybridlab.kernels.ssm_scan.triton_fused")
    B, x, la = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 2, 16), -torch.rand(1, 8, 2)
    ok, why = fused_supported(B, x, None)
    assert not ok and "HYBRIDLAB_SSM_FUSED=0" in why, (ok, why)
    tf.ssm_scan_fused_triton = None  # auto must not reach the fused kernels
    y, _ = ssm_scan_fused(B, B, None, None, None, None, None, x, None, la, la.exp(), la.exp(), eps=1e-5)
    assert y.shape == (1, 8, 2, 1, 16)
    print("ok")
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_16bit_fused_kernels_are_off_on_a_gpu_unless_forced():
    from hybridlab.kernels.ssm_scan.fused import gpu_dtype_refusal

    for dt in (torch.bfloat16, torch.float16):
        assert "HYBRIDLAB_SSM_FUSED=1" in gpu_dtype_refusal(True, dt, forced=False)
        assert gpu_dtype_refusal(True, dt, forced=True) is None
        assert gpu_dtype_refusal(False, dt, forced=False) is None  # the interpreter on CPU tests every dtype
    assert gpu_dtype_refusal(True, torch.float32, forced=False) is None


def test_fused_path_off_switch():
    run_under_interpreter(_OFF_SCRIPT, HYBRIDLAB_SSM_FUSED="0")


def test_hopper_resources_of_the_default_configs():
    """The float32 R 4, d_state 128 class (393 KiB of shared memory in the forward on the first H200 run) compiled for
    sm_90 on this CPU with triton's own ptxas: every kernel fits Hopper's 227 KiB, registers x threads fit a block,
    no heavy spills (kernels/bench/triton_resources.py --set ci; ~20 s of compiling, cached by triton after)."""
    import os
    import subprocess
    import sys

    from hybridlab.kernels.bench.triton_resources import check_available

    why = check_available()
    if why:
        pytest.skip(f"cannot compile for CUDA here: {why}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "hybridlab.kernels.bench.triton_resources", "--set", "ci", "--fail-on-spill"],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("layer fp32 R4 N128")]
    kernels = {r[5] for r in rows}
    assert {"fused_fwd_kernel", "fused_bwd_dh_kernel", "fused_bwd_chunk_kernel", "norm_bwd_kernel"} <= kernels, out
    assert "all within the limits" in out, out


def test_resource_verdicts():
    """triton_resources' judge: what makes a launch fail fails the run (no compile, shared memory over the limit,
    registers x threads over a block's, the driver refusing); heavy spills and the margin are marks only."""
    from hybridlab.kernels.bench.triton_resources import KIB, NA, Row, judge

    def row(shared=100 * KIB, regs=128, spill=0, threads=256, drv_error=""):
        return Row("c", "k", "", shared, regs, spill, spill, 0, 0.0, threads=threads, drv_error=drv_error)

    rows = [row(), row(shared=228 * KIB), row(shared=NA), row(regs=255, threads=512), row(drv_error="OutOfResources"),
            row(spill=5000), row(shared=210 * KIB), row(regs=NA, spill=NA)]
    assert judge(rows, 227 * KIB, 200 * KIB, 4096) == 4
    assert [r.verdict.split(" ")[0] for r in rows] == ["ok", "SHARED", "DID", "REGS", "DRIVER", "SPILLS", "above", "ok"]
    assert judge([row(spill=5000)], 227 * KIB, 200 * KIB, 4096, fail_on_spill=True) == 1


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
#
# Each case runs in its own process (``gpu_case_main``): an illegal memory access poisons the CUDA context of
# the process it happens in, and every later test there would fail too. CUDA_LAUNCH_BLOCKING=1 makes such an
# error name the kernel that faulted, and the guard zones (on the device) catch out-of-range writes and reads
# that do not fault. Few specialisations: each case compiles its own kernels (the JIT cache on disk is shared).
# ``scripts/device/fused_gpu_check.py`` runs the same cases in parallel processes.

GPU_CASES = {
    # name: (fused_case arguments (b, l, h, r, n, p, A, norm, bias, with_state, chunk, docs), dtype, tolerance, env)
    # 16-bit is off by default on a GPU (kernels/ssm_scan/fused.py: the H200 fault); forced on here to test the kernels
    "siso-bf16": ((2, 1000, 64, 1, 128, 64, 32, True, True, True, None, None), "bf16", 1e-2, {"HYBRIDLAB_SSM_FUSED": "1"}),
    "mimo4-bf16": ((2, 1000, 64, 4, 128, 64, 32, True, True, True, None, None), "bf16", 1e-2, {"HYBRIDLAB_SSM_FUSED": "1"}),
    "siso-fp32": ((2, 1000, 64, 1, 128, 64, 32, True, True, True, None, None), "fp32", 1e-4, {}),
    "mimo4-fp32": ((2, 1000, 64, 4, 128, 64, 32, True, True, True, None, None), "fp32", 1e-4, {}),
    "packed-mimo4-fp32": ((2, 1000, 8, 4, 128, 64, 32, True, True, True, None,
                           [[0] * 300 + [1] * 1 + [2] * 255 + [3] * 444, [7] * 1000]), "fp32", 1e-4, {}),
    # every class over a 1 KiB shared-memory limit: the unfused chain, with one warning
    "fallback-mimo4-bf16": ((2, 1000, 64, 4, 128, 64, 32, True, True, True, None, None), "bf16", 1e-2,
                            {"HYBRIDLAB_SSM_FUSED_MAX_SHARED": "1024", "HYBRIDLAB_SSM_FUSED": "1"}),
    # the whole Mamba-3 layer in float32 at d_model 2048 (64 heads x 64, d_state 128, 32 angles): the first H200 run's
    # OutOfResources; against the same layer on the torch backend
    "layer-siso-fp32": (("siso", 1), "fp32", 1e-4, {}),
    "layer-mimo4-fp32": (("mimo", 4), "fp32", 1e-4, {}),
}


def layer_case(mode: str, rank: int, *, d_model: int = 2048, b: int = 1, l: int = 300, device="cuda", seed=0):
    """Relative errors of a Mamba-3 layer on the auto backend (fused scan on CUDA) vs the same layer on torch:
    the output and every parameter's gradient (float32)."""
    from hybridlab.arch.layers.mamba3 import Mamba3
    from hybridlab.arch.spec import Mamba3Block

    blk = Mamba3Block(mode=mode, rank=rank)  # the dataclass leaves rank unresolved (None) for SISO
    torch.manual_seed(seed)
    fused = Mamba3(d_model, blk).to(device)
    ref = Mamba3(d_model, blk, backend="torch").to(device)
    ref.load_state_dict(fused.state_dict())
    u = torch.randn(b, l, d_model, device=device, generator=torch.Generator(device).manual_seed(seed))
    dout = torch.randn(b, l, d_model, device=device, generator=torch.Generator(device).manual_seed(seed + 1))
    errs = {}
    outs = []
    for m in (fused, ref):
        y = m(u)
        (y * dout).sum().backward()
        outs.append((y.detach(), {k: p.grad for k, p in m.named_parameters()}))
    errs["y"] = rel(outs[0][0], outs[1][0])
    errs.update({"d" + k: rel(g, outs[1][1][k]) for k, g in outs[0][1].items()})
    return errs


def gpu_case_main(name: str) -> int:
    """Run one GPU case in this process: values and gradients vs the float64 reference, inside guard zones; print
    the errors; 0 when within tolerance with no guard violation (and, for the fallback case, exactly one warning)."""
    import time
    import warnings

    args, dt, tol, env = GPU_CASES[name]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    t0 = time.time()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if name.startswith("layer"):
            errs, bad, errs2, bad2 = layer_case(*args), [], layer_case(*args, seed=1), []
        else:
            errs, bad = guarded_fused_case(*args, dtype=dtype, device="cuda")
            errs2, bad2 = guarded_fused_case(*args, dtype=dtype, device="cuda", seed=1)  # the same class again
    torch.cuda.synchronize()
    import importlib

    notes = importlib.import_module("hybridlab.kernels.ssm_scan.triton_fused").PROBE_NOTES
    fallback = [str(x.message) for x in w if "unfused chain" in str(x.message)]
    worst = max(errs, key=errs.get)
    path = "unfused chain (fallback)" if fallback else "fused kernels"
    print(f"{name}: {path}; max rel err {errs[worst]:.2e} ({worst}), {max(errs2.values()):.2e} at seed 1; guard "
          f"violations {bad + bad2}; {time.time() - t0:.1f} s")
    for msg in fallback:
        print("  warning:", msg)
    for note in notes:
        print("  pre-check could not run:", note)
    fails = [f"{k}: rel err {v:.2e} > {tol}" for e in (errs, errs2) for k, v in e.items() if not v < tol] + bad + bad2
    # the forced-fallback case: exactly one warning (one class); the op-level cases: the fused kernels must fit (no
    # fallback); a whole layer may take either path (it must not crash, and must match the torch layer)
    if name.startswith("layer"):
        if len(fallback) > 1:
            fails.append(f"expected at most one fallback warning (one class), got {len(fallback)}")
    else:
        want = 1 if name.startswith("fallback") else 0
        if len(fallback) != want:
            fails.append(f"expected {want} fallback warnings, got {len(fallback)}")
    for f in fails:
        print("FAIL", f)
    return 1 if fails else 0


def run_gpu_case(name: str, timeout: int = 300):
    """``gpu_case_main(name)`` in a fresh process with CUDA_LAUNCH_BLOCKING=1; returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", **GPU_CASES[name][3])
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_ssm_fused as t; " \
           f"sys.exit(t.gpu_case_main({name!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_fused_gpu_matches_reference(name):
    """The layer's shapes (64 heads x 64, d_state 128, 32 angles, norm + bias, chunk 64/R), 2 x 1000 tokens, with a
    state; packed documents; the fallback. Each in its own process."""
    proc = run_gpu_case(name)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
