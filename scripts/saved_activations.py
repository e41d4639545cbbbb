"""What a model's training forward keeps for its backward, per token, by layer and tensor shape.

    TRITON_INTERPRET=1 HYBRIDLAB_SSM_FUSED=0 python scripts/saved_activations.py zoo:hybrid-1in4-440m \
        --layout "m3 mlp attn mlp" --seq-len 64

Every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage and
attributed to the innermost module whose forward was running. The counts are elements per token (b × l),
so they hold at any batch and length and in any dtype (× 2 bytes in bf16). With ``TRITON_INTERPRET=1`` the
Mamba-3 layers run their Triton chain on the CPU (fp32: the interpreter has no bf16 ``tl.dot``) and save what
they save on a GPU; without it they run the PyTorch reference, which saves more. ``HYBRIDLAB_SSM_FUSED=0``:
the unfused chain (the bf16 default on a GPU); leave it out for the fused scan where it applies.
"""

from __future__ import annotations

import argparse
import collections
import os

import torch

from hybridlab.arch import HybridLM
from hybridlab.arch.spec import load_model_spec


def saved_per_token(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """{(module path, shape without (b, l), dtype): elements per token}, each saved storage once."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(m, args) -> None:
        stack.append(names[m])

    def leave(m, args, out) -> None:  # returns None: the module's output stays as it is
        stack.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved weights are not activations
    seen, out = set(), collections.Counter()
    tokens = inputs.numel()

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen and key[0] not in weights and t.numel() >= tokens:
            seen.add(key)
            owner = stack[-1] if stack else ""  # "": the model itself (its own forward, or the backward)
            out[(owner, per_token_shape(t.shape, inputs.shape), str(t.dtype))] += t.numel() / tokens
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(inputs, targets=targets)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return out


def per_token_shape(shape, bl) -> tuple:
    """The shape after the (b, l) (or b * l) dims it starts with; the whole shape when it does not."""
    shape = tuple(shape)
    if shape[:2] == tuple(bl):
        return shape[2:]
    if shape[:1] == (bl[0] * bl[1],):
        return shape[1:]
    return ("?",) + shape


def layer_kind(path: str, layout: list[str]) -> str:
    """A module path with its layer index as the layer's block name (``layers.3.mixer`` -> ``attn.mixer``)."""
    parts = path.split(".")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        parts[:2] = [layout[int(parts[1])]]
    return ".".join(parts) or "(model)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--layout", help="a shorter layout of the spec's blocks (one of each kind is enough)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ssm-backend", default="triton" if os.environ.get("TRITON_INTERPRET") == "1" else "auto",
                    help="the Mamba-3 layers' backend (default: triton under TRITON_INTERPRET=1, else auto)")
    args = ap.parse_args()
    sets = [f"layout={args.layout}"] if args.layout else []
    spec = load_model_spec(args.spec, sets)
    torch.manual_seed(0)
    model = HybridLM(spec, backends={"ssm": args.ssm_backend})
    tok = torch.randint(0, spec.vocab_size, (args.batch, args.seq_len + 1))
    counts = saved_per_token(model, tok[:, :-1], tok[:, 1:])
    layout = list(spec.layers)  # the block name of each layer
    by_kind = collections.Counter()
    print(f"{args.spec} (layout {args.layout or 'as written'}), b{args.batch} l{args.seq_len}, "
          f"ssm backend {args.ssm_backend}, HYBRIDLAB_SSM_FUSED={os.environ.get('HYBRIDLAB_SSM_FUSED', 'auto')}")
    print(f"{'module':40s} {'shape per token':22s} {'dtype':15s} {'elements/token':>14s}")
    for (owner, shape, dtype), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        kind = layer_kind(owner, layout)
        by_kind[kind.split(".")[0]] += n
        print(f"{kind:40s} {str(shape):22s} {dtype:15s} {n:14,.0f}")
    print("by layer kind (elements per token):", {k: round(v) for k, v in by_kind.items()})


if __name__ == "__main__":
    main()
