"""`hybridlab compare EXPERIMENT`: runs side by side from MLflow.

Reads the finished training runs of an experiment (not sweep parents, not earlier
comparisons; ``--status``/``--all`` pick runs of other statuses, and runs named with
``--runs`` count whatever their status), and writes into one folder:

``summary.csv``        one row per run: name, label, status, layout, params, FLOPs/token,
                       steps, tokens, final loss, and one column per eval metric
``evals.csv``          long form: run, task, length, metric, value
``loss.csv``           the loss history: run, step, tokens, loss (one value per step: after a
                       worker restart re-ran steps, the newest)
``comparison.json``    all of the above
``accuracy_vs_length.png``   one subplot per eval task, one line per run
``loss_vs_tokens.png``       training loss of every run
``text_evals.csv``, ``niah_<run>.png``, ``ppl_by_position.png``   the text evals (lm-eval, NIAH
                       heatmaps, loss by position: ``text_report.py``), when the runs have them

prints the summary as a rich table, and logs the folder as the artifacts of a
new ``comparison`` run in the same experiment (tag ``hybridlab.kind=comparison``).

Eval metrics are the ``eval/<task>/len_<L>/<what>`` metrics written by the
training job (``jobs/evals.py``) and by ``hybridlab eval``. ``--metric`` picks
``<what>``: ``auto`` (default) is ``final_acc`` for tasks that report it (parity,
modular arithmetic: the whole-sequence answer) and ``acc`` otherwise.

Best of a sweep (``--best-of KEY --select METRIC [--select-mode max|min]``): the runs are
grouped by their sweep values (tag ``hybridlab.sweep_values``) leaving out the ``--best-of``
key(s) — e.g. one group per layout and task of a learning-rate sweep — and each group is
represented by its run with the best value of ``METRIC`` (any metric of the runs: an eval,
``best/eval/...`` from ``train.eval_every``, ``train/loss`` with ``--select-mode min``). The
table, CSVs and plots then show one row per group, with the chosen value of each best-of key
and the selection metric as columns; ``comparison.json`` keeps every group's candidates.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hybridlab.jobs.record import (EVAL_METRIC_RE, EVAL_METRICS, KIND_COMPARISON, KIND_EVAL, MLFLOW_FINISHED, Metric,
                                   Tag, is_training_run, lm_eval_metric)

from .errors import UserError
from .text_report import is_text_metric, lm_eval_columns, pyplot, save_figure, write_comparison_text_evals

METRIC_CHOICES = ("auto",) + EVAL_METRICS  # --metric: auto (final_acc where reported, else acc) or one eval metric
STATUS_CHOICES = ("finished", "failed", "killed", "running", "all")  # MLflow run statuses compare can pick
SELECT_MODES = ("max", "min")  # --select-mode: the best run of a group has the largest / smallest --select value


@dataclass
class RunInfo:
    run_id: str
    name: str
    label: str
    status: str
    layout: str = ""
    model: str = ""
    params: Optional[int] = None
    flops_per_token: Optional[float] = None
    train_task: str = ""
    train_seq_len: Optional[int] = None
    steps: Optional[int] = None
    tokens: Optional[float] = None
    final_loss: Optional[float] = None
    start_time: int = 0
    parent_run_id: str = ""
    evals: dict = field(default_factory=dict)  # {task: {length: {what: value}}}
    loss_history: list = field(default_factory=list)  # [(step, tokens or None, loss)]
    chance: dict = field(default_factory=dict)  # {task: chance accuracy}
    text_metrics: dict = field(default_factory=dict)  # eval/lm_eval/*, eval/niah/*/depth_*, eval/ppl_by_pos/*/pos_* (text_report.py)
    chosen: dict = field(default_factory=dict)  # --best-of: {best-of key: this run's value}
    selected: Optional[float] = None  # --best-of: its value of the --select metric
    sweep: dict = field(default_factory=dict)  # its sweep combination {job path: value as text}
    line: str = ""  # --x: its curve's label (the label less the --x key)


@dataclass
class Comparison:
    experiment: str
    experiment_id: str
    tracking_uri: str
    metric: str
    runs: list[RunInfo]
    columns: list[tuple[str, int, str]]  # (task, length, what) of the table
    text_columns: list[tuple[str, str]] = field(default_factory=list)  # (lm-eval task, metric) of the table
    out_dir: str = ""
    comparison_run_id: str = ""
    files: list[str] = field(default_factory=list)
    best_of: list[str] = field(default_factory=list)  # --best-of keys (empty: every run is shown)
    select: str = ""  # --select metric
    select_mode: str = "max"
    groups: list[dict] = field(default_factory=list)  # --best-of: each group's label, pick and candidates
    x: str = ""  # --x: the swept key on the curves' x axis
    curves: dict = field(default_factory=dict)  # --x: {column name: {line: [[x, value], ...]}}


# ---------------------------------------------------------------- reading runs


def _client(uri: str):
    from .tracking import client

    return client(uri)


def _store_errors() -> tuple:
    """What reading the store may raise (MLflow's own errors; a server away: OSError)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


def _num(v: Any, cast=float):
    try:
        x = cast(float(v))
    except (TypeError, ValueError):
        return None
    return x


def sweep_values(tags: dict) -> dict[str, str]:
    """A sweep child's combination, {job path: value as text}, from its ``hybridlab.sweep_values`` tag."""
    out = {}
    for p in re.split(r", (?=[A-Za-z_][\w.]*=)", tags.get(Tag.SWEEP_VALUES) or ""):
        key, eq, value = p.partition("=")
        if eq:
            out[key] = value
    return out


def _label(run, drop: Sequence[str] = ()) -> str:
    """A short name for plots: the sweep values (less the keys in ``drop``), else the layout, else the run name.

    A sweep value that is a string (a layout, a task) stands alone; a number or a
    boolean is shown with its key's last part (``rope=false``, ``lr=0.003``)."""
    tags = run.data.tags
    sv = tags.get(Tag.SWEEP_VALUES)
    if sv:
        parts = []
        for p in re.split(r", (?=[A-Za-z_][\w.]*=)", sv):
            key, _, value = p.partition("=")
            if not _:
                parts.append(p)
            elif key in drop:
                continue
            elif value.lower() in ("true", "false", "none", "null") or _num(value) is not None:
                parts.append(f"{key.split('.')[-1]}={value.lower() if value in ('True', 'False') else value}")
            else:
                parts.append(value)
        if parts:
            return ", ".join(parts)
    return tags.get(Tag.LAYOUT) or run.info.run_name or run.info.run_id[:8]


def _chance(params: dict) -> dict:
    """Chance accuracy of each eval task of a run, from its logged job (best effort)."""
    from hybridlab.jobs.data import build_task, eval_task_options
    from hybridlab.jobs.tasks import TaskError

    out = {}
    try:
        evals = json.loads(params.get("eval", "[]"))
    except ValueError:
        return out
    data = {"task": params.get("data.task", "")}
    for k, v in params.items():
        if k.startswith("data.") and k != "data.task":
            try:
                data[k[5:]] = json.loads(v)
            except ValueError:
                data[k[5:]] = v
    for e in evals if isinstance(evals, list) else []:
        if not isinstance(e, dict) or "task" not in e:
            continue
        name, opts = eval_task_options(e, data)
        try:
            out[name] = float(build_task(name, opts).chance)
        except (TaskError, TypeError):  # a task or option this version does not know: no chance line
            pass
    return out


def _per_step(history) -> dict:
    """One value per step: the newest, when a restart logged a step twice."""
    out = {}
    for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
        out[int(m.step)] = m
    return out


def _history(client, run_id: str) -> list:
    try:
        loss = _per_step(client.get_metric_history(run_id, Metric.LOSS))
        toks = {s: m.value for s, m in _per_step(client.get_metric_history(run_id, Metric.TOKENS)).items()}
    except _store_errors():
        return []
    return [(s, toks.get(s), float(m.value)) for s, m in sorted(loss.items())]


def _run_info(client, run) -> RunInfo:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    info = RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        label=_label(run),
        status=run.info.status,
        layout=tags.get(Tag.LAYOUT, params.get("model.layout", "")),
        model=tags.get(Tag.MODEL, params.get("model.name", "")),
        params=_num(tags.get(Tag.PARAMS), int),
        flops_per_token=_num(tags.get(Tag.FLOPS_TRAIN)),
        train_task=params.get("data.task", ""),
        train_seq_len=_num(params.get("data.seq_len"), int),
        final_loss=metrics.get(Metric.LOSS),
        tokens=metrics.get(Metric.TOKENS),
        start_time=int(run.info.start_time or 0),
        parent_run_id=tags.get(Tag.PARENT, ""),
    )
    for key, value in metrics.items():
        m = EVAL_METRIC_RE.match(key)
        if m:
            info.evals.setdefault(m["task"], {}).setdefault(int(m["len"]), {})[m["what"]] = float(value)
        elif is_text_metric(key):
            info.text_metrics[key] = float(value)
    info.loss_history = _history(client, run.info.run_id)
    if info.loss_history:
        info.steps = info.loss_history[-1][0]
        info.final_loss = info.loss_history[-1][2]
    info.chance = _chance(params)
    return info


