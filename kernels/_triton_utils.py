"""What every Triton op of hybridlab.kernels shares: the triton import, the interpreter flag, block sizes.

Imports nothing else of hybridlab. ``triton`` is an optional dependency: without it the kernels are
still *defined* (``jit`` leaves the function as it is, ``tl.constexpr`` annotations resolve), so the
op modules import everywhere, but nothing here launches them (``HAS_TRITON`` is False and every
dispatcher then picks the torch reference).

Everything the dispatchers decide on is computed once, at import: whether triton is installed and
whether ``TRITON_INTERPRET=1`` (triton reads that flag when a kernel is decorated, so it cannot
change later anyway). The per-call checks are then tensor properties (device type, dtype, shape),
which ``torch.compile`` traces as guards instead of breaking the graph on ``os.environ`` or
``importlib`` calls.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without the triton extra

    class _Absent:
        """Stand-in for ``triton`` / ``triton.language``: decorators pass through, anything else fails loudly."""

        constexpr = object  # only ever used in annotations

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError(f"triton is not installed (needed for triton.{name})")

    triton = tl = _Absent()
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_usable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``'s device: CUDA, or any device under the interpreter."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def pow2(x: int) -> int:
    """The smallest power of two >= x (>= 1): tl.arange extents."""
    return 1 << (max(int(x), 1) - 1).bit_length()


def floor_pow2(x: int) -> int:
    """The largest power of two <= x (>= 1)."""
    return 1 << (max(int(x), 1).bit_length() - 1)


def pow2_rows_error(rows: int, what: str) -> str:
    """The rule for the rows of a tensor-core tile: a power of two >= 16. Returns why not ('' if ok)."""
    if rows < 16 or rows & (rows - 1):
        return f"{what} = {rows} is not a power of two >= 16"
    return ""


def token_block(rank_pad: int, cols: int, budget: int, cap: int = 64) -> int:
    """Tokens per program for an elementwise/row-wise kernel: about ``budget`` fp32 elements per
    (tokens, rank_pad, cols) tile, a power of two (tl.arange) no larger than ``cap``."""
    return floor_pow2(max(1, min(cap, budget // (rank_pad * cols))))


def env_pair(name: str, default: str) -> tuple[int, int]:
    """An ``"a,b"`` integer pair from the environment (launch-config overrides for tuning)."""
    a, b = os.environ.get(name, default).split(",")
    return int(a), int(b)


# Programs that sum a parameter's gradient over tokens (each walks several token blocks, so the
# partial sums that torch adds up afterwards stay a few MB).
PARAM_PROGRAMS = int(os.environ.get("HYBRIDLAB_IO_BWD_PROGRAMS", "4096"))


def param_grid(n_blocks: int, heads: int) -> tuple[int, int]:
    """(programs per head, token blocks per program) for a (token blocks, heads) grid of ~PARAM_PROGRAMS."""
    iters = max(1, -(-n_blocks * heads // PARAM_PROGRAMS))
    return -(-n_blocks // iters), iters


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (b, l, ...) as the kernels address it: (b, l) flatten to one token axis with stride
    ``t.stride(1)`` and each token's trailing dims are dense (a view of a projection's slice passes
    as is; anything else is copied)."""
    dense = 1
    for dim in range(t.dim() - 1, 1, -1):
        if t.stride(dim) != dense:
            return t.contiguous()
        dense *= t.shape[dim]
    return t if t.stride(0) == t.shape[1] * t.stride(1) else t.contiguous()


# ------------------------------------------------------------------ shared device functions


@triton.jit
def sincos(x):
    """(sin x, cos x) in fp32 from one range reduction and two short polynomials: about a third of
    the work of ``tl.sin`` + ``tl.cos`` (two full libdevice calls), to a few ulp for |x| < ~1e4
    (beyond that the fp32 phase itself is coarser than the reduction's error).

    x = j·π/2 + r with |r| <= π/4, π/2 in three parts (Cody–Waite: the first two have short
    mantissas, so j·part is exact for the quadrant counts a rotary phase reaches); minimax
    polynomials for sin r and cos r; the quadrant j mod 4 picks and signs them. (Literals, not
    module constants: jit functions may only read constexpr globals.)"""
    j = tl.floor(x * 0.6366197723675814 + 0.5)
    r = x - j * 1.5703125
    r = r - j * 4.837512969970703125e-4
    r = r - j * 7.549789948768648e-8
    z = r * r
    s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    q = j.to(tl.int32) & 3
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return sin, cos
