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

A sweep is one product (the mapping above: every combination of its keys'
values) or a union of products (a list of such mappings, run one after
another); inside a product, ``zip: {key: [...], key2: [...]}`` pairs values
up instead of crossing them (a list of such mappings: several zipped axes)
(:class:`Sweep`). An eval entry without ``task`` evaluates the training task.

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
from typing import Any, Literal, Optional, Union

import yaml

from hybridlab.arch import specio
from hybridlab.arch.specio import SpecError, Source
from hybridlab.jobs.curriculum import Curriculum

DEFAULT_STORAGE = "./hybridlab_runs"
TOP_KEYS = ("experiment", "name", "model", "model_from", "data", "train", "resources", "eval", "tracking", "storage",
            "sweep")


@dataclass
class DataSpec:
    """Training data: a task name plus the task's own options (passed to ``make_task``)."""

    task: str = "mqar"
    seq_len: Optional[int] = None  # None: the task's default length (with a curriculum: its longest)
    curriculum: Optional[Curriculum] = None  # variable-length training batches (jobs/curriculum.py)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"task": self.task}
        if self.seq_len is not None:
            d["seq_len"] = self.seq_len
        if self.curriculum is not None:
            d["curriculum"] = self.curriculum.to_dict()
        d.update(self.options)
        return d


@dataclass
class ValidationSpec:
    """``train.validation``: which of the job's evals run at each ``eval_every`` (jobs/validation.py)."""

    tasks: list[str] = field(default_factory=list)  # eval task names as in the eval list; empty: all
    seq_lens: list[int] = field(default_factory=list)  # empty: each eval entry's own lengths
    batches: Optional[int] = None  # None: the eval entry's
    batch_size: Optional[int] = None


@dataclass
class EarlyStopSpec:
    """``train.early_stop``: end training once a validated metric reaches a threshold (jobs/validation.py)."""

    metric: str
    threshold: float
    mode: Literal["max", "min"] = "max"
    patience: int = 1  # validation points in a row at which the threshold must hold


# train.precision: fp32; bf16 / fp16: DeepSpeed's 16-bit parameters with fp32 master weights in the optimizer;
# bf16-mixed: fp32 parameters, the forward under bf16 autocast (torch's autocast inside DeepSpeed's engine)
Precision = Literal["fp32", "bf16", "bf16-mixed", "fp16"]


def fp32_parameters(precision: str) -> bool:
    """Whether the model's parameters (and their gradients) are fp32: no separate master copy."""
    return precision in ("fp32", "bf16-mixed")


# torch.compile's modes (train.compile_mode, `bench train --compile-mode`)
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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
    precision: Precision = "fp32"
    zero_stage: int = 2
    checkpoint_every: int = 0  # 0: only at the end
    activation_checkpointing: bool = False  # recompute each sub-block in the backward: less memory, ~1/3 more compute
    compile: Union[Literal["auto"], bool] = "auto"  # torch.compile the training step; auto: on CUDA (not ZeRO-3), off on the CPU
    # torch.compile's mode; reduce-overhead replays the step's forward and backward as CUDA graphs (small models)
    compile_mode: CompileMode = "default"
    log_every: int = 10
    seed: int = 0
    deepspeed: dict = field(default_factory=dict)  # merged over the generated DeepSpeed config
    eval_every: Optional[int] = None  # validate every N steps (jobs/validation.py); None: only the final evals
    validation: Optional[ValidationSpec] = None
    early_stop: Optional[EarlyStopSpec] = None


@dataclass
class ResourcesSpec:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    custom: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    max_failures: int = 1
    concurrent_runs: int = 1  # sweep combinations trained at once, each its own TorchTrainer (fractional resources pack them)


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


class Sweep(dict):
    """The validated ``sweep:`` of a job.

    ``products``: the list of products ``expand_sweep`` runs, one per entry of the
    list form (the mapping form is one product). A product maps job paths to
    lists of values (a single value is a list of one) and may hold ``zip``: a
    mapping (or a list of mappings) whose lists are taken element by element, each
    mapping one axis of the product (stored as a list of mappings).
    As a mapping, a ``Sweep`` is every swept key -> every value it takes across
    the products (what a sweep's parent run records); it dumps to YAML as written.
    """

    def __init__(self, products: list | tuple = (), form: str = "mapping"):
        super().__init__()
        self.products = [dict(p) for p in products]
        self.form = form
        for product in self.products:
            for axis in _axes(product):
                for combo in axis:
                    for k, v in combo.items():
                        seen = self.setdefault(k, [])
                        if v not in seen:
                            seen.append(v)

    def raw(self):
        """The sweep as written (normalised): one mapping, or a list of mappings."""
        if not self.products:
            return {}
        return self.products[0] if self.form == "mapping" else list(self.products)

    def combinations(self, with_product: bool = False) -> list:
        """Every run's sweep values ({job path: value}), in order: products in turn, the last key
        fastest; with ``with_product``, (product index, values) pairs."""
        out = []
        for i, product in enumerate(self.products):
            for pick in itertools.product(*_axes(product)):
                combo: dict = {}
                for part in pick:
                    combo.update(part)
                out.append((i, combo) if with_product else combo)
        return out


