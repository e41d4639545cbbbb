"""The official Mamba-3 (state-spaces/mamba, run from its source) against hybridlab on one GPU.

    bash scripts/device/pack_official_parity.sh            # here: .parity/ = the official source + a safetensors wheel
    # the GPU machine, from the repo root, carrying [".parity"] (and .cute for the CuTe checks, see shared/device):
    bash scripts/device/official_parity.sh                 # the wheel, the hybridlab shim, then this script

For a SISO, a MIMO (needs TileLang) and a hybrid (Mamba-3 + MHA + GatedMLP) official
``MambaLMHeadModel`` with random weights, saved with its own ``save_pretrained``:
``hybridlab import mamba-ssm``, then

* logits, fp32 and bf16: max |ours - official| / max |official| (targets 1e-4 against the official module
  on its fp32 reference ops, 1e-2 against the official kernels in bf16 — and 1e-2 for an fp32 model
  against the official kernels, which run bf16 inside: see below);
* greedy generation of 64 tokens: the official model by repeated full forwards, hybridlab by
  ``HybridLM.generate`` (prefill + cached decode): token-identical?

and hybridlab's own kernels for the new A activation at the bench shape (d_model 2048, b8 l2048,
n128, SISO and MIMO R=4): the fused Triton layer against the float64 torch layer, and the CuTe
decode step against the torch step. One line per check: PASS / FAIL / SKIP (with why).

Without TileLang the official MIMO layer cannot be built on its kernels; with the official tests/ beside
mamba_ssm/ (the pack carries them) the MIMO checks then run on the official references only.

Note on fp32: the official SISO path (``mamba3_siso_combined``) casts Q, K, V, the angles, the trapezoid
gate and Z to bf16 before its kernels and uses tanh/sin/cos approximations, so its "fp32" logits carry
bf16-level error. With the official repository's tests folder present (the pack carries it), the fp32
checks also run the official module with the official float32 references of its kernels
(``tests/ops/triton/test_mamba3_siso.py: mamba3_siso_fwd_ref``, ``tests/ops/tilelang/test_mamba3_mimo.py:
mamba3_MIMO_chunk_ref``) in their place: that is the 1e-4 comparison.

``--cpu-dry-run`` runs the model checks on a CPU against those references (official norms through their
own torch references too), to try the script without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS: list[dict] = []
DEV = "cuda"  # --cpu-dry-run: "cpu", the official module on its reference ops only (to try this script anywhere)


def report(name: str, status: str, detail: str, **data) -> None:
    RESULTS.append({"check": name, "status": status, "detail": detail, **data})
    print(f"{status:4s}  {name}: {detail}", flush=True)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def guarded(name: str):
    """Run a check; an exception is one ERROR line (with the last frames), not the end of the script."""
    def wrap(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # a failing check is a line of the report
                report(name, "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                traceback.print_exc(limit=4)
        return run
    return wrap


# ============================================================================ the official package, from source


def load_official(src: Path):
    """MambaConfig, MambaLMHeadModel and the mamba3 module, importing only what a Mamba-3 / MHA model needs.

    ``mamba_ssm/__init__.py`` imports Mamba-1's CUDA extension, and ``mixer_seq_simple`` imports Mamba-1/2,
    transformers' generation and the HF hub helpers: stand-ins for those (never used by these models).
    """
    from hybridlab.kernels.bench.ssm import use_official_source

    root = use_official_source(src)
    for name, attrs in (("mamba_ssm.modules.mamba_simple", {"Mamba": None}), ("mamba_ssm.modules.mamba2", {"Mamba2": None}),
                        ("mamba_ssm.utils.generation", {"GenerationMixin": type("GenerationMixin", (), {})}),
                        ("mamba_ssm.utils.hf", {"load_config_hf": None, "load_state_dict_hf": None})):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    import mamba_ssm.modules.mamba3 as m3
    import mamba_ssm.modules.mha as mha

    return MambaConfig, MambaLMHeadModel, m3, mha, root


def _test_module(root: Path, rel: str, name: str):
    f = root / "tests" / rel
    if not f.is_file():
        return None
    if importlib.util.find_spec("pytest") is None:  # the test modules import pytest; their references do not use it
        stub = types.ModuleType("pytest")
        stub.mark = types.SimpleNamespace(parametrize=lambda *a, **k: (lambda f: f), skipif=lambda *a, **k: (lambda f: f))
        stub.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        sys.modules["pytest"] = stub
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_siso_reference(root: Path):
    """The official float32 reference of the SISO kernel (``tests/ops/triton/test_mamba3_siso.py``), or None."""
    mod = _test_module(root, "ops/triton/test_mamba3_siso.py", "official_test_mamba3_siso")
    return mod.mamba3_siso_fwd_ref if mod is not None else None


def load_mimo_reference(root: Path):
    """The official float32 references of the MIMO kernels (``tests/ops/tilelang/test_mamba3_mimo.py``), or None."""
    mod = _test_module(root, "ops/tilelang/test_mamba3_mimo.py", "official_test_mamba3_mimo")
    return (mod.mamba3_MIMO_chunk_ref, mod.apply_angle_dt_reference) if mod is not None else None


def siso_adapter(ref):
    """``mamba3_siso_combined``'s signature over the official reference (float32 throughout)."""
    def siso(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
             return_final_states=False, cu_seqlens=None):
        assert not return_final_states and Input_States is None and cu_seqlens is None
        return ref(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, chunk_size=chunk_size, dtype=torch.float32)[0]
    return siso


