"""ssm_scan: every form against every other (DESIGN.md §3).

* torch chunked vs torch recurrent, lengths 1/63/64/65/200, ranks 1 and 4, with
  and without an initial state; split-and-carry equals the whole sequence;
  gradcheck of the chunked form in float64 (all six inputs and the state).
* the dispatcher: backends, unknown backend, bad shapes; packed documents
  (seq_idx / cu_seqlens) on the torch backends equal each document alone.
* the Triton kernel under TRITON_INTERPRET=1 (in a subprocess, so the env var
  is set before triton is imported and nothing else in the suite is affected):
  forward and gradients vs the reference, ranks 1 and 4, with state; a packed
  batch equals each document run alone (values and every gradient).
* full-size Triton tests on CUDA (marked gpu, skipped without it).
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from conftest import run_under_interpreter

from hybridlab.kernels._deps import has_module

from hybridlab.kernels import ScanState, ssm_scan
from hybridlab.kernels.ssm_scan.reference import scan_chunked, scan_recurrent


def make_inputs(b, l, h, r, n, p, *, dtype=torch.float32, device="cpu", seed=0, with_state=False):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q = rnd(b, l, h, r, n, scale=n**-0.5)
    k = rnd(b, l, h, r, n, scale=n**-0.5)
    v = rnd(b, l, h, r, p)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=g) - 1.0)
    A = -torch.rand(h, generator=g) * 2 - 0.1
    lam = torch.sigmoid(torch.randn(b, l, h, generator=g))
    la = A * dt
    beta = (1 - lam) * dt * la.exp()
    gamma = lam * dt
    f32 = dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    la, beta, gamma = la.to(**f32), beta.to(**f32), gamma.to(**f32)
    state = None
    if with_state:
        state = ScanState(
            (torch.randn(b, h, p, n, generator=g) * 0.5).to(**f32),
            rnd(b, h, r, n, scale=n**-0.5),
            rnd(b, h, r, p),
        )
    return q, k, v, la, beta, gamma, state


def assert_close(a, b, tol):
    a, b = a.double(), b.double()
    err = (a - b).norm() / b.norm().clamp_min(1e-30)
    assert err < tol, f"rel err {err:.3e} >= {tol:g}"


def docs_of(seq_row):
    """[(start, end)] of each document of one seq_idx row."""
    cuts = [0, *(torch.nonzero(seq_row[1:] != seq_row[:-1]).flatten() + 1).tolist(), len(seq_row)]
    return list(zip(cuts[:-1], cuts[1:]))


def packed_case(b, l, h, r, n, p, chunk, docs, with_state, backend="triton", device="cpu", dtype=torch.float32):
    """Relative errors of a packed batch (``seq_idx`` = ``docs``) through ``backend`` against each
    document run alone through the float64 chunked reference (the state only for a row's first document):
    y, the final h, and the gradients of every input and of the state."""
    q, k, v, la, beta, gamma, st = make_inputs(b, l, h, r, n, p, dtype=dtype, seed=l + r, with_state=with_state, device=device)
    seq = torch.tensor(docs, dtype=torch.int32, device=device)
    leaves = [t.clone().requires_grad_() for t in [q, k, v, la, beta, gamma] + (list(st) if with_state else [])]
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(v.shape, generator=g).to(device), torch.randn(b, h, p, n, generator=g).to(device)
    y, fs = ssm_scan(*leaves[:6], ScanState(*leaves[6:]) if with_state else None, backend=backend, chunk_size=chunk, seq_idx=seq)
    ((y.float() * dy).sum() + (fs.h * dh).sum()).backward()
    got = [y.detach(), fs.h.detach()] + [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref, h_ref, loss = torch.zeros(v.shape, dtype=torch.float64, device=device), [], 0
    for row in range(b):
        for a, e in docs_of(seq[row].cpu()):
            sl = (slice(row, row + 1), slice(a, e))
            s0 = ScanState(*(t[row : row + 1] for t in ref_leaves[6:])) if with_state and a == 0 else None
            yy, final = scan_chunked(*(t[sl] for t in ref_leaves[:6]), s0, chunk_size=16)
            loss = loss + (yy * dy[sl].double()).sum()
            y_ref[sl] = yy.detach()
        loss = loss + (final.h * dh[row : row + 1].double()).sum()
        h_ref.append(final.h.detach())
    loss.backward()
    ref = [y_ref, torch.cat(h_ref)] + [t.grad for t in ref_leaves]
    names = ["y", "h", "dq", "dk", "dv", "dla", "dbeta", "dgamma", "dh0", "dk0", "dv0"]
    return {nm: ((a.double() - b_).norm() / b_.norm().clamp_min(1e-30)).item() for nm, a, b_ in zip(names, got, ref)}


PACKED_CASES = [
    # b, l, h, r, n, p, chunk (positions), docs (seq_idx rows), with_state
    # boundaries inside a chunk, at chunk starts (16, 32) and a one-position document (16)
    (2, 37, 2, 1, 16, 16, 16, [[0] * 5 + [1] * 11 + [2] * 16 + [3] * 5, [0] * 16 + [1] * 1 + [2] * 20], True),
    (1, 40, 1, 4, 16, 16, 4, [[0] * 1 + [1] * 3 + [2] * 8 + [3] * 13 + [4] * 15], True),  # MIMO, many chunk starts
    (2, 21, 2, 2, 16, 32, 8, [[0] * 21, [5] * 7 + [6] * 1 + [7] * 13], False),  # one row unpacked; ids need not start at 0
]


# ---------------------------------------------------------------- reference forms


@pytest.mark.parametrize("l", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(l, r, with_state):
    q, k, v, la, beta, gamma, st = make_inputs(2, l, 3, r, 8, 4, dtype=torch.float64, seed=l * 10 + r, with_state=with_state)
    y1, s1 = scan_recurrent(q, k, v, la, beta, gamma, st)
    y2, s2 = scan_chunked(q, k, v, la, beta, gamma, st, chunk_size=64)
    assert y1.shape == v.shape and y1.dtype == v.dtype
    assert_close(y2, y1, 1e-10)
    for a, b in zip(s2, s1):
        assert_close(a, b, 1e-10)
    assert s1.h.shape == (2, 3, 4, 8)
    assert torch.equal(s1.k, k[:, -1]) and torch.equal(s1.v, v[:, -1])


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunk_size_does_not_matter(chunk):
    q, k, v, la, beta, gamma, st = make_inputs(1, 37, 2, 2, 8, 4, dtype=torch.float64, seed=chunk, with_state=True)
    y1, s1 = scan_recurrent(q, k, v, la, beta, gamma, st)
    y2, s2 = scan_chunked(q, k, v, la, beta, gamma, st, chunk_size=chunk)
    assert_close(y2, y1, 1e-10)
    assert_close(s2.h, s1.h, 1e-10)


def test_float32_inputs_accumulate_in_float32():
    q, k, v, la, beta, gamma, st = make_inputs(1, 70, 2, 1, 16, 8, dtype=torch.float32, seed=3, with_state=True)
    y1, s1 = scan_recurrent(q, k, v, la, beta, gamma, st)
    y2, s2 = scan_chunked(q, k, v, la, beta, gamma, st)
    assert y2.dtype == torch.float32 and s2.h.dtype == torch.float32
    assert_close(y2, y1, 1e-5)


@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("splits", [[1], [30], [63, 64], [64], [65, 130], [5, 70, 128, 199]])
def test_split_and_carry_equals_whole(r, splits):
    l = 200
    q, k, v, la, beta, gamma, st = make_inputs(2, l, 2, r, 8, 4, dtype=torch.float64, seed=sum(splits) + r, with_state=True)
    y_ref, s_ref = scan_recurrent(q, k, v, la, beta, gamma, st)
    bounds = [0, *splits, l]
    for fn in (scan_chunked, scan_recurrent, lambda *a: ssm_scan(*a, backend="torch")):
        state, ys = st, []
        for a, b in zip(bounds[:-1], bounds[1:]):
            y, state = fn(q[:, a:b], k[:, a:b], v[:, a:b], la[:, a:b], beta[:, a:b], gamma[:, a:b], state)
            ys.append(y)
        assert_close(torch.cat(ys, dim=1), y_ref, 1e-10)
        for x, ref in zip(state, s_ref):
            assert_close(x, ref, 1e-10)


def test_token_by_token_decode_equals_prefill():
    q, k, v, la, beta, gamma, _ = make_inputs(1, 40, 2, 4, 8, 4, dtype=torch.float64, seed=11)
    y_ref, _ = ssm_scan(q, k, v, la, beta, gamma, backend="torch_chunked", chunk_size=16)
    y, state = ssm_scan(q[:, :25], k[:, :25], v[:, :25], la[:, :25], beta[:, :25], gamma[:, :25])
    ys = [y]
    for t in range(25, 40):
        y, state = ssm_scan(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], la[:, t : t + 1], beta[:, t : t + 1], gamma[:, t : t + 1], state)
        ys.append(y)
    assert_close(torch.cat(ys, dim=1), y_ref, 1e-10)


def test_bare_h_state_means_zero_kv():
    q, k, v, la, beta, gamma, st = make_inputs(1, 10, 2, 2, 8, 4, dtype=torch.float64, seed=5, with_state=True)
    y1, _ = scan_recurrent(q, k, v, la, beta, gamma, st.h)
    y2, _ = scan_recurrent(q, k, v, la, beta, gamma, ScanState(st.h, torch.zeros_like(st.k), torch.zeros_like(st.v)))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("r", [1, 2])
def test_gradcheck_chunked_float64(r):
    q, k, v, la, beta, gamma, st = make_inputs(1, 5, 1, r, 3, 2, dtype=torch.float64, seed=7 + r, with_state=True)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, la, beta, gamma, st.h, st.k, st.v)]

    def f(q, k, v, la, beta, gamma, h0, k0, v0):
        y, s = scan_chunked(q, k, v, la, beta, gamma, ScanState(h0, k0, v0), chunk_size=2)
        return y, s.h

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- dispatcher


def test_dispatcher_backends_agree():
    q, k, v, la, beta, gamma, st = make_inputs(2, 50, 2, 2, 8, 4, dtype=torch.float64, seed=2, with_state=True)
    y_ref, s_ref = scan_recurrent(q, k, v, la, beta, gamma, st)
    for backend in ("auto", "torch", "torch_chunked", "torch_recurrent"):
        y, s = ssm_scan(q, k, v, la, beta, gamma, st, backend=backend)
        assert_close(y, y_ref, 1e-10)
        assert_close(s.h, s_ref.h, 1e-10)
    y, _ = ssm_scan(q, k, v, la, beta, gamma, st, backend="torch_chunked", chunk_size=8)
    assert_close(y, y_ref, 1e-10)


@pytest.mark.parametrize("backend", ["torch", "torch_chunked", "torch_recurrent"])
def test_packed_documents_torch_backends(backend):
    """The torch backends' packed path equals each document run alone (values and gradients)."""
    for nm, e in packed_case(*PACKED_CASES[0][:7], PACKED_CASES[0][7], True, backend=backend).items():
        assert e < 1e-5, f"{nm}: {e:.2e}"


def test_cu_seqlens_equals_seq_idx():
    q, k, v, la, beta, gamma, st = make_inputs(1, 30, 2, 1, 8, 4, dtype=torch.float64, seed=4, with_state=True)
    seq = torch.tensor([[0] * 7 + [1] * 13 + [2] * 10])
    y1, s1 = ssm_scan(q, k, v, la, beta, gamma, st, backend="torch", seq_idx=seq)
    y2, s2 = ssm_scan(q, k, v, la, beta, gamma, st, backend="torch", cu_seqlens=torch.tensor([0, 7, 20, 30]))
    assert torch.equal(y1, y2) and torch.equal(s1.h, s2.h)
    y3, _ = ssm_scan(q[:, 20:], k[:, 20:], v[:, 20:], la[:, 20:], beta[:, 20:], gamma[:, 20:], backend="torch")
    assert_close(y1[:, 20:], y3, 1e-12)  # the last document alone, from a zero state
    y4, _ = ssm_scan(q, k, v, la, beta, gamma, st, backend="torch")
    assert not torch.allclose(y1[:, 7:], y4[:, 7:])  # packing changes what follows a boundary


@pytest.mark.parametrize("bad", ["both", "batch2", "not_rising", "float_seq", "seq_shape"])
def test_packed_arguments_raise(bad):
    q, k, v, la, beta, gamma, _ = make_inputs(2, 10, 1, 1, 8, 4)
    kw = {}
    if bad == "both":
        kw = dict(seq_idx=torch.zeros(2, 10, dtype=torch.int32), cu_seqlens=torch.tensor([0, 10]))
    elif bad == "batch2":
        kw = dict(cu_seqlens=torch.tensor([0, 4, 10]))
    elif bad == "not_rising":
        q, k, v, la, beta, gamma = (t[:1] for t in (q, k, v, la, beta, gamma))
        kw = dict(cu_seqlens=torch.tensor([0, 6, 4, 10]))
    elif bad == "float_seq":
        kw = dict(seq_idx=torch.zeros(2, 10))
    elif bad == "seq_shape":
        kw = dict(seq_idx=torch.zeros(2, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="ssm_scan"):
        ssm_scan(q, k, v, la, beta, gamma, backend="torch", **kw)


def test_unknown_backend_raises():
    q, k, v, la, beta, gamma, _ = make_inputs(1, 4, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        ssm_scan(q, k, v, la, beta, gamma, backend="nope")


def test_triton_backend_without_cuda_or_interpreter_raises():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton is usable here")
    q, k, v, la, beta, gamma, _ = make_inputs(1, 4, 1, 1, 16, 16)
    with pytest.raises(RuntimeError):
        ssm_scan(q, k, v, la, beta, gamma, backend="triton")


@pytest.mark.parametrize(
    "bad",
    [
        "q4d", "k_shape", "v_rank", "v_batch", "la_shape", "beta_shape", "gamma_len",
        "state_h", "state_k", "state_v", "empty",
    ],
)
@pytest.mark.parametrize("backend", ["torch_chunked", "torch_recurrent"])
def test_bad_shapes_raise(bad, backend):
    q, k, v, la, beta, gamma, st = make_inputs(2, 5, 3, 2, 8, 4, with_state=True)
    if bad == "q4d":
        q = q[:, :, :, 0]
    elif bad == "k_shape":
        k = k[..., :4]
    elif bad == "v_rank":
        v = v[:, :, :, :1]
    elif bad == "v_batch":
        v = v[:1]
    elif bad == "la_shape":
        la = la[..., None]
    elif bad == "beta_shape":
        beta = beta[:, :, :2]
    elif bad == "gamma_len":
        gamma = gamma[:, :4]
    elif bad == "state_h":
        st = ScanState(st.h[..., :4], st.k, st.v)
    elif bad == "state_k":
        st = ScanState(st.h, st.k[:, :, :1], st.v)
    elif bad == "state_v":
        st = ScanState(st.h, st.k, st.v[..., :2])
    elif bad == "empty":
        q, k, v, la, beta, gamma = (t[:, :0] for t in (q, k, v, la, beta, gamma))
    with pytest.raises(ValueError):
        ssm_scan(q, k, v, la, beta, gamma, st, backend=backend)


# ---------------------------------------------------------------- Triton, interpreter on CPU

_INTERP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    sys.path.insert(0, TESTS_DIR)
    from test_ssm_scan import make_inputs
    from hybridlab.kernels import ssm_scan, ScanState
    from hybridlab.kernels.ssm_scan.reference import scan_recurrent

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    fails = []
    cases = [
        # b, l, h, r, n, p, chunk (positions), with_state
        (1, 37, 2, 1, 16, 32, 16, True),  # headdim 32: the dH pass runs 2 headdim blocks (DH_BP=16)
        (2, 20, 1, 1, 32, 16, 16, False),
        (1, 19, 2, 4, 16, 16, 4, True),
        (1, 8, 1, 4, 16, 32, 4, False),
        (1, 1, 2, 2, 16, 16, 8, True),
    ]
    for (b, l, h, r, n, p, chunk, ws) in cases:
        q, k, v, la, beta, gamma, st = make_inputs(b, l, h, r, n, p, dtype=torch.float32, seed=l + r, with_state=ws)
        leaves = [q, k, v, la, beta, gamma] + (list(st) if ws else [])
        leaves = [t.clone().requires_grad_() for t in leaves]
        def run(fn):
            for t in leaves:
                t.grad = None
            s = ScanState(*leaves[6:]) if ws else None
            y, fs = fn(*leaves[:6], s)
            g = torch.Generator().manual_seed(1)
            dy = torch.randn(y.shape, generator=g)
            dh = torch.randn(fs.h.shape, generator=g)
            dkl = torch.randn(fs.k.shape, generator=g)
            dvl = torch.randn(fs.v.shape, generator=g)
            ((y * dy).sum() + (fs.h * dh).sum() + (fs.k * dkl).sum() + (fs.v * dvl).sum()).backward()
            return [y.detach(), fs.h.detach(), fs.k.detach(), fs.v.detach()], [t.grad.clone() for t in leaves]
        out_t, g_t = run(lambda *a: ssm_scan(*a, backend="triton", chunk_size=chunk))
        out_r, g_r = run(lambda *a: scan_recurrent(*a))
        names = ["y", "h", "k_last", "v_last"]
        gnames = ["dq", "dk", "dv", "dla", "dbeta", "dgamma", "dh0", "dk0", "dv0"]
        for nm, a, b_ in list(zip(names, out_t, out_r)) + list(zip(gnames, g_t, g_r)):
            e = rel(a, b_)
            tag = f"case={(b, l, h, r, n, p, chunk, ws)} {nm} rel={e:.2e}"
            print(tag)
            if not e < 1e-4:
                fails.append(tag)
    from test_ssm_scan import PACKED_CASES, packed_case
    for case in PACKED_CASES:  # packed documents: the batch equals each document alone
        for nm, e in packed_case(*case).items():
            tag = f"packed case={case[:7]} {nm} rel={e:.2e}"
            print(tag)
            if not e < 1e-4:
                fails.append(tag)
    print("FAILS", fails)
    sys.exit(1 if fails else 0)
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_triton_interpreter_matches_reference():
    """Kernel forward + backward under TRITON_INTERPRET=1, fp32, ranks 1/2/4, with state; packed documents."""
    run_under_interpreter(_INTERP_SCRIPT, HYBRIDLAB_SSM_DH_BP="16")


# ---------------------------------------------------------------- Triton on CUDA, full size

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "r,dtype",
    [(1, torch.bfloat16), (2, torch.bfloat16), (4, torch.bfloat16), (8, torch.bfloat16),
     (1, torch.float16), (4, torch.float16), (1, torch.float32), (4, torch.float32)],
)
def test_triton_gpu_matches_reference(r, dtype):
    b, l, h, n, p = 2, 1000, 4, 128, 64
    q, k, v, la, beta, gamma, st = make_inputs(b, l, h, r, n, p, dtype=dtype, device="cuda", seed=r, with_state=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, la, beta, gamma, *st)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    g = torch.Generator(device="cpu").manual_seed(0)
    dy = torch.randn(v.shape, generator=g).cuda()
    dh = torch.randn(st.h.shape, generator=g).cuda()

    def run(fn, ls):
        y, s = fn(*ls[:6], ScanState(*ls[6:]))
        ((y.double() * dy).sum() + (s.h.double() * dh).sum()).backward()
        return [y, s.h] + [t.grad for t in ls]

    got = run(lambda *a: ssm_scan(*a, backend="triton"), leaves)
    ref = run(lambda *a: scan_chunked(*a, chunk_size=16), ref_leaves)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for name, a, b_ in zip(["y", "h", "dq", "dk", "dv", "dla", "dbeta", "dgamma", "dh0", "dk0", "dv0"], got, ref):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - b_).norm() / b_.norm()).item()
        assert err < tol, f"{name}: rel err {err:.3e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("r,dtype", [(1, torch.bfloat16), (4, torch.bfloat16), (1, torch.float32), (4, torch.float32)])
