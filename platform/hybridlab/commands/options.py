"""Options shared by several commands, and the choice types typer checks."""

from __future__ import annotations

from typing import Literal

import typer

from hybridlab.jobs.spec import CompileMode, Precision  # noqa: F401  (choice types of bench train)
from hybridlab.kernels import BACKENDS

SetOpt = typer.Option(None, "--set", help="Override a spec field: key.path=value (repeatable).")
UriOpt = typer.Option(None, "--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db).")
AddressOpt = typer.Option(None, "--address", help="Ray dashboard URL of the cluster (default: $RAY_ADDRESS, else http://127.0.0.1:8265).")

ZeroStage = Literal[0, 1, 2, 3]
SsmBackend = Literal[BACKENDS]


DURATION_PART = r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?"


def duration_s(text: str) -> float:
    """A typer ``parser=``: ``600`` (seconds), ``90s``, ``7m``, ``2h30m``, ``1.5h`` -> seconds (> 0)."""
    import re

    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.fullmatch(DURATION_PART, t)
        if not t or parts is None:
            raise ValueError("not a duration (e.g. 600, 90s, 7m, 2h30m)")
        h, m, sec = (float(v) if v else 0.0 for v in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise ValueError("the duration must be more than 0")
    return seconds


def time_limit_option(what: str):
    """``--time-limit DURATION`` of `run` and `submit` (``what``: where the clock runs)."""
    return typer.Option(None, "--time-limit", parser=duration_s, metavar="DURATION",
                        help=f"Stop cleanly after this long {what} (600, 90s, 7m, 2h30m), as Ctrl-C does: "
                             "checkpoints, the --resume / --resume-sweep line, exit 130.")


def ints_text(text: str) -> str:
    """A typer ``parser=``: ``1,16,128`` must be comma-separated integers (kept as text for the options
    dataclass; a ValueError becomes typer's one-line usage error)."""
    from hybridlab.kernels.bench.options import int_list

    int_list(text)
    return text


def shapes_text(text: str) -> str:
    """A typer ``parser=``: ``1x16384,16x16384`` must be BATCHxCONTEXT pairs."""
    from hybridlab.kernels.bench.options import batch_contexts

    batch_contexts(text)
    return text
