"""Compile a module's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, with the very
arguments its launcher passes: the interpreter (TRITON_INTERPRET=1) runs a kernel's Python, so it accepts
what the GPU compiler refuses (the cos of a 16-bit value, a pointer of the wrong dtype); triton.compile
types the kernel from its arguments and builds PTX and a cubin without a device."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
        torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict = field(default_factory=dict)


class _Recorder:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recorded_launches(module, *names: str):
    """Within the block, ``module.<name>[grid](...)`` records the launch instead of running it."""
    launches: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def _arg_type(v) -> str:
    if torch.is_tensor(v):
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for an argument of type {type(v).__name__}")


def compile_for_sm90(launch: Launch):
    """The launch's kernel compiled for sm_90: its arguments' types, its keyword constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    names = fn.arg_names
    const = {k: v for k, v in launch.kwargs.items() if k not in LAUNCH_OPTIONS}
    given = dict(zip(names, launch.args))
    sig = {n: "constexpr" if n in const else _arg_type(given[n]) for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    opts = {k: v for k, v in launch.kwargs.items() if k in LAUNCH_OPTIONS}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
