"""Decoding: generate (greedy = forward, per-sequence prompt lengths, sampling), the CuTe step on GPU.

CPU tests run everywhere; ``@pytest.mark.gpu`` tests need CUDA (and sm90+ with
nvidia-cutlass-dsl for the CuTe ones) and skip otherwise.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from hybridlab.arch import HybridLM, load_model_spec
from hybridlab.kernels.ssm_scan import ScanState, ssm_scan
from hybridlab.kernels.ssm_scan.reference import scan_recurrent

HAS_CUDA = torch.cuda.is_available()


def _model(name="zoo:tiny-hybrid", seed=0, device="cpu", dtype=torch.float32, backends=None, vocab=None):
    torch.manual_seed(seed)
    spec = load_model_spec(name, overrides=[f"vocab_size={vocab}"] if vocab else [])
    with torch.device(device):
        m = HybridLM(spec, backends=backends)
    return m.to(dtype).eval()


def _greedy_by_forward(model, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("name", ["zoo:tiny-hybrid", "zoo:tiny-mimo"])
def test_greedy_generate_equals_forward(name):
    m = _model(name, vocab=512)
    prompt = torch.randint(0, 512, (2, 7))
    out = m.generate(prompt, 6)
    assert out.shape == (2, 13)
    assert torch.equal(out, _greedy_by_forward(m, prompt, 6))


def test_per_sequence_lengths_match_single_rows():
    m = _model("zoo:tiny-hybrid", vocab=512)
    torch.manual_seed(1)
    rows = [torch.randint(1, 512, (n,)).tolist() for n in (9, 3, 6)]
    out = m.generate(rows, 5)
    assert out.shape == (3, 9 + 5)
    for i, r in enumerate(rows):
        alone = m.generate(torch.tensor([r]), 5)
        assert out[i, 9 - len(r):].tolist() == alone[0].tolist(), f"row {i}"
        assert (out[i, : 9 - len(r)] == 0).all()  # padding kept


def test_prompt_lengths_tensor_form_equals_list_form():
    m = _model("zoo:tiny-hybrid", vocab=512)
    rows = [[5, 6, 7, 8], [9, 10]]
    t = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    assert torch.equal(m.generate(rows, 4), m.generate(t, 4, prompt_lengths=[4, 2]))


def test_padded_prefill_logits_match_unpadded():
    m = _model("zoo:tiny-hybrid", vocab=512)
    row = torch.randint(1, 512, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    cache = m.allocate_cache(1, 8, pad=torch.tensor([3]))
    with torch.no_grad():
        got = m(padded, cache)[:, -1]
        want = m(row)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.9),
                                  dict(temperature=0.8, top_k=20, top_p=0.5)])
def test_sampling_options_are_seeded_and_in_range(opts):
    m = _model("zoo:tiny-hybrid", vocab=512)
    prompt = torch.randint(0, 512, (3, 4))
    a = m.generate(prompt, 8, generator=torch.Generator().manual_seed(3), **opts)
    b = m.generate(prompt, 8, generator=torch.Generator().manual_seed(3), **opts)
    assert torch.equal(a, b)
    assert a.shape == (3, 12) and int(a.min()) >= 0 and int(a.max()) < 512
    assert torch.equal(a[:, :4], prompt)


def test_top_k_1_is_greedy():
    m = _model("zoo:tiny-hybrid", vocab=512)
    prompt = torch.randint(0, 512, (2, 5))
    assert torch.equal(m.generate(prompt, 5, temperature=1.0, top_k=1), m.generate(prompt, 5))


def test_prefill_then_step_equals_token_by_token():
    """The chunked prefill hands the same state to decode as feeding tokens one by one."""
    m = _model("zoo:tiny-mimo", vocab=512)
    seq = torch.randint(0, 512, (2, 10))
    c1, c2 = m.allocate_cache(2, 12), m.allocate_cache(2, 12)
    with torch.no_grad():
        a = m(seq, c1)[:, -1]
        for t in range(10):
            b = m(seq[:, t : t + 1], c2)[:, -1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "split"])
def test_static_decoder_on_cpu_matches_eager(impl, monkeypatch):
    """The shape-static step (device position, masked full-buffer attention) equals the dynamic one."""
    import hybridlab.arch.layers.attention as attn_mod
    from hybridlab.arch.decode import Decoder

    monkeypatch.setattr(attn_mod, "DECODE_IMPL", impl)
    m = _model("zoo:tiny-hybrid", vocab=512)
    prompt = torch.randint(0, 512, (2, 6))
    outs = []
    for static in (False, True):
        d = Decoder(m, 2, 12, static=static)
        logits = [d.prefill(prompt)]
        tok = logits[-1].argmax(-1)
        for _ in range(4):
            logits.append(d.step(tok))
            tok = logits[-1].argmax(-1)
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_generate_cli_smoke(cli):
    r = cli("generate", "zoo:tiny-hybrid", "--prompt", "hi", "--max-new-tokens", "4", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def _cli_one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_generate_bad_checkpoint_files_are_one_line(cli, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    msg = _cli_one_line_error(cli("generate", str(junk), "--prompt", "hi", "--model", "zoo:tiny-hybrid",
                                  "--max-new-tokens", "2", "--device", "cpu"))
    assert str(junk) in msg and "not a PyTorch checkpoint" in msg
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], lst)
    msg = _cli_one_line_error(cli("generate", str(lst), "--prompt", "hi", "--model", "zoo:tiny-hybrid",
                                  "--max-new-tokens", "2", "--device", "cpu"))
    assert str(lst) in msg and "list" in msg and "state dict" in msg


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"] + ([] if HAS_CUDA else ["cuda", "cuda:0"]))
def test_generate_bad_device_is_one_line(cli, device):
    msg = _cli_one_line_error(cli("generate", "zoo:tiny-hybrid", "--prompt", "hi", "--max-new-tokens", "2",
                                  "--device", device))
    assert "--device" in msg and device in msg


def test_generate_uses_the_shared_byte_tokenizer():
    import hybridlab.generate as g

    assert not hasattr(g, "encode") and not hasattr(g, "decode")


def test_cute_module_imports_without_cutlass():
    c = importlib.import_module("hybridlab.kernels.ssm_scan.cute")

    assert callable(c.ssm_scan_cute) and callable(c.ssm_step_fused)
    assert c.step_supported(64, 128, 4)[0] and not c.step_supported(64, 24, 1)[0]


# ---------------------------------------------------------------- GPU

needs_cute = pytest.mark.skipif(
    not HAS_CUDA or not importlib.import_module("hybridlab.kernels.ssm_scan.cute").cute_available(),
    reason="needs CUDA sm90+ with nvidia-cutlass-dsl",
)


def _rand_step_inputs(b, H, R, N, P, dtype, device, gen):
    q = torch.randn(b, 1, H, R, N, device=device, generator=gen).to(dtype)
    k = torch.randn(b, 1, H, R, N, device=device, generator=gen).to(dtype)
    v = torch.randn(b, 1, H, R, P, device=device, generator=gen).to(dtype)
    dt = torch.rand(b, 1, H, device=device, generator=gen) * 0.1 + 1e-3
    la = -dt * (torch.rand(b, 1, H, device=device, generator=gen) * 4 + 0.5)
    lam = torch.rand(b, 1, H, device=device, generator=gen)
    return q, k, v, la, (1 - lam) * dt * la.exp(), lam * dt


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize("rank,d_state", [(1, 128), (4, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cute_step_matches_recurrent_over_many_steps(rank, d_state, dtype):
    dev = "cuda"
    b, H, P, N, R = 3, 8, 64, d_state, rank
    gen = torch.Generator(device=dev).manual_seed(rank * 7 + d_state)
    h = torch.randn(b, H, P, N, device=dev, generator=gen)
    st_c = ScanState(h.clone(), torch.randn(b, H, R, N, device=dev, generator=gen).to(dtype),
                     torch.randn(b, H, R, P, device=dev, generator=gen).to(dtype))
    st_r = ScanState(st_c.h.clone(), st_c.k.clone(), st_c.v.clone())
    h_ptr = st_c.h.data_ptr()
    worst = 0.0
    for step in range(120):
        inp = _rand_step_inputs(b, H, R, N, P, dtype, dev, gen)
        y_c, st_c2 = ssm_scan(*inp, st_c, backend="cute")
        y_r, st_r = scan_recurrent(*inp, st_r)
        assert st_c2.h.data_ptr() == h_ptr  # updated in place
        err = ((y_c.float() - y_r.float()).norm() / y_r.float().norm()).item()
        worst = max(worst, err)
        assert torch.isfinite(y_c).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert worst < tol, worst
    torch.testing.assert_close(st_c.h, st_r.h, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-2)
    assert torch.equal(st_c.k, st_r.k.to(dtype)) and torch.equal(st_c.v, st_r.v.to(dtype))


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize("mode", ["siso", "mimo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a_form", ["heavy_tail", "softplus+bias"])
def test_fused_layer_step_matches_torch_layer(mode, dtype, a_form):
    """Mamba-3 layer decode: fused CuTe step vs the PyTorch layer (reference scan), 100+ steps, both A forms."""
    from hybridlab.arch.layers.mamba3 import Mamba3
    from hybridlab.arch.spec import Mamba3Block

    torch.manual_seed(0)
    a = dict(a_activation="heavy_tail", a_bias=False) if a_form == "heavy_tail" else \
        dict(a_activation="softplus", a_bias=True, a_init_min=1.0, a_init_max=16.0)
    blk = Mamba3Block(mode=mode, rank=4 if mode == "mimo" else None, d_state=64, headdim=64,
                      out_norm="pre_gate_grouped", **a)
    if mode == "siso":
        blk.rank = 1
    with torch.device("cuda"):
        fused = Mamba3(256, blk, backend="cute").to(dtype)
        ref = Mamba3(256, blk, backend="torch").to(dtype)
    ref.load_state_dict(fused.state_dict())
    cf, cr = fused.allocate_cache(4, 0, "cuda", dtype), ref.allocate_cache(4, 0, "cuda", dtype)
    worst = 0.0
    with torch.no_grad():
        for _ in range(110):
            u = torch.randn(4, 1, 256, device="cuda").to(dtype)
            assert fused.fused_step_ok(u, cf)
            yf, yr = fused(u, cf), ref(u, cr)
            worst = max(worst, ((yf.float() - yr.float()).norm() / yr.float().norm()).item())
    assert worst < (1e-4 if dtype == torch.float32 else 3e-2), worst
    torch.testing.assert_close(cf.phase, cr.phase, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ["zoo:tiny-hybrid", "zoo:tiny-mimo"])
def test_cuda_graph_generate_equals_eager(name):
    m = _model(name, device="cuda", dtype=torch.bfloat16, vocab=512)
    rows = [torch.randint(1, 512, (n,)).tolist() for n in (7, 3, 5, 7)]
    a = m.generate(rows, 24, cuda_graph=True)
    b = m.generate(rows, 24, cuda_graph=False)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_greedy_generate_matches_torch_reference():
    """Default GPU generation (cute step on Hopper) vs the torch reference backends, fp32, token for token."""
    fast = _model("zoo:tiny-hybrid", device="cuda", vocab=512)
    ref = _model("zoo:tiny-hybrid", device="cuda", vocab=512, backends={"ssm": "torch", "attention": "sdpa"})
    prompt = torch.randint(0, 512, (3, 9), device="cuda")
    assert torch.equal(fast.generate(prompt, 32), ref.generate(prompt, 32, cuda_graph=False))


def test_fused_step_object_packs_once_and_repacks_on_change():
    """The layer's FusedStep (kernels.ssm_scan.cute) packs its parameters once, again only after a change; CPU-only
    machines never import cutlass; use_fused_step is per layer (bench decode switches one layer, not the class)."""
    import sys

    from hybridlab.arch.layers.mamba3 import Mamba3
    from hybridlab.arch.spec import Mamba3Block
    from hybridlab.kernels.ssm_scan.cute import STEP_PARAMS

    blk = Mamba3Block(mode="mimo", rank=2, d_state=32, headdim=32, a_activation="softplus", a_bias=True,
                      a_init_min=1.0, a_init_max=16.0)
    blk2 = Mamba3Block(mode="siso", rank=1, d_state=32, headdim=32)
    a, b = Mamba3(64, blk), Mamba3(64, blk2)
    assert a.step.spec.a_activation == "softplus" and a.step.spec.a_bias
    assert b.step.spec.a_activation == "heavy_tail" and not b.step.spec.a_bias
    small = {n: getattr(a, n) for n in STEP_PARAMS}
    p1 = a.step.params(small)
    assert a.step.params(small) is p1  # cached
    with torch.no_grad():
        a.D.add_(1.0)
    p2 = a.step.params(small)
    assert p2 is not p1 and not torch.equal(p1, p2)
    H = a.H
    torch.testing.assert_close(p2[H: 2 * H], a.a_bias.detach())  # the A bias slot
    pb = b.step.params({n: getattr(b, n) for n in STEP_PARAMS})
    assert torch.all(pb[b.H: 2 * b.H] == 0)  # no A bias: zeros
    assert not b.step.supported(torch.device("cpu"))
    b.use_fused_step = False
    assert a.use_fused_step and not Mamba3.__dict__.get("use_fused_step")
    assert "cutlass" not in sys.modules
