"""The names eval metrics are logged under, ``eval/<task>/len_<L>/<what>`` (torch-free: ``compare`` reads them too)."""

from __future__ import annotations

import re

# the per-(task, length) metrics, in table order. scaled_acc: the headline accuracy (final_acc where a
# task reports it, else acc) rescaled so chance is 0 and perfect is 1, a fraction (x100: the Mamba-3 table)
EVAL_METRICS = ("acc", "final_acc", "scaled_acc", "seq_acc", "loss")
EVAL_METRIC_RE = re.compile(r"^eval/(?P<task>[^/]+)/len_(?P<len>\d+)/(?P<what>[^/]+)$")  # what metric_name writes


def metric_name(task: str, seq_len: int, what: str = "acc") -> str:
    return f"eval/{task}/len_{seq_len}/{what}"
