"""Decode benchmark (issue 7): per-token latency of Mamba-3 and attention layers and of whole models.

    python -m hybridlab.bench_decode [--out DIR] [--batches 1,16,128] [--contexts 4096,16384] [--quick]

Every step is captured in a CUDA graph and timed by replaying it
(``triton.testing.do_bench`` medians). Rows:

* Mamba-3 layer decode step (in_proj -> step -> out_proj), d_model 2048, 64 heads x 64,
  SISO d_state 128 / 64 and MIMO R=4 d_state 128 / 64, pre-gate grouped RMSNorm, bf16;
  backends: ``cute`` (the fused CuTe DSL step), ``cute-unfused`` (the contract kernel with
  the PyTorch pre/post-processing), ``triton`` (chunked kernel at seqlen 1, if present),
  ``torch`` (reference recurrence).
* attention layer decode step with a KV cache (qkv proj, SDPA over the cache, out proj;
  16 heads x 128, MHA as in the official figures), context 4k and 16k.
* whole models (``zoo:hybrid-1in4-1.5b``, ``zoo:transformer-1.5b``, ...): one token through
  every layer + lm_head + argmax at a given context.

Bandwidth: state bytes (h read + written in fp32, last k/v read + written) and weight
bytes per step over the time, as a share of the HBM peak (datasheet) and of a measured
device-to-device copy. Writes ``decode.json`` and ``decode.md``; prints the table.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import traceback
from pathlib import Path

import torch

from hybridlab.kernels.bench.options import DecodeBench, batch_contexts, int_list, names, parse

# Official figures (µs per step, CUDA graph, H100, bf16; ../shared/STACK.md, measured 2026-11-22), by batch 1/16/128.
OFFICIAL = {
    ("mamba3", "siso", 128): (63.5, 92.8, 276.8),
    ("mamba3", "siso", 64): (70.6, 88.0, 190.2),
    ("mamba3", "mimo", 128): (83.5, 121.8, 321.0),
    ("mamba3", "mimo", 64): (80.7, 105.6, 212.8),
    ("attention", 4096): (49.1, 212.7, 1426.0),
    ("attention", 16384): (84.4, 730.6, 5590.0),
}
HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM datasheets


def _official(key, batch):
    vals = OFFICIAL.get(key)
    if vals is None or batch not in (1, 16, 128):
        return None
    return vals[(1, 16, 128).index(batch)]


def _do_bench(fn, quick):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def graph_time_us(step, quick=False) -> float:
    """Capture ``step`` (after two eager warm-up calls on a side stream) and time its replays (µs, median)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    torch.cuda.synchronize()
    ms = _do_bench(g.replay, quick)
    del g
    return ms * 1e3


def eager_time_us(step, quick=False) -> float:
    step()
    torch.cuda.synchronize()
    return _do_bench(step, quick) * 1e3


def copy_bandwidth(quick=False) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = 1 << 28  # 1 GiB of fp32
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    ms = _do_bench(lambda: y.copy_(x), quick)
    del x, y
    return 2 * n * 4 / (ms * 1e-3)


# ------------------------------------------------------------------------------------------ layers


def _mamba_layer(mode, d_state, rank, dtype, backend):
    from hybridlab.arch.layers.mamba3 import Mamba3
    from hybridlab.arch.spec import Mamba3Block

    blk = Mamba3Block(mode=mode, d_state=d_state, headdim=64, expand=2, rank=rank, out_norm="pre_gate_grouped")
    with torch.device("cuda"):
        layer = Mamba3(2048, blk, backend=backend)
    return layer.to(dtype).eval()


def _random_mamba_cache(layer, batch, dtype, gen):
    c = layer.allocate_cache(batch, 0, "cuda", dtype)
    c.scan.h.copy_(torch.randn(c.scan.h.shape, device="cuda", generator=gen) * 0.1)
    c.scan.k.copy_(torch.randn(c.scan.k.shape, device="cuda", generator=gen))
    c.scan.v.copy_(torch.randn(c.scan.v.shape, device="cuda", generator=gen))
    c.phase.copy_(torch.rand(c.phase.shape, device="cuda", generator=gen) * 6.28)
    return c


