"""The job spec: what to train, on what data, with which resources, evals and sweep.

A job file is YAML validated like the arch spec (``hybridlab.arch.specio``):
errors read ``job.yaml:LINE key.path: message`` and surface as ``SpecError``.

```yaml
experiment: mqar-layouts
model: zoo:tiny-hybrid            # or a path, or an inline mapping
data:  {task: mqar, seq_len: 256, num_kv_pairs: 32}
train: {steps: 2000, micro_batch: 32, lr: 3.0e-3, warmup: 100, zero_stage: 2}
resources: {workers: 4, gpus_per_worker: 1}
eval:
  - {task: mqar, seq_lens: [256, 512, 1024]}
sweep: {model.layout: ["(m3 mlp) * 4", "(m3 mlp attn mlp) * 2"]}
```

``load_job`` returns a :class:`Job` (the typed spec, the resolved model spec and
the *resolved* plain dict, which is self-contained: the model is inlined, every
default filled in, so it can be saved with a run and re-loaded anywhere).
``expand_sweep`` turns a job with a ``sweep`` into one job per combination.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hybridlab.arch import specio
from hybridlab.arch.specio import SpecError, Source

DEFAULT_STORAGE = "./hybridlab_runs"
TOP_KEYS = ("experiment", "name", "model", "data", "train", "resources", "eval", "tracking", "storage", "sweep")


@dataclass
class DataSpec:
    """Training data: a task name plus the task's own options (passed to ``make_task``)."""

    task: str = "mqar"
    seq_len: Optional[int] = None  # None: the task's default length
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"task": self.task}
        if self.seq_len is not None:
            d["seq_len"] = self.seq_len
        d.update(self.options)
        return d


@dataclass
class TrainSpec:
    steps: int = 1000
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 2
    checkpoint_every: int = 0  # 0: only at the end
    activation_checkpointing: bool = False  # recompute each sub-block in the backward: less memory, ~1/3 more compute
    log_every: int = 10
    seed: int = 0
    deepspeed: dict = field(default_factory=dict)  # merged over the generated DeepSpeed config


@dataclass
class ResourcesSpec:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    custom: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    max_failures: int = 1


@dataclass
class EvalSpec:
    task: str
    seq_lens: list[int] = field(default_factory=list)
    batch_size: int = 32
    batches: int = 2
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"task": self.task, "seq_lens": list(self.seq_lens), "batch_size": self.batch_size, "batches": self.batches}
        d.update(self.options)
        return d


@dataclass
class TrackingSpec:
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
    experiment: Optional[str] = None  # default: the job's `experiment`
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class StorageSpec:
    path: str = DEFAULT_STORAGE  # local dir or a pyarrow URI (s3://, gs://, hdfs://) shared by all nodes
    keep: int = 2  # checkpoints kept per run


@dataclass
class JobSpec:
    model: Any
    experiment: str = "default"
    name: Optional[str] = None
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    eval: list[EvalSpec] = field(default_factory=list)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    sweep: dict[str, list] = field(default_factory=dict)


@dataclass
class Job:
    """A validated job: typed spec, the resolved model spec, and the resolved plain dict."""

    spec: JobSpec
    model_spec: Any
    resolved: dict
    src: Source
    label: str = ""  # sweep combination, e.g. "model.layout=(m3 mlp) * 4"
    sweep_values: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.resolved["data"]["seq_len"])

    def to_yaml(self) -> str:
        return dump_yaml(self.resolved)


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


# ---------------------------------------------------------------- loading


def load_job(job: str | Path | dict, overrides=(), file: str | None = None, check_data: bool = True,
             limits: bool = True) -> Job:
    """Load and validate a job from a file path, YAML text source or plain dict.

    ``overrides`` are ``key.path=value`` strings (``--set``); keys under
    ``model.`` go to the model spec when the model is a reference. ``limits``:
    also check this machine's limits (memory per worker, eval lengths, the
    storage path; ``jobs.preflight``) — off where the job runs elsewhere.
    """
    if isinstance(job, dict):
        data, src = copy.deepcopy(job), Source(file or "<job>")
    else:
        data, src = specio.load_yaml_file(job)
    if not isinstance(data, dict):
        raise src.error((), f"a job file must be a mapping, got {specio._kind(data)}")
    data, model_overrides = _apply(data, list(overrides or ()), src)
    return _validate(data, src, model_overrides, check_data=check_data, limits=limits)


