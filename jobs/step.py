"""One training step, the unit that a job's workers and ``hybridlab bench train`` both run.

* ``build_engine(model, train, world)``: the DeepSpeed engine of a job — AdamW with
  weight decay off for norms and biases, the job's LR schedule, ZeRO stage,
  precision and clipping (``deepspeed_config``).
* :class:`TrainStep`: ``step(micro_batches)`` runs forward, loss, backward and the
  optimizer step for each micro-batch of one optimizer step and returns device
  tensors; it never waits for the device. A batch of packed documents (``seq_idx``)
  goes to the model with its boundaries. The loss is ``loss_fn(logits, targets)``
  (cross-entropy over the scored tokens) for plain modules; a ``HybridLM`` computes its
  own loss through the chunked LM-head + cross-entropy (never the fp32 logits), compiled
  with ``torch.compile`` when ``train.compile`` says so; the optimizer is torch's fused
  AdamW on CUDA (``optimizer_choice``).
* :class:`StepStats`: what the loop needs to know about its steps — the loss of the
  newest step, whether any loss since the last sync was non-finite (and the first
  step where it was) — kept on the device and brought to the host once per
  ``log_every`` with one collective, so no micro-step waits for the device or
  for the other ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from hybridlab.jobs.spec import fp32_parameters

# dense bf16 peak FLOP/s by device-name fragment, for the MFU estimate
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
IGNORE_INDEX = -100


def _train_dict(train) -> dict:
    return dataclasses.asdict(train) if dataclasses.is_dataclass(train) else train


def deep_merge(base: dict, extra: dict) -> dict:
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def deepspeed_config(train, world_size: int) -> dict:
    """The DeepSpeed config of a job's ``train`` section (a ``TrainSpec`` or its dict; ``train.deepspeed`` merged last)."""
    train = _train_dict(train)
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
        "torch_autocast": {"enabled": prec == "bf16-mixed", "dtype": "bfloat16"},
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 12, "loss_scale_window": 100},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, train.get("deepspeed") or {})


def lr_lambda(train):
    train = _train_dict(train)
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, norms and biases do not."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in n or "bias" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def checkpoint_activations(model) -> None:
    """Recompute each sub-block's forward in the backward instead of keeping its activations (torch
    non-reentrant checkpointing; decoding with a cache is left as it is)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        fwd = layer.forward
        layer.forward = lambda x, cache=None, seq_idx=None, _f=fwd: (
            checkpoint(_f, x, cache, seq_idx, use_reentrant=False) if cache is None else _f(x, cache))


def use_compile(setting, device: torch.device, zero_stage: int = 0) -> bool:
    """``train.compile``: ``"auto"`` compiles on CUDA (inductor's Triton kernels) and not on the CPU, nor
    under ZeRO-3 (whose per-module parameter gathering hooks dynamo would trace through; ``true`` forces it)."""
    if setting == "auto":
        return device.type == "cuda" and zero_stage < 3
    return bool(setting)


def compile_options(mode: str = "default", backend: Optional[str] = None) -> dict:
    """``torch.compile`` keywords of ``train.compile_mode`` (``backend``: a test's ``aot_eager``, which has no modes).
    ``dynamic=False``: a curriculum's few stage lengths are compiled (and graphed) one each, never as symbolic
    shapes, which cost every step on the host and cannot be CUDA graphs per shape."""
    if backend:
        return {"backend": backend, "dynamic": False}
    return {"dynamic": False} if mode == "default" else {"mode": mode, "dynamic": False}


# batch shapes one compiled training path may see: a curriculum's stages (the paper recipes have 16-23), each
# with and without scored_at; dynamo's default (8) runs every shape after the 8th eager, with one log warning
COMPILED_SHAPES = 64


def allow_shapes(n: int) -> None:
    """Let torch.compile keep up to ``n`` shape-specialised graphs of a function (never lowers the limit)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, n)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n)


# which optimizer a job's engine steps with (see optimizer_choice)
TORCH_FUSED, TORCH, DEEPSPEED = "torch-fused", "torch", "deepspeed"


