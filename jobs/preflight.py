"""Pre-flight limits of a job: what must hold on this machine before anything starts.

``check_limits`` runs when a job is loaded for ``hybridlab run``, ``run --dry-run``
and ``check JOB`` (not inside a worker, not for ``submit``, whose driver checks
again on the cluster). Each failure is one located ``SpecError``
(``job.yaml:LINE key.path: ...``, exit 2):

* model memory per worker — parameters, gradients and AdamW state under the
  job's ZeRO stage, plus the activations of one micro-batch — against the
  memory a worker gets (its GPU's, or this host's RAM shared by its workers);
* each eval length: rank 0 scores ``batch_size`` sequences of that length after
  training, next to the model state;
* the storage path: a local one must be (or be creatable as) a writable folder
  on a disk with room for a checkpoint.

``check_local_placement`` runs for ``hybridlab run`` on the embedded local Ray
only (one node: this machine's cores and GPUs, no custom resources): a run it
could never place is refused at its ``resources`` key, where Ray would wait for
the resources forever. ``run --dry-run`` prints the same finding as a note (the
job may be meant for ``submit``).

The memory figures are estimates (the activation term counts about 40 values per
model dimension per token and sub-block, Megatron-LM's rule of thumb widened for
the Mamba-3 projections), meant to refuse what cannot fit, not to plan to the byte.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hybridlab.arch import count_spec
from hybridlab.arch.specio import Source
from hybridlab.jobs import checkpoint as ckpt
from hybridlab.jobs.spec import fp32_parameters

ACT_VALUES_PER_DIM = 40  # activation values kept per token, model dim and sub-block for the backward
EVAL_VALUES_PER_DIM = 16  # the widest intermediate of one sub-block in a no-grad forward
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "bf16-mixed": 2, "fp16": 2}


@dataclass(frozen=True)
class HostLimits:
    """What this machine gives a job's workers."""

    memory: int  # bytes of RAM (the cgroup limit when lower)
    gpu_memory: Optional[int]  # bytes of the smallest visible GPU; None: no GPU visible here
    shared_by_workers: bool = True  # the workers all run here (the embedded default), so they share `memory`
    cpus: Optional[int] = None  # cores (the embedded local Ray gets one CPU per core); None: not known
    gpus: int = 0  # visible GPUs

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def detect() -> "HostLimits":
        return HostLimits(memory=_host_memory(), gpu_memory=_gpu_memory(),
                          shared_by_workers=not os.environ.get("RAY_ADDRESS"), cpus=os.cpu_count(), gpus=_gpu_count())


def _host_memory() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _gpu_memory() -> Optional[int]:
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs while training (``state + activations``) and for an eval batch."""

    params: int
    state: int  # parameters, gradients, optimizer moments (and fp32 master copy) on this rank
    activations: int  # one micro-batch's forward kept for the backward

    @property
    def training(self) -> int:
        return self.state + self.activations


def model_state_bytes(n_params: int, zero_stage: int, world: int, precision: str) -> int:
    """Per-rank bytes of weights + gradients + AdamW moments (+ fp32 master weights under bf16/fp16)."""
    if fp32_parameters(precision):  # fp32, bf16-mixed
        weights, grads, optim = 4, 4, 8
    else:
        weights, grads, optim = 2, 2, 12  # optimizer: fp32 master copy + two fp32 moments
    shard = max(1, world)
    per_param = {0: weights + grads + optim,
                 1: weights + grads + optim / shard,
                 2: weights + (grads + optim) / shard}.get(zero_stage, (weights + grads + optim) / shard)
    return int(n_params * per_param)


def activation_bytes(model_spec, micro_batch: int, seq_len: int, precision: str, checkpointing: bool) -> int:
    eb = ELEMENT_BYTES.get(precision, 4)
    tokens = micro_batch * seq_len
    sub_blocks, d = len(model_spec.layers), model_spec.d_model
    per_block = ACT_VALUES_PER_DIM * d * eb
    body = (sub_blocks * d * eb + per_block) if checkpointing else sub_blocks * per_block
    logits = model_spec.vocab_size * (eb + 8)  # the logits, their fp32 copy and its softmax gradient
    return int(tokens * (body + logits))


def eval_bytes(model_spec, batch_size: int, seq_len: int) -> int:
    tokens = batch_size * seq_len
    return int(tokens * (EVAL_VALUES_PER_DIM * model_spec.d_model * 4 + model_spec.vocab_size * 12))


def eval_rows(task: str, batch_size: int, options: dict) -> int:
    """Sequences one eval forward holds: ``batch_size``, but a needle-in-a-haystack eval has only
    ``samples`` prompts per (length, depth) to batch."""
    if task == "niah":
        from hybridlab.jobs.text_evals import OPTIONS

        return max(1, min(int(batch_size), int(options.get("samples", OPTIONS["niah"]["samples"].default))))
    return int(batch_size)


def estimate(spec, model_spec) -> MemoryEstimate:
    t, r = spec.train, spec.resources
    n = int(count_spec(model_spec, 1)["params"])
    return MemoryEstimate(
        params=n,
        state=model_state_bytes(n, t.zero_stage, r.workers, t.precision),
        activations=activation_bytes(model_spec, t.micro_batch, int(spec.data.seq_len or 1), t.precision,
                                     t.activation_checkpointing),
    )


def worker_memory(spec, host: HostLimits) -> Optional[tuple[int, str]]:
    """(bytes one worker gets, what that is), or None when this machine cannot tell (GPUs elsewhere)."""
    r = spec.resources
    if r.gpus_per_worker > 0:
        if host.gpu_memory is None:
            return None
        return int(host.gpu_memory * min(1.0, r.gpus_per_worker)), "of GPU memory per worker"
    if host.shared_by_workers:
        return host.memory // max(1, r.workers), f"of RAM per worker ({_gb(host.memory)} shared by {r.workers})"
    return host.memory, "of RAM on this node"


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_limits(spec, model_spec, src: Source, host: HostLimits) -> None:
    """Raise a located SpecError for the first limit this job breaks on this machine."""
    est = estimate(spec, model_spec)
    have = worker_memory(spec, host)
    if have is not None:
        cap, what = have
        t = spec.train
        if est.state > cap:
            raise src.error(("model",), f"the model needs {_gb(est.state)} per worker for its {est.params:,} "
                                        f"parameters, gradients and AdamW state (ZeRO-{t.zero_stage} over "
                                        f"{spec.resources.workers} worker(s), {t.precision}) but there is {_gb(cap)} {what}")
        if est.training > cap:
            raise src.error(("train", "micro_batch"),
                            f"{t.micro_batch} sequences of {spec.data.seq_len} tokens need about "
                            f"{_gb(est.activations)} of activations on top of {_gb(est.state)} of model state, "
                            f"but there is {_gb(cap)} {what} (lower micro_batch, use grad_accum, or "
                            f"activation_checkpointing: true)")
        for i, e in enumerate(spec.eval):
            rows = eval_rows(e.task, e.batch_size, e.options)
            for j, length in enumerate(e.seq_lens):
                need = est.state + eval_bytes(model_spec, rows, int(length))
                if need > cap:
                    raise src.error(("eval", i, "seq_lens", j),
                                    f"an eval batch of {rows} x {length} tokens needs about {_gb(need)} "
                                    f"with the model state, but there is {_gb(cap)} {what} (lower the length or batch_size)")
    # A job whose GPU workers cannot run on this machine will write its checkpoints from
    # theirs, so this disk's free space says nothing about it (writability still does: the
    # driver creates the run folder here).
    check_storage(spec, model_spec, src, est.params, check_free=have is not None)


def _write_problem(folder: Path) -> Optional[str]:
    """Why nothing can be created in ``folder`` (tried for real, then removed: root bypasses
    permission bits, read-only mounts and /proc do not), or None."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hybridlab-probe-", dir=folder))
    except OSError as e:
        return f"refuses new folders ({e.strerror or e.__class__.__name__})"
    return None