def _experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        try:
            names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        except _store_errors():
            names = []
        from hybridlab.arch.specio import did_you_mean

        hint = did_you_mean(name, names)
        known = f"; experiments: {', '.join(names)}" if names else "; the store has no experiments yet"
        raise UserError(f"no MLflow experiment {name!r} in {uri}{hint}{known}")
    return exp


def _status_ok(run, status: str) -> bool:
    return status == "all" or run.info.status == status.upper()


MIN_ID_PREFIX = 6  # a shorter "run id prefix" is too likely to be some run's name, or to match many ids


def _named_or_prefixed(runs: list, w: str, experiment: str) -> list:
    """The runs named ``w``; else the one run whose id starts with ``w`` (names win: "b" is a name, not an id)."""
    named = [r for r in runs if r.info.run_name == w]
    if named or len(w) < MIN_ID_PREFIX:
        return named
    prefixed = [r for r in runs if r.info.run_id.startswith(w)]
    if len(prefixed) > 1:
        raise UserError(f"run id prefix {w!r} matches {len(prefixed)} runs in experiment {experiment!r}: give more of the id")
    return prefixed


def select_runs(client, exp, runs: Sequence[str] = (), latest: bool = False, status: str = "finished") -> list:
    """The runs to compare: the training runs of ``status`` (``finished`` by default, ``all``), or those
    named by ``runs`` whatever their status (run ids, id prefixes, run names, or a sweep parent's id for
    all its children), or with ``latest`` the children of the newest sweep (the newest run when it is no sweep)."""
    try:
        all_runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time DESC"])
    except _store_errors() as e:
        raise UserError(f"cannot read the runs of experiment {exp.name!r}: {' '.join(str(e).split())[:200]}") from None
    training_any = [r for r in all_runs if is_training_run(r.data.tags)]
    training = [r for r in training_any if _status_ok(r, status)]
    wanted = [w.strip() for item in runs for w in str(item).split(",") if w.strip()]
    if wanted:
        picked, seen = [], set()
        for w in wanted:
            hits = [r for r in all_runs if r.info.run_id == w]
            if not hits:
                children = [r for r in training_any if r.data.tags.get(Tag.PARENT) == w]
                hits = children or _named_or_prefixed(training_any, w, exp.name)
            elif not is_training_run(hits[0].data.tags):
                hits = [r for r in training_any if r.data.tags.get(Tag.PARENT) == w] or hits
            if not hits:
                raise UserError(f"no run {w!r} in experiment {exp.name!r} (give run ids, run names or a sweep's parent run id)")
            for r in sorted(hits, key=lambda r: r.info.start_time or 0):
                if r.info.run_id not in seen:
                    seen.add(r.info.run_id)
                    picked.append(r)
        return picked
    if not training:
        others = len(training_any)
        if others:
            raise UserError(f"experiment {exp.name!r} has no {status} training runs to compare ({others} of other "
                            f"statuses: --all includes them)")
        raise UserError(f"experiment {exp.name!r} has no training runs to compare")
    if latest:
        newest = training[0]
        parent = newest.data.tags.get(Tag.PARENT)
        chosen = [r for r in training if parent and r.data.tags.get(Tag.PARENT) == parent] or [newest]
        return sorted(chosen, key=lambda r: r.info.start_time or 0)
    return sorted(training, key=lambda r: r.info.start_time or 0)