def _axes(product: dict) -> list[list[dict]]:
    """A product's axes, each a list of {key: value} choices (a zip group is one axis of several keys)."""
    axes = []
    for key, values in product.items():
        if key == ZIP_KEY:
            for group in values:
                keys = list(group)
                axes.append([dict(zip(keys, row)) for row in zip(*(group[k] for k in keys))])
        else:
            axes.append([{key: v} for v in values])
    return axes


ZIP_KEY = "zip"
yaml.add_representer(Sweep, lambda dumper, sweep: dumper.represent_data(sweep.raw()), Dumper=yaml.SafeDumper)


@dataclass
class TrackingSpec:
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
    experiment: Optional[str] = None  # default: the job's `experiment`
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics: bool = True  # CPU / memory / GPU metrics, one monitor per node (jobs/sysmetrics.py)
    system_metrics_interval: float = 10.0  # seconds between samples


@dataclass
class StorageSpec:
    path: str = DEFAULT_STORAGE  # local dir or a pyarrow URI (s3://, gs://, hdfs://) shared by all nodes
    keep: int = 2  # checkpoints kept per run


@dataclass
class JobSpec:
    model: Any
    # a model folder (hybridlab.arch.pretrained) whose weights the model starts from: `model: {from: DIR}`
    # sets it (the resolved job then holds the folder's spec as `model` and the folder here)
    model_from: Optional[str] = None
    experiment: str = "default"
    name: Optional[str] = None
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    eval: list[EvalSpec] = field(default_factory=list)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    sweep: Sweep = field(default_factory=Sweep)


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
    model = data.get("model")
    by_reference = not isinstance(model, dict) or "from" in model  # zoo:NAME, a path, or {from: DIR}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("model.") and by_reference:
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
        if isinstance(v, dict):  # e.g. data.dataset: a mapping of scalars (or lists of scalars)
            for kk, vv in v.items():
                if isinstance(vv, dict) or (isinstance(vv, list) and any(isinstance(x, (dict, list)) for x in vv)):
                    raise src.error(path + (k, kk), "values here must be scalars or lists of scalars")
        elif isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            raise src.error(path + (k,), "task options must be scalars, lists of scalars or mappings of them")
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
    sweep_raw = raw.pop("sweep", None)
    spec = specio.build(JobSpec, raw, src, ())
    spec.sweep = _parse_sweep(sweep_raw, src)
    spec.data = _split_flat(DataSpec, data_raw, src, ("data",), ("task", "seq_len", "curriculum"))
    if not isinstance(eval_raw, list):
        raise src.error(("eval",), f"expected a list of evals, got {specio._kind(eval_raw)}")
    evals = []
    for i, e in enumerate(eval_raw):
        if isinstance(e, dict) and "task" not in e and isinstance(data_raw, dict):
            e = {"task": data_raw.get("task", "mqar"), **e}  # the training task (its data options are inherited)
            src.lines[("eval", i, "task")] = src.line_of(("eval", i))
        if isinstance(e, dict) and "lengths" in e:
            if "seq_lens" in e:
                raise src.error(("eval", i, "lengths"), "give seq_lens or lengths, not both")
            e = dict(e)
            e["seq_lens"] = e.pop("lengths")
            src.lines[("eval", i, "seq_lens")] = src.line_of(("eval", i, "lengths"))
        evals.append(_split_flat(EvalSpec, e, src, ("eval", i), ("task", "seq_lens", "batch_size", "batches")))
    spec.eval = evals
    _check_values(spec, src)

    model_ref = _model_origin(spec, src)
    model_spec = _load_model(model_ref, model_overrides, src)
    if spec.model_from:
        _check_origin_shapes(model_spec, spec, src)
    vocab = int(getattr(model_spec, "vocab_size"))

    if spec.data.curriculum is not None:
        _check_curriculum(spec.data, src)
    if check_data:
        from hybridlab.jobs.textdata import resolve_data_paths

        base_dir = str(Path(src.file).parent) if src.file and not src.file.startswith("<") else None
        spec.data.options = resolve_data_paths(spec.data.options, base_dir)
        for e in spec.eval:
            e.options = resolve_data_paths(e.options, base_dir)
        task = _make_task(spec.data.task, spec.data.options, src, ("data",), spec.data.seq_len)
        if spec.data.curriculum is not None:
            _check_curriculum_task(task, spec.data.curriculum, src)
        tv = int(getattr(task, "vocab_size", 0) or 0)
        if tv > vocab:
            where = ("data", "tokenizer") if "tokenizer" in spec.data.options else ("data",)
            raise src.error(where, f"task {spec.data.task!r} needs a vocabulary of {tv} tokens but the model's vocab_size is {vocab}")
        if spec.data.seq_len is None:
            spec.data.seq_len = int(getattr(task, "seq_len", 0) or 0) or None
        for i, e in enumerate(spec.eval):
            from hybridlab.jobs.data import eval_task_options
            from hybridlab.jobs.text_evals import check_text_eval, default_lengths, is_text_eval

            ename, eopts = eval_task_options(e.to_dict(), spec.data.to_dict())
            if is_text_eval(ename):  # niah / ppl_by_pos / lm_eval: checked (tokenizer, corpus, task names) up front
                _make_task(ename, eopts, src, ("eval", i), None, build=check_text_eval)
                if not e.seq_lens:
                    e.seq_lens = default_lengths(ename, spec.data.seq_len)
                continue
            t = _make_task(ename, {k: v for k, v in eopts.items() if k != "seq_len"}, src, ("eval", i), eopts.get("seq_len"))
            tv = int(getattr(t, "vocab_size", 0) or 0)
            if tv > vocab:
                raise src.error(("eval", i), f"task {e.task!r} needs a vocabulary of {tv} tokens but the model's vocab_size is {vocab}")
            if not e.seq_lens:
                e.seq_lens = [spec.data.seq_len] if spec.data.seq_len else []
    if spec.data.seq_len is None:
        raise src.error(("data",), "missing required key 'seq_len'")
    from hybridlab.jobs import validation

    validation.check(spec.train, [e.to_dict() for e in spec.eval], src,
                     lengths_known=check_data or all(e.seq_lens for e in spec.eval))

    if limits:
        from hybridlab.jobs.preflight import HostLimits, check_limits

        check_limits(spec, model_spec, src, HostLimits.detect())
    resolved = _resolved_dict(spec, model_spec, model_overrides)
    return Job(spec=spec, model_spec=model_spec, resolved=resolved, src=src)