def _apply(data: dict, overrides: list[str], src: Source) -> tuple[dict, list[str]]:
    """Split overrides into job overrides and model overrides (when the model is a reference)."""
    job_ov, model_ov = [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("model.") and not isinstance(data.get("model"), dict):
            model_ov.append(item.strip()[len("model."):])
        else:
            job_ov.append(item)
    data = specio.apply_overrides(data, job_ov, src)
    return data, model_ov


def _split_flat(cls, data: Any, src: Source, path: tuple, fixed: tuple[str, ...]):
    """Build a dataclass whose non-``fixed`` keys are free task options."""
    if not isinstance(data, dict):
        raise src.error(path, f"expected a mapping, got {specio._kind(data)}")
    known = {k: v for k, v in data.items() if k in fixed}
    options = {k: v for k, v in data.items() if k not in fixed}
    if "options" in data:
        raise src.error(path + ("options",), "put task options directly in the mapping")
    obj = specio.build(cls, known, src, path)
    for k, v in options.items():
        if isinstance(v, (dict,)) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
            raise src.error(path + (k,), "task options must be scalars or lists of scalars")
    obj.options = options
    return obj


def _validate(data: dict, src: Source, model_overrides: list[str], check_data: bool = True, limits: bool = True) -> Job:
    for key in data:
        if key not in TOP_KEYS:
            raise src.error((key,), f"unknown key{specio.did_you_mean(key, TOP_KEYS)}; allowed: {', '.join(TOP_KEYS)}")
    if "model" not in data:
        raise src.error((), "missing required key 'model' (zoo:NAME, a spec path, or an inline mapping)")
    raw = dict(data)
    # data and eval have free-form task options; build them by hand
    data_raw = raw.pop("data", {"task": "mqar"})
    eval_raw = raw.pop("eval", []) or []
    spec = specio.build(JobSpec, raw, src, ())
    spec.data = _split_flat(DataSpec, data_raw, src, ("data",), ("task", "seq_len"))
    if not isinstance(eval_raw, list):
        raise src.error(("eval",), f"expected a list of evals, got {specio._kind(eval_raw)}")
    evals = []
    for i, e in enumerate(eval_raw):
        if isinstance(e, dict) and "lengths" in e:
            if "seq_lens" in e:
                raise src.error(("eval", i, "lengths"), "give seq_lens or lengths, not both")
            e = dict(e)
            e["seq_lens"] = e.pop("lengths")
            src.lines[("eval", i, "seq_lens")] = src.line_of(("eval", i, "lengths"))
        evals.append(_split_flat(EvalSpec, e, src, ("eval", i), ("task", "seq_lens", "batch_size", "batches")))
    spec.eval = evals
    _check_values(spec, src)

    model_spec = _load_model(spec.model, model_overrides, src)
    vocab = int(getattr(model_spec, "vocab_size"))

    if check_data:
        task = _make_task(spec.data.task, spec.data.options, src, ("data",), spec.data.seq_len)
        tv = int(getattr(task, "vocab_size", 0) or 0)
        if tv > vocab:
            raise src.error(("data",), f"task {spec.data.task!r} needs a vocabulary of {tv} tokens but the model's vocab_size is {vocab}")
        if spec.data.seq_len is None:
            spec.data.seq_len = int(getattr(task, "seq_len", 0) or 0) or None
        for i, e in enumerate(spec.eval):
            from hybridlab.jobs.data import eval_task_options

            ename, eopts = eval_task_options(e.to_dict(), spec.data.to_dict())
            t = _make_task(ename, {k: v for k, v in eopts.items() if k != "seq_len"}, src, ("eval", i), eopts.get("seq_len"))
            tv = int(getattr(t, "vocab_size", 0) or 0)
            if tv > vocab:
                raise src.error(("eval", i), f"task {e.task!r} needs a vocabulary of {tv} tokens but the model's vocab_size is {vocab}")
            if not e.seq_lens:
                e.seq_lens = [spec.data.seq_len] if spec.data.seq_len else []
    if spec.data.seq_len is None:
        raise src.error(("data",), "missing required key 'seq_len'")

    if limits:
        from hybridlab.jobs.preflight import HostLimits, check_limits

        check_limits(spec, model_spec, src, HostLimits.detect())
    resolved = _resolved_dict(spec, model_spec, model_overrides)
    return Job(spec=spec, model_spec=model_spec, resolved=resolved, src=src)


def _check_values(spec: JobSpec, src: Source) -> None:
    t, r = spec.train, spec.resources
    pos = specio.positive
    pos(src, ("train", "steps"), t.steps)
    pos(src, ("train", "micro_batch"), t.micro_batch)
    pos(src, ("train", "grad_accum"), t.grad_accum)
    pos(src, ("train", "lr"), t.lr)
    pos(src, ("train", "log_every"), t.log_every)
    pos(src, ("resources", "workers"), r.workers)
    pos(src, ("storage", "keep"), spec.storage.keep)
    if spec.data.seq_len is not None:
        pos(src, ("data", "seq_len"), spec.data.seq_len)
    if t.zero_stage not in (0, 1, 2, 3):
        raise src.error(("train", "zero_stage"), f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    for k, v in (("warmup", t.warmup), ("checkpoint_every", t.checkpoint_every), ("seed", t.seed), ("weight_decay", t.weight_decay), ("grad_clip", t.grad_clip)):
        if v < 0:
            raise src.error(("train", k), f"must be >= 0, got {v}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise src.error(("train", "min_lr_ratio"), f"must be in [0, 1], got {t.min_lr_ratio}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise src.error(("train", "betas"), f"expected two numbers in [0, 1), got {t.betas}")
    for k, v in (("gpus_per_worker", r.gpus_per_worker), ("cpus_per_worker", r.cpus_per_worker), ("max_failures", r.max_failures)):
        if v < 0:
            raise src.error(("resources", k), f"must be >= 0, got {v}")
    if r.backend == "nccl" and r.gpus_per_worker <= 0:
        raise src.error(("resources", "backend"), "nccl needs GPUs: set resources.gpus_per_worker")
    for i, e in enumerate(spec.eval):
        for j, L in enumerate(e.seq_lens):
            pos(src, ("eval", i, "seq_lens", j), L)
        pos(src, ("eval", i, "batch_size"), e.batch_size)
        pos(src, ("eval", i, "batches"), e.batches)
    for key, values in spec.sweep.items():
        if not values:
            raise src.error(("sweep", key), "a sweep needs at least one value")
        if key.split(".")[0] not in TOP_KEYS or key.split(".")[0] in ("sweep", "experiment"):
            raise src.error(("sweep", key), f"cannot sweep {key!r}: sweep keys are job paths such as train.lr or model.layout")


def _load_model(ref: Any, overrides: list[str], src: Source):
    from hybridlab.arch import load_model_spec

    if isinstance(ref, str):
        if not ref.startswith("zoo:"):
            p = Path(ref)
            if not p.is_absolute() and src.file and not src.file.startswith("<"):
                cand = Path(src.file).parent / p
                if cand.exists() and not p.exists():
                    ref = str(cand)
        try:
            return load_model_spec(ref, overrides=overrides)
        except SpecError as e:
            if e.line is None and (e.file is None or e.file == ref or not Path(e.file).exists()):
                # a bad reference: point at the job's model key
                raise src.error(("model",) + tuple(e.path), e.message) from None
            raise
    if isinstance(ref, dict):
        return load_model_spec(ref, overrides=overrides, src=src, path=("model",))
    raise src.error(("model",), f"expected zoo:NAME, a spec path or a mapping, got {specio._kind(ref)}")


def _make_task(name: str, options: dict, src: Source, path: tuple, seq_len=None):
    """Build a task, turning its one-line TaskError into a SpecError located at the option it names."""
    from hybridlab.jobs.data import build_task
    from hybridlab.jobs.tasks import TaskError, UnknownTask

    try:
        return build_task(name, options, seq_len)
    except UnknownTask as e:
        raise src.error(path + ("task",), str(e)) from None
    except TaskError as e:
        key = e.option
        where = path + (key,) if key and (key in options or key == "seq_len") else path
        raise src.error(where, str(e)) from None


# ---------------------------------------------------------------- resolving


def model_to_dict(model_spec) -> dict:
    for attr in ("to_dict", "as_dict"):
        fn = getattr(model_spec, attr, None)
        if callable(fn):
            return fn()
    if dataclasses.is_dataclass(model_spec):
        return dataclasses.asdict(model_spec)
    raise TypeError(f"cannot turn {type(model_spec).__name__} into a dict")


def _resolved_dict(spec: JobSpec, model_spec, model_overrides) -> dict:
    d = {
        "experiment": spec.experiment,
        "name": spec.name,
        "model": _plain(model_to_dict(model_spec)),
        "data": spec.data.to_dict(),
        "train": dataclasses.asdict(spec.train),
        "resources": dataclasses.asdict(spec.resources),
        "eval": [e.to_dict() for e in spec.eval],
        "tracking": dataclasses.asdict(spec.tracking),
        "storage": dataclasses.asdict(spec.storage),
    }
    if spec.model and isinstance(spec.model, str):
        d["tracking"].setdefault("tags", {})
        d["model_ref"] = spec.model + (" " + " ".join(model_overrides) if model_overrides else "")
    return d


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def from_resolved(resolved: dict) -> Job:
    """Re-load a resolved job dict (e.g. inside a worker); no task construction."""
    d = {k: v for k, v in resolved.items() if k in TOP_KEYS}
    return load_job(d, file="<resolved job>", check_data=False, limits=False)


# ---------------------------------------------------------------- sweeps


def expand_sweep(job_file: str | Path | dict, overrides=(), job: Job | None = None, limits: bool = True) -> list[Job]:
    """One job per combination of the ``sweep`` values (the job itself if no sweep)."""
    job = job or load_job(job_file, overrides, limits=limits)
    sweep = job.spec.sweep
    if not sweep:
        return [job]
    keys = list(sweep)
    out = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        extra = [f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)]
        j = load_job(job_file, list(overrides or ()) + extra, limits=limits)
        j.resolved.pop("sweep", None)
        j.spec.sweep = {}
        j.sweep_values = dict(zip(keys, combo))
        j.label = ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
        out.append(j)
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict into dotted keys (lists become their JSON text)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v if isinstance(v, str) else json.dumps(v)
    return out
