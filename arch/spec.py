"""The architecture spec: typed dataclasses, defaults from the Mamba-3 paper, validation.

A spec is data (YAML); ``load_model_spec`` turns a file, ``zoo:NAME`` or an
inline mapping into a validated :class:`ModelSpec` whose ``layers`` is the
expanded layout. Every error is a ``SpecError`` located at file:line key.path.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from .layout import LayoutError, parse_layout
from .specio import SpecError, Source, apply_overrides, build, did_you_mean, load_yaml_file, positive

ZOO_DIR = Path(__file__).parent / "zoo"
ZOO_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a file stem in ZOO_DIR; ".." is refused as well

# The format of saved specs. Version 1 (before the official heavy-tail A): a mamba3 block without
# `a_activation` / `a_bias` meant softplus with a bias. Version 2 (now): they default to heavy_tail and
# no bias, and every saved spec (ModelSpec.to_dict) writes its version and both keys explicitly.
SPEC_VERSION = 2
# Every key a resolved (saved) mamba3 block carried in version 1: a block holding all of them but no
# `a_activation` is a saved version-1 block, whatever the file says (saved specs had no version yet).
_V1_MAMBA3_KEYS = frozenset((
    "mixer", "mode", "d_state", "headdim", "expand", "rank", "rope", "rope_fraction", "trapezoid", "bc_norm",
    "bc_bias", "out_norm", "dt_min", "dt_max", "a_floor", "a_init_min", "a_init_max", "chunk_size",
))
_V1_A_FORM = {"a_activation": "softplus", "a_bias": True}


@dataclass(kw_only=True)
class Mamba3Block:
    """A Mamba-3 mixer (arXiv 2603.15569): trapezoidal recurrence, complex state via RoPE, MIMO."""

    mixer: Literal["mamba3"] = "mamba3"
    mode: Literal["siso", "mimo"] = "siso"
    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    rank: Optional[int] = None  # 1 for siso; 4 by default for mimo
    # true: complex-valued state via data-dependent RoPE on B/C (phase sum_s theta_s dt_s, theta from the input);
    # "standard": the paper's ablation, data-independent RoPE (fixed frequencies x position); false: real-valued
    rope: Union[bool, Literal["standard"]] = True
    rope_fraction: float = 0.5  # share of d_state that is rotated
    rope_theta: float = 10000.0  # rope: standard only: base of the fixed frequencies, as in a Transformer's RoPE
    trapezoid: bool = True  # exponential-trapezoidal (False: exponential-Euler)
    bc_norm: bool = True
    bc_bias: bool = True
    out_norm: Literal["pre_gate_grouped", "none"] = "none"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # the initial dt is clamped from below at this value
    a_floor: float = 1e-4  # A_t <= -a_floor keeps the decay strictly below 1
    # A_t = -max(f(a_raw [+ a_bias]), a_floor). heavy_tail (the official layer since June 2026):
    # f(x) = 1 + x for x >= 0, 1 / (1 - x) for x < 0, no bias. softplus + a_bias: the form before it.
    a_activation: Literal["heavy_tail", "softplus"] = "heavy_tail"
    a_bias: bool = False  # a learnable per-head bias inside f
    a_init_min: Optional[float] = None  # with a_bias: |A| starts uniform in [a_init_min, a_init_max]
    a_init_max: Optional[float] = None  # (None: 1 and 16, Mamba-2's range)
    chunk_size: Optional[int] = None  # None: the backend's default
    # Mamba-2's short causal depthwise convolution (+ SiLU) over x, B, C before the scan, of this width
    # (Mamba-2: 4); 0, Mamba-3's design, has none
    d_conv: int = 0

    def __post_init__(self):
        if self.rank is None:  # a block built in code gets the same default as one read from a spec
            self.rank = 4 if self.mode == "mimo" else 1

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def heads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.headdim

    @property
    def rope_dims(self) -> int:
        """How many of d_state's dims are rotated (even; 0 without rope)."""
        if not self.rope:
            return 0
        return int(self.d_state * self.rope_fraction) // 2 * 2


