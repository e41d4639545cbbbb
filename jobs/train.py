"""The per-worker training loop: a DeepSpeed ZeRO engine over a ``hybridlab.arch`` model.

``train_loop_per_worker(config)`` runs inside each Ray Train worker (Ray made the
process group: gloo on CPU, NCCL on GPU). ``config``:

``job``      the resolved job dict (``spec.Job.resolved``)
``run``      ``{"name", "storage"}`` (resuming goes through Ray: the run's own latest checkpoint)
``sink``     optional: an object with ``put_nowait(dict)`` (e.g. ``ray.util.queue.Queue``)
             receiving rank 0's progress messages; printed when absent

Messages to the sink are dicts with a ``"kind"``: ``start``, ``metrics``,
``checkpoint``, ``eval``, ``end`` (with ``status`` ``finished`` | ``nonfinite`` |
``disk_full`` and a ``message``). A non-finite loss and a checkpoint that does
not fit stop all ranks together *without* raising, so Ray does not retry them.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import socket
import time
from typing import Optional

import torch
import torch.nn.functional as F

from hybridlab.jobs import checkpoint as ckpt
from hybridlab.jobs.data import TrainStream
from hybridlab.jobs.evals import run_evals

# dense bf16 peak FLOP/s by device-name fragment, for the MFU estimate
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def deep_merge(base: dict, extra: dict) -> dict:
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def checkpoint_activations(model) -> None:
    """Recompute each sub-block's forward in the backward instead of keeping its activations (torch
    non-reentrant checkpointing; decoding with a cache is left as it is)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        fwd = layer.forward
        layer.forward = lambda x, cache=None, seq_idx=None, _f=fwd: (
            checkpoint(_f, x, cache, seq_idx, use_reentrant=False) if cache is None else _f(x, cache))


def deepspeed_config(train: dict, world_size: int) -> dict:
    """The DeepSpeed config of a job's ``train`` section (``train.deepspeed`` merged last)."""
    prec = train["precision"]
    cfg = {
        "train_micro_batch_size_per_gpu": train["micro_batch"],
        "gradient_accumulation_steps": train["grad_accum"],
        "train_batch_size": train["micro_batch"] * train["grad_accum"] * world_size,
        "gradient_clipping": train["grad_clip"],
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train["lr"], "betas": list(train["betas"]), "eps": 1e-8,
                       "weight_decay": train["weight_decay"], "torch_adam": True},
        },
        "zero_optimization": {"stage": train["zero_stage"]},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 12, "loss_scale_window": 100},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, train.get("deepspeed") or {})


