"""The Mamba-3 scan's input and output stages, fused: one file per op, each with its reference and its Triton kernels.

    qk_prep(B, C, phase, b_norm, c_norm, b_bias, c_bias, heads, eps) -> (q, k)             qk_prep.py
        B, C (b, l, R, N) shared by the heads -> RMSNorm, + per-head bias (H, R, N),
        rotate dims (i, i + A) by phase (b, l, H, A) -> q, k (b, l, H, R, N)
    scan_coefficients(dt_raw, a_raw, lam_raw, dt_bias, a_bias, a_floor, valid, activation)    scan_coefficients.py
        -> (dt, log_alpha, beta, gamma): the scan's per-(token, head) scalars from the raw
        projections (b, l, H); lam_raw None: Euler; A = -max(f(a_raw [+ a_bias]), a_floor),
        f = heavy_tail (default, the official Mamba-3's) or softplus; a_bias None: no bias
    cumulative_phase(theta, dt, *, seq_idx=None) -> phase                                    cumulative_phase.py
        θ (b, l, A) shared by the heads, dt (b, l, H) -> φ (b, l, H, A) = Σ_{s<=t} θ_s·dt_s (fp32);
        with seq_idx (b, l) (packed documents) the sum restarts at 0 at every document start
    rank_expand(x, mimo_x) -> v                                                              rank_expand.py
        x (b, l, H, P), mimo_x (H, R, P) -> the scan's value v = x ⊙ mimo_x (b, l, H, R, P)
    gated_output(y, x, z, D, norm_w, mimo_x, mimo_z, mimo_o, eps) -> (b, l, H, P)            gated_output.py
        y (b, l, H, R, P) from the scan; x, z (b, l, H, P) ->
        Σ_r mimo_o ⊙ norm(y + D·x⊙mimo_x) ⊙ silu(z ⊙ mimo_z)

``None`` turns a stage off (no norm, no bias, no rotary, SISO). Backends: ``torch`` (the
``*_reference`` functions, the layer's original op chain) and ``triton`` (one kernel each way, fp32
inside, parameter gradients included). ``auto`` picks triton on CUDA (or under TRITON_INTERPRET=1)
for 16/32-bit floats, torch otherwise (float64 gradcheck runs on the reference, which keeps float64
inputs in float64: ``norm_rotary.at_least_fp32``); see ``io_backend``.
Each file reads top to bottom: the reference, the op (checks + dispatch), then the Triton kernels
and their autograd. Each Triton forward and backward is a ``torch.library`` custom op
(``torch.ops.hybridlab.<op>`` / ``<op>_bwd``, fake implementation + registered autograd), so
``torch.compile`` keeps each as one graph node. ``ssm_scan_fused`` (in ``ssm_scan``) runs
qk_prep and rank_expand inside the scan kernels instead.
"""

from ._dispatch import IO_BACKENDS, io_backend
from .cumulative_phase import cumulative_phase, cumulative_phase_reference
from .gated_output import gated_output, gated_output_reference
from .qk_prep import qk_prep, qk_prep_reference
from .rank_expand import rank_expand, rank_expand_reference
from .scan_coefficients import A_ACTIVATIONS, a_magnitude, heavy_tail, scan_coefficients, scan_coefficients_reference

__all__ = [
    "scan_coefficients", "cumulative_phase", "qk_prep", "rank_expand", "gated_output", "io_backend", "IO_BACKENDS",
    "scan_coefficients_reference", "cumulative_phase_reference", "qk_prep_reference", "rank_expand_reference",
    "gated_output_reference", "A_ACTIVATIONS", "heavy_tail", "a_magnitude",
]