@dataclass(kw_only=True)
class AttentionBlock:
    """Causal multi-head attention with GQA and RoPE."""

    mixer: Literal["attention"] = "attention"
    heads: int
    kv_heads: Optional[int] = None  # None: = heads (MHA)
    head_dim: Optional[int] = None  # None: d_model // heads
    rope_theta: float = 10000.0
    rope_dim: Optional[int] = None  # dims of each head that RoPE rotates (the first ones); None: all, 0: no RoPE
    rope_interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + rope_dim/2)
    qkv_bias: bool = False  # biases on the q/k/v projections
    out_bias: bool = False  # a bias on the output projection
    softmax_scale: Optional[float] = None  # None: 1 / sqrt(head_dim)

    def resolved_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.heads

    def resolved_rope_dim(self, d_model: int) -> int:
        return self.resolved_head_dim(d_model) if self.rope_dim is None else self.rope_dim


@dataclass(kw_only=True)
class SwiGLUBlock:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    mixer: Literal["swiglu"] = "swiglu"
    hidden: Optional[int] = None  # None: 8/3 d_model rounded up to a multiple of 64

    def resolved_hidden(self, d_model: int) -> int:
        return self.hidden or 64 * math.ceil(8 * d_model / 3 / 64)


Block = Union[Mamba3Block, AttentionBlock, SwiGLUBlock]
MIXERS = {"mamba3": Mamba3Block, "attention": AttentionBlock, "swiglu": SwiGLUBlock}


@dataclass
class ModelSpec:
    name: str
    d_model: int
    vocab_size: int
    blocks: dict
    layout: Union[str, list]
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    residual_in_fp32: bool = False  # keep the residual stream in fp32 under bf16/fp16 weights (official mamba_ssm)
    description: str = ""
    # Filled by validation: the expanded layout and its blocks.
    layers: list = field(default_factory=list, init=False)

    @property
    def layout_str(self) -> str:
        return self.layout if isinstance(self.layout, str) else " ".join(self.layout)

    def layer_blocks(self) -> list[Block]:
        return [self.blocks[name] for name in self.layers]

    def to_dict(self) -> dict:
        """The spec as plain data, every choice resolved (round-trips through ``load_model_spec``)."""
        d = {"spec_version": SPEC_VERSION, **dataclasses.asdict(self)}
        d.pop("layers")
        return d


# ---------------------------------------------------------------- loading


def resolve_ref(ref: str) -> Path:
    """``zoo:NAME`` -> the zoo file; a model folder -> its ``model.yaml``; anything else is a path."""
    if ref.startswith("zoo:"):
        name = ref[4:]
        if not ZOO_NAME.fullmatch(name) or ".." in name:  # a plain name: never a path out of the zoo folder
            raise SpecError(f"bad zoo name {name!r}: zoo names are plain names (letters, digits, '-', '_', '.'; "
                            f"no '/' and no '..'); `hybridlab zoo` lists them", ref)
        path = ZOO_DIR / f"{name}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in ZOO_DIR.glob("*.yaml"))
            raise SpecError(f"no zoo spec {name!r}{did_you_mean(name, names)}; `hybridlab zoo` lists them", ref)
        return path
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "model.yaml").is_file():  # a model folder (hybridlab.arch.pretrained)
        return path / "model.yaml"
    return path


def zoo_names() -> list[str]:
    return sorted(p.stem for p in ZOO_DIR.glob("*.yaml"))