def lr_lambda(train: dict):
    steps, warmup, floor, kind = train["steps"], train["warmup"], train["min_lr_ratio"], train["schedule"]

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, steps - warmup))
        if kind == "linear":
            return floor + (1 - floor) * (1 - frac)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def peak_flops(device: torch.device) -> Optional[float]:
    env = os.environ.get("HYBRIDLAB_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, v in PEAK_FLOPS.items():
            if frag in name:
                return v
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # CPU: the process's peak RSS


class _Sink:
    def __init__(self, sink, rank: int):
        self.sink, self.rank = sink, rank

    def __call__(self, kind: str, **msg) -> None:
        if self.rank != 0:
            return
        msg["kind"] = kind
        msg.setdefault("time", time.time())
        if self.sink is None:
            print(f"[hybridlab] {msg}", flush=True)
            return
        try:
            self.sink.put_nowait(msg)
        except Exception as e:  # the driver went away: keep training, say so once
            if not getattr(self, "_warned", False):
                print(f"[hybridlab] warning: progress sink unavailable ({e.__class__.__name__}); continuing", flush=True)
                self._warned = True


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in n or "bias" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from hybridlab.arch import HybridLM, count_spec, load_model_spec
    from hybridlab.arch.pretrained import load_weights

    job, run = config["job"], config["run"]
    train, data, res = job["train"], job["data"], job["resources"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    emit = _Sink(config.get("sink"), rank)

    use_cuda = res.get("gpus_per_worker", 0) > 0 and torch.cuda.is_available()
    if use_cuda:
        import ray.train.torch as rtt

        device = rtt.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        n_threads = max(1, int(res.get("cpus_per_worker", 1)))
        torch.set_num_threads(n_threads)
    if not dist.is_initialized():  # Ray Train made the group; this is only for a bare world of one
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")

    _write_worker_info(run, rank, world, device)
    from hybridlab.jobs.sysmetrics import start_system_metrics, stop_system_metrics

    sysmon = start_system_metrics(run, job.get("tracking") or {}, ctx.get_local_rank(), ctx.get_node_rank())

    model_spec = load_model_spec(job["model"])
    torch.manual_seed(train["seed"])  # identical init on every rank
    model = HybridLM(model_spec)
    if job.get("model_from"):  # a fine-tune: start from a model folder's weights (`model: {from: DIR}`)
        load_weights(model, job["model_from"])
    if train.get("activation_checkpointing"):
        checkpoint_activations(model)
    n_params = sum(p.numel() for p in model.parameters())
    counts = count_spec(model_spec, data["seq_len"])
    flops_per_token = float(counts.get("flops_per_token_train") or 6 * n_params)

    ds_cfg = deepspeed_config(train, world)
    sched = None if "scheduler" in ds_cfg else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train)))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, train["weight_decay"]),
                                          config=ds_cfg, lr_scheduler=sched)

    # ---- resume: the run's own latest checkpoint (Ray restores it after a failure or on --resume)
    start_step, tokens_seen = 0, 0
    restored = ray.train.get_checkpoint()
    resume_path, data_state = None, None
    if restored is not None:
        with restored.as_directory() as d:
            resume_path = _load(engine, d, world, train)
            meta = ckpt.read_meta(d)
            data_state = ckpt.read_data_state(d, rank)
    if resume_path is not None:
        start_step, tokens_seen = int(meta["step"]), int(meta.get("tokens", 0))
        if sched is not None and engine.lr_scheduler is not None:
            # the job's lr wins over the checkpoint's (so `--resume --set train.lr=...` takes effect);
            # the schedule's shape (warmup, steps) always comes from the job
            engine.lr_scheduler.base_lrs = [train["lr"] for _ in engine.lr_scheduler.base_lrs]

    stream = TrainStream(data, train["micro_batch"], train["grad_accum"], train["seed"], rank, world)
    if resume_path is not None:
        stream.resume(data_state)  # a text stream continues where the checkpoint left it (else get() reads forward)
    run["_data_state"] = stream.state_dict
    steps, log_every, ck_every = train["steps"], train["log_every"], train["checkpoint_every"]
    seqs_per_step = train["micro_batch"] * train["grad_accum"] * world  # x the step's (padded) length = tokens
    emit("start", step=start_step, steps=steps, world=world, params=n_params, resumed_from=resume_path,
         device=str(device), flops_per_token=flops_per_token)

    stage_root = ckpt.staging_root(run["storage"])
    last_ckpt_step = start_step if resume_path else None
    t_window, tok_window = time.perf_counter(), 0
    peak = peak_flops(device)
    last = {}
    status, message = "finished", ""

    engine.train()
    step = start_step
    for step in range(start_step + 1, steps + 1):
        loss_sum, acc_sum = 0.0, 0.0
        for micro in range(train["grad_accum"]):
            b = stream.get(step, micro)
            inputs, targets = b.inputs.to(device), b.targets.to(device)
            logits = engine(inputs) if b.seq_idx is None else engine(inputs, seq_idx=b.seq_idx.to(device))
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            flag = torch.tensor([loss.detach().float().item(), 0.0 if torch.isfinite(loss).item() else 1.0], device=device)
            dist.all_reduce(flag)
            if flag[1].item() > 0:
                status = "nonfinite"
                break
            engine.backward(loss)
            engine.step()
            loss_sum += flag[0].item() / world
            if rank == 0 and micro == 0 and (step % log_every == 0 or step == steps):
                with torch.no_grad():
                    acc_sum = float(stream.task.score(logits.detach().float().cpu(), b)["acc"])
        if status == "nonfinite":
            good = f"step {last_ckpt_step}" if last_ckpt_step is not None else "none (no checkpoint was written yet)"
            message = f"loss became non-finite (nan/inf) at step {step}; training stopped; last good checkpoint: {good}"
            break
        loss_val = loss_sum / train["grad_accum"]
        tokens_per_step = seqs_per_step * stream.seq_len_at(step)  # a curriculum's stages differ in length
        tokens_seen += tokens_per_step
        tok_window += tokens_per_step
        if step % log_every == 0 or step == steps:
            dt = max(1e-9, time.perf_counter() - t_window)
            tps = tok_window / dt
            gn = engine.get_global_grad_norm()
            m = {
                "train/loss": loss_val,
                "train/acc": acc_sum,
                "train/lr": float(engine.get_lr()[0]),
                "train/tokens_per_s": tps,
                "train/tokens": float(tokens_seen),
                "train/step_time_s": dt / max(1, step - last.get("step", start_step)),
                "train/peak_mem_gb": peak_memory_bytes(device) / 1e9,
            }
            if gn is not None and math.isfinite(float(gn)):
                m["train/grad_norm"] = float(gn)
            if peak:
                m["train/mfu"] = flops_per_token * tps / (peak * world)
            emit("metrics", step=step, metrics=m)
            last = {"step": step, **m}
            t_window, tok_window = time.perf_counter(), 0
        if (ck_every and step % ck_every == 0) or step == steps:
            ok, message = _save(engine, step, tokens_seen, world, train, run, stage_root, n_params, emit)
            if not ok:
                status = "disk_full"
                good = f"step {last_ckpt_step}" if last_ckpt_step is not None else "none"
                message += f"; training stopped at step {step}; last good checkpoint: {good} (intact)"
                break
            last_ckpt_step = step
            t_window = time.perf_counter()  # checkpoint time is not training throughput

    final = {"step": step, "status": status, "message": message, "last_checkpoint_step": last_ckpt_step,
             "loss": last.get("train/loss"), "acc": last.get("train/acc")}
    if status == "finished" and job.get("eval"):
        evals = _evals(engine, job, device, train["zero_stage"], rank)
        if rank == 0:
            emit("eval", step=step, metrics=evals)
            final["evals"] = evals
    stop_system_metrics(sysmon)
    emit("end", **final)
    ray.train.report({"step": step, "status": status})
    dist.barrier()


