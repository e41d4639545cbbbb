"""The names eval metrics are logged under, ``eval/<task>/len_<L>/<what>`` (torch-free: ``compare`` reads them too)."""

from __future__ import annotations

import re

# the per-(task, length) metrics, in table order. scaled_acc: the headline accuracy (final_acc where a
# task reports it, else acc) rescaled so chance is 0 and perfect is 1, a fraction (x100: the Mamba-3 table)
EVAL_METRICS = ("acc", "final_acc", "scaled_acc", "seq_acc", "loss")
EVAL_METRIC_RE = re.compile(r"^eval/(?P<task>[^/]+)/len_(?P<len>\d+)/(?P<what>[^/]+)$")  # what metric_name writes


def metric_name(task: str, seq_len: int, what: str = "acc") -> str:
    return f"eval/{task}/len_{seq_len}/{what}"


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
