"""`hybridlab run`: a job on Ray Train workers, tracked in MLflow, with live progress.

Read in this order:

* :func:`run_job` validates the job (errors point into the file, pre-flight limits
  included), starts or joins Ray (``localray``), and runs each sweep combination
  through a :class:`RunDriver` (one MLflow run each, nested under a parent run for
  a sweep), under :class:`StopSignals`;
* :class:`RunDriver` opens the MLflow run (:meth:`~RunDriver.open`: tags, params,
  artifacts, the run's folder), launches one ``TorchTrainer`` (:meth:`~RunDriver.launch`),
  follows rank 0's progress messages (``jobs.record``: :meth:`~RunDriver.on_message`)
  into MLflow and the terminal, and closes the run however it ends
  (:meth:`~RunDriver.close`: FINISHED, FAILED with the error as a tag, or KILLED);
* ``resources.concurrent_runs: N`` trains up to N sweep combinations at once
  (:func:`_run_concurrently`): one thread per running combination, each with its own
  RunDriver, TorchTrainer and MLflow child run; Ray packs them by their fractional
  ``gpus_per_worker`` / ``cpus_per_worker`` (or queues them). ``--resume-sweep PARENT``
  (:func:`_sweep_resume_plan`) trains only the combinations with no FINISHED child yet,
  continuing KILLED/FAILED children (same run id, from their checkpoints);
* :class:`StopSignals`: SIGINT/SIGTERM ask the workers to stop cleanly (they
  checkpoint when needed); the command then prints the ``--resume`` line and exits
  130/143. A second signal, or a stop that takes longer than
  ``$HYBRIDLAB_STOP_GRACE_S`` (default 120 s), stops at once (still closing the run).

Runs live under ``<storage.path>/<run name>/`` (Ray Train's checkpoints, worker
info); the MLflow run carries the tags ``hybridlab.run_name`` and
``hybridlab.storage`` so ``--resume RUN_ID`` finds them again.
"""

from __future__ import annotations

import io
import json
import os
import queue as pyqueue
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from hybridlab.jobs import record as rec
from hybridlab.jobs.record import Metric, Status, Tag

from .errors import ForcedStop, Interrupted, UserError
from .pending import FIRST_NOTE_S, NOTE_EVERY_S, pending_workers_line

STOP_GRACE_S = float(os.environ.get("HYBRIDLAB_STOP_GRACE_S", "120"))


@dataclass
class RunOutcome:
    run_id: str
    run_name: str
    label: str
    status: str = Status.FAILED  # a record.Status value
    message: str = ""
    step: int = 0
    loss: Optional[float] = None
    acc: Optional[float] = None
    evals: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None
    checkpoint_step: Optional[int] = None
    restarts: int = 0
    wall_s: float = 0.0


@dataclass(frozen=True)
class ResumeTarget:
    run_id: str
    run_name: str
    storage: str


# ---------------------------------------------------------------- signals


