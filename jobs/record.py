"""The run record: what a run is called in MLflow, and the messages a training worker sends.

One home for the vocabulary that the worker (``jobs/train.py``), the driver
(``hybridlab.runner``), ``hybridlab compare``, ``hybridlab eval`` and the tracker
share:

* MLflow tag names (``Tag``), metric names (``Metric``, ``metric_name`` for evals),
  the run's final statuses (``Status``) and the MLflow statuses they map to;
* ``is_training_run(tags)``: a run trained by ``hybridlab run`` (not a sweep's
  parent, a comparison or an eval child);
* the worker's progress messages, typed: :class:`Start`, :class:`Metrics`,
  :class:`Checkpoint`, :class:`Eval`, :class:`End`. Rank 0 sends them through a
  queue; the driver reads them by type.

Torch-free and Ray-free: ``compare`` and ``evaluate`` import it cheaply.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union


class Tag:
    """MLflow tag names of a hybridlab run."""

    RUN_NAME = "hybridlab.run_name"  # the run's folder name under the storage path (also Ray Train's run name)
    STORAGE = "hybridlab.storage"  # the storage path the run's folder lives in
    CHECKPOINTS = "hybridlab.checkpoints"  # <storage>/<run name>: where its checkpoints are
    KIND = "hybridlab.kind"  # comparison | eval for runs that are not training runs
    SWEEP = "hybridlab.sweep"  # on a sweep's parent run: the swept keys
    SWEEP_VALUES = "hybridlab.sweep_values"  # on a sweep child: its combination, "k=v, k=v"
    SUPERSEDED = "hybridlab.superseded"  # on a sweep child --resume-sweep could not continue (no checkpoint): started anew
    LAYOUT = "hybridlab.layout"
    MODEL = "hybridlab.model"
    PARAMS = "hybridlab.params"
    FLOPS_TRAIN = "hybridlab.flops_per_token_train"
    FLOPS_DECODE = "hybridlab.flops_per_token_decode"
    DEVICE = "hybridlab.device"
    WORLD_SIZE = "hybridlab.world_size"
    STATUS = "hybridlab.status"  # a Status value, set when the run ends
    ERROR = "hybridlab.error"  # why a run did not finish
    LAST_WORKER_ERROR = "hybridlab.last_worker_error"  # the latest exception a worker raised (a restart may follow)
    VERSION = "hybridlab.version"
    GIT_SHA = "hybridlab.git_sha"
    EXPERIMENT = "hybridlab.experiment"
    HOST = "hybridlab.host"
    DRIVER_PID = "hybridlab.driver_pid"  # the `hybridlab run` process that holds the run open
    CHECKPOINT = "hybridlab.checkpoint"  # on an eval run: the checkpoint it scored
    LAST_EVAL = "hybridlab.last_eval"
    COMPARED_RUNS = "hybridlab.compared_runs"
    STOPPED_EARLY = "hybridlab.stopped_early"  # train.early_stop ended training: the step it stopped at
    PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
    NOTE = "mlflow.note.content"


KIND_COMPARISON = "comparison"
KIND_EVAL = "eval"


class Metric:
    """MLflow metric names written by a training run (evals: :func:`metric_name`)."""

    LOSS = "train/loss"
    ACC = "train/acc"
    LR = "train/lr"
    TOKENS_PER_S = "train/tokens_per_s"
    TOKENS = "train/tokens"
    STEP_TIME_S = "train/step_time_s"
    PEAK_MEM_GB = "train/peak_mem_gb"
    GRAD_NORM = "train/grad_norm"
    MFU = "train/mfu"
    COMPILE_S = "train/compile_s"  # the first (compiling) step's wall time, with train.compile on
    CHECKPOINT_STEP = "checkpoint/step"
    RESTARTS = "run/restarts"
    WALL_S = "run/wall_s"


# ---------------------------------------------------------------- eval metric names

# the per-(task, length) metrics, in table order. scaled_acc: the headline accuracy (final_acc where a
# task reports it, else acc) rescaled so chance is 0 and perfect is 1, a fraction (x100: the Mamba-3 table)
EVAL_METRICS = ("acc", "final_acc", "scaled_acc", "seq_acc", "loss")
EVAL_METRIC_RE = re.compile(r"^eval/(?P<task>[^/]+)/len_(?P<len>\d+)/(?P<what>[^/]+)$")  # what metric_name writes


def metric_name(task: str, seq_len: int, what: str = "acc") -> str:
    return f"eval/{task}/len_{seq_len}/{what}"


# ---- the best value of a validated metric over a run (train.eval_every: jobs/validation.py)
BEST_PREFIX, BEST_STEP_PREFIX = "best/", "best_step/"


def best_metric(metric: str) -> str:
    """``best/<metric>``: the metric's best value over the run's validation points and final evals."""
    return BEST_PREFIX + metric


def best_step_metric(metric: str) -> str:
    """``best_step/<metric>``: the step at which ``best/<metric>`` was reached."""
    return BEST_STEP_PREFIX + metric


# ---- text evals (jobs/text_evals.py): lm-evaluation-harness, needle-in-a-haystack, per-position perplexity
#
#   eval/lm_eval/<task>/<metric>                     one lm-eval task's metric (filter "none" dropped,
#                                                    others appended: exact_match_strict-match)
#   eval/niah/len_<L>/depth_<D>/acc                  exact match at prompt length L, needle at D % depth
#   eval/niah/len_<L>/acc                            the mean over the depths (matches EVAL_METRIC_RE)
#   eval/ppl_by_pos/len_<L>/pos_<a>_<b>/loss | ppl   mean next-token loss over positions [a, b) of L-token windows
#   eval/ppl_by_pos/len_<L>/loss | ppl               over all L positions (matches EVAL_METRIC_RE)

LM_EVAL_RE = re.compile(r"^eval/lm_eval/(?P<task>[^/]+)/(?P<metric>[^/]+)$")
NIAH_RE = re.compile(r"^eval/niah/len_(?P<len>\d+)/depth_(?P<depth>\d+)/acc$")
PPL_POS_RE = re.compile(r"^eval/ppl_by_pos/len_(?P<len>\d+)/pos_(?P<a>\d+)_(?P<b>\d+)/(?P<what>loss|ppl)$")
_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- :]")


def _safe(part: str) -> str:
    return _MLFLOW_UNSAFE.sub("_", str(part)) or "_"


def lm_eval_metric(task: str, metric: str, filter_name: str = "none") -> str:
    m = metric if filter_name in ("none", "", None) else f"{metric}_{filter_name}"
    return f"eval/lm_eval/{_safe(task)}/{_safe(m)}"


def niah_metric(seq_len: int, depth_pct: int | None = None) -> str:
    if depth_pct is None:
        return metric_name("niah", seq_len, "acc")
    return f"eval/niah/len_{seq_len}/depth_{int(depth_pct)}/acc"


def ppl_pos_metric(seq_len: int, start: int, end: int, what: str = "loss") -> str:
    return f"eval/ppl_by_pos/len_{seq_len}/pos_{start}_{end}/{what}"


# ---------------------------------------------------------------- statuses


class Status:
    """How a run ended (tag ``hybridlab.status``), and the MLflow status each one closes the run with."""

    FINISHED = "finished"
    NONFINITE = "nonfinite"  # the loss became nan/inf: all ranks stopped, the last good checkpoint kept
    DISK_FULL = "disk_full"  # a checkpoint did not fit: stopped before writing it
    KILLED = "killed"  # SIGINT/SIGTERM: stopped cleanly, resumable
    FAILED = "failed"  # anything else

    MLFLOW = {FINISHED: "FINISHED", KILLED: "KILLED"}  # everything else closes FAILED

    @classmethod
    def mlflow(cls, status: str) -> str:
        return cls.MLFLOW.get(status, "FAILED")


MLFLOW_FINISHED = "FINISHED"
MLFLOW_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


def is_training_run(tags: Mapping[str, str]) -> bool:
    """True for a run trained by a job: not a comparison, not an eval child, not a sweep's parent."""
    if tags.get(Tag.KIND) in (KIND_COMPARISON, KIND_EVAL):
        return False
    return Tag.SWEEP not in tags


