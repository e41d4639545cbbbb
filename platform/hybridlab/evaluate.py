"""`hybridlab eval RUN_ID|CHECKPOINT --task T --lengths 256,512`: evaluate a trained model.

The target is an MLflow run id (the run's checkpoint folder comes from its
``hybridlab.checkpoints`` tag), a run folder (``<storage>/<run name>/``, its
newest registered checkpoint is used), one checkpoint folder (``step_N/``
holding DeepSpeed's ``ds/`` and ``hybridlab.json``) or a model folder
(``model.yaml`` + ``model.safetensors``, e.g. from ``hybridlab import mamba-ssm``). The model spec and the
training data options come from the run's resolved ``job.yaml`` (in the run
folder, else the run's MLflow artifact).

Weights: ZeRO stage 0-2 checkpoints hold the whole module in
``ds/mp_rank_00_model_states.pt``; ZeRO-3 shards it, so those are consolidated
with DeepSpeed's ``zero_to_fp32`` (fp32 master weights).

The evaluation itself is ``hybridlab.jobs.evals.run_evals`` (the code the
training job runs after training), so the metric names are the same:
``eval/<task>/len_<L>/{acc,seq_acc,final_acc,scaled_acc,loss}``, logged at the
checkpoint's step into the run (``--child``: into a nested child run tagged
``hybridlab.kind=eval``) together with a text table artifact.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UserError

from hybridlab.jobs.checkpoint import DS_TAG, META, is_local, latest_registered, local_path
from hybridlab.jobs.record import KIND_EVAL, MLFLOW_FINISHED, Tag, is_training_run

STANDALONE_EXPERIMENT = "hybridlab-evals"


@dataclass
class Target:
    checkpoint: str  # the step_N folder
    job: dict  # the resolved job dict
    run_id: Optional[str] = None  # the MLflow run that owns the checkpoint, if known
    step: int = 0
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- argument checks


def parse_lengths(text: str | Sequence[Any]) -> list[int]:
    items = text if isinstance(text, (list, tuple)) else [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not items:
        raise UserError("--lengths: give at least one length, e.g. --lengths 256,512")
    out = []
    for p in items:
        try:
            L = int(str(p))
        except ValueError:
            raise UserError(f"--lengths: {p!r} is not an integer") from None
        if L <= 0:
            raise UserError(f"--lengths: {L} is not a positive length")
        out.append(L)
    return out


def parse_options(items: Sequence[str]) -> dict:
    from hybridlab.arch.specio import YamlSyntaxError, load_value

    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise UserError(f"--option {item!r}: expected key=value, e.g. --option depth=0.5")
        try:
            out[key.strip()] = load_value(value, f"--option {key.strip()}")
        except YamlSyntaxError:  # not YAML: the text itself
            out[key.strip()] = value
    return out


def check_task(task: str) -> str:
    from hybridlab.jobs.tasks import TaskError, canonical_name
    from hybridlab.jobs.text_evals import is_text_eval

    if is_text_eval(task):
        return task
    try:
        canonical_name(task)
    except TaskError as e:
        raise UserError(str(e)) from None
    return task


# ---------------------------------------------------------------- finding the checkpoint


def _is_checkpoint(path: Path) -> bool:
    return (path / META).is_file() and (path / DS_TAG).is_dir()


def _latest_in_run_dir(run_dir: Path) -> Optional[Path]:
    p = latest_registered(str(run_dir))
    if p and _is_checkpoint(Path(p)):
        return Path(p)
    cands = sorted((Path(d) for d in glob.glob(str(run_dir / "step_*"))), key=lambda d: d.name)
    cands = [d for d in cands if _is_checkpoint(d)]
    return cands[-1] if cands else None


def _job_from_text(text: str, where: str) -> dict:
    from hybridlab.arch.specio import parse_yaml

    job, _ = parse_yaml(text, where)  # bounded like every spec file; a SpecError is one located line
    if not isinstance(job, dict) or "model" not in job:
        raise UserError(f"{where}: no resolved job with a model")
    return job


def _run_job_artifact(client, run_id: str) -> Optional[dict]:
    import tempfile

    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as d:
            p = client.download_artifacts(run_id, "job.yaml", d)
            return _job_from_text(Path(p).read_text(), f"artifact job.yaml of run {run_id}")
    except (MlflowException, OSError):  # no such artifact (or an unreadable store): the caller says so
        return None


def resolve_target(target: str, client=None, uri: str = "") -> Target:
    """A checkpoint folder, a run folder, a model folder or an MLflow run id -> the checkpoint, its job and its run."""
    path = Path(target).expanduser()
    from hybridlab.arch.pretrained import is_model_dir, read_spec

    if is_model_dir(path):  # a model folder: no run, no training data options
        return Target(checkpoint=str(path), job={"model": read_spec(path).to_dict(), "data": {}}, meta={"model_folder": True})
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{target}: not a checkpoint folder (expected step_N/ with {DS_TAG}/ and {META})")
        if _is_checkpoint(path):
            ckpt, run_dir = path, path.parent
        else:
            ckpt, run_dir = _latest_in_run_dir(path), path
            if ckpt is None:
                from .pretrained import folder_job, is_model_folder

                if is_model_folder(path):  # spec + safetensors: hybridlab.arch.load_pretrained reads it
                    return Target(checkpoint=str(path), job=folder_job(path, None, None), meta={"kind": "model_folder"})
                raise UserError(f"{target}: no checkpoint in this folder (expected step_N/ with {DS_TAG}/ and {META})")
        run_id = None
        rid_file = run_dir / "mlflow_run_id"
        if rid_file.is_file():
            run_id = rid_file.read_text().strip() or None
        job = None
        if (run_dir / "job.yaml").is_file():
            job = _job_from_text((run_dir / "job.yaml").read_text(), str(run_dir / "job.yaml"))
        elif run_id and client is not None:
            job = _run_job_artifact(client, run_id)
        if job is None:
            raise UserError(f"{target}: cannot find the run's job.yaml (looked in {run_dir})")
        return _target(ckpt, job, run_id)

    if client is None:
        raise UserError(f"no checkpoint folder {target!r}")
    run = _get_run(client, target, uri)
    tags = run.data.tags
    if not is_training_run(tags):
        raise UserError(f"MLflow run {target} is a {tags.get(Tag.KIND) or 'sweep parent'} run, not a training run"
                        + ("; evaluate one of its children" if Tag.SWEEP in tags else ""))
    run_dir = tags.get(Tag.CHECKPOINTS)
    if not run_dir:
        raise UserError(f"MLflow run {target} has no checkpoints tag ({Tag.CHECKPOINTS}): was it started by `hybridlab run`?")
    if not is_local(run_dir):
        raise UserError(f"run {target} keeps its checkpoints at {run_dir}; copy that folder here and pass its path")
    run_dir_p = Path(local_path(run_dir))
    if not run_dir_p.is_dir():
        raise UserError(f"run {target}: its checkpoint folder {run_dir_p} does not exist on this machine")
    ckpt = _latest_in_run_dir(run_dir_p)
    if ckpt is None:
        raise UserError(f"run {target}: no checkpoint in {run_dir_p} (did training finish?)")
    job = None
    if (run_dir_p / "job.yaml").is_file():
        job = _job_from_text((run_dir_p / "job.yaml").read_text(), str(run_dir_p / "job.yaml"))
    else:
        job = _run_job_artifact(client, run.info.run_id)
    if job is None:
        raise UserError(f"run {target}: cannot find its job.yaml (run folder or MLflow artifact)")
    return _target(ckpt, job, run.info.run_id)


def _target(ckpt: Path, job: dict, run_id: Optional[str]) -> Target:
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: unreadable {META} ({e})") from None
    return Target(checkpoint=str(ckpt), job=job, run_id=run_id, step=int(meta.get("step", 0)), meta=meta)


_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".yaml", ".yml", ".json")


def _get_run(client, run_id: str, uri: str):
    looks_like_path = "/" in run_id or os.sep in run_id or run_id.endswith(_PATH_SUFFIXES)
    if looks_like_path:  # not a run id: a checkpoint folder that does not exist
        raise UserError(f"no MLflow run or checkpoint folder {run_id!r} (tracking: {uri})")
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"no MLflow run or checkpoint folder {run_id!r} (tracking: {uri})") from None
        raise UserError(f"MLflow tracking at {uri} failed while reading run {run_id}: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:  # a tracking server that does not answer
        raise UserError(f"MLflow tracking at {uri} failed while reading run {run_id}: {' '.join(str(e).split())[:200]}") from None


# ---------------------------------------------------------------- loading the model


def load_state_dict(checkpoint: str, meta: Optional[dict] = None) -> dict:
    """The full fp32 module state dict of a hybridlab DeepSpeed checkpoint folder."""
    import torch

    meta = meta if meta is not None else json.loads((Path(checkpoint) / META).read_text())
    ds_dir = Path(checkpoint) / DS_TAG
    if int(meta.get("zero_stage", 0)) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
        return {k: v.float() for k, v in sd.items()}
    files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{checkpoint}: no DeepSpeed model states in {ds_dir}")
    try:
        blob = torch.load(files[0], map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:  # torch.load's ways of saying "not a checkpoint"
        raise UserError(f"{files[0]}: cannot read the model states ({' '.join(str(e).split())[:200]})") from None
    sd = blob.get("module") if isinstance(blob, dict) else None
    if not sd:
        raise UserError(f"{files[0]}: no module state dict inside")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def load_model(target: Target, device: str = "cpu"):
    from hybridlab.arch import HybridLM, load_model_spec, load_pretrained

    if target.meta.get("model_folder"):
        model = load_pretrained(target.checkpoint, device=device)
        return model, model.spec

    if target.meta.get("kind") == "model_folder":
        from .pretrained import _spec_dict, load_folder

        model, spec = load_folder(Path(target.checkpoint), device)
        if spec is not None:
            target.job["model"] = _spec_dict(spec)
        return model, spec

    spec = load_model_spec(target.job["model"])
    model = HybridLM(spec)
    sd = load_state_dict(target.checkpoint, target.meta)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if getattr(spec, "tie_embeddings", False):  # the head shares the embedding's weight: not saved on its own
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{target.checkpoint}: weights do not match the run's model spec "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), spec


# ---------------------------------------------------------------- the command


def evaluate(target: str, task: Optional[str], lengths, batches: int = 2, batch_size: int = 32, options: Sequence[str] = (),
             child: bool = False, log: bool = True, uri: Optional[str] = None, device: Optional[str] = None,
             console=None, lm_eval: Optional[str] = None, lm_eval_include: Sequence[str] = (),
             limit: Optional[float] = None, num_fewshot: Optional[int] = None, tokenizer: Optional[str] = None) -> dict:
    """Evaluate ``target`` on ``task`` at ``lengths`` and/or on lm-eval tasks; log and return the metrics."""
    from rich.console import Console

    from hybridlab.jobs.text_evals import is_text_eval

    from .tracking import tracking_uri

    console = console or Console()
    if not task and not lm_eval:
        raise UserError("give --task (with --lengths) or --lm-eval TASKS")
    if task:
        check_task(task)
    if task and not is_text_eval(task) and not lengths:
        raise UserError(f"--lengths: required for --task {task}, e.g. --lengths 256,512")
    Ls = parse_lengths(lengths) if lengths else []
    if batches <= 0:
        raise UserError(f"--batches: {batches} is not a positive number")
    if batch_size <= 0:
        raise UserError(f"--batch-size: {batch_size} is not a positive number")
    opts = parse_options(options)
    if tokenizer:
        opts["tokenizer"] = tokenizer
    uri = tracking_uri(uri)

    client = None
    if not Path(target).expanduser().exists() or log:
        from .tracking import client as mlflow_client

        client = mlflow_client(uri)
    t = resolve_target(target, client, uri)
    entries = []
    if task:
        entries.append({"task": task, "seq_lens": Ls, "batch_size": int(batch_size), "batches": int(batches), **opts})
    if lm_eval:
        entries.append(_lm_eval_entry(lm_eval, lm_eval_include, limit, num_fewshot, batch_size, tokenizer))
    for entry in entries:
        _check_entry(entry, t)
    if len(entries) == 1:
        return _evaluate_entry(t, entries[0], child, log, uri, client, device, console)
    out = {}
    for entry in entries:
        out.update(_evaluate_entry(t, entry, child, log, uri, client, device, console))
    return out


def _lm_eval_entry(tasks: str, include: Sequence[str], limit, num_fewshot, batch_size: int, tokenizer) -> dict:
    """The ``lm_eval`` eval entry of ``--lm-eval TASKS`` (comma-separated) and its options."""
    names = [x.strip() for x in str(tasks).split(",") if x.strip()]
    if not names:
        raise UserError("--lm-eval: give task names, e.g. --lm-eval lambada_openai,hellaswag")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit: {limit} is not a positive number")
    entry = {"task": "lm_eval", "seq_lens": [], "batch_size": int(batch_size), "batches": 1, "tasks": names,
             "include": [str(Path(p).expanduser().resolve()) for p in include or ()]}
    if limit is not None:
        entry["limit"] = float(limit)
    if num_fewshot is not None:
        entry["num_fewshot"] = int(num_fewshot)
    if tokenizer:
        entry["tokenizer"] = tokenizer
    return entry


def _evaluate_entry(t: Target, entry: dict, child: bool, log: bool, uri: str, client, device, console) -> dict:
    task, Ls = entry["task"], entry["seq_lens"]

    import torch

    from hybridlab.jobs.evals import eval_table, run_evals
    from hybridlab.jobs.record import EVAL_METRICS

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(t, "_loaded", None) is None:  # several entries (--task and --lm-eval) share one load
        t._loaded = load_model(t, dev)
    model, spec = t._loaded
    what = f"at {', '.join(map(str, Ls))}" if Ls else ("(" + ", ".join(entry["tasks"]) + ")" if entry.get("tasks") else "")
    console.print(f"evaluating {t.checkpoint} (step {t.step}, "
                  + (f"{spec.name}: {spec.layout_str}" if spec is not None else "model folder")
                  + f") on {task} {what} on {dev}")
    t0 = time.time()
    metrics = run_evals(model, [entry], t.job.get("data") or {}, dev,
                        on_result=lambda name, L, r: console.print(
                            f"  {name} len {L}: acc {r.get('acc', float('nan')):.4f}"
                            + (f"  final_acc {r['final_acc']:.4f}" if "final_acc" in r else "")
                            + (f"  scaled_acc {r['scaled_acc']:.4f}" if "scaled_acc" in r else "")
                            + (f"  loss {r['loss']:.4f}" if "loss" in r else "")))
    wall = time.time() - t0
    table = eval_table(metrics, EVAL_METRICS, layout="table") + "\n"
    from .text_report import has_text_evals, log_text_eval_artifacts, text_table

    if has_text_evals(metrics):
        table += text_table(metrics) + "\n"
        console.print(text_table(metrics), markup=False, highlight=False)
    if log:
        rid = _log(client, uri, t, entry, metrics, table, child)
        log_text_eval_artifacts(client, rid, metrics, spec.name if spec is not None else "model",
                                (t.job.get("data") or {}).get("seq_len"))
        console.print(f"logged {len(metrics)} metrics into MLflow run {rid} ({uri})")
    console.print(f"done in {wall:.1f}s")
    return metrics


def _check_entry(entry: dict, t: Target) -> None:
    """Build the eval task at every length before loading anything heavy: one-line errors."""
    from hybridlab.jobs.data import build_task, eval_task_options
    from hybridlab.jobs.tasks import TaskError
    from hybridlab.jobs.text_evals import check_text_eval, is_text_eval

    if is_text_eval(entry["task"]):
        try:
            name, opts = eval_task_options(entry, t.job.get("data") or {})
            check_text_eval(name, opts)
        except TaskError as e:
            raise UserError(str(e)) from None
        _check_memory(entry, t)  # given lengths only (defaults follow the training length)
        return
    try:
        name, opts = eval_task_options(entry, t.job.get("data") or {})
        task = build_task(name, opts)
        for L in entry["seq_lens"]:
            task.resolve_len(L)
    except TaskError as e:
        raise UserError(str(e)) from None
    vocab = int((t.job.get("model") or {}).get("vocab_size") or 0)
    if vocab and task.vocab_size > vocab:
        raise UserError(f"task {entry['task']!r} needs a vocabulary of {task.vocab_size} tokens; "
                        f"the model's vocab_size is {vocab}")
    _check_memory(entry, t)


def _check_memory(entry: dict, t: Target) -> None:
    """Every length's eval batch must fit next to the model on this machine (the pre-flight rule of jobs)."""
    from hybridlab.arch import count_params, load_model_spec
    from hybridlab.jobs.preflight import HostLimits, eval_bytes, eval_rows

    if not t.job.get("model") or not entry["seq_lens"]:
        return  # a model folder without a spec file (read by its loader) / no lengths given
    spec = load_model_spec(t.job["model"])
    host = HostLimits.detect()
    cap = host.gpu_memory or host.memory
    weights = 4 * count_params(spec)
    rows = eval_rows(entry["task"], entry["batch_size"], entry)
    for L in entry["seq_lens"]:
        need = weights + eval_bytes(spec, rows, int(L))
        if need > cap:
            raise UserError(f"--lengths {L}: an eval batch of {rows} x {L} tokens needs about "
                            f"{need / 1e9:.1f} GB with the model, this machine has {cap / 1e9:.1f} GB "
                            f"(lower the length or --batch-size)")