def _merge_eval_children(client, exp, infos: list[RunInfo]) -> None:
    """Evals logged by ``hybridlab eval --child`` count as their parent's (the newest wins)."""
    by_id = {i.run_id: i for i in infos}
    try:
        kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`{Tag.KIND}` = '{KIND_EVAL}'",
                                  max_results=5000, order_by=["attributes.start_time ASC"])
    except _store_errors():
        return
    for k in kids:
        parent = by_id.get(k.data.tags.get(Tag.PARENT, ""))
        if parent is None:
            continue
        for key, value in k.data.metrics.items():
            m = EVAL_METRIC_RE.match(key)
            if m:
                parent.evals.setdefault(m["task"], {}).setdefault(int(m["len"]), {})[m["what"]] = float(value)
            elif is_text_metric(key):
                parent.text_metrics[key] = float(value)


def _unique_labels(infos: list[RunInfo]) -> None:
    if len({i.train_task for i in infos}) > 1:  # runs trained on different tasks: say which
        for i in infos:
            if i.train_task and i.train_task not in i.label:
                i.label = f"{i.label} [{i.train_task}]"
    counts: dict[str, int] = {}
    for i in infos:
        counts[i.label] = counts.get(i.label, 0) + 1
    for i in infos:
        if counts[i.label] > 1:
            i.label = f"{i.label} [{i.run_id[:6]}]"


