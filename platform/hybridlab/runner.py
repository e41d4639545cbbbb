"""`hybridlab run`: a job on Ray Train workers, tracked in MLflow, with live progress.

The driver validates the job (errors point into the file), starts or joins Ray,
creates the MLflow run(s), launches one ``TorchTrainer`` per run (one per sweep
combination, each a nested child of a parent run) and streams rank 0's progress
messages from a ``ray.util.queue.Queue`` into MLflow and the terminal.

Runs live under ``<storage.path>/<run name>/`` (Ray Train's checkpoints, worker
info); the MLflow run carries the tags ``hybridlab.run_name`` and
``hybridlab.storage`` so ``--resume RUN_ID`` finds them again.
"""

from __future__ import annotations

import io
import os
import queue as pyqueue
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError

TAG_RUN_NAME = "hybridlab.run_name"
TAG_STORAGE = "hybridlab.storage"


@dataclass
class RunOutcome:
    run_id: str
    run_name: str
    label: str
    status: str = "failed"  # finished | nonfinite | disk_full | failed
    message: str = ""
    step: int = 0
    loss: Optional[float] = None
    acc: Optional[float] = None
    evals: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None
    restarts: int = 0
    wall_s: float = 0.0


# ---------------------------------------------------------------- Ray


def ensure_ray(verbose: bool = False) -> None:
    """Join the Ray of a submitted job ($RAY_ADDRESS) or start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    quiet = dict(log_to_driver=verbose, logging_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(**quiet)
        except ConnectionError as e:
            raise UserError(f"cannot join the Ray cluster at {os.environ['RAY_ADDRESS']}: {e}") from None
        return
    # address="local": a private instance, never some other `ray start` cluster found on this machine
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)


# ---------------------------------------------------------------- progress


class Progress:
    """A rich progress bar in a terminal; plain lines when piped or under CI."""

    def __init__(self, plain: Optional[bool] = None):
        ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
        self.plain = plain if plain is not None else (ci or not sys.stdout.isatty())
        self._bar = None
        self._task = None

    def start(self, label: str, total: int, done: int = 0) -> None:
        if self.plain:
            print(f"[{label}] training {total} steps" + (f" (resuming at step {done})" if done else ""), flush=True)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self._bar is None:
            self._bar = RP(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._bar.start()
        self._task = self._bar.add_task(label, total=total, completed=done, info="")

    def update(self, step: int, total: int, m: dict) -> None:
        info = f"loss {m.get('train/loss', float('nan')):.4f}  acc {m.get('train/acc', 0):.3f}  " \
               f"lr {m.get('train/lr', 0):.2e}  {m.get('train/tokens_per_s', 0):,.0f} tok/s"
        if "train/mfu" in m:
            info += f"  mfu {100 * m['train/mfu']:.1f}%"
        if self.plain:
            print(f"step {step}/{total}  {info}", flush=True)
        elif self._task is not None:
            self._bar.update(self._task, completed=step, info=info)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ---------------------------------------------------------------- run


def _run_name(job, label_index: Optional[int]) -> str:
    base = job.spec.name or job.spec.experiment
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in base)[:60]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-{label_index}" if label_index is not None else ""
    return f"{safe}-{stamp}-{secrets.token_hex(2)}{suffix}"


def storage_uri(path: str) -> str:
    from hybridlab.jobs.checkpoint import is_local, local_path

    return os.path.abspath(os.path.expanduser(local_path(path))) if is_local(path) else path


def check_text(job) -> str:
    try:
        from rich.console import Console

        from .check import render, report

        buf = io.StringIO()
        render(report(job.model_spec, job.seq_len), Console(file=buf, width=160, force_terminal=False, color_system=None))
        return buf.getvalue()
    except Exception as e:  # the table is a convenience, never a reason to fail a run
        return f"(check table unavailable: {e})\n"


def worker_resources(res) -> tuple[bool, str, dict]:
    """(use_gpu, process-group backend, Ray resources per worker) of a job's ``resources``."""
    use_gpu = res.gpus_per_worker > 0
    backend = res.backend if res.backend != "auto" else ("nccl" if use_gpu else "gloo")
    per_worker = {"CPU": res.cpus_per_worker, **res.custom}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return use_gpu, backend, per_worker


