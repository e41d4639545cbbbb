"""The ``hybridlab`` command line: the app, its command groups, and one-line errors.

This module defines the app and mounts the groups of ``hybridlab.commands`` (each
its own module; none imports this one). User errors (bad specs, missing runs,
unreachable clusters) surface as :class:`UserError` / ``SpecError`` and print one
line with exit 2; typer's own option checks print one line too; a run stopped by
SIGINT/SIGTERM prints its ``--resume`` line and exits 130/143.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import typer

from hybridlab.arch.specio import SpecError

from .commands import bench, cluster, data, interop, jobs, models, results
from .errors import ForcedStop, Interrupted, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Design, train and compare hybrid Mamba-3 / attention language models.",
)


@app.callback()
def _root() -> None:
    """Design, train and compare hybrid Mamba-3 / attention language models."""


for _group in (models, jobs, cluster, results):
    app.add_typer(_group.app)  # top-level commands
app.add_typer(bench.app, name="bench")
app.add_typer(data.app, name="data")
app.add_typer(interop.import_app, name="import")
app.add_typer(interop.export_app, name="export")


def _usage_line(e, argv: Sequence[str]) -> str:
    """typer's usage error as one line: ``--port 99999: Input should be ...``."""
    param = getattr(e, "param", None)
    message = getattr(e, "message", None) or str(e)
    message = message.removeprefix("Value error, ")
    opts = list(getattr(param, "opts", None) or [])
    if not opts:
        return message
    raw = None
    for i, a in enumerate(argv):
        for o in opts:
            if a == o and i + 1 < len(argv):
                raw = argv[i + 1]
            elif o.startswith("--") and a.startswith(o + "="):
                raw = a[len(o) + 1:]
    name = max(opts, key=len)
    return f"{name} {raw}: {message}" if raw is not None else f"{name}: {message}"


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, standalone_mode=False)
    except (SpecError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Interrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code)
    except ForcedStop as e:
        print("stopped at once (a second signal)", file=sys.stderr)
        raise SystemExit(128 + int(e.args[0]))
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except typer.Exit as e:
        raise SystemExit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # typer's bundled click usage errors (its types are not public)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            print(f"error: {_usage_line(e, args)}", file=sys.stderr)
            raise SystemExit(e.exit_code or 2)
        raise


if __name__ == "__main__":
    # Run as `python -m hybridlab.cli`: this file is __main__, so go through the
    # importable module so that every command registers on the same app.
    from hybridlab.cli import main as _main

    _main()