def optimizer_choice(train, device: torch.device) -> str:
    """``torch-fused``: torch's fused AdamW (one kernel for all tensors) handed to DeepSpeed as the
    client optimizer — on CUDA under ZeRO 0-2, where DeepSpeed gives the client optimizer its fp32
    master partitions; ``torch``: plain torch AdamW the same way (CPU: fused kernels are for CUDA);
    ``deepspeed``: the optimizer of the DeepSpeed config (ZeRO-3, whose partitioned parameters DeepSpeed
    builds its own optimizer over, or a ``train.deepspeed.optimizer`` the user wrote)."""
    train = _train_dict(train)
    if train["zero_stage"] >= 3 or "optimizer" in (train.get("deepspeed") or {}):
        return DEEPSPEED
    return TORCH_FUSED if device.type == "cuda" else TORCH


def make_optimizer(model: torch.nn.Module, train, device: torch.device) -> Optional[torch.optim.Optimizer]:
    """The client optimizer of :func:`optimizer_choice` (None: DeepSpeed builds the config's), over
    :func:`param_groups` with the job's lr, betas and weight decay."""
    train = _train_dict(train)
    choice = optimizer_choice(train, device)
    if choice == DEEPSPEED:
        return None
    return torch.optim.AdamW(param_groups(model, train["weight_decay"]), lr=train["lr"], betas=tuple(train["betas"]),
                             eps=1e-8, weight_decay=train["weight_decay"], fused=choice == TORCH_FUSED)


def engine_zero_stage(train, world: int) -> int:
    """The ZeRO stage the engine runs: ``train.zero_stage``, except that ZeRO 1-2 over fp32 parameters
    (``fp32``, ``bf16-mixed``) on a world of one partitions over one rank — nothing saved, but
    per-parameter gradient hooks, bucket copies and collectives on every step — so it runs as stage 0
    (the same losses, the same memory). Not in bf16/fp16: DeepSpeed's stage-0 16-bit optimizer
    accumulates gradients in 16 bits (measured: looser losses than ZeRO-2's fp32 accumulation). A
    ``train.deepspeed.zero_optimization`` written by the user is kept as written."""
    train = _train_dict(train)
    stage = deepspeed_config(train, world)["zero_optimization"].get("stage", train["zero_stage"])
    if (world == 1 and stage in (1, 2) and fp32_parameters(train["precision"])
            and "zero_optimization" not in (train.get("deepspeed") or {})):
        return 0
    return stage


