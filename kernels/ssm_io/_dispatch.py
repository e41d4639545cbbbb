"""Backend choice and argument checks shared by the ssm_io ops (one home; the op files import it)."""

from __future__ import annotations

import torch

from .._triton_utils import KERNEL_DTYPES, triton_usable

IO_BACKENDS = ("auto", "torch", "triton")


def _triton_ok(t: torch.Tensor) -> bool:
    return t.dtype in KERNEL_DTYPES and triton_usable(t)


def io_backend(t: torch.Tensor, backend: str = "auto") -> str:
    """The backend these stages run on for tensors like ``t``: ``triton`` on CUDA (or under
    TRITON_INTERPRET=1) for 16/32-bit floats, else ``torch``. Only tensor properties are read per
    call, so ``torch.compile`` guards on them instead of breaking the graph."""
    if backend not in IO_BACKENDS:
        raise ValueError(f"ssm_io: unknown backend {backend!r}; choose one of {', '.join(IO_BACKENDS)}")
    if backend == "auto":
        return "triton" if _triton_ok(t) else "torch"
    if backend == "triton" and not _triton_ok(t):
        raise RuntimeError("ssm_io: backend 'triton' needs CUDA (or TRITON_INTERPRET=1), triton, and fp16/bf16/fp32 tensors")
    return backend


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"ssm_io: {msg}")


def shape_of(t) -> tuple | None:
    return tuple(t.shape) if t is not None else None
