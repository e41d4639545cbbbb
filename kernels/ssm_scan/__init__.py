"""The trapezoidal SSM scan: one contract, several backends, one dispatcher.

    ssm_scan(q, k, v, log_alpha, beta, gamma, state=None, *, backend="auto", chunk_size=None,
             seq_idx=None, cu_seqlens=None) -> (y, final_state)

See DESIGN.md §3 and ``reference.py`` for the math. Backends:

* ``torch``  — the reference; chunked for seqlen > 1, recurrent for seqlen == 1.
* ``torch_chunked`` / ``torch_recurrent`` — force one reference form.
* ``triton`` — chunked forward + backward kernels (CUDA, or TRITON_INTERPRET=1).
* ``cute``   — one-token decode step (CUDA Hopper+, nvidia-cutlass-dsl).

``backend="auto"`` (the default) picks the fastest one available for the
device and sequence length; ``select_backend`` says which and why.

Packed documents: ``seq_idx`` (batch, seqlen) int, nondecreasing along each row,
names each position's document. Wherever it changes, h is reset (nothing is
carried over from the previous document) and the trapezoid's previous-token
(beta) term is dropped, so a packed batch gives what each document gives alone,
values and gradients. ``cu_seqlens`` (n_docs + 1,) offsets of a batch of one
row say the same thing (``reference.seq_idx_from_cu_seqlens``). A passed-in
``state`` belongs to each row's first document; the returned state is that of
its last. The torch backends take ``seq_idx`` in the reference itself, the
Triton kernels in one pass; the CuTe decode step does not take it.

``ssm_scan_fused`` (``fused.py``) is the same scan with the Mamba-3 layer's q/k/v
preparation inside the kernels (MIMO and SISO): B/C, the phase and x in, no
(b, l, H, R, ·) tensor in memory.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .._triton_utils import HAS_TRITON, pow2_rows_error, triton_usable
from .reference import ScanState, check_inputs, check_seq_idx, scan_chunked, scan_recurrent, seq_idx_from_cu_seqlens

__all__ = ["ssm_scan", "ScanState", "select_backend", "default_chunk_size", "triton_supports", "chunk_rows", "BACKENDS",
           "seq_idx_from_cu_seqlens", "check_seq_idx", "ssm_scan_fused", "ssm_scan_fused_reference"]

BACKENDS = ("auto", "torch", "torch_chunked", "torch_recurrent", "triton", "cute")


def _triton_backend():
    return _TRITON_MOD if _TRITON_MOD is not None else importlib.import_module(".triton", __name__)


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
# Imported now: it registers its torch.library ops, and importlib inside a traced call breaks the graph.
_TRITON_MOD = importlib.import_module(".triton", __name__) if _TRITON_FILE else None


def _cute_available(device: torch.device) -> bool:
    return _CUTE_FILE and device.type == "cuda" and _cute_backend().cute_available(device)


def _packed_args(seq_idx, cu_seqlens, q) -> torch.Tensor | None:
    """The (b, l) int32 document ids from ``seq_idx`` or ``cu_seqlens`` (None without packing or for one position)."""
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError("ssm_scan: give seq_idx or cu_seqlens, not both")
        seq_idx = seq_idx_from_cu_seqlens(torch.as_tensor(cu_seqlens, device=q.device), q.shape[0], q.shape[1])
    seq_idx = check_seq_idx(seq_idx, q.shape[0], q.shape[1], q.device)
    return None if q.shape[1] == 1 else seq_idx  # one position is one document: the state applies to it


def ssm_scan(q, k, v, log_alpha, beta, gamma, state=None, *, backend: str = "auto", chunk_size: int | None = None,
             seq_idx=None, cu_seqlens=None):
    """Run the scan; returns ``(y, ScanState(h, k_last, v_last))``. ``seq_idx`` / ``cu_seqlens``: packed documents."""
    if backend not in BACKENDS:
        raise ValueError(f"ssm_scan: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if q.dim() != 5:
        check_inputs(q, k, v, log_alpha, beta, gamma, state)  # raises the shape error
    seqlen = q.shape[1]
    seq_idx = _packed_args(seq_idx, cu_seqlens, q)
    if backend == "auto":
        shape = dict(headdim=v.shape[-1], d_state=q.shape[-1], rank=q.shape[3], chunk_size=chunk_size)
        backend, _ = select_backend(q.device, seqlen, shape)
    if backend == "torch":
        backend = "torch_recurrent" if seqlen == 1 else "torch_chunked"
    if backend == "torch_recurrent":
        return scan_recurrent(q, k, v, log_alpha, beta, gamma, state, seq_idx=seq_idx)
    if backend == "torch_chunked":
        return scan_chunked(q, k, v, log_alpha, beta, gamma, state, chunk_size=chunk_size or 64, seq_idx=seq_idx)
    if backend == "triton":
        if not (_TRITON_FILE and triton_usable(q)):
            raise RuntimeError("ssm_scan: backend 'triton' needs CUDA (or TRITON_INTERPRET=1) and the triton package")
        return _triton_backend().ssm_scan_triton(q, k, v, log_alpha, beta, gamma, state, chunk_size=chunk_size, seq_idx=seq_idx)
    if not _cute_available(q.device):
        raise RuntimeError("ssm_scan: backend 'cute' needs a CUDA sm90+ GPU and nvidia-cutlass-dsl")
    if seq_idx is not None:  # the decode step runs one document per row
        raise ValueError("ssm_scan: backend 'cute' (the decode step) does not take packed documents (seq_idx / "
                         "cu_seqlens); use torch or triton")
    return _cute_backend().ssm_scan_cute(q, k, v, log_alpha, beta, gamma, state)


from .fused import ssm_scan_fused, ssm_scan_fused_reference  # noqa: E402  (it imports the names above)
