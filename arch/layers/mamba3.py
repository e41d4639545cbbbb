"""The Mamba-3 mixer (arXiv 2603.15569), SISO and MIMO.

Per token, one input projection gives z (gate), x, B, C, dt, A, λ and the
rotation angles θ. Then, per head h (P = headdim, N = d_state, R = rank):

    dt  = softplus(dt_raw + dt_bias)                   step size
    A   = -max(softplus(a_raw + a_bias), a_floor)      data-dependent, strictly negative
    λ   = sigmoid(λ_raw)                               trapezoid mix (Euler: no λ)
    k,q = RMSNorm(B), RMSNorm(C), + head-specific biases (init 1)
    φ_t = Σ_{s<=t} θ_s dt_s,  θ = π tanh(θ_raw)       cumulative phase (complex state)
    k,q = rotate the first rope_dims of d_state by φ_t
    v_r = x ⊙ W_x[h, r]   (MIMO rank-R input projection; SISO: v = x)

and the scan (``hybridlab.kernels.ssm_scan``) runs with log α = A dt,
β = (1-λ) dt e^{A dt}, γ = λ dt (Euler: β = 0, γ = dt). After it: the D skip,
the optional pre-gate grouped RMSNorm (one group per head), the SiLU gate
z_r = z ⊙ W_z[h, r], the rank-R output combination Σ_r W_o[h, r] ⊙ y_r, and
the output projection. No short convolution.

The stages before and after the scan (B/C norm + bias + rotary; D, norm, gate,
rank combination) are ``hybridlab.kernels.ssm_io``: fused Triton kernels on
CUDA, the PyTorch reference elsewhere. With the triton / auto backend on CUDA
the q/k/v preparation runs inside the scan kernels (``ssm_scan_fused``: B, C,
the phase and x in; no (b, l, H, R, ·) tensor in memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from hybridlab.kernels import ScanState, select_backend, ssm_scan, ssm_scan_fused
from hybridlab.kernels.ssm_scan.fused import fused_supported
from hybridlab.kernels.ssm_io import cumulative_phase, gated_output, qk_prep, rank_expand, scan_coefficients

from ..spec import Mamba3Block


class ScanInputs(NamedTuple):
    """The scan's operands and what the output stage needs besides y."""

    q: torch.Tensor  # (b, l, H, R, N)
    k: torch.Tensor
    v: torch.Tensor  # (b, l, H, R, P)
    log_alpha: torch.Tensor  # (b, l, H) fp32
    beta: torch.Tensor
    gamma: torch.Tensor
    x: torch.Tensor  # (b, l, H, P): v's rank-1 factor (v = x ⊙ W_x)
    z: torch.Tensor  # (b, l, d_inner): the gate input
    phase: Optional[torch.Tensor]  # (b, l, H, n_angles) fp32, or None without rotary