def load_model_spec(ref, overrides=(), src: Source | None = None, path: tuple = ()) -> ModelSpec:
    """Load and validate a model spec from ``zoo:NAME``, a YAML path, or an inline mapping.

    For an inline mapping taken from a larger file (a job spec), pass that
    file's ``src`` and the mapping's ``path`` so errors point into it.
    """
    if isinstance(ref, dict):
        data, src = ref, src or Source("<inline>")
    elif isinstance(ref, (str, Path)):
        data, src = load_yaml_file(resolve_ref(str(ref)))
        path = ()
    else:
        raise (src or Source()).error(path, f"expected a zoo name, a file path or a mapping, got {ref!r}")
    if not isinstance(data, dict):
        raise src.error(path, "a model spec must be a mapping")
    data = apply_overrides(_deepcopy(data), overrides, src, path)
    return parse_model_spec(data, src, path)


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def parse_model_spec(data: dict, src: Source, path: tuple = ()) -> ModelSpec:
    data = dict(data)
    version = data.pop("spec_version", None)
    if version is not None and (isinstance(version, bool) or version not in range(1, SPEC_VERSION + 1)):
        raise src.error(path + ("spec_version",), f"{version!r} is not a spec format this version reads (1..{SPEC_VERSION})")
    blocks_raw = _upgrade_blocks(data.get("blocks"), version)
    data["blocks"] = {}
    spec = build(ModelSpec, data, src, path)
    if not isinstance(blocks_raw, dict) or not blocks_raw:
        raise src.error(path + ("blocks",), "expected a mapping of block names to block templates")
    spec.blocks = {str(name): _build_block(tpl, src, path + ("blocks", name)) for name, tpl in blocks_raw.items()}
    spec.layers = _expand_layout(spec.layout, spec.blocks, src, path + ("layout",))
    validate(spec, src, path)
    return spec


def _upgrade_blocks(blocks, version):
    """Version-1 mamba3 blocks get the A form they were trained with (softplus + a bias), explicitly.

    ``version`` None (no ``spec_version`` key: a spec written by hand, or saved before versions
    existed): only blocks that carry every key a saved version-1 block had are version 1.
    """
    if not isinstance(blocks, dict) or version == SPEC_VERSION:
        return blocks
    out = {}
    for name, tpl in blocks.items():
        if isinstance(tpl, dict) and tpl.get("mixer") == "mamba3" and "a_activation" not in tpl and "a_bias" not in tpl:
            if version == 1 or _V1_MAMBA3_KEYS <= tpl.keys():
                tpl = {**tpl, **_V1_A_FORM}
        out[name] = tpl
    return out


def _build_block(tpl, src: Source, path: tuple) -> Block:
    if not isinstance(tpl, dict):
        raise src.error(path, "a block template must be a mapping with a 'mixer' key")
    mixer = tpl.get("mixer")
    if mixer is None:
        raise src.error(path, f"missing required key 'mixer' (one of {', '.join(MIXERS)})")
    if mixer not in MIXERS:
        raise src.error(path + ("mixer",), f"unknown mixer {mixer!r}{did_you_mean(mixer, MIXERS)}; known: {', '.join(MIXERS)}")
    return build(MIXERS[mixer], tpl, src, path)


def _expand_layout(layout, blocks: dict, src: Source, path: tuple) -> list[str]:
    try:
        if isinstance(layout, str):
            names = parse_layout(layout)
        else:
            names = []
            for i, item in enumerate(layout):
                if not isinstance(item, str):
                    raise src.error(path + (i,), f"expected a block name, got {item!r}")
                names.extend(parse_layout(item))
    except LayoutError as e:
        raise src.error(path, f"layout syntax error: {e}") from None
    if not names:
        raise src.error(path, "the layout is empty")
    for name in names:
        if name not in blocks:
            raise src.error(path, f"block {name!r} is not defined under blocks{did_you_mean(name, blocks)}; defined: {', '.join(blocks)}")
    return names