def _duration_text(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or f"{seconds:g}s"


class StopSignals:
    """SIGINT/SIGTERM while a job runs. While workers train (``graceful``), the first one is remembered
    (``requested``) and handed to the run by :meth:`relay`; outside of that (setting up, closing), or on
    a second signal, :class:`ForcedStop` is raised in the main thread at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.reason: Optional[str] = None  # a stop that was not a signal (--time-limit): said instead of its name
        self.event = threading.Event()
        self.graceful = False
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous.setdefault(s, signal.getsignal(s))
            signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return self.reason or signal.Signals(self.signum or signal.SIGINT).name

    def expire(self, reason: str) -> None:
        """A stop asked for by the clock: as a first SIGINT while training (the relay stops the workers, which
        checkpoint), but never raised into the main thread: set-up sees ``requested`` and starts no workers."""
        if self.signum is None:
            self.signum, self.reason = signal.SIGINT, reason
            self.event.set()

    def deadline(self, seconds: Optional[float]) -> Optional[threading.Timer]:
        """``expire`` after ``seconds`` (``--time-limit``); the timer is returned to be cancelled."""
        if seconds is None:
            return None
        t = threading.Timer(seconds, self.expire, args=(f"time limit {_duration_text(seconds)}",))
        t.daemon = True
        t.start()
        return t

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            self.event.set()
        if not first or not self.graceful:
            raise ForcedStop(signum)

    def relay(self, stop_run, done: threading.Event) -> threading.Thread:
        """A thread that, on the first signal, calls ``stop_run()`` and, if the run is not ``done`` within
        the grace period, forces the stop."""

        def watch() -> None:
            while not self.event.wait(0.5):
                if done.is_set():
                    return
            if done.is_set():
                return
            stop_run()
            if not done.wait(STOP_GRACE_S):
                signal.raise_signal(self.signum)  # the second signal: ForcedStop in the main thread

        t = threading.Thread(target=watch, name="hybridlab-stop-relay", daemon=True)
        t.start()
        return t


# ---------------------------------------------------------------- progress


class Progress:
    """A rich progress display in a terminal (one row per running run, plus a sweep row when runs go
    concurrently); plain lines when piped or under CI. Shared by the runs of a sweep: thread-safe."""

    def __init__(self, plain: Optional[bool] = None):
        ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
        self.plain = plain if plain is not None else (ci or not sys.stdout.isatty())
        self._bar = None
        self._task = None
        self._lock = threading.RLock()

    def _ensure_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self._bar is None:
            self._bar = RP(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._bar.start()

    def start(self, label: str, total: int, done: int = 0):
        """A row for one run (returned: its task id; None in plain mode)."""
        with self._lock:
            if self.plain:
                self._print(f"[{label}] training {total} steps" + (f" (resuming at step {done})" if done else ""))
                return None
            from rich.markup import escape

            self._ensure_bar()
            self._task = self._bar.add_task(escape(label), total=total, completed=done, info="")
            return self._task

    def update(self, step: int, total: int, m: dict, task=None, prefix: str = "") -> None:
        info = f"loss {m.get(Metric.LOSS, float('nan')):.4f}  acc {m.get(Metric.ACC, 0):.3f}  " \
               f"lr {m.get(Metric.LR, 0):.2e}  {m.get(Metric.TOKENS_PER_S, 0):,.0f} tok/s"
        if Metric.MFU in m:
            info += f"  mfu {100 * m[Metric.MFU]:.1f}%"
        with self._lock:
            task = self._task if task is None else task
            if self.plain:
                self._print(f"{prefix}step {step}/{total}  {info}")
            elif task is not None:
                self._bar.update(task, completed=step, info=info)

    def remove(self, task) -> None:
        with self._lock:
            if self._bar is not None and task is not None:
                self._bar.remove_task(task)

    def sweep_row(self, total: int, done: int = 0):
        """The sweep's own row (runs done of all); None in plain mode."""
        with self._lock:
            if self.plain:
                return None
            self._ensure_bar()
            return self._bar.add_task("sweep", total=total, completed=done, info="runs done")

    def advance(self, task) -> None:
        with self._lock:
            if self._bar is not None and task is not None:
                self._bar.advance(task)

    def note(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.console.print(text, markup=False, highlight=False)  # "[train.lr=…] " is not markup
            else:
                self._print(text)

    @staticmethod
    def _print(text: str) -> None:
        print(text, flush=True)

    def stop(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


class RunProgress:
    """One run's view of a shared :class:`Progress` when several runs go at once: its own row in a terminal,
    lines prefixed ``[label] `` otherwise; the row goes when the run ends (the outcome is printed instead)."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label, self.prefix = progress, label, f"[{label}] "
        self.task = None

    def start(self, label: str, total: int, done: int = 0) -> None:
        self.task = self.progress.start(label, total, done)

    def update(self, step: int, total: int, m: dict) -> None:
        self.progress.update(step, total, m, task=self.task, prefix=self.prefix)

    def note(self, text: str) -> None:
        self.progress.note(self.prefix + text)

    def finish(self, out: "RunOutcome") -> None:
        self.progress.remove(self.task)
        self.task = None
        loss = f", loss {out.loss:.4f}" if out.loss is not None else ""
        self.progress.note(f"{self.prefix}{out.status} at step {out.step}{loss} (MLflow run {out.run_id})"
                           + (f": {out.message}" if out.status != Status.FINISHED and out.message else ""))


# ---------------------------------------------------------------- helpers


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
    from rich.console import Console

    from .check import render, report

    buf = io.StringIO()
    render(report(job.model_spec, job.seq_len), Console(file=buf, width=160, force_terminal=False, color_system=None))
    return buf.getvalue()


def worker_resources(res) -> tuple[bool, str, dict]:
    """(use_gpu, process-group backend, Ray resources per worker) of a job's ``resources``."""
    use_gpu = res.gpus_per_worker > 0
    backend = res.backend if res.backend != "auto" else ("nccl" if use_gpu else "gloo")
    per_worker = {"CPU": res.cpus_per_worker, **res.custom}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return use_gpu, backend, per_worker


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def dry_run(job_file: str, overrides=()) -> None:
    """Validate a job (pre-flight limits included) and print what `run` would start, per sweep combination."""
    from hybridlab.arch import count_spec
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.preflight import HostLimits, check_local_placement, estimate, worker_memory
    from hybridlab.jobs.spec import expand_sweep, load_job
    from hybridlab.jobs.step import deepspeed_config

    from .localray import starts_local_ray

    job = load_job(job_file, overrides)
    jobs = expand_sweep(job_file, overrides, job=job)
    print(f"{job_file}: valid; {len(jobs)} run(s) in experiment {job.spec.tracking.experiment or job.spec.experiment!r}")
    width = min(job.spec.resources.concurrent_runs, len(jobs))
    if len(jobs) > 1:
        print(f"concurrency {width} run(s) at once (resources.concurrent_runs={job.spec.resources.concurrent_runs}); "
              f"Ray queues a run until its workers' resources are free")
    for j in jobs:
        res, train = j.spec.resources, j.resolved["train"]
        use_gpu, backend, per_worker = worker_resources(res)
        counts = count_spec(j.model_spec, j.seq_len)
        ds = deepspeed_config(train, res.workers)
        mem, have = estimate(j.spec, j.model_spec), worker_memory(j.spec, HostLimits.detect())
        print(f"\n== {j.label or j.model_spec.name}")
        print(f"model     {j.model_spec.name}: {counts['params']:,} params, layout {j.model_spec.layout_str}")
        print(f"workers   {res.workers} x {per_worker} ({'GPU' if use_gpu else 'CPU'}, {backend}, placement {res.placement})")
        per_run = {k: round(v * res.workers, 6) for k, v in per_worker.items()}
        print(f"per run   {per_run}" + (f"; {width} at once: {({k: round(v * width, 6) for k, v in per_run.items()})}"
                                        if width > 1 else ""))
        print(f"deepspeed ZeRO {ds['zero_optimization']['stage']}, {train['precision']}, global batch "
              f"{ds['train_batch_size']} x seq {j.seq_len} = {ds['train_batch_size'] * j.seq_len:,} tokens/step, "
              f"{counts['flops_per_token_train'] * ds['train_batch_size'] * j.seq_len:.3e} FLOPs/step")
        if j.spec.data.curriculum is not None:
            print(f"curriculum {j.spec.data.curriculum.describe(j.spec.train.steps)}")
        print(f"memory    ~{_gb(mem.training)} per worker ({_gb(mem.state)} model state + {_gb(mem.activations)} "
              f"activations)" + (f" of {_gb(have[0])} {have[1]}" if have else ""))
        if starts_local_ray():  # a job for a cluster is fine to dry-run here: said, not refused
            try:
                check_local_placement(j.spec, j.src, HostLimits.detect())
            except SpecError as e:
                print(f"here      `hybridlab run` on this machine would refuse it: {e}")
        print(check_text(j), end="")


# ---------------------------------------------------------------- the job


def _plan_runs(tracker, job_file: str, overrides, job, jobs: list, experiment: str, resume: Optional[str],
               resume_sweep: Optional[str]) -> tuple[str, list, list, dict]:
    """(experiment, the jobs to run, their resume targets, outcomes already final) for a fresh run,
    ``--resume RUN`` (one run continued) or ``--resume-sweep PARENT`` (a sweep's unfinished combinations)."""
    targets: list[Optional[ResumeTarget]] = [None] * len(jobs)
    if resume:
        targets = [_resume_target(tracker, resume, jobs)]
        return experiment, [_resumed(job_file, overrides, jobs[0], asdict(targets[0]), tracker)], targets, {}
    if resume_sweep:
        experiment, targets, results = _sweep_resume_plan(tracker, resume_sweep, job_file, job, jobs)
        jobs = [_resumed(job_file, overrides, j, asdict(t), tracker) if t else j for j, t in zip(jobs, targets)]
        return experiment, jobs, targets, results
    return experiment, jobs, targets, {}


def _run_in_turn(todo: list[int], driver_for, signals, spill_dirs: dict) -> dict[int, RunOutcome]:
    """The sweep's runs one after another (concurrent_runs 1); a stop request ends the sweep."""
    results = {}
    for i in todo:
        if signals.requested:
            break
        driver = driver_for(i)
        try:
            results[i] = driver.run()
        finally:
            _remember_spill(driver, spill_dirs)
    return results


def run_job(job_file: str, overrides=(), resume: Optional[str] = None, plain: Optional[bool] = None,
            verbose: bool = False, resume_sweep: Optional[str] = None,
            time_limit_s: Optional[float] = None) -> list[RunOutcome]:
    """Run a job file (every sweep combination, up to ``resources.concurrent_runs`` at once); raise UserError if
    a run did not finish, Interrupted if stopped. ``resume_sweep``: a sweep's parent run id; only its
    combinations without a FINISHED child run are trained, KILLED/FAILED children continue from their checkpoints.
    ``time_limit_s``: stop as a first SIGINT does once this much time has passed since the call."""
    from hybridlab.jobs.preflight import HostLimits, check_local_placement
    from hybridlab.jobs.spec import expand_sweep, load_job

    from .localray import ensure_ray, starts_local_ray
    from .tracking import Tracker, check_reachable, tracking_uri

    if resume and resume_sweep:
        raise UserError("--resume continues one run, --resume-sweep a sweep: give one of them")
    # an empty id (a script's unset variable) must not quietly start a new sweep or a new run instead
    for flag, value in (("--resume", resume), ("--resume-sweep", resume_sweep)):
        if value is not None and not value.strip():
            raise UserError(f"{flag}: empty run id (give the id printed as 'MLflow run id' / 'sweep parent run id')")
    job = load_job(job_file, overrides)
    jobs = expand_sweep(job_file, overrides, job=job)
    if starts_local_ray():
        for j in jobs:
            check_local_placement(j.spec, j.src, HostLimits.detect())
    uri = tracking_uri(job.spec.tracking.uri)
    check_reachable(uri)
    experiment = job.spec.tracking.experiment or job.spec.experiment
    tracker = Tracker(uri)
    signals = StopSignals()
    signals.install()
    clock = signals.deadline(time_limit_s)
    progress = Progress(plain)
    spill_dirs: dict[str, str] = {}
    default_spill = storage_uri(job.spec.storage.path) if "://" not in job.spec.storage.path else "."
    results: dict[int, RunOutcome] = {}  # by sweep index
    parent_id, head = None, None
    try:
        close_orphaned_runs(tracker, experiment)
        experiment, jobs, targets, results = _plan_runs(tracker, job_file, overrides, job, jobs, experiment,
                                                        resume, resume_sweep)
        head = ensure_ray(verbose)
        signals.install()  # ray.init sets its own SIGTERM handler
        if resume_sweep:
            parent_id = resume_sweep
            tracker.reopen(parent_id)
            tracker.set_tags(parent_id, {Tag.DRIVER_PID: _driver_id(), Tag.HOST: socket.gethostname()})
            progress.note(f"sweep: {len(results)} of {len(jobs)} runs finished earlier; {len(jobs) - len(results)} "
                          f"to run under MLflow parent run {parent_id}")
        elif len(jobs) > 1:
            parent_id = _open_parent(tracker, job, experiment, len(jobs), progress)
        todo = [i for i in range(len(jobs)) if i not in results]

        def driver_for(i: int, threaded: bool = False) -> RunDriver:
            driver = RunDriver(jobs[i], tracker, experiment, parent_id, i if len(jobs) > 1 else None, targets[i],
                               progress, signals, local=head is not None, threaded=threaded)
            if threaded:  # its own row / prefixed lines
                driver.progress = RunProgress(progress, driver.label)
            return driver

        width = min(job.spec.resources.concurrent_runs, len(todo))
        if width > 1:
            results.update(_run_concurrently(todo, width, driver_for, progress, signals, spill_dirs, len(jobs) - len(todo)))
        else:
            results.update(_run_in_turn(todo, driver_for, signals, spill_dirs))
        if parent_id:
            done = len(results) == len(jobs) and all(o.status == Status.FINISHED for o in results.values())
            tracker.terminate(parent_id, "FINISHED" if done else ("KILLED" if signals.requested else "FAILED"))
    except BaseException as e:
        if parent_id:
            tracker.set_tags(parent_id, {Tag.ERROR: _error_text(e)})
            tracker.terminate(parent_id, "KILLED" if signals.requested or isinstance(e, ForcedStop) else "FAILED")
        if isinstance(e, ForcedStop):
            signals.signum = signals.signum or int(e.args[0])
        elif not signals.requested:
            raise
    finally:
        if clock is not None:
            clock.cancel()
        progress.stop()
        tracker.close(spill_dirs=spill_dirs, default_dir=default_spill)
        if head is not None:
            head.stop()
        signals.restore()
    outcomes = [results[i] for i in sorted(results)]
    _print_summary(outcomes, uri, parent_id)
    unfinished = len(outcomes) < len(jobs) or any(o.status == Status.KILLED for o in outcomes)
    if signals.requested and unfinished:
        raise Interrupted(_interrupted_line(job_file, signals, outcomes, jobs, parent_id, overrides), signals.exit_code)
    bad = [o for o in outcomes if o.status != Status.FINISHED]
    if bad:
        raise UserError("; ".join(f"run {o.run_id}: {o.message}" for o in bad))
    return outcomes


def _remember_spill(driver: "RunDriver", spill_dirs: dict) -> None:
    if driver.run_id and driver.run_dir and "://" not in driver.run_dir:
        spill_dirs[driver.run_id] = driver.run_dir


def _run_concurrently(todo: list[int], width: int, driver_for, progress: Progress, signals: StopSignals,
                      spill_dirs: dict, done_before: int) -> dict[int, RunOutcome]:
    """Train the sweep runs ``todo`` (indices), ``width`` at once, each in its own thread with its own
    TorchTrainer and MLflow run; Ray queues a run whose workers do not fit yet. One run failing does not stop
    the others. The main thread only waits, so the stop signals reach it: the first asks every running run
    to stop (they checkpoint) and starts no new ones; a second one (or the grace period running out) closes
    the runs still open as KILLED at once."""
    queue = pyqueue.Queue()
    for i in todo:
        queue.put(i)
    results: dict[int, RunOutcome] = {}
    drivers: dict[int, RunDriver] = {}
    lock = threading.Lock()
    sweep_row = progress.sweep_row(done_before + len(todo), done_before)

    def work() -> None:
        while not signals.requested:
            try:
                i = queue.get_nowait()
            except pyqueue.Empty:
                return
            driver = driver_for(i, threaded=True)
            with lock:
                drivers[i] = driver
            try:
                out = driver.run()
            except BaseException:  # noqa: BLE001 - the run is closed FAILED with the error; the others go on
                out = driver.out
            finally:
                with lock:
                    _remember_spill(driver, spill_dirs)
            if out is not None:
                with lock:
                    results[i] = out
                driver.progress.finish(out)
            progress.advance(sweep_row)

    threads = [threading.Thread(target=work, name=f"hybridlab-run-{k}", daemon=True) for k in range(width)]
    signals.graceful = True  # the first signal is relayed to every run (RunDriver.fit), not raised here
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except ForcedStop as e:
        signals.signum = signals.signum or int(e.args[0])
        with lock:
            open_drivers = [(i, d) for i, d in drivers.items() if i not in results]
        for i, d in open_drivers:  # their threads are still inside fit(): close the runs from here
            out = d.close_once(None)
            if out is not None:
                results[i] = out
    finally:
        signals.graceful = False
    return results


def _sweep_resume_plan(tracker, parent_id: str, job_file: str, job, jobs):
    """(experiment, per-combination ResumeTarget or None, outcomes of the combinations already FINISHED) for
    ``--resume-sweep parent_id``; a UserError unless the parent's sweep is this job's."""
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.spec import from_resolved

    from .evaluate import _run_job_artifact

    flag = f"--resume-sweep {parent_id}"
    if not job.spec.sweep:
        raise UserError(f"{job_file}: {flag}: this job has no sweep (--resume continues a single run)")
    parent = tracker.get_run(parent_id)
    if Tag.SWEEP not in parent.data.tags or parent.data.tags.get(Tag.PARENT):
        raise UserError(f"{flag}: MLflow run {parent_id} is not the parent run of a `hybridlab run` sweep "
                        f"(no {Tag.SWEEP} tag); give the id printed as 'sweep parent run id'")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    saved = _run_job_artifact(tracker.client, parent_id)
    if not saved or not saved.get("sweep"):
        raise UserError(f"{flag}: MLflow run {parent_id} has no job.yaml artifact with its sweep to compare this "
                        f"job's with at {parent.info.artifact_uri} (a store moved without its artifacts folder, or "
                        f"a sweep started before --resume-sweep existed)")
    try:
        theirs = [dict(c) for c in from_resolved(saved).spec.sweep.combinations()]
    except SpecError as e:
        raise UserError(f"{flag}: the sweep parent's job.yaml does not load: {e}") from None
    key = lambda combo: json.dumps(combo, sort_keys=True, default=str)  # noqa: E731
    ours = [key(j.sweep_values) for j in jobs]
    if sorted(ours) != sorted(key(c) for c in theirs):
        missing = [c for c in theirs if key(c) not in set(ours)]
        extra = [j.sweep_values for j in jobs if j.sweep_values and key(j.sweep_values) not in {key(c) for c in theirs}]
        what = (f"its combination {_combo_text(missing[0])} is not in this job's" if missing
                else f"this job's combination {_combo_text(extra[0])} is not in it")
        raise UserError(f"{job_file}: sweep: does not match the sweep of parent run {parent_id} ({len(theirs)} runs "
                        f"there, {len(jobs)} here; {what}); run the same sweep (same --set) or start a new one without --resume-sweep")
    experiment = tracker.client.get_experiment(parent.info.experiment_id).name
    children = tracker.client.search_runs([parent.info.experiment_id], max_results=50000,
                                          filter_string=f"tags.`{Tag.PARENT}` = '{parent_id}'")
    by_label: dict[str, list] = {}
    for r in children:
        by_label.setdefault(r.data.tags.get(Tag.SWEEP_VALUES, ""), []).append(r)
    targets: list[Optional[ResumeTarget]] = []
    finished: dict[int, RunOutcome] = {}
    for i, j in enumerate(jobs):
        runs = sorted(by_label.get(j.label, []), key=lambda r: r.info.start_time or 0)
        done = [r for r in runs if r.info.status == "FINISHED"]
        if done:
            finished[i] = _earlier_outcome(tracker, done[-1], j.label)
            targets.append(None)
            continue
        # RUNNING here: close_orphaned_runs closed those whose driver on this host is gone, so it is alive.
        # RUNNING on another host: left so by a driver that was killed outright (a lent machine handed
        # back, SIGKILL at a time limit) as far as this host can tell; it is continued, and says so.
        live = [r for r in runs if r.info.status == "RUNNING" and r.data.tags.get(Tag.HOST) == socket.gethostname()]
        if live:
            r = live[-1]
            raise UserError(f"{flag}: run {r.info.run_id} ({j.label}) is still running (driver "
                            f"{r.data.tags.get(Tag.DRIVER_PID, '?')} on this host); stop it first")
        last = next((r for r in reversed(runs) if Tag.RUN_NAME in r.data.tags and Tag.STORAGE in r.data.tags), None)
        if last is not None and _no_checkpoint(last.data.tags[Tag.STORAGE], last.data.tags[Tag.RUN_NAME]):
            # nothing to continue from (stopped before its first checkpoint, or its folder was not brought
            # along): continuing the run would put a new step 1.. beside the old steps; a new child instead
            tracker.set_tags(last.info.run_id, {Tag.SUPERSEDED: "restarted as a new run by --resume-sweep "
                                                                "(no checkpoint to continue from)"})
            print(f"note: run {last.info.run_id} ({j.label}) has no checkpoint in "
                  f"{last.data.tags[Tag.STORAGE]}/{last.data.tags[Tag.RUN_NAME]}; starting that combination anew",
                  flush=True)
            last = None
        if last is not None and last.info.status == "RUNNING":
            print(f"note: run {last.info.run_id} ({j.label}) was left RUNNING by a driver on "
                  f"{last.data.tags.get(Tag.HOST, '?')}; continuing it here from its latest checkpoint", flush=True)
        targets.append(ResumeTarget(last.info.run_id, last.data.tags[Tag.RUN_NAME], last.data.tags[Tag.STORAGE])
                       if last else None)
    return experiment, targets, finished


def _no_checkpoint(storage: str, run_name: str) -> bool:
    """True when a run on local storage has no registered checkpoint (remote storage: not known, False)."""
    from hybridlab.jobs.checkpoint import is_local, latest_registered, local_path

    return is_local(storage) and latest_registered(str(Path(local_path(storage)) / run_name)) is None


def _combo_text(combo: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in combo.items())


def _earlier_outcome(tracker, run, label: str) -> RunOutcome:
    """A sweep child that finished in an earlier call, for the summary."""
    m = run.data.metrics
    return RunOutcome(run_id=run.info.run_id, run_name=run.data.tags.get(Tag.RUN_NAME, ""), label=label,
                      status=Status.FINISHED, message="finished in an earlier call",
                      step=tracker.last_step(run.info.run_id, Metric.LOSS), loss=m.get(Metric.LOSS),
                      acc=m.get(Metric.ACC), wall_s=float(m.get(Metric.WALL_S, 0.0)))


def _resumed(job_file: str, overrides, job, info: dict, tracker):
    """The job that continues run ``info`` (a ``ResumeTarget``'s fields): the model it trained (its
    saved job.yaml's), the job file's rest."""
    from hybridlab.jobs.checkpoint import is_local, local_path
    from hybridlab.jobs.spec import resume_job

    from .evaluate import _job_from_text, _run_job_artifact

    saved_file = Path(local_path(info["storage"])) / info["run_name"] / "job.yaml" if is_local(info["storage"]) else None
    if saved_file is not None and saved_file.is_file():
        saved = _job_from_text(saved_file.read_text(), str(saved_file))
    else:
        saved = _run_job_artifact(tracker.client, info["run_id"])
    return resume_job(job_file, overrides, job, saved) if saved else job


def _error_text(e: BaseException) -> str:
    return (f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__)[:5000]


def _interrupted_line(job_file: str, signals: StopSignals, outcomes: list[RunOutcome], jobs,
                      parent_id: Optional[str] = None, overrides=()) -> str:
    if parent_id:  # a sweep: one line for all of it
        import shlex

        left = len(jobs) - sum(o.status == Status.FINISHED for o in outcomes)
        killed = [o for o in outcomes if o.status == Status.KILLED]
        where = "; ".join(f"run {o.run_id} at step {o.step}"
                          + (f" (checkpoint at step {o.checkpoint_step})" if o.checkpoint_step else "") for o in killed[:4])
        where += f" and {len(killed) - 4} more" if len(killed) > 4 else ""
        sets = "".join(f" --set {shlex.quote(str(o))}" for o in overrides or ())
        return (f"interrupted ({signals.name}): {left} of {len(jobs)} sweep runs unfinished"
                + (f" ({where})" if where else "")
                + f"; continue with: hybridlab run {job_file}{sets} --resume-sweep {parent_id}")
    last = next((o for o in reversed(outcomes) if o.status == Status.KILLED), outcomes[-1] if outcomes else None)
    if last is None:
        return f"interrupted ({signals.name}) before training started; nothing to resume"
    where = f"at step {last.step}" + (f", checkpoint at step {last.checkpoint_step}" if last.checkpoint_step else "")
    pins = ""
    j = next((j for j in jobs if j.label == last.label), None)
    if j is not None and j.sweep_values:  # --resume continues one run: pin its sweep combination
        pins = "".join(f" --set '{k}={json.dumps(v)}'" for k, v in j.sweep_values.items())
    return (f"interrupted ({signals.name}): run {last.run_id} stopped {where}; "
            f"continue with: hybridlab run {job_file} --resume {last.run_id}{pins}")


def _resume_target(tracker, resume: str, jobs) -> ResumeTarget:
    if len(jobs) > 1:
        raise UserError(f"--resume continues one run; this job has a sweep of {len(jobs)} runs "
                        f"(pin the sweep keys with --set to pick one)")
    run = tracker.get_run(resume)
    tags = run.data.tags
    if Tag.RUN_NAME not in tags:
        raise UserError(f"MLflow run {resume} was not started by `hybridlab run` (no {Tag.RUN_NAME} tag)")
    return ResumeTarget(run_id=resume, run_name=tags[Tag.RUN_NAME], storage=tags[Tag.STORAGE])


def _base_tags(job, sweep: bool = False) -> dict:
    from hybridlab import __version__

    from .tracking import git_sha

    tags = {Tag.VERSION: __version__, Tag.GIT_SHA: git_sha(), Tag.EXPERIMENT: job.spec.experiment,
            Tag.HOST: socket.gethostname(), Tag.DRIVER_PID: _driver_id()}
    if sweep:
        tags[Tag.SWEEP] = ", ".join(job.spec.sweep)
    tags.update(job.spec.tracking.tags)
    return tags


def _open_parent(tracker, job, experiment: str, n: int, progress: Progress) -> str:
    parent_name = job.spec.tracking.run_name or job.spec.name or f"{experiment}-sweep"
    parent_id = tracker.create_run(experiment, parent_name, _base_tags(job, sweep=True))
    tracker.log_params(parent_id, {f"sweep.{k}": v for k, v in job.spec.sweep.items()})
    from hybridlab.jobs.spec import dump_yaml

    # the whole job, its sweep included: what --resume-sweep compares a job with
    tracker.log_text(parent_id, dump_yaml({**job.resolved, "sweep": job.spec.sweep}), "job.yaml")
    progress.note(f"sweep: {n} runs under MLflow parent run {parent_id}")
    return parent_id


def _driver_id() -> str:
    """``pid:start time`` of this process (a pid alone may be reused)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot
    except (OSError, IndexError):
        return "?"


def close_orphaned_runs(tracker, experiment: str) -> None:
    """Runs of this experiment left RUNNING by a `hybridlab run` on this host that no longer exists (killed
    with SIGKILL, the machine lost power): mark them FAILED, with the reason, so no run stays RUNNING."""
    from mlflow.exceptions import MlflowException

    try:
        exp = tracker.client.get_experiment_by_name(experiment)
        if exp is None:
            return
        runs = tracker.client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)
    except (MlflowException, OSError):
        return  # best effort: the run itself reports a store that does not answer
    host = socket.gethostname()
    for r in runs:
        tags = r.data.tags
        driver = tags.get(Tag.DRIVER_PID, "")
        if tags.get(Tag.HOST) != host or ":" not in driver:
            continue
        pid, started = driver.split(":", 1)
        if pid.isdigit() and _start_time(int(pid)) == started:
            continue  # still running
        tracker.set_tags(r.info.run_id, {Tag.STATUS: Status.FAILED,
                                         Tag.ERROR: f"the hybridlab run process (pid {pid}) exited without closing the run"})
        tracker.terminate(r.info.run_id, "FAILED")


# ---------------------------------------------------------------- one run


def _trainer(*args, **kwargs):
    """A ``TorchTrainer`` without its own SIGINT handler (hybridlab's StopSignals stop the run cleanly) and,
    as the workers make their own batches, without Ray Data's dataset manager: an actor process per run,
    and the Ray Data import in it, for datasets it is never given (Ray 2.60 starts it unconditionally)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller):  # noqa: D401 - see the docstring above
            return None

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer(*args, **kwargs)


class RunDriver:
    """The driver's side of one run: MLflow record, trainer, progress, end."""

    def __init__(self, job, tracker, experiment: str, parent_id: Optional[str], index: Optional[int],
                 resume: Optional[ResumeTarget], progress: Progress, signals: StopSignals, local: bool = False,
                 threaded: bool = False):
        self.job, self.tracker, self.experiment = job, tracker, experiment
        # threaded: one of several runs at once, in a thread of its own; the main thread holds the signals
        self.threaded = threaded
        self._closed = threading.Lock()  # close() once: the main thread may close a run its thread still trains
        self.local = local  # the private local Ray: its workers' process group stays on loopback too
        self.parent_id, self.index, self.resume = parent_id, index, resume
        self.progress, self.signals = progress, signals
        self.label = job.label or job.spec.name or job.spec.experiment
        self.run_id: Optional[str] = None
        self.run_dir: Optional[str] = None
        self.starts = 0
        self.logged_upto = 0  # metrics of steps up to here are in MLflow already (a restart re-runs some)
        self.end: Optional[rec.End] = None
        self.failure: Optional[BaseException] = None  # Ray Train's TrainingFailedError, when training failed
        self.failures_this_attempt: list[rec.Failure] = []  # what each failing worker said, this attempt
        self.attempt, self.started_at_failure = 0, -1  # failures are numbered by worker-group attempt
        self.waiting_since: Optional[float] = None  # set while no worker group is up: launched, or one failed
        self.out: Optional[RunOutcome] = None

    # ------------------------------------------------------------ the whole run

    def run(self) -> RunOutcome:
        t0 = time.time()
        error: Optional[BaseException] = None
        try:
            self.open()
            self.fit()
        except ForcedStop as e:
            self.signals.signum = self.signals.signum or int(e.args[0])
        except BaseException as e:  # closed as FAILED below, then re-raised
            error = e
            raise
        finally:
            if self.out is not None:  # the MLflow run exists: close it, however this ended
                self.out.wall_s = time.time() - t0
                self.close_once(error)
        return self.out

    def close_once(self, error: Optional[BaseException]) -> Optional[RunOutcome]:
        """Close the MLflow run unless that was done already (by this run's thread or, at a forced stop, the main one)."""
        if self.out is None or not self._closed.acquire(blocking=False):
            return None
        self.close(error)
        return self.out

    # ------------------------------------------------------------ set-up: the MLflow run and its folder

    def open(self) -> None:
        from hybridlab.arch import count_spec
        from hybridlab.jobs.spec import flatten

        from .tracking import replay_file, spill_files

        job, spec, tracker = self.job, self.job.spec, self.tracker
        if self.resume:
            self.run_id, run_name, storage = self.resume.run_id, self.resume.run_name, self.resume.storage
            run_dir = f"{storage.rstrip('/')}/{run_name}"
            for path in spill_files(self.run_id, [run_dir if "://" not in run_dir else None, "."]):
                n, _ = replay_file(path, mlflow_client=tracker.client)
                self.progress.note(f"replayed {n} MLflow writes left unsent in {path}")
            tracker.reopen(self.run_id)
            self.out = RunOutcome(run_id=self.run_id, run_name=run_name, label=job.label)
            tracker.set_tags(self.run_id, {Tag.DRIVER_PID: _driver_id(), Tag.HOST: socket.gethostname()})
            self.logged_upto = tracker.last_step(self.run_id, Metric.LOSS)
        else:
            storage = storage_uri(spec.storage.path)
            run_name = _run_name(job, self.index)
            run_dir = f"{storage.rstrip('/')}/{run_name}"
            counts = count_spec(job.model_spec, job.seq_len)
            tags = _base_tags(job)
            tags.update({
                Tag.RUN_NAME: run_name, Tag.STORAGE: storage, Tag.LAYOUT: job.model_spec.layout_str,
                Tag.PARAMS: counts["params"], Tag.FLOPS_TRAIN: counts["flops_per_token_train"],
                Tag.FLOPS_DECODE: counts["flops_per_token_decode"], Tag.MODEL: job.model_spec.name,
                Tag.CHECKPOINTS: run_dir,
            })
            if job.label:
                tags[Tag.SWEEP_VALUES] = job.label
            mlflow_name = spec.tracking.run_name or job.label or spec.name or run_name
            self.run_id = tracker.create_run(self.experiment, mlflow_name, tags, self.parent_id)
            self.out = RunOutcome(run_id=self.run_id, run_name=run_name, label=job.label)
            tracker.log_params(self.run_id, flatten(job.resolved))
            tracker.log_text(self.run_id, job.to_yaml(), "job.yaml")
            tracker.log_text(self.run_id, check_text(job), "check.txt")
            tracker.log_text(self.run_id, f"{run_dir}\n", "checkpoint_location.txt")
        self.run_name, self.storage, self.run_dir = run_name, storage, run_dir
        if "://" not in storage:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "job.yaml").write_text(job.to_yaml())
            (Path(run_dir) / "mlflow_run_id").write_text(self.run_id + "\n")
        self.progress.note(f"MLflow run {self.run_id}  ({self.label}; {spec.resources.workers} worker(s); "
                           f"checkpoints in {run_dir})")

    # ------------------------------------------------------------ the trainer

    def launch(self):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig
        from ray.util.queue import Queue

        from hybridlab.jobs.control import make_run_control
        from hybridlab.jobs.sysmetrics import absolute_uri

        from .localray import loopback_torch_config

        spec, res = self.job.spec, self.job.spec.resources
        self.sink = Queue(actor_options={"num_cpus": 0})
        self.control = make_run_control()
        use_gpu, backend, per_worker = worker_resources(res)
        from hybridlab.jobs.train import train_loop_per_worker

        return _trainer(
            train_loop_per_worker,
            train_loop_config={"job": self.job.resolved, "sink": self.sink, "control": self.control,
                               "run": {"name": self.run_name, "storage": self.storage, "mlflow_run_id": self.run_id,
                                       "tracking_uri": absolute_uri(self.tracker.uri)}},  # system metrics, per node
            scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                                         placement_strategy=res.placement),
            torch_config=loopback_torch_config(backend) if self.local else TorchConfig(backend=backend),
            run_config=RunConfig(name=self.run_name, storage_path=self.storage,
                                 failure_config=FailureConfig(max_failures=res.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=spec.storage.keep)),
        )

    def fit(self) -> None:
        """Train, following the progress messages; a stop signal goes to the workers through the control actor."""
        import ray
        import ray.train

        if self.signals.requested:  # stopped while this run was being set up: do not start its workers
            return
        trainer = self.launch()
        self.waiting_since = time.time()
        done = threading.Event()
        consumer = threading.Thread(target=self._consume, args=(done,), name="hybridlab-progress", daemon=True)
        consumer.start()
        self.signals.relay(lambda: self.control.request_stop.remote(self.signals.name), done)
        try:
            if not self.threaded:  # several runs at once: the main thread holds graceful for all of them
                self.signals.graceful = True
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            self.failure = e
        finally:
            if not self.threaded:
                self.signals.graceful = False
            self._drain_sink()
            done.set()
            consumer.join(timeout=15)
            for actor in (self.sink.actor, self.control):
                try:
                    ray.kill(actor)
                except (ValueError, ray.exceptions.RayError):  # already gone
                    pass

    def _drain_sink(self, timeout: float = 10.0) -> None:
        import ray

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.sink.size() == 0:
                    return
            except ray.exceptions.RayError:
                return
            time.sleep(0.2)

    def _consume(self, done: threading.Event) -> None:
        import ray

        note_at = FIRST_NOTE_S
        while True:
            try:
                msg = self.sink.get(block=True, timeout=0.5)
            except pyqueue.Empty:
                if done.is_set():
                    return
                note_at = self._say_what_workers_wait_for(note_at)
                continue
            except ray.exceptions.RayError:
                if done.is_set():
                    return
                time.sleep(0.5)
                continue
            self.on_message(msg)

    def _say_what_workers_wait_for(self, note_at: float) -> float:
        """While no worker group is up: a line at ``note_at`` s of waiting, then every NOTE_EVERY_S."""
        if self.waiting_since is None:
            return FIRST_NOTE_S
        waited = time.time() - self.waiting_since
        if waited < note_at:
            return note_at
        res = self.job.spec.resources
        _, _, per_worker = worker_resources(res)
        self.progress.note(pending_workers_line(waited, res.workers, per_worker, res.placement))
        return waited + NOTE_EVERY_S

    # ------------------------------------------------------------ the workers' messages

    def on_message(self, msg: rec.Message) -> None:
        tracker, out, run_id = self.tracker, self.out, self.run_id
        if isinstance(msg, rec.Start):
            self.starts += 1
            self.waiting_since = None
            if self.starts == 1:
                self.progress.start(self.label, msg.steps, msg.step)
                if not self.resume:
                    tracker.set_tags(run_id, {Tag.DEVICE: msg.device, Tag.WORLD_SIZE: msg.world})
            else:
                self.progress.note(f"workers restarted (attempt {self.starts}); resuming from step {msg.step}")
            if msg.resumed_from:
                out.checkpoint = msg.resumed_from
        elif isinstance(msg, rec.Metrics):
            if msg.step > self.logged_upto:  # one value per step: a restart re-runs steps already logged
                tracker.log_metrics(run_id, msg.metrics, msg.step, msg.time)
                self.logged_upto = msg.step
            self.progress.update(msg.step, self.job.spec.train.steps, msg.metrics)
            out.step = msg.step
        elif isinstance(msg, rec.Checkpoint):
            out.checkpoint, out.checkpoint_step = msg.path, msg.step
            tracker.log_metrics(run_id, {Metric.CHECKPOINT_STEP: msg.step}, msg.step, msg.time)
        elif isinstance(msg, rec.Eval):
            tracker.log_metrics(run_id, msg.metrics, msg.step, msg.time)
            out.evals = dict(msg.metrics)
        elif isinstance(msg, rec.End):
            self.end = msg
        elif isinstance(msg, rec.Failure):
            self.on_failure(msg)

    def on_failure(self, f: rec.Failure) -> None:
        """A worker's exception: said on the console (a restart follows, or the run fails) and kept in the run."""
        if self.starts > self.started_at_failure or any(g.rank == f.rank for g in self.failures_this_attempt):
            self.attempt += 1  # the workers came up again (or a rank failed twice): a new attempt
            self.failures_this_attempt = []
        self.started_at_failure = self.starts
        self.waiting_since = self.waiting_since or time.time()  # a restart follows: its workers are awaited
        attempt = self.attempt
        name = f"failures/attempt_{attempt}_rank_{f.rank}.txt"
        self.failures_this_attempt.append(f)
        self.progress.note(f"worker rank {f.rank} failed after step {f.step}: {f.error} (traceback: MLflow artifact {name})")
        self.tracker.log_text(self.run_id, f.traceback or f.error, name)
        self.tracker.set_tags(self.run_id, {Tag.LAST_WORKER_ERROR: f"attempt {attempt}, rank {f.rank}, step {f.step}: {f.error}"[:5000]})

    # ------------------------------------------------------------ the end of a run

    def close(self, error: Optional[BaseException]) -> None:
        """Close the MLflow run however the run ended: status, error tag, end time; never left RUNNING."""
        out, end = self.out, self.end
        out.restarts = max(0, self.starts - 1)
        if error is not None:
            out.status, out.message = Status.FAILED, f"the driver failed: {_error_text(error)}"
        elif self.failure is not None:
            out.status, out.message = Status.FAILED, failure_text(self.failure)
        elif end is not None:
            out.status, out.message = end.status, end.message
            out.step = end.step
            out.loss, out.acc = end.loss, end.acc
            if end.last_checkpoint_step is not None:
                out.checkpoint_step = end.last_checkpoint_step
            if end.evals:
                out.evals = end.evals
        elif self.signals.requested:
            out.status, out.message = Status.KILLED, f"stopped by {self.signals.name} before the workers reported"
        else:
            out.status, out.message = Status.FAILED, "the workers ended without a final report"
        t = self.tracker
        t.log_metrics(self.run_id, {Metric.RESTARTS: out.restarts, Metric.WALL_S: out.wall_s}, out.step)
        if out.evals:
            from hybridlab.jobs.evals import eval_table

            t.log_text(self.run_id, eval_table(out.evals) + "\n", "evals.txt")
            from .text_report import log_text_eval_artifacts

            log_text_eval_artifacts(t.client, self.run_id, out.evals, self.label, self.job.seq_len)  # NIAH heatmap, loss-by-position PNGs
        early = {Tag.STOPPED_EARLY: str(end.stopped_early)} if end is not None and end.stopped_early is not None else {}
        t.set_tags(self.run_id, {Tag.STATUS: out.status, **early, **({Tag.ERROR: out.message[:5000]} if out.message else {})})
        t.terminate(self.run_id, Status.mlflow(out.status))


def failure_text(error: BaseException) -> str:
    """One readable line for a failed training: the first failing worker's own exception, by type."""
    from ray.train import ControllerError, WorkerGroupError

    from hybridlab.jobs.checkpoint import CheckpointDiskFull, is_disk_full

    cause: BaseException = error
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        cause = error.worker_failures[min(error.worker_failures)]
    elif isinstance(error, ControllerError):
        cause = error.controller_failure
    seen = set()
    while id(cause) not in seen:  # Ray wraps the worker's exception (RayTaskError.cause, __cause__)
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    text = f"{cause.__class__.__name__}: {lines[-1] if lines else ''}".strip(": ")
    if isinstance(cause, CheckpointDiskFull) or is_disk_full(cause):
        return f"training failed: disk full while checkpointing; the previous checkpoint is intact ({text[:300]})"
    return f"training failed: {text[:800]}"


def _print_summary(outcomes: list[RunOutcome], uri: str, parent_id: Optional[str]) -> None:
    from hybridlab.jobs.evals import eval_table

    for o in outcomes:
        head = f"[{o.label}] " if o.label else ""
        print(f"{head}MLflow run id: {o.run_id}  status: {o.status}  ({o.wall_s:.0f}s"
              + (f", {o.restarts} restart(s)" if o.restarts else "")
              + (f", {o.message}" if o.status == Status.FINISHED and o.message else "") + ")", flush=True)
        if o.loss is not None:
            print(f"{head}final step {o.step}: loss {o.loss:.4f}  accuracy {o.acc if o.acc is not None else float('nan'):.4f}",
                  flush=True)
        if o.evals:
            for line in eval_table(o.evals).splitlines():
                print(f"{head}eval {line}", flush=True)
        if o.checkpoint:
            print(f"{head}checkpoint: {o.checkpoint}", flush=True)
    if parent_id:
        print(f"sweep parent run id: {parent_id}", flush=True)
    print(f"tracking: {uri}  (browse: hybridlab ui{'' if uri.startswith('sqlite:///mlruns.db') else ' --uri ' + uri})", flush=True)
