"""torch.compile of the whole HybridLM, and the kernels' torch.library ops (issue 14 item 2).

* a tiny HybridLM with Mamba-3 SISO and MIMO, attention and SwiGLU sub-blocks compiles
  (dynamo + AOTAutograd, the ``aot_eager`` backend: no C++ build on the CI machine) into
  ONE graph, forward and backward, for training and for eval, with the same loss and
  gradients as eager. On CPU the ops run their torch references; packed documents
  (seq_idx) too;
* the same model under TRITON_INTERPRET=1 with the Triton backends, where every kernel
  is a ``hybridlab::`` custom op (a single node in the graph): still one graph, and
  the compiled loss and gradients equal the torch-reference model's;
* ``torch.library.opcheck`` of every custom op (schema, fake implementation, autograd
  registration, AOT dispatch) under the interpreter at tiny sizes.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_under_interpreter

from hybridlab.kernels._deps import has_module

SPEC_SETS = [  # tiny-hybrid: SISO, MIMO r2, attention and SwiGLU; 16-wide tiles so the interpreter is quick
    "blocks.m3.d_state=16", "blocks.m3.headdim=16", "blocks.m3r2.d_state=16", "blocks.m3r2.headdim=16",
    "blocks.m3r2.chunk_size=8", "layout=m3 mlp m3r2 attn mlp",
]

_MODEL_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from torch._dynamo.utils import counters
    from hybridlab.arch.model import HybridLM
    from hybridlab.arch.spec import load_model_spec

    def check(ssm_backend, sets):
        torch._dynamo.reset()
        spec = load_model_spec("zoo:tiny-hybrid", sets)
        torch.manual_seed(0)
        model = HybridLM(spec, backends={"ssm": ssm_backend})
        ref = HybridLM(spec, backends={"ssm": "torch"})
        ref.load_state_dict(model.state_dict())
        tok = torch.randint(0, spec.vocab_size, (2, 20))
        compiled = torch.compile(model, backend="aot_eager")
        counters.clear()

        def loss_of(m):
            return torch.nn.functional.cross_entropy(m(tok).flatten(0, 1).float(), tok.flatten())

        loss = loss_of(compiled)
        loss.backward()
        breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
        assert not breaks, f"graph breaks: {list(breaks)}"
        assert graphs == 1, f"{graphs} graphs"
        ref_loss = loss_of(ref)
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-5), (loss.item(), ref_loss.item())
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            err = ((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item()
            assert err < 1e-3, f"grad {name}: rel err {err:.2e}"
        model.eval()  # eval: a no-grad forward compiles too (guards recompile once, still no break)
        counters.clear()
        with torch.no_grad():
            logits = compiled(tok)
        assert not dict(counters["graph_break"]), dict(counters["graph_break"])
        with torch.no_grad():
            assert torch.allclose(logits, ref(tok), rtol=1e-4, atol=1e-4)
        print("ok", ssm_backend)

    check(sys.argv[1] if len(sys.argv) > 1 else BACKEND, SETS)
    """
)


def test_hybrid_lm_compiles_to_one_graph_on_the_references():
    """CPU: the dispatch (backend choice, device/dtype checks) traces; the references compile."""
    ns = {"__name__": "__compile_check__"}
    exec(_MODEL_CHECK.replace("BACKEND", repr("auto")).replace("SETS", repr(SPEC_SETS)).replace("sys.argv[1] if len(sys.argv) > 1 else ", ""), ns)