def import_deepspeed():
    """``deepspeed``, with its CPU shared-memory all-reduce op switched off before any of its comm starts.

    DeepSpeed's torch backend JIT-builds that op (ninja, minutes on two cores) whenever it starts on a
    CPU, under torch's ``FileBaton``: a lock *file* in ``~/.cache/torch_extensions`` that a worker killed
    mid-build (a preemption, a stop, a timeout) leaves behind, after which every later worker on the
    machine waits on it forever. Training never uses the op (only DeepSpeed inference's tensor-parallel
    all-reduce does; gradients go through ``torch.distributed``), so it is marked incompatible, which is
    DeepSpeed's own switch for "not on this machine"."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:  # accelerators without the op (CUDA) have nothing to build
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return deepspeed


def build_engine(model: torch.nn.Module, train, world: int, device: Optional[torch.device] = None,
                 compile_backend: Optional[str] = None):
    """(DeepSpeed engine, whether the job's LR schedule is ours): the job's optimizer, schedule and ZeRO set-up.

    ``device``: where the model trains (picks the optimizer and ``train.compile: auto``; default: CUDA
    when available). With compile on, the model's training path (forward with targets) goes through
    ``torch.compile`` (lazily: the first step compiles; ``TrainStep`` times it); ``compile_backend``
    overrides inductor (tests on CPU use ``aot_eager``: no C++ build)."""
    deepspeed = import_deepspeed()
    train = _train_dict(train)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = deepspeed_config(train, world)
    cfg["zero_optimization"]["stage"] = engine_zero_stage(train, world)
    own_schedule = "scheduler" not in cfg
    sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))) if own_schedule else None
    if use_compile(train.get("compile", "auto"), device, train["zero_stage"]) and hasattr(model, "compile_training"):
        allow_shapes(COMPILED_SHAPES)
        model.compile_training(**compile_options(train.get("compile_mode", "default"), compile_backend))
    optimizer = make_optimizer(model, train, device)
    if optimizer is not None:
        cfg.pop("optimizer", None)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, lr_scheduler=sched)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, train["weight_decay"]),
                                              config=cfg, lr_scheduler=sched)
    if world == 1 and cfg["zero_optimization"]["stage"] == 0:
        # an all-reduce over one rank is the identity, but DeepSpeed would still flatten every gradient
        # into buckets, reduce and copy back after each backward
        engine.enable_backward_allreduce = False
    return engine, own_schedule


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored tokens (targets ``-100`` are not scored), in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean loss over the step's micro-batches, on the device (no sync)
    predictions: Optional[torch.Tensor] = None  # the first micro-batch's (B, L) arg-max ids on the device, when asked for


class StepStats:
    """Device-side statistics of the steps since the last :meth:`sync`.

    ``add(step, loss)`` costs a few tiny device ops and never synchronizes;
    ``sync(stop)`` all-reduces them across ranks (two small collectives), reads
    them once and starts a new window.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._step_loss = torch.zeros((), device=device, dtype=torch.float32)
        self._nonfinite = torch.zeros((), device=device, dtype=torch.float32)
        self._first_bad = torch.zeros((), device=device, dtype=torch.float32)  # -(first bad step), 0: none

    def add(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        self._step_loss = torch.where(bad, torch.zeros_like(loss), loss)
        self._nonfinite = self._nonfinite + bad.float()
        self._first_bad = torch.where(bad & (self._first_bad == 0), torch.full_like(loss, -float(step)), self._first_bad)

    def sync(self, stop: bool = False) -> "Synced":
        import torch.distributed as dist

        sums = torch.stack([self._step_loss, self._nonfinite, torch.full_like(self._nonfinite, float(stop))])
        first = (-self._first_bad).reshape(1)  # 0 where no bad step
        first = torch.where(first > 0, -first, torch.full_like(first, -float("inf")))  # max over ranks = -(earliest)
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
            world = dist.get_world_size()
        else:
            world = 1
        loss_sum, nonfinite, stops = sums.tolist()
        first_bad = first.item()
        self._nonfinite.zero_()
        self._first_bad.zero_()
        return Synced(loss=loss_sum / world, nonfinite=nonfinite > 0, stop=stops > 0,
                      first_bad_step=int(-first_bad) if math.isfinite(first_bad) else None)


@dataclass
class Synced:
    loss: float  # the newest step's loss, averaged over ranks and micro-batches
    nonfinite: bool  # a non-finite loss on some rank since the last sync
    stop: bool  # some rank was asked to stop
    first_bad_step: Optional[int] = None


class TrainStep:
    """One optimizer step of a job: ``grad_accum`` micro-batches through the engine, then its step.

    A model that ``computes_loss`` (``HybridLM``) is asked for its loss (``engine(inputs, targets=...)``:
    the chunked LM-head + cross-entropy, compiled with the model when ``train.compile`` is on); any
    other module returns logits and ``loss_fn(logits, targets)`` scores them. ``keep_predictions`` (log
    points): the first micro-batch's arg-max ids (``predictions``: one extra forward without gradients, the
    LM head over the scored positions only), for train/acc.
    ``compile_s``: the first step's wall time when the model's training path is compiled (the first
    call compiles it), printed once; None otherwise.
    """

    def __init__(self, engine, device: torch.device, loss_fn: Callable = cross_entropy):
        self.engine, self.device, self.loss_fn = engine, device, loss_fn
        module = getattr(engine, "module", None)
        self.model_loss = bool(getattr(module, "computes_loss", False)) and loss_fn is cross_entropy
        self.compiled = getattr(module, "_compiled_loss", None) is not None
        self.compile_s: Optional[float] = None
        self._calls = 0

    def __call__(self, micro_batches: Sequence, keep_predictions: bool = False) -> StepOutput:
        self._calls += 1
        if self.compiled and self._calls == 1:  # the first step compiles: time it (one sync, once)
            t0 = time.perf_counter()
            out = self._step(micro_batches, keep_predictions)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_s = time.perf_counter() - t0
            print(f"torch.compile: the training step compiled and ran its first step in {self.compile_s:.1f} s",
                  flush=True)
            return out
        return self._step(micro_batches, keep_predictions)

    def _engine_autocast(self):
        """The autocast the engine's own forward runs under (``precision: bf16-mixed``), for the forward that
        goes to the module directly: otherwise it would run in the fp32 parameters' precision (other kernels,
        and on a GPU compiled once more at the first log point)."""
        engine = self.engine
        if callable(getattr(engine, "torch_autocast_enabled", None)) and engine.torch_autocast_enabled():
            return torch.autocast(self.device.type, dtype=engine.torch_autocast_dtype())
        return contextlib.nullcontext()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # a copy from pageable host memory makes the host wait for the stream (CUDA stages it), so every
        # micro-step would wait for the previous one's kernels; from pinned memory (torch's caching host
        # allocator: no new allocation per step) the copy is queued and the host runs ahead
        if self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _step(self, micro_batches: Sequence, keep_predictions: bool) -> StepOutput:
        total, first_preds = None, None
        for i, b in enumerate(micro_batches):
            inputs, targets = self._to_device(b.inputs), self._to_device(b.targets)
            kw = {} if b.seq_idx is None else {"seq_idx": self._to_device(b.seq_idx)}
            if self.model_loss:
                if keep_predictions and i == 0:  # this one micro-batch's predictions, for train/acc (a log point only)
                    with torch.no_grad(), self._engine_autocast():
                        first_preds = predictions(self.engine.module, inputs, b.targets, **kw)
                at = scored_positions(b.targets)
                if at is not None:
                    kw["scored_at"] = self._to_device(at)
                loss = self.engine(inputs, targets=targets, **kw)
            else:  # packed documents (seq_idx): each one attends/scans only within itself
                logits = self.engine(inputs, **kw)
                loss = self.loss_fn(logits, targets)
                if keep_predictions and i == 0:
                    first_preds = logits.detach().argmax(-1)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the update at the last micro-batch of the step
            total = loss.detach() if total is None else total + loss.detach()
        return StepOutput(loss=total / len(micro_batches), predictions=first_preds)


def scored_positions(targets: torch.Tensor, max_fraction: float = 0.5) -> Optional[torch.Tensor]:
    """(B, K) int64 positions holding every scored token (``targets != -100``) of each row of a host batch,
    for ``HybridLM``'s ``scored_at``; None when more than ``max_fraction`` of the positions are scored (then
    the LM head over all of them costs little more) or the targets are not on the host (no device sync).
    Each row lists its scored positions first, then unscored ones up to K: the most any row has, rounded up
    to a power of two (at least 8, at most L) so that a compiled step sees few shapes."""
    if targets.device.type != "cpu" or targets.dim() != 2 or targets.shape[0] == 0:
        return None
    unscored = targets == IGNORE_INDEX
    L = targets.shape[1]
    most = int(L - unscored.sum(1).min())
    k = min(L, max(8, 1 << max(most - 1, 0).bit_length()))
    if k > max_fraction * L:
        return None
    return torch.argsort(unscored.to(torch.int8), dim=1, stable=True)[:, :k].contiguous()


def keeps_predictions(log_point: bool, rank: int, engine_stage: int) -> bool:
    """Whether this rank runs a log point's extra forward for train/acc: rank 0 scores it, and under ZeRO-3
    a forward is collective, so every rank runs it."""
    return log_point and (rank == 0 or engine_stage == 3)


def has_own_head(model) -> bool:
    """A ``HybridLM`` (or a model built like one): hidden states on request, then its ``lm_head``."""
    return bool(getattr(model, "computes_loss", False)) and isinstance(getattr(model, "lm_head", None), torch.nn.Module)


def scored_logits(model, inputs: torch.Tensor, host_targets: torch.Tensor, **kw):
    """The logits a task scores: a ``HybridLM``'s at each row's scored positions only, ``(B, K, V)`` with
    those ``(B, K)`` host positions (``scored_positions``), when few are scored; else every position's,
    ``(B, L, V)`` and None. At MQAR's vocabulary the full logits of an eval batch are gigabytes."""
    at = scored_positions(host_targets) if has_own_head(model) else None
    if at is None:
        return model(inputs, **kw), None
    h = model(inputs, return_hidden=True, **kw)
    idx = at.to(h.device)
    return model.lm_head(h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))), at


def predictions(model, inputs: torch.Tensor, host_targets: torch.Tensor, **kw) -> torch.Tensor:
    """(B, L) arg-max ids on the model's device; -1 at positions ``scored_logits`` left out (never scored)."""
    logits, at = scored_logits(model, inputs, host_targets, **kw)
    ids = logits.argmax(-1)
    return ids if at is None else spread(ids, at, tuple(host_targets.shape), -1)


def spread(values: torch.Tensor, at: torch.Tensor, shape: tuple, fill) -> torch.Tensor:
    """(B, K) values at their (B, K) positions ``at`` (``scored_logits``) in a (B, L) tensor of ``fill``."""
    return torch.full(shape, fill, dtype=values.dtype, device=values.device).scatter_(1, at.to(values.device), values)


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
