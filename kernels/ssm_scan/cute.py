"""``cute`` backend of ``ssm_scan``: the one-token decode step in the CuTe DSL (nvidia-cutlass-dsl).

Two entry points, both updating the state in place (h, last k, last v):

* ``ssm_scan_cute(q, k, v, log_alpha, beta, gamma, state)`` — the plain contract
  (DESIGN.md §3) for seqlen 1 (longer inputs run the step once per position).
* ``ssm_step_fused(zx, params, phase, state, spec)`` — what the Mamba-3 layer calls
  when decoding: takes the in_proj row, does dt/A/λ, B/C RMSNorm + bias + rotary
  with the running phase (advanced in place), the state update, the D skip,
  pre-gate grouped RMSNorm, SiLU gate and the MIMO combination, and returns the
  (batch, heads·headdim) row for out_proj. One kernel launch per layer and token.
  ``FusedStep`` is the object a layer holds for it: the static ``StepSpec``, the
  packed parameters (re-packed only when a parameter changed) and whether the
  kernel runs on a device.

Kernels are compiled once per (shapes, dtype, flags) and cached; the first call
of a shape costs about a second. Nothing here imports cutlass until a kernel is
compiled, so the module imports on machines without CUDA (CI).

Calls go through TVM-FFI when it is installed (torch tensors passed directly, the
current torch stream used, a few µs of host time); otherwise through DLPack.
Both are CUDA-graph safe: capture replays the recorded launch.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings
from dataclasses import dataclass

import torch

from .reference import ScanState, check_inputs

__all__ = ["ssm_scan_cute", "ssm_step_fused", "FusedStep", "StepSpec", "pack_step_params", "cute_available",
           "step_supported"]

_H = 9  # index of the state h (the one tensor read with 16-byte vectors) in the kernel's arguments
_compiled: dict = {}
_lock = threading.Lock()
_dummies: dict = {}


def cute_available(device=None) -> bool:
    """CUDA sm90+ and nvidia-cutlass-dsl importable."""
    if not torch.cuda.is_available() or importlib.util.find_spec("cutlass") is None:
        return False
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def step_supported(headdim: int, d_state: int, rank: int) -> tuple[bool, str]:
    """Whether the kernel's thread layout fits these sizes (pure Python, no cutlass needed)."""
    n4 = d_state // 4
    if d_state % 32 or not ((n4 & (n4 - 1)) == 0 or n4 % 32 == 0):
        return False, f"d_state {d_state}: needs a multiple of 32 with d_state/4 a power of two or a multiple of 32"
    if headdim % 32 or headdim & (headdim - 1):
        return False, f"headdim {headdim}: needs a power of two >= 32"
    if rank > 16:
        return False, f"rank {rank} > 16"
    return True, ""


@dataclass(frozen=True)
class StepSpec:
    """Static facts of one Mamba-3 layer that the fused step needs."""

    heads: int
    headdim: int
    d_state: int
    rank: int
    n_angles: int
    trapezoid: bool
    bc_norm: bool
    bc_bias: bool
    mimo: bool
    out_norm: bool
    eps: float
    a_floor: float
    d_proj: int
    offsets: tuple  # (("z", i), ("x", i), ("B", i), ("dt", i), ("a", i), ("lam", i), ("th", i))
    a_activation: str = "heavy_tail"  # |A| = heavy_tail or softplus of (a_raw [+ a_bias]), as in ssm_io
    a_bias: bool = False  # whether the packed a_bias slot holds a learned bias (False: zeros)


def pack_step_params(spec: StepSpec, dt_bias, a_bias, D, b_norm=None, c_norm=None, b_bias=None, c_bias=None,
                     mimo_x=None, mimo_z=None, mimo_o=None, out_norm=None) -> torch.Tensor:
    """The fused step's parameters as one fp32 vector (absent ones as identities: a_bias None is zeros).

    Order: dt_bias, a_bias, D (H each), b_norm, c_norm (N each), b_bias, c_bias
    (H·R·N each), mimo_x, mimo_z, mimo_o (H·R·P each), out_norm (H·P).
    """
    H, P, N, R = spec.heads, spec.headdim, spec.d_state, spec.rank
    dev = dt_bias.device

    def f(t, shape, fill):
        if t is None:
            return torch.full(shape, fill, dtype=torch.float32, device=dev).reshape(-1)
        return t.detach().float().reshape(-1)

    parts = [f(dt_bias, (H,), 0), f(a_bias, (H,), 0), f(D, (H,), 0),
             f(b_norm, (N,), 1), f(c_norm, (N,), 1), f(b_bias, (H, R, N), 0), f(c_bias, (H, R, N), 0),
             f(mimo_x, (H, R, P), 1), f(mimo_z, (H, R, P), 1), f(mimo_o, (H, R, P), 1), f(out_norm, (H, P), 1)]
    return torch.cat(parts).contiguous()


STEP_PARAMS = ("dt_bias", "a_bias", "D", "b_norm", "c_norm", "b_bias", "c_bias", "mimo_x", "mimo_z", "mimo_o", "out_norm")


