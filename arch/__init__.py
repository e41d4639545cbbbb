"""hybridlab.arch — the YAML architecture DSL, layers, model assembly, counting, the zoo.

Never imports Ray, DeepSpeed or MLflow (DESIGN.md §1).
"""

from .counting import count_params, count_spec
from .layers.mamba3 import bench_layer
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
from .pretrained import ModelFolderError, is_model_dir, load_pretrained, save_pretrained
from .specio import SpecError, Source

__all__ = [
    "AttentionBlock", "HybridLM", "Mamba3Block", "ModelCache", "ModelFolderError", "ModelSpec", "Source", "SpecError",
    "SwiGLUBlock", "bench_layer", "count_params", "count_spec", "is_model_dir", "load_model_spec", "load_pretrained", "parse_model_spec",
    "sample", "save_pretrained", "zoo_names",
]
