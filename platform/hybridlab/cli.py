"""The ``hybridlab`` command line.

Each command parses its arguments and hands off to the module that owns the
concept; user errors (bad specs, missing runs, unreachable clusters) surface
as :class:`UserError` / ``SpecError`` and are printed on one line with exit 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from hybridlab.arch.specio import SpecError

from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Design, train and compare hybrid Mamba-3 / attention language models.",
)

@app.callback()
def _root() -> None:
    """Design, train and compare hybrid Mamba-3 / attention language models."""


SetOpt = typer.Option(None, "--set", help="Override a spec field: key.path=value (repeatable).")


@app.command()
def check(
    spec: str = typer.Argument(..., help="Spec file, zoo:NAME, or a job file (its model is checked)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Sequence length for FLOPs and cache bytes."),
    set_: Optional[List[str]] = SetOpt,
):
    """Validate a spec; print its layers, params, FLOPs/token, cache bytes and kernel backends."""
    from .check import run_check

    run_check(spec, overrides=set_ or [], seq_len=seq_len, as_json=json_out)


@app.command()
def zoo():
    """List the zoo's specs (use them as zoo:NAME) with their parameter counts."""
    from hybridlab.arch import count_params, load_model_spec, zoo_names

    for name in zoo_names():
        spec = load_model_spec(f"zoo:{name}")
        print(f"zoo:{name:24s} {count_params(spec) / 1e6:9.2f}M  {spec.description}")


# --- job commands (training platform) are registered below by their modules ---


def _register_optional_commands() -> None:
    """Commands whose modules import heavy optional deps lazily register here."""
    from . import commands  # noqa: F401  (adds run/submit/status/... to `app`)


def main(argv: list[str] | None = None) -> None:
    _register_optional_commands()
    try:
        app(args=argv, standalone_mode=False)
    except (SpecError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        raise SystemExit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors from typer's bundled click arrive here in non-standalone mode.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            raise SystemExit(e.exit_code or 2)
        raise


if __name__ == "__main__":
    main()