def validate(spec: ModelSpec, src: Source, path: tuple = ()) -> None:
    """Cross-field checks: positive sizes, divisibility, mode/rank consistency."""
    for key in ("d_model", "vocab_size"):
        positive(src, path + (key,), getattr(spec, key))
    positive(src, path + ("norm_eps",), spec.norm_eps)
    positive(src, path + ("init_std",), spec.init_std)
    d = spec.d_model
    for name, blk in spec.blocks.items():
        bp = path + ("blocks", name)
        if isinstance(blk, Mamba3Block):
            _validate_mamba3(blk, d, src, bp)
        elif isinstance(blk, AttentionBlock):
            _validate_attention(blk, d, src, bp)
        else:
            positive(src, bp + ("hidden",), blk.hidden)


def _validate_mamba3(b: Mamba3Block, d: int, src: Source, path: tuple) -> None:
    for key in ("d_state", "headdim", "expand", "dt_min", "dt_max", "dt_init_floor", "a_floor", "a_init_min",
                "a_init_max", "chunk_size"):
        positive(src, path + (key,), getattr(b, key))
    if not b.a_bias:
        for key in ("a_init_min", "a_init_max"):
            if getattr(b, key) is not None:
                raise src.error(path + (key,), f"sets the init of the per-head A bias, which needs a_bias: true "
                                               f"(the form before June 2026: a_activation: softplus, a_bias: true)")
    else:
        b.a_init_min = 1.0 if b.a_init_min is None else b.a_init_min
        b.a_init_max = 16.0 if b.a_init_max is None else b.a_init_max
    if b.rank is None:
        b.rank = 4 if b.mode == "mimo" else 1
    if b.rank < 1:
        raise src.error(path + ("rank",), f"MIMO rank must be at least 1, got {b.rank}")
    if b.mode == "siso" and b.rank != 1:
        raise src.error(path + ("rank",), f"rank {b.rank} needs mode: mimo (siso has rank 1)")
    if b.d_inner(d) % b.headdim:
        raise src.error(path + ("headdim",), f"{b.headdim} does not divide d_inner = expand * d_model = {b.d_inner(d)}")
    positive(src, path + ("rope_theta",), b.rope_theta)
    if not 0.0 <= b.rope_fraction <= 1.0:
        raise src.error(path + ("rope_fraction",), f"must be between 0 and 1, got {b.rope_fraction}")
    if b.rope and b.rope_dims == 0:
        raise src.error(path + ("rope_fraction",), f"{b.rope_fraction} of d_state {b.d_state} rotates no dimension pair; set rope: false or raise it")
    if b.a_bias and b.a_init_min > b.a_init_max:
        raise src.error(path + ("a_init_min",), f"{b.a_init_min} is above a_init_max {b.a_init_max}")
    if b.dt_min > b.dt_max:
        raise src.error(path + ("dt_min",), f"{b.dt_min} is above dt_max {b.dt_max}")
    if b.d_conv < 0:
        raise src.error(path + ("d_conv",), f"must be 0 (no convolution) or the convolution's width, got {b.d_conv}")


def _validate_attention(b: AttentionBlock, d: int, src: Source, path: tuple) -> None:
    positive(src, path + ("heads",), b.heads)
    positive(src, path + ("kv_heads",), b.kv_heads)
    positive(src, path + ("head_dim",), b.head_dim)
    positive(src, path + ("rope_theta",), b.rope_theta)
    positive(src, path + ("softmax_scale",), b.softmax_scale)
    if b.head_dim is None and d % b.heads:
        raise src.error(path + ("heads",), f"{b.heads} does not divide d_model {d}")
    if b.heads % b.resolved_kv_heads():
        raise src.error(path + ("kv_heads",), f"{b.kv_heads} does not divide heads {b.heads}")
    hd, rd = b.resolved_head_dim(d), b.resolved_rope_dim(d)
    if b.rope_dim is not None and not 0 <= b.rope_dim <= hd:
        raise src.error(path + ("rope_dim",), f"{b.rope_dim} is not between 0 (no RoPE) and the head dim {hd}")
    if rd % 2:
        key = "rope_dim" if b.rope_dim is not None else "head_dim"
        raise src.error(path + (key,), f"RoPE rotates pairs: {rd} rotated dims per head must be even")
