"""ssm_io: the fused pre/post-processing stages of the Mamba-3 scan against their references.

* the Triton kernels under TRITON_INTERPRET=1 (subprocess, as in test_ssm_scan):
  every stage, forward and every gradient (inputs and parameters), over ranks
  1/2/4, with and without norm / bias / rotary / MIMO / pre-gate norm,
  non-power-of-two sizes, strided inputs (views of a projection); scan
  coefficients with both A activations and without an A bias; the cumulative
  phase of packed documents against each document alone;
* a whole Mamba-3 layer whose stages and scan run on Triton equals the torch
  layer, forward and all parameter gradients (interpreter), also on packed
  documents (seq_idx through the fused scan and the phase kernels);
* bad shapes raise one clear ValueError; an unusable backend raises;
* full-size bf16 checks on CUDA (marked gpu).
"""

from __future__ import annotations

import importlib
import os
import textwrap

import pytest
import torch
from conftest import run_under_interpreter

from hybridlab.kernels._deps import has_module

from hybridlab.kernels.ssm_io import cumulative_phase, gated_output, io_backend, qk_prep, rank_expand, scan_coefficients


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def qk_case(b, l, h, r, n, A, norm, bias, strided_phase=False, *, dtype=torch.float32, device="cpu", seed=0):
    """Errors of the fused q/k stage vs the float64 reference: [q, k, dB/dC (via the projection), dphase, params]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    proj = rnd(b, l, 3 + 2 * r * n)  # B and C as strided views of one projection, as in the layer
    phase = rnd(b, h, A, l, scale=3.0).permute(0, 3, 1, 2) if strided_phase else rnd(b, l, h, A, scale=3.0)
    leaves = {"proj": proj, "phase": phase if A else None}
    leaves.update(b_norm=rnd(n).abs() + 0.5 if norm else None, c_norm=rnd(n).abs() + 0.5 if norm else None)
    leaves.update(b_bias=rnd(h, r, n) if bias else None, c_bias=rnd(h, r, n) if bias else None)
    dq, dk = rnd(b, l, h, r, n), rnd(b, l, h, r, n)
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        ls = {k: (v.to(device=device, dtype=dt if k != "phase" else (torch.float32 if dt != torch.float64 else dt)).detach().requires_grad_()
                  if v is not None else None) for k, v in leaves.items()}
        P = ls["proj"]
        B, C = P[..., 3 : 3 + r * n].view(b, l, r, n), P[..., 3 + r * n :].view(b, l, r, n)
        q, k = qk_prep(B, C, ls["phase"], ls["b_norm"], ls["c_norm"], ls["b_bias"], ls["c_bias"], h, 1e-5, backend=backend)
        live = [v for v in ls.values() if v is not None]
        grads = torch.autograd.grad((q.double() * dq.to(q.device, torch.float64)).sum() + (k.double() * dk.to(k.device, torch.float64)).sum(), live)
        out[backend] = [q, k, *grads]
    names = ["q", "k"] + [k for k, v in leaves.items() if v is not None]
    return {nm: rel(a.cpu(), b_.cpu()) for nm, a, b_ in zip(names, out["triton"], out["torch"])}


def out_case(b, l, h, r, p, norm, mimo, *, dtype=torch.float32, device="cpu", seed=0):
    """Errors of the fused output stage vs the float64 reference: [out, dy, dx/dz (projection), dD, params]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    leaves = {"y": rnd(b, l, h, r, p), "proj": rnd(b, l, 2 * h * p + 5), "D": rnd(h)}
    leaves["norm_w"] = rnd(h, p).abs() + 0.5 if norm else None
    for name in ("mimo_x", "mimo_z", "mimo_o"):
        leaves[name] = rnd(h, r, p) if mimo else None
    dout = rnd(b, l, h, p)
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        ls = {k: (v.to(device=device, dtype=dt).requires_grad_() if v is not None else None) for k, v in leaves.items()}
        x, z = ls["proj"][..., : h * p], ls["proj"][..., h * p : 2 * h * p]
        o = gated_output(ls["y"], x, z, ls["D"], ls["norm_w"], ls["mimo_x"], ls["mimo_z"], ls["mimo_o"], 1e-5, backend=backend)
        live = [v for v in ls.values() if v is not None]
        grads = torch.autograd.grad((o.double() * dout.to(o.device, torch.float64)).sum(), live)
        out[backend] = [o, *grads]
    names = ["out"] + [k for k, v in leaves.items() if v is not None]
    return {nm: rel(a.cpu(), b_.cpu()) for nm, a, b_ in zip(names, out["triton"], out["torch"])}