def pick_what(info_evals: dict, task: str, metric: str) -> Optional[str]:
    """The eval sub-metric shown for ``task``: ``metric``, or with ``auto`` final_acc when present, else acc."""
    if metric != "auto":
        return metric
    whats = {w for by_len in info_evals.get(task, {}).values() for w in by_len}
    if "acc" not in whats and "final_acc" not in whats and "loss" in whats:  # ppl_by_pos: a loss only
        return "loss"
    return "final_acc" if "final_acc" in whats else "acc"


def swept_keys(picked: list) -> list[str]:
    """Every key any of these runs was swept over, in first-seen order."""
    swept: dict[str, None] = {}
    for r in picked:
        swept.update(dict.fromkeys(sweep_values(r.data.tags)))
    return list(swept)


def require_swept(option: str, key: str, swept: Sequence[str]) -> None:
    """One located line when ``key`` (given to ``option``) is not among the runs' swept keys."""
    from hybridlab.arch.specio import did_you_mean

    if key not in swept:
        known = f"; swept keys: {', '.join(swept)}" if swept else "; these runs are not from a sweep"
        raise UserError(f"{option} {key!r}: no compared run has it in its sweep values{did_you_mean(key, swept)}{known}")


def run_value(run, key: str) -> Optional[str]:
    """A run's value of a job key: its sweep value, else the value it logged as a param (the spec's, when the
    key was swept in other groups of the sweep only), else None."""
    return sweep_values(run.data.tags).get(key, run.data.params.get(key))


def best_of_runs(picked: list, best_of: Sequence[str], select: str, mode: str = "max") -> tuple[list, list[dict]]:
    """Per group of runs that agree on every sweep value except the ``best_of`` keys, the run with the best
    ``select`` metric (``mode`` max or min). Returns the chosen runs (in the order of their groups' first
    runs) and one dict per group: its label, the chosen run and every candidate's values."""
    from hybridlab.arch.specio import did_you_mean

    if not select:
        raise UserError("--best-of needs --select METRIC: the metric that picks each group's run "
                        "(e.g. --select eval/parity/len_256/scaled_acc)")
    if mode not in SELECT_MODES:
        raise UserError(f"unknown --select-mode {mode!r}; choose one of: {', '.join(SELECT_MODES)}")
    swept = swept_keys(picked)
    for key in best_of:
        require_swept("--best-of", key, swept)
    names = sorted({k for r in picked for k in r.data.metrics})
    if select not in names:
        raise UserError(f"--select {select!r}: no compared run has this metric{did_you_mean(select, names)}"
                        f"; e.g. {', '.join(n for n in names if n.startswith(('eval/', 'best/')))[:300] or ', '.join(names)[:300]}")
    groups: dict[tuple, list] = {}
    for r in picked:
        values = sweep_values(r.data.tags)
        key = tuple(sorted((k, v) for k, v in values.items() if k not in best_of))
        groups.setdefault(key if values else ("run", r.info.run_id), []).append(r)  # a run of no sweep: alone
    chosen, report = [], []
    for members in groups.values():
        scored = [(float(r.data.metrics[select]), r) for r in members
                  if select in r.data.metrics and math.isfinite(float(r.data.metrics[select]))]
        label = _label(members[0], drop=best_of)
        cands = [{"run_id": r.info.run_id, **{k: run_value(r, k) for k in best_of},
                  select: r.data.metrics.get(select)} for r in members]
        if not scored:
            report.append({"label": label, "run_id": None, "candidates": cands})
            continue
        value, best = (max if mode == "max" else min)(scored, key=lambda x: x[0])
        chosen.append(best)
        report.append({"label": label, "run_id": best.info.run_id, select: value, "candidates": cands,
                       **{k: run_value(best, k) for k in best_of}})
    return chosen, report


def check_x(picked: list, x: str, best_of: Sequence[str]) -> list[str]:
    """``--x KEY``: a swept key with a number for every compared run's value (not one of ``--best-of``).
    Returns the other swept keys that move with it (zipped with it, or constant): left out of the lines' labels."""
    if x in best_of:
        raise UserError(f"--x {x!r} is also a --best-of key: the curves need one point per value of it")
    swept = swept_keys(picked)
    require_swept("--x", x, swept)
    values = [sweep_values(r.data.tags) for r in picked]
    for r, sv in zip(picked, values):
        if _num(sv.get(x)) is None:
            raise UserError(f"--x {x!r}: run {r.info.run_name or r.info.run_id} has {x}={sv.get(x)} (not a number): "
                            "the x axis needs a numeric swept key, e.g. model.d_model")
    following = []
    for key in swept:
        seen: dict = {}
        if key != x and all(seen.setdefault(sv.get(x), sv.get(key)) == sv.get(key) for sv in values):
            following.append(key)
    return following