def _check_curriculum(data: DataSpec, src: Source) -> None:
    cur, path = data.curriculum, ("data", "curriculum")
    cur.check(src, path)
    if data.seq_len is None:
        data.seq_len = cur.longest
    elif data.seq_len != cur.longest:
        raise src.error(("data", "seq_len"), f"{data.seq_len} is not the curriculum's longest max_len ({cur.longest}); "
                        f"with a curriculum, drop seq_len or set it to {cur.longest}")


def _check_curriculum_task(task, cur: Curriculum, src: Source) -> None:
    """The task must take variable lengths from min_len to every stage's max_len."""
    path = ("data", "curriculum")
    try:
        task.resolve_min_len(cur.min_len, cur.longest)
    except ValueError as e:
        key = "min_len" if "'min_len'" in str(e) else None
        raise src.error(path + ((key,) if key else ()), " ".join(str(e).split())) from None
    for i, m in enumerate(cur.stages):
        try:
            task.resolve_len(m)
        except ValueError as e:
            where = ("max_len", i) if isinstance(cur.max_len, list) else ("max_len",)
            raise src.error(path + where, " ".join(str(e).split()).replace("'seq_len'", "'max_len'")) from None


def _check_values(spec: JobSpec, src: Source) -> None:
    t, r = spec.train, spec.resources
    pos = specio.positive
    pos(src, ("train", "steps"), t.steps)
    pos(src, ("train", "micro_batch"), t.micro_batch)
    pos(src, ("train", "grad_accum"), t.grad_accum)
    pos(src, ("train", "lr"), t.lr)
    pos(src, ("train", "log_every"), t.log_every)
    pos(src, ("resources", "workers"), r.workers)
    pos(src, ("resources", "concurrent_runs"), r.concurrent_runs)
    pos(src, ("storage", "keep"), spec.storage.keep)
    pos(src, ("tracking", "system_metrics_interval"), spec.tracking.system_metrics_interval)
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


