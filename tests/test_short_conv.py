"""Mamba-2's short convolution in the Mamba-3 mixer (``d_conv``): the op against F.conv1d, its window
(prefill + steps = one pass), packed documents, the spec, parameter counts, decoding and the official-form
refusal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hybridlab.arch import HybridLM, count_params, load_model_spec
from hybridlab.arch.layers.mamba3 import Mamba3
from hybridlab.arch.layers.short_conv import causal_conv, causal_conv_reference
from hybridlab.arch.spec import Mamba3Block
from hybridlab.arch.specio import SpecError


def spec(d_conv=4, **sets):
    overrides = ["vocab_size=61", f"blocks.m3.d_conv={d_conv}"] + [f"blocks.m3.{k}={v}" for k, v in sets.items()]
    return load_model_spec("zoo:tiny-mamba3", overrides)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_conv_equals_the_padded_conv1d_and_continues_from_its_window(k):
    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(6, k, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y, window = causal_conv(x, w, bias)
    torch.testing.assert_close(y, causal_conv_reference(x, w, bias))
    assert torch.equal(window, x[:, 11 - (k - 1):])
    a, wa = causal_conv(x[:, :3], w, bias)  # a prefill shorter than the window, then one token at a time
    parts = [a]
    for t in range(3, 11):
        step, wa = causal_conv(x[:, t:t + 1], w, bias, wa)
        parts.append(step)
    torch.testing.assert_close(torch.cat(parts, dim=1), y)


def test_packed_documents_do_not_reach_into_each_other():
    torch.manual_seed(1)
    x, w, bias = torch.randn(1, 10, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2]])
    y, _ = causal_conv(x, w, bias, seq_idx=seq_idx)
    for a, b in ((0, 3), (3, 5), (5, 10)):
        torch.testing.assert_close(y[:, a:b], causal_conv_reference(x[:, a:b], w, bias))
    assert not torch.allclose(causal_conv(x, w, bias)[0][:, 3:5], y[:, 3:5])  # without seq_idx they leak


def test_spec_counts_and_bad_values():
    s = spec()
    assert s.blocks["m3"].d_conv == 4 and spec(0).blocks["m3"].d_conv == 0
    model = HybridLM(s)
    assert count_params(s) == sum(p.numel() for p in model.parameters())
    m3 = model.layers[0].mixer
    ch = m3.d_inner + 2 * m3.R * m3.N
    assert count_params(s) - count_params(spec(0)) == 4 * ch * 5  # 4 layers x (4 taps + a bias) per channel
    for bad, words in (("-1", "must be 0 (no convolution) or the convolution's width, got -1"), ("two", "expected an integer")):
        with pytest.raises(SpecError) as ei:
            spec(bad)
        assert "blocks.m3.d_conv" in str(ei.value) and words in str(ei.value), str(ei.value)


def test_the_conv_changes_the_layer_and_reaches_x_b_and_c():
    torch.manual_seed(0)
    blk = Mamba3Block(d_state=16, headdim=16, d_conv=4)
    m = Mamba3(32, blk, backend="torch").double()
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        m.conv1d.weight.zero_()
        m.conv1d.weight[:, 0, -1] = 1.0  # the identity tap on the current token, no bias: silu of the projection
        m.conv1d.bias.zero_()
    z, x, B, C, *_ = torch.split(m.in_proj(u), m.split, dim=-1)
    B2, C2, x2, *_ = m.projections(u)
    torch.testing.assert_close(x2.reshape(2, 9, -1), torch.nn.functional.silu(x))
    torch.testing.assert_close(B2.reshape(2, 9, -1), torch.nn.functional.silu(B))
    torch.testing.assert_close(C2.reshape(2, 9, -1), torch.nn.functional.silu(C))
    y = m(u)
    m.conv1d.weight.grad = None
    y.square().sum().backward()
    assert m.conv1d.weight.grad.abs().sum() > 0 and m.conv1d.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["siso", "mimo"])
def test_token_by_token_generate_and_padding_equal_the_full_forward(mode):
    torch.manual_seed(0)
    sets = {"mode": "mimo", "rank": 2} if mode == "mimo" else {}
    model = HybridLM(spec(**sets)).double().eval()
    tokens = torch.randint(0, 61, (2, 40))
    full = model(tokens)
    cache = model.allocate_cache(2, 40)
    pieces = [model(tokens[:, :17], cache)] + [model(tokens[:, t: t + 1], cache) for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-6, rtol=1e-5)
    rows = [tokens[0, :9].tolist(), tokens[1, :2].tolist()]  # left-padded rows generate what they would alone
    both = model.float().generate(rows, 6)
    for i, r in enumerate(rows):
        assert both[i, 9 - len(r):].tolist() == model.generate(torch.tensor([r]), 6)[0].tolist()


def test_left_padding_feeds_the_conv_zeros_as_an_unpadded_start_does():
    torch.manual_seed(0)
    model = HybridLM(spec()).double().eval()
    row = torch.randint(1, 61, (1, 5))
    padded = torch.cat([torch.randint(1, 61, (1, 3)), row], dim=1)  # whatever the padding tokens are
    cache = model.allocate_cache(1, 8, pad=torch.tensor([3]))
    with torch.no_grad():
        torch.testing.assert_close(model(padded, cache)[:, -1], model(row)[:, -1])


def test_packed_model_equals_documents_alone():
    torch.manual_seed(0)
    model = HybridLM(spec()).double()
    tokens = torch.randint(0, 61, (1, 20))
    seq_idx = torch.tensor([[0] * 7 + [1] * 13])
    packed = model(tokens, seq_idx=seq_idx)
    torch.testing.assert_close(packed[:, :7], model(tokens[:, :7]))
    torch.testing.assert_close(packed[:, 7:], model(tokens[:, 7:]))


def test_decodes_through_the_unfused_step_and_has_no_official_form(tmp_path):
    m = Mamba3(64, Mamba3Block(d_state=16, headdim=16, d_conv=4), backend="auto")
    assert not m.fused_step_ok(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), None)
    from hybridlab.arch.interop.mamba_ssm import config_from_spec

    with pytest.raises(SpecError, match="d_conv.*4: no official mamba_ssm form"):
        config_from_spec(spec(), where="tiny.yaml")
