"""Benchmark + bench-shape correctness of the ssm_scan backends (issue 6).

    python -m hybridlab.kernels.bench.ssm [--out DIR] [--quick] [--no-check]

Times (``triton.testing.do_bench`` medians, bf16) forward and forward+backward of
the ``triton`` backend (SISO and MIMO R=4, same heads/d_state), the torch
reference, the scan with the q/k/v preparation fused in (``ssm_scan_fused``,
against the chain qk_prep -> rank_expand -> ssm_scan it replaces, with peak
memory), causal attention of the same width through SDPA (16 heads x 128), and
the peers that import (flash-attn-4's ``flash_attn.cute``, fla-core's gated
DeltaNet); checks the kernels against the torch reference at the same shapes;
writes ``ssm_bench.json`` and ``ssm_bench.md`` (ratios vs the official figures
of ../shared/STACK.md) into the output folder. ``run_ssm_bench`` is the entry
point that ``hybridlab bench ssm`` calls.

``run_layer_bench(make_layer)`` times whole Mamba-3 layers (in_proj -> scan ->
out_proj) fwd and fwd+bwd with peak memory, eager and ``torch.compile``d, next to
the official ``mamba_ssm`` Mamba3 layer when it imports. It takes the layer
factory as an argument (kernels imports nothing of hybridlab's model code):
``hybridlab bench ssm --layers`` and ``scripts/bench_mamba3_layer.py`` pass
``hybridlab.arch.bench_layer``; ``python -m hybridlab.kernels.bench.ssm`` alone
runs the kernel rows only.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import traceback
import types
from pathlib import Path

import torch

try:  # installed package, or run from the repo root without installing
    from hybridlab.kernels import ssm_scan, ssm_scan_fused
    from hybridlab.kernels.bench.options import SsmBench, int_list, parse
    from hybridlab.kernels.ssm_io import gated_output, qk_prep, rank_expand
except ImportError:  # pragma: no cover - device fallback: map ./kernels to hybridlab.kernels
    import importlib.util

    _root = Path(__file__).resolve().parents[2]
    _pkg = types.ModuleType("hybridlab")
    _pkg.__path__ = [str(_root / "platform" / "hybridlab")]
    sys.modules.setdefault("hybridlab", _pkg)
    _spec = importlib.util.spec_from_file_location(
        "hybridlab.kernels", _root / "kernels" / "__init__.py", submodule_search_locations=[str(_root / "kernels")]
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["hybridlab.kernels"] = _mod
    _spec.loader.exec_module(_mod)
    from hybridlab.kernels import ssm_scan, ssm_scan_fused
    from hybridlab.kernels.bench.options import SsmBench, int_list, parse
    from hybridlab.kernels.ssm_io import gated_output, qk_prep, rank_expand

# (b, l, h, p, n)
DEFAULT_SHAPES = [(8, 2048, 32, 64, 128), (4, 8192, 32, 64, 128), (8, 2048, 32, 64, 64)]
RANKS = int_list(SsmBench.ranks)

# Official figures, H100 bf16 medians (../shared/STACK.md, measured 2026-11-22).
OFFICIAL = {
    "mamba3_siso": {(8, 2048, 128): (0.641, 3.135), (4, 8192, 128): (1.858, 6.863), (8, 2048, 64): (0.745, 2.600)},
    "mamba2_ssd": {(8, 2048, 128): (0.579, 5.349), (8, 2048, 64): (0.952, 4.939)},
    "fla_gdn": {(8, 2048, 128): (0.795, None), (4, 8192, 128): (1.583, None)},
    "fa4": {(8, 2048): (0.266, 1.281), (4, 8192): (1.789, 6.872)},
    "sdpa": {(8, 2048): (0.279, 1.408), (4, 8192): (1.920, 7.867)},
}


def shape_name(s):
    b, l, h, p, n = s
    return f"b{b} l{l} h{h} p{p} n{n}"


def make_scan_inputs(b, l, h, r, n, p, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = (torch.randn(b, l, h, r, n, device=device, generator=g) * n**-0.5).to(dtype)
    k = (torch.randn(b, l, h, r, n, device=device, generator=g) * n**-0.5).to(dtype)
    v = torch.randn(b, l, h, r, p, device=device, generator=g).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device=device, generator=g) - 1.0)
    A = -torch.rand(h, device=device, generator=g) * 2 - 0.1
    lam = torch.sigmoid(torch.randn(b, l, h, device=device, generator=g))
    la = A * dt
    beta = (1 - lam) * dt * la.exp()
    gamma = lam * dt
    return q, k, v, la, beta, gamma


def _bench(fn, grad_to_none=None):
    import triton.testing

    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_scan(shape, r, dtype=torch.bfloat16, seed=1):
    """Kernel vs torch reference (fp32 math) at one shape: rel errors of y, h and all grads."""
    b, l, h, p, n = shape
    ins = make_scan_inputs(b, l, h, r, n, p, dtype=dtype, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    dy = torch.randn(b, l, h, r, p, device="cuda", generator=g)
    dh = torch.randn(b, h, p, n, device="cuda", generator=g)
    names = ["dq", "dk", "dv", "dla", "dbeta", "dgamma"]

    def run(backend, leaves, **kw):
        y, s = ssm_scan(*leaves, backend=backend, **kw)
        ((y.float() * dy).sum() + (s.h * dh).sum()).backward()
        out = {"y": y.detach(), "h": s.h.detach()}
        out.update({nm: t.grad for nm, t in zip(names, leaves)})
        return out

    leaves = [t.clone().requires_grad_() for t in ins]
    got = run("triton", leaves)
    ref_leaves = [t.detach().float().requires_grad_() for t in ins]
    ref = run("torch_chunked", ref_leaves, chunk_size=max(32 // r, 4))
    errs = {k: _rel(got[k], ref[k]) for k in got}
    finite = all(bool(torch.isfinite(t).all()) for t in got.values())
    del leaves, ref_leaves, got, ref
    torch.cuda.empty_cache()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    return {
        "kind": "check", "shape": shape_name(shape), "rank": r, "dtype": str(dtype).replace("torch.", ""),
        "errors": errs, "max_err": max(errs.values()), "tol": tol, "ok": finite and max(errs.values()) < tol,
    }


def time_scan(shape, r, backend, dtype=torch.bfloat16):
    b, l, h, p, n = shape
    ins = make_scan_inputs(b, l, h, r, n, p, dtype=dtype)
    row = {"kind": "time", "op": "ssm_scan", "impl": backend, "shape": shape_name(shape), "rank": r, "dtype": "bf16"}
    kw = {"chunk_size": max(16 // r, 4)} if backend == "torch_chunked" and r > 1 else {}
    try:
        with torch.no_grad():
            row["fwd_ms"] = _bench(lambda: ssm_scan(*ins, backend=backend, **kw))
        leaves = [t.clone().requires_grad_() for t in ins]
        dy = torch.randn_like(ins[2])

        def fb():
            y, _ = ssm_scan(*leaves, backend=backend, **kw)
            y.backward(dy)

        row["fwdbwd_ms"] = _bench(fb, grad_to_none=leaves)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - a peer failing must not stop the bench
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        torch.cuda.empty_cache()
    # bytes: q, k, v read, y written (the forward's HBM floor)
    row["fwd_bytes"] = b * l * h * r * (2 * n + 2 * p) * 2
    if "fwd_ms" in row:
        row["fwd_TBps"] = row["fwd_bytes"] / row["fwd_ms"] * 1e-9
    return row


def time_io(shape, r, backend, dtype=torch.bfloat16):
    """The scan's pre/post stages (ssm_io) as the layer runs them: q/k prep (norm + bias + rotary, A = n/4
    angles) and the gated output (D, pre-gate norm, gate, rank combination); fwd and fwd+bwd, plus the
    bytes each keeps for backward."""
    b, l, h, p, n = shape
    dev = "cuda"
    mimo = r > 1
    row = {"kind": "time", "op": "ssm_io", "impl": backend, "shape": shape_name(shape), "rank": r, "dtype": str(dtype).split(".")[-1]}
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale)  # noqa: E731
    bc = rnd(b, l, 2 * r * n).to(dtype).requires_grad_()
    phase = rnd(b, l, h, n // 4, scale=3.0).requires_grad_()
    norms = [(rnd(n).abs() + 0.5).requires_grad_() for _ in range(2)]
    biases = [rnd(h, r, n).requires_grad_() for _ in range(2)]
    y = rnd(b, l, h, r, p).to(dtype).requires_grad_()
    xz = rnd(b, l, 2 * h * p).to(dtype).requires_grad_()
    D, nw = rnd(h).requires_grad_(), (rnd(h, p).abs() + 0.5).requires_grad_()
    ms = [rnd(h, r, p).requires_grad_() if mimo else None for _ in range(3)]

    def qk():
        return qk_prep(bc[..., : r * n].view(b, l, r, n), bc[..., r * n :].view(b, l, r, n), phase, *norms, *biases, h, 1e-5, backend=backend)

    def out():
        return gated_output(y, xz[..., : h * p], xz[..., h * p :], D, nw, *ms, 1e-5, backend=backend)

    leaves = [t for t in (bc, phase, *norms, *biases, y, xz, D, nw, *ms) if t is not None]
    try:
        with torch.no_grad():
            row["qk_fwd_ms"] = _bench(qk)
            row["out_fwd_ms"] = _bench(out)
        dq, dk = rnd(b, l, h, r, n).to(dtype), rnd(b, l, h, r, n).to(dtype)
        do = rnd(b, l, h, p).to(dtype)
        row["qk_fwdbwd_ms"] = _bench(lambda: torch.autograd.backward(qk(), (dq, dk)), grad_to_none=leaves)
        row["out_fwdbwd_ms"] = _bench(lambda: out().backward(do), grad_to_none=leaves)
        for name, fn in (("qk", qk), ("out", out)):  # what the forward keeps alive for backward, outputs excluded
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            res = fn()
            res = res if isinstance(res, tuple) else (res,)
            row[f"{name}_saved_MB"] = (torch.cuda.memory_allocated() - before - sum(t.numel() * t.element_size() for t in res)) / 1e6
            del res
        row["fwd_ms"], row["fwdbwd_ms"] = row["qk_fwd_ms"] + row["out_fwd_ms"], row["qk_fwdbwd_ms"] + row["out_fwdbwd_ms"]
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def time_sdpa(b, l, heads=16, d=128):
    import torch.nn.functional as F

    q, k, v = (torch.randn(b, heads, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    row = {"kind": "time", "op": "attention", "impl": "sdpa", "shape": f"b{b} l{l} h{heads} d{d}", "rank": None, "dtype": "bf16"}
    with torch.no_grad():
        row["fwd_ms"] = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    row["fwdbwd_ms"] = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do), grad_to_none=[q, k, v])
    return row


def time_fa4(b, l, heads=16, d=128):
    row = {"kind": "time", "op": "attention", "impl": "flash-attn-4", "shape": f"b{b} l{l} h{heads} d{d}", "rank": None, "dtype": "bf16"}
    try:
        from flash_attn.cute import flash_attn_func  # type: ignore
    except Exception as e:  # noqa: BLE001
        row["error"] = f"not importable: {type(e).__name__}"
        return row
    q, k, v = (torch.randn(b, l, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def out(x):
        return x[0] if isinstance(x, tuple) else x

    try:
        with torch.no_grad():
            row["fwd_ms"] = _bench(lambda: flash_attn_func(q, k, v, causal=True))
        row["fwdbwd_ms"] = _bench(lambda: out(flash_attn_func(q, k, v, causal=True)).backward(do), grad_to_none=[q, k, v])
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def time_fla_gdn(b, l, h=32, dk=128, dv=64):
    row = {"kind": "time", "op": "gated_deltanet", "impl": "fla-core", "shape": f"b{b} l{l} h{h} p{dv} n{dk}", "rank": None, "dtype": "bf16"}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # type: ignore
    except Exception as e:  # noqa: BLE001
        row["error"] = f"not importable: {type(e).__name__}"
        return row
    try:
        q = torch.nn.functional.normalize(torch.randn(b, l, h, dk, device="cuda"), dim=-1).bfloat16().requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(b, l, h, dk, device="cuda"), dim=-1).bfloat16().requires_grad_()
        v = torch.randn(b, l, h, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gl = torch.nn.functional.logsigmoid(torch.randn(b, l, h, device="cuda")).requires_grad_()
        be = torch.rand(b, l, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
        do = torch.randn_like(v)
        with torch.no_grad():
            row["fwd_ms"] = _bench(lambda: chunk_gated_delta_rule(q, k, v, gl, be))
        row["fwdbwd_ms"] = _bench(lambda: chunk_gated_delta_rule(q, k, v, gl, be)[0].backward(do), grad_to_none=[q, k, v, gl, be])
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def make_fused_inputs(b, l, h, r, n, p, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=False):
    """What the layer hands the fused scan: B, C and x as views of projections, the phase (A = n/4 angles),
    B/C norms and biases, W_x (MIMO), and the scan's scalars."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, device=device, generator=g) * scale  # noqa: E731
    bc = rnd(b, l, 2 * r * n).to(dtype)
    xz = rnd(b, l, 2 * h * p).to(dtype)
    leaves = dict(bc=bc, xz=xz, phase=rnd(b, l, h, n // 4, scale=3.0), b_norm=rnd(n).abs() + 0.5, c_norm=rnd(n).abs() + 0.5,
                  b_bias=rnd(h, r, n), c_bias=rnd(h, r, n), mimo_x=rnd(h, r, p) if r > 1 else None)
    dt = torch.nn.functional.softplus(rnd(b, l, h) - 1.0)
    la = -(torch.rand(h, device=device, generator=g) * 2 + 0.1) * dt
    lam = torch.sigmoid(rnd(b, l, h))
    leaves.update(la=la, beta=(1 - lam) * dt * la.exp(), gamma=lam * dt)
    if requires_grad:
        for t in leaves.values():
            if t is not None:
                t.requires_grad_()
    return leaves


def _fused_args(lv, b, l, h, r, n, p):
    B, C = lv["bc"][..., : r * n].view(b, l, r, n), lv["bc"][..., r * n :].view(b, l, r, n)
    x = lv["xz"][..., : h * p].view(b, l, h, p)
    return B, C, x


def _run_fused(lv, shape, r, impl, scan_backend="triton"):
    b, l, h, p, n = shape
    B, C, x = _fused_args(lv, b, l, h, r, n, p)
    if impl == "fused":
        return ssm_scan_fused(B, C, lv["phase"], lv["b_norm"], lv["c_norm"], lv["b_bias"], lv["c_bias"], x, lv["mimo_x"],
                              lv["la"], lv["beta"], lv["gamma"], eps=1e-5, backend="triton" if scan_backend == "triton" else "torch",
                              last_kv=False)
    # the unfused chain the fused op replaces (each stage its own Triton kernel)
    io = "triton" if scan_backend == "triton" else "torch"
    q, k = qk_prep(B, C, lv["phase"], lv["b_norm"], lv["c_norm"], lv["b_bias"], lv["c_bias"], h, 1e-5, backend=io)
    v = rank_expand(x, lv["mimo_x"], backend=io) if r > 1 else x[:, :, :, None].contiguous()
    return ssm_scan(q, k, v, lv["la"], lv["beta"], lv["gamma"], backend=scan_backend)


def _peak_mb(fn):
    """Peak memory above what was allocated before ``fn`` (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_fused(shape, r, impl, dtype=torch.bfloat16):
    """``impl`` "fused" (ssm_scan_fused, Triton) or "chain" (qk_prep -> rank_expand -> ssm_scan, each Triton):
    fwd, fwd+bwd and the fwd+bwd's peak memory."""
    b, l, h, p, n = shape
    name = "ssm_scan_fused" if impl == "fused" else "qk_prep+rank_expand+ssm_scan"
    row = {"kind": "time", "op": name, "impl": "triton", "shape": shape_name(shape), "rank": r, "dtype": str(dtype).split(".")[-1]}
    lv = make_fused_inputs(b, l, h, r, n, p, dtype=dtype, requires_grad=True)
    dy = torch.randn(b, l, h, r, p, device="cuda", dtype=dtype)

    def fb():
        y, _ = _run_fused(lv, shape, r, impl)
        y.backward(dy)

    return _time_fwd_bwd(row, lambda: _run_fused(lv, shape, r, impl), fb, [t for t in lv.values() if t is not None])


def _time_fwd_bwd(row, fwd, fwd_bwd, leaves):
    """Fill ``row`` with fwd / fwd+bwd medians (ms) and the fwd+bwd's peak memory (MB); a failure becomes
    its ``error`` (one failing impl must not stop the bench)."""
    try:
        with torch.no_grad():
            row["fwd_ms"] = _bench(fwd)
        row["fwdbwd_ms"] = _bench(fwd_bwd, grad_to_none=leaves)
        for t in leaves:
            t.grad = None
        row["fwdbwd_peak_MB"] = _peak_mb(fwd_bwd)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        torch.cuda.empty_cache()
    return row


def check_fused(shape, r, dtype=torch.bfloat16, seed=1):
    """ssm_scan_fused (Triton) vs the torch reference chain (fp32 math) at one shape: rel errors of y, h and
    every gradient."""
    b, l, h, p, n = shape
    lv = make_fused_inputs(b, l, h, r, n, p, dtype=dtype, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    dy = torch.randn(b, l, h, r, p, device="cuda", generator=g)
    dh = torch.randn(b, h, p, n, device="cuda", generator=g)

    def run(leaves, scan_backend):
        ls = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in leaves.items()}
        y, s = _run_fused(ls, shape, r, "fused", scan_backend=scan_backend)
        ((y.float() * dy).sum() + (s.h * dh).sum()).backward()
        return {"y": y.detach(), "h": s.h.detach(), **{"d" + k: v.grad for k, v in ls.items() if v is not None}}

    got = run(lv, "triton")
    ref = run({k: (v.float() if v is not None else None) for k, v in lv.items()}, "torch")
    errs = {k: _rel(got[k], ref[k]) for k in got}
    finite = all(bool(torch.isfinite(t).all()) for t in got.values())
    del got, ref
    torch.cuda.empty_cache()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    return {"kind": "check", "op": "ssm_scan_fused", "shape": shape_name(shape), "rank": r, "dtype": str(dtype).replace("torch.", ""),
            "errors": errs, "max_err": max(errs.values()), "tol": tol, "ok": finite and max(errs.values()) < tol}


# ------------------------------------------------------------------ whole Mamba-3 layers


def use_official_source(src) -> Path:
    """Import ``mamba_ssm`` from the official source tree ``src`` (holding mamba_ssm/, or that folder itself)
    as a bare namespace package: its ``__init__`` imports Mamba-1's CUDA extension, which a Mamba-3 layer does
    not need. Returns the tree's root."""
    src = Path(src)
    root = src if (src / "mamba_ssm").is_dir() else src.parent
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(root / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    return root


def official_layer(d_model, mode, rank, d_state, dtype=torch.bfloat16):
    """The official ``mamba_ssm`` Mamba3 layer at these sizes (raises ImportError when it does not import)."""
    from mamba_ssm.modules.mamba3 import Mamba3 as OfficialMamba3  # type: ignore

    r = rank if mode == "mimo" else 1
    return OfficialMamba3(d_model=d_model, d_state=d_state, headdim=64, expand=2, is_mimo=mode == "mimo", mimo_rank=r,
                          chunk_size=64 // r, device="cuda", dtype=dtype)


def time_layer(name, layer, u, compile_it=False):
    """fwd and fwd+bwd medians (ms) and the fwd+bwd's peak memory (MB) of ``layer`` on ``u``; compiled with
    ``torch.compile`` first when asked (its compile time reported)."""
    row = {"kind": "layer", "impl": name, "compiled": compile_it}
    fn = layer
    if compile_it:
        fn = torch.compile(layer)
        try:
            t0 = _dt.datetime.now()
            fn(u).sum().backward()  # compile forward and backward
            torch.cuda.synchronize()
            row["compile_s"] = (_dt.datetime.now() - t0).total_seconds()
        except Exception as e:  # noqa: BLE001 - a failing compile is a result, not the end of the bench
            row["error"] = f"compile: {type(e).__name__}: {e}"[:300]
            return row
    uu = u.detach().clone().requires_grad_()
    dy = torch.randn_like(u)
    return _time_fwd_bwd(row, lambda: fn(u), lambda: fn(uu).backward(dy), [uu, *(p for p in layer.parameters() if p.requires_grad)])


def run_layer_bench(make_layer, out_dir="bench_out", d_model=2048, batch=8, seqlen=2048, d_states=(128, 64), ranks=(1, 4),
                    compile_too=True, official=True, dtype=torch.bfloat16, log=print) -> list[dict]:
    """Whole Mamba-3 layers fwd / fwd+bwd (ms) and peak memory: ours (``make_layer(d_model, mode, rank, d_state)``
    -> a CUDA module in ``dtype``) eager and compiled, and the official layer when it imports. Writes
    layer_bench.json / layer_bench.md (ratios: ours / official, MIMO / our SISO)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the layer bench needs a CUDA GPU")
    device, date = torch.cuda.get_device_name(), _dt.date.today().isoformat()
    rows = []
    for n in d_states:
        for r in ranks:
            mode = "mimo" if r > 1 else "siso"
            shape = f"d{d_model} b{batch} l{seqlen} n{n}"
            u = torch.randn(batch, seqlen, d_model, device="cuda", dtype=dtype)
            impls = [("hybridlab", False)] + ([("hybridlab", True)] if compile_too else [])
            for name, comp in impls:
                layer = make_layer(d_model, mode, r, n)
                row = time_layer(name, layer, u, compile_it=comp)
                row.update(shape=shape, mode=mode, rank=r, device=device, date=date, dtype=str(dtype).split(".")[-1])
                rows.append(row)
                log(json.dumps(row, default=str))
                del layer
            if official:
                row = {"kind": "layer", "impl": "official mamba_ssm", "compiled": False, "shape": shape, "mode": mode,
                       "rank": r, "device": device, "date": date, "dtype": str(dtype).split(".")[-1]}
                try:
                    layer = official_layer(d_model, mode, r, n, dtype)
                except Exception as e:  # noqa: BLE001 - absent or broken: say so and go on
                    row["error"] = f"official mamba_ssm Mamba3 not importable here: {type(e).__name__}: {e}"[:300]
                else:
                    row.update({k: v for k, v in time_layer("official mamba_ssm", layer, u).items() if k not in row})
                    del layer
                rows.append(row)
                log(json.dumps(row, default=str))
            del u
            torch.cuda.empty_cache()
    _layer_ratios(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_bench.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "layer_bench.md").write_text(layer_markdown(rows, device, date))
    return rows


def _layer_ratios(rows):
    key = lambda r: (r["shape"], r["rank"])  # noqa: E731
    official = {key(r): r for r in rows if r["impl"].startswith("official") and "fwdbwd_ms" in r}
    siso = {(r["shape"], r["compiled"]): r for r in rows if r["impl"] == "hybridlab" and r["rank"] == 1 and "fwdbwd_ms" in r}
    for r in rows:
        if r["impl"] != "hybridlab" or "fwdbwd_ms" not in r:
            continue
        off = official.get(key(r))
        if off:
            r["fwdbwd_vs_official"] = r["fwdbwd_ms"] / off["fwdbwd_ms"]
            r["fwd_vs_official"] = r["fwd_ms"] / off["fwd_ms"]
        base = siso.get((r["shape"], r["compiled"]))
        if base and r["rank"] != 1:
            r["fwdbwd_vs_our_siso"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]


def layer_markdown(rows, device, date):
    out = [f"Device: {device}; date {date}; whole Mamba-3 layer (in_proj -> scan -> out_proj), 64 heads x 64, no output "
           "norm (the official layer's defaults); `triton.testing.do_bench` medians (ms).", "",
           "| layer | shape | R | compiled | fwd ms | fwd+bwd ms | peak MB (fwd+bwd) | fwd+bwd ÷ official | ÷ our SISO | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        note = r.get("error", "")
        if "compile_s" in r:
            note = (note + f" compile {r['compile_s']:.1f} s").strip()
        out.append(f"| {r['impl']} | {r['shape']} | {r['rank']} | {'yes' if r['compiled'] else 'no'} | {_fmt(r.get('fwd_ms'))} "
                   f"| {_fmt(r.get('fwdbwd_ms'))} | {_fmt(r.get('fwdbwd_peak_MB'), 0)} | {_fmt(r.get('fwdbwd_vs_official'), 2)} "
                   f"| {_fmt(r.get('fwdbwd_vs_our_siso'), 2)} | {note} |")
    return "\n".join(out) + "\n"


def _add_ratios(rows):
    ours = {(r["shape"], r["rank"]): r for r in rows if r.get("op") == "ssm_scan" and r.get("impl") == "triton"}
    for r in rows:
        if r.get("kind") != "time":
            continue
        if r["op"] == "ssm_scan":
            b, l, h, p, n = (int(x[1:]) for x in r["shape"].split())
            off = OFFICIAL["mamba3_siso"].get((b, l, n))
            if off:
                r["official_siso_fwd_ms"], r["official_siso_fwdbwd_ms"] = off
                for key, o in (("fwd_ms", off[0]), ("fwdbwd_ms", off[1])):
                    if key in r:
                        r[f"ratio_{key[:-3]}_vs_official_siso"] = r[key] / o
            siso = ours.get((r["shape"], 1))
            if siso and r["rank"] != 1 and r.get("impl") == "triton":
                for key in ("fwd_ms", "fwdbwd_ms"):
                    if key in r and key in siso:
                        r[f"ratio_{key[:-3]}_vs_our_siso"] = r[key] / siso[key]
        elif r["op"] == "ssm_scan_fused":
            chain = next((c for c in rows if c.get("op") == "qk_prep+rank_expand+ssm_scan" and c["shape"] == r["shape"]
                          and c["rank"] == r["rank"] and "fwdbwd_ms" in c), None)
            siso = next((c for c in rows if c.get("op") == "ssm_scan_fused" and c["shape"] == r["shape"] and c["rank"] == 1
                         and "fwdbwd_ms" in c), None)
            if chain and "fwdbwd_ms" in r:
                r["fwd_vs_chain"], r["fwdbwd_vs_chain"] = r["fwd_ms"] / chain["fwd_ms"], r["fwdbwd_ms"] / chain["fwdbwd_ms"]
            if siso and r["rank"] != 1 and "fwdbwd_ms" in r:
                r["ratio_fwd_vs_our_siso"], r["ratio_fwdbwd_vs_our_siso"] = r["fwd_ms"] / siso["fwd_ms"], r["fwdbwd_ms"] / siso["fwdbwd_ms"]
        elif r["op"] == "attention":
            b, l = (int(x[1:]) for x in r["shape"].split()[:2])
            off = OFFICIAL["fa4" if r["impl"] == "flash-attn-4" else "sdpa"].get((b, l))
            if off:
                for key, o in (("fwd_ms", off[0]), ("fwdbwd_ms", off[1])):
                    if key in r and o:
                        r[f"ratio_{key[:-3]}_vs_official"] = r[key] / o
    return rows


def _fmt(x, nd=3):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(rows, device, date):
    out = [f"Device: {device}; date {date}; bf16; `triton.testing.do_bench` medians (ms).", ""]
    out += ["| op | impl | shape | R | fwd ms | fwd+bwd ms | fwd ÷ official SISO | fwd+bwd ÷ official SISO | ÷ our SISO (fwd / fwd+bwd) | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("kind") != "time":
            continue
        vs_off_f = r.get("ratio_fwd_vs_official_siso", r.get("ratio_fwd_vs_official"))
        vs_off_b = r.get("ratio_fwdbwd_vs_official_siso", r.get("ratio_fwdbwd_vs_official"))
        siso = ""
        if "ratio_fwd_vs_our_siso" in r:
            siso = f"{r['ratio_fwd_vs_our_siso']:.2f} / {_fmt(r.get('ratio_fwdbwd_vs_our_siso'), 2)}"
        note = r.get("error", "")
        if r["op"] == "ssm_io" and "qk_fwd_ms" in r:
            note = (note + f" q/k {r['qk_fwd_ms']:.3f} / {r['qk_fwdbwd_ms']:.3f}, out {r['out_fwd_ms']:.3f} / {r['out_fwdbwd_ms']:.3f};"
                    f" saved for bwd {r['qk_saved_MB']:.0f} + {r['out_saved_MB']:.0f} MB").strip()
        if "fwd_TBps" in r:
            note = (note + f" fwd {r['fwd_TBps']:.2f} TB/s (q,k,v,y bytes)").strip()
        if "fwdbwd_peak_MB" in r:
            note = (note + f" peak {r['fwdbwd_peak_MB']:.0f} MB (fwd+bwd)").strip()
        if "fwdbwd_vs_chain" in r:
            note = (note + f"; ÷ unfused chain {r['fwd_vs_chain']:.2f} / {r['fwdbwd_vs_chain']:.2f}").strip()
        out.append(
            f"| {r['op']} | {r['impl']} | {r['shape']} | {_fmt(r['rank'])} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('fwdbwd_ms'))} "
            f"| {_fmt(vs_off_f, 2)} | {_fmt(vs_off_b, 2)} | {siso} | {note} |"
        )
    checks = [r for r in rows if r.get("kind") == "check"]
    if checks:
        out += ["", "| check | shape | R | dtype | max rel err | tol | ok | errors |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in checks:
            errs = " ".join(f"{k}={v:.1e}" for k, v in r.get("errors", {}).items())
            what = "fused triton vs torch chain" if r.get("op") == "ssm_scan_fused" else "triton vs torch"
            out.append(f"| {what} | {r['shape']} | {r['rank']} | {r['dtype']} | {_fmt(r.get('max_err'), 5)} | {r['tol']:g} | {r['ok']} | {errs or r.get('error', '')} |")
    return "\n".join(out) + "\n"


def run_ssm_bench(shapes=None, out_dir=SsmBench.out, ranks=RANKS, check=True, reference=True, peers=True, io=True, fused=True,
                  log=print) -> list[dict]:
    """Run the benchmark; write ssm_bench.json / ssm_bench.md into out_dir; return the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("hybridlab bench ssm needs a CUDA GPU")
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES)]
    device = torch.cuda.get_device_name()
    date = _dt.date.today().isoformat()
    rows = []

    def add(row):
        row.update(device=device, date=date)
        rows.append(row)
        log(json.dumps(row, default=str))

    if check:
        for s in shapes:
            for r in ranks:
                try:
                    add(check_scan(s, r))
                except Exception as e:  # noqa: BLE001
                    add({"kind": "check", "shape": shape_name(s), "rank": r, "dtype": "bfloat16", "ok": False, "tol": 1e-2, "error": f"{type(e).__name__}: {e}"[:300]})
                    traceback.print_exc()
        for r in ranks:
            try:
                add(check_scan(shapes[0], r, dtype=torch.float32))
            except Exception as e:  # noqa: BLE001
                add({"kind": "check", "shape": shape_name(shapes[0]), "rank": r, "dtype": "float32", "ok": False, "tol": 1e-4, "error": f"{type(e).__name__}: {e}"[:300]})
        if fused:
            b, l, h, p, n = shapes[0]
            small = (2, l, h, p, n)  # the fp32 reference chain of the check holds (b, l, H, R, N) tensors: 2 rows
            for r in ranks:
                for dt in (torch.bfloat16, torch.float32):
                    try:
                        add(check_fused(small, r, dtype=dt))
                    except Exception as e:  # noqa: BLE001
                        add({"kind": "check", "op": "ssm_scan_fused", "shape": shape_name(small), "rank": r, "dtype": str(dt).split(".")[-1],
                             "ok": False, "tol": 1e-2, "error": f"{type(e).__name__}: {e}"[:300]})
    for s in shapes:
        for r in ranks:
            add(time_scan(s, r, "triton"))
        if reference:
            for r in ranks:
                add(time_scan(s, r, "torch_chunked"))
        if io:
            for r in ranks:
                for impl in ("triton", "torch"):
                    add(time_io(s, r, impl))
        if fused:
            for r in ranks:
                for impl in ("fused", "chain"):
                    add(time_fused(s, r, impl))
    if peers:
        seen = set()
        for b, l, h, p, n in shapes:
            if (b, l) not in seen:
                seen.add((b, l))
                add(time_sdpa(b, l))
                add(time_fa4(b, l))
            if n == 128:
                add(time_fla_gdn(b, l, h, n, p))
    _add_ratios(rows)
    try:  # which autotuned configs won
        from hybridlab.kernels.ssm_scan import triton as _tk

        for name, fn in (("fwd", _tk._fwd_tuned), ("bwd", _tk._bwd_tuned)):
            for key, cfg in getattr(fn, "cache", {}).items():
                log(f"autotune {name} key={key} -> {cfg}")
    except Exception:  # noqa: BLE001
        pass
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ssm_bench.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "ssm_bench.md").write_text(markdown(rows, device, date))
    return rows