def check_storage(spec, model_spec, src: Source, n_params: int, check_free: bool = True) -> None:
    path = spec.storage.path
    if not ckpt.is_local(path):
        return  # an object store: its client reports problems with its own words
    p = Path(os.path.expanduser(ckpt.local_path(path))).absolute()
    where = ("storage", "path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise src.error(where, f"{path!r}: {probe} is a file, not a folder")
    problem = _write_problem(probe)
    if problem:
        detail = "" if probe == p else f" (cannot create it: {probe} {problem})"
        raise src.error(where, f"{path!r} is not writable{detail or ': ' + problem}")
    if not check_free:
        return
    t = spec.train
    _, one = ckpt.estimate_bytes(n_params, t.zero_stage, spec.resources.workers, t.precision)
    need = 2 * one  # a checkpoint staged beside the storage while the previous one is still kept
    free = ckpt.free_bytes(str(probe))
    if free < need:
        raise src.error(where, f"{path!r}: {_gb(free)} free on its disk, a checkpoint of this model needs about {_gb(need)}")


def check_local_placement(spec, src: Source, host: HostLimits) -> None:
    """Raise a located SpecError when one run's workers cannot all be placed on this one machine."""
    r = spec.resources
    if r.custom:
        name = next(iter(r.custom))
        raise src.error(("resources", "custom"), f"{name!r}: the local Ray has no custom resources (they come "
                                                  f"from a cluster's nodes: `hybridlab submit` or $RAY_ADDRESS)")
    if r.placement == "STRICT_SPREAD" and r.workers > 1:
        raise src.error(("resources", "placement"), f"STRICT_SPREAD puts each of the {r.workers} workers on a node "
                                                     f"of its own, and the local Ray is one node (use PACK or SPREAD)")
    if r.gpus_per_worker > 0 and host.gpus == 0:
        raise src.error(("resources", "gpus_per_worker"), f"{r.gpus_per_worker:g} GPU per worker, but this machine "
                                                           f"has no GPU (set it to 0 to train on CPU)")
    for key, each, have, unit in (("gpus_per_worker", r.gpus_per_worker, host.gpus, "GPU"),
                                  ("cpus_per_worker", r.cpus_per_worker, host.cpus, "CPU")):
        need = r.workers * each
        if have is None or need <= have + 1e-9:
            continue
        if each > have:
            raise src.error(("resources", key), f"{each:g} {unit}s per worker, and this machine has {have}")
        raise src.error(("resources", "workers"), f"{r.workers} workers x {each:g} {unit} ({key}) need "
                                                   f"{need:g} {unit}s, and this machine has {have}")
