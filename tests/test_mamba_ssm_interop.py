"""Official mamba_ssm checkpoints in and out (hybridlab.arch.interop.mamba_ssm, `hybridlab import/export mamba-ssm`).

The official model is written here a second time, independently, in float64 from
its published formulas (``official_logits`` below: MixerModel's Add -> Norm ->
Mixer blocks, Mamba3 with the heavy-tail A, the trapezoid recurrence written as
a recurrence, official rotary pairs (SISO (2i, 2i+1), MIMO (i, N/2 + i)), MHA with
flash-attn's rotary conventions, GatedMLP). Synthetic official checkpoints — the
official parameter names and shapes, every parameter random — are saved as
``pytorch_model.bin`` and ``model.safetensors``, imported, and the imported
HybridLM's logits must equal that formula. Plus: a round trip is bit-exact, the
default hybridlab Mamba-3 is the formula, and bad inputs give one line and exit 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlab.arch import load_model_spec, load_pretrained
from hybridlab.arch.interop import mamba_ssm as ms
from hybridlab.arch.model import HybridLM
from hybridlab.arch.pretrained import model_state, read_safetensors

# ============================================================================ the official model, float64


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _heavy_tail(x):
    return torch.where(x >= 0, 1 + x, 1 / (1 - torch.clamp(x, max=0)))


def _rotate_pairs(x, ang, first, second):
    """Rotate dims (first[i], second[i]) of x's last axis by ang[..., i]."""
    out = x.clone()
    a, b = x[..., first], x[..., second]
    out[..., first] = a * ang.cos() - b * ang.sin()
    out[..., second] = a * ang.sin() + b * ang.cos()
    return out


