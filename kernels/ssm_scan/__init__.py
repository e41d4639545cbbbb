"""The trapezoidal SSM scan: one contract, several backends, one dispatcher.

    ssm_scan(q, k, v, log_alpha, beta, gamma, state=None) -> (y, final_state)

See DESIGN.md §3 and ``reference.py`` for the math. Backends:

* ``torch``  — the reference; chunked for seqlen > 1, recurrent for seqlen == 1.
* ``torch_chunked`` / ``torch_recurrent`` — force one reference form.
* ``triton`` — chunked forward + backward kernels (CUDA, or TRITON_INTERPRET=1).
* ``cute``   — one-token decode step (CUDA Hopper+, nvidia-cutlass-dsl).

``backend="auto"`` (the default) picks the fastest one available for the
device and sequence length; ``select_backend`` says which and why.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .._triton_utils import HAS_TRITON, pow2_rows_error, triton_usable
from .reference import ScanState, scan_chunked, scan_recurrent

__all__ = ["ssm_scan", "ScanState", "select_backend", "default_chunk_size", "triton_supports", "chunk_rows", "BACKENDS"]

BACKENDS = ("auto", "torch", "torch_chunked", "torch_recurrent", "triton", "cute")


def _triton_backend():
    return importlib.import_module(".triton", __name__)


def _cute_backend():
    return importlib.import_module(".cute", __name__)


def default_chunk_size(rank: int) -> int:
    """The chunked kernels' default chunk: 64 positions for SISO, 64 / R for MIMO (64-row tiles)."""
    return max(64 // rank, 1)


def chunk_rows(rank: int, chunk_size: int | None = None) -> tuple[int, str]:
    """The chunked kernels' tile rows, chunk_size * rank (the default chunk if None), and why the
    kernels cannot take them ('' when they can: a power of two >= 16)."""
    rows = (chunk_size or default_chunk_size(rank)) * rank
    return rows, pow2_rows_error(rows, "chunk_size*rank")


def triton_supports(headdim: int, d_state: int, rank: int, chunk_size: int | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels take these sizes (pure Python; no triton import)."""
    _, why = chunk_rows(rank, chunk_size)
    if why:
        return False, why
    if d_state < 16 or headdim < 16:
        return False, f"d_state {d_state} / headdim {headdim} below the 16 that tensor-core tiles need"
    return True, ""


def select_backend(device: torch.device | str, seqlen: int | None = None, shape: dict | None = None) -> tuple[str, str]:
    """The backend ``auto`` uses for this device and length, with the reason.

    ``shape`` (headdim, d_state, rank, chunk_size) lets kernels that cannot take
    those sizes fall back to the next backend instead of failing.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", f"no CUDA on this machine ({device.type}): torch reference"
    shape = shape or {}
    why_not = []
    if seqlen == 1 and _cute_available(device):
        ok, why = (True, "") if not shape else _cute_module_supports(shape)
        if ok:
            return "cute", "CUDA sm90+ with nvidia-cutlass-dsl: CuTe decode step"
        why_not.append(f"cute: {why}")
    if _TRITON_FILE:
        ok, why = (True, "") if not shape else triton_supports(**shape)
        if ok:
            return "triton", "CUDA with triton: chunked Triton kernels"
        why_not.append(f"triton: {why}")
    else:
        why_not.append("triton is not installed")
    return "torch", "CUDA, but " + "; ".join(why_not) + ": torch reference"


def _cute_module_supports(shape: dict) -> tuple[bool, str]:
    return _cute_backend().step_supported(shape["headdim"], shape["d_state"], shape["rank"])


def _kernel_file_exists(name: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{name}") is not None


# Looked up once: the dispatch below then reads only tensor properties (torch.compile traces it).
_TRITON_FILE = HAS_TRITON and _kernel_file_exists("triton")
_CUTE_FILE = _kernel_file_exists("cute")


def _cute_available(device: torch.device) -> bool:
    return _CUTE_FILE and device.type == "cuda" and _cute_backend().cute_available(device)


def ssm_scan(q, k, v, log_alpha, beta, gamma, state=None, *, backend: str = "auto", chunk_size: int | None = None):
    """Run the scan; returns ``(y, ScanState(h, k_last, v_last))``."""
    if backend not in BACKENDS:
        raise ValueError(f"ssm_scan: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    seqlen = q.shape[1] if q.dim() == 5 else None
    if backend == "auto":
        shape = dict(headdim=v.shape[-1], d_state=q.shape[-1], rank=q.shape[3], chunk_size=chunk_size) if q.dim() == 5 else None
        backend, _ = select_backend(q.device, seqlen, shape)
    if backend == "torch":
        backend = "torch_recurrent" if seqlen == 1 else "torch_chunked"
    if backend == "torch_recurrent":
        return scan_recurrent(q, k, v, log_alpha, beta, gamma, state)
    if backend == "torch_chunked":
        return scan_chunked(q, k, v, log_alpha, beta, gamma, state, chunk_size=chunk_size or 64)
    if backend == "triton":
        if not (_TRITON_FILE and triton_usable(q)):
            raise RuntimeError("ssm_scan: backend 'triton' needs CUDA (or TRITON_INTERPRET=1) and the triton package")
        return _triton_backend().ssm_scan_triton(q, k, v, log_alpha, beta, gamma, state, chunk_size=chunk_size)
    if not _cute_available(q.device):
        raise RuntimeError("ssm_scan: backend 'cute' needs a CUDA sm90+ GPU and nvidia-cutlass-dsl")
    return _cute_backend().ssm_scan_cute(q, k, v, log_alpha, beta, gamma, state)
