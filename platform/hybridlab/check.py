"""`hybridlab check`: what a spec builds — layers, params, FLOPs/token, cache bytes, kernel backends."""

from __future__ import annotations

import json

import torch
from rich.console import Console
from rich.table import Table

from hybridlab.arch import AttentionBlock, Mamba3Block, ModelSpec, count_spec, load_model_spec
from hybridlab.kernels import select_backend
from hybridlab.kernels.attention import select_attention_backend



def describe_block(d_model: int, b) -> str:
    if isinstance(b, Mamba3Block):
        bits = [b.mode, f"H={b.heads(d_model)}", f"P={b.headdim}", f"N={b.d_state}"]
        if b.mode == "mimo":
            bits.append(f"R={b.rank}")
        flags = [f for f, on in (("euler", not b.trapezoid), ("real", not b.rope), ("std-rope", b.rope == "standard"), ("no-bcnorm", not b.bc_norm), ("no-bcbias", not b.bc_bias), (f"conv{b.d_conv}", b.d_conv)) if on]
        if b.out_norm == "pre_gate_grouped":
            flags.append("pregate-norm")
        if b.a_activation != "heavy_tail" or b.a_bias:
            flags.append(f"A={b.a_activation}{'+bias' if b.a_bias else ''}")
        return " ".join(bits + flags)
    if isinstance(b, AttentionBlock):
        hd, rd = b.resolved_head_dim(d_model), b.resolved_rope_dim(d_model)
        bits = [f"heads={b.heads} kv={b.resolved_kv_heads()} hd={hd}"]
        if rd != hd:
            bits.append(f"rope={rd}" if rd else "no-rope")
        if b.rope_interleaved:
            bits.append("rope-interleaved")
        if b.qkv_bias or b.out_bias:
            bits.append("bias=" + "+".join(n for n, on in (("qkv", b.qkv_bias), ("out", b.out_bias)) if on))
        if b.softmax_scale is not None:
            bits.append(f"scale={b.softmax_scale:g}")
        return " ".join(bits)
    return f"hidden={b.resolved_hidden(d_model)}"


def layer_backends(b, device: torch.device, seq_len: int) -> tuple[str, str, str]:
    """(train/prefill backend, decode backend, reason) for one block on this machine."""
    if isinstance(b, Mamba3Block):
        shape = dict(headdim=b.headdim, d_state=b.d_state, rank=b.rank, chunk_size=b.chunk_size)
        train, why = select_backend(device, seq_len, shape)
        decode, why_d = select_backend(device, 1, shape)
        if train == "triton":  # the layer runs its pre/post stages fused whenever the scan is on Triton
            why += " + fused ssm_io stages"
        return train, decode, why if train == decode else f"{why}; decode: {why_d}"
    if isinstance(b, AttentionBlock):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        name, why = select_attention_backend(device, dtype)
        return name, name, why
    return "torch", "torch", "matmuls"


def report(spec: ModelSpec, seq_len: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = count_spec(spec, seq_len)
    layers = []
    reasons = {}
    for i, (name, b) in enumerate(zip(spec.layers, spec.layer_blocks())):
        train, decode, why = layer_backends(b, device, seq_len)
        reasons[b.mixer] = why
        layers.append({
            "index": i, "block": name, "mixer": b.mixer, "config": describe_block(spec.d_model, b),
            "params": counts["layer_params"][i], "state_bytes": counts["layer_state_bytes"][i],
            "backend_train": train, "backend_decode": decode,
        })
    return {
        "name": spec.name, "d_model": spec.d_model, "vocab_size": spec.vocab_size, "layout": spec.layout_str,
        "num_layers": len(spec.layers), "device": str(device), "seq_len": seq_len,
        "params": counts["params"], "params_by_mixer": counts["params_by_mixer"],
        "params_embedding": counts["params_embedding"], "params_norms": counts["params_norms"],
        "flops_per_token_train": counts["flops_per_token_train"], "flops_per_token_decode": counts["flops_per_token_decode"],
        "state_bytes": counts["state_bytes"], "backend_reasons": reasons, "layers": layers,
    }


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def render(rep: dict, console: Console) -> None:
    console.print(f"[bold]{rep['name']}[/bold]  d_model={rep['d_model']} vocab={rep['vocab_size']} "
                  f"layers={rep['num_layers']}  layout: {rep['layout']}")
    t = Table(show_lines=False, header_style="bold")
    for col, just in (("#", "right"), ("block", "left"), ("mixer", "left"), ("config", "left"), ("params", "right"),
                      ("cache", "right"), ("train/prefill", "left"), ("decode", "left")):
        t.add_column(col, justify=just)
    for row in rep["layers"]:
        t.add_row(str(row["index"]), row["block"], row["mixer"], row["config"], human(row["params"]),
                  human_bytes(row["state_bytes"]) if row["state_bytes"] else "-", row["backend_train"], row["backend_decode"])
    console.print(t)
    by = ", ".join(f"{k} {human(v)}" for k, v in rep["params_by_mixer"].items())
    console.print(f"params        {rep['params']:,} ({human(rep['params'])}): {by}, embedding {human(rep['params_embedding'])}, norms {human(rep['params_norms'])}")
    console.print(f"FLOPs/token   train {human(rep['flops_per_token_train'])} (fwd+bwd at seq {rep['seq_len']}), "
                  f"decode {human(rep['flops_per_token_decode'])} (at context {rep['seq_len']})")
    console.print(f"cache/seq     {human_bytes(rep['state_bytes'])} of SSM state + KV cache at {rep['seq_len']} tokens")
    for mixer, why in rep["backend_reasons"].items():
        console.print(f"backend       {mixer}: {why}")


def _model_of(ref: str, overrides: list[str]) -> ModelSpec:
    """The model spec of ``ref``: a spec (file, zoo:NAME or a model folder), or a job file's model (its --set applies
    to the job)."""
    from pathlib import Path

    if not ref.startswith("zoo:") and not Path(ref).expanduser().is_dir():
        from hybridlab.arch.specio import load_yaml_file

        data, _ = load_yaml_file(ref)
        if isinstance(data, dict) and "model" in data and "blocks" not in data:
            from hybridlab.jobs.spec import load_job

            return load_job(ref, overrides).model_spec
    return load_model_spec(ref, overrides)


def run_check(ref: str, overrides: list[str], seq_len: int, as_json: bool) -> None:
    spec = _model_of(ref, overrides)
    rep = report(spec, seq_len)
    if as_json:
        print(json.dumps(rep, indent=2))
    else:
        render(rep, Console(width=160))