@pytest.mark.parametrize("extra", [[], ["blocks.m3.d_conv=4", "layout=m3 mlp attn"]], ids=["mamba3", "with-short-conv"])
def test_packed_hybrid_lm_compiles_to_one_graph_on_the_references(extra):
    """CPU, packed documents (seq_idx): the reference scan's and phase's segmenting, the block-diagonal
    attention mask and per-document RoPE (and Mamba-2's short convolution, masked per document) trace into
    one graph; compiled equals eager, values and gradients."""
    from torch._dynamo.utils import counters

    from hybridlab.arch.model import HybridLM
    from hybridlab.arch.spec import load_model_spec

    torch._dynamo.reset()
    spec = load_model_spec("zoo:tiny-hybrid", SPEC_SETS + extra)
    torch.manual_seed(0)
    model = HybridLM(spec, backends={"ssm": "auto"})
    tok = torch.randint(0, spec.vocab_size, (2, 20))
    seq = torch.tensor([[0] * 7 + [1] * 13, [0] * 3 + [1] * 3 + [2] * 14], dtype=torch.int32)
    counters.clear()
    got = torch.compile(model, backend="aot_eager")(tok, seq_idx=seq)
    got.float().square().mean().backward()
    assert not dict(counters["graph_break"]), dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    want = model(tok, seq_idx=seq)
    want.float().square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, p in zip(grads, model.parameters()):
        assert ((a - p.grad).norm() / p.grad.norm().clamp_min(1e-12)) < 1e-3


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_hybrid_lm_compiles_to_one_graph_with_triton_custom_ops():
    run_under_interpreter(_MODEL_CHECK.replace("BACKEND", repr("triton")).replace("SETS", repr(SPEC_SETS)))


_OPCHECK = textwrap.dedent(
    """
    import torch
    import hybridlab.kernels, hybridlab.kernels.ssm_io, hybridlab.kernels.cross_entropy  # registers the ops

    ops = torch.ops.hybridlab
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=True):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    b, l, h, R, n, p, A = 1, 8, 2, 2, 16, 16, 4
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]], dtype=torch.int32)
    cases = {
        "scan_coefficients": [(r(b, l, h), r(b, l, h), r(b, l, h), r(h), r(h), torch.rand(b, l, generator=g) > 0.3, 0.1, False),
                              (r(b, l, h), r(b, l, h), None, r(h), None, None, 0.1, True)],
        "scan_coefficients_bwd": [(r(b, l, h, grad=False), r(b, l, h, grad=False), None, r(h, grad=False), None, None,
                                   *(r(b, l, h, grad=False) for _ in range(4)), 0.1, True)],
        "cumulative_phase": [(r(b, l, A), r(b, l, h), seq), (r(b, l, A), r(b, l, h), None)],
        "cumulative_phase_bwd": [(r(b, l, A, grad=False), r(b, l, h, grad=False), None, r(b, l, h, A, grad=False))],
        "rank_expand": [(r(b, l, h, p), r(h, R, p))],
        "rank_expand_bwd": [(r(b, l, h, p, grad=False), r(h, R, p, grad=False), r(b, l, h, R, p, grad=False))],
        "qk_prep": [(r(b, l, R, n), r(b, l, R, n), r(b, l, h, A), r(n), r(n), r(h, R, n), r(h, R, n), h, 1e-5),
                    (r(b, l, 1, n), r(b, l, 1, n), None, None, None, None, None, h, 1e-5)],
        "qk_prep_bwd": [(r(b, l, R, n, grad=False), r(b, l, R, n, grad=False), None, r(n, grad=False), None, None,
                         r(h, R, n, grad=False), r(b, l, h, R, n, grad=False), r(b, l, h, R, n, grad=False), h, 1e-5)],
        "gated_output": [(r(b, l, h, R, p), r(b, l, h, p), r(b, l, h, p), r(h), r(h, p), r(h, R, p), r(h, R, p), r(h, R, p), 1e-5),
                         (r(b, l, h, 1, p), r(b, l, h, p), r(b, l, h, p), r(h), None, None, None, None, 1e-5)],
        "gated_output_bwd": [(r(b, l, h, 1, p, grad=False), r(b, l, h, p, grad=False), r(b, l, h, p, grad=False),
                              r(h, grad=False), None, None, None, None, r(b, l, h, p, grad=False), 1e-5)],
        "ssm_scan": [(r(b, l, h, 1, n), r(b, l, h, 1, n), r(b, l, h, 1, p), -torch.rand(b, l, h, generator=g).requires_grad_(),
                      r(b, l, h), r(b, l, h), r(b, h, p, n), r(b, h, 1, n), r(b, h, 1, p), seq, 16, True)],
        "linear_cross_entropy": [(r(12, 16), r(40, 16), torch.tensor([1, 5, -100, 39, 0, 2, 2, 7, -100, 3, 4, 5]), -100, 5)],
        "ssm_scan_fused": [  # MIMO with every stage on; SISO bare
            (r(b, l, R, n), r(b, l, R, n), r(b, l, h, A), r(n), r(n), r(h, R, n), r(h, R, n), r(b, l, h, p), r(h, R, p),
             -torch.rand(b, l, h, generator=g).requires_grad_(), r(b, l, h), r(b, l, h), r(b, h, p, n), r(b, h, R, n),
             r(b, h, R, p), seq, 1e-5, 16, True),
            (r(b, l, 1, n), r(b, l, 1, n), None, None, None, None, None, r(b, l, h, p), None,
             -torch.rand(b, l, h, generator=g).requires_grad_(), r(b, l, h), r(b, l, h), r(b, h, p, n), r(b, h, 1, n),
             r(b, h, 1, p), None, 1e-5, 16, True),
        ],
    }
    for name, arg_sets in cases.items():
        for args in arg_sets:
            torch.library.opcheck(getattr(ops, name), args)
            print("ok", name)
    """
)


