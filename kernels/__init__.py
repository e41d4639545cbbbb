"""hybridlab.kernels — op contracts, PyTorch references, Triton / CuTe DSL kernels, dispatch.

Imports nothing else of hybridlab (DESIGN.md §1).
"""

from .ssm_scan import BACKENDS, ScanState, default_chunk_size, select_backend, ssm_scan, ssm_scan_fused

__all__ = ["ssm_scan", "ssm_scan_fused", "ScanState", "select_backend", "default_chunk_size", "BACKENDS"]
