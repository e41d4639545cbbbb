"""Optional-dependency probes shared by the kernel dispatchers (imports nothing of hybridlab)."""

from __future__ import annotations

import importlib.util


def has_module(name: str) -> bool:
    """Whether ``name`` (dotted names too, e.g. ``flash_attn.cute``) can be imported, without importing it.

    ``find_spec`` of a dotted name imports the parent package, which raises when the parent is
    missing; that counts as "not installed" here, as does a module whose ``__spec__`` is unset.
    """
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