# ---------------------------------------------------------------- the worker's progress messages


def _now() -> float:
    return time.time()


@dataclass
class Start:
    """The workers are up (sent again after every restart of the worker group)."""

    step: int  # the step training continues after (0: a fresh run)
    steps: int  # the job's total steps
    world: int
    params: int
    device: str
    flops_per_token: float
    resumed_from: Optional[str] = None  # the checkpoint folder it resumed from
    time: float = field(default_factory=_now)


@dataclass
class _StepMetrics:
    step: int
    metrics: dict
    time: float = field(default_factory=_now)


@dataclass
class Metrics(_StepMetrics):
    """Rank 0's training metrics at a log point (``Metric`` names -> values)."""


@dataclass
class Checkpoint:
    """A checkpoint was committed."""

    step: int
    path: str
    bytes: int
    time: float = field(default_factory=_now)


@dataclass
class Eval(_StepMetrics):
    """Eval metrics at ``step`` (``metric_name`` names -> values): the validation evals during training
    (``train.eval_every``), and the evals after training with the run's ``best/`` metrics."""


@dataclass
class End:
    """The workers stopped: how (a ``Status`` value) and where."""

    step: int
    status: str
    message: str = ""
    last_checkpoint_step: Optional[int] = None
    loss: Optional[float] = None
    acc: Optional[float] = None
    evals: dict = field(default_factory=dict)
    stopped_early: Optional[int] = None  # train.early_stop ended training at this step (status FINISHED)
    time: float = field(default_factory=_now)


@dataclass
class Failure:
    """A worker raised: sent (by the failing rank, whichever it is) before its exception reaches Ray, so
    the driver can say why the workers restart or fail instead of only that they did."""

    rank: int
    step: int  # the last step the worker completed
    error: str  # "ExceptionType: message", one line
    traceback: str = ""
    time: float = field(default_factory=_now)

    @staticmethod
    def of(exc: BaseException, rank: int, step: int) -> "Failure":
        import traceback as tb

        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Failure(rank=rank, step=step, error=f"{type(exc).__name__}: {first}".rstrip(": "),
                       traceback="".join(tb.format_exception(exc))[-20000:])


Message = Union[Start, Metrics, Checkpoint, Eval, End, Failure]
