"""Guard zones around every buffer a Triton kernel touches: out-of-range reads and writes fail a test.

``guarded_launches(launches)`` runs a list of ``Launch``es (kernels/ssm_scan/triton_fused.py) with every
tensor argument replaced by a view into a larger buffer: the view keeps the tensor's shape and strides,
and every element of the buffer outside it — margins before and after, and the gaps of a strided view
(the other columns of a projection that B and C are slices of) — holds NaN (integers: a sentinel).
An unmasked read of anything outside a tensor then turns an output into NaN, and a write outside one
changes a guard. After the launches it checks, per buffer, that the guards are bit-for-bit unchanged
and that what the kernels left inside is finite, copies the results back and reports every violation
with the kernel parameters the buffer was passed as.

``nan_outputs()`` makes the launch builders' ``torch.empty`` / ``torch.empty_like`` outputs start as
NaN, so an output element that no kernel writes fails the finiteness check too.

``guard_fused(module)`` wires both into ``ssm_scan_fused``'s Triton forward and backward (the launch
builders and the one function that runs launches) for the duration of a ``with`` block (works under
TRITON_INTERPRET=1 and on CUDA).
"""

from __future__ import annotations

import contextlib

import torch

INT_GUARD = -77777


def _fill(dtype):
    return float("nan") if dtype.is_floating_point else INT_GUARD


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bits as integers (NaN == NaN bitwise)."""
    if not t.dtype.is_floating_point:
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class _Guarded:
    def __init__(self, t: torch.Tensor, names: list):
        self.orig, self.names = t, names
        span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))  # elements from the first to the last
        self.pad = max(4096, span // 4)
        self.big = torch.full((span + 2 * self.pad,), _fill(t.dtype), dtype=t.dtype, device=t.device)
        self.view = self.big.as_strided(t.shape, t.stride(), self.pad)
        self.view.copy_(t)
        self.inside = torch.zeros(self.big.numel(), dtype=torch.bool, device=t.device)
        self.inside.as_strided(t.shape, t.stride(), self.pad).fill_(True)
        self.before = _bits(self.big).clone()

    def check(self) -> list[str]:
        errs = []
        changed = (_bits(self.big) != self.before) & ~self.inside
        if changed.any():
            idx = changed.nonzero().flatten()
            rel = [int(i) - self.pad for i in idx[:4]]
            errs.append(f"{'/'.join(self.names)}: {int(changed.sum())} guard elements written "
                        f"(offsets from the tensor's first element, first few: {rel})")
        if self.orig.dtype.is_floating_point and not torch.isfinite(self.view).all():
            bad = int((~torch.isfinite(self.view)).sum())
            errs.append(f"{'/'.join(self.names)}: {bad} of {self.view.numel()} elements not finite after the kernels "
                        f"(an out-of-range read, or an output element no kernel wrote)")
        return errs

    def write_back(self):
        if not torch.equal(_bits(self.view), _bits(self.orig)):
            self.orig.copy_(self.view)


def guarded_launches(launches, violations: list) -> None:
    """Run ``launches`` in order on guarded copies of their tensor arguments; append what went wrong to
    ``violations`` (one line per buffer) and copy the results back into the original tensors."""
    reps: dict[int, _Guarded] = {}
    runs = []
    for launch in launches:
        names = [nm for nm in launch.kernel.arg_names if nm not in launch.meta]
        args = []
        for nm, a in zip(names, launch.args):
            if isinstance(a, torch.Tensor) and a.numel() > 0 and 0 not in a.stride():
                g = reps.get(id(a))
                if g is None:
                    g = reps[id(a)] = _Guarded(a, [])
                g.names.append(f"{launch.kernel.__name__.strip('_')}.{nm}")
                a = g.view
            args.append(a)
        runs.append(launch._replace(args=tuple(args)))
    cuda = any(g.big.is_cuda for g in reps.values())
    for run in runs:
        try:
            run()
            if cuda:  # a fault is then reported at the kernel that made it
                torch.cuda.synchronize()
        except Exception as e:
            raise RuntimeError(f"{run.kernel.__name__} (grid {run.grid}, {run.meta}) failed: {e}") from e
    for g in reps.values():
        violations += g.check()
        g.write_back()


@contextlib.contextmanager
def nan_outputs():
    """``torch.empty`` / ``torch.empty_like`` of floating dtypes return NaN-filled tensors inside the block."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.dtype.is_floating_point and t.device.type != "meta" else t

    def nan_empty_like(*a, **k):
        t = empty_like(*a, **k)
        return t.fill_(float("nan")) if t.dtype.is_floating_point and t.device.type != "meta" else t

    torch.empty, torch.empty_like = nan_empty, nan_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@contextlib.contextmanager
def guard_fused(tf):
    """Inside the block, ``ssm_scan_fused``'s Triton forward / backward (module ``tf``, triton_fused) start their
    outputs as NaN and run every kernel through ``guarded_launches`` (the dispatch, e.g. the fallback to the
    unfused chain, is untouched); yields the list the violations are appended to."""
    violations: list[str] = []
    saved = tf.fwd_launches, tf.bwd_launches, tf._run

    def nan_built(build):
        def wrapped(*args):
            with nan_outputs():
                return build(*args)
        return wrapped

    tf.fwd_launches, tf.bwd_launches = nan_built(saved[0]), nan_built(saved[1])
    tf._run = lambda launches: guarded_launches(launches, violations)
    try:
        yield violations
    finally:
        tf.fwd_launches, tf.bwd_launches, tf._run = saved