def dry_run(job_file: str, overrides=()) -> None:
    """Validate a job and print what `run` would start, per sweep combination; start nothing."""
    from hybridlab.arch import count_spec
    from hybridlab.jobs.spec import expand_sweep, load_job
    from hybridlab.jobs.train import deepspeed_config

    job = load_job(job_file, overrides)
    jobs = expand_sweep(job_file, overrides, job=job)
    print(f"{job_file}: valid; {len(jobs)} run(s) in experiment {job.spec.tracking.experiment or job.spec.experiment!r}")
    for j in jobs:
        res, train = j.spec.resources, j.resolved["train"]
        use_gpu, backend, per_worker = worker_resources(res)
        counts = count_spec(j.model_spec, j.seq_len)
        ds = deepspeed_config(train, res.workers)
        print(f"\n== {j.label or j.model_spec.name}")
        print(f"model     {j.model_spec.name}: {counts['params']:,} params, layout {j.model_spec.layout_str}")
        print(f"workers   {res.workers} x {per_worker} ({'GPU' if use_gpu else 'CPU'}, {backend}, placement {res.placement})")
        print(f"deepspeed ZeRO {ds['zero_optimization']['stage']}, {train['precision']}, global batch "
              f"{ds['train_batch_size']} x seq {j.seq_len} = {ds['train_batch_size'] * j.seq_len:,} tokens/step, "
              f"{counts['flops_per_token_train'] * ds['train_batch_size'] * j.seq_len:.3e} FLOPs/step")
        print(check_text(j), end="")


def run_job(job_file: str, overrides=(), resume: Optional[str] = None, plain: Optional[bool] = None,
            verbose: bool = False) -> list[RunOutcome]:
    """Run a job file (every sweep combination); raise UserError if a run did not finish."""
    from hybridlab.jobs.spec import expand_sweep, load_job

    from .tracking import Tracker, check_reachable, tracking_uri

    job = load_job(job_file, overrides)
    jobs = expand_sweep(job_file, overrides, job=job)
    uri = tracking_uri(job.spec.tracking.uri)
    check_reachable(uri)
    experiment = job.spec.tracking.experiment or job.spec.experiment
    tracker = Tracker(uri)

    resume_info = None
    if resume:
        if len(jobs) > 1:
            raise UserError(f"--resume continues one run; this job has a sweep of {len(jobs)} runs "
                            f"(pin the sweep keys with --set to pick one)")
        run = tracker.get_run(resume)
        tags = run.data.tags
        if TAG_RUN_NAME not in tags:
            raise UserError(f"MLflow run {resume} was not started by `hybridlab run` (no {TAG_RUN_NAME} tag)")
        resume_info = {"run_id": resume, "run_name": tags[TAG_RUN_NAME], "storage": tags[TAG_STORAGE]}
        jobs = [_resumed(job_file, overrides, jobs[0], resume_info, tracker)]

    progress = Progress(plain)
    ensure_ray(verbose)
    outcomes: list[RunOutcome] = []
    parent_id = None
    spill_dir = storage_uri(job.spec.storage.path) if "://" not in job.spec.storage.path else "."
    try:
        if len(jobs) > 1:
            parent_name = job.spec.tracking.run_name or job.spec.name or f"{experiment}-sweep"
            parent_id = tracker.create_run(experiment, parent_name, _base_tags(job, sweep=True))
            tracker.log_params(parent_id, {f"sweep.{k}": v for k, v in job.spec.sweep.items()})
            tracker.log_text(parent_id, job.to_yaml(), "job.yaml")
            progress.note(f"sweep: {len(jobs)} runs under MLflow parent run {parent_id}")
        for i, j in enumerate(jobs):
            outcomes.append(_run_one(j, tracker, experiment, parent_id, i if len(jobs) > 1 else None,
                                     resume_info, progress))
        if parent_id:
            ok = all(o.status == "finished" for o in outcomes)
            tracker.terminate(parent_id, "FINISHED" if ok else "FAILED")
    finally:
        progress.stop()
        tracker.close(spill_dir=spill_dir)
    _print_summary(outcomes, uri, parent_id)
    bad = [o for o in outcomes if o.status != "finished"]
    if bad:
        raise UserError("; ".join(f"run {o.run_id}: {o.message}" for o in bad))
    return outcomes