def mamba_state_bytes(layer, batch, dtype_bytes=2) -> int:
    H, P, N, R = layer.H, layer.P, layer.N, layer.R
    return batch * H * (P * N * 4 * 2 + R * N * dtype_bytes * 2 + R * P * dtype_bytes * 2)


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def bench_mamba_layers(batches, dev_info, quick, log, variants=("cute", "cute-unfused", "triton", "torch")):
    dtype = torch.bfloat16
    rows = []
    for mode, n, rank in (("siso", 128, 1), ("siso", 64, 1), ("mimo", 128, 4), ("mimo", 64, 4)):
        layers = {}
        for variant in variants:
            backend = {"cute": "cute", "cute-unfused": "cute", "triton": "triton", "torch": "torch"}[variant]
            torch.manual_seed(0)
            layer = _mamba_layer(mode, n, rank, dtype, backend)
            layer.use_fused_step = variant == "cute"
            layers[variant] = layer
        for b in batches:
            gen = torch.Generator(device="cuda").manual_seed(b)
            u = torch.randn(b, 1, 2048, device="cuda", generator=gen).to(dtype)
            ref_out = None
            for variant, layer in layers.items():
                row = dict(kind="layer", mixer="mamba3", mode=mode, d_state=n, rank=rank, batch=b, backend=variant,
                           d_model=2048, heads=layer.H, headdim=layer.P)
                try:
                    cache = _random_mamba_cache(layer, b, dtype, torch.Generator(device="cuda").manual_seed(7))
                    with torch.no_grad():
                        # accuracy of one step from the same state, against the torch layer
                        snap = [t.clone() for t in (*cache.scan, cache.phase)]
                        out = layer(u, cache).float()
                        for t, s in zip((*cache.scan, cache.phase), snap):
                            t.copy_(s)
                        if variant == "torch":
                            ref_out = out
                        row["_out"] = out
                        t_us = graph_time_us(lambda: layer(u, cache), quick)
                        if b == 1 and variant in ("cute", "torch"):
                            row["eager_us"] = round(eager_time_us(lambda: layer(u, cache), quick), 2)
                    sb = mamba_state_bytes(layer, b)
                    wb = weight_bytes(layer)
                    row.update(us=round(t_us, 2), state_bytes=sb, weight_bytes=wb,
                               state_bw=sb / (t_us * 1e-6), total_bw=(sb + wb) / (t_us * 1e-6))
                    row["total_pct_peak"] = 100 * row["total_bw"] / dev_info["hbm_peak"] if dev_info["hbm_peak"] else None
                    row["total_pct_copy"] = 100 * row["total_bw"] / dev_info["copy_bw"]
                    row["official_us"] = _official(("mamba3", mode, n), b)
                except Exception as e:  # keep going: a failing backend is a row, not a crash
                    row["error"] = f"{type(e).__name__}: {e}"
                    log(traceback.format_exc(limit=3))
                rows.append(row)
                log(_fmt_row(row))
            for row in rows:
                out = row.pop("_out", None)
                if out is not None and ref_out is not None and row["batch"] == b and row["mode"] == mode and row["d_state"] == n:
                    row["rel_err_vs_torch"] = float((out - ref_out).norm() / ref_out.norm())
        del layers
        torch.cuda.empty_cache()
    return rows


def bench_attention_layers(batches, contexts, dev_info, quick, log, impls=("sdpa", "split")):
    rows = []
    for impl in impls:
        rows += _bench_attention_layers(batches, contexts, dev_info, quick, log, impl)
    return rows


def _bench_attention_layers(batches, contexts, dev_info, quick, log, impl):
    import hybridlab.arch.layers.attention as attn_mod
    from hybridlab.arch.layers.attention import Attention
    from hybridlab.arch.spec import AttentionBlock

    attn_mod.DECODE_IMPL = impl

    dtype = torch.bfloat16
    rows = []
    with torch.device("cuda"):
        layer = Attention(2048, AttentionBlock(heads=16, kv_heads=16, rope_theta=10000.0), backend="sdpa")
    layer = layer.to(dtype).eval()
    for ctx in contexts:
        for b in batches:
            row = dict(kind="layer", mixer="attention", heads=16, kv_heads=16, head_dim=128, context=ctx, batch=b,
                       backend=f"decode-{impl}", d_model=2048)
            try:
                kv_bytes = 2 * b * ctx * 16 * 128 * 2  # read once per step
                if kv_bytes > 0.6 * torch.cuda.mem_get_info()[0]:
                    raise MemoryError(f"KV cache of {kv_bytes / 2**30:.1f} GiB does not fit")
                cache = layer.allocate_cache(b, ctx, "cuda", dtype)
                cache.k.normal_()
                cache.v.normal_()
                cache.length = ctx - 1
                cache.make_static(torch.full((1,), ctx - 1, dtype=torch.long, device="cuda"))
                x = torch.randn(b, 1, 2048, device="cuda").to(dtype)
                with torch.no_grad():
                    t_us = graph_time_us(lambda: layer(x, cache), quick)
                wb = weight_bytes(layer)
                row.update(us=round(t_us, 2), kv_bytes=kv_bytes, weight_bytes=wb,
                           total_bw=(kv_bytes + wb) / (t_us * 1e-6))
                row["total_pct_peak"] = 100 * row["total_bw"] / dev_info["hbm_peak"] if dev_info["hbm_peak"] else None
                row["total_pct_copy"] = 100 * row["total_bw"] / dev_info["copy_bw"]
                row["official_us"] = _official(("attention", ctx), b)
                del cache
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            torch.cuda.empty_cache()
            rows.append(row)
            log(_fmt_row(row))
    return rows


