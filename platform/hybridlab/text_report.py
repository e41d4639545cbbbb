"""Reports of the text evals (``jobs/text_evals.py``): tables, the NIAH heatmap, per-position perplexity curves.

Everything here is a function of the logged metrics (names in ``hybridlab.jobs.record``), so
``hybridlab run`` (after training), ``hybridlab eval`` and ``hybridlab compare`` draw the same pictures
from MLflow alone:

``niah_<label>.png``        depth (rows, %) x prompt length (columns) heatmap of exact-match accuracy
``ppl_by_position.png``     mean next-token loss per position bucket, one curve per (run, length)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from hybridlab.jobs.record import LM_EVAL_RE, NIAH_RE, PPL_POS_RE


def save_figure(fig, path) -> None:
    """Every comparison PNG: laid out, 110 dpi, the figure freed (matplotlib keeps open figures alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def lm_eval_results(metrics: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the ``eval/lm_eval/...`` metrics."""
    out: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        m = LM_EVAL_RE.match(k)
        if m:
            out.setdefault(m["task"], {})[m["metric"]] = float(v)
    return out


def niah_grid(metrics: dict) -> dict[int, dict[int, float]]:
    """``{length: {depth %: acc}}``."""
    out: dict[int, dict[int, float]] = {}
    for k, v in metrics.items():
        m = NIAH_RE.match(k)
        if m:
            out.setdefault(int(m["len"]), {})[int(m["depth"])] = float(v)
    return out


def ppl_curves(metrics: dict, what: str = "loss") -> dict[int, list[tuple[int, int, float]]]:
    """``{length: [(start, end, value), ...]}`` sorted by position."""
    out: dict[int, list] = {}
    for k, v in metrics.items():
        m = PPL_POS_RE.match(k)
        if m and m["what"] == what:
            out.setdefault(int(m["len"]), []).append((int(m["a"]), int(m["b"]), float(v)))
    return {L: sorted(rows) for L, rows in out.items()}


def is_text_metric(key: str) -> bool:
    return bool(LM_EVAL_RE.match(key) or NIAH_RE.match(key) or PPL_POS_RE.match(key))


def has_text_evals(metrics: dict) -> bool:
    return bool(lm_eval_results(metrics) or niah_grid(metrics) or ppl_curves(metrics))


def text_table(metrics: dict) -> str:
    """Plain text: lm-eval metrics, the NIAH grid, the per-position loss (no trailing newline)."""
    lines = []
    for task, vals in sorted(lm_eval_results(metrics).items()):
        lines.append(f"lm_eval {task}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(vals.items())))
    grid = niah_grid(metrics)
    if grid:
        depths = sorted({d for row in grid.values() for d in row})
        lines.append("niah acc    " + "  ".join(f"depth {d:>3d}%" for d in depths))
        for L in sorted(grid):
            lines.append(f"  len {L:<6d}" + "  ".join(f"{grid[L][d]:10.3f}" if d in grid[L] else f"{'-':>10s}" for d in depths))
    for L, rows in sorted(ppl_curves(metrics).items()):
        lines.append(f"ppl_by_pos len {L} loss: " + "  ".join(f"[{a},{b}) {v:.3f}" for a, b, v in rows))
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(label: str) -> str:
    return re.sub(r"[^\w.-]+", "-", label).strip("-")[:60] or "run"


def plot_niah(grid: dict[int, dict[int, float]], path: Path, title: str = "needle in a haystack",
              train_len: Optional[int] = None) -> bool:
    if not grid:
        return False
    plt = pyplot()
    lengths = sorted(grid)
    depths = sorted({d for row in grid.values() for d in row})
    data = [[grid[L].get(d, float("nan")) for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.8, 0.55 * len(depths) + 1.8))
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) + ("*" if train_len and L == train_len else "") for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            v = data[i][j]
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("prompt length (tokens)" + (" (* = training length)" if train_len in lengths else ""))
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="exact match")
    save_figure(fig, path)
    return True


def plot_ppl_by_position(curves: dict[str, dict[int, list]], path: Path, title: str = "loss by position",
                         train_lens: dict[str, Optional[int]] | None = None) -> bool:
    """``curves``: {run label: {length: [(a, b, loss)]}}."""
    if not any(curves.values()):
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    seen_train = set()
    for i, (label, by_len) in enumerate(curves.items()):
        for L, rows in sorted(by_len.items()):
            xs = [(a + b) / 2 for a, b, _ in rows]
            ys = [v for _, _, v in rows]
            name = label if len(by_len) == 1 else f"{label} (len {L})"
            ax.plot(xs, ys, marker="o", markersize=3, color=colors[i % len(colors)], label=name, linewidth=1.6)
        tl = (train_lens or {}).get(label)
        if tl and tl not in seen_train:
            seen_train.add(tl)
            ax.axvline(tl, color="grey", linestyle=":", linewidth=1)
            ax.text(tl, 0.98, " train len", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def write_text_eval_plots(metrics: dict, out_dir: Path, label: str = "run", train_len: Optional[int] = None) -> list[Path]:
    """The PNGs of one run's text evals into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    p = out_dir / f"niah_{_slug(label)}.png"
    if plot_niah(niah_grid(metrics), p, f"{label}: needle in a haystack (exact match)", train_len):
        files.append(p)
    p = out_dir / "ppl_by_position.png"
    if plot_ppl_by_position({label: ppl_curves(metrics)}, p, f"{label}: loss by position", {label: train_len}):
        files.append(p)
    return files


def log_text_eval_artifacts(client, run_id: str, metrics: dict, label: str = "run", train_len: Optional[int] = None,
                            artifact_path: str = "evals") -> list[str]:
    """Draw and log the text-eval PNGs and table of ``metrics`` into an MLflow run (best effort: the
    metrics are what counts; a failure here is a warning, never a failed run)."""
    import sys
    import tempfile

    if not has_text_evals(metrics):
        return []
    try:
        with tempfile.TemporaryDirectory() as d:
            files = write_text_eval_plots(metrics, Path(d), label, train_len)
            (Path(d) / "text_evals.txt").write_text(text_table(metrics) + "\n")
            files.append(Path(d) / "text_evals.txt")
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path)
            return [f.name for f in files]
    except Exception as e:
        print(f"warning: could not log the text-eval plots to MLflow ({type(e).__name__}: {str(e)[:200]})",
              file=sys.stderr, flush=True)
        return []


# --------------------------------------------------------------------------- compare


def lm_eval_columns(runs) -> list[tuple[str, str]]:
    """(task, metric) of the comparison table: every lm-eval metric any run has, standard errors left out."""
    cols = set()
    for r in runs:
        for task, vals in lm_eval_results(r.text_metrics).items():
            cols.update((task, m) for m in vals if "stderr" not in m)
    return sorted(cols)


def write_comparison_text_evals(c, out: Path) -> list[str]:
    """``text_evals.csv`` (run, label, metric, value), one NIAH heatmap per run, one loss-by-position plot."""
    import csv

    runs = [r for r in c.runs if r.text_metrics]
    if not runs:
        return []
    files = []
    with open(out / "text_evals.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "label", "metric", "value"])
        for r in runs:
            for k, v in sorted(r.text_metrics.items()):
                w.writerow([r.run_id, r.label, k, v])
    files.append("text_evals.csv")
    for r in runs:
        name = f"niah_{_slug(r.label)}.png"
        if plot_niah(niah_grid(r.text_metrics), out / name, f"{r.label}: needle in a haystack (exact match)",
                     r.train_seq_len):
            files.append(name)
    curves = {r.label: ppl_curves(r.text_metrics) for r in runs}
    if plot_ppl_by_position(curves, out / "ppl_by_position.png", f"{c.experiment}: loss by position",
                            {r.label: r.train_seq_len for r in runs}):
        files.append("ppl_by_position.png")
    return files