def _resumed(job_file: str, overrides, job, info: dict, tracker):
    """The job that continues run ``info``: the model it trained (its saved job.yaml's), the job file's rest."""
    from hybridlab.jobs.checkpoint import is_local, local_path
    from hybridlab.jobs.spec import resume_job

    from .evaluate import _job_from_text, _run_job_artifact

    saved_file = Path(local_path(info["storage"])) / info["run_name"] / "job.yaml" if is_local(info["storage"]) else None
    if saved_file is not None and saved_file.is_file():
        saved = _job_from_text(saved_file.read_text(), str(saved_file))
    else:
        saved = _run_job_artifact(tracker.client, info["run_id"])
    return resume_job(job_file, overrides, job, saved) if saved else job


def _base_tags(job, sweep: bool = False) -> dict:
    from hybridlab import __version__

    from .tracking import git_sha

    tags = {"hybridlab.version": __version__, "hybridlab.git_sha": git_sha(), "hybridlab.experiment": job.spec.experiment,
            "hybridlab.host": socket.gethostname()}
    if sweep:
        tags["hybridlab.sweep"] = ", ".join(job.spec.sweep)
    tags.update(job.spec.tracking.tags)
    return tags


def _run_one(job, tracker, experiment, parent_id, index, resume_info, progress) -> RunOutcome:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from hybridlab.arch import count_spec
    from hybridlab.jobs.spec import flatten
    from hybridlab.jobs.sysmetrics import absolute_uri
    from hybridlab.jobs.train import train_loop_per_worker

    spec, res = job.spec, job.spec.resources
    t0 = time.time()
    if resume_info:
        run_id, run_name, storage = resume_info["run_id"], resume_info["run_name"], resume_info["storage"]
        tracker.reopen(run_id)
    else:
        storage = storage_uri(spec.storage.path)
        run_name = _run_name(job, index)
        counts = count_spec(job.model_spec, job.seq_len)
        tags = _base_tags(job)
        tags.update({
            TAG_RUN_NAME: run_name, TAG_STORAGE: storage,
            "hybridlab.layout": job.model_spec.layout_str,
            "hybridlab.params": counts["params"],
            "hybridlab.flops_per_token_train": counts["flops_per_token_train"],
            "hybridlab.flops_per_token_decode": counts["flops_per_token_decode"],
            "hybridlab.model": job.model_spec.name,
            "hybridlab.checkpoints": f"{storage.rstrip('/')}/{run_name}",
        })
        if job.label:
            tags["hybridlab.sweep_values"] = job.label
        mlflow_name = spec.tracking.run_name or job.label or spec.name or run_name
        run_id = tracker.create_run(experiment, mlflow_name, tags, parent_id)
        tracker.log_params(run_id, flatten(job.resolved))
        tracker.log_text(run_id, job.to_yaml(), "job.yaml")
        tracker.log_text(run_id, check_text(job), "check.txt")
        tracker.log_text(run_id, f"{storage.rstrip('/')}/{run_name}\n", "checkpoint_location.txt")
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    if "://" not in storage:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "job.yaml").write_text(job.to_yaml())
        (Path(run_dir) / "mlflow_run_id").write_text(run_id + "\n")

    out = RunOutcome(run_id=run_id, run_name=run_name, label=job.label, checkpoint=None)
    label = job.label or spec.name or spec.experiment
    progress.note(f"MLflow run {run_id}  ({label}; {res.workers} worker(s); checkpoints in {run_dir})")

    sink = Queue(actor_options={"num_cpus": 0})
    use_gpu, backend, per_worker = worker_resources(res)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.resolved, "sink": sink,
                           "run": {"name": run_name, "storage": storage, "mlflow_run_id": run_id,
                                   "tracking_uri": absolute_uri(tracker.uri)}},  # system metrics, logged by each node
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                                     placement_strategy=res.placement),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.storage.keep)),
    )

    state = {"end": None, "starts": 0, "total": spec.train.steps, "device": None}
    stop = threading.Event()

    def handle(msg: dict) -> None:
        kind = msg.get("kind")
        if kind == "start":
            state["starts"] += 1
            if state["starts"] == 1:
                progress.start(label, msg["steps"], msg["step"])
                if not resume_info:
                    tracker.set_tags(run_id, {"hybridlab.device": msg.get("device", "?"), "hybridlab.world_size": msg.get("world")})
            else:
                progress.note(f"workers restarted (attempt {state['starts']}); resuming from step {msg['step']}")
            if msg.get("resumed_from"):
                out.checkpoint = msg["resumed_from"]
        elif kind == "metrics":
            tracker.log_metrics(run_id, msg["metrics"], msg["step"], msg.get("time"))
            progress.update(msg["step"], state["total"], msg["metrics"])
            out.step = msg["step"]
        elif kind == "checkpoint":
            out.checkpoint = msg["path"]
            tracker.log_metrics(run_id, {"checkpoint/step": msg["step"]}, msg["step"], msg.get("time"))
        elif kind == "eval":
            tracker.log_metrics(run_id, msg["metrics"], msg["step"], msg.get("time"))
            out.evals = dict(msg["metrics"])
        elif kind == "end":
            state["end"] = msg

    def consume() -> None:
        while True:
            try:
                msg = sink.get(block=True, timeout=0.5)
            except pyqueue.Empty:
                if stop.is_set():
                    return
                continue
            except Exception:
                if stop.is_set():
                    return
                time.sleep(0.5)
                continue
            handle(msg)

    consumer = threading.Thread(target=consume, name="hybridlab-progress", daemon=True)
    consumer.start()
    error = None
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        error = e
    except KeyboardInterrupt:
        stop.set()
        tracker.terminate(run_id, "KILLED")
        raise UserError(f"interrupted; continue with: hybridlab run JOB --resume {run_id}") from None
    finally:
        # drain what is left, then stop the consumer
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if sink.size() == 0:
                    break
            except Exception:
                break
            time.sleep(0.2)
        stop.set()
        consumer.join(timeout=15)
        try:
            ray.kill(sink.actor)
        except Exception:
            pass

    out.restarts = max(0, state["starts"] - 1)
    out.wall_s = time.time() - t0
    end = state["end"]
    if error is not None:
        out.status = "failed"
        out.message = _failure_text(error)
    elif end is None:
        out.status = "failed"
        out.message = "the workers ended without a final report"
    else:
        out.status = end["status"]
        out.message = end.get("message") or ""
        out.step = end.get("step", out.step)
        out.loss, out.acc = end.get("loss"), end.get("acc")
        if end.get("evals"):
            out.evals = end["evals"]
    tracker.log_metrics(run_id, {"run/restarts": out.restarts, "run/wall_s": out.wall_s}, out.step)
    if out.evals:
        from hybridlab.jobs.evals import eval_table

        tracker.log_text(run_id, eval_table(out.evals) + "\n", "evals.txt")
        from .text_report import log_text_eval_artifacts

        log_text_eval_artifacts(tracker.client, run_id, out.evals, label, job.seq_len)  # NIAH heatmap, loss-by-position PNGs
    tracker.set_tags(run_id, {"hybridlab.status": out.status, **({"hybridlab.error": out.message[:5000]} if out.message else {})})
    tracker.terminate(run_id, "FINISHED" if out.status == "finished" else "FAILED")
    return out


