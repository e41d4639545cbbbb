"""Platform commands beyond `check`: run, submit, status, logs, stop, ui, eval, compare, bench, data, generate.

Each command is a thin shell over the module that owns the concept.
"""

from __future__ import annotations

from .cli import app  # noqa: F401