# ------------------------------------------------------------------------------------------ models


def bench_models(names, batch_ctx, quick, log, impls=("sdpa", "split")):
    rows = []
    for impl in impls:
        rows += _bench_models(names, batch_ctx, quick, log, impl)
    return rows


def _bench_models(names, batch_ctx, quick, log, impl):
    import hybridlab.arch.layers.attention as attn_mod
    from hybridlab.arch import HybridLM, load_model_spec

    attn_mod.DECODE_IMPL = impl
    from hybridlab.arch.layers.attention import KVCache
    from hybridlab.arch.layers.mamba3 import Mamba3Cache

    dtype = torch.bfloat16
    rows = []
    for name in names:
        spec = load_model_spec(f"zoo:{name}")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = HybridLM(spec)
        model = model.to(dtype).eval()
        n_params = sum(p.numel() for p in model.parameters())
        for b, ctx in batch_ctx:
            row = dict(kind="model", model=name, params=n_params, batch=b, context=ctx, attention=f"decode-{impl}")
            try:
                n_attn = sum(l.mixer.__class__.__name__ == "Attention" for l in model.layers)
                kv = 0
                for l in model.layers:
                    if l.mixer.__class__.__name__ == "Attention":
                        kv += 2 * b * (ctx + 1) * l.mixer.kv_heads * l.mixer.head_dim * 2
                if kv > 0.7 * torch.cuda.mem_get_info()[0]:
                    raise MemoryError(f"KV caches of {kv / 2**30:.1f} GiB do not fit")
                cache = model.allocate_cache(b, ctx + 1)
                cache.make_static()
                gen = torch.Generator(device="cuda").manual_seed(1)
                state_bytes = 0
                for c in cache.layers:
                    if isinstance(c, KVCache):
                        c.k.normal_(generator=gen)
                        c.v.normal_(generator=gen)
                    elif isinstance(c, Mamba3Cache):
                        c.scan.h.normal_(generator=gen).mul_(0.1)
                        c.scan.k.normal_(generator=gen)
                        c.scan.v.normal_(generator=gen)
                        state_bytes += 2 * (c.scan.h.numel() * 4 + (c.scan.k.numel() + c.scan.v.numel()) * 2)
                cache.seqlen = ctx
                for c in cache.layers:
                    if isinstance(c, KVCache):
                        c.length = ctx
                        c.reset_bias(ctx)
                cache.pos.fill_(ctx)
                tok = torch.randint(0, spec.vocab_size, (b, 1), device="cuda")

                def step():
                    logits = model(tok, cache)[:, -1]
                    cache.pos.sub_(1)  # stay at the same context for every replay
                    return logits.argmax(-1)

                with torch.no_grad():
                    t_us = graph_time_us(step, quick)
                row.update(us=round(t_us, 2), tokens_per_s=b / (t_us * 1e-6), attention_layers=n_attn,
                           kv_bytes=kv, state_bytes=state_bytes, weight_bytes=weight_bytes(model))
                del cache
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc(limit=3))
            torch.cuda.empty_cache()
            rows.append(row)
            log(_fmt_row(row))
        del model
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ output


def _fmt_row(r) -> str:
    if r.get("error"):
        what = r.get("model") or f"{r.get('mixer')} {r.get('mode', '')}"
        return f"  {what} b{r.get('batch')} {r.get('backend', '')}: ERROR {r['error'][:200]}"
    if r["kind"] == "model":
        return (f"  model {r['model']:20s} b{r['batch']:<4d} ctx {r['context']:<6d} {r.get('attention', '')} {r['us']:9.1f} µs  "
                f"{r['tokens_per_s']:10.0f} tok/s")
    if r["mixer"] == "mamba3":
        off = f"  official {r['official_us']}" if r.get("official_us") else ""
        return (f"  mamba3 {r['mode']} n{r['d_state']} R{r['rank']} b{r['batch']:<4d} {r['backend']:13s} {r['us']:9.1f} µs  "
                f"{r['total_bw'] / 1e9:7.0f} GB/s ({r['total_pct_peak'] or 0:.0f}% peak, {r['total_pct_copy']:.0f}% copy){off}")
    off = f"  official {r['official_us']}" if r.get("official_us") else ""
    return (f"  attention ctx {r['context']} b{r['batch']:<4d} {r['backend']} {r['us']:9.1f} µs  {r['total_bw'] / 1e9:7.0f} GB/s "
            f"({r['total_pct_peak'] or 0:.0f}% peak){off}")


