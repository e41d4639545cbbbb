"""The Mamba-3 mixer (arXiv 2603.15569), SISO and MIMO.

Per token, one input projection gives z (gate), x, B, C, dt, A, λ and the
rotation angles θ. Then, per head h (P = headdim, N = d_state, R = rank):

    dt  = softplus(dt_raw + dt_bias)                   step size
    A   = -max(f(a_raw), a_floor)                      data-dependent, strictly negative; f the heavy
                                                       tail (1 + u, or 1 / (1 - u) below 0) of the
                                                       official layer (a_activation: softplus, a_bias:
                                                       true: -max(softplus(a_raw + a_bias), a_floor))
    λ   = sigmoid(λ_raw)                               trapezoid mix (Euler: no λ)
    k,q = RMSNorm(B), RMSNorm(C), + head-specific biases (init 1)
    φ_t = Σ_{s<=t} θ_s dt_s,  θ = π tanh(θ_raw)       cumulative phase (complex state)
    k,q = rotate the first rope_dims of d_state by φ_t

(``rope: standard``, the paper's ablation: φ_t = t ω with the fixed frequencies
ω_i = rope_theta^(-2i/rope_dims) of a Transformer's RoPE, t the position
counted from 1; no θ projection.)
    v_r = x ⊙ W_x[h, r]   (MIMO rank-R input projection; SISO: v = x)

and the scan (``hybridlab.kernels.ssm_scan``) runs with log α = A dt,
β = (1-λ) dt e^{A dt}, γ = λ dt (Euler: β = 0, γ = dt). After it: the D skip,
the optional pre-gate grouped RMSNorm (one group per head), the SiLU gate
z_r = z ⊙ W_z[h, r], the rank-R output combination Σ_r W_o[h, r] ⊙ y_r, and
the output projection. No short convolution, unless the spec asks for Mamba-2's (``d_conv``: a causal
depthwise convolution + SiLU over x, B, C before everything above; ``arch/layers/short_conv.py``).

The stages before and after the scan (B/C norm + bias + rotary; D, norm, gate,
rank combination) are ``hybridlab.kernels.ssm_io``: fused Triton kernels on
CUDA, the PyTorch reference elsewhere. With the triton / auto backend on CUDA
the q/k/v preparation runs inside the scan kernels (``ssm_scan_fused``: B, C,
the phase and x in; no (b, l, H, R, ·) tensor in memory). One-token decode
steps on Hopper+ run as one CuTe kernel (``kernels.ssm_scan.cute.FusedStep``,
held by the layer).

Rotary pairs are (i, i + n_angles) of d_state here; the official layer's
(2i, 2i+1) (SISO) and (i, N/2 + i) (MIMO) are a permutation of d_state that
``hybridlab.arch.interop.mamba_ssm`` applies to every weight it moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from hybridlab.kernels import ScanState, ssm_scan, ssm_scan_fused
from hybridlab.kernels.norm_rotary import at_least_fp32
from hybridlab.kernels.ssm_scan.fused import fused_supported
from hybridlab.kernels.ssm_io import cumulative_phase, gated_output, qk_prep, rank_expand, scan_coefficients
from hybridlab.kernels.ssm_scan.cute import STEP_PARAMS, FusedStep, StepSpec

from ..spec import Mamba3Block
from .rotary import position_angles
from .short_conv import causal_conv


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
    conv: Optional[torch.Tensor] = None  # (b, d_conv - 1, channels): the short convolution's last inputs (d_conv only)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def inverse_heavy_tail(y: torch.Tensor) -> torch.Tensor:
    """The u > -inf with heavy_tail(u) = y (y > 0)."""
    return torch.where(y >= 1, y - 1, 1 - 1 / y)


class Mamba3(nn.Module):
    def __init__(self, d_model: int, blk: Mamba3Block, backend: str = "auto", norm_eps: float = 1e-5):
        super().__init__()
        self.blk, self.backend, self.eps = blk, backend, norm_eps
        self.d_inner = blk.d_inner(d_model)
        self.H, self.P, self.N, self.R = blk.heads(d_model), blk.headdim, blk.d_state, blk.rank
        self.n_angles = blk.rope_dims // 2
        self.standard_rope = blk.rope == "standard"  # data-independent angles: nothing to project
        H, P, N, R = self.H, self.P, self.N, self.R
        self.split = [self.d_inner, self.d_inner, R * N, R * N, H, H, H if blk.trapezoid else 0,
                      0 if self.standard_rope else self.n_angles]
        self.in_proj = nn.Linear(d_model, sum(self.split), bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj.is_output_proj = True
        self.conv1d = None
        if blk.d_conv:  # Mamba-2's layout and init (nn.Conv1d's); causal_conv applies it
            ch = self.d_inner + 2 * R * N
            self.conv1d = nn.Conv1d(ch, ch, blk.d_conv, groups=ch, bias=True)

        dt = torch.exp(torch.rand(H) * (math.log(blk.dt_max) - math.log(blk.dt_min)) + math.log(blk.dt_min))
        self.dt_bias = nn.Parameter(inverse_softplus(dt.clamp(min=blk.dt_init_floor)))
        self.D = nn.Parameter(torch.ones(H))
        for name in ("a_bias", "b_norm", "c_norm", "b_bias", "c_bias", "mimo_x", "mimo_z", "mimo_o", "out_norm"):
            self.register_parameter(name, None)  # off unless the spec turns it on below (None: the stages skip it)
        if blk.a_bias:
            a0 = torch.empty(H).uniform_(blk.a_init_min, blk.a_init_max)
            self.a_bias = nn.Parameter(inverse_heavy_tail(a0) if blk.a_activation == "heavy_tail" else inverse_softplus(a0))
        if blk.bc_norm:
            self.b_norm = nn.Parameter(torch.ones(N))
            self.c_norm = nn.Parameter(torch.ones(N))
        if blk.bc_bias:
            self.b_bias = nn.Parameter(torch.ones(H, R, N))
            self.c_bias = nn.Parameter(torch.ones(H, R, N))
        if blk.mode == "mimo":
            self.mimo_x = nn.Parameter(torch.full((H, R, P), 1.0 / R))  # as the official layer: x and o at 1/R, z at 1
            self.mimo_z = nn.Parameter(torch.ones(H, R, P))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R))
        if blk.out_norm == "pre_gate_grouped":
            self.out_norm = nn.Parameter(torch.ones(H, P))
        # decode: the fused CuTe step where it runs (set use_fused_step False to decode through ssm_scan)
        self.use_fused_step = True
        self.step = FusedStep(self._step_spec())

    def allocate_cache(self, batch: int, max_len: int, device, dtype) -> Mamba3Cache:
        H, P, N, R = self.H, self.P, self.N, self.R
        scan = ScanState(
            torch.zeros(batch, H, P, N, device=device, dtype=torch.float32),
            torch.zeros(batch, H, R, N, device=device, dtype=dtype),
            torch.zeros(batch, H, R, P, device=device, dtype=dtype),
        )
        conv = None
        if self.conv1d is not None:
            conv = torch.zeros(batch, self.blk.d_conv - 1, self.conv1d.in_channels, device=device, dtype=dtype)
        return Mamba3Cache(scan, torch.zeros(batch, H, self.n_angles, device=device, dtype=torch.float32), conv=conv)

    @property
    def io_backend(self) -> str:
        """The pre/post-processing stages follow the scan: the reference with a torch scan, fused otherwise."""
        return "torch" if self.backend.startswith("torch") else "auto"

    def scan_inputs(self, u: torch.Tensor, phase0: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                    seq_idx: torch.Tensor | None = None, conv_window: torch.Tensor | None = None) -> ScanInputs:
        """Project u and build the scan's (q, k, v, log α, β, γ), plus x, z and the phase.

        ``valid`` (b, l) bool: positions to skip get dt = 0 and x = 0 (left padding).
        ``seq_idx`` (b, l) int: packed documents; the phase restarts at each document start
        (``phase0``, a cache's running phase, belongs to the first document only).
        ``conv_window``: a cache's short-convolution inputs (``d_conv``), read and updated in place.
        """
        B, C, x, z, log_alpha, beta, gamma, phase = self.projections(u, phase0, valid, seq_idx, conv_window)
        return ScanInputs(*self.qkv(B, C, x, phase), log_alpha, beta, gamma, x, z, phase)

    def qkv(self, B, C, x, phase):
        """The unfused q/k/v preparation (ssm_io): (q, k) by qk_prep, v = x ⊙ W_x (MIMO) or x."""
        q, k = qk_prep(B, C, phase, self.b_norm, self.c_norm, self.b_bias, self.c_bias, self.H, self.eps, backend=self.io_backend)
        v = rank_expand(x, self.mimo_x, backend=self.io_backend) if self.blk.mode == "mimo" else x[:, :, :, None].contiguous()
        return q, k, v

    def projections(self, u: torch.Tensor, phase0: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                    seq_idx: torch.Tensor | None = None, conv_window: torch.Tensor | None = None):
        """in_proj and the per-token scalars: B, C (b, l, R, N), x (b, l, H, P), z, log α, β, γ, phase
        (``valid``, ``seq_idx``, ``phase0`` and ``conv_window`` as for ``scan_inputs``)."""
        b, l, _ = u.shape
        H, P, N, R = self.H, self.P, self.N, self.R
        blk = self.blk
        z, x, B, C, dt_raw, a_raw, lam_raw, theta_raw = torch.split(self.in_proj(u), self.split, dim=-1)
        if self.conv1d is not None:
            x, B, C = self.short_conv(x, B, C, valid, seq_idx, conv_window)
        dt, log_alpha, beta, gamma = scan_coefficients(  # (b, l, H) float32
            dt_raw, a_raw, lam_raw if blk.trapezoid else None, self.dt_bias, self.a_bias, blk.a_floor, valid,
            activation=blk.a_activation, backend=self.io_backend,
        )
        if valid is not None:
            x = torch.where(valid[..., None], x, torch.zeros_like(x))

        phase = None
        if self.standard_rope:
            phase = self.standard_phase(b, l, u.device, phase0, valid, seq_idx)
        elif self.n_angles:
            theta = math.pi * torch.tanh(at_least_fp32(theta_raw))  # (b, l, n_angles)
            phase = cumulative_phase(theta, dt, seq_idx=seq_idx, backend=self.io_backend)  # (b, l, H, n_angles)
            if phase0 is not None:
                if seq_idx is None:
                    phase = phase + phase0[:, None]
                else:
                    first = (seq_idx == seq_idx[:, :1]).to(phase.dtype)  # (b, l): the cache's document
                    phase = phase + phase0[:, None] * first[:, :, None, None]
        return B.view(b, l, R, N), C.view(b, l, R, N), x.view(b, l, H, P), z, log_alpha, beta, gamma, phase

    def short_conv(self, x, B, C, valid=None, seq_idx=None, window=None):
        """Mamba-2's convolution over the channels (x, B, C); ``window`` (a cache's) updated in place. A skipped
        (left-padding) position feeds zeros, as the start of an unpadded sequence does."""
        xbc = torch.cat([x, B, C], dim=-1)
        if valid is not None:
            xbc = torch.where(valid[..., None], xbc, torch.zeros_like(xbc))
        xbc, new_window = causal_conv(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, window, seq_idx)
        if window is not None:
            window.copy_(new_window)
        return torch.split(xbc, [x.shape[-1], B.shape[-1], C.shape[-1]], dim=-1)

    def standard_phase(self, b: int, l: int, device, phase0=None, valid=None, seq_idx=None) -> torch.Tensor:
        """``rope: standard``: φ (b, l, H, n_angles) fp32 = position x the fixed RoPE frequencies, the
        position counting this chunk's (valid) tokens from 1 on top of ``phase0`` (the cache's running φ,
        so prefill + steps equal the full forward). With ``seq_idx`` the position restarts at every
        document and ``phase0`` applies to the first document only."""
        if seq_idx is not None:
            idx = torch.arange(l, device=device).expand(b, l)
            new_doc = torch.ones_like(seq_idx, dtype=torch.bool)
            new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
            start = torch.cummax(torch.where(new_doc, idx, torch.zeros_like(idx)), dim=1).values
            pos = (idx - start + 1).to(torch.float32)
        elif valid is None:
            pos = torch.arange(1, l + 1, device=device, dtype=torch.float32).expand(b, l)
        else:  # a skipped (left-padding) position does not advance the position, as dt = 0 there
            pos = torch.cumsum(valid.to(torch.float32), dim=1)
        ang = position_angles(pos.reshape(-1), 2 * self.n_angles, self.blk.rope_theta).view(b, l, 1, self.n_angles)
        phase = ang.expand(b, l, self.H, self.n_angles)
        if phase0 is None:
            return phase
        if seq_idx is None:
            return phase + phase0[:, None]
        first = (seq_idx == seq_idx[:, :1]).to(phase.dtype)  # (b, l): the cache's document
        return phase + phase0[:, None] * first[:, :, None, None]

    def forward(self, u: torch.Tensor, cache: Mamba3Cache | None = None, seq_idx: torch.Tensor | None = None):
        """``seq_idx`` (b, l) int, nondecreasing per row: packed documents, each seen alone (state,
        phase and the trapezoid's previous-token term reset where it changes)."""
        b, l, _ = u.shape
        H, P = self.H, self.P
        if l == 1:
            seq_idx = None  # one token is one document
        if cache is not None and l == 1 and cache.valid is None and self.fused_step_ok(u, cache):
            return self.fused_step(u, cache)
        valid = cache.valid if cache is not None else None
        state = cache.scan if cache is not None else None
        B, C, x, z, log_alpha, beta, gamma, phase = self.projections(u, cache.phase if cache is not None else None, valid,
                                                                     seq_idx, cache.conv if cache is not None else None)
        if self.backend in ("auto", "triton") and l > 1 and fused_supported(B, x, self.mimo_x, self.blk.chunk_size)[0]:
            # q, k, v built inside the scan kernels: no (b, l, H, R, N) tensor in memory, forward or backward
            y, final = ssm_scan_fused(
                B, C, phase, self.b_norm, self.c_norm, self.b_bias, self.c_bias, x, self.mimo_x, log_alpha, beta, gamma,
                state, eps=self.eps, seq_idx=seq_idx, backend="triton", chunk_size=self.blk.chunk_size,
                last_kv=cache is not None,
            )
        else:
            y, final = ssm_scan(*self.qkv(B, C, x, phase), log_alpha, beta, gamma, state, backend=self.backend,
                                chunk_size=self.blk.chunk_size, seq_idx=seq_idx)
        if cache is not None:  # in place: the cache's buffers stay put (CUDA graphs replay on them)
            for dst, src in zip(cache.scan, final):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            if phase is not None:
                cache.phase.copy_(phase[:, -1])
        return self.out_proj(self.output(y, x, z).reshape(b, l, H * P))

    # ------------------------------------------------------------------ fused decode step (CUDA)
    def fused_step_ok(self, u: torch.Tensor, cache: Mamba3Cache) -> bool:
        """The CuTe fused step runs for seqlen 1 on CUDA sm90+ with nvidia-cutlass-dsl (backend auto/cute)."""
        if not (self.use_fused_step and u.is_cuda and self.backend in ("auto", "cute")):
            return False
        if self.standard_rope or self.conv1d is not None:  # the CuTe step has neither fixed angles nor a convolution
            return False
        if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return self.step.supported(u.device) and all(t.is_contiguous() for t in (*cache.scan, cache.phase))

    def _step_spec(self) -> StepSpec:
        names = ("z", "x", "B", "C", "dt", "a", "lam", "th")
        offs, o = {}, 0
        for name, width in zip(names, self.split):
            offs[name] = o
            o += width
        blk = self.blk
        return StepSpec(
            heads=self.H, headdim=self.P, d_state=self.N, rank=self.R, n_angles=self.n_angles,
            trapezoid=blk.trapezoid, bc_norm=blk.bc_norm, bc_bias=blk.bc_bias, mimo=blk.mode == "mimo",
            out_norm=blk.out_norm == "pre_gate_grouped", eps=float(self.eps), a_floor=float(blk.a_floor),
            d_proj=sum(self.split), offsets=tuple((k, offs[k]) for k in ("z", "x", "B", "dt", "a", "lam", "th")),
            a_activation=blk.a_activation, a_bias=blk.a_bias,
        )

    def fused_step(self, u: torch.Tensor, cache: Mamba3Cache) -> torch.Tensor:
        """One token through in_proj -> CuTe fused step (pre + scan + post) -> out_proj; cache updated in place."""
        b = u.shape[0]
        zx = self.in_proj(u.reshape(b, -1))
        small = {name: getattr(self, name) for name in STEP_PARAMS}
        out = self.step(zx, small, cache.phase, cache.scan)
        return self.out_proj(out).view(b, 1, -1)

    def output(self, y, x, z):
        """D skip, pre-gate grouped norm, SiLU gate and the rank combination: (b, l, H, R, P) -> (b, l, H, P)."""
        return gated_output(
            y, x, z, self.D, self.out_norm, self.mimo_x, self.mimo_z, self.mimo_o, self.eps, backend=self.io_backend
        )


def bench_layer(d_model: int, mode: str, rank: int, d_state: int, dtype=torch.bfloat16, device="cuda",
                headdim: int = 64, expand: int = 2, backend: str = "auto") -> Mamba3:
    """One Mamba-3 layer at the official layer's defaults (headdim 64, expand 2, no output norm), for
    the layer benchmark (``hybridlab bench ssm --layers``, ``kernels.bench.ssm.run_layer_bench``'s
    ``make_layer``), in ``dtype`` on ``device``."""
    blk = Mamba3Block(mode=mode, rank=rank if mode == "mimo" else 1, d_state=d_state, headdim=headdim,
                      expand=expand, out_norm="none")
    with torch.device(device):
        layer = Mamba3(d_model, blk, backend=backend)
    return layer.to(dtype)