def mimo_adapter(refs):
    """``mamba3_mimo_combined``'s signature over the official chunked reference (float32 throughout)."""
    chunk_ref, angle_dt = refs

    def mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
             rotary_dim_divisor, dtype, return_state=False, cu_seqlens=None, fuse_pregate_headwise_rms_norm=False,
             outproj_norm_weight=None, outproj_norm_eps=1e-5):
        assert not return_state and cu_seqlens is None
        B, H, S = ADT.shape
        pad = (-S) % chunk_size
        adt = torch.nn.functional.pad(ADT.float(), (0, pad))
        cs = torch.cumsum(adt.view(B, H, -1, chunk_size), dim=-1)
        rev = cs[..., -1:] - cs
        ang = angle_dt(Angles, DT.permute(0, 2, 1))
        out, _, _ = chunk_ref(Q, K, V, Q_bias, K_bias, MIMO_V, MIMO_Out, Z, MIMO_Z, ang,
                              cs.view(B, H, -1)[..., :S], rev.view(B, H, -1)[..., :S], DT, Trap, D,
                              chunk_size=chunk_size, rotary_dim_divisor=rotary_dim_divisor, dtype=torch.float32,
                              rotate_pairwise=False, contract_mimo_out=MIMO_Out is not None,
                              fused_norm=fuse_pregate_headwise_rms_norm, outproj_norm_weight=outproj_norm_weight,
                              outproj_norm_eps=outproj_norm_eps)
        return out
    return mimo


class OfficialReferences:
    """``with OfficialReferences(m3, siso=..., mimo=...):`` the official Mamba3 layer runs the official
    float32 references in place of its kernels (MIMO: also where TileLang is missing)."""

    def __init__(self, m3, siso=None, mimo=None):
        self.m3, self.new, self.saved = m3, {}, {}
        if siso is not None:
            self.new["mamba3_siso_combined"] = siso_adapter(siso)
        if mimo is not None:
            self.new["mamba3_mimo_combined"] = mimo_adapter(mimo)

    def __enter__(self):
        for k, v in self.new.items():
            self.saved[k] = getattr(self.m3, k)
            setattr(self.m3, k, v)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.m3, k, v)


def _cpu_norms() -> None:
    """--cpu-dry-run: the official norms through their own pure-torch references (their kernels are Triton)."""
    import mamba_ssm.ops.triton.layer_norm as ln
    import mamba_ssm.ops.triton.layernorm_gated as lg

    lg.rmsnorm_fn = lambda x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True: lg.rms_norm_ref(
        x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate, upcast=True)
    ln.rms_norm_fn = lambda x, weight, bias, residual=None, eps=1e-6, dropout_p=0.0, prenorm=False, residual_in_fp32=False, \
        **k: ln.rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)