def phase_case(b, l, h, A, *, device="cpu", seed=0):
    """Errors of the fused cumulative phase vs the float64 reference: [phase, dθ, ddt]."""
    g = torch.Generator().manual_seed(seed)
    theta, dt = torch.randn(b, l, A, generator=g), torch.rand(b, l, h, generator=g)
    dphase = torch.randn(b, l, h, A, generator=g)
    out = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        th, d = theta.to(device, dtype).requires_grad_(), dt.to(device, dtype).requires_grad_()
        ph = cumulative_phase(th, d, backend=backend)
        out[backend] = [ph, *torch.autograd.grad((ph.double() * dphase.to(device, torch.float64)).sum(), [th, d])]
    return {nm: rel(a.cpu(), b_.cpu()) for nm, a, b_ in zip(["phase", "dtheta", "ddt"], out["triton"], out["torch"])}


def phase_packed_case(b, l, h, A, docs, *, backend="triton", device="cpu", seed=0):
    """Errors of the packed cumulative phase (``seq_idx`` = ``docs``) vs each document alone through the
    float64 reference: [phase, dθ, ddt]."""
    from hybridlab.kernels.ssm_io import cumulative_phase_reference

    g = torch.Generator().manual_seed(seed)
    theta, dt = torch.randn(b, l, A, generator=g), torch.rand(b, l, h, generator=g)
    dphase = torch.randn(b, l, h, A, generator=g)
    seq = torch.tensor(docs, dtype=torch.int32)
    th, d = theta.to(device).requires_grad_(), dt.to(device).requires_grad_()
    ph = cumulative_phase(th, d, seq_idx=seq.to(device), backend=backend)
    got = [ph, *torch.autograd.grad((ph.double() * dphase.to(device, torch.float64)).sum(), [th, d])]
    th2, d2 = theta.double().requires_grad_(), dt.double().requires_grad_()
    ref, loss = torch.zeros(b, l, h, A, dtype=torch.float64), 0
    for row in range(b):
        ids = seq[row]
        cuts = [0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist(), l]
        for a, e in zip(cuts[:-1], cuts[1:]):
            part = cumulative_phase_reference(th2[row : row + 1, a:e], d2[row : row + 1, a:e])
            ref[row, a:e] = part[0].detach()
            loss = loss + (part * dphase[row : row + 1, a:e].double()).sum()
    want = [ref, *torch.autograd.grad(loss, [th2, d2])]
    return {nm: rel(a.cpu(), b_) for nm, a, b_ in zip(["phase", "dtheta", "ddt"], got, want)}


# sequences over several of the kernel's position blocks (A = 17: 32-wide angle tiles, 32-position blocks)
PHASE_PACKED_CASES = [
    (2, 70, 5, 17, [[0] * 3 + [1] * 29 + [2] * 1 + [3] * 31 + [4] * 6, [7] * 32 + [8] * 38]),
    (1, 9, 2, 3, [[0, 1, 1, 2, 2, 2, 3, 3, 3]]),
]


def expand_case(b, l, h, r, p, *, dtype=torch.float32, device="cpu", seed=0):
    """Errors of the fused MIMO rank expansion vs the float64 reference: [v, dx (via a strided view), dw]."""
    g = torch.Generator().manual_seed(seed)
    proj, w, dv = torch.randn(b, l, h * p + 3, generator=g), torch.randn(h, r, p, generator=g), torch.randn(b, l, h, r, p, generator=g)
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        P_, W_ = proj.to(device, dt).requires_grad_(), w.to(device, dt).requires_grad_()
        v = rank_expand(P_[..., 3:].view(b, l, h, p), W_, backend=backend)
        out[backend] = [v, *torch.autograd.grad((v.double() * dv.to(device, torch.float64)).sum(), [P_, W_])]
    return {nm: rel(a.cpu(), b_.cpu()) for nm, a, b_ in zip(["v", "dx", "dw"], out["triton"], out["torch"])}


