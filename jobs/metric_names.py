"""The names eval metrics are logged under, ``eval/<task>/len_<L>/<what>`` (torch-free: ``compare`` reads them too)."""

from __future__ import annotations

import re

EVAL_METRICS = ("acc", "final_acc", "seq_acc", "loss")  # the per-(task, length) metrics, in table order
EVAL_METRIC_RE = re.compile(r"^eval/(?P<task>[^/]+)/len_(?P<len>\d+)/(?P<what>[^/]+)$")  # what metric_name writes


def metric_name(task: str, seq_len: int, what: str = "acc") -> str:
    return f"eval/{task}/len_{seq_len}/{what}"
