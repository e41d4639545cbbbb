"""Validation during training, the best value of each validated metric, and early stopping.

```yaml
train:
  eval_every: 500                 # run the validation evals every 500 steps (default: never)
  validation: {tasks: [mqar], seq_lens: [256], batches: 2}   # optional: which of the job's evals, how many batches
  early_stop: {metric: eval/mqar/len_256/acc, threshold: 0.99, mode: max, patience: 1}
```

* ``train.eval_every: N`` runs the *validation evals* at every N-th step (not at the last step:
  the final evals run there anyway) and logs them at that step under the usual eval names
  (``eval/<task>/len_<L>/<metric>``, ``jobs.record.metric_name``), so an MLflow metric's history
  is its validation curve and its last value the final eval.
* ``train.validation`` picks them out of the job's ``eval`` list: ``tasks`` (eval task names as
  written there; default all), ``seq_lens`` (default each entry's own), ``batches`` and
  ``batch_size`` (default each entry's own). The batches are the eval's own (``evals.eval_seed``):
  with fewer ``batches`` a validation scores the first batches of the final eval's set.
* ``train.early_stop`` ends training at the first validation point where ``metric`` has been
  ``>= threshold`` (``mode: max``, the default) or ``<= threshold`` (``mode: min``) at
  ``patience`` (default 1) validation points in a row. The end is a clean one: a checkpoint
  at that step, the final evals, status FINISHED, and the tag ``hybridlab.stopped_early`` =
  the step (``record.Tag.STOPPED_EARLY``).
* At every validation point, and at the end (the final evals included), every validated metric's
  best value so far is logged as ``best/<metric>`` and the step it was reached at as
  ``best_step/<metric>`` (``record.best_metric``), so a run stopped or failed midway keeps them: the "best validation accuracy" of a paper's
  protocol, to be read from MLflow or selected on in ``hybridlab compare --select``. Best is
  the largest value, the smallest for ``loss`` / ``ppl`` (and for the early-stop metric with
  ``mode: min``).

The keys are checked when the job loads (:func:`check`): an early-stop metric must be one that
the validation evals write. The loop keeps the best values and the patience count in each
checkpoint (:meth:`Validation.state_dict`), so a resumed run continues them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from hybridlab.jobs.record import EVAL_METRIC_RE, EVAL_METRICS, best_metric, best_step_metric, metric_name

LOWER_IS_BETTER = ("loss", "ppl")  # the last part of a metric name whose best value is its smallest


def validation_evals(evals: list[dict], validation: Optional[dict]) -> list[dict]:
    """The job's resolved eval entries that validation runs, narrowed by ``train.validation``."""
    v = validation or {}
    tasks, lens = v.get("tasks") or [], v.get("seq_lens") or []
    out = []
    for e in evals:
        if tasks and e.get("task") not in tasks:
            continue
        e = dict(e)
        if lens:
            e["seq_lens"] = [L for L in e.get("seq_lens") or [] if L in lens]
            if not e["seq_lens"]:
                continue
        for k in ("batches", "batch_size"):
            if v.get(k) is not None:
                e[k] = v[k]
        out.append(e)
    return out


def _writes(entry: dict, metric: str) -> bool:
    """Whether the eval ``entry`` writes ``metric``."""
    from hybridlab.jobs import tasks as _tasks
    from hybridlab.jobs.text_evals import is_text_eval

    task = entry.get("task")
    if is_text_eval(task):  # their own names (jobs/record.py): anything under eval/<task>/
        return metric.startswith(f"eval/{task}/")
    m = EVAL_METRIC_RE.match(metric)
    if not m or m["task"] != task or int(m["len"]) not in (entry.get("seq_lens") or []):
        return False
    cls = _tasks.TASKS.get(_tasks.canonical_name(task)) if isinstance(task, str) else None
    return m["what"] in EVAL_METRICS and (m["what"] != "final_acc" or bool(getattr(cls, "REPORT_FINAL", False)))


def metric_names(entries: list[dict]) -> list[str]:
    """The ``eval/<task>/len_<L>/<what>`` names the (non-text) eval entries write: for messages."""
    from hybridlab.jobs.text_evals import is_text_eval

    names = []
    for e in entries:
        if is_text_eval(e.get("task")):
            names.append(f"eval/{e.get('task')}/...")
            continue
        for L in e.get("seq_lens") or []:
            names += [n for n in (metric_name(e["task"], L, w) for w in EVAL_METRICS) if _writes(e, n)]
    return names