def test_triton_gpu_packed_documents(r, dtype):
    """A packed batch equals each document alone at the bench's head and state sizes (values and gradients)."""
    docs = [[0] * 200 + [1] * 1 + [2] * 63 + [3] * 300 + [4] * 436, [9] * 1000]
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for nm, e in packed_case(2, 1000, 4, r, 128, 64, None, docs, True, device="cuda", dtype=dtype).items():
        assert e < tol, f"{nm}: rel err {e:.2e}"


@gpu
@needs_cuda
def test_triton_gpu_split_and_carry():
    q, k, v, la, beta, gamma, st = make_inputs(1, 777, 2, 4, 64, 64, dtype=torch.float32, device="cuda", seed=9, with_state=True)
    y_ref, s_ref = ssm_scan(q, k, v, la, beta, gamma, st, backend="triton")
    y1, s1 = ssm_scan(q[:, :300], k[:, :300], v[:, :300], la[:, :300], beta[:, :300], gamma[:, :300], st, backend="triton")
    y2, s2 = ssm_scan(q[:, 300:], k[:, 300:], v[:, 300:], la[:, 300:], beta[:, 300:], gamma[:, 300:], s1, backend="triton")
    assert_close(torch.cat([y1, y2], 1), y_ref, 1e-5)
    assert_close(s2.h, s_ref.h, 1e-5)


def test_triton_size_rules_let_auto_fall_back():
    from hybridlab.kernels.ssm_scan import default_chunk_size, triton_supports

    assert [default_chunk_size(r) for r in (1, 2, 4, 8)] == [64, 32, 16, 8]
    assert triton_supports(64, 128, 1)[0] and triton_supports(64, 64, 4)[0]
    assert not triton_supports(64, 128, 3)[0]  # 21 * 3 rows: not a power of two
    assert not triton_supports(64, 128, 1, chunk_size=100)[0]
    assert not triton_supports(64, 8, 1)[0]