def to_markdown(res) -> str:
    d = res["device"]
    lines = [f"Device: {d['name']}, torch {d['torch']}, cutlass-dsl {d.get('cutlass_dsl')}, {res['date']}. "
             f"HBM: datasheet {d['hbm_peak'] / 1e12 if d['hbm_peak'] else float('nan'):.2f} TB/s, "
             f"measured copy {d['copy_bw'] / 1e12:.2f} TB/s. CUDA graphs, do_bench medians, bf16.", ""]
    lines += ["| layer | batch | backend | µs/token | official µs | state+weights GB/s | % HBM peak | % copy bw | rel. err vs torch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        if r["kind"] != "layer":
            continue
        if r["mixer"] == "mamba3":
            name = f"Mamba-3 {r['mode'].upper()}{' R=' + str(r['rank']) if r['rank'] > 1 else ''} n{r['d_state']}"
        else:
            name = f"attention 16×128, ctx {r['context']}"
        if r.get("error"):
            lines.append(f"| {name} | {r['batch']} | {r.get('backend')} | error: {r['error'][:80]} | | | | | |")
            continue
        err = f"{r['rel_err_vs_torch']:.1e}" if r.get("rel_err_vs_torch") is not None else ""
        lines.append(f"| {name} | {r['batch']} | {r['backend']} | {r['us']:.1f} | {r.get('official_us') or ''} | "
                     f"{r['total_bw'] / 1e9:.0f} | {r['total_pct_peak'] or 0:.0f} | {r['total_pct_copy']:.0f} | {err} |")
    models = [r for r in res["rows"] if r["kind"] == "model"]
    if models:
        lines += ["", "| model | batch | context | decode attention | µs/token | tokens/s |", "| --- | --- | --- | --- | --- | --- |"]
        for r in models:
            if r.get("error"):
                lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r.get('attention')} | error: {r['error'][:80]} | |")
            else:
                lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r.get('attention')} | {r['us']:.1f} | "
                             f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def device_info(quick=False) -> dict:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_PEAK.items() if k in name), None)
    try:
        import importlib.metadata as md

        cutlass_v = md.version("nvidia-cutlass-dsl")
    except Exception:
        cutlass_v = None
    return dict(name=name, torch=torch.__version__, cutlass_dsl=cutlass_v, hbm_peak=peak, copy_bw=copy_bandwidth(quick))


def run_decode_bench(out_dir=DecodeBench.out, batches=int_list(DecodeBench.batches), contexts=int_list(DecodeBench.contexts),
                     models=True, quick=False, model_names=tuple(names(DecodeBench.models)),
                     model_batch_ctx=batch_contexts(DecodeBench.model_shapes), parts=tuple(names(DecodeBench.parts)),
                     variants=tuple(names(DecodeBench.variants))):
    if not torch.cuda.is_available():
        raise RuntimeError("bench decode needs a CUDA GPU")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    info = device_info(quick)
    log(f"device {info['name']}: copy {info['copy_bw'] / 1e12:.2f} TB/s")
    res = dict(date=_dt.date.today().isoformat(), device=info, rows=[])

    def save():
        (out / "decode.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "decode.md").write_text(to_markdown(res))

    if "mamba" in parts:
        res["rows"] += bench_mamba_layers(list(batches), info, quick, log, tuple(variants))
        save()
    if "attention" in parts:
        res["rows"] += bench_attention_layers(list(batches), list(contexts), info, quick, log)
        save()
    if models and "models" in parts:
        res["rows"] += bench_models(list(model_names), list(model_batch_ctx), quick, log)
        save()
    print(to_markdown(res))
    print(f"wrote {out / 'decode.json'} and {out / 'decode.md'}")
    return res


def run_options(opts: DecodeBench):
    """Run the benchmark as ``opts`` says (``hybridlab bench decode`` and :func:`main`)."""
    models = names(opts.models)
    return run_decode_bench(
        opts.out, list(int_list(opts.batches)), list(int_list(opts.contexts)), models=bool(models), quick=opts.quick,
        model_names=models, model_batch_ctx=list(batch_contexts(opts.model_shapes)),
        parts=names(opts.parts), variants=names(opts.variants),
    )


def main(argv=None):
    run_options(parse(DecodeBench, argv, __doc__.splitlines()[0]))


if __name__ == "__main__":
    sys.exit(main())