def build(experiment: str, runs: Sequence[str] = (), metric: str = "auto", uri: Optional[str] = None,
          latest: bool = False, status: str = "finished", best_of: Sequence[str] = (), select: Optional[str] = None,
          select_mode: str = "max", x: Optional[str] = None) -> Comparison:
    from .tracking import missing_sqlite_store, tracking_uri

    best_of = [k.strip() for item in best_of or () for k in str(item).split(",") if k.strip()]
    if select and not best_of:
        raise UserError("--select picks the best run of each group of a sweep: give the swept key(s) to choose over "
                        "with --best-of (e.g. --best-of train.lr)")
    if metric not in METRIC_CHOICES:
        raise UserError(f"unknown --metric {metric!r}; choose one of: {', '.join(METRIC_CHOICES)}")
    if status not in STATUS_CHOICES:
        raise UserError(f"unknown --status {status!r}; choose one of: {', '.join(STATUS_CHOICES)}")
    uri = tracking_uri(uri)
    missing = missing_sqlite_store(uri)
    if missing:  # a mistyped path: say so, and make no empty store (nor its folders) there
        raise UserError(f"no MLflow experiment {experiment!r} in {uri}: the store {missing} does "
                        f"not exist (check --uri or MLFLOW_TRACKING_URI; `hybridlab run` makes it)")
    client = _client(uri)
    try:
        exp = _experiment(client, experiment, uri)
    except _store_errors() as e:
        raise UserError(f"cannot read MLflow tracking at {uri}: {' '.join(str(e).split())[:200]}") from None
    picked = select_runs(client, exp, runs, latest, status)
    groups: list[dict] = []
    if best_of:
        picked, groups = best_of_runs(picked, best_of, select or "", select_mode)
    with_x = check_x(picked, x, best_of) if x else []
    infos = [_run_info(client, r) for r in picked]
    for info, r in zip(infos, picked):
        info.sweep = sweep_values(r.data.tags)
        if x:
            info.line = _label(r, drop=[*best_of, x, *with_x])
        if best_of:
            info.label = _label(r, drop=best_of)
            info.chosen = {k: run_value(r, k) for k in best_of}
            info.selected = float(r.data.metrics[select])
    _merge_eval_children(client, exp, infos)
    _unique_labels(infos)
    # table columns: every (task, length) any run has, with the chosen sub-metric per task
    merged: dict = {}
    for i in infos:
        for task, by_len in i.evals.items():
            for L, whats in by_len.items():
                merged.setdefault(task, {}).setdefault(L, {}).update({w: 1 for w in whats})
    columns = []
    for task in sorted(merged):
        what = pick_what(merged, task, metric)
        for L in sorted(merged[task]):
            if what in merged[task][L]:
                columns.append((task, L, what))
    if metric != "auto" and merged and not columns:
        have = sorted({w for t in merged.values() for ws in t.values() for w in ws})
        raise UserError(f"no eval metric {metric!r} in these runs; they have: {', '.join(have)}")
    c = Comparison(experiment=experiment, experiment_id=exp.experiment_id, tracking_uri=uri, metric=metric,
                   runs=infos, columns=columns, text_columns=lm_eval_columns(infos), best_of=list(best_of),
                   select=select or "", select_mode=select_mode, groups=groups, x=x or "")
    if x:
        c.curves = param_curves(c)
    return c


# ---------------------------------------------------------------- outputs


