"""Benchmark + bench-shape correctness of the ssm_scan backends (issue 6).

    python -m hybridlab.kernels.bench.ssm [--out DIR] [--quick] [--no-check]

Times (``triton.testing.do_bench`` medians, bf16) forward and forward+backward of
the ``triton`` backend (SISO and MIMO R=4, same heads/d_state), the torch
reference, causal attention of the same width through SDPA (16 heads x 128),
and the peers that import (flash-attn-4's ``flash_attn.cute``, fla-core's gated
DeltaNet); checks the kernel against the torch reference at the same shapes;
writes ``ssm_bench.json`` and ``ssm_bench.md`` (ratios vs the official figures
of ../shared/STACK.md) into the output folder. ``run_ssm_bench`` is the entry
point that ``hybridlab bench ssm`` calls.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import traceback
from pathlib import Path

import torch

try:  # installed package, or run from the repo root without installing
    from hybridlab.kernels import ssm_scan
    from hybridlab.kernels.bench.options import SsmBench, int_list, parse
    from hybridlab.kernels.ssm_io import gated_output, qk_prep
except ImportError:  # pragma: no cover - device fallback: map ./kernels to hybridlab.kernels
    import importlib.util
    import types

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
    from hybridlab.kernels import ssm_scan
    from hybridlab.kernels.bench.options import SsmBench, int_list, parse
    from hybridlab.kernels.ssm_io import gated_output, qk_prep

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
        out.append(
            f"| {r['op']} | {r['impl']} | {r['shape']} | {_fmt(r['rank'])} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('fwdbwd_ms'))} "
            f"| {_fmt(vs_off_f, 2)} | {_fmt(vs_off_b, 2)} | {siso} | {note} |"
        )
    checks = [r for r in rows if r.get("kind") == "check"]
    if checks:
        out += ["", "| check | shape | R | dtype | max rel err | tol | ok | errors |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in checks:
            errs = " ".join(f"{k}={v:.1e}" for k, v in r.get("errors", {}).items())
            out.append(f"| triton vs torch | {r['shape']} | {r['rank']} | {r['dtype']} | {_fmt(r.get('max_err'), 5)} | {r['tol']:g} | {r['ok']} | {errs or r.get('error', '')} |")
    return "\n".join(out) + "\n"


def run_ssm_bench(shapes=None, out_dir=SsmBench.out, ranks=RANKS, check=True, reference=True, peers=True, io=True, log=print) -> list[dict]:
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


def run_options(opts: SsmBench) -> int:
    """Run the benchmark as ``opts`` says (``hybridlab bench ssm`` and :func:`main`); print the table; the exit code."""
    shapes = DEFAULT_SHAPES[:1] if opts.quick else None
    if opts.shapes:
        shapes = [DEFAULT_SHAPES[i] for i in int_list(opts.shapes)]
    rows = run_ssm_bench(shapes, opts.out, ranks=int_list(opts.ranks), check=opts.check, reference=opts.reference,
                         peers=opts.peers, io=opts.io)
    print(markdown(rows, rows[0]["device"] if rows else "?", rows[0]["date"] if rows else "?"))
    return 0 if all(r.get("ok", True) for r in rows if r.get("kind") == "check") else 1


def main(argv=None):
    return run_options(parse(SsmBench, argv, __doc__.splitlines()[0]))


if __name__ == "__main__":
    sys.exit(main())