def run_options(opts: SsmBench, make_layer=None) -> int:
    """Run the benchmark as ``opts`` says (``hybridlab bench ssm`` and :func:`main`); print the table(s); the exit code.

    ``opts.layers`` adds the whole-layer rows (:func:`run_layer_bench`), which need ``make_layer``
    (kernels imports no model code: the caller supplies the layer, e.g. ``hybridlab.arch.bench_layer``)."""
    if opts.layers and make_layer is None:
        raise ValueError("the layer rows (layers=True) need make_layer(d_model, mode, rank, d_state)")
    ok = True
    if opts.kernels:
        shapes = DEFAULT_SHAPES[:1] if opts.quick else None
        if opts.shapes:
            shapes = [DEFAULT_SHAPES[i] for i in int_list(opts.shapes)]
        rows = run_ssm_bench(shapes, opts.out, ranks=int_list(opts.ranks), check=opts.check, reference=opts.reference,
                             peers=opts.peers, io=opts.io, fused=opts.fused)
        print(markdown(rows, rows[0]["device"] if rows else "?", rows[0]["date"] if rows else "?"))
        ok = all(r.get("ok", True) for r in rows if r.get("kind") == "check")
    if opts.layers:
        d_states = int_list(opts.d_states)[:1] if opts.quick else int_list(opts.d_states)
        rows = run_layer_bench(make_layer, opts.out, d_states=d_states, ranks=int_list(opts.ranks),
                               compile_too=opts.compile, official=opts.peers)
        print(layer_markdown(rows, rows[0]["device"] if rows else "?", rows[0]["date"] if rows else "?"))
        ok = ok and all("error" not in r for r in rows if r["impl"] == "hybridlab")
    return 0 if ok else 1


def main(argv=None):
    opts = parse(SsmBench, argv, __doc__.splitlines()[0])
    if opts.layers:  # the layer comes from hybridlab.arch, which kernels does not import
        print("the layer rows: hybridlab bench ssm --layers (or scripts/bench_mamba3_layer.py)", file=sys.stderr)
        return 2
    return run_options(opts)


if __name__ == "__main__":
    sys.exit(main())