def _parse_sweep(raw: Any, src: Source) -> Sweep:
    """``sweep:`` -> :class:`Sweep`, with errors located at the offending entry, key or value."""
    if raw is None or raw == {}:
        return Sweep()
    if isinstance(raw, dict):
        return _no_repeats(Sweep([_parse_product(raw, src, ("sweep",))], "mapping"), src)
    if not isinstance(raw, list):
        raise src.error(("sweep",), f"expected a mapping of job paths to values, or a list of such mappings, "
                        f"got {specio._kind(raw)}")
    if not raw:
        raise src.error(("sweep",), "a sweep list needs at least one product (a mapping of job paths to values)")
    products = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or not p:
            raise src.error(("sweep", i), f"expected a non-empty mapping of job paths to values, got {specio._kind(p)}")
        products.append(_parse_product(p, src, ("sweep", i)))
    return _no_repeats(Sweep(products, "list"), src)


def _no_repeats(sweep: Sweep, src: Source) -> Sweep:
    """One run per combination: the same settings twice would silently train twice."""
    seen: dict = {}
    for i, combo in sweep.combinations(with_product=True):
        key = json.dumps(sorted((k, json.dumps(v, sort_keys=True)) for k, v in combo.items()))
        if key in seen:
            label = ", ".join(f"{k}={v}" for k, v in combo.items())
            where = ("sweep",) if sweep.form == "mapping" else ("sweep", i)
            other = "" if sweep.form == "mapping" else f" (first in sweep entry {seen[key]})"
            raise src.error(where, f"combination {label} comes twice{other}")
        seen[key] = i
    return sweep


def _check_sweep_key(key: Any, src: Source, path: tuple) -> None:
    if not isinstance(key, str) or key.split(".")[0] not in TOP_KEYS or key.split(".")[0] in ("sweep", "experiment"):
        raise src.error(path, f"cannot sweep {key!r}: sweep keys are job paths such as train.lr or model.layout")


def _parse_product(p: dict, src: Source, path: tuple) -> dict:
    """One product: key -> list of values (a lone value is a list of one), plus an optional zip group."""
    out: dict = {}
    for key, values in p.items():
        if key == ZIP_KEY:  # one group (a mapping) or several (a list of mappings), each one axis
            groups = values if isinstance(values, list) else [values]
            out[ZIP_KEY] = [_parse_zip(g, src, path + ((key, j) if isinstance(values, list) else (key,)))
                            for j, g in enumerate(groups)]
            if not groups:
                raise src.error(path + (key,), "expected a mapping of job paths to equal-length lists, or a list of them")
            continue
        _check_sweep_key(key, src, path + (key,))
        if isinstance(values, list):
            if not values:
                raise src.error(path + (key,), "a sweep needs at least one value")
            out[key] = list(values)
        else:
            out[key] = [values]  # a single value (to sweep over lists, give a list of lists)
    zipped: list = [k for g in out.get(ZIP_KEY, []) for k in g]
    twice = sorted({k for k in zipped if k in out or zipped.count(k) > 1})
    if twice:
        raise src.error(path + (twice[0],), f"{twice[0]!r} is swept twice in one product (a key and in {ZIP_KEY}, "
                        f"or in two {ZIP_KEY} groups); give it once")
    return out


def _parse_zip(group: Any, src: Source, path: tuple) -> dict:
    if not isinstance(group, dict) or not group:
        raise src.error(path, f"expected a mapping of job paths to equal-length lists, got {specio._kind(group)}")
    out, n = {}, None
    for k, vs in group.items():
        _check_sweep_key(k, src, path + (k,))
        if not isinstance(vs, list) or not vs:
            raise src.error(path + (k,), "a zipped key needs a non-empty list of values")
        if n is not None and len(vs) != n:
            raise src.error(path + (k,), f"has {len(vs)} values but {next(iter(out))} has {n}: zipped lists pair up, "
                            f"so they must be equally long")
        n = len(vs)
        out[k] = list(vs)
    return out


def _model_origin(spec: JobSpec, src: Source):
    """The model reference to build; ``model: {from: DIR}`` -> DIR, recorded as ``spec.model_from``."""
    m = spec.model
    if isinstance(m, dict) and "from" in m:
        for k in m:
            if k != "from":
                raise src.error(("model", k), "beside `from`, change the model with --set model.KEY=VALUE")
        if spec.model_from is not None:
            raise src.error(("model_from",), "give model: {from: DIR} or model_from, not both")
        spec.model_from = _folder(m["from"], src, ("model", "from"))
        return spec.model_from
    if spec.model_from is not None:
        spec.model_from = _folder(spec.model_from, src, ("model_from",))
    return m