@pytest.mark.skipif(not has_module("triton"), reason="triton not installed")
def test_custom_ops_opcheck():
    """Schema, fake tensors (shapes, dtypes, strides), autograd registration and AOT dispatch of every op."""
    run_under_interpreter(_OPCHECK)


# ---------------------------------------------------------------- CUDA: inductor, the real kernels

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("zoo", ["tiny-hybrid", "tiny-mimo"])
def test_hybrid_lm_compiles_on_cuda(zoo):
    """inductor over the whole model under bf16 autocast: one graph, no breaks, loss and grads close to eager."""
    from torch._dynamo.utils import counters

    from hybridlab.arch.model import HybridLM
    from hybridlab.arch.spec import load_model_spec

    torch._dynamo.reset()
    spec = load_model_spec(f"zoo:{zoo}")
    torch.manual_seed(0)
    model = HybridLM(spec).cuda()
    tok = torch.randint(0, spec.vocab_size, (4, 256), device="cuda")

    def step(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(tok).flatten(0, 1).float(), tok.flatten())
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = step(model)
    counters.clear()
    compiled_loss, compiled_grads = step(torch.compile(model))
    assert not dict(counters["graph_break"]), dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(compiled_loss, eager_loss, rtol=2e-2)
    for a, b in zip(compiled_grads, eager_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)) < 5e-2


@gpu
@needs_cuda
def test_flash_attn_cute_custom_op_matches_sdpa():
    from hybridlab.kernels.attention import _HAS_FA_CUTE, _sdpa

    if not _HAS_FA_CUTE or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs flash-attn-4 on sm90+")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 512, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    do = torch.randn(2, 512, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    out = torch.ops.hybridlab.flash_attn_cute(q, k, v, True)[0]
    got = [out, *torch.autograd.grad(out, (q, k, v), do)]
    ref = _sdpa(q, k, v, True)
    want = [ref, *torch.autograd.grad(ref, (q, k, v), do)]
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
    torch.library.opcheck(torch.ops.hybridlab.flash_attn_cute, (q, k, v, True), test_utils=("test_schema", "test_faketensor"))


@gpu
@needs_cuda
def test_linear_cross_entropy_cuda_bf16():
    from hybridlab.kernels.cross_entropy import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(8192, 1024, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(32000, 1024, device="cuda", generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, 32000, (8192,), device="cuda", generator=g)
    t[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t)
    got = [loss, *torch.autograd.grad(loss, (h, w))]
    ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), t)
    want = [ref, *torch.autograd.grad(ref, (h, w))]
    for a, b in zip(got, want):
        assert ((a.float() - b).norm() / b.norm()) < 2e-2