def check(train, evals: list[dict], src, lengths_known: bool = True) -> None:
    """Located errors for ``train.eval_every`` / ``validation`` / ``early_stop`` (``train``: a TrainSpec)."""
    from hybridlab.arch.specio import did_you_mean

    where = ("train",)
    if train.eval_every is not None and train.eval_every <= 0:
        raise src.error(where + ("eval_every",), f"must be a positive number of steps, got {train.eval_every}")
    v, es = train.validation, train.early_stop
    for key, given in (("validation", v), ("early_stop", es)):
        if given is not None and train.eval_every is None:
            raise src.error(where + (key,), "needs train.eval_every (how often to validate)")
    if train.eval_every is not None and not evals:
        raise src.error(where + ("eval_every",), "the job has no evals to validate with: add an eval list")
    if v is not None:
        names = [e.get("task") for e in evals]
        for i, t in enumerate(v.tasks):
            if t not in names:
                raise src.error(where + ("validation", "tasks", i), f"{t!r} is not a task of the job's evals"
                                f"{did_you_mean(t, names)}; they are: {', '.join(map(str, dict.fromkeys(names)))}")
        lens = sorted({L for e in evals if not v.tasks or e.get("task") in v.tasks for L in e.get("seq_lens") or []})
        for i, L in enumerate(v.seq_lens):
            if lengths_known and L not in lens:
                raise src.error(where + ("validation", "seq_lens", i), f"{L} is not a length of the validated evals "
                                f"(they run at {', '.join(map(str, lens)) or 'no length'})")
        for k in ("batches", "batch_size"):
            if getattr(v, k) is not None and getattr(v, k) <= 0:
                raise src.error(where + ("validation", k), f"must be positive, got {getattr(v, k)}")
    if es is not None:
        if es.patience <= 0:
            raise src.error(where + ("early_stop", "patience"), f"must be a positive number of validations, got {es.patience}")
        if not math.isfinite(es.threshold):
            raise src.error(where + ("early_stop", "threshold"), f"must be a finite number, got {es.threshold}")
        entries = validation_evals(evals, dataclass_dict(v))
        if not es.metric.startswith("eval/"):
            raise src.error(where + ("early_stop", "metric"), f"{es.metric!r}: unknown metric prefix (early stopping reads "
                            f"a validated eval metric, eval/<task>/len_<L>/<metric>, e.g. "
                            f"{(metric_names(entries) or ['eval/mqar/len_256/acc'])[0]})")
        if lengths_known and not any(_writes(e, es.metric) for e in entries):
            known = metric_names(entries)
            raise src.error(where + ("early_stop", "metric"), f"{es.metric!r} is not written by the validation evals"
                            f"{did_you_mean(es.metric, known)}; they write: {', '.join(known[:12])}"
                            f"{' ...' if len(known) > 12 else ''}")


def dataclass_dict(x: Any) -> Optional[dict]:
    import dataclasses

    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x


class Validation:
    """The loop's validation state: when to validate, the best values, the early-stop decision.

    Built from the resolved ``train`` section and eval list (plain data, as the worker has them)."""

    def __init__(self, train: dict, evals: list[dict]):
        self.every = train.get("eval_every")
        self.entries = validation_evals(evals, train.get("validation")) if self.every else []
        es = train.get("early_stop") or None
        self.early_stop = dict(es) if es else None
        self.best: dict[str, float] = {}
        self.best_step: dict[str, int] = {}
        self.hits = 0  # validation points in a row at which the early-stop threshold held

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step != last_step

    def _higher_is_better(self, name: str) -> bool:
        es = self.early_stop
        if es and name == es["metric"]:
            return es.get("mode", "max") == "max"
        return name.rsplit("/", 1)[-1] not in LOWER_IS_BETTER

    def observe(self, step: int, metrics: dict, validated_only: bool = False) -> None:
        """Keep each metric's best value (with ``validated_only``, only the names validation writes)."""
        for k, val in metrics.items():
            if not isinstance(val, (int, float)) or not math.isfinite(float(val)) or not k.startswith("eval/"):
                continue
            if validated_only and k not in self.best and not any(_writes(e, k) for e in self.entries):
                continue
            old = self.best.get(k)
            if old is None or (val > old if self._higher_is_better(k) else val < old):
                self.best[k], self.best_step[k] = float(val), int(step)

    def should_stop(self, metrics: dict) -> bool:
        """After a validation point's metrics: has the early-stop condition held ``patience`` times in a row?"""
        es = self.early_stop
        if not es:
            return False
        val = metrics.get(es["metric"])
        ok = val is not None and math.isfinite(float(val)) and (
            val >= es["threshold"] if es.get("mode", "max") == "max" else val <= es["threshold"])
        self.hits = self.hits + 1 if ok else 0
        return self.hits >= int(es.get("patience", 1))

    def best_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.best.items():
            out[best_metric(k)] = v
            out[best_step_metric(k)] = float(self.best_step[k])
        return out

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "best_step": dict(self.best_step), "hits": self.hits}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.best = {str(k): float(v) for k, v in state.get("best", {}).items()}
            self.best_step = {str(k): int(v) for k, v in state.get("best_step", {}).items()}
            self.hits = int(state.get("hits", 0))