@dataclass
class Mamba3Cache:
    """Decode state, updated in place (static buffers, so a CUDA graph can replay the step).

    ``valid`` (b, l) bool, set by ``HybridLM.forward`` for left-padded prompts: a
    position with ``valid`` False is skipped (dt = 0 and v = 0 there, so h, the
    phase and the carried (k, v) product are exactly as before it).
    """

    scan: ScanState  # h (b, H, P, N) fp32, last k (b, H, R, N), last v (b, H, R, P)
    phase: torch.Tensor  # (b, H, rope_dims // 2) fp32: the running φ
    valid: Optional[torch.Tensor] = None


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class Mamba3(nn.Module):
    def __init__(self, d_model: int, blk: Mamba3Block, backend: str = "auto", norm_eps: float = 1e-5):
        super().__init__()
        self.blk, self.backend, self.eps = blk, backend, norm_eps
        self.d_inner = blk.d_inner(d_model)
        self.H, self.P, self.N, self.R = blk.heads(d_model), blk.headdim, blk.d_state, blk.rank
        self.n_angles = blk.rope_dims // 2
        H, P, N, R = self.H, self.P, self.N, self.R
        self.split = [self.d_inner, self.d_inner, R * N, R * N, H, H, H if blk.trapezoid else 0, self.n_angles]
        self.in_proj = nn.Linear(d_model, sum(self.split), bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj.is_output_proj = True

        dt = torch.exp(torch.rand(H) * (math.log(blk.dt_max) - math.log(blk.dt_min)) + math.log(blk.dt_min))
        self.dt_bias = nn.Parameter(inverse_softplus(dt.clamp(min=1e-4)))
        self.a_bias = nn.Parameter(inverse_softplus(torch.empty(H).uniform_(blk.a_init_min, blk.a_init_max)))
        self.D = nn.Parameter(torch.ones(H))
        for name in ("b_norm", "c_norm", "b_bias", "c_bias", "mimo_x", "mimo_z", "mimo_o", "out_norm"):
            self.register_parameter(name, None)  # off unless the spec turns it on below (None: the stages skip it)
        if blk.bc_norm:
            self.b_norm = nn.Parameter(torch.ones(N))
            self.c_norm = nn.Parameter(torch.ones(N))
        if blk.bc_bias:
            self.b_bias = nn.Parameter(torch.ones(H, R, N))
            self.c_bias = nn.Parameter(torch.ones(H, R, N))
        if blk.mode == "mimo":
            self.mimo_x = nn.Parameter(torch.ones(H, R, P))
            self.mimo_z = nn.Parameter(torch.ones(H, R, P))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R))
        if blk.out_norm == "pre_gate_grouped":
            self.out_norm = nn.Parameter(torch.ones(H, P))

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> Mamba3Cache:
        H, P, N, R = self.H, self.P, self.N, self.R
        scan = ScanState(
            torch.zeros(batch, H, P, N, device=device, dtype=torch.float32),
            torch.zeros(batch, H, R, N, device=device, dtype=dtype),
            torch.zeros(batch, H, R, P, device=device, dtype=dtype),
        )
        return Mamba3Cache(scan, torch.zeros(batch, H, self.n_angles, device=device, dtype=torch.float32))

    @property
    def io_backend(self) -> str:
        """The pre/post-processing stages follow the scan: the reference with a torch scan, fused otherwise."""
        return "torch" if self.backend.startswith("torch") else "auto"

    def scan_inputs(self, u: torch.Tensor, phase0: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> ScanInputs:
        """Project u and build the scan's (q, k, v, log α, β, γ), plus x, z and the phase.

        ``valid`` (b, l) bool: positions to skip get dt = 0 and x = 0 (left padding).
        """
        B, C, x, z, log_alpha, beta, gamma, phase = self.projections(u, phase0, valid)
        q, k = qk_prep(B, C, phase, self.b_norm, self.c_norm, self.b_bias, self.c_bias, self.H, self.eps, backend=self.io_backend)
        v = rank_expand(x, self.mimo_x, backend=self.io_backend) if self.blk.mode == "mimo" else x[:, :, :, None].contiguous()
        return ScanInputs(q, k, v, log_alpha, beta, gamma, x, z, phase)

    def projections(self, u: torch.Tensor, phase0: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        """in_proj and the per-token scalars: B, C (b, l, R, N), x (b, l, H, P), z, log α, β, γ, phase."""
        b, l, _ = u.shape
        H, P, N, R = self.H, self.P, self.N, self.R
        blk = self.blk
        z, x, B, C, dt_raw, a_raw, lam_raw, theta_raw = torch.split(self.in_proj(u), self.split, dim=-1)
        dt, log_alpha, beta, gamma = scan_coefficients(  # (b, l, H) float32
            dt_raw, a_raw, lam_raw if blk.trapezoid else None, self.dt_bias, self.a_bias, blk.a_floor, valid,
            activation="softplus", backend=self.io_backend,  # this layer's A (issue 13 makes it a block option)
        )
        if valid is not None:
            x = torch.where(valid[..., None], x, torch.zeros_like(x))

        phase = None
        if self.n_angles:
            theta = math.pi * torch.tanh(theta_raw.float())  # (b, l, n_angles)
            phase = cumulative_phase(theta, dt, backend=self.io_backend)  # (b, l, H, n_angles)
            if phase0 is not None:
                phase = phase + phase0[:, None]
        return B.view(b, l, R, N), C.view(b, l, R, N), x.view(b, l, H, P), z, log_alpha, beta, gamma, phase

    def forward(self, u: torch.Tensor, cache: Mamba3Cache | None = None):
        b, l, _ = u.shape
        H, P = self.H, self.P
        if cache is not None and l == 1 and cache.valid is None and self.fused_step_ok(u, cache):
            return self.fused_step(u, cache)
        valid = cache.valid if cache is not None else None
        state = cache.scan if cache is not None else None
        B, C, x, z, log_alpha, beta, gamma, phase = self.projections(u, cache.phase if cache is not None else None, valid)
        if self.backend in ("auto", "triton") and l > 1 and fused_supported(B, x, self.mimo_x, self.blk.chunk_size)[0]:
            # q, k, v built inside the scan kernels: no (b, l, H, R, N) tensor in memory, forward or backward
            y, final = ssm_scan_fused(
                B, C, phase, self.b_norm, self.c_norm, self.b_bias, self.c_bias, x, self.mimo_x, log_alpha, beta, gamma,
                state, eps=self.eps, backend="triton", chunk_size=self.blk.chunk_size, last_kv=cache is not None,
            )
        else:
            q, k = qk_prep(B, C, phase, self.b_norm, self.c_norm, self.b_bias, self.c_bias, H, self.eps,
                           backend=self.io_backend)
            v = rank_expand(x, self.mimo_x, backend=self.io_backend) if self.blk.mode == "mimo" else x[:, :, :, None].contiguous()
            y, final = ssm_scan(q, k, v, log_alpha, beta, gamma, state, backend=self.backend, chunk_size=self.blk.chunk_size)
        if cache is not None:  # in place: the cache's buffers stay put (CUDA graphs replay on them)
            for dst, src in zip(cache.scan, final):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            if phase is not None:
                cache.phase.copy_(phase[:, -1])
        return self.out_proj(self.output(y, x, z).reshape(b, l, H * P))

    # ------------------------------------------------------------------ fused decode step (CUDA)
    use_fused_step = True  # set False to decode through ssm_scan (the unfused contract) instead

    def fused_step_ok(self, u: torch.Tensor, cache: Mamba3Cache) -> bool:
        """The CuTe fused step runs for seqlen 1 on CUDA sm90+ with nvidia-cutlass-dsl (backend auto/cute)."""
        if not (self.use_fused_step and u.is_cuda and self.backend in ("auto", "cute")):
            return False
        if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        ok = self.__dict__.get("_fused_ok")
        if ok is None:
            from hybridlab.kernels.ssm_scan.cute import step_supported

            ok = select_backend(u.device, 1)[0] == "cute" and step_supported(self.P, self.N, self.R)[0]
            self.__dict__["_fused_ok"] = ok
        return ok and all(t.is_contiguous() for t in (*cache.scan, cache.phase))

    def step_spec(self):
        from hybridlab.kernels.ssm_scan.cute import StepSpec

        spec = self.__dict__.get("_step_spec")
        if spec is None:
            names = ("z", "x", "B", "C", "dt", "a", "lam", "th")
            offs, o = {}, 0
            for name, width in zip(names, self.split):
                offs[name] = o
                o += width
            blk = self.blk
            spec = StepSpec(
                heads=self.H, headdim=self.P, d_state=self.N, rank=self.R, n_angles=self.n_angles,
                trapezoid=blk.trapezoid, bc_norm=blk.bc_norm, bc_bias=blk.bc_bias, mimo=blk.mode == "mimo",
                out_norm=blk.out_norm == "pre_gate_grouped", eps=float(self.eps), a_floor=float(blk.a_floor),
                d_proj=sum(self.split), offsets=tuple((k, offs[k]) for k in ("z", "x", "B", "dt", "a", "lam", "th")),
            )
            self.__dict__["_step_spec"] = spec
        return spec

    def step_params(self) -> torch.Tensor:
        """The fused step's packed fp32 parameters, rebuilt when a parameter changed (its version moved)."""
        from hybridlab.kernels.ssm_scan.cute import pack_step_params

        params = [p for p in self.parameters() if p is not self.in_proj.weight and p is not self.out_proj.weight]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        cached = self.__dict__.get("_step_params")
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = pack_step_params(
            self.step_spec(), self.dt_bias, self.a_bias, self.D, self.b_norm, self.c_norm, self.b_bias, self.c_bias,
            self.mimo_x, self.mimo_z, self.mimo_o, self.out_norm,
        )
        self.__dict__["_step_params"] = (key, packed)
        return packed

    def fused_step(self, u: torch.Tensor, cache: Mamba3Cache) -> torch.Tensor:
        """One token through in_proj -> CuTe fused step (pre + scan + post) -> out_proj; cache updated in place."""
        from hybridlab.kernels.ssm_scan.cute import ssm_step_fused

        b = u.shape[0]
        zx = self.in_proj(u.reshape(b, -1))
        out = ssm_step_fused(zx, self.step_params(), cache.phase, cache.scan, self.step_spec())
        return self.out_proj(out).view(b, 1, -1)

    def output(self, y, x, z):
        """D skip, pre-gate grouped norm, SiLU gate and the rank combination: (b, l, H, R, P) -> (b, l, H, P)."""
        return gated_output(
            y, x, z, self.D, self.out_norm, self.mimo_x, self.mimo_z, self.mimo_o, self.eps, backend=self.io_backend
        )
