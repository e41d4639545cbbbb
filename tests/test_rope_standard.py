"""Mamba-3 ``rope: standard`` (the paper's ablation: data-independent rotary angles on B/C):
the spec, the phase it computes, parameter counts, and exact decoding (prefill + steps, generate)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hybridlab.arch import HybridLM, count_params, load_model_spec
from hybridlab.arch.layers.mamba3 import Mamba3
from hybridlab.arch.spec import Mamba3Block
from hybridlab.arch.specio import SpecError

HAS_CUDA = torch.cuda.is_available()


def spec(rope="standard", **sets):
    overrides = ["vocab_size=61", f"blocks.m3.rope={rope}"] + [f"blocks.m3.{k}={v}" for k, v in sets.items()]
    return load_model_spec("zoo:tiny-mamba3", overrides)


def test_spec_accepts_three_rope_forms_and_locates_bad_ones():
    assert spec().blocks["m3"].rope == "standard"
    assert spec("true").blocks["m3"].rope is True and spec("false").blocks["m3"].rope is False
    assert spec().blocks["m3"].rope_dims == 16  # the same dims rotate as with rope: true (rope_fraction 0.5 of 32)
    for bad, words in (("std", "expected true or false or 'standard', got a string 'std'"), ("0", "expected true or false or 'standard'"), ("yes please", "got a string")):
        with pytest.raises(SpecError) as ei:
            spec(bad)
        assert "blocks.m3.rope" in str(ei.value) and words in str(ei.value), str(ei.value)
    with pytest.raises(SpecError, match="rope_theta: must be positive"):
        spec(rope_theta=0)


def test_param_count_matches_module_without_a_theta_projection():
    s, dd = spec(), spec("true")
    assert count_params(s) == sum(p.numel() for p in HybridLM(s).parameters())
    n_angles = s.blocks["m3"].rope_dims // 2
    assert count_params(dd) - count_params(s) == 4 * 128 * n_angles  # 4 layers x d_model x the θ columns


def test_phase_is_position_times_fixed_frequencies_whatever_the_input():
    torch.manual_seed(0)
    blk = Mamba3Block(d_state=16, headdim=16, rank=1, rope="standard", rope_theta=100.0)
    m = Mamba3(32, blk, backend="torch")
    a = m.scan_inputs(torch.randn(2, 9, 32)).phase
    b = m.scan_inputs(5 * torch.randn(2, 9, 32)).phase
    assert torch.equal(a, b)  # data-independent
    n = blk.rope_dims // 2
    freq = 100.0 ** (-torch.arange(0, 2 * n, 2, dtype=torch.float32) / (2 * n))
    want = torch.arange(1, 10, dtype=torch.float32)[:, None] * freq
    torch.testing.assert_close(a[0, :, 0], want)
    assert torch.equal(a[:, :, 0], a[:, :, m.H - 1])  # the same angles in every head
    # a skipped (left-padding) position does not advance the position
    valid = torch.tensor([[False, False] + [True] * 7, [True] * 9])
    p = m.scan_inputs(torch.randn(2, 9, 32), valid=valid).phase
    torch.testing.assert_close(p[0, 2:, 0], want[:7])
    # and it changes the model: standard RoPE is not the real-valued (no rope) layer
    torch.manual_seed(1)
    tok = torch.randint(0, 61, (1, 20))
    outs = []
    for r in ("standard", "false"):
        torch.manual_seed(2)
        outs.append(HybridLM(spec(r)).eval()(tok))
    assert not torch.allclose(outs[0], outs[1])


def test_token_by_token_and_generate_equal_the_full_forward():
    torch.manual_seed(0)
    model = HybridLM(spec()).double().eval()
    tokens = torch.randint(0, 61, (2, 70))
    full = model(tokens)
    cache = model.allocate_cache(2, 70)
    pieces = [model(tokens[:, :33], cache)] + [model(tokens[:, t: t + 1], cache) for t in range(33, 70)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    model = model.float()
    prompt = tokens[:, :7]
    out = model.generate(prompt, 10)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, seq)
    rows = [tokens[0, :9].tolist(), tokens[1, :4].tolist()]  # left-padded rows generate what they would alone
    both = model.generate(rows, 6)
    for i, r in enumerate(rows):
        assert both[i, 9 - len(r):].tolist() == model.generate(torch.tensor([r]), 6)[0].tolist()


def test_standard_rope_decodes_through_the_unfused_step():
    m = Mamba3(64, Mamba3Block(d_state=16, headdim=16, rank=1, rope="standard"), backend="auto")
    assert not m.fused_step_ok(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_standard_rope_generate_matches_forward():
    """On CUDA (Triton prefill, the unfused step, CUDA graphs) greedy generation equals the full forward."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HybridLM(load_model_spec("zoo:tiny-hybrid", ["vocab_size=512", "blocks.m3.rope=standard"])).eval()
    prompt = torch.randint(0, 512, (3, 9), device="cuda")
    out = model.generate(prompt, 24)
    seq = prompt
    with torch.no_grad():
        for _ in range(24):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_standard_rope_has_no_official_form():
    """The official layer's rotary angles are data-dependent: a fixed-angle spec must not export as one."""
    from hybridlab.arch.interop.mamba_ssm import config_from_spec

    with pytest.raises(SpecError, match="rope.*'standard': no official mamba_ssm form"):
        config_from_spec(spec(), where="tiny.yaml")