def coef_case(b, l, h, trap, with_valid, activation="heavy_tail", a_bias=False, *, dtype=torch.float32, device="cpu",
              seed=0):
    """Errors of the fused scan coefficients vs the float64 reference: [dt, log α, β, γ, d(projection), d biases].

    a_floor 0.5 clamps part of A, so both sides of the clamp's gradient are exercised; the A projection
    spans both branches of the heavy tail (u < 0 and u >= 0)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(b, l, 3 * h + 2, generator=g) * 2
    biases = [torch.randn(h, generator=g), torch.randn(h, generator=g)]
    if not a_bias:
        biases = biases[:1]
    valid = (torch.rand(b, l, generator=g) > 0.3).to(device) if with_valid else None
    gs = [torch.randn(b, l, h, generator=g) for _ in range(4)]
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        P_ = proj.to(device, dt).requires_grad_()
        bs = [t.to(device, dt).requires_grad_() for t in biases]
        raw = [P_[..., 2 + i * h : 2 + (i + 1) * h] for i in range(3)]
        res = scan_coefficients(raw[0], raw[1], raw[2] if trap else None, bs[0], bs[1] if a_bias else None, 0.5, valid,
                                activation=activation, backend=backend)
        loss = sum((r.double() * gg.to(device, torch.float64)).sum() for r, gg in zip(res, gs))
        out[backend] = [*res, *torch.autograd.grad(loss, [P_, *bs])]
    names = ["dt", "log_alpha", "beta", "gamma", "dproj", "ddt_bias", "da_bias"]
    return {nm: rel(a.cpu(), b_.cpu()) for nm, a, b_ in zip(names, out["triton"], out["torch"]) if b_.abs().sum() > 0}


COEF_CASES = [  # b, l, h, trapezoid, valid mask, A activation, A bias
    (2, 5, 3, True, False), (1, 70, 6, True, True), (2, 9, 1, False, True), (1, 300, 4, False, False),
    (2, 5, 3, True, False, "softplus", True), (1, 70, 6, True, True, "softplus", True),
    (1, 40, 5, True, True, "heavy_tail", True), (2, 9, 2, False, False, "softplus", False),
    (2, 9, 1, False, True, "softplus", True), (1, 300, 4, False, False, "softplus", True),
    (2, 33, 5, True, True, "heavy_tail", False), (1, 40, 3, False, False, "heavy_tail", True),
]

EXPAND_CASES = [(2, 5, 3, 4, 16), (1, 70, 2, 2, 24), (1, 9, 1, 8, 16)]

PHASE_CASES = [(2, 5, 3, 4), (1, 70, 6, 5), (1, 33, 1, 1)]  # sequences longer than a chunk; odd head/angle counts

QK_CASES = [
    # b, l, h, r, n, A (angles), norm, bias
    (2, 5, 3, 1, 16, 4, True, True),
    (1, 7, 2, 4, 32, 8, True, True),
    (2, 3, 2, 2, 24, 5, False, True),  # non-power-of-two d_state and angle count
    (1, 4, 3, 1, 16, 0, True, False),  # no rotary, no bias
    (1, 9, 2, 4, 16, 8, False, False),  # every column rotated
    (1, 70, 1, 1, 16, 2, True, True),  # more tokens than one program's block
    (2, 33, 3, 2, 16, 4, True, True, True),  # phase as a (b, H, A, l)-major view, as the layer builds it
]
OUT_CASES = [
    # b, l, h, r, p, pre-gate norm, mimo
    (2, 5, 3, 1, 16, True, False),
    (1, 7, 2, 4, 32, True, True),
    (2, 3, 2, 2, 24, False, True),
    (1, 4, 3, 1, 20, False, False),
    (1, 70, 1, 8, 16, True, True),
]

_INTERP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, TESTS_DIR)
    import test_ssm_io as t
    fails = []
    for name, cases, check, tol in t.INTERPRETER_CHECKS:
        for case in cases:
            for nm, e in getattr(t, check)(*case).items():
                print(name, case, nm, f"{e:.2e}")
                if not e < tol:
                    fails.append((name, case, nm, e))
    print("FAILS", fails)
    sys.exit(1 if fails else 0)
    """
)