def _folder(ref: Any, src: Source, path: tuple) -> str:
    from hybridlab.arch import is_model_dir

    if not isinstance(ref, str) or not ref:
        raise src.error(path, f"expected the path of a model folder, got {specio._kind(ref)}")
    p = Path(ref).expanduser()
    if not p.is_absolute() and src.file and not src.file.startswith("<") and not p.exists():
        p = Path(src.file).parent / p
    if not is_model_dir(p):
        raise src.error(path, f"{ref}: not a hybridlab model folder (model.yaml + model.safetensors; "
                              f"`hybridlab import mamba-ssm` writes one)")
    return str(p.resolve())


def _check_origin_shapes(model_spec, spec: JobSpec, src: Source) -> None:
    from hybridlab.arch.pretrained import ModelFolderError, check_stored_shapes

    try:
        check_stored_shapes(model_spec, spec.model_from)
    except ModelFolderError as e:
        where = ("model", "from") if isinstance(spec.model, dict) and "from" in spec.model else ("model_from",)
        raise src.error(where, f"the weights in {spec.model_from} do not fit the job's model "
                               f"(--set may change options, not shapes): {e.message}") from None


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


def _make_task(name: str, options: dict, src: Source, path: tuple, seq_len=None, build=None):
    """Build a task (or run ``build(name, options)``), turning its one-line TaskError into a SpecError
    located at the option it names (``dataset.path`` points into the mapping)."""
    from hybridlab.jobs.data import build_task
    from hybridlab.jobs.tasks import TaskError, UnknownTask

    try:
        if build is not None:
            return build(name, options)
        return build_task(name, options, seq_len)
    except UnknownTask as e:
        raise src.error(path + ("task",), str(e)) from None
    except TaskError as e:
        key = e.option
        top = key.split(".")[0] if key else None
        where = path + tuple(key.split(".")) if top and (top in options or top == "seq_len") else path
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
    if spec.model_from:
        d["model_from"] = spec.model_from
    ref = spec.model if isinstance(spec.model, str) else None
    if isinstance(spec.model, dict) and "from" in spec.model:
        ref = f"from:{spec.model_from}"
    if ref:
        d["tracking"].setdefault("tags", {})
        d["model_ref"] = ref + (" " + " ".join(model_overrides) if model_overrides else "")
    return d


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def resume_job(job_file: str | Path, overrides, job: Job, saved: dict) -> Job:
    """The job that continues a run: the model the run trained — its saved, resolved model spec (a spec saved
    before spec versions existed loads with the A form it was trained with) — and the job file's everything else.

    ``job`` is the job file's own (sweep-pinned) job; ``saved`` the run's resolved job dict (its job.yaml).
    """
    data, src = specio.load_yaml_file(job_file)
    data = {k: v for k, v in data.items() if k not in ("model", "model_from", "sweep")}
    data["model"] = copy.deepcopy(saved["model"])
    origin = saved.get("model_from")
    if isinstance(origin, str) and Path(origin).is_dir():  # where the fine-tune began (provenance for export)
        data["model_from"] = origin
    pinned = [f"{k}={json.dumps(v)}" for k, v in job.sweep_values.items() if not k.startswith("model.")]
    out = load_job(data, list(overrides or ()) + pinned, file=str(job_file))
    out.label, out.sweep_values = job.label, dict(job.sweep_values)
    return out


def from_resolved(resolved: dict) -> Job:
    """Re-load a resolved job dict (e.g. inside a worker); no task construction."""
    d = {k: v for k, v in resolved.items() if k in TOP_KEYS}
    return load_job(d, file="<resolved job>", check_data=False, limits=False)


# ---------------------------------------------------------------- sweeps


def expand_sweep(job_file: str | Path | dict, overrides=(), job: Job | None = None, limits: bool = True) -> list[Job]:
    """One job per combination of the ``sweep`` (the job itself if no sweep): for each
    product in turn, every combination of its axes (the last key varies fastest)."""
    job = job or load_job(job_file, overrides, limits=limits)
    sweep = job.spec.sweep
    if not sweep:
        return [job]
    out = []
    for combo in sweep.combinations():
        extra = [f"{k}={json.dumps(v)}" for k, v in combo.items()]
        j = load_job(job_file, list(overrides or ()) + extra, limits=limits)
        j.resolved.pop("sweep", None)
        j.spec.sweep = Sweep()
        j.sweep_values = dict(combo)
        j.label = ", ".join(f"{k}={v}" for k, v in combo.items())
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