def _write_worker_info(run: dict, rank: int, world: int, device) -> None:
    """``<run dir>/workers/rank_<r>.json`` (pid, host): for operators and fault tests."""
    import json

    if not ckpt.is_local(run["storage"]):
        return
    import ray

    d = os.path.join(ckpt.local_path(run["storage"]), run["name"], "workers")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"rank_{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname(),
                   "device": str(device), "node_id": ray.get_runtime_context().get_node_id(), "time": time.time()}, f)


def _load(engine, path: str, world: int, train: dict) -> str:
    meta = ckpt.read_meta(path)
    if meta.get("world") != world and train["zero_stage"] > 0:
        raise RuntimeError(f"checkpoint {path} was written by {meta.get('world')} ZeRO workers; "
                           f"this run has {world}: resume with resources.workers={meta.get('world')}")
    load_path, _ = engine.load_checkpoint(path, tag=ckpt.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    return path


def _save(engine, step, tokens, world, train, run, stage_root, n_params, emit) -> tuple[bool, str]:
    """Write one checkpoint on every rank; (False, reason) when it cannot fit (all ranks agree)."""
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank()
    mine, total = ckpt.estimate_bytes(n_params, train["zero_stage"], world, train["precision"])
    prev = run.get("_last_ckpt_bytes")
    if prev:
        mine, total = max(mine, prev // world if train["zero_stage"] else prev), max(total, prev)
    problem = ckpt.space_problem(stage_root, run["storage"], mine, total)
    flag = torch.tensor([1.0 if problem else 0.0], device=engine.device)
    dist.all_reduce(flag)
    if flag.item() > 0:
        msg = f"disk full: checkpoint at step {step} not written ({problem or 'another worker is out of space'})"
        return False, msg
    staging = ckpt.new_staging_dir(stage_root, step, rank)
    try:
        engine.save_checkpoint(staging, tag=ckpt.DS_TAG, client_state={"step": step, "tokens": tokens})
        ckpt.write_data_state(staging, rank, run["_data_state"]() if run.get("_data_state") else None)
        if rank == 0:
            ckpt.write_meta(staging, {"step": step, "tokens": tokens, "world": world, "zero_stage": train["zero_stage"],
                                      "precision": train["precision"], "time": time.time()})
        size = ckpt.dir_bytes(staging)
        ray.train.report({"step": step, "checkpoint_step": step},
                         checkpoint=ray.train.Checkpoint.from_directory(staging),
                         checkpoint_dir_name=ckpt.checkpoint_dir_name(step))
    except Exception as e:
        if ckpt.is_disk_full(e):
            raise RuntimeError(f"disk full while writing the checkpoint at step {step} ({e}); "
                               f"the previous checkpoint is intact") from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    run["_last_ckpt_bytes"] = size * world if train["zero_stage"] else size
    emit("checkpoint", step=step, path=os.path.join(run["storage"], run["name"], ckpt.checkpoint_dir_name(step)),
         bytes=run["_last_ckpt_bytes"])
    return True, ""


def _evals(engine, job: dict, device, zero_stage: int, rank: int) -> dict:
    """Rank 0 runs the evals (all ranks in lockstep under ZeRO-3, whose forward is collective)."""
    import torch.distributed as dist

    out = {}
    if zero_stage == 3 or rank == 0:
        module = engine.module
        out = run_evals(module, job["eval"], job["data"], device)
    dist.barrier()
    return out