# ============================================================================ models


def configs(flash_rotary: bool, quick: bool) -> dict:
    d, L = (512, 2) if quick else (768, 4)
    ssm = {"layer": "Mamba3", "d_state": 128, "headdim": 64, "expand": 2}
    return {
        "siso": {"d_model": d, "n_layer": L, "vocab_size": 1003, "ssm_cfg": {**ssm, "chunk_size": 64}},
        "mimo": {"d_model": d, "n_layer": L, "vocab_size": 1003,
                 "ssm_cfg": {**ssm, "is_mimo": True, "mimo_rank": 4, "chunk_size": 16}},
        "hybrid": {"d_model": d, "n_layer": L, "d_intermediate": 2 * d, "vocab_size": 1003, "attn_layer_idx": [1, L - 1],
                   "ssm_cfg": {**ssm, "is_outproj_norm": True, "chunk_size": 64},
                   "attn_cfg": {"num_heads": d // 64, "num_heads_kv": d // 128, "head_dim": 64, "causal": True,
                                "rotary_emb_dim": 64 if flash_rotary else 0}},
    }


def random_official(MambaConfig, Model, cfg: dict, seed: int):
    """An official model with every parameter moved off its init (fp32); a large embedding for peaked logits."""
    torch.manual_seed(seed)
    model = Model(MambaConfig(**cfg), device=DEV, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "backbone.embedding.weight":
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.add_(torch.randn_like(p) * p.std() * 0.5)
            elif name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.3)
            else:  # norms, biases, D, mimo projections
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def as_bf16(MambaConfig, Model, cfg: dict, fp32_model):
    """The same weights in the official bf16 model (its small parameters stay fp32, as the layer creates them)."""
    m = Model(MambaConfig(**cfg), device="cuda", dtype=torch.bfloat16)
    m.load_state_dict(fp32_model.state_dict())
    return m.eval()


def hybridlab_import(src: Path, dst: Path) -> str:
    """`hybridlab import mamba-ssm SRC --out DST` (the CLI when typer is here, else the same function)."""
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    if importlib.util.find_spec("typer") is not None:
        r = subprocess.run([sys.executable, "-m", "hybridlab.cli", "import", "mamba-ssm", str(src), "--out", str(dst)],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"hybridlab import exited {r.returncode}: {r.stderr.strip()[-400:]}")
        return "cli"
    from hybridlab.arch.interop.mamba_ssm import import_checkpoint

    import_checkpoint(src, dst)
    return "function (typer not installed here)"


# ============================================================================ model checks


def _greedy_official(model, prompt, n: int):
    ids, margins = prompt, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[:, -1].float()
            top = logits.topk(2, dim=-1).values
            margins.append((top[0, 0] - top[0, 1]).item())
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist(), margins


def _report_greedy(name: str, want, got, margins) -> None:
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    detail = f"{len(want)}/{len(want)} tokens identical" if first is None else (
        f"first difference at token {first} (official top-2 logit margin there {margins[first]:.3g}; "
        f"smallest margin over the run {min(margins):.3g})")
    report(name, "PASS" if first is None else "FAIL", detail, first_difference=first)


