"""Training throughput of a spec on this machine: tokens/s, MFU, peak memory.

``hybridlab bench train`` runs this in one process per GPU, without Ray. It runs
the job's own step (``jobs.step``): the same engine set-up (``build_engine``: AdamW
groups, LR schedule, ZeRO, precision, clipping), the same ``TrainStep`` (host
batches moved to the device, forward, cross-entropy, backward, optimizer step) and
the same device-side statistics synced, and the same extra forward for train/acc, once per
``log_every`` steps — on random tokens, so kernel backends and layouts can be compared quickly. With
``torchrun --nproc-per-node N`` it measures N-GPU data parallelism (ZeRO 0–3 over NCCL).
"""

from __future__ import annotations

import os
import time
from typing import Optional, Union

import torch

from hybridlab.arch import HybridLM, count_spec, load_model_spec
from hybridlab.jobs.data import RandomTokens
from hybridlab.jobs.spec import TrainSpec
from hybridlab.jobs.step import (StepStats, TrainStep, build_engine, checkpoint_activations, engine_zero_stage,
                                 import_deepspeed, keeps_predictions, optimizer_choice, peak_flops,
                                 peak_memory_bytes)


def _init_distributed(device: torch.device) -> tuple[int, int]:
    deepspeed = import_deepspeed()
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
    log_every: int = TrainSpec.log_every,
    compile: Union[str, bool] = "auto",
    compile_backend: Optional[str] = None,
    compile_mode: str = "default",
) -> dict:
    """Time ``steps`` optimizer steps of the job's step function after ``warmup``; returns rank 0's measurements."""
    spec = load_model_spec(spec_ref, overrides)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _init_distributed(device)
    torch.manual_seed(0)
    model = HybridLM(spec, backends={"ssm": ssm_backend})
    if activation_checkpointing:
        checkpoint_activations(model)
    train = TrainSpec(steps=warmup + steps, micro_batch=micro_batch, lr=1e-4, warmup=0, zero_stage=zero_stage,
                      precision=precision, log_every=log_every, compile=compile, compile_mode=compile_mode)
    engine, _ = build_engine(model, train, world, device, compile_backend=compile_backend)
    step_fn, stats = TrainStep(engine, device), StepStats(device)
    stream = RandomTokens(spec.vocab_size, seq_len, micro_batch, seed=0, rank=rank)
    step_no = 0

    stage = engine_zero_stage(train, world)

    def step(force_log: bool = False) -> None:
        nonlocal step_no
        step_no += 1
        log_point = force_log or step_no % log_every == 0  # the job's schedule: syncs and train/acc once per log_every steps
        out = step_fn([stream.get(step_no, m) for m in range(train.grad_accum)],
                      keep_predictions=keeps_predictions(log_point, rank, stage))
        stats.add(step_no, out.loss)
        if log_point:
            stats.sync()
            if out.predictions is not None:
                out.predictions.cpu()  # the job scores these on the host for train/acc

    for i in range(warmup):
        # the last warm-up step is a log point: a run's first one compiles its no-grad forward for train/acc once,
        # which is start-up cost (as the training step's compile is), not the steady step the bench times
        step(force_log=i == warmup - 1)
    stats.sync()
    _sync(device)
    if profile_top and device.type == "cuda" and rank == 0:
        _print_profile(step, profile_top)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    final = stats.sync()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    counts = count_spec(spec, seq_len)
    tokens_per_s = micro_batch * seq_len * world / dt
    peak = peak_flops(device)
    return {
        "spec": spec.name, "params": counts["params"], "seq_len": seq_len, "micro_batch": micro_batch, "world": world,
        "zero_stage": zero_stage, "precision": precision, "ssm_backend": ssm_backend, "log_every": log_every,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "step_ms": dt * 1e3, "tokens_per_s": tokens_per_s,
        "flops_per_token_train": counts["flops_per_token_train"],
        "mfu": tokens_per_s * counts["flops_per_token_train"] / (peak * world) if peak else None,
        "peak_memory_gib": peak_memory_bytes(device) / 2**30, "final_loss": final.loss,
        "activation_checkpointing": activation_checkpointing,
        "compile": step_fn.compiled, "compile_mode": compile_mode if step_fn.compiled else None,
        "compile_s": step_fn.compile_s, "optimizer": optimizer_choice(train, device),
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
