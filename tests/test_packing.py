"""Packed documents: a packed batch gives exactly what each document gives alone.

* ssm_scan (torch recurrent and chunked) with ``seq_idx`` / ``cu_seqlens``: values, final state
  and gradients equal the per-document runs; chunk boundaries inside and between documents; a
  passed-in state applies to the first document only.
* cumulative_phase restarts at each document start.
* the whole model (Mamba-3 SISO + MIMO + attention + SwiGLU, torch backend): logits and
  parameter gradients of a packed batch equal the sum over its documents run alone.
"""

from __future__ import annotations

import pytest
import torch

from hybridlab.kernels import ScanState, ssm_scan
from hybridlab.kernels.ssm_io import cumulative_phase
from hybridlab.kernels.ssm_scan.reference import scan_chunked, scan_recurrent, seq_idx_from_cu_seqlens

from test_ssm_scan import make_inputs


def _ids(lengths):
    return torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])


ROWS = [[5, 1, 17, 9], [8, 24]]  # two rows of 32: boundaries on and off chunk edges (chunk 8)


def _alone(fn, ins, lengths, row, state=None):
    """Run each document of one row by itself; the state goes to the first one."""
    q, k, v, la, be, ga = ins
    ys, st, a = [], None, 0
    for j, n in enumerate(lengths):
        sl = slice(a, a + n)
        s0 = None
        if j == 0 and state is not None:
            s0 = ScanState(*(t[row : row + 1] for t in state))
        y, st = fn(q[row : row + 1, sl], k[row : row + 1, sl], v[row : row + 1, sl], la[row : row + 1, sl],
                   be[row : row + 1, sl], ga[row : row + 1, sl], s0)
        ys.append(y)
        a += n
    return torch.cat(ys, dim=1), st


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_packed_equals_documents_alone(form, r, with_state):
    *ins, state = make_inputs(2, 32, 3, r, 8, 4, dtype=torch.float64, seed=1, with_state=with_state)
    seq_idx = torch.stack([_ids(L) for L in ROWS])
    fn = scan_recurrent if form == "recurrent" else (lambda *a, **kw: scan_chunked(*a, chunk_size=8, **kw))
    y, final = fn(*ins, state, seq_idx=seq_idx)
    for row, lengths in enumerate(ROWS):
        ref, ref_state = _alone(fn, ins, lengths, row, state)
        torch.testing.assert_close(y[row : row + 1], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final.h[row : row + 1], ref_state.h, rtol=1e-10, atol=1e-10)
    # and the packing matters: without seq_idx the same inputs give something else
    y_plain, _ = fn(*ins, state)
    assert (y_plain - y).abs().max() > 1e-3