def model_checks(kind: str, cfg: dict, off, work: Path, refs: dict, quick: bool) -> None:
    """import; fp32 logits (official kernels / official reference ops); bf16 logits; greedy 64 tokens."""
    MambaConfig, Model, m3, _, _ = off
    from hybridlab.arch import load_pretrained

    mimo = cfg["ssm_cfg"].get("is_mimo", False)
    kernels = DEV == "cuda" and (not mimo or m3.mamba3_mimo_combined is not None)  # official MIMO kernels: TileLang
    ref_ops = OfficialReferences(m3, siso=refs.get("siso"), mimo=refs.get("mimo"))
    have_ref = refs.get("mimo" if mimo else "siso") is not None
    if not kernels and not have_ref:
        report(f"{kind} (all checks)", "SKIP", "the official MIMO kernels need TileLang (not importable) and the official "
                                               "tests/ (their reference) are not beside mamba_ssm/")
        return
    why_not = "no GPU (dry run)" if DEV != "cuda" else "TileLang is not importable"
    if not kernels:
        report(f"{kind} official kernels", "SKIP", f"{why_not}: the checks run the official module on its reference ops only")
    with ref_ops if not kernels else _nothing():  # Mamba3.__init__ asserts a MIMO kernel exists
        official = random_official(MambaConfig, Model, cfg, seed=SEEDS[kind])
    src, dst = work / f"{kind}-official", work / f"{kind}-hybridlab"
    official.save_pretrained(str(src))
    how = hybridlab_import(src, dst)
    report(f"{kind} import", "PASS", f"save_pretrained -> hybridlab import mamba-ssm ({how}) -> {dst.name}")
    g = torch.Generator(device=DEV).manual_seed(1)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 128 if quick else 256), device=DEV, generator=g)
    ours_t = load_pretrained(dst, device=DEV, backends={"ssm": "torch", "attention": "sdpa"})
    ours = load_pretrained(dst, device=DEV)
    with torch.no_grad():
        o_t, o_d = ours_t(tokens).float(), ours(tokens).float()
    ref32 = None
    if kernels:
        with torch.no_grad():
            ref32 = official(tokens).logits.float()
        e_t, e_d = rel_max(o_t, ref32), rel_max(o_d, ref32)
        # the official Mamba-3 kernels take Q, K, V, the angles, the gate and Z in bf16 even in an fp32 model:
        # against them an fp32 model can only agree to bf16 precision (the 1e-4 check is the reference-ops one)
        report(f"{kind} fp32 model vs official kernels (bf16 inside them: tolerance 1e-2)",
               "PASS" if max(e_t, e_d) < 1e-2 else "FAIL",
               f"max rel err {e_t:.2e} (hybridlab torch backends), {e_d:.2e} (default backends)",
               err_torch=e_t, err_default=e_d)
    if have_ref:
        with ref_ops, torch.no_grad():
            refr = official(tokens).logits.float()
        e_t, e_d = rel_max(o_t, refr), rel_max(o_d, refr)
        extra = f"; official kernels vs that reference: {rel_max(ref32, refr):.2e}" if ref32 is not None else ""
        report(f"{kind} fp32 logits vs official module on its fp32 reference ops", "PASS" if max(e_t, e_d) < 1e-4 else "FAIL",
               f"max rel err {e_t:.2e} (torch backends), {e_d:.2e} (default backends); target 1e-4{extra}", err=max(e_t, e_d))
    else:
        report(f"{kind} fp32 logits vs official reference ops", "SKIP", "the official tests/ are not beside mamba_ssm/")

    if kernels:  # bf16: the official bf16 model vs hybridlab's fp32 weights under bf16 autocast (residual fp32 in both)
        off16 = as_bf16(MambaConfig, Model, cfg, official)
        with torch.no_grad():
            ref16 = off16(tokens).logits.float()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o16 = ours(tokens).float()
        e16 = rel_max(o16, ref16)
        report(f"{kind} bf16 logits vs official kernels", "PASS" if e16 < 1e-2 else "FAIL",
               f"max rel err {e16:.2e} (target 1e-2); official bf16 vs official fp32: {rel_max(ref16, ref32):.2e}", err=e16)
        del off16
    else:
        report(f"{kind} bf16 logits", "SKIP", f"needs the official kernels ({why_not})")

    prompt = tokens[:1, :16]
    with torch.no_grad():
        got = ours.generate(prompt, 64)[0, 16:].tolist()
    if kernels:
        want, margins = _greedy_official(official, prompt, 64)
        _report_greedy(f"{kind} greedy 64 tokens, fp32 (official kernels, full forwards) vs HybridLM.generate", want, got, margins)
    if have_ref:
        with ref_ops:
            want, margins = _greedy_official(official, prompt, 64)
        _report_greedy(f"{kind} greedy 64 tokens, fp32 (official reference ops, full forwards) vs HybridLM.generate",
                       want, got, margins)
    del official, ours, ours_t
    if DEV == "cuda":
        torch.cuda.empty_cache()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


SEEDS = {"siso": 11, "mimo": 12, "hybrid": 13}


# ============================================================================ kernel checks at the bench shape


