"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, with the very arguments their
launchers pass. The interpreter (TRITON_INTERPRET=1) runs a kernel's Python, so it accepts what the GPU
compiler refuses (the cos of a 16-bit value, a pointer of the wrong dtype); ``triton.compile`` types the
kernel from its arguments and builds PTX and a cubin without a device (``kernels/bench/triton_resources``).

``recorded_launches()``: within the block every ``kernel[grid](...)`` records its launch instead of running
it, and the ops' device checks see Triton as usable on the CPU, so a layer's forward and backward walk the
launchers a GPU run takes (their outputs stay uninitialized: only the launches matter)."""

from __future__ import annotations

import contextlib
import inspect

LAUNCH_OPTIONS = ("num_warps", "num_stages")
# the modules that ask whether Triton can run on a tensor's device (each imported the function by name)
_USABLE_IN = ("hybridlab.kernels.ssm_io._dispatch", "hybridlab.kernels.ssm_scan", "hybridlab.kernels.ssm_scan.fused")


def _as_launch(kernel, grid, args: tuple, kwargs: dict):
    """A ``triton_fused.Launch`` of this call: constexprs by name (defaults filled in); an autotuned kernel
    as its first config."""
    from triton.runtime.autotuner import Autotuner

    from hybridlab.kernels.ssm_scan.triton_fused import Launch

    kwargs = dict(kwargs)
    if isinstance(kernel, Autotuner):
        cfg = kernel.configs[0]
        kwargs.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        kernel = kernel.fn
    params = kernel.params
    named = dict(zip((p.name for p in params), args))
    named.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    for p in params:
        if p.name not in named and p.default is not inspect.Parameter.empty:
            named[p.name] = p.default
    meta = {p.name: named[p.name] for p in params if p.is_constexpr or named[p.name] is None}
    runtime = tuple(named[p.name] for p in params if p.name not in meta)
    return Launch(kernel, grid, runtime, meta, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))


@contextlib.contextmanager
def recorded_launches():
    import importlib

    from triton.runtime.jit import KernelInterface

    launches: list = []
    saved_getitem = KernelInterface.__getitem__
    mods = [importlib.import_module(m) for m in _USABLE_IN]
    saved_usable = [m.triton_usable for m in mods]
    KernelInterface.__getitem__ = lambda self, grid: (
        lambda *args, **kwargs: launches.append(_as_launch(self, grid, args, kwargs)))
    for m in mods:
        m.triton_usable = lambda t: True
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = saved_getitem
        for m, f in zip(mods, saved_usable):
            m.triton_usable = f


def unique(launches: list) -> list:
    """One launch per (kernel, argument types, constexprs): what triton would compile."""
    import torch

    seen, out = set(), []
    for la in launches:
        key = (la.kernel.fn.__qualname__, tuple(a.dtype if torch.is_tensor(a) else type(a) for a in la.args),
               tuple(sorted((k, repr(v)) for k, v in la.meta.items())), la.num_warps, la.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(la)
    return out