def test_scan_packed_gradients_equal_documents_alone():
    *ins, _ = make_inputs(2, 32, 2, 2, 8, 4, dtype=torch.float64, seed=2)
    seq_idx = torch.stack([_ids(L) for L in ROWS])
    w = torch.randn(2, 32, 2, 2, 4, dtype=torch.float64)

    def grads(run):
        xs = [t.detach().clone().requires_grad_(True) for t in ins]
        run(xs).backward()
        return [x.grad for x in xs]

    packed = grads(lambda xs: (scan_chunked(*xs, chunk_size=8, seq_idx=seq_idx)[0] * w).sum())

    def alone(xs):
        total = 0.0
        for row, lengths in enumerate(ROWS):
            y, _ = _alone(lambda *a: scan_recurrent(*a), xs, lengths, row)
            total = total + (y * w[row : row + 1]).sum()
        return total

    for a, b in zip(packed, grads(alone)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_cu_seqlens_is_seq_idx_for_one_row():
    cu = torch.tensor([0, 5, 6, 23, 32], dtype=torch.int32)
    assert torch.equal(seq_idx_from_cu_seqlens(cu, 1, 32)[0], _ids([5, 1, 17, 9]))
    *ins, _ = make_inputs(1, 32, 2, 1, 8, 4, seed=3)
    y1, _ = ssm_scan(*ins, backend="torch", cu_seqlens=cu)
    y2, _ = ssm_scan(*ins, backend="torch", seq_idx=_ids([5, 1, 17, 9])[None])
    torch.testing.assert_close(y1, y2)
    *ins2, _ = make_inputs(2, 32, 2, 1, 8, 4, seed=3)
    with pytest.raises(ValueError, match="single-row"):
        ssm_scan(*ins2, backend="torch", cu_seqlens=cu)
    with pytest.raises(ValueError, match="seq_idx must be"):
        ssm_scan(*ins2, backend="torch", seq_idx=torch.zeros(2, 31, dtype=torch.int32))
    with pytest.raises(ValueError, match="not both"):
        ssm_scan(*ins, backend="torch", seq_idx=_ids([32])[None], cu_seqlens=cu)


def test_cumulative_phase_restarts_at_documents():
    g = torch.Generator().manual_seed(0)
    theta, dt = torch.randn(2, 32, 3, generator=g), torch.rand(2, 32, 4, generator=g)
    seq_idx = torch.stack([_ids(L) for L in ROWS])
    phase = cumulative_phase(theta, dt, seq_idx=seq_idx, backend="torch")
    for row, lengths in enumerate(ROWS):
        a = 0
        for n in lengths:
            alone = cumulative_phase(theta[row : row + 1, a : a + n], dt[row : row + 1, a : a + n], backend="torch")
            torch.testing.assert_close(phase[row : row + 1, a : a + n], alone, rtol=1e-6, atol=1e-6)
            a += n
    torch.testing.assert_close(cumulative_phase(theta, dt, seq_idx=torch.zeros(2, 32, dtype=torch.int32), backend="torch"),
                               cumulative_phase(theta, dt, backend="torch"), rtol=1e-6, atol=1e-6)


HYBRID = {
    "name": "pack-test", "d_model": 32, "vocab_size": 50, "tie_embeddings": True,
    "blocks": {
        "m3": {"mixer": "mamba3", "d_state": 16, "headdim": 8, "chunk_size": 8},
        "m3r": {"mixer": "mamba3", "mode": "mimo", "rank": 2, "d_state": 16, "headdim": 8, "chunk_size": 4,
                "out_norm": "pre_gate_grouped"},
        "attn": {"mixer": "attention", "heads": 4, "kv_heads": 2},
        "mlp": {"mixer": "swiglu", "hidden": 48},
    },
    "layout": "m3 mlp m3r mlp attn mlp",
}


@pytest.mark.parametrize("rope", [True, "standard"])
def test_model_packed_batch_equals_documents_alone_values_and_gradients(rope):
    from hybridlab.arch import HybridLM, load_model_spec

    torch.manual_seed(0)
    spec = {**HYBRID, "blocks": {name: ({**b, "rope": rope} if b["mixer"] == "mamba3" else b) for name, b in HYBRID["blocks"].items()}}
    model = HybridLM(load_model_spec(spec), backends={"ssm": "torch", "attention": "sdpa"}).double()
    tokens = torch.randint(0, 50, (2, 32))
    seq_idx = torch.stack([_ids(L) for L in ROWS])
    targets = torch.randint(0, 50, (2, 32))

    def loss_of(logits, tgt):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tgt.reshape(-1), reduction="sum")

    model.zero_grad()
    packed = model(tokens, seq_idx=seq_idx)
    loss_of(packed, targets).backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total = 0.0
    for row, lengths in enumerate(ROWS):
        a = 0
        for n in lengths:
            alone = model(tokens[row : row + 1, a : a + n])
            # float64 model; the rotary phase is float32 inside the layer (theta is computed in fp32)
            torch.testing.assert_close(packed[row : row + 1, a : a + n], alone, rtol=1e-6, atol=1e-7)
            total = total + loss_of(alone, targets[row : row + 1, a : a + n])
            a += n
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_packed[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # without seq_idx the documents leak into each other
    assert (model(tokens) - packed).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_model_equals_documents_alone():
    """On CUDA with the auto backends (Triton scan + ssm_io with seq_idx, flash-attn varlen or masked SDPA),
    bf16: a packed batch of the hybrid matches its documents run alone, and the torch reference."""
    from hybridlab.arch import HybridLM, load_model_spec

    spec = {**HYBRID, "d_model": 128, "blocks": {**HYBRID["blocks"],
            "m3": {"mixer": "mamba3", "d_state": 32, "headdim": 32},
            "m3r": {"mixer": "mamba3", "mode": "mimo", "rank": 2, "d_state": 32, "headdim": 32, "out_norm": "pre_gate_grouped"},
            "attn": {"mixer": "attention", "heads": 2, "kv_heads": 1}}}
    torch.manual_seed(0)
    model = HybridLM(load_model_spec(spec)).cuda().to(torch.bfloat16)
    lengths = [[100, 1, 300, 111], [256, 256]]
    tokens = torch.randint(0, 50, (2, 512), device="cuda")
    seq_idx = torch.stack([_ids(L) for L in lengths]).cuda()
    with torch.no_grad():
        packed = model(tokens, seq_idx=seq_idx).float()
        for row, L in enumerate(lengths):
            a = 0
            for n in L:
                alone = model(tokens[row : row + 1, a : a + n]).float()
                torch.testing.assert_close(packed[row : row + 1, a : a + n], alone, rtol=3e-2, atol=3e-2)
                a += n
