"""The plain PyTorch training loop that ``hybridlab bench train --baseline`` holds the job's step against.

What a user writes in twenty lines over the same ``HybridLM``: fp32 parameters on one device, bf16
autocast on CUDA (fp32 on the CPU), ``F.cross_entropy`` on the logits, backward, gradient clipping at
1.0, torch's AdamW (fused on CUDA) over the job's parameter groups, and optionally ``torch.compile``
of the whole model — no DeepSpeed, no Ray, no statistics. Same random tokens and shapes as
``measure_training``; its tokens/s is the denominator of the bench's ``ratio``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.nn.functional as F

from hybridlab.arch import HybridLM, count_spec, load_model_spec
from hybridlab.jobs.data import RandomTokens
from hybridlab.jobs.step import compile_options, param_groups, peak_flops, peak_memory_bytes


def measure_baseline(
    spec_ref: str,
    seq_len: int = 2048,
    micro_batch: int = 8,
    steps: int = 20,
    warmup: int = 5,
    compile: bool = False,
    ssm_backend: str = "auto",
    overrides=(),
    device: Optional[torch.device] = None,
    compile_backend: Optional[str] = None,
    compile_mode: str = "default",
) -> dict:
    """Time ``steps`` steps of the plain loop after ``warmup`` (the first compiles when ``compile``)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    spec = load_model_spec(spec_ref, overrides)
    torch.manual_seed(0)
    model = HybridLM(spec, backends={"ssm": ssm_backend}).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model, **compile_options(compile_mode, compile_backend)) if compile else model
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    stream = RandomTokens(spec.vocab_size, seq_len, micro_batch, seed=0)
    loss = None

    def step(i: int) -> None:
        nonlocal loss
        b = stream.get(i)
        x, y = b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True)
        with autocast:
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    first_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    tokens_per_s = micro_batch * seq_len / dt
    counts = count_spec(spec, seq_len)
    peak = peak_flops(device)
    return {
        "loop": "plain-pytorch", "compile": bool(compile), "compile_mode": compile_mode if compile else None,
        "precision": "bf16-autocast" if cuda else "fp32",
        "step_ms": dt * 1e3, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * counts["flops_per_token_train"] / peak if peak else None,
        "peak_memory_gib": peak_memory_bytes(device) / 2**30, "warmup_s": first_s,
        "final_loss": float(loss.detach()) if loss is not None else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