def _fmt_int(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def col_name(task: str, L: int, what: str) -> str:
    return f"{task}@{L} {what}"


def rows(c: Comparison) -> list[dict]:
    out = []
    for r in c.runs:
        row = {"run_id": r.run_id, "run": r.name, "label": r.label, "status": r.status, "layout": r.layout,
               "params": r.params, "flops_per_token": r.flops_per_token, "train_task": r.train_task,
               "train_seq_len": r.train_seq_len, "steps": r.steps, "tokens": r.tokens, "final_loss": r.final_loss}
        for k in c.best_of:  # the chosen run of its group: its best-of value(s) and selection metric
            row[k] = r.chosen.get(k)
        if c.best_of:
            row[c.select] = r.selected
        for task, L, what in c.columns:
            row[col_name(task, L, what)] = r.evals.get(task, {}).get(L, {}).get(what)
        for task, metric in c.text_columns:
            row[f"lm_eval {task} {metric}"] = r.text_metrics.get(lm_eval_metric(task, metric))
        out.append(row)
    return out


SHORT_WHAT = {"final_acc": "final", "seq_acc": "seq", "acc": "acc", "loss": "loss"}


def render_table(c: Comparison, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    whats = sorted({w for _, _, w in c.columns})
    title = f"{c.experiment}: {len(c.runs)} run(s)"
    if c.best_of:
        title += f", the best of {', '.join(c.best_of)} by {c.select} ({c.select_mode}) per group"
    if whats:
        title += "  (eval: " + ", ".join(f"{SHORT_WHAT.get(w, w)} = {w}" for w in whats) + " at each length)"
    t = Table(title=title, header_style="bold", pad_edge=False)
    show_layout = any(r.layout and r.layout != r.label for r in c.runs)
    t.add_column("run", justify="left", overflow="fold", min_width=18)
    t.add_column("status", justify="left", no_wrap=True)
    if show_layout:
        t.add_column("layout", justify="left", overflow="fold", min_width=12)
    for name in ("params", "FLOPs/tok", "steps", "loss"):
        t.add_column(name, justify="right", no_wrap=True)
    for k in c.best_of:
        t.add_column(k.split(".")[-1], justify="right", no_wrap=True)
    if c.best_of:
        t.add_column("\n".join(c.select.rsplit("/", 2)) if c.select.count("/") >= 2 else c.select, justify="right", no_wrap=True)
    for task, L, what in c.columns:
        t.add_column(f"{task}\n{L}\n{SHORT_WHAT.get(what, what)}", justify="right", no_wrap=True)
    for task, metric in c.text_columns:
        t.add_column(f"lm_eval\n{task}\n{metric}", justify="right", no_wrap=True)
    for r in c.runs:
        cells = [f"{escape(r.label)}\n[dim]{r.run_id[:8]}[/dim]", _status_cell(r.status)]
        if show_layout:
            cells.append(escape(r.layout or "-"))
        cells += [_fmt_int(r.params), _fmt_int(r.flops_per_token), "-" if r.steps is None else str(r.steps),
                  _fmt(r.final_loss, 4)]
        cells += [escape(str(r.chosen.get(k, "-"))) for k in c.best_of]
        if c.best_of:
            cells.append(_fmt(r.selected, 4))
        for task, L, what in c.columns:
            v = r.evals.get(task, {}).get(L, {}).get(what)
            s = _fmt(v)
            if v is not None and what != "loss":
                ch = r.chance.get(task)
                if v >= 0.95:
                    s = f"[green]{s}[/green]"
                elif ch is not None and v <= ch + 0.05:
                    s = f"[dim]{s}[/dim]"
            cells.append(s)
        cells += [_fmt(r.text_metrics.get(lm_eval_metric(task, metric))) for task, metric in c.text_columns]
        t.add_row(*cells)
    console.print(t)
    if not c.columns and not c.text_columns:
        console.print("[dim]no eval metrics in these runs[/dim]")


def _status_cell(status: str) -> str:
    s = (status or "").lower()
    return s if s == "finished" else f"[yellow]{s}[/yellow]"


def write_csv(path: Path, data: list[dict], header: Sequence[str] = ()) -> None:
    keys: list[str] = list(header)
    for d in data:
        for k in d:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for d in data:
            w.writerow({k: ("" if d.get(k) is None else d.get(k)) for k in keys})


def long_evals(c: Comparison) -> list[dict]:
    out = []
    for r in c.runs:
        for task in sorted(r.evals):
            for L in sorted(r.evals[task]):
                for what, v in sorted(r.evals[task][L].items()):
                    out.append({"run_id": r.run_id, "run": r.name, "label": r.label, "layout": r.layout,
                                "task": task, "length": L, "metric": what, "value": v,
                                "train_seq_len": r.train_seq_len, "chance": r.chance.get(task)})
    return out


def long_loss(c: Comparison) -> list[dict]:
    return [{"run_id": r.run_id, "label": r.label, "step": s, "tokens": t, "loss": l}
            for r in c.runs for s, t, l in r.loss_history]


def _panel_grid(n: int, max_cols: int, width: float, height: float):
    """A figure of ``n`` subplots, ``max_cols`` to a row (the grid's spare ones hidden), and the colour cycle."""
    plt = pyplot()
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, axes, plt.rcParams["axes.prop_cycle"].by_key().get("color", [None])


def plot_accuracy(c: Comparison, path: Path) -> bool:
    tasks = sorted({t for t, _, _ in c.columns})
    if not tasks:
        return False
    n = len(tasks)
    fig, axes, colors = _panel_grid(n, 3, 5.2, 4.0)
    markers = "osD^vP*X"
    for ax, task in zip(axes.flat, tasks):
        lens = sorted({L for t, L, _ in c.columns if t == task})
        what = next(w for t, _, w in c.columns if t == task)
        train_lens, chances = set(), set()
        for i, r in enumerate(c.runs):
            pts = [(L, r.evals.get(task, {}).get(L, {}).get(what)) for L in lens]
            pts = [(L, v) for L, v in pts if v is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                    color=colors[i % len(colors)], label=r.label, linewidth=1.8, markersize=6, alpha=0.9)
            if r.train_task and r.train_seq_len and _same_task(r.train_task, task):
                train_lens.add(r.train_seq_len)
            if task in r.chance:
                chances.add(round(r.chance[task], 6))
        for L in sorted(train_lens):
            ax.axvline(L, color="grey", linestyle=":", linewidth=1)
            ax.text(L, 0.5, " train len", transform=ax.get_xaxis_transform(), rotation=90, va="center", ha="right",
                    fontsize=8, color="grey")
        for ch in sorted(chances):
            if what != "loss":
                ax.axhline(ch, color="grey", linestyle="--", linewidth=1)
                ax.annotate("chance", (lens[0], ch), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
        if len(lens) > 1 and lens[-1] / max(1, lens[0]) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lens)
        ax.set_xticklabels([str(L) for L in lens])
        ax.minorticks_off()
        if what != "loss":
            _accuracy_ylim(ax)
        ax.set_title(f"{task}: {what} vs eval length")
        ax.set_xlabel("eval sequence length (tokens)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if n > 1:
        fig.suptitle(f"{c.experiment}: accuracy vs eval length", fontsize=12)
    else:
        axes.flat[0].set_title(f"{c.experiment}: {tasks[0]} {next(w for _, _, w in c.columns)} vs eval length")
    save_figure(fig, path)
    return True


def _accuracy_ylim(ax) -> None:
    """0..1 for accuracies, extended down to the lowest point plotted: a scaled accuracy below chance is negative."""
    ys = [float(y) for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(float(y))]
    ax.set_ylim(min([-0.02] + [y - 0.03 for y in ys]), 1.05)


def param_curves(c: Comparison) -> dict:
    """``--x``: per table column (task, length, metric), one curve per line label: [[x, value], ...] sorted by x."""
    curves: dict = {}
    for task, L, what in c.columns:
        lines: dict = {}
        for r in c.runs:
            v = r.evals.get(task, {}).get(L, {}).get(what)
            if v is not None:
                lines.setdefault(r.line, []).append([_num(r.sweep[c.x]), v])  # check_x: every run has a number
        if lines:
            curves[col_name(task, L, what)] = {k: sorted(pts) for k, pts in lines.items()}
    return curves


def plot_vs_param(c: Comparison, path: Path) -> bool:
    """One subplot per eval column, the metric against the ``--x`` key, one line per label (Zoology's figure)."""
    if not c.curves:
        return False
    fig, axes, colors = _panel_grid(len(c.curves), 4, 4.6, 3.8)
    lines = list(dict.fromkeys(k for cur in c.curves.values() for k in cur))
    xs = sorted({p[0] for cur in c.curves.values() for pts in cur.values() for p in pts})
    for ax, (col, cur) in zip(axes.flat, c.curves.items()):
        for name, pts in cur.items():
            i = lines.index(name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^vP*X"[i % 8], color=colors[i % len(colors)],
                    label=name, linewidth=1.8, markersize=6, alpha=0.9)
        if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in xs])
        ax.minorticks_off()
        _accuracy_ylim(ax)
        ax.set_title(col)
        ax.set_xlabel(c.x)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{c.experiment}: eval vs {c.x}" + (f" (best of {', '.join(c.best_of)})" if c.best_of else ""),
                 fontsize=12)
    save_figure(fig, path)
    return True