def official_mamba3(u, p, c, d_model):
    """Mamba3.forward (mamba_ssm/modules/mamba3.py with its kernels' math), float64. u (b, l, d)."""
    N, P = c.get("d_state", 128), c.get("headdim", 64)
    E = int(c.get("expand", 2) * d_model)
    H = E // P
    mimo = c.get("is_mimo", False)
    R = c.get("mimo_rank", 4) if mimo else 1
    frac = c.get("rope_fraction", 0.5)
    split = int(N * frac)
    split -= split % 2
    A_n = split // 2
    b, l, _ = u.shape
    zxbc = u @ p["in_proj.weight"].T
    z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(zxbc, [E, E, R * N, R * N, H, H, H, A_n], dim=-1)
    A = torch.clamp(-_heavy_tail(dd_A), max=-c.get("A_floor", 1e-4))
    DT = F.softplus(dd_dt + p["dt_bias"])
    ADT = A * DT
    lam = torch.sigmoid(trap)
    B = _rms(B.view(b, l, R, N), p["B_norm.weight"])[:, :, None] + p["B_bias"]  # (b, l, H, R, N)
    C = _rms(C.view(b, l, R, N), p["C_norm.weight"])[:, :, None] + p["C_bias"]
    phase = torch.cumsum(torch.tanh(ang)[:, :, None, :] * math.pi * DT[..., None], dim=1)  # (b, l, H, A)
    if mimo:  # TileLang kernels: pairs (i, N//2 + i)
        first, second = list(range(A_n)), [N // 2 + i for i in range(A_n)]
    else:  # Triton SISO kernels: pairs (2i, 2i + 1)
        first, second = [2 * i for i in range(A_n)], [2 * i + 1 for i in range(A_n)]
    ph = phase[:, :, :, None, :]
    q, k = _rotate_pairs(C, ph, first, second), _rotate_pairs(B, ph, first, second)
    x = x.view(b, l, H, P)
    v = x[:, :, :, None, :] * p["mimo_x"] if mimo else x[:, :, :, None, :]  # (b, l, H, R, P)
    h = torch.zeros(b, H, P, N, dtype=u.dtype)
    prev = torch.zeros(b, H, P, N, dtype=u.dtype)
    ys = []
    for t in range(l):
        cur = torch.einsum("bhrp,bhrn->bhpn", v[:, t], k[:, t])
        alpha = torch.exp(ADT[:, t])[..., None, None]
        beta = ((1 - lam[:, t]) * DT[:, t])[..., None, None] * alpha
        gamma = (lam[:, t] * DT[:, t])[..., None, None]
        h = alpha * h + beta * prev + gamma * cur
        prev = cur
        ys.append(torch.einsum("bhpn,bhrn->bhrp", h, q[:, t]) + p["D"][:, None, None] * v[:, t])
    y = torch.stack(ys, 1)  # (b, l, H, R, P)
    z = z.view(b, l, H, 1, P)
    if mimo:
        z = z * p["mimo_z"]
    if c.get("is_outproj_norm", False):  # RMSNormGated, group = headdim, norm before the gate
        y = _rms(y, p["norm.weight"].view(H, 1, P))
    y = y * F.silu(z)
    y = (y * p["mimo_o"]).sum(3) if mimo else y[:, :, :, 0]
    return y.reshape(b, l, E) @ p["out_proj.weight"].T


def official_mha(u, p, c, d_model):
    """MHA.forward (mamba_ssm/modules/mha.py, flash-attn RotaryEmbedding conventions), float64."""
    Hq = c["num_heads"]
    Hkv = c.get("num_heads_kv") or Hq
    hd = c.get("head_dim") or d_model // Hq
    b, l, _ = u.shape
    qkv = u @ p["in_proj.weight"].T + (p["in_proj.bias"] if c.get("qkv_proj_bias", True) else 0)
    q, kv = qkv.split([Hq * hd, 2 * Hkv * hd], -1)
    q = q.view(b, l, Hq, hd)
    k, v = kv.view(b, l, 2, Hkv, hd).unbind(2)
    rd = c.get("rotary_emb_dim", 0)
    if rd:
        inv = 1.0 / (c.get("rotary_emb_base", 10000.0) ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
        ang = torch.arange(l, dtype=torch.float64)[:, None] * inv  # (l, rd/2)
        if c.get("rotary_emb_interleaved", False):
            first, second = list(range(0, rd, 2)), list(range(1, rd, 2))
        else:
            first, second = list(range(rd // 2)), list(range(rd // 2, rd))
        q = _rotate_pairs(q, ang[None, :, None], first, second)
        k = _rotate_pairs(k, ang[None, :, None], first, second)
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    scale = c.get("softmax_scale") or hd ** -0.5
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~torch.ones(l, l, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(b, l, Hq * hd)
    return o @ p["out_proj.weight"].T + (p["out_proj.bias"] if c.get("out_proj_bias", True) else 0)


def official_logits(config, sd, tokens):
    """MambaLMHeadModel.forward(tokens).logits, float64, with the Block's Add -> Norm -> Mixer order."""
    sd = {k: v.double() for k, v in sd.items()}
    D = config["d_model"]
    attn_idx = config.get("attn_layer_idx", [])
    hidden, residual = sd["backbone.embedding.weight"][tokens], None
    for i in range(config["n_layer"]):
        pre = f"backbone.layers.{i}."
        mixer = {k[len(pre + "mixer."):]: v for k, v in sd.items() if k.startswith(pre + "mixer.")}
        residual = hidden + residual if residual is not None else hidden
        hidden = _rms(residual, sd[pre + "norm.weight"])
        if i in attn_idx:
            hidden = official_mha(hidden, mixer, config["attn_cfg"], D)
        else:
            hidden = official_mamba3(hidden, mixer, config["ssm_cfg"], D)
        if config.get("d_intermediate", 0):
            residual = hidden + residual
            hidden = _rms(residual, sd[pre + "norm2.weight"])
            y, gate = (hidden @ sd[pre + "mlp.fc1.weight"].T).chunk(2, dim=-1)
            hidden = (y * F.silu(gate)) @ sd[pre + "mlp.fc2.weight"].T
    residual = hidden + residual
    hidden = _rms(residual, sd["backbone.norm_f.weight"])
    head = sd["backbone.embedding.weight"] if config.get("tie_embeddings", True) else sd["lm_head.weight"]
    return hidden @ head.T


# ============================================================================ synthetic official checkpoints


def official_state(config, seed=0, dtype=torch.float32):
    """Official parameter names and shapes (MambaLMHeadModel.state_dict()), every one random."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)  # noqa: E731
    D, L = config["d_model"], config["n_layer"]
    V = config["vocab_size"]
    m = config.get("pad_vocab_size_multiple", 8)
    V += (m - V % m) % m
    sd = {"backbone.embedding.weight": rnd(V, D)}
    c = config.get("ssm_cfg", {})
    N, P = c.get("d_state", 128), c.get("headdim", 64)
    E = int(c.get("expand", 2) * D)
    H = E // P
    R = c.get("mimo_rank", 4) if c.get("is_mimo") else 1
    split = int(N * c.get("rope_fraction", 0.5))
    A_n = (split - split % 2) // 2
    for i in range(L):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = rnd(D, scale=0.2, shift=1.0)
        if i in config.get("attn_layer_idx", []):
            a = config["attn_cfg"]
            Hq, Hkv = a["num_heads"], a.get("num_heads_kv") or a["num_heads"]
            hd = a.get("head_dim") or D // Hq
            sd[p + "mixer.in_proj.weight"] = rnd(hd * (Hq + 2 * Hkv), D, scale=D ** -0.5)
            if a.get("qkv_proj_bias", True):
                sd[p + "mixer.in_proj.bias"] = rnd(hd * (Hq + 2 * Hkv), scale=0.3)
            sd[p + "mixer.out_proj.weight"] = rnd(D, Hq * hd, scale=(Hq * hd) ** -0.5)
            if a.get("out_proj_bias", True):
                sd[p + "mixer.out_proj.bias"] = rnd(D, scale=0.3)
        else:
            sd[p + "mixer.in_proj.weight"] = rnd(2 * E + 2 * R * N + 3 * H + A_n, D, scale=D ** -0.5)
            sd[p + "mixer.dt_bias"] = rnd(H, scale=0.5, shift=-2.0)
            sd[p + "mixer.B_bias"] = rnd(H, R, N, scale=0.5, shift=1.0)
            sd[p + "mixer.C_bias"] = rnd(H, R, N, scale=0.5, shift=1.0)
            sd[p + "mixer.B_norm.weight"] = rnd(N, scale=0.2, shift=1.0)
            sd[p + "mixer.C_norm.weight"] = rnd(N, scale=0.2, shift=1.0)
            if c.get("is_mimo"):
                for n in ("mimo_x", "mimo_z", "mimo_o"):
                    sd[p + f"mixer.{n}"] = rnd(H, R, P, scale=0.5, shift=1.0 / R)
            sd[p + "mixer.D"] = rnd(H, scale=0.5, shift=1.0)
            if c.get("is_outproj_norm"):
                sd[p + "mixer.norm.weight"] = rnd(E, scale=0.2, shift=1.0)
            sd[p + "mixer.out_proj.weight"] = rnd(D, E, scale=E ** -0.5)
        if config.get("d_intermediate", 0):
            h = -(-config["d_intermediate"] // 128) * 128
            sd[p + "norm2.weight"] = rnd(D, scale=0.2, shift=1.0)
            sd[p + "mlp.fc1.weight"] = rnd(2 * h, D, scale=D ** -0.5)
            sd[p + "mlp.fc2.weight"] = rnd(D, h, scale=h ** -0.5)
    sd["backbone.norm_f.weight"] = rnd(D, scale=0.2, shift=1.0)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if config.get("tie_embeddings", True) else rnd(V, D, scale=0.3)
    return sd


def write_official(folder, config, sd, fmt="bin"):
    """An official checkpoint folder as save_pretrained writes it (or with model.safetensors, tied head left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        tied = config.get("tie_embeddings", True)
        save_file({k: v.contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")},
                  str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return folder


SISO = {
    "d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 101, "pad_vocab_size_multiple": 8,
    "ssm_cfg": {"layer": "Mamba3", "d_state": 32, "headdim": 16, "expand": 2, "rope_fraction": 0.5, "chunk_size": 16,
                "is_outproj_norm": False},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "tie_embeddings": True,
}
MIMO = {
    "d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 96,
    "ssm_cfg": {"layer": "Mamba3", "d_state": 32, "headdim": 16, "is_mimo": True, "mimo_rank": 4, "chunk_size": 4,
                "is_outproj_norm": True, "rope_fraction": 0.5, "A_floor": 0.05},
    "tie_embeddings": False,
}
HYBRID = {
    "d_model": 64, "d_intermediate": 100, "n_layer": 4, "vocab_size": 80, "attn_layer_idx": [1, 3],
    "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 16, "is_mimo": True, "mimo_rank": 2, "rope_fraction": 1.0,
                "is_outproj_norm": True, "chunk_size": 8},
    "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "rotary_emb_dim": 8, "causal": True,
                 "rotary_emb_interleaved": True, "softmax_scale": 0.3, "rotary_emb_base": 500.0},
    "tie_embeddings": True,
}
HYBRID_SISO = {  # SISO + half-split partial rotary, no biases, MHA without GQA
    "d_model": 64, "d_intermediate": 128, "n_layer": 3, "vocab_size": 64, "attn_layer_idx": [2],
    "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 32, "is_outproj_norm": True},
    "attn_cfg": {"num_heads": 2, "rotary_emb_dim": 16, "causal": True, "qkv_proj_bias": False, "out_proj_bias": False},
}
CASES = {"siso": SISO, "mimo": MIMO, "hybrid": HYBRID, "hybrid_siso": HYBRID_SISO}


def _tokens(vocab, b=2, l=19, seed=1):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


# ============================================================================ import: logits equal the official formula


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_logits_equal_the_official_formula(tmp_path, case, fmt):
    config = CASES[case]
    sd = official_state(config, seed=len(case))
    src = write_official(tmp_path / "official", config, sd, fmt)
    dst = ms.import_checkpoint(src, tmp_path / "hl")
    model = load_pretrained(dst, dtype=torch.float64)
    assert not model.training
    V = sd["backbone.embedding.weight"].shape[0]
    assert model.spec.vocab_size == V  # the padded vocabulary
    tokens = _tokens(config["vocab_size"])
    with torch.no_grad():
        ours = model(tokens)
    ref = official_logits(config, sd, tokens)
    assert ours.shape == (2, 19, V)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-10, err
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_import_maps_the_config(tmp_path):
    dst = ms.import_checkpoint(write_official(tmp_path / "o", HYBRID, official_state(HYBRID)), tmp_path / "hl")
    spec = load_model_spec(str(dst))
    m3, attn, mlp = spec.blocks["m3"], spec.blocks["attn"], spec.blocks["mlp"]
    assert (m3.mode, m3.rank, m3.d_state, m3.headdim, m3.out_norm, m3.rope_fraction) == ("mimo", 2, 16, 16, "pre_gate_grouped", 1.0)
    assert (m3.a_activation, m3.a_bias, m3.trapezoid, m3.chunk_size) == ("heavy_tail", False, True, 8)
    assert (attn.heads, attn.kv_heads, attn.rope_dim, attn.rope_interleaved, attn.qkv_bias, attn.out_bias) == (4, 2, 8, True, True, True)
    assert (attn.softmax_scale, attn.rope_theta) == (0.3, 500.0)
    assert mlp.hidden == 128  # d_intermediate 100 rounded up to 128 as GatedMLP does
    assert spec.layers == ["m3", "mlp", "attn", "mlp", "m3", "mlp", "attn", "mlp"]
    assert spec.residual_in_fp32 and spec.norm_eps == 1e-5 and spec.tie_embeddings
    from hybridlab.arch import count_params

    assert count_params(spec) == sum(p.numel() for p in load_pretrained(dst).parameters())  # attention biases counted
    saved = (dst / "model.yaml").read_text()
    assert "spec_version: 2" in saved and "a_activation: heavy_tail" in saved and "a_bias: false" in saved


def test_default_mamba3_is_the_official_function(tmp_path):
    """A hybridlab model with default Mamba-3 blocks (random weights everywhere), exported, equals the formula."""
    spec = load_model_spec({
        "name": "default-m3", "d_model": 64, "vocab_size": 72, "tie_embeddings": False,
        "blocks": {"m3": {"mixer": "mamba3", "d_state": 32, "headdim": 16},
                   "m3r": {"mixer": "mamba3", "mode": "mimo", "d_state": 32, "headdim": 16}},
        "layout": "m3",
    })
    for name in ("m3", "m3r"):
        s = load_model_spec({**spec.to_dict(), "layout": name})
        blk = s.blocks[name]
        assert blk.a_activation == "heavy_tail" and not blk.a_bias
        torch.manual_seed(5)
        model = HybridLM(s).double()
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm) * 0.3)
        assert model.layers[0].mixer.a_bias is None
        out = ms.export_checkpoint(s, model_state(model), tmp_path / name)
        config = json.loads((out / "config.json").read_text())
        sd = torch.load(out / "pytorch_model.bin", weights_only=True)
        tokens = _tokens(72, l=13)
        with torch.no_grad():
            ours = model(tokens)
        ref = official_logits(config, sd, tokens)
        assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-10


def test_mimo_x_starts_at_one_over_rank():
    spec = load_model_spec("zoo:tiny-mimo")
    m = HybridLM(spec).layers[0].mixer
    assert torch.all(m.mimo_x == 0.25) and torch.all(m.mimo_o == 0.25) and torch.all(m.mimo_z == 1)


# ============================================================================ round trip


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(tmp_path, case):
    config = CASES[case]
    sd = official_state(config, seed=3, dtype=torch.bfloat16 if case == "mimo" else torch.float32)
    sd = {k: (v.float() if k.endswith(("dt_bias", "_bias", "D", "mimo_x", "mimo_z", "mimo_o")) else v) for k, v in sd.items()}  # mixed dtypes, as a bf16 official model holds
    if config.get("tie_embeddings", True):
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    src = write_official(tmp_path / "o", config, sd)
    hl = ms.import_checkpoint(src, tmp_path / "hl")
    back = ms.export_model_folder(hl, tmp_path / "back")
    assert json.loads((back / "config.json").read_text()) == config
    got = torch.load(back / "pytorch_model.bin", weights_only=True)
    assert list(got) == list(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k
    assert (back / "tokenizer.json").is_file()
    # hybridlab -> official -> hybridlab keeps the hybridlab weights too
    again = ms.import_checkpoint(back, tmp_path / "again")
    a, b = read_safetensors(hl / "model.safetensors"), read_safetensors(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_of_a_model_without_provenance(tmp_path):
    """A hybridlab-born model exports with a config built from its spec, and imports back to the same function."""
    spec = load_model_spec({
        "name": "born-here", "d_model": 64, "vocab_size": 100, "residual_in_fp32": True,
        "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16, "out_norm": "pre_gate_grouped"},
                   "a": {"mixer": "attention", "heads": 4, "kv_heads": 2, "rope_dim": 8},
                   "f": {"mixer": "swiglu", "hidden": 256}},
        "layout": "(m3 f) * 2 a f",
    })
    torch.manual_seed(0)
    model = HybridLM(spec).double()
    out = ms.export_checkpoint(spec, model_state(model), tmp_path / "off")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attn_layer_idx"] == [2] and cfg["d_intermediate"] == 256 and cfg["n_layer"] == 3
    assert cfg["attn_cfg"]["causal"] is True and cfg["attn_cfg"]["rotary_emb_dim"] == 8
    assert cfg["ssm_cfg"]["layer"] == "Mamba3" and cfg["ssm_cfg"]["is_outproj_norm"] is True
    tokens = _tokens(100)
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    with torch.no_grad():
        ours = model(tokens)
    assert ((ours - official_logits(cfg, sd, tokens)).abs().max() / ours.abs().max()).item() < 1e-10


# ============================================================================ bad input: one line, exit 2


def _one_line_exit2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_cli_import_then_check_eval_ready(tmp_path, cli):
    src = write_official(tmp_path / "o", SISO, official_state(SISO))
    r = cli("import", "mamba-ssm", str(src), "--out", str(tmp_path / "hl"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hl" / "model.yaml").is_file() and (tmp_path / "hl" / "model.safetensors").is_file()
    r = cli("check", str(tmp_path / "hl"), "--json", "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vocab_size"] == 104
    r = cli("eval", str(tmp_path / "hl"), "--task", "mqar", "--lengths", "16", "--option", "vocab=64",
            "--option", "num_kv_pairs=2", "--batches", "1", "--batch-size", "4", "--no-log")
    assert r.returncode == 0 and "mqar len 16: acc" in r.stdout, r.stdout + r.stderr
    r = cli("import", "mamba-ssm", str(src), "--out", str(tmp_path / "hl"))
    _one_line_exit2(r, "not empty")
    r = cli("export", "mamba-ssm", str(tmp_path / "hl"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == SISO


def _bad(tmp_path, kind):
    cfg = json.loads(json.dumps(HYBRID))
    sd = official_state(HYBRID)
    src = tmp_path / "o"
    if kind == "no_config":
        write_official(src, cfg, sd)
        (src / "config.json").unlink()
    elif kind == "mamba1":
        cfg["ssm_cfg"]["layer"] = "Mamba1"
        write_official(src, cfg, sd)
    elif kind == "no_layer":
        del cfg["ssm_cfg"]["layer"]
        write_official(src, cfg, sd)
    elif kind == "shape":
        sd["backbone.layers.0.mixer.B_bias"] = sd["backbone.layers.0.mixer.B_bias"][:, :, :8].clone()
        write_official(src, cfg, sd)
    elif kind == "truncated_bin":
        write_official(src, cfg, sd)
        data = (src / "pytorch_model.bin").read_bytes()
        (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif kind == "truncated_safetensors":
        write_official(src, cfg, sd, "safetensors")
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "ngroups":
        cfg["ssm_cfg"]["ngroups"] = 2
        write_official(src, cfg, sd)
    elif kind == "rms_norm":
        cfg["rms_norm"] = False
        write_official(src, cfg, sd)
    elif kind == "mlp_dim":
        cfg["attn_cfg"]["mlp_dim"] = 64
        write_official(src, cfg, sd)
    elif kind == "not_causal":
        del cfg["attn_cfg"]["causal"]
        write_official(src, cfg, sd)
    elif kind == "unknown":
        cfg["ssm_cfg"]["is_fancy"] = True
        write_official(src, cfg, sd)
    elif kind == "missing_weight":
        del sd["backbone.layers.2.mlp.fc2.weight"]
        write_official(src, cfg, sd)
    return src


BAD = {
    "no_config": ("no config.json",),
    "mamba1": ("ssm_cfg.layer", "'Mamba1'"),
    "no_layer": ("ssm_cfg.layer", "'Mamba1'"),
    "shape": ("backbone.layers.0.mixer.B_bias", "(8, 2, 8)", "(8, 2, 16)"),
    "truncated_bin": ("pytorch_model.bin", "truncated"),
    "truncated_safetensors": ("model.safetensors", "truncated"),
    "ngroups": ("ssm_cfg.ngroups", "2"),
    "rms_norm": ("rms_norm", "False"),
    "mlp_dim": ("attn_cfg.mlp_dim", "64"),
    "not_causal": ("attn_cfg.causal", "False"),
    "unknown": ("ssm_cfg.is_fancy", "True"),
    "missing_weight": ("backbone.layers.2.mlp.fc2.weight",),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_official_checkpoints(tmp_path, kind):
    from hybridlab.arch.specio import SpecError

    src = _bad(tmp_path, kind)
    with pytest.raises(SpecError) as e:
        ms.import_checkpoint(src, tmp_path / "hl")
    msg = str(e.value)
    assert "\n" not in msg
    for n in BAD[kind]:
        assert n in msg, msg
    assert not (tmp_path / "hl").exists()  # nothing half-written


@pytest.mark.parametrize("kind", ["no_config", "mamba1", "truncated_bin"])
def test_cli_bad_import_one_line_exit2(tmp_path, cli, kind):
    src = _bad(tmp_path, kind)
    _one_line_exit2(cli("import", "mamba-ssm", str(src), "--out", str(tmp_path / "hl")), *BAD[kind])


NO_OFFICIAL_FORM = {
    "blocks.m3.a_activation=softplus": "blocks.m3.a_activation",
    "blocks.m3.a_bias=true": "blocks.m3.a_bias",
    "blocks.m3.trapezoid=false": "blocks.m3.trapezoid",
    "blocks.m3.bc_norm=false": "blocks.m3.bc_norm",
    "blocks.m3.rope=false": "blocks.m3.rope",
    "blocks.m3.rope_fraction=0.25": "blocks.m3.rope_fraction",
    "norm_eps=1.0e-6": "norm_eps",
    "blocks.mlp.hidden=200": "blocks.mlp.hidden",
}


def _changed_model_folder(tmp_path, override):
    from hybridlab.arch.pretrained import save_pretrained

    src = write_official(tmp_path / "o", HYBRID, official_state(HYBRID))
    hl = ms.import_checkpoint(src, tmp_path / "hl")
    spec = load_model_spec(str(hl), [override])
    torch.manual_seed(0)
    return save_pretrained(tmp_path / "changed", spec, model_state(HybridLM(spec)))


@pytest.mark.parametrize("override", sorted(NO_OFFICIAL_FORM))
def test_export_refuses_what_the_official_code_lacks(tmp_path, override):
    from hybridlab.arch.specio import SpecError

    folder = _changed_model_folder(tmp_path, override)
    with pytest.raises(SpecError) as e:
        ms.export_model_folder(folder, tmp_path / "x")
    msg = str(e.value)
    assert "\n" not in msg and NO_OFFICIAL_FORM[override] in msg and "no official mamba_ssm form" in msg, msg
    assert not (tmp_path / "x").exists()


def test_cli_export_refusal_one_line_exit2(tmp_path, cli):
    folder = _changed_model_folder(tmp_path, "blocks.m3.a_activation=softplus")
    _one_line_exit2(cli("export", "mamba-ssm", str(folder), "--out", str(tmp_path / "x")),
                    "blocks.m3.a_activation", "'softplus'", "no official mamba_ssm form")
    assert not (tmp_path / "x").exists()


# ============================================================================ decoding an imported model


@pytest.mark.parametrize("case", ["hybrid", "mimo"])
def test_generate_equals_official_greedy(tmp_path, case):
    """HybridLM.generate (prefill, then cached one-token steps) = greedy decoding by repeated official forwards."""
    config = CASES[case]
    sd = official_state(config, seed=7)
    dst = ms.import_checkpoint(write_official(tmp_path / "o", config, sd), tmp_path / "hl")
    model = load_pretrained(dst, dtype=torch.float64)
    prompt = _tokens(config["vocab_size"], b=1, l=7, seed=3)
    ids = prompt
    for _ in range(10):
        nxt = official_logits(config, sd, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(model.generate(prompt, 10), ids)


def test_cli_generate_uses_the_folders_tokenizer(tmp_path, cli):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello mamba"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.get_vocab_size() <= 300
    cfg = {**SISO, "vocab_size": 300}
    src = write_official(tmp_path / "o", cfg, official_state(cfg))
    tok.save(str(src / "tokenizer.json"))
    dst = ms.import_checkpoint(src, tmp_path / "hl")
    r = cli("generate", str(dst), "-p", "hello", "-n", "5", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert len(res["tokens"]) == 5 and res["completion"] == tok.decode(res["tokens"], skip_special_tokens=True)
    model = load_pretrained(dst)
    want = model.generate([tok.encode("hello").ids], 5)[0, -5:].tolist()
    assert res["tokens"] == want


def test_sharded_safetensors_with_an_index(tmp_path):
    from safetensors.torch import save_file

    config = MIMO
    sd = official_state(config, seed=2)
    src = tmp_path / "o"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    keys = sorted(sd)
    half = {"a": keys[: len(keys) // 2], "b": keys[len(keys) // 2:]}
    weight_map = {}
    for part, ks in half.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(src / f"model-{part}.safetensors"))
        weight_map.update({k: f"model-{part}.safetensors" for k in ks})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_pretrained(ms.import_checkpoint(src, tmp_path / "hl"), dtype=torch.float64)
    tokens = _tokens(config["vocab_size"], l=9)
    with torch.no_grad():
        assert ((model(tokens) - official_logits(config, sd, tokens)).abs().max()).item() < 1e-9
