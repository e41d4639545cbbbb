"""The per-worker training loop: a DeepSpeed ZeRO engine over a ``hybridlab.arch`` model.

``train_loop_per_worker(config)`` runs inside each Ray Train worker (Ray made the
process group: gloo on CPU, NCCL on GPU). ``config`` (plain data, as Ray passes it):

``job``      the resolved job dict (``spec.Job.resolved``), read back as a typed ``Job``
``run``      ``{"name", "storage"}``: the run's folder (resuming goes through Ray: its latest checkpoint),
             and ``"mlflow_run_id"``, ``"tracking_uri"`` when the run is tracked (system metrics, per node)
``sink``     optional ``ray.util.queue.Queue`` receiving rank 0's progress messages (``jobs.record``);
             printed when absent
``control``  optional ``RunControl`` actor: the driver's stop request (SIGINT/SIGTERM)

A run, in the order :func:`train_loop_per_worker` reads:

1. set-up (:meth:`Worker.set_up`): device, process group, system metrics, model (a model
   folder's weights with ``model: {from: DIR}``), engine, data stream;
2. resume (:meth:`Worker.resume`): the run's latest checkpoint, when Ray restored one, and the
   data stream's position saved with it;
3. the step loop (:meth:`Worker.train`): :class:`~hybridlab.jobs.step.TrainStep` per step, and at
   each log point (every ``log_every`` steps) one sync of the device-side statistics: metrics,
   the non-finite check, the stop request — all ranks decide together;
4. checkpoints (:meth:`Worker.save`) every ``checkpoint_every`` steps, at the end, and when stopped
   (with each rank's data-stream position, ``data_state/rank_<r>.json``);
5. evals (:meth:`Worker.evals`) after a finished run;
6. the end (:meth:`Worker.finish`): system metrics stopped, the ``End`` message and Ray's final report.

A non-finite loss, a checkpoint that does not fit and a stop request end the run on all ranks
together *without* raising, so Ray does not retry them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from hybridlab.jobs import checkpoint as ckpt
from hybridlab.jobs import record as rec
from hybridlab.jobs.control import ProgressSender, StopRequest
from hybridlab.jobs.data import TrainStream
from hybridlab.jobs.evals import run_evals
from hybridlab.jobs.record import Metric, Status
from hybridlab.jobs.validation import Validation
from hybridlab.jobs.step import (  # noqa: F401  (deepspeed_config, lr_lambda, ...: part of this module's API)
    PEAK_FLOPS,
    StepStats,
    TrainStep,
    build_engine,
    checkpoint_activations,
    deep_merge,
    deepspeed_config,
    engine_zero_stage,
    import_deepspeed,
    keeps_predictions,
    lr_lambda,
    peak_flops,
    peak_memory_bytes,
)


@dataclass(frozen=True)
class RunPlace:
    """Where a run keeps its files: ``<storage>/<name>/``."""

    name: str
    storage: str
    mlflow_run_id: Optional[str] = None  # the MLflow run (system metrics are logged into it by each node)
    tracking_uri: Optional[str] = None

    @property
    def local_dir(self) -> Optional[str]:
        return os.path.join(ckpt.local_path(self.storage), self.name) if ckpt.is_local(self.storage) else None

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.storage, self.name, ckpt.checkpoint_dir_name(step))


@dataclass
class LoopState:
    """What the loop knows between steps (the worker's own state; nothing rides in the config)."""

    step: int = 0
    tokens: int = 0
    last_ckpt_step: Optional[int] = None
    last_ckpt_bytes: int = 0
    synced_step: int = 0  # the step of the newest sync (log point)
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0
    last_metrics: dict = field(default_factory=dict)


class Worker:
    """One Ray Train worker's run of a job."""

    def __init__(self, job, place: RunPlace, sink=None, control=None):
        import ray.train

        self.job, self.place = job, place
        self.train_spec = job.spec.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank, self.node_rank = ctx.get_local_rank(), ctx.get_node_rank()
        self.progress = ProgressSender(sink, self.rank)
        self.stop = StopRequest(control)
        self.state = LoopState()
        self.validation = Validation(job.resolved["train"], job.resolved["eval"])  # train.eval_every / early_stop
        self.resumed_from: Optional[str] = None
        self.sysmon = None  # the node's MLflow system-metrics monitor (local rank 0 only)
        self._compile_reported = False  # train/compile_s is logged once, at the first log point
        self._compile_window_reset = False

    # ------------------------------------------------------------ 1. set-up

    def set_up(self) -> None:
        import torch.distributed as dist

        from hybridlab.arch import HybridLM, count_spec
        from hybridlab.arch.pretrained import load_weights
        from hybridlab.jobs.sysmetrics import start_system_metrics

        res, t = self.job.spec.resources, self.train_spec
        use_cuda = res.gpus_per_worker > 0 and torch.cuda.is_available()
        if use_cuda:
            import ray.train.torch as rtt

            self.device = rtt.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(res.cpus_per_worker)))
        if not dist.is_initialized():  # Ray Train made the group; this is only for a bare world of one
            import_deepspeed().init_distributed(dist_backend="nccl" if use_cuda else "gloo")
        self._write_worker_info()
        self.sysmon = start_system_metrics(asdict(self.place), self.job.resolved.get("tracking") or {},
                                           self.local_rank, self.node_rank)

        torch.manual_seed(t.seed)  # identical init on every rank
        model = HybridLM(self.job.model_spec)
        if self.job.spec.model_from:  # a fine-tune: start from a model folder's weights (`model: {from: DIR}`)
            load_weights(model, self.job.spec.model_from)
        if t.activation_checkpointing:
            checkpoint_activations(model)
        self.n_params = sum(p.numel() for p in model.parameters())
        counts = count_spec(self.job.model_spec, self.job.seq_len)
        self.flops_per_token = float(counts.get("flops_per_token_train") or 6 * self.n_params)
        self.engine, self.own_schedule = build_engine(model, t, self.world, self.device)
        self.engine_stage = engine_zero_stage(t, self.world)
        self.step_fn = TrainStep(self.engine, self.device)
        self.stats = StepStats(self.device)
        self.stream = TrainStream(self.job.resolved["data"], t.micro_batch, t.grad_accum, t.seed, self.rank, self.world)
        self.seqs_per_step = t.micro_batch * t.grad_accum * self.world  # x the step's (padded) length = tokens
        self.stage_root = ckpt.staging_root(self.place.storage)
        self.peak = peak_flops(self.device)

    def _write_worker_info(self) -> None:
        """``<run dir>/workers/rank_<r>.json`` (pid, host): for operators and fault tests."""
        import ray

        if self.place.local_dir is None:
            return
        d = os.path.join(self.place.local_dir, "workers")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"rank_{self.rank}.json"), "w") as f:
            json.dump({"rank": self.rank, "world": self.world, "pid": os.getpid(), "host": socket.gethostname(),
                       "device": str(self.device), "node_id": ray.get_runtime_context().get_node_id(),
                       "time": time.time()}, f)

    # ------------------------------------------------------------ 2. resume

    def resume(self) -> None:
        """Load the run's latest checkpoint when Ray restored one (a restart, or ``--resume``)."""
        import ray.train

        restored = ray.train.get_checkpoint()
        if restored is None:
            return
        with restored.as_directory() as d:
            meta = ckpt.read_meta(d)
            data_state = ckpt.read_data_state(d, self.rank)
            t = self.train_spec
            if meta.get("world") != self.world and t.zero_stage > 0:
                raise RuntimeError(f"checkpoint {d} was written by {meta.get('world')} ZeRO workers; this run has "
                                   f"{self.world}: resume with resources.workers={meta.get('world')}")
            written = int(meta.get("engine_zero_stage", meta.get("zero_stage", self.engine_stage)))
            if written != self.engine_stage:  # the optimizer state's layout differs: it would not load (or load wrong)
                raise RuntimeError(f"checkpoint {d} holds DeepSpeed ZeRO-{written} state; this run's engine is "
                                   f"ZeRO-{self.engine_stage} (fp32 ZeRO 1-2 runs as 0 on one worker): resume with "
                                   f"--set train.deepspeed.zero_optimization.stage={written}")
            load_path, _ = self.engine.load_checkpoint(d, tag=ckpt.DS_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {d}")
        self.resumed_from = d
        s = self.state
        s.step = s.synced_step = s.last_ckpt_step = int(meta["step"])
        s.tokens = int(meta.get("tokens", 0))
        self.validation.load_state_dict(meta.get("validation"))  # best values and patience so far
        self.stream.resume(data_state)  # a text stream continues where the checkpoint left it (else get() reads forward)
        if self.own_schedule and self.engine.lr_scheduler is not None:
            # the job's lr wins over the checkpoint's (so `--resume --set train.lr=...` takes effect);
            # the schedule's shape (warmup, steps) always comes from the job
            self.engine.lr_scheduler.base_lrs = [self.train_spec.lr for _ in self.engine.lr_scheduler.base_lrs]

    # ------------------------------------------------------------ 3. the step loop

    def train(self) -> rec.End:
        t, s = self.train_spec, self.state
        self.progress.send(rec.Start(step=s.step, steps=t.steps, world=self.world, params=self.n_params,
                                     device=str(self.device), flops_per_token=self.flops_per_token,
                                     resumed_from=self.resumed_from))
        self.engine.train()
        s.window_start = time.perf_counter()
        for step in range(s.step + 1, t.steps + 1):
            log_point = step % t.log_every == 0 or step == t.steps
            ckpt_point = bool(t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps
            batches = [self.stream.get(step, micro) for micro in range(t.grad_accum)]
            out = self.step_fn(batches, keep_predictions=keeps_predictions(log_point, self.rank, self.engine_stage))
            self.stats.add(step, out.loss)
            tokens = self.seqs_per_step * self.stream.seq_len_at(step)  # a curriculum's stages differ in length
            s.step, s.tokens = step, s.tokens + tokens
            s.window_tokens += tokens
            if self.step_fn.compile_s is not None and not self._compile_window_reset:
                s.window_start, s.window_tokens = time.perf_counter(), 0  # compiling is not training throughput
                self._compile_window_reset = True
            if log_point or ckpt_point:
                end = self._sync_point(step, log_point, ckpt_point, out, batches[0])
                if end is not None:
                    return end
            if self.validation.due(step, t.steps) and self._validate(step):
                return self._early_end()
        return rec.End(step=s.step, status=Status.FINISHED, last_checkpoint_step=s.last_ckpt_step,
                       loss=s.last_metrics.get(Metric.LOSS), acc=s.last_metrics.get(Metric.ACC))

    def _sync_point(self, step: int, log_point: bool, ckpt_point: bool, out, batch) -> Optional[rec.End]:
        """Every rank is here at the same step (nothing is checkpointed unchecked): the non-finite check,
        the metrics, the stop request, the checkpoint. The run's end when one of them ends it."""
        s = self.state
        synced = self.stats.sync(stop=self.stop.requested())
        if synced.nonfinite:
            return self._nonfinite_end(synced)
        if log_point:
            self._log(step, synced.loss, out.predictions, batch)
        if synced.stop:
            return self._stopped_end()
        if ckpt_point:
            problem = self.save()
            if problem:
                return rec.End(step=step, status=Status.DISK_FULL, message=problem + self._good_checkpoint(step),
                               last_checkpoint_step=s.last_ckpt_step)
            s.window_start = time.perf_counter()  # checkpoint time is not training throughput
        return None

    def _validate(self, step: int) -> bool:
        """Run the validation evals (``train.eval_every``), log them at ``step``; True (on every rank) when
        ``train.early_stop`` says training is done."""
        import torch.distributed as dist

        metrics = self.evals(self.validation.entries)
        stop = False
        if self.rank == 0:
            self.validation.observe(step, metrics)
            stop = self.validation.should_stop(metrics)
            # the best values so far go with every validation point: a run stopped or failed later keeps them
            self.progress.send(rec.Eval(step=step, metrics={**metrics, **self.validation.best_metrics()}))
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.broadcast(flag, 0)  # rank 0 decides for all
        self.state.window_start = time.perf_counter()  # validation time is not training throughput
        return flag.item() > 0

    def _early_end(self) -> rec.End:
        """``train.early_stop`` was met: a clean end at this step (its checkpoint, then the final evals)."""
        s = self.state
        if s.last_ckpt_step != s.step:
            problem = self.save()
            if problem:
                return rec.End(step=s.step, status=Status.DISK_FULL, message=problem + self._good_checkpoint(s.step),
                               last_checkpoint_step=s.last_ckpt_step)
        return rec.End(step=s.step, status=Status.FINISHED, last_checkpoint_step=s.last_ckpt_step,
                       loss=s.last_metrics.get(Metric.LOSS), acc=s.last_metrics.get(Metric.ACC), stopped_early=s.step)

    def _log(self, step: int, loss: float, preds: Optional[torch.Tensor], batch) -> None:
        s = self.state
        now = time.perf_counter()
        dt = max(1e-9, now - s.window_start)
        tps = s.window_tokens / dt
        m = {
            Metric.LOSS: loss,
            Metric.LR: float(self.engine.get_lr()[0]),
            Metric.TOKENS_PER_S: tps,
            Metric.TOKENS: float(s.tokens),
            Metric.STEP_TIME_S: dt / max(1, step - s.synced_step),
            Metric.PEAK_MEM_GB: peak_memory_bytes(self.device) / 1e9,
        }
        if self.rank == 0 and preds is not None:  # (B, L) ids: the host never gets the (B, L, V) logits
            m[Metric.ACC] = float(self.stream.task.score(preds.cpu(), batch)["acc"])
        gn = self.engine.get_global_grad_norm()
        if gn is not None and math.isfinite(float(gn)):
            m[Metric.GRAD_NORM] = float(gn)
        if self.peak:
            m[Metric.MFU] = self.flops_per_token * tps / (self.peak * self.world)
        if self.step_fn.compile_s is not None and not self._compile_reported:
            m[Metric.COMPILE_S] = self.step_fn.compile_s
            self._compile_reported = True
        self.progress.send(rec.Metrics(step=step, metrics=m))
        s.last_metrics, s.synced_step = m, step
        s.window_start, s.window_tokens = time.perf_counter(), 0

    def _good_checkpoint(self, step: int) -> str:
        last = self.state.last_ckpt_step
        return f"; training stopped at step {step}; last good checkpoint: " + (
            f"step {last} (intact)" if last is not None else "none (no checkpoint was written yet)")

    def _nonfinite_end(self, synced) -> rec.End:
        s = self.state
        first, checked = synced.first_bad_step or s.step, s.step
        where = f"at step {first}" + (f" (found at step {checked}: the loss is checked every "
                                      f"{self.train_spec.log_every} steps, at log points)" if checked != first else "")
        last = s.last_ckpt_step
        good = f"step {last}" if last is not None else "none (no checkpoint was written yet)"
        return rec.End(step=checked, status=Status.NONFINITE, last_checkpoint_step=last,
                       message=f"loss became non-finite (nan/inf) {where}; training stopped; last good checkpoint: {good}")

    def _stopped_end(self) -> rec.End:
        """Asked to stop: save first when the newest checkpoint is older than ``checkpoint_every`` steps
        (or there is none, or checkpoints are only written at the end), so a resume loses at most
        what a crash would."""
        s, every = self.state, self.train_spec.checkpoint_every
        unsaved = s.step - (s.last_ckpt_step or 0)
        if unsaved > 0 and (s.last_ckpt_step is None or not every or unsaved >= every):
            problem = self.save()
            if problem:
                return rec.End(step=s.step, status=Status.KILLED, message=problem + self._good_checkpoint(s.step),
                               last_checkpoint_step=s.last_ckpt_step)
        return rec.End(step=s.step, status=Status.KILLED, last_checkpoint_step=s.last_ckpt_step,
                       message=f"stopped at step {s.step}", loss=s.last_metrics.get(Metric.LOSS),
                       acc=s.last_metrics.get(Metric.ACC))

    # ------------------------------------------------------------ 4. checkpoints

    def save(self) -> Optional[str]:
        """Write one checkpoint of the current step on every rank; the reason when it cannot fit (all ranks agree)."""
        import ray.train
        import torch.distributed as dist

        s, t = self.state, self.train_spec
        step = s.step
        mine, total = ckpt.estimate_bytes(self.n_params, t.zero_stage, self.world, t.precision)
        if s.last_ckpt_bytes:
            prev = s.last_ckpt_bytes
            mine, total = max(mine, prev // self.world if t.zero_stage else prev), max(total, prev)
        problem = ckpt.space_problem(self.stage_root, self.place.storage, mine, total)
        flag = torch.tensor([1.0 if problem else 0.0], device=self.device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            return f"disk full: checkpoint at step {step} not written ({problem or 'another worker is out of space'})"
        staging = ckpt.new_staging_dir(self.stage_root, step, self.rank)
        try:
            self.engine.save_checkpoint(staging, tag=ckpt.DS_TAG, client_state={"step": step, "tokens": s.tokens})
            ckpt.write_data_state(staging, self.rank, self.stream.state_dict())
            if self.rank == 0:
                ckpt.write_meta(staging, {"step": step, "tokens": s.tokens, "world": self.world,
                                          "zero_stage": t.zero_stage, "engine_zero_stage": self.engine_stage,
                                          "precision": t.precision, "time": time.time(),
                                          "validation": self.validation.state_dict()})
            size = ckpt.dir_bytes(staging)
            ray.train.report({"step": step, "checkpoint_step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(staging),
                             checkpoint_dir_name=ckpt.checkpoint_dir_name(step))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if ckpt.is_disk_full(e):
                raise ckpt.CheckpointDiskFull(f"disk full while writing the checkpoint at step {step} ({e}); "
                                              f"the previous checkpoint is intact") from e
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        s.last_ckpt_step = step
        s.last_ckpt_bytes = size * self.world if t.zero_stage else size
        self.progress.send(rec.Checkpoint(step=step, path=self.place.checkpoint_path(step), bytes=s.last_ckpt_bytes))
        return None

    # ------------------------------------------------------------ 5. evals

    def evals(self, entries: Optional[list] = None) -> dict:
        """Rank 0 runs the evals (all ranks in lockstep under ZeRO-3, whose forward is collective):
        the job's, or ``entries`` (the validation evals)."""
        import torch.distributed as dist

        out = {}
        if self.train_spec.zero_stage == 3 or self.rank == 0:
            entries = self.job.resolved["eval"] if entries is None else entries
            out = run_evals(self.engine.module, entries, self.job.resolved["data"], self.device)
        dist.barrier()
        return out if self.rank == 0 else {}

    # ------------------------------------------------------------ 6. the end of a run

    def finish(self, end: rec.End) -> None:
        import ray.train
        import torch.distributed as dist

        self.stop_system_metrics()
        self.progress.send(end)
        self.progress.close()
        ray.train.report({"step": end.step, "status": end.status})
        dist.barrier()


    def stop_system_metrics(self) -> None:
        from hybridlab.jobs.sysmetrics import stop_system_metrics

        monitor, self.sysmon = self.sysmon, None
        stop_system_metrics(monitor)


def train_loop_per_worker(config: dict) -> None:
    from hybridlab.jobs.spec import from_resolved

    worker = Worker(from_resolved(config["job"]), RunPlace(**config["run"]), config.get("sink"), config.get("control"))
    try:
        worker.set_up()
        worker.resume()
        end = worker.train()
        if end.status == Status.FINISHED and worker.job.spec.eval:
            end.evals = worker.evals()
            if worker.rank == 0:
                best = {}
                if worker.validation.every:  # the run's best validation values, the final evals included
                    worker.validation.observe(end.step, end.evals, validated_only=True)
                    best = worker.validation.best_metrics()
                worker.progress.send(rec.Eval(step=end.step, metrics={**end.evals, **best}))
        worker.finish(end)
    except Exception as e:  # an interrupt is not a failure to explain
        worker.progress.send_failure(rec.Failure.of(e, worker.rank, worker.state.step))
        raise
    finally:
        worker.stop_system_metrics()  # a worker that fails leaves no monitor thread logging into the run