def x_plot_name(x: str) -> str:
    """``eval_vs_d_model.png`` for ``--x model.d_model``."""
    return "eval_vs_" + re.sub(r"\W+", "_", x.split(".")[-1]) + ".png"


def _same_task(a: str, b: str) -> bool:
    from hybridlab.jobs.tasks import TaskError, canonical_name

    try:
        return canonical_name(a) == canonical_name(b)
    except TaskError:
        return a == b


def plot_loss(c: Comparison, path: Path) -> bool:
    plt = pyplot()
    runs = [r for r in c.runs if r.loss_history]
    if not runs:
        return False
    use_tokens = all(all(t is not None for _, t, _ in r.loss_history) for r in runs)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    positive, lo, hi = True, math.inf, 0.0
    for i, r in enumerate(c.runs):
        if not r.loss_history:
            continue
        xs = [t if use_tokens else s for s, t, _ in r.loss_history]
        ys = [l for _, _, l in r.loss_history]
        positive &= all(y > 0 for y in ys)
        lo, hi = min([lo] + ys), max([hi] + ys)
        ax.plot(xs, ys, color=colors[i % len(colors)], label=r.label, linewidth=1.6)
    if positive and hi / max(lo, 1e-12) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("training tokens" if use_tokens else "step")
    ax.set_ylabel("train loss (scored tokens)")
    ax.set_title(f"{c.experiment}: loss vs {'tokens' if use_tokens else 'steps'}")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def write_outputs(c: Comparison, out_dir: str | Path) -> list[str]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    files = []
    summary = rows(c)
    write_csv(out / "summary.csv", summary)
    files.append("summary.csv")
    ev = long_evals(c)
    write_csv(out / "evals.csv", ev, header=("run_id", "run", "label", "layout", "task", "length", "metric", "value"))
    files.append("evals.csv")
    write_csv(out / "loss.csv", long_loss(c), header=("run_id", "label", "step", "tokens", "loss"))
    files.append("loss.csv")
    payload = {
        "experiment": c.experiment, "tracking_uri": c.tracking_uri, "metric": c.metric,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "columns": [{"task": t, "length": L, "metric": w} for t, L, w in c.columns],
        "runs": [asdict(r) for r in c.runs], "summary": summary,
        "best_of": c.best_of, "select": c.select, "select_mode": c.select_mode, "groups": c.groups,
        "x": c.x, "curves": c.curves,
    }
    (out / "comparison.json").write_text(json.dumps(payload, indent=1, default=str))
    files.append("comparison.json")
    if plot_accuracy(c, out / "accuracy_vs_length.png"):
        files.append("accuracy_vs_length.png")
    if c.x and plot_vs_param(c, out / x_plot_name(c.x)):
        files.append(x_plot_name(c.x))
    if plot_loss(c, out / "loss_vs_tokens.png"):
        files.append("loss_vs_tokens.png")
    files += write_comparison_text_evals(c, out)  # text_evals.csv, niah_<run>.png, ppl_by_position.png
    from rich.console import Console

    with open(out / "table.txt", "w") as f:
        render_table(c, Console(file=f, width=200, force_terminal=False, color_system=None))
    files.append("table.txt")
    c.out_dir, c.files = str(out), files
    return files


