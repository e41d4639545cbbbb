"""linear_cross_entropy (kernels/cross_entropy.py) against F.cross_entropy(hidden @ weight.T): values and
gradients, ignore_index, ragged chunks, reductions, bf16, and torch.compile (one graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlab.kernels.cross_entropy import default_ce_chunk, linear_cross_entropy


def _inputs(T=37, d=16, V=50, dtype=torch.float64, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, d, generator=g, dtype=dtype)
    weight = torch.randn(V, d, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    targets[torch.rand(T, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


def _grads(fn, hidden, weight, targets):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 100])
def test_matches_cross_entropy_values_and_grads(chunk):
    hidden, weight, targets = _inputs()
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk), hidden, weight, targets)
    want = _grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), hidden, weight, targets)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_other_ignore_index_sum_and_leading_dims():
    hidden, weight, targets = _inputs(T=24, seed=1)
    targets[targets == -100] = 7  # 7 is now a real class except where we say it is ignored
    targets[::5] = 3
    h3, t3 = hidden.view(2, 12, -1), targets.view(2, 12)
    got = _grads(lambda h, w, t: linear_cross_entropy(h.view(2, 12, -1), w, t.view(2, 12), ignore_index=3, chunk_size=7,
                                                      reduction="sum"), hidden, weight, targets)
    want = _grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t, ignore_index=3, reduction="sum"), hidden, weight, targets)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    total, count = linear_cross_entropy(h3, weight, t3, ignore_index=3, reduction="sum_and_count")
    assert count.item() == (targets != 3).sum().item() and torch.allclose(total, got[0])


def test_all_targets_ignored_gives_zero_loss_and_grads():
    hidden, weight, targets = _inputs(T=9)
    targets[:] = -100
    loss, dh, dw = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=4), hidden, weight, targets)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_bf16_inputs_close_to_fp32():
    hidden, weight, targets = _inputs(T=64, d=32, V=300, dtype=torch.float32, seed=2)
    got = _grads(lambda h, w, t: linear_cross_entropy(h.bfloat16(), w.bfloat16(), t, chunk_size=16), hidden, weight, targets)
    want = _grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), hidden, weight, targets)
    for a, b in zip(got, want):
        assert ((a.float() - b).norm() / b.norm()) < 2e-2


def test_bad_arguments_raise():
    hidden, weight, targets = _inputs(T=4)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="share d"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_default_chunk_bounds_the_logits():
    assert default_ce_chunk(32000) * 32000 <= 2**26 and default_ce_chunk(32000) % 128 == 0
    assert default_ce_chunk(10**7) == 128


def test_compiles_to_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    hidden, weight, targets = _inputs(T=40, dtype=torch.float32, seed=3)
    lin = torch.nn.Linear(16, 16).double().float()

    def step(h, w, t):
        return linear_cross_entropy(torch.tanh(lin(h)), w, t, chunk_size=16)

    counters.clear()
    got = _grads(torch.compile(step, backend="aot_eager"), hidden, weight, targets)
    assert not dict(counters["graph_break"]) and counters["stats"]["unique_graphs"] == 1
    want = _grads(lambda h, w, t: F.cross_entropy(torch.tanh(lin(h)) @ w.t(), t), hidden, weight, targets)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