LAYER_CASES = [
    # mode, rank, out_norm, overrides
    ("siso", 1, "none", []),
    ("mimo", 2, "pre_gate_grouped", []),
    ("mimo", 4, "pre_gate_grouped", ["rope_fraction=1.0", "bc_bias=false"]),
    ("siso", 1, "pre_gate_grouped", ["rope=false", "bc_norm=false", "trapezoid=false"]),
    ("mimo", 2, "none", ["a_activation=softplus", "a_bias=true"]),  # the pre-June-2026 A form
    ("siso", 1, "none", ["a_bias=true"]),  # heavy tail with a learned bias
]


def layer_case(mode, rank, out_norm, overrides, *, device="cpu", dtype=torch.float32, b=2, l=24, seq_idx=None):
    """One Mamba-3 layer on Triton (fused stages + scan) vs the same layer on torch: output and every gradient
    (``seq_idx``: a packed batch, through the fused scan and the packed phase kernels vs the references)."""
    from hybridlab.arch.layers.mamba3 import Mamba3
    from hybridlab.arch.spec import load_model_spec

    sets = [f"blocks.m3.mode={mode}", f"blocks.m3.rank={rank}", f"blocks.m3.out_norm={out_norm}", "blocks.m3.d_state=16",
            "blocks.m3.headdim=16", f"blocks.m3.chunk_size={16 // rank}", "d_model=48"] + [f"blocks.m3.{o}" for o in overrides]
    spec = load_model_spec("zoo:tiny-mamba3", sets)
    torch.manual_seed(0)
    ref = Mamba3(spec.d_model, spec.blocks["m3"], backend="torch").to(device)
    with torch.no_grad():  # move every parameter off its init so each gradient path is exercised
        for prm in ref.parameters():
            prm.add_(torch.randn_like(prm) * 0.2)
    fused = Mamba3(spec.d_model, spec.blocks["m3"], backend="triton").to(device)
    fused.load_state_dict(ref.state_dict())
    u = torch.randn(b, l, spec.d_model, device=device)
    res = {}
    for name, layer in (("triton", fused.to(dtype)), ("torch", ref.double())):
        uu = u.to(torch.float64 if name == "torch" else dtype).detach().requires_grad_()
        y = layer(uu, seq_idx=seq_idx.to(device) if seq_idx is not None else None)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        (y.double() * dy.double()).sum().backward()
        res[name] = {"y": y.detach(), "du": uu.grad, **{n: prm.grad for n, prm in layer.named_parameters()}}
    return {n: rel(res["triton"][n].cpu(), res["torch"][n].cpu()) for n in res["torch"]}


LAYER_PACKED_CASES = [  # as LAYER_CASES, plus the document lengths of each row (l = 24)
    ("mimo", 2, "pre_gate_grouped", [], [[5, 11, 8], [24]]),
    ("siso", 1, "none", ["rope=standard", "a_activation=softplus", "a_bias=true"], [[1, 16, 7], [12, 12]]),
]


def layer_packed_case(mode, rank, out_norm, overrides, lengths, **kw):
    seq = torch.stack([torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(row)]) for row in lengths])
    return layer_case(mode, rank, out_norm, overrides, b=len(lengths), l=seq.shape[1], seq_idx=seq, **kw)


INTERPRETER_CHECKS = [  # (name, cases, check function, tolerance on every relative error)
    ("coef", COEF_CASES, "coef_case", 1e-5),
    ("expand", EXPAND_CASES, "expand_case", 1e-5),
    ("phase", PHASE_CASES, "phase_case", 1e-5),
    ("phase_packed", PHASE_PACKED_CASES, "phase_packed_case", 1e-5),
    ("qk", QK_CASES, "qk_case", 1e-5),
    ("out", OUT_CASES, "out_case", 1e-5),
    ("layer", LAYER_CASES, "layer_case", 1e-4),
    ("layer_packed", LAYER_PACKED_CASES, "layer_packed_case", 1e-4),
]


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_triton_io_interpreter_matches_reference():
    run_under_interpreter(_INTERP_SCRIPT, HYBRIDLAB_IO_BWD_PROGRAMS="2")


# ---------------------------------------------------------------- references


