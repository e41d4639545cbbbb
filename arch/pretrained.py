"""A hybridlab model folder: a spec and its weights, loadable anywhere without the training platform.

    DIR/model.yaml          the resolved model spec (``spec_version`` and every choice written out)
    DIR/model.safetensors   the weights under ``HybridLM``'s parameter names (a tied head is stored once,
                            as ``embed.weight``); each tensor keeps its own dtype
    DIR/...                 anything else (tokenizer files, provenance) is left alone

``load_pretrained(DIR)`` returns the model in eval mode; ``save_pretrained(DIR, spec, state)``
writes one; ``load_weights(model, DIR)`` fills a model built from the same spec (a fine-tune
starting from the folder). ``hybridlab import mamba-ssm`` writes such folders from official
checkpoints (``interop.mamba_ssm``). Every problem is a :class:`ModelFolderError` (a
``SpecError``: one line, exit 2 in the CLI).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import yaml

from .spec import ModelSpec, load_model_spec
from .specio import SpecError

__all__ = [
    "MODEL_SPEC", "MODEL_WEIGHTS", "ModelFolderError", "is_model_dir", "read_spec", "read_safetensors",
    "write_safetensors", "model_state", "save_pretrained", "load_pretrained", "load_weights", "check_state",
    "stored_shapes", "check_stored_shapes", "new_folder",
]

MODEL_SPEC = "model.yaml"
MODEL_WEIGHTS = "model.safetensors"


class ModelFolderError(SpecError):
    """A model folder or weights file that cannot be read, or whose weights do not fit its spec."""

    def __init__(self, where, message: str):
        super().__init__(message, str(where))


def is_model_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MODEL_SPEC).is_file() and (p / MODEL_WEIGHTS).is_file()


def _require_dir(path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelFolderError(p, "no such model folder" if not p.exists() else "not a folder")
    for name in (MODEL_SPEC, MODEL_WEIGHTS):
        if not (p / name).is_file():
            raise ModelFolderError(p, f"not a hybridlab model folder (no {name}; `hybridlab import mamba-ssm` writes one)")
    return p


def read_spec(path) -> ModelSpec:
    """The spec of a model folder."""
    return load_model_spec(str(_require_dir(path) / MODEL_SPEC))


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, on the CPU in its stored dtype; one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise ModelFolderError(path, "file not found") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(path, f"not a readable safetensors file (truncated or corrupt?): "
                                     f"{' '.join(str(e).split())[:160]}") from None


def write_safetensors(state: Mapping[str, torch.Tensor], path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)


def model_state(model) -> dict[str, torch.Tensor]:
    """A HybridLM's weights as the folder stores them (the tied head left out: it is the embedding)."""
    sd = dict(model.state_dict())
    if model.spec.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _expected_shapes(spec: ModelSpec) -> dict[str, tuple]:
    """Parameter names and shapes of a HybridLM of ``spec`` (built on the meta device: no memory)."""
    from .model import HybridLM

    with torch.device("meta"):
        m = HybridLM(spec)
    return {k: tuple(v.shape) for k, v in model_state(m).items()}


def check_names_and_shapes(state: Mapping[str, torch.Tensor], want: Mapping[str, tuple], where, whose: str) -> None:
    """``state`` holds exactly the names of ``want``, each with its shape; one-line errors naming the weight."""
    for k, shape in want.items():
        if k not in state:
            raise ModelFolderError(where, f"no weights for {k} (shape {shape}), which {whose} has")
        if tuple(state[k].shape) != shape:
            raise ModelFolderError(where, f"{k}: shape {tuple(state[k].shape)}, but {whose} has {shape}")
    extra = [k for k in state if k not in want]
    if extra:
        raise ModelFolderError(where, f"weights {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} have no place "
                                      f"in {whose}")


def check_state(spec: ModelSpec, state: Mapping[str, torch.Tensor], where) -> None:
    """Every parameter of the spec's model present with its shape, nothing else."""
    state = dict(state)
    if spec.tie_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")  # a tied head saved anyway: the embedding decides
    check_names_and_shapes(state, _expected_shapes(spec), where, f"model {spec.name}")


