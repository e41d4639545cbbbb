"""Training throughput of a spec on this machine: tokens/s, MFU, peak memory.

``hybridlab bench train`` runs this in one process per GPU, without Ray: it is
the same model and DeepSpeed config as a job's training step, measured on
random tokens, so kernel backends and layouts can be compared quickly. With
``torchrun --nproc-per-node N`` it measures N-GPU data parallelism (ZeRO 0–3
over NCCL).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from hybridlab.arch import HybridLM, count_spec, load_model_spec
from hybridlab.jobs.train import checkpoint_activations, deepspeed_config, peak_flops, peak_memory_bytes


def _init_distributed(device: torch.device) -> tuple[int, int]:
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def measure_training(
    spec_ref: str,
    seq_len: int = 2048,
    micro_batch: int = 8,
    steps: int = 20,
    warmup: int = 5,
    zero_stage: int = 2,
    precision: str = "bf16",
    ssm_backend: str = "auto",
    overrides=(),
    activation_checkpointing: bool = False,
    profile_top: int = 0,
) -> dict:
    """Time ``steps`` optimizer steps after ``warmup``; returns a dict of measurements (rank 0's)."""
    import deepspeed

    spec = load_model_spec(spec_ref, overrides)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _init_distributed(device)
    torch.manual_seed(0)
    model = HybridLM(spec, backends={"ssm": ssm_backend})
    if activation_checkpointing:
        checkpoint_activations(model)
    train = {"micro_batch": micro_batch, "grad_accum": 1, "grad_clip": 1.0, "lr": 1e-4, "betas": (0.9, 0.95),
             "weight_decay": 0.1, "zero_stage": zero_stage, "precision": precision}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(train, world))
    gen = torch.Generator(device=device).manual_seed(rank)

    def step():
        tokens = torch.randint(0, spec.vocab_size, (micro_batch, seq_len + 1), device=device, generator=gen)
        logits = engine(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    if profile_top and device.type == "cuda" and rank == 0:
        _print_profile(step, profile_top)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = float(loss)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    counts = count_spec(spec, seq_len)
    tokens_per_s = micro_batch * seq_len * world / dt
    peak = peak_flops(device)
    return {
        "spec": spec.name, "params": counts["params"], "seq_len": seq_len, "micro_batch": micro_batch, "world": world,
        "zero_stage": zero_stage, "precision": precision, "ssm_backend": ssm_backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "step_ms": dt * 1e3, "tokens_per_s": tokens_per_s,
        "flops_per_token_train": counts["flops_per_token_train"],
        "mfu": tokens_per_s * counts["flops_per_token_train"] / (peak * world) if peak else None,
        "peak_memory_gib": peak_memory_bytes(device) / 2**30, "final_loss": loss,
        "activation_checkpointing": activation_checkpointing,
    }


def _print_profile(step, top: int) -> None:
    """One step under torch.profiler: the ``top`` CUDA kernels by total time (where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