class FusedStep:
    """The fused decode step of one Mamba-3 layer: its ``StepSpec``, its packed parameters and where it runs.

    ``params(tensors)`` packs the layer's small parameters (a mapping name -> tensor or None,
    names as in ``STEP_PARAMS``) once and re-packs only when one of them changed (moved,
    was updated in place, or changed dtype). ``supported(device)`` is decided once per device.
    Pure Python until the first call: nothing imports cutlass before a kernel compiles.
    """

    def __init__(self, spec: StepSpec):
        self.spec = spec
        self._packed_key = None
        self._packed = None
        self._ok: dict = {}

    def supported(self, device: torch.device) -> bool:
        key = (device.type, device.index)
        ok = self._ok.get(key)
        if ok is None:
            s = self.spec
            ok = device.type == "cuda" and cute_available(device) and step_supported(s.headdim, s.d_state, s.rank)[0]
            self._ok[key] = ok
        return ok

    def params(self, tensors: dict) -> torch.Tensor:
        ts = [tensors.get(n) for n in STEP_PARAMS]
        key = tuple((t.data_ptr(), t._version, t.dtype) if t is not None else None for t in ts)
        if key != self._packed_key:
            self._packed = pack_step_params(self.spec, *ts)
            self._packed_key = key
        return self._packed

    def __call__(self, zx: torch.Tensor, tensors: dict, phase: torch.Tensor, state: ScanState) -> torch.Tensor:
        return ssm_step_fused(zx, self.params(tensors), phase, state, self.spec)


# --------------------------------------------------------------------------- compilation

def _mod():
    return importlib.import_module("._cute_step", __package__)


def _cutlass_dtype(m, dtype: torch.dtype):
    import cutlass

    table = {torch.float32: cutlass.Float32, torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}
    if dtype not in table:
        raise TypeError(f"ssm_scan cute: dtype {dtype} not supported (fp32, bf16, fp16)")
    return table[dtype]


def _row_major(shape):
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _tensor_sig(t: torch.Tensor):
    return (tuple(t.shape), t.dtype)


class _Compiled:
    """A compiled kernel and how to call it."""

    def __init__(self, fn, tvm: bool):
        self.fn, self.tvm = fn, tvm

    def __call__(self, *tensors):
        if self.tvm:
            self.fn(*tensors)
            return
        import cuda.bindings.driver as cuda
        from cutlass.cute.runtime import from_dlpack

        args = [from_dlpack(t, assumed_align=16 if i == _H else None) for i, t in enumerate(tensors)]
        self.fn(*args, cuda.CUstream(torch.cuda.current_stream(tensors[_H].device).cuda_stream))


def _get_kernel(cfg_kwargs: dict, tensors: list[torch.Tensor]) -> _Compiled:
    key = (tuple(sorted(cfg_kwargs.items())), tuple(_tensor_sig(t) for t in tensors), tensors[_H].device.index)
    fn = _compiled.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _compiled.get(key)
        if fn is not None:
            return fn
        m = _mod()
        cute = m.cute
        kw = dict(cfg_kwargs)
        kw["dtype"] = _cutlass_dtype(m, kw["dtype"])
        kw["offsets"] = dict(kw["offsets"])
        obj = m.SSMStep(m.StepConfig(**kw))
        try:
            fakes = [
                cute.runtime.make_fake_tensor(
                    _cutlass_dtype(m, t.dtype), tuple(t.shape), stride=_row_major(t.shape),
                    assumed_align=16 if i == _H else t.element_size(),
                )
                for i, t in enumerate(tensors)
            ]
            fn = _Compiled(cute.compile(obj, *fakes, cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
                                        options="--enable-tvm-ffi"), tvm=True)
        except Exception as e:  # no / incompatible apache-tvm-ffi: DLPack path
            warnings.warn(f"ssm_scan cute: TVM-FFI compile failed ({type(e).__name__}: {e}); using DLPack calls")
            import cuda.bindings.driver as cuda
            from cutlass.cute.runtime import from_dlpack

            args = [from_dlpack(t, assumed_align=16 if i == _H else None) for i, t in enumerate(tensors)]
            stream = cuda.CUstream(torch.cuda.current_stream(tensors[_H].device).cuda_stream)
            fn = _Compiled(cute.compile(obj, *args, stream), tvm=False)
        _compiled[key] = fn
        return fn


def _dummy(device, dtype, ndim):
    key = (device, dtype, ndim)
    t = _dummies.get(key)
    if t is None:
        t = torch.zeros((1,) * ndim, device=device, dtype=dtype)
        _dummies[key] = t
    return t


def _inplace_ok(t: torch.Tensor, dtype=None) -> bool:
    return t.is_contiguous() and (dtype is None or t.dtype == dtype)


# --------------------------------------------------------------------------- entry points

