"""Evals of a trained model: each eval task at each length, one metric per (task, length).

``run_evals(model, evals, data, device)`` returns a flat dict
``{"eval/<task>/len_<L>/acc": ..., "eval/<task>/len_<L>/seq_acc": ...}`` with every
metric of ``record.EVAL_METRICS`` the task reports (``scaled_acc`` included); the
text evals (``niah``, ``ppl_by_pos``, ``lm_eval``: ``jobs/text_evals.py``) add their own names. The
batches come from ``tasks`` with their own seeds (disjoint from training's), so
every run of a job scores the same sequences.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable, Optional, Sequence

import torch

from hybridlab.jobs.data import build_task, eval_task_options
from hybridlab.jobs.record import EVAL_METRIC_RE, EVAL_METRICS, metric_name
from hybridlab.jobs.step import scored_logits, spread
from hybridlab.jobs.tasks import batch_seed, token_losses
from hybridlab.jobs.text_evals import is_text_eval, run_text_eval

EVAL_SEED = 10_007  # base seed of eval batches: never a training seed stream (those use rank >= 0 with job seeds)


def eval_seed(task: str, seq_len: int, batch: int) -> int:
    """The seed of one eval batch: fixed by (task, length, batch index), so training-time evals and a
    later `hybridlab eval` score the same sequences whatever the order of the eval list."""
    return batch_seed(EVAL_SEED + zlib.crc32(task.encode()) % 1_000_003, batch, seq_len)


@torch.no_grad()
def run_evals(
    model: Callable[[torch.Tensor], torch.Tensor],
    evals: Iterable[dict],
    data: Optional[dict] = None,
    device: torch.device | str = "cpu",
    on_result: Optional[Callable[[str, int, dict], None]] = None,
) -> dict[str, float]:
    """Score ``model`` (tokens -> logits) on every eval entry at every length."""
    out: dict[str, float] = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for e in evals:
            name, opts = eval_task_options(e, data or {})
            if is_text_eval(name):  # niah, ppl_by_pos, lm_eval: text evals with their own metric names
                out.update(run_text_eval(model, name, opts, list(e.get("seq_lens") or []), int(e.get("batch_size", 32)),
                                         int(e.get("batches", 2)), device, on_result))
                continue
            lengths = list(e.get("seq_lens") or [opts.get("seq_len")])
            task = build_task(name, opts)
            for L in lengths:
                totals: dict[str, float] = {}
                n = int(e.get("batches", 2))
                for j in range(n):
                    b = task.batch(int(e.get("batch_size", 32)), eval_seed(name, int(L), j), seq_len=int(L))
                    preds, token_loss = _host_scores(model, task, b, device)
                    s = task.score(preds, b, token_loss=token_loss)
                    for k, v in s.items():
                        if isinstance(v, (int, float)):
                            totals[k] = totals.get(k, 0.0) + float(v) / n
                for k in EVAL_METRICS:
                    if k in totals:
                        out[metric_name(name, int(L), k)] = totals[k]
                if on_result:
                    on_result(name, int(L), totals)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return out


def _host_scores(model, task, b, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval batch through ``model``: (predictions, per-token cross-entropy), each (B, L), on the host.
    The logits stay where the model ran (the host gets ids and losses, not (B, L, V) floats), and a
    ``HybridLM`` puts only the scored positions through its LM head when few are (``step.scored_logits``)."""
    kw = {} if b.seq_idx is None else {"seq_idx": b.seq_idx.to(device)}  # packed documents: each one alone
    logits, at = scored_logits(model, b.inputs.to(device), b.targets, **kw)
    task.check_logits((*b.targets.shape, logits.shape[-1]) if at is not None else logits.shape, b)
    if at is None:
        return logits.argmax(-1).cpu(), token_losses(logits, b.targets.to(logits.device)).cpu()
    # unscored positions get prediction -1 and loss 0: Task.score reads only the scored ones
    shape = tuple(b.targets.shape)
    loss = token_losses(logits, b.targets.gather(1, at).to(logits.device))
    return spread(logits.argmax(-1).cpu(), at, shape, -1), spread(loss.cpu(), at, shape, 0.0)


SUMMARY_METRICS = ("acc", "scaled_acc")  # what a run's end-of-training summary shows per (task, length)


def eval_table(metrics: dict[str, float], whats: Sequence[str] = SUMMARY_METRICS, layout: str = "summary") -> str:
    """A text table of the ``eval/<task>/len_<L>/<what>`` metrics for the ``what``s in ``whats``.

    ``layout="summary"`` (the training summary): one line per task, in the order first seen,
    ``len <L>: <value>`` cells in length order (``len <L>: acc <v> scaled_acc <v>`` when the task
    has more than one of ``whats``). ``layout="table"`` (``hybridlab eval``): a header,
    then one line per (task, length), sorted, with one column per ``what`` that any row has
    (``-`` where a row lacks it). Keys not of that form are ignored; no trailing newline.
    """
    if layout not in ("summary", "table"):
        raise ValueError(f"eval_table: unknown layout {layout!r}; choose summary or table")
    rows: dict[tuple[str, int], dict[str, float]] = {}
    tasks: dict[str, None] = {}  # tasks with a metric of ``whats``, in the order first seen
    for k, v in metrics.items():
        m = EVAL_METRIC_RE.match(k)
        if m:
            rows.setdefault((m["task"], int(m["len"])), {})[m["what"]] = v
            if m["what"] in whats:
                tasks.setdefault(m["task"])
    if layout == "table":
        cols = [w for w in whats if any(w in r for r in rows.values())]
        lines = ["task        length  " + "  ".join(f"{w:>9s}" for w in cols)]
        for (task, L), r in sorted(rows.items()):
            lines.append(f"{task:10s}  {L:6d}  " + "  ".join(f"{r[w]:9.4f}" if w in r else f"{'-':>9s}" for w in cols))
        return "\n".join(lines)
    lines = []
    for task in tasks:
        by_len = sorted((L, r) for (t, L), r in rows.items() if t == task and any(w in r for w in whats))
        one = sum(any(w in r for _, r in by_len) for w in whats) == 1  # a single metric: bare values
        cells = "  ".join(f"len {L}: " + " ".join(f"{r[w]:.3f}" if one else f"{w} {r[w]:.3f}" for w in whats if w in r)
                          for L, r in by_len)
        lines.append(f"{task:10s} {cells}")
    return "\n".join(lines)