@guarded("coefficients")
def coefficient_checks() -> None:
    from hybridlab.kernels.ssm_io import scan_coefficients

    b, l, h = 8, 2048, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(b, l, 3 * h + 5, device="cuda", generator=g) * 2
    dtb, ab = torch.randn(h, device="cuda", generator=g), torch.randn(h, device="cuda", generator=g)
    valid = torch.rand(b, l, device="cuda", generator=g) > 0.1
    grads = [torch.randn(b, l, h, device="cuda", generator=g) for _ in range(4)]
    for act, with_bias in (("heavy_tail", False), ("softplus", True), ("heavy_tail", True)):
        res = {}
        for backend, dt in (("triton", torch.float32), ("torch", torch.float64)):
            P = proj.to(dt).requires_grad_()
            biases = [dtb.to(dt).requires_grad_()] + ([ab.to(dt).requires_grad_()] if with_bias else [])
            raw = [P[..., 5 + i * h: 5 + (i + 1) * h] for i in range(3)]
            out = scan_coefficients(raw[0], raw[1], raw[2], biases[0], biases[1] if with_bias else None, 1e-4, valid,
                                    activation=act, backend=backend)
            loss = sum((o.double() * gg.double()).sum() for o, gg in zip(out, grads))
            res[backend] = [*out, *torch.autograd.grad(loss, [P, *biases])]
        errs = [((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item() for a, r in zip(res["triton"], res["torch"])]
        report(f"scan_coefficients {act}{' + a_bias' if with_bias else ''} (b8 l2048 h64), triton vs float64",
               "PASS" if max(errs) < 1e-5 else "FAIL", f"worst rel err {max(errs):.2e} over dt, log α, β, γ and every gradient (target 1e-5)")


def _layer(mode: str, a_form: str, backend: str):
    from hybridlab.arch.layers.mamba3 import Mamba3
    from hybridlab.arch.spec import Mamba3Block

    a = {"a_activation": "heavy_tail", "a_bias": False} if a_form == "heavy_tail" else \
        {"a_activation": "softplus", "a_bias": True, "a_init_min": 1.0, "a_init_max": 16.0}
    blk = Mamba3Block(mode=mode, rank=4 if mode == "mimo" else 1, d_state=128, headdim=64, expand=2, **a)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Mamba3(2048, blk, backend=backend)


@guarded("layer")
def layer_checks(quick: bool) -> None:
    for mode in ("siso", "mimo"):
        b, l = (2, 1024) if quick else (8, 2048)
        try:
            _layer_check(mode, b, l)
        except torch.cuda.OutOfMemoryError:  # the float64 reference of the MIMO layer at b8 is large
            torch.cuda.empty_cache()
            report(f"Mamba-3 {mode} layer at b{b}", "SKIP", "out of memory for the float64 reference; retrying at b2")
            _layer_check(mode, 2, l)


def _layer_check(mode: str, b: int, l: int) -> None:
    """The fused Triton layer (fp32) against the torch layer in float64: output, input and parameter gradients."""
    ref = _layer(mode, "heavy_tail", "torch")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = _layer(mode, "heavy_tail", "auto")
    fused.load_state_dict(ref.state_dict())
    u = torch.randn(b, l, 2048, device="cuda")
    dy = torch.randn(b, l, 2048, device="cuda")
    res = {}
    for name, layer, dt in (("fused", fused, torch.float32), ("ref", ref.double(), torch.float64)):
        uu = u.to(dt).requires_grad_()
        y = layer(uu)
        (y.double() * dy.double()).sum().backward()
        res[name] = {"y": y.detach(), "du": uu.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        del y, uu
    errs = {k: ((res["fused"][k].double() - v).norm() / v.norm().clamp_min(1e-30)).item() for k, v in res["ref"].items()}
    worst = max(errs, key=errs.get)
    report(f"Mamba-3 {mode}{' R=4' if mode == 'mimo' else ''} layer, heavy-tail A (d_model 2048, b{b} l{l}, n128): "
           f"fused Triton fp32 vs torch float64", "PASS" if errs[worst] < 1e-4 else "FAIL",
           f"output {errs['y']:.2e}, worst of every gradient {errs[worst]:.2e} ({worst}); target 1e-4")
    del ref, fused, res
    torch.cuda.empty_cache()


@guarded("cute step")
def cute_checks() -> None:
    from hybridlab.kernels.ssm_scan.cute import cute_available

    if not cute_available():
        report("CuTe decode step", "SKIP", "nvidia-cutlass-dsl not importable (carry .cute, see shared/device/README.md)")
        return
    for mode in ("siso", "mimo"):
        for a_form in ("heavy_tail", "softplus+bias"):
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
                fused = _layer(mode, a_form, "cute").to(dtype)
                ref = _layer(mode, a_form, "torch").to(dtype)
                ref.load_state_dict(fused.state_dict())
                cf, cr = fused.allocate_cache(16, 0, "cuda", dtype), ref.allocate_cache(16, 0, "cuda", dtype)
                worst = 0.0
                with torch.no_grad():
                    for _ in range(32):
                        u = torch.randn(16, 1, 2048, device="cuda").to(dtype)
                        assert fused.fused_step_ok(u, cf)
                        yf, yr = fused(u, cf).float(), ref(u, cr).float()
                        worst = max(worst, ((yf - yr).norm() / yr.norm()).item())
                report(f"CuTe step {mode}{' R=4' if mode == 'mimo' else ''} {a_form} {str(dtype)[6:]} (d_model 2048, n128, b16, 32 steps) "
                       f"vs torch step", "PASS" if worst < tol else "FAIL", f"worst rel err {worst:.2e} (target {tol:g})")
                del fused, ref
                torch.cuda.empty_cache()


# ============================================================================ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mamba-src", default=os.environ.get("MAMBA_SSM_SRC", str(ROOT / ".parity" / "src")),
                    help="folder holding the official mamba_ssm/ package (and optionally its tests/); $MAMBA_SSM_SRC")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for official_parity.json")
    ap.add_argument("--quick", action="store_true", help="smaller models and shapes")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no GPU: the model checks on the CPU against the official reference ops only (tries the script)")
    args = ap.parse_args(argv)
    global DEV
    if args.cpu_dry_run:
        DEV, args.skip_kernels = "cpu", True
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-dry-run)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    where = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (dry run)"
    print(f"torch {torch.__version__}, {where}, official source {args.mamba_src}", flush=True)
    if not args.skip_models:
        try:
            off = load_official(Path(args.mamba_src))
        except Exception as e:
            report("official package", "FAIL", f"cannot import mamba_ssm from {args.mamba_src}: {type(e).__name__}: {e}")
            off = None
        if off is not None:
            _, _, m3, mha, root = off
            refs = {}
            for key, loader in (("siso", load_siso_reference), ("mimo", load_mimo_reference)):
                try:
                    refs[key] = loader(root)
                except Exception as e:
                    report(f"official {key} reference", "SKIP", f"cannot load it from {root}/tests: {type(e).__name__}: {e}")
            if DEV == "cpu":
                _cpu_norms()
            flash_rotary = getattr(mha, "RotaryEmbedding", None) is not None
            if not flash_rotary:
                report("hybrid MHA rotary", "SKIP", "flash_attn's RotaryEmbedding is not importable: the hybrid's MHA uses rotary_emb_dim 0")
            with tempfile.TemporaryDirectory() as d:
                for kind, cfg in configs(flash_rotary, args.quick).items():
                    if DEV == "cpu":
                        cfg["fused_add_norm"] = False  # the fused add+norm is a Triton kernel
                    guarded(kind)(model_checks)(kind, cfg, off, Path(d), refs, args.quick)
    if not args.skip_kernels:
        coefficient_checks()
        layer_checks(args.quick)
        cute_checks()
    out = Path(args.out) / "official_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1))
    bad = [r for r in RESULTS if r["status"] == "FAIL"]
    print(f"== {len(RESULTS)} checks: {sum(r['status'] == 'PASS' for r in RESULTS)} PASS, {len(bad)} FAIL, "
          f"{sum(r['status'] == 'SKIP' for r in RESULTS)} SKIP in {time.time() - t0:.0f} s; {out}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