def ssm_scan_cute(q, k, v, log_alpha, beta, gamma, state=None):
    """The contract's step on the GPU; returns ``(y, state)`` with ``state`` updated in place.

    ``state`` None starts from zeros (new tensors are returned). Longer inputs
    run the step once per position.
    """
    st = check_inputs(q, k, v, log_alpha, beta, gamma, state)
    if q.device.type != "cuda":
        raise RuntimeError("ssm_scan cute: needs CUDA tensors")
    b, l, H, R, N = q.shape
    P = v.shape[-1]
    ok, why = step_supported(P, N, R)
    if not ok:
        raise ValueError(f"ssm_scan cute: {why}")
    # work buffers: the caller's own tensors when they are contiguous with the right dtype (in place)
    h = st.h if _inplace_ok(st.h, torch.float32) else st.h.float().contiguous()
    ks = st.k if _inplace_ok(st.k, k.dtype) else st.k.to(k.dtype).contiguous()
    vs = st.v if _inplace_ok(st.v, v.dtype) else st.v.to(v.dtype).contiguous()
    cfg = dict(B=b, H=H, P=P, N=N, R=R, dtype=v.dtype, fused=False, offsets=())
    if k.dtype != v.dtype or q.dtype != v.dtype:
        raise TypeError("ssm_scan cute: q, k, v must share a dtype")
    y = torch.empty(b, l, H, R, P, device=v.device, dtype=v.dtype)
    dev = q.device
    f32 = torch.float32
    for t in range(l):
        tensors = [
            q[:, t].contiguous().view(b * H * R, N), k[:, t].contiguous().view(b * H * R, N),
            v[:, t].contiguous().view(b * H * R, P),
            log_alpha[:, t].float().contiguous().view(b * H), beta[:, t].float().contiguous().view(b * H),
            gamma[:, t].float().contiguous().view(b * H),
            _dummy(dev, v.dtype, 2), _dummy(dev, f32, 1), _dummy(dev, f32, 2),
            h.view(b * H * P, N), ks.view(b * H * R, N), vs.view(b * H * R, P),
            y[:, t].view(b * H * R, P) if l == 1 else torch.empty(b * H * R, P, device=dev, dtype=v.dtype),
        ]
        _run(cfg, tensors)
        if l > 1:
            y[:, t] = tensors[-1].view(b, H, R, P)
    # hand results back into the caller's tensors when they were not usable in place
    if state is not None and not isinstance(state, torch.Tensor):
        hs, kss, vss = state
        if hs is not h:
            hs.copy_(h)
        if kss is not None and kss is not ks:
            kss.copy_(ks)
        if vss is not None and vss is not vs:
            vss.copy_(vs)
    return y, ScanState(h, ks, vs)


def _run(cfg: dict, tensors: list[torch.Tensor]) -> None:
    # SSMStep.__call__ order: q, k, v, la, beta, gamma, zx, par, phase, h, ks, vs, out
    _get_kernel(cfg, tensors)(*tensors)


def ssm_step_fused(zx: torch.Tensor, params: torch.Tensor, phase: torch.Tensor, state: ScanState, spec: StepSpec,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """One fused Mamba-3 decode step. zx: (b, d_proj) in_proj output; returns (b, heads*headdim).

    ``state`` (h fp32 (b,H,P,N), k (b,H,R,N), v (b,H,R,P)) and ``phase`` (b, H, n_angles)
    fp32 are updated in place; all must be contiguous.
    """
    b = zx.shape[0]
    H, P, N, R = spec.heads, spec.headdim, spec.d_state, spec.rank
    h, ks, vs = state
    for name, t in (("state.h", h), ("state.k", ks), ("state.v", vs), ("phase", phase), ("in_proj row", zx)):
        if not t.is_contiguous():
            raise ValueError(f"ssm_step_fused: {name} must be contiguous")
    if zx.shape != (b, spec.d_proj):
        raise ValueError(f"ssm_step_fused: in_proj row must be ({b}, {spec.d_proj}); got {tuple(zx.shape)}")
    if out is None:
        out = torch.empty(b, H * P, device=zx.device, dtype=zx.dtype)
    dev, f32 = zx.device, torch.float32
    na = max(spec.n_angles, 1)
    cfg = dict(B=b, H=H, P=P, N=N, R=R, dtype=zx.dtype, fused=True, n_angles=spec.n_angles,
               trapezoid=spec.trapezoid, bc_norm=spec.bc_norm, bc_bias=spec.bc_bias, mimo=spec.mimo,
               out_norm=spec.out_norm, eps=spec.eps, a_floor=spec.a_floor, d_proj=spec.d_proj, offsets=spec.offsets,
               heavy_tail=spec.a_activation == "heavy_tail", a_bias=spec.a_bias)
    ph = phase.view(b * H, na) if spec.n_angles else _dummy(dev, f32, 2)
    tensors = [
        _dummy(dev, zx.dtype, 2), _dummy(dev, zx.dtype, 2), _dummy(dev, zx.dtype, 2),
        _dummy(dev, f32, 1), _dummy(dev, f32, 1), _dummy(dev, f32, 1),
        zx, params, ph,
        h.view(b * H * P, N), ks.view(b * H * R, N), vs.view(b * H * R, P), out,
    ]
    _run(cfg, tensors)
    return out