def _failure_text(error: BaseException) -> str:
    """One readable line from Ray's TrainingFailedError (the worker's own exception)."""
    from hybridlab.jobs.checkpoint import is_disk_full

    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    inner = None
    for ln in reversed(lines):
        if ("Error:" in ln or "Exception:" in ln) and not ln.startswith(("File ", "Traceback")):
            inner = ln
            break
    msg = inner or (lines[-1] if lines else error.__class__.__name__)
    if is_disk_full(error) or "No space left" in text:
        msg = "disk full while checkpointing; the previous checkpoint is intact (" + msg[:300] + ")"
    return f"training failed: {msg[:800]}"


def _print_summary(outcomes: list[RunOutcome], uri: str, parent_id: Optional[str]) -> None:
    from hybridlab.jobs.evals import eval_table

    for o in outcomes:
        head = f"[{o.label}] " if o.label else ""
        print(f"{head}MLflow run id: {o.run_id}  status: {o.status}  ({o.wall_s:.0f}s"
              + (f", {o.restarts} restart(s)" if o.restarts else "") + ")", flush=True)
        if o.loss is not None:
            print(f"{head}final step {o.step}: loss {o.loss:.4f}  accuracy {o.acc:.4f}", flush=True)
        if o.evals:
            for line in eval_table(o.evals).splitlines():
                print(f"{head}eval {line}", flush=True)
        if o.checkpoint:
            print(f"{head}checkpoint: {o.checkpoint}", flush=True)
    if parent_id:
        print(f"sweep parent run id: {parent_id}", flush=True)
    print(f"tracking: {uri}  (browse: hybridlab ui{'' if uri.startswith('sqlite:///mlruns.db') else ' --uri ' + uri})", flush=True)