def stored_shapes(path) -> dict[str, tuple]:
    """Names and shapes in a model folder's weights, from the file's header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    file = _require_dir(path) / MODEL_WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(file, f"not a readable safetensors file (truncated or corrupt?): "
                                     f"{' '.join(str(e).split())[:160]}") from None


def check_stored_shapes(spec: ModelSpec, path) -> None:
    """The folder's weights fit a model of ``spec`` (a fine-tune may change the spec, not the shapes)."""
    check_state(spec, {k: torch.empty(s, device="meta") for k, s in stored_shapes(path).items()},
                Path(path) / MODEL_WEIGHTS)


@contextmanager
def new_folder(path, overwrite: bool = False, extra_files: Mapping[str, bytes] = ()) -> Iterator[Path]:
    """``with new_folder(out) as tmp:`` write into ``tmp``; ``out`` then appears whole (renamed), or not at all.

    An existing non-empty ``out`` is refused unless ``overwrite``; ``extra_files`` (name -> bytes) go in too.
    """
    out = Path(path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelFolderError(out, "exists and is not empty (choose a new folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        for name, data in dict(extra_files).items():
            (tmp / name).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(path, spec: ModelSpec, state: Mapping[str, torch.Tensor], extra_files: Mapping[str, bytes] = (),
                    overwrite: bool = False) -> Path:
    """Write a model folder; the folder appears whole or not at all (written aside, then renamed).

    ``state`` under HybridLM names (``model_state(model)``), checked against ``spec``;
    ``extra_files`` name -> bytes are written beside (tokenizer files, provenance).
    """
    out = Path(path).expanduser()
    state = {k: v for k, v in state.items() if not (spec.tie_embeddings and k == "lm_head.weight")}
    check_state(spec, state, out)
    with new_folder(out, overwrite, extra_files) as tmp:
        (tmp / MODEL_SPEC).write_text(f"# hybridlab model spec ({spec.name})\n"
                                      + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None, width=110))
        write_safetensors(state, tmp / MODEL_WEIGHTS, metadata={"format": "hybridlab", "spec": spec.name})
    return out


def _fill(model, state: Mapping[str, torch.Tensor], where) -> None:
    check_state(model.spec, state, where)
    with torch.no_grad():
        params = dict(model.state_dict())
        for k, v in state.items():
            if k in params:
                params[k].copy_(v)


def load_weights(model, path) -> None:
    """Copy a model folder's weights (or a .safetensors file's) into ``model``; shapes must match."""
    p = Path(path).expanduser()
    file = _require_dir(p) / MODEL_WEIGHTS if p.is_dir() or not p.exists() else p
    _fill(model, read_safetensors(file), file)


def load_pretrained(path, *, device=None, dtype: Optional[torch.dtype] = None, backends: Optional[dict] = None):
    """The model of a folder, in eval mode: ``model(tokens)`` -> (batch, seqlen, vocab) logits.

    Parameters are fp32 unless ``dtype`` says otherwise (the stored tensors are converted);
    ``backends`` as for ``HybridLM`` (e.g. ``{"ssm": "torch"}``).
    """
    from .model import HybridLM

    p = _require_dir(path)
    spec = read_spec(p)
    state = read_safetensors(p / MODEL_WEIGHTS)
    with torch.device("meta"):
        model = HybridLM(spec, backends=backends)
    model = model.to_empty(device=device or "cpu")
    if spec.tie_embeddings:  # to_empty gives the head its own storage: tie it again
        model.lm_head.weight = model.embed.weight
    _reset_buffers(model)
    _fill(model, state, p / MODEL_WEIGHTS)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _reset_buffers(model) -> None:
    # HybridLM keeps no buffers today; a layer that adds one must say how it is rebuilt after to_empty
    if any(True for _ in model.buffers()):
        raise RuntimeError("load_pretrained: HybridLM grew buffers; initialise them here")
