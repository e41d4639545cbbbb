"""Official mamba_ssm checkpoints (state-spaces/mamba ``MambaLMHeadModel``) in and out of hybridlab.

An official checkpoint folder holds ``config.json`` (the ``MambaConfig`` fields),
the weights as ``pytorch_model.bin`` or ``model.safetensors`` (or shards with an
``*.index.json``) and tokenizer files. ``import_checkpoint`` turns one into a
hybridlab model folder (``arch.pretrained``); ``export_checkpoint`` goes back.
The function is the same on both sides, weight for weight:

* each official layer (``Block``: norm -> mixer [-> norm2 -> GatedMLP]) is one
  or two hybridlab sub-blocks (pre-norm residuals: the same sum); RMSNorm eps is
  1e-5 everywhere in the official model;
* ``Mamba3``: in_proj rows [z, x, B, C, dt, A, trap, angles] in the same order;
  A through the heavy tail with no bias (hybridlab's default); the rotary pairs
  of d_state differ — official SISO rotates (2i, 2i+1), official MIMO (i, N/2+i),
  hybridlab (i, i + n_angles) — so the B/C rows of in_proj, the B/C norm
  weights and the B/C biases are permuted along d_state, exactly;
* ``MHA``: in_proj rows [q, k, v] -> q_proj, kv_proj (with biases), out_proj ->
  o_proj; rotary over the first ``rotary_emb_dim`` dims, half-split or
  interleaved, GQA by ``num_heads_kv``, ``softmax_scale``;
* ``GatedMLP``: fc1 rows [value, gate] -> SwiGLU gate_up rows [gate, value];
  the hidden width rounded up to a multiple of 128 as the official does.

Whatever the config holds that hybridlab cannot express (another ``layer``,
``ngroups`` != 1, ``rms_norm`` false, ``mlp_dim`` or ``d_conv`` > 0, ``causal``
false, unknown keys) is refused with one line naming the key and value, and so
is every hybridlab option without an official form on export. Kernel-only
choices of the official code (chunk_size, fuse_pregate_headwise_norm,
fused_add_norm, pad_vocab_size_multiple) are kept in the model folder
(``mamba_ssm_config.json``) so that an export writes the config it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..pretrained import (MODEL_WEIGHTS, ModelFolderError, check_names_and_shapes, new_folder, read_safetensors,
                          read_spec, save_pretrained, write_safetensors)
from ..spec import AttentionBlock, Mamba3Block, ModelSpec, SwiGLUBlock, parse_model_spec
from ..specio import SpecError, Source

__all__ = [
    "CONFIG", "PROVENANCE", "import_checkpoint", "export_checkpoint", "export_model_folder", "read_official",
    "spec_from_config", "config_from_spec", "to_hybridlab", "to_official", "rotary_permutation", "origin_files",
]

CONFIG = "config.json"
PROVENANCE = "mamba_ssm_config.json"  # the official config.json a model folder was imported from
BIN, SAFETENSORS = "pytorch_model.bin", "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "generation_config.json")

# MambaConfig's fields and defaults (mamba_ssm/models/config_mamba.py), in its order
CONFIG_DEFAULTS = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}, "attn_layer_idx": [],
    "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
# Mamba3.__init__'s options and defaults (mamba_ssm/modules/mamba3.py); "layer" is create_block's (default Mamba1)
MAMBA3_DEFAULTS = {
    "layer": "Mamba1", "d_state": 128, "expand": 2, "headdim": 64, "ngroups": 1, "rope_fraction": 0.5,
    "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "A_floor": 1e-4, "is_outproj_norm": False,
    "is_mimo": False, "mimo_rank": 4, "fuse_pregate_headwise_norm": True, "chunk_size": 64, "dropout": 0.0,
}
# MHA.__init__'s options and defaults (mamba_ssm/modules/mha.py); num_heads has none
MHA_DEFAULTS = {
    "num_heads": None, "num_heads_kv": None, "head_dim": None, "mlp_dim": 0, "qkv_proj_bias": True,
    "out_proj_bias": True, "softmax_scale": None, "causal": False, "d_conv": 0, "rotary_emb_dim": 0,
    "rotary_emb_base": 10000.0, "rotary_emb_interleaved": False,
}
NORM_EPS = 1e-5  # MixerModel's norm_epsilon (never read from the config), and every Mamba3 norm's eps
MLP_MULTIPLE = 128  # GatedMLP rounds hidden_features up to a multiple of this
M3, ATTN, MLP = "m3", "attn", "mlp"  # block names in imported specs


# ============================================================================ reading the official folder


@dataclasses.dataclass
class OfficialCheckpoint:
    folder: Path
    config: dict  # config.json as written
    state: dict  # official parameter names -> tensors (stored dtypes)
    weights: Path  # the file (or index) the weights came from
    tokenizer_files: list


def read_config(folder) -> tuple[dict, Path]:
    f = Path(folder).expanduser()
    if not f.is_dir():
        raise ModelFolderError(f, "no such checkpoint folder" if not f.exists() else "not a folder (expected an official "
                                                                                  "checkpoint folder with config.json)")
    path = f / CONFIG
    if not path.is_file():
        raise ModelFolderError(f, f"no {CONFIG}: not an official mamba_ssm checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFolderError(path, f"not readable JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(config, dict):
        raise ModelFolderError(path, "expected a JSON object of MambaConfig fields")
    return config, path


def _read_bin(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... for broken files
        raise ModelFolderError(path, f"not a readable PyTorch weights file (truncated or corrupt?): "
                                     f"{' '.join(str(e).split())[:160]}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelFolderError(path, "does not hold a state dict (parameter names mapped to tensors)")
    return obj


def _read_weights_file(path: Path) -> dict:
    return read_safetensors(path) if path.name.endswith(".safetensors") else _read_bin(path)


def read_state(folder: Path) -> tuple[dict, Path]:
    """The official state dict: model.safetensors, else pytorch_model.bin, else shards listed by an index."""
    for name in (SAFETENSORS, BIN):
        if (folder / name).is_file():
            return _read_weights_file(folder / name), folder / name
    for name in (SAFETENSORS + ".index.json", BIN + ".index.json"):
        index = folder / name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ModelFolderError(index, "not a readable weights index (expected a weight_map)") from None
            state = {}
            for fname in files:
                state.update(_read_weights_file(folder / fname))
            return state, index
    raise ModelFolderError(folder, f"no weights ({BIN} or {SAFETENSORS})")


def read_official(folder) -> OfficialCheckpoint:
    config, _ = read_config(folder)
    f = Path(folder).expanduser()
    state, where = read_state(f)
    toks = [f / n for n in TOKENIZER_FILES if (f / n).is_file()]
    return OfficialCheckpoint(f, config, state, where, toks)


# ============================================================================ config <-> spec


class _Reader:
    """Typed reads of one config section, with the official defaults; errors name file, key and value."""

    def __init__(self, data: dict, defaults: dict, where, prefix: tuple = ()):
        self.data, self.defaults, self.where, self.prefix = data, defaults, str(where), prefix

    def error(self, key, message: str) -> SpecError:
        return SpecError(message, self.where, None, self.prefix + ((key,) if key is not None else ()))

    def unknown(self) -> None:
        for k in self.data:
            if k not in self.defaults:
                raise self.error(k, f"{self.data[k]!r}: unknown option{_section(self.prefix)}; hybridlab cannot say "
                                    f"what it computes")

    def raw(self, key):
        return self.data.get(key, self.defaults[key])

    def int(self, key, minimum: int = 1, optional: bool = False):
        v = self.raw(key)
        if optional and v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.error(key, f"{v!r}: expected an integer >= {minimum}")
        return v

    def num(self, key, optional: bool = False):
        v = self.raw(key)
        if optional and v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise self.error(key, f"{v!r}: expected a positive number")
        return float(v)

    def bool(self, key):
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.error(key, f"{v!r}: expected true or false")
        return v

    def refuse_unless(self, key, ok: bool, why: str):
        if not ok:
            raise self.error(key, f"{self.raw(key)!r} has no hybridlab form ({why})")


def _section(prefix: tuple) -> str:
    return {(): " of MambaConfig", ("ssm_cfg",): " of Mamba3", ("attn_cfg",): " of MHA"}.get(prefix, "")


def official_layers(config: dict, where) -> list[str]:
    """Per official layer: "m3" or "attn" (attn_layer_idx)."""
    r = _Reader(config, CONFIG_DEFAULTS, where)
    n = r.int("n_layer")
    idx = r.raw("attn_layer_idx")
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise r.error("attn_layer_idx", f"{idx!r}: expected a list of layer indices")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise r.error("attn_layer_idx", f"{bad[0]} is not a layer index (n_layer is {n})")
    return [ATTN if i in idx else M3 for i in range(n)]


def _mlp_hidden(d_intermediate: int) -> int:
    return -(-d_intermediate // MLP_MULTIPLE) * MLP_MULTIPLE


def _padded_vocab(vocab: int, multiple: int) -> int:
    return vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple


def spec_from_config(config: dict, name: str, where) -> ModelSpec:
    """The hybridlab spec computing what ``MambaLMHeadModel(MambaConfig(**config))`` computes."""
    top = _Reader(config, CONFIG_DEFAULTS, where)
    top.unknown()
    d_model, d_int = top.int("d_model"), top.int("d_intermediate", minimum=0)
    vocab = _padded_vocab(top.int("vocab_size"), top.int("pad_vocab_size_multiple"))
    top.refuse_unless("rms_norm", top.bool("rms_norm"), "LayerNorm blocks; hybridlab normalizes with RMSNorm")
    top.bool("fused_add_norm")  # a kernel choice: the same function either way
    layers = official_layers(config, where)
    blocks: dict[str, dict] = {}
    if M3 in layers:
        blocks[M3] = _mamba3_block(config, d_model, where)
    if ATTN in layers:
        blocks[ATTN] = _attention_block(config, d_model, where)
    if d_int:
        blocks[MLP] = {"mixer": "swiglu", "hidden": _mlp_hidden(d_int)}
    data = {
        "spec_version": 2, "name": name, "d_model": d_model, "vocab_size": vocab, "blocks": blocks,
        "layout": _layout_text(layers, bool(d_int)), "tie_embeddings": top.bool("tie_embeddings"), "norm_eps": NORM_EPS,
        "residual_in_fp32": top.bool("residual_in_fp32"),
        "description": f"imported from an official mamba_ssm checkpoint ({Path(str(where)).parent.name})",
    }
    return parse_model_spec(data, Source(str(where)))


def _mamba3_block(config: dict, d_model: int, where) -> dict:
    cfg = config.get("ssm_cfg", {})
    if not isinstance(cfg, dict):
        raise SpecError(f"{cfg!r}: expected a mapping of Mamba3 options", str(where), None, ("ssm_cfg",))
    r = _Reader(cfg, MAMBA3_DEFAULTS, where, ("ssm_cfg",))
    r.refuse_unless("layer", r.raw("layer") == "Mamba3", "only Mamba3 layers import; Mamba1 is create_block's default")
    r.unknown()
    expand = r.raw("expand")
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0 or float(expand) != int(expand):
        raise r.error("expand", f"{expand!r}: hybridlab's expand is a positive integer")
    headdim, d_state = r.int("headdim"), r.int("d_state")
    if int(expand) * d_model % headdim:
        raise r.error("headdim", f"{headdim} does not divide d_inner = expand * d_model = {int(expand) * d_model}")
    r.refuse_unless("ngroups", r.int("ngroups") == 1, "hybridlab shares one B/C group across all heads")
    frac = r.num("rope_fraction")
    r.refuse_unless("rope_fraction", frac in (0.5, 1.0), "the official layer takes 0.5 or 1.0")
    mimo = r.bool("is_mimo")
    rank = r.int("mimo_rank") if mimo else 1
    r.bool("fuse_pregate_headwise_norm")  # a kernel choice
    if isinstance(r.raw("dropout"), bool) or not isinstance(r.raw("dropout"), (int, float)):
        raise r.error("dropout", f"{r.raw('dropout')!r}: expected a number (absorbed, unused by the official layer)")
    chunk = r.int("chunk_size")
    from hybridlab.kernels.ssm_scan import triton_supports  # the chunk is a kernel choice: keep it where ours take it

    chunk = chunk if triton_supports(headdim, d_state, rank, chunk)[0] else None
    return {
        "mixer": "mamba3", "mode": "mimo" if mimo else "siso", "rank": rank, "d_state": d_state, "headdim": headdim,
        "expand": int(expand), "rope": True, "rope_fraction": frac, "trapezoid": True, "bc_norm": True, "bc_bias": True,
        "out_norm": "pre_gate_grouped" if r.bool("is_outproj_norm") else "none",
        "dt_min": r.num("dt_min"), "dt_max": r.num("dt_max"), "dt_init_floor": r.num("dt_init_floor"),
        "a_floor": r.num("A_floor"), "a_activation": "heavy_tail", "a_bias": False, "chunk_size": chunk,
    }


def _attention_block(config: dict, d_model: int, where) -> dict:
    cfg = config.get("attn_cfg", {})
    if not isinstance(cfg, dict):
        raise SpecError(f"{cfg!r}: expected a mapping of MHA options", str(where), None, ("attn_cfg",))
    r = _Reader(cfg, MHA_DEFAULTS, where, ("attn_cfg",))
    r.unknown()
    if "num_heads" not in cfg:
        raise r.error(None, "missing num_heads (MHA has no default for it)")
    heads = r.int("num_heads")
    kv = r.int("num_heads_kv", optional=True)
    hd = r.int("head_dim", optional=True)
    if hd is None and d_model % heads:
        raise r.error("num_heads", f"{heads} does not divide d_model {d_model} (and head_dim is not given)")
    r.refuse_unless("causal", r.bool("causal"), "hybridlab's attention is causal; set causal: true")
    r.refuse_unless("mlp_dim", r.int("mlp_dim", minimum=0) == 0, "the MLP branch fused into MHA's projections")
    r.refuse_unless("d_conv", r.int("d_conv", minimum=0) == 0, "a short convolution on q/k/v")
    rot = r.int("rotary_emb_dim", minimum=0)
    return {
        "mixer": "attention", "heads": heads, "kv_heads": kv, "head_dim": hd, "rope_theta": r.num("rotary_emb_base"),
        "rope_dim": rot, "rope_interleaved": r.bool("rotary_emb_interleaved"), "qkv_bias": r.bool("qkv_proj_bias"),
        "out_bias": r.bool("out_proj_bias"), "softmax_scale": r.num("softmax_scale", optional=True),
    }


def _layout_text(layers: list[str], mlp: bool) -> str:
    """Official layers as a layout, runs of equal layers folded: ``(m3 mlp) * 24``."""
    groups = [f"{kind} {MLP}" if mlp else kind for kind in layers]
    out, i = [], 0
    while i < len(groups):
        j = i
        while j < len(groups) and groups[j] == groups[i]:
            j += 1
        g = groups[i] if " " not in groups[i] or j - i == 1 else f"({groups[i]})"
        out.append(g if j - i == 1 else f"{g} * {j - i}")
        i = j
    return " ".join(out)


def _no_official_form(spec_file: str, path: tuple, message: str) -> SpecError:
    return SpecError(f"{message}: no official mamba_ssm form", spec_file, None, path)


def _official_structure(spec: ModelSpec, where: str):
    """(layer kinds, the Mamba3Block, the AttentionBlock, the MLP hidden width or 0), or an error."""
    names = spec.layers
    blocks = [spec.blocks[n] for n in names]
    mlp_names = [n for n in names if isinstance(spec.blocks[n], SwiGLUBlock)]
    with_mlp = bool(mlp_names)
    kinds, m3, attn, hidden = [], None, None, 0
    m3_name = attn_name = mlp_name = None
    i = 0
    while i < len(blocks):
        name, b = names[i], blocks[i]
        if isinstance(b, SwiGLUBlock):
            raise _no_official_form(where, ("layout",), f"sub-block {i} ({name}) is a SwiGLU that does not follow a mixer "
                                                          f"(an official layer is a mixer, then optionally one GatedMLP)")
        if isinstance(b, Mamba3Block):
            if m3 is None:
                m3, m3_name = b, name
            elif _m3_key(b) != _m3_key(m3):
                raise _no_official_form(where, ("blocks", name), f"differs from blocks.{m3_name} (the official model has "
                                                                 f"one ssm_cfg for all its Mamba-3 layers)")
            kinds.append(M3)
        else:
            if attn is None:
                attn, attn_name = b, name
            elif dataclasses.asdict(b) != dataclasses.asdict(attn):
                raise _no_official_form(where, ("blocks", name), f"differs from blocks.{attn_name} (the official model "
                                                                 f"has one attn_cfg for all its attention layers)")
            kinds.append(ATTN)
        i += 1
        if with_mlp:
            nxt = blocks[i] if i < len(blocks) else None
            if not isinstance(nxt, SwiGLUBlock):
                raise _no_official_form(where, ("layout",), f"mixer {name} (sub-block {i - 1}) is not followed by a "
                                                            f"SwiGLU while others are (official layers all have one or none)")
            h = nxt.resolved_hidden(spec.d_model)
            if mlp_name is None:
                hidden, mlp_name = h, names[i]
            elif h != hidden:
                raise _no_official_form(where, ("blocks", names[i], "hidden"), f"{h} differs from blocks.{mlp_name}'s "
                                                                               f"{hidden} (one d_intermediate)")
            i += 1
    if hidden and hidden % MLP_MULTIPLE:
        raise _no_official_form(where, ("blocks", mlp_name, "hidden"), f"{hidden} (GatedMLP widths are multiples of "
                                                                       f"{MLP_MULTIPLE})")
    return kinds, (m3, m3_name), (attn, attn_name), hidden


def _m3_key(b: Mamba3Block) -> dict:
    d = dataclasses.asdict(b)
    d.pop("chunk_size")  # a kernel choice
    return d


def _check_m3_official(b: Mamba3Block, name: str, where: str) -> None:
    p = ("blocks", name)
    if b.mode == "siso" and b.rope and (b.rope_dims // 2) % 2:
        raise _no_official_form(where, p + ("d_state",), f"{b.d_state} with rope_fraction {b.rope_fraction} gives "
                                                         f"{b.rope_dims // 2} rotary angles (the official SISO kernels "
                                                         f"take an even number)")
    for key, ok, value in (
        ("a_activation", b.a_activation == "heavy_tail", b.a_activation),
        ("a_bias", not b.a_bias, b.a_bias),
        ("trapezoid", b.trapezoid, b.trapezoid),
        ("bc_norm", b.bc_norm, b.bc_norm),
        ("bc_bias", b.bc_bias, b.bc_bias),
        ("rope", b.rope is True, b.rope),  # "standard" (fixed angles) has no official form either
        ("rope_fraction", b.rope_fraction in (0.5, 1.0), b.rope_fraction),
        ("d_conv", b.d_conv == 0, b.d_conv),
    ):
        if not ok:
            raise _no_official_form(where, p + (key,), f"{value!r}")


def config_from_spec(spec: ModelSpec, provenance: Optional[dict] = None, where: str = "<spec>") -> dict:
    """The ``MambaConfig`` of a spec whose layers the official code has (else a one-line SpecError).

    ``provenance`` (the config a model was imported from) supplies the official kernel choices;
    when it describes this same model it is returned as it was.
    """
    if spec.norm_eps != NORM_EPS:
        raise _no_official_form(where, ("norm_eps",), f"{spec.norm_eps!r} (the official norms use {NORM_EPS})")
    kinds, (m3, m3_name), (attn, attn_name), hidden = _official_structure(spec, where)
    prov = provenance if isinstance(provenance, dict) else {}
    prov_ssm = prov.get("ssm_cfg") if isinstance(prov.get("ssm_cfg"), dict) else {}
    vocab, multiple = spec.vocab_size, 8 if spec.vocab_size % 8 == 0 else 1
    pv, pm = prov.get("vocab_size"), prov.get("pad_vocab_size_multiple", CONFIG_DEFAULTS["pad_vocab_size_multiple"])
    if isinstance(pv, int) and isinstance(pm, int) and pm > 0 and _padded_vocab(pv, pm) == spec.vocab_size:
        vocab, multiple = pv, pm
    ssm_cfg: dict[str, Any] = {}
    if m3 is not None:
        _check_m3_official(m3, m3_name, where)
        ssm_cfg = {
            "layer": "Mamba3", "d_state": m3.d_state, "expand": m3.expand, "headdim": m3.headdim, "ngroups": 1,
            "rope_fraction": m3.rope_fraction, "dt_min": m3.dt_min, "dt_max": m3.dt_max,
            "dt_init_floor": m3.dt_init_floor, "A_floor": m3.a_floor, "is_outproj_norm": m3.out_norm != "none",
            "is_mimo": m3.mode == "mimo", "mimo_rank": m3.rank if m3.mode == "mimo" else MAMBA3_DEFAULTS["mimo_rank"],
            "chunk_size": prov_ssm.get("chunk_size") or m3.chunk_size or 64 // m3.rank,
        }
        if "fuse_pregate_headwise_norm" in prov_ssm:
            ssm_cfg["fuse_pregate_headwise_norm"] = prov_ssm["fuse_pregate_headwise_norm"]
    attn_cfg: dict[str, Any] = {}
    if attn is not None:
        attn_cfg = {
            "num_heads": attn.heads, "num_heads_kv": attn.kv_heads, "head_dim": attn.head_dim,
            "qkv_proj_bias": attn.qkv_bias, "out_proj_bias": attn.out_bias, "softmax_scale": attn.softmax_scale,
            "causal": True, "rotary_emb_dim": attn.resolved_rope_dim(spec.d_model), "rotary_emb_base": attn.rope_theta,
            "rotary_emb_interleaved": attn.rope_interleaved,
        }
    config = {
        "d_model": spec.d_model, "d_intermediate": hidden, "n_layer": len(kinds), "vocab_size": vocab,
        "ssm_cfg": ssm_cfg, "attn_layer_idx": [i for i, k in enumerate(kinds) if k == ATTN], "attn_cfg": attn_cfg,
        "rms_norm": True, "residual_in_fp32": spec.residual_in_fp32,
        "fused_add_norm": prov.get("fused_add_norm", CONFIG_DEFAULTS["fused_add_norm"]),
        "pad_vocab_size_multiple": multiple, "tie_embeddings": spec.tie_embeddings,
    }
    if prov and _same_model(prov, config, where):
        return json.loads(json.dumps(prov))  # the imported config, every key as it was
    return config


def _same_model(prov: dict, config: dict, where: str) -> bool:
    """Whether two configs build the same model (the same spec, up to naming and kernel choices)."""
    try:
        a, b = spec_from_config(prov, "x", where), spec_from_config(config, "x", where)
    except SpecError:
        return False
    strip = lambda s: {k: v for k, v in s.to_dict().items() if k not in ("name", "description")}  # noqa: E731
    return strip(a) == strip(b) and prov.get("fused_add_norm", True) == config["fused_add_norm"]


# ============================================================================ weights


def rotary_permutation(blk: Mamba3Block) -> torch.Tensor:
    """``idx`` with hybridlab's d_state dim j = the official layer's dim ``idx[j]``.

    hybridlab rotates pairs (i, i + A) (A = n_angles); the official SISO kernels rotate (2i, 2i+1),
    the official MIMO kernels (i, N//2 + i), for i < A; the other dims are not rotated and keep their order.
    """
    N, A = blk.d_state, blk.rope_dims // 2
    if blk.mode == "siso":
        rot = [2 * i for i in range(A)] + [2 * i + 1 for i in range(A)]
    else:
        rot = list(range(A)) + [N // 2 + i for i in range(A)]
    taken = set(rot)
    return torch.tensor(rot + [d for d in range(N) if d not in taken], dtype=torch.long)


def _m3_sizes(blk: Mamba3Block, d_model: int) -> list[int]:
    E, H, N, R = blk.d_inner(d_model), blk.heads(d_model), blk.d_state, blk.rank
    return [E, E, R * N, R * N, H, H, H, blk.rope_dims // 2]


def _permute_bc(w: torch.Tensor, blk: Mamba3Block, d_model: int, idx: torch.Tensor) -> torch.Tensor:
    """in_proj rows with the B and C rows (each (R, N)) permuted along N by ``idx``."""
    R, N = blk.rank, blk.d_state
    z, x, B, C, rest = torch.split(w, [*_m3_sizes(blk, d_model)[:4], w.shape[0] - sum(_m3_sizes(blk, d_model)[:4])])
    B = B.reshape(R, N, -1)[:, idx].reshape(R * N, -1)
    C = C.reshape(R, N, -1)[:, idx].reshape(R * N, -1)
    return torch.cat([z, x, B, C, rest])


# Per mixer: (hybridlab name, official name) of the tensors that only change name.
_M3_SAME = (("out_proj.weight", "out_proj.weight"), ("dt_bias", "dt_bias"), ("D", "D"), ("mimo_x", "mimo_x"),
            ("mimo_z", "mimo_z"), ("mimo_o", "mimo_o"))


def _official_shapes(config: dict, spec: ModelSpec, kinds: list[str]) -> dict[str, tuple]:
    """The official state dict's names and shapes (for the checks on import)."""
    D, V = spec.d_model, spec.vocab_size
    out = {"backbone.embedding.weight": (V, D), "backbone.norm_f.weight": (D,)}
    m3 = spec.blocks.get(M3)
    attn = spec.blocks.get(ATTN)
    mlp = spec.blocks.get(MLP)
    for i, kind in enumerate(kinds):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = (D,)
        if kind == M3:
            E, H, P, N, R = m3.d_inner(D), m3.heads(D), m3.headdim, m3.d_state, m3.rank
            out.update({p + "mixer.in_proj.weight": (sum(_m3_sizes(m3, D)), D), p + "mixer.dt_bias": (H,),
                        p + "mixer.B_bias": (H, R, N), p + "mixer.C_bias": (H, R, N), p + "mixer.B_norm.weight": (N,),
                        p + "mixer.C_norm.weight": (N,), p + "mixer.D": (H,), p + "mixer.out_proj.weight": (D, E)})
            if m3.mode == "mimo":
                out.update({p + f"mixer.{n}": (H, R, P) for n in ("mimo_x", "mimo_z", "mimo_o")})
            if m3.out_norm != "none":
                out[p + "mixer.norm.weight"] = (E,)
        else:
            hd, kv = attn.resolved_head_dim(D), attn.resolved_kv_heads()
            qkv = hd * (attn.heads + 2 * kv)
            out[p + "mixer.in_proj.weight"] = (qkv, D)
            out[p + "mixer.out_proj.weight"] = (D, attn.heads * hd)
            if attn.qkv_bias:
                out[p + "mixer.in_proj.bias"] = (qkv,)
            if attn.out_bias:
                out[p + "mixer.out_proj.bias"] = (D,)
        if mlp is not None:
            h = mlp.resolved_hidden(D)
            out.update({p + "norm2.weight": (D,), p + "mlp.fc1.weight": (2 * h, D), p + "mlp.fc2.weight": (D, h)})
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def to_hybridlab(config: dict, spec: ModelSpec, state: Mapping[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """Official parameter names and layouts -> HybridLM's, every tensor exact (stored dtypes kept)."""
    kinds = official_layers(config, where)
    want = _official_shapes(config, spec, kinds)
    sd = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # a derived buffer, if saved
    if spec.tie_embeddings and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        emb = sd.get("backbone.embedding.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise ModelFolderError(where, "lm_head.weight differs from backbone.embedding.weight, but config.json says "
                                          "tie_embeddings: true")
    check_names_and_shapes(sd, want, where, "config.json's model")
    D = spec.d_model
    out = {"embed.weight": sd["backbone.embedding.weight"], "norm_f.weight": sd["backbone.norm_f.weight"]}
    if not spec.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    j = 0
    m3, attn, mlp = spec.blocks.get(M3), spec.blocks.get(ATTN), spec.blocks.get(MLP)
    idx = rotary_permutation(m3) if m3 is not None else None
    for i, kind in enumerate(kinds):
        p, q = f"backbone.layers.{i}.", f"layers.{j}."
        out[q + "norm.weight"] = sd[p + "norm.weight"]
        mix = lambda n: sd[p + "mixer." + n]  # noqa: E731
        if kind == M3:
            out[q + "mixer.in_proj.weight"] = _permute_bc(mix("in_proj.weight"), m3, D, idx)
            for hn, on in _M3_SAME:
                if p + "mixer." + on in sd:
                    out[q + "mixer." + hn] = mix(on)
            out[q + "mixer.b_norm"], out[q + "mixer.c_norm"] = mix("B_norm.weight")[idx], mix("C_norm.weight")[idx]
            out[q + "mixer.b_bias"], out[q + "mixer.c_bias"] = mix("B_bias")[..., idx], mix("C_bias")[..., idx]
            if m3.out_norm != "none":
                out[q + "mixer.out_norm"] = mix("norm.weight").reshape(m3.heads(D), m3.headdim)
        else:
            nq = attn.heads * attn.resolved_head_dim(D)
            out[q + "mixer.q_proj.weight"], out[q + "mixer.kv_proj.weight"] = mix("in_proj.weight").split(
                [nq, mix("in_proj.weight").shape[0] - nq])
            if attn.qkv_bias:
                out[q + "mixer.q_proj.bias"], out[q + "mixer.kv_proj.bias"] = mix("in_proj.bias").split(
                    [nq, mix("in_proj.bias").shape[0] - nq])
            out[q + "mixer.o_proj.weight"] = mix("out_proj.weight")
            if attn.out_bias:
                out[q + "mixer.o_proj.bias"] = mix("out_proj.bias")
        j += 1
        if mlp is not None:
            q = f"layers.{j}."
            value, gate = sd[p + "mlp.fc1.weight"].chunk(2)  # GatedMLP: y, gate = fc1(x).chunk(2); y * silu(gate)
            out[q + "norm.weight"] = sd[p + "norm2.weight"]
            out[q + "mixer.gate_up.weight"] = torch.cat([gate, value])
            out[q + "mixer.down.weight"] = sd[p + "mlp.fc2.weight"]
            j += 1
    return {k: v.contiguous() for k, v in out.items()}


def to_official(config: dict, spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HybridLM names -> the official state dict (``MambaLMHeadModel.state_dict()``'s names and order)."""
    kinds = official_layers(config, "<export>")
    D = spec.d_model
    sd = dict(state)
    out = {"backbone.embedding.weight": sd["embed.weight"]}
    m3, attn, mlp = spec.blocks.get(M3), spec.blocks.get(ATTN), spec.blocks.get(MLP)
    # the spec's own block names: kinds in layout order, whatever the templates are called
    blocks = [spec.blocks[n] for n in spec.layers]
    m3 = next((b for b in blocks if isinstance(b, Mamba3Block)), m3)
    attn = next((b for b in blocks if isinstance(b, AttentionBlock)), attn)
    mlp = next((b for b in blocks if isinstance(b, SwiGLUBlock)), mlp)
    inv = torch.argsort(rotary_permutation(m3)) if m3 is not None else None
    j = 0
    for i, kind in enumerate(kinds):
        p, q = f"backbone.layers.{i}.", f"layers.{j}."
        mix = lambda n: sd[q + "mixer." + n]  # noqa: E731
        out[p + "norm.weight"] = sd[q + "norm.weight"]
        if kind == M3:
            H, P = m3.heads(D), m3.headdim
            out[p + "mixer.in_proj.weight"] = _permute_bc(mix("in_proj.weight"), m3, D, inv)
            out[p + "mixer.dt_bias"] = mix("dt_bias")
            out[p + "mixer.B_bias"], out[p + "mixer.C_bias"] = mix("b_bias")[..., inv], mix("c_bias")[..., inv]
            out[p + "mixer.B_norm.weight"], out[p + "mixer.C_norm.weight"] = mix("b_norm")[inv], mix("c_norm")[inv]
            if m3.mode == "mimo":
                for n in ("mimo_x", "mimo_z", "mimo_o"):
                    out[p + "mixer." + n] = mix(n)
            out[p + "mixer.D"] = mix("D")
            if m3.out_norm != "none":
                out[p + "mixer.norm.weight"] = mix("out_norm").reshape(H * P)
            out[p + "mixer.out_proj.weight"] = mix("out_proj.weight")
        else:
            out[p + "mixer.in_proj.weight"] = torch.cat([mix("q_proj.weight"), mix("kv_proj.weight")])
            if attn.qkv_bias:
                out[p + "mixer.in_proj.bias"] = torch.cat([mix("q_proj.bias"), mix("kv_proj.bias")])
            out[p + "mixer.out_proj.weight"] = mix("o_proj.weight")
            if attn.out_bias:
                out[p + "mixer.out_proj.bias"] = mix("o_proj.bias")
        j += 1
        if mlp is not None:
            q = f"layers.{j}."
            gate, value = sd[q + "mixer.gate_up.weight"].chunk(2)
            out[p + "norm2.weight"] = sd[q + "norm.weight"]
            out[p + "mlp.fc1.weight"] = torch.cat([value, gate])
            out[p + "mlp.fc2.weight"] = sd[q + "mixer.down.weight"]
            j += 1
    out["backbone.norm_f.weight"] = sd["norm_f.weight"]
    out["lm_head.weight"] = out["backbone.embedding.weight"] if spec.tie_embeddings else sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ============================================================================ the two commands


def origin_files(folder) -> tuple[Optional[dict], dict]:
    """(the official config a model folder was imported from, or None; its tokenizer files name -> bytes)."""
    f = Path(folder)
    prov = None
    if (f / PROVENANCE).is_file():
        try:
            prov = json.loads((f / PROVENANCE).read_text())
        except (OSError, ValueError):
            prov = None
    return prov, {n: (f / n).read_bytes() for n in TOKENIZER_FILES if (f / n).is_file()}


def import_checkpoint(src, out, *, name: Optional[str] = None, overwrite: bool = False) -> Path:
    """Official checkpoint folder ``src`` -> hybridlab model folder ``out`` (spec, safetensors, tokenizer, provenance)."""
    ck = read_official(src)
    where = ck.folder / CONFIG
    spec = spec_from_config(ck.config, name or ck.folder.resolve().name, where)
    state = to_hybridlab(ck.config, spec, ck.state, ck.weights)
    extra = {PROVENANCE: (json.dumps(ck.config, indent=4) + "\n").encode()}
    for f in ck.tokenizer_files:
        extra[f.name] = f.read_bytes()
    return save_pretrained(out, spec, state, extra, overwrite=overwrite)


def export_checkpoint(spec: ModelSpec, state: Mapping[str, torch.Tensor], out, *, provenance: Optional[dict] = None,
                      extra_files: Mapping[str, bytes] = (), safetensors: bool = False, overwrite: bool = False,
                      where: str = "<spec>") -> Path:
    """A HybridLM (spec + its state dict) -> an official checkpoint folder: config.json + weights (+ extra files).

    The weights go to ``pytorch_model.bin`` (what ``MambaLMHeadModel.from_pretrained`` reads; a tied head is the
    embedding's tensor, as in its ``state_dict()``), or with ``safetensors`` to ``model.safetensors`` (tied head left out).
    """
    config = config_from_spec(spec, provenance, where)
    official = to_official(config, spec, state)
    dst = Path(out).expanduser()
    with new_folder(dst, overwrite, extra_files) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=4))
        if safetensors:
            write_safetensors({k: v for k, v in official.items() if not (spec.tie_embeddings and k == "lm_head.weight")},
                              tmp / SAFETENSORS, metadata={"format": "pt"})
        else:
            torch.save(official, tmp / BIN)
    return dst


def export_model_folder(folder, out, *, safetensors: bool = False, overwrite: bool = False) -> Path:
    """A hybridlab model folder -> an official checkpoint folder (its provenance and tokenizer files kept)."""
    f = Path(folder).expanduser()
    spec = read_spec(f)
    state = read_safetensors(f / MODEL_WEIGHTS)
    prov, extra = origin_files(f)
    return export_checkpoint(spec, state, out, provenance=prov, extra_files=extra, safetensors=safetensors,
                             overwrite=overwrite, where=str(f / "model.yaml"))