def _log(client, uri: str, t: Target, entry: dict, metrics: dict, table: str, child: bool) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        if t.run_id and not child:
            rid = t.run_id
        else:
            if t.run_id:
                parent = client.get_run(t.run_id)
                exp_id = parent.info.experiment_id
            else:
                exp = client.get_experiment_by_name(STANDALONE_EXPERIMENT)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(STANDALONE_EXPERIMENT)
            tags = {Tag.KIND: KIND_EVAL, Tag.CHECKPOINT: t.checkpoint}
            if t.run_id:
                tags[Tag.PARENT] = t.run_id
            rid = client.create_run(exp_id, run_name=f"eval-{entry['task']}-{stamp}", tags=tags).info.run_id
            params = [Param("eval.task", entry["task"]), Param("eval.seq_lens", json.dumps(entry.get("seq_lens", []))),
                      Param("eval.batches", str(entry.get("batches", 1))), Param("eval.batch_size", str(entry.get("batch_size", 1))),
                      Param("checkpoint", t.checkpoint), Param("checkpoint.step", str(t.step))]
            params += [Param(f"eval.{k}", json.dumps(v)) for k, v in entry.items()
                       if k not in ("task", "seq_lens", "batches", "batch_size")]
            client.log_batch(rid, params=params, synchronous=True)
        ms = [Metric(k, float(v), now, int(t.step)) for k, v in metrics.items()]
        client.log_batch(rid, metrics=ms, tags=[RunTag(Tag.LAST_EVAL, f"{entry['task']} {stamp}")],
                         synchronous=True)
        client.log_text(rid, f"checkpoint: {t.checkpoint} (step {t.step})\n" + table,
                        f"evals/{entry['task']}-{stamp}.txt")
        if child or not t.run_id:
            client.set_terminated(rid, MLFLOW_FINISHED)
    except (MlflowException, OSError) as e:
        raise UserError(f"cannot log the eval to MLflow at {uri}: {' '.join(str(e).split())[:200]}") from None
    return rid