def test_heavy_tail_activation_is_the_official_form():
    """A = -max(f(a_raw [+ a_bias]), a_floor), f = 1 + x (x >= 0), 1 / (1 - x) (x < 0); finite grads both sides."""
    from hybridlab.kernels.ssm_io.scan_coefficients import a_activation

    u = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    f = a_activation(u, "heavy_tail")
    assert torch.allclose(f, torch.tensor([0.25, 0.5, 1.0, 1.5, 3.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(f.sum(), u)
    assert torch.allclose(g, torch.tensor([1 / 16, 0.25, 1.0, 1.0, 1.0], dtype=torch.float64))
    dt_raw, a_raw = torch.randn(1, 4, 2, dtype=torch.float64), torch.tensor([[[-3.0, 2.0]] * 4], dtype=torch.float64)
    dt, la, beta, gamma = scan_coefficients(dt_raw, a_raw, None, torch.zeros(2, dtype=torch.float64), None, 0.3, backend="torch")
    assert torch.allclose(la, -torch.tensor([0.3, 3.0], dtype=torch.float32) * dt)  # -3 -> 1/4, floored to 0.3
    dt2, la2, _, _ = scan_coefficients(dt_raw, a_raw, None, torch.zeros(2, dtype=torch.float64), torch.zeros(2), 0.3,
                                       activation="softplus", backend="torch")
    assert torch.allclose(la2, -torch.nn.functional.softplus(a_raw.float()).clamp(min=0.3) * dt2)


def test_scan_coefficients_reference_gradcheck_heavy_tail():
    g = torch.Generator().manual_seed(3)
    raws = [(torch.randn(1, 6, 3, generator=g, dtype=torch.float64) * 2).requires_grad_() for _ in range(3)]
    dtb = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()

    def f(dtr, ar, lr, dtb):
        return scan_coefficients(dtr, ar, lr, dtb, None, 0.2, backend="torch")

    # float64 inputs stay float64 in the reference (at_least_fp32): gradcheck at its own tolerances
    assert all(t.dtype == torch.float64 for t in f(*raws, dtb))
    assert torch.autograd.gradcheck(f, (*raws, dtb))


def test_cumulative_phase_packed_torch_backend():
    for case in PHASE_PACKED_CASES:
        for nm, e in phase_packed_case(*case, backend="torch").items():
            assert e < 1e-6, f"{case[:4]} {nm}: {e:.2e}"


def test_scan_coefficients_bad_activation_and_bias():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="activation"):
        scan_coefficients(x, x, None, torch.zeros(3), None, 0.1, activation="relu", backend="torch")
    with pytest.raises(ValueError, match="a_bias"):
        scan_coefficients(x, x, None, torch.zeros(3), torch.zeros(4), 0.1, backend="torch")


# ---------------------------------------------------------------- dispatch and bad input


def test_auto_backend_on_cpu_is_the_reference():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton is usable here")
    t = torch.zeros(1)
    assert io_backend(t) == "torch"
    assert io_backend(t.double(), "auto") == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        io_backend(t, "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        io_backend(t, "cuda")


def test_scan_coefficients_a_forms():
    """A = -max(f(a_raw [+ a_bias]), a_floor): the official heavy tail by default, softplus on request."""
    a_raw = torch.tensor([[[-3.0, -0.5, 0.0, 0.7, 5.0]]], dtype=torch.float64)
    dt_raw, dt_bias = torch.zeros_like(a_raw), torch.zeros(5, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.zeros(()))
    heavy = torch.tensor([1 / 4, 1 / 1.5, 1.0, 1.7, 6.0], dtype=torch.float64)
    _, la, _, _ = scan_coefficients(dt_raw, a_raw, None, dt_bias, None, 1e-4, backend="torch")
    torch.testing.assert_close(la[0, 0], -heavy * dt)
    _, la, _, _ = scan_coefficients(dt_raw, a_raw, None, dt_bias, None, 0.5, backend="torch")
    torch.testing.assert_close(la[0, 0], -heavy.clamp(min=0.5) * dt)
    bias = torch.full((5,), 0.25, dtype=torch.float64)
    _, la, _, _ = scan_coefficients(dt_raw, a_raw, None, dt_bias, bias, 1e-4, activation="softplus", backend="torch")
    torch.testing.assert_close(la[0, 0], -torch.nn.functional.softplus(a_raw[0, 0] + 0.25) * dt)
    with pytest.raises(ValueError, match="ssm_io: unknown A activation"):
        scan_coefficients(dt_raw, a_raw, None, dt_bias, None, 1e-4, activation="relu", backend="torch")
    with pytest.raises(ValueError, match="ssm_io: dt_bias and a_bias"):
        scan_coefficients(dt_raw, a_raw, None, dt_bias, torch.zeros(4), 1e-4, backend="torch")


@pytest.mark.parametrize("bad", ["rank4d", "c_shape", "norm", "bias", "phase_heads", "phase_wide"])
def test_qk_prep_bad_shapes(bad):
    b, l, h, r, n = 1, 3, 2, 1, 8
    B, C = torch.randn(b, l, r, n), torch.randn(b, l, r, n)
    phase, w, bias = torch.randn(b, l, h, 2), torch.ones(n), torch.ones(h, r, n)
    if bad == "rank4d":
        B, C = B[..., 0], C[..., 0]
    elif bad == "c_shape":
        C = C[..., :4]
    elif bad == "norm":
        w = torch.ones(n + 1)
    elif bad == "bias":
        bias = torch.ones(h + 1, r, n)
    elif bad == "phase_heads":
        phase = torch.randn(b, l, h + 1, 2)
    elif bad == "phase_wide":
        phase = torch.randn(b, l, h, n)
    with pytest.raises(ValueError, match="ssm_io"):
        qk_prep(B, C, phase, w, w, bias, bias, h, 1e-5, backend="torch")


@pytest.mark.parametrize("bad", ["y4d", "x", "D", "norm", "mimo_partial", "rank_without_mimo"])
def test_gated_output_bad_shapes(bad):
    b, l, h, r, p = 1, 3, 2, 2, 8
    y, x, z = torch.randn(b, l, h, r, p), torch.randn(b, l, h, p), torch.randn(b, l, h * p)
    D, nw, m = torch.ones(h), torch.ones(h, p), torch.ones(h, r, p)
    mimo = [m, m, m]
    if bad == "y4d":
        y = y[:, :, :, 0]
    elif bad == "x":
        x = x[..., :4]
    elif bad == "D":
        D = torch.ones(h + 1)
    elif bad == "norm":
        nw = torch.ones(p)
    elif bad == "mimo_partial":
        mimo = [m, None, m]
    elif bad == "rank_without_mimo":
        mimo = [None, None, None]
    with pytest.raises(ValueError, match="ssm_io"):
        gated_output(y, x, z, D, nw, *mimo, 1e-5, backend="torch")


# ---------------------------------------------------------------- CUDA, full size

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [1, 4])
def test_io_gpu_matches_reference(r, dtype):
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for nm, e in qk_case(2, 1024, 32, r, 128, 32, True, True, dtype=dtype, device="cuda").items():
        assert e < tol, f"qk {nm}: {e:.2e}"
    for nm, e in out_case(2, 1024, 32, r, 64, True, r > 1, dtype=dtype, device="cuda").items():
        assert e < tol, f"out {nm}: {e:.2e}"
    for nm, e in expand_case(2, 1024, 32, r, 64, dtype=dtype, device="cuda").items():
        assert e < tol, f"expand {nm}: {e:.2e}"
    for act, ab in (("heavy_tail", False), ("softplus", True)):
        for nm, e in coef_case(2, 2048, 32, r > 1, r > 1, act, ab, device="cuda").items():
            assert e < 1e-5, f"coef {act} {nm}: {e:.2e}"
    for nm, e in phase_case(2, 2048, 32, 32, device="cuda").items():
        assert e < 1e-5, f"phase {nm}: {e:.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_gpu_matches_torch_layer(case):
    for nm, e in layer_case(*case, device="cuda", b=2, l=300).items():
        assert e < 1e-4, f"{nm}: {e:.2e}"


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("norm_bias", [True, False])
def test_qk_prep_kernels_compile_for_sm90_in_bf16_as_launched(rotary, norm_bias):
    """The q/k kernels as the op launches them in bf16 compile for an H100/H200 (no GPU needed). Without a
    rotary (a Mamba-2-style block) the angle pointer once stood in with B's bf16, whose cos/sin the GPU
    compiler refuses (every m2 run of 2026-12-04's MQAR sweep failed so): the interpreter ran it."""
    pytest.importorskip("triton")
    from sm90_compile import recorded_launches

    from hybridlab.kernels.bench.triton_resources import compile_launch

    q = importlib.import_module("hybridlab.kernels.ssm_io.qk_prep")  # the package's qk_prep is the function

    b, l, h, r, n, A = 2, 16, 2, 1, 64, 8
    bf = dict(dtype=torch.bfloat16)
    B, C = torch.randn(b, l, r, n, **bf), torch.randn(b, l, r, n, **bf)
    phase = torch.randn(b, l, h, A) if rotary else None
    w = [torch.ones(n, **bf), torch.ones(n, **bf)] if norm_bias else [None, None]
    bias = [torch.zeros(h, r, n, **bf), torch.zeros(h, r, n, **bf)] if norm_bias else [None, None]
    with recorded_launches() as launches:
        q._qk_op(B, C, phase, *w, *bias, h, 1e-5)
        q._qk_bwd_op(B, C, phase, *w, *bias, torch.randn(b, l, h, r, n, **bf), torch.randn(b, l, h, r, n, **bf), h, 1e-5)
    kernels = {launch.kernel.fn.__name__ for launch in launches}
    assert {"_qk_fwd_kernel", "_qk_bwd_kernel"} <= kernels and (("_qk_dbias_kernel" in kernels) == norm_bias)
    for launch in launches:
        assert "cubin" in compile_launch(launch, arch=90).asm, launch.kernel.fn.__name__


LAYER_BLOCKS = {  # zoology-mqar.yaml's m2 and the paper recipes' variants
    "m2": dict(d_state=64, rope=False, trapezoid=False, bc_norm=False, bc_bias=False, a_activation="softplus", a_bias=True),
    "m3": dict(d_state=64),
    "m3_std": dict(d_state=64, rope="standard"),
    "mimo": dict(d_state=64, mode="mimo", rank=4),
}


@pytest.mark.parametrize("dtype,fused_on", [(torch.bfloat16, False), (torch.float32, True)],
                         ids=["bf16-unfused", "fp32-fused"])  # what a GPU runs by default for each dtype
@pytest.mark.parametrize("block", sorted(LAYER_BLOCKS))
def test_every_triton_kernel_of_a_mamba3_layer_compiles_for_sm90_as_launched(block, dtype, fused_on, monkeypatch):
    """A Mamba-3 layer's forward and backward on the Triton path launch kernels that all compile for an
    H100/H200 with the arguments the launchers pass (recorded on the CPU, compiled without a GPU)."""
    pytest.importorskip("triton")
    from sm90_compile import recorded_launches, unique

    from hybridlab.kernels.bench.triton_resources import compile_launch

    from hybridlab.arch import load_model_spec
    from hybridlab.arch.layers.mamba3 import Mamba3

    monkeypatch.setattr(importlib.import_module("hybridlab.kernels.ssm_scan.fused"), "ENABLED", fused_on)
    spec = load_model_spec({"name": "t", "d_model": 128, "vocab_size": 64, "layout": "b",
                            "blocks": {"b": dict(mixer="mamba3", headdim=64, **LAYER_BLOCKS[block])}})
    torch.manual_seed(0)
    layer = Mamba3(128, spec.blocks["b"], backend="triton").to(dtype)
    u = torch.randn(2, 64, 128, dtype=dtype, requires_grad=True)
    with recorded_launches() as launches:
        y = layer(u)
        (y[0] if isinstance(y, tuple) else y).float().sum().backward()
    names = {la.kernel.fn.__name__ for la in launches}
    scan = {"_fused_fwd_kernel", "_fused_bwd_chunk_kernel"} if fused_on else {"_qk_fwd_kernel", "_fwd_kernel", "_bwd_chunk_kernel"}
    assert scan <= names and {"_out_fwd_kernel", "_out_bwd_kernel", "_coef_fwd_kernel"} <= names, names
    for la in unique(launches):
        assert "cubin" in compile_launch(la, arch=90).asm, la.kernel.fn.__name__
