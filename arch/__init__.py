"""hybridlab.arch — the YAML architecture DSL, layers, model assembly, counting, the zoo.

Never imports Ray, DeepSpeed or MLflow (DESIGN.md §1).
"""

from .counting import count_params, count_spec
from .model import HybridLM, ModelCache, sample
from .spec import (
    AttentionBlock,
    Mamba3Block,
    ModelSpec,
    SwiGLUBlock,
    load_model_spec,
    parse_model_spec,
    zoo_names,
)
from .specio import SpecError, Source

__all__ = [
    "AttentionBlock", "HybridLM", "Mamba3Block", "ModelCache", "ModelSpec", "Source", "SpecError", "SwiGLUBlock",
    "count_params", "count_spec", "load_model_spec", "parse_model_spec", "sample", "zoo_names",
]
