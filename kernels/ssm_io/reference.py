"""The torch references of the ssm_io stages under their former module path.

Each reference lives in its op's file (``qk_prep.py``, ``scan_coefficients.py``, ...); this module
only re-exports them so that ``hybridlab.kernels.ssm_io.reference.<name>`` keeps working.
"""

from .cumulative_phase import cumulative_phase_reference
from .gated_output import gated_output_reference
from .qk_prep import qk_prep_reference
from .rank_expand import rank_expand_reference
from .scan_coefficients import A_ACTIVATIONS, a_magnitude, heavy_tail, scan_coefficients_reference

__all__ = [
    "A_ACTIVATIONS", "a_magnitude", "heavy_tail", "scan_coefficients_reference", "cumulative_phase_reference",
    "qk_prep_reference", "rank_expand_reference", "gated_output_reference",
]