def log_comparison(c: Comparison) -> str:
    """A new ``comparison`` run in the experiment holding the folder as artifacts."""
    client = _client(c.tracking_uri)
    tags = {Tag.KIND: KIND_COMPARISON, Tag.COMPARED_RUNS: ",".join(r.run_id for r in c.runs)[:5000],
            Tag.NOTE: f"hybridlab compare of {len(c.runs)} run(s)"}
    try:
        run = client.create_run(c.experiment_id, run_name=f"comparison-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
        rid = run.info.run_id
        from mlflow.entities import Param

        client.log_batch(rid, params=[Param("metric", c.metric), Param("runs", str(len(c.runs)))], synchronous=True)
        client.log_artifacts(rid, c.out_dir)
        client.set_terminated(rid, MLFLOW_FINISHED)
    except _store_errors() as e:
        raise UserError(f"cannot log the comparison to MLflow at {c.tracking_uri}: {' '.join(str(e).split())[:200]}") from None
    c.comparison_run_id = rid
    return rid


def compare(experiment: str, runs: Sequence[str] = (), metric: str = "auto", out: Optional[str] = None,
            uri: Optional[str] = None, latest: bool = False, log: bool = True, console=None,
            status: str = "finished", best_of: Sequence[str] = (), select: Optional[str] = None,
            select_mode: str = "max", x: Optional[str] = None) -> Comparison:
    """The whole command: read, print, write files, log them. Returns the comparison."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
            console = Console(width=max(console.width, 200))
    c = build(experiment, runs, metric, uri, latest, status, best_of, select, select_mode, x)
    missing = [g["label"] for g in c.groups if g["run_id"] is None]
    if missing:  # e.g. the groups of another task in a sweep over tasks
        console.print(f"[yellow]{len(missing)} group(s) without {c.select} left out: {', '.join(missing)[:300]}[/yellow]")
    out_dir = out or os.path.join("comparisons", re.sub(r"[^\w.-]+", "-", experiment))
    render_table(c, console)
    write_outputs(c, out_dir)
    console.print(f"wrote {', '.join(c.files)} to {c.out_dir}")
    if log:
        rid = log_comparison(c)
        console.print(f"logged as artifacts of MLflow run {rid} (experiment {experiment!r}, {c.tracking_uri})")
    return c
