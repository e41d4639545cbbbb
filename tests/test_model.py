"""HybridLM: analytic counts match the module, generation equals the full forward, layer math."""

import pytest
import torch

from hybridlab.arch import HybridLM, count_params, load_model_spec, sample
from hybridlab.arch.layers.mamba3 import Mamba3

TINY = ["zoo:tiny-hybrid", "zoo:tiny-mamba3", "zoo:tiny-mimo", "zoo:tiny-mamba2", "zoo:tiny-transformer"]


def small(ref, **sets):
    """A zoo tiny spec shrunk further so the tests stay fast."""
    overrides = ["vocab_size=61"] + [f"{k}={v}" for k, v in sets.items()]
    return load_model_spec(ref, overrides)


@pytest.mark.parametrize("ref", TINY)
def test_param_count_matches_module(ref):
    spec = load_model_spec(ref)
    assert count_params(spec) == sum(p.numel() for p in HybridLM(spec).parameters())


def test_param_count_untied_and_ablations():
    spec = load_model_spec("zoo:tiny-hybrid", ["tie_embeddings=false", "blocks.m3.trapezoid=false", "blocks.m3.rope=false",
                                               "blocks.m3.bc_norm=false", "blocks.m3r2.bc_bias=false"])
    assert count_params(spec) == sum(p.numel() for p in HybridLM(spec).parameters())


@pytest.mark.parametrize("ref", TINY)
def test_token_by_token_equals_forward(ref):
    torch.manual_seed(0)
    model = HybridLM(small(ref)).double().eval()
    tokens = torch.randint(0, 61, (2, 70))
    full = model(tokens)
    cache = model.allocate_cache(2, 70)
    pieces = [model(tokens[:, :33], cache)]  # prefill, crossing no chunk boundary
    pieces += [model(tokens[:, t : t + 1], cache) for t in range(33, 70)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


def test_prefill_across_chunk_boundaries_equals_forward():
    torch.manual_seed(1)
    model = HybridLM(small("zoo:tiny-hybrid")).double().eval()
    tokens = torch.randint(0, 61, (1, 150))
    full = model(tokens)
    cache = model.allocate_cache(1, 150)
    out = torch.cat([model(tokens[:, :65], cache), model(tokens[:, 65:130], cache), model(tokens[:, 130:], cache)], dim=1)
    assert torch.allclose(out, full, atol=1e-5, rtol=1e-4)


def test_generate_greedy_matches_argmax_of_forward():
    torch.manual_seed(2)
    model = HybridLM(small("zoo:tiny-hybrid")).eval()
    prompt = torch.randint(0, 61, (3, 7))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (3, 19) and torch.equal(out[:, :7], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])


def test_backward_reaches_every_parameter():
    torch.manual_seed(3)
    model = HybridLM(small("zoo:tiny-hybrid"))
    model(torch.randint(0, 61, (2, 20))).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]]).repeat(200, 1)
    assert torch.equal(sample(logits), torch.full((200,), 2))
    top1 = sample(logits, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(top1, torch.full((200,), 2))
    top2 = sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) <= {2, 3} and 3 in top2.tolist()
    nucleus = sample(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(nucleus.tolist()) == {2}


def test_mamba3_scan_inputs_follow_the_paper():
    spec = small("zoo:tiny-mamba3")
    torch.manual_seed(4)
    layer = Mamba3(spec.d_model, spec.blocks["m3"]).double()
    u = torch.randn(2, 9, spec.d_model, dtype=torch.float64)
    q, k, v, log_alpha, beta, gamma, x, z, phase = layer.scan_inputs(u)
    assert (log_alpha < 0).all()
    dt = torch.nn.functional.softplus(torch.split(layer.in_proj(u), layer.split, -1)[4].float() + layer.dt_bias.float())
    lam = gamma / dt
    assert ((lam > 0) & (lam < 1)).all()
    assert torch.allclose(beta, (1 - lam) * dt * log_alpha.exp(), atol=1e-6)
    # The rotation preserves norms of the rotated pairs; the phase is a cumulative sum over time.
    assert phase.shape == (2, 9, layer.H, spec.blocks["m3"].rope_dims // 2)
    euler = Mamba3(spec.d_model, load_model_spec("zoo:tiny-mamba3", ["blocks.m3.trapezoid=false"]).blocks["m3"]).double()
    _, _, _, la, b, g, _, _, _ = euler.scan_inputs(u)
    dt_e = torch.nn.functional.softplus(torch.split(euler.in_proj(u), euler.split, -1)[4].float() + euler.dt_bias.float())
    assert torch.all(b == 0) and torch.allclose(g, dt_e.to(g.dtype))
