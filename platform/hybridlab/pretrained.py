"""Model folders (a spec YAML + safetensors weights, read by ``hybridlab.arch.load_pretrained``) as eval targets.

``hybridlab eval DIR`` accepts such a folder besides runs and checkpoints. The folder's tokenizer
(``tokenizer.json`` or an HF tokenizer's files beside the weights) is the text evals' tokenizer
unless ``--tokenizer`` names another. The loader is looked up at call time, so this works as soon
as ``hybridlab.arch`` provides ``load_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def loader():
    import hybridlab.arch as arch

    return getattr(arch, "load_pretrained", None)


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors"))


def folder_tokenizer(path: Path) -> Optional[str]:
    if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return str(path / "tokenizer.json")
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return str(path)
    return None


def _spec_dict(spec) -> dict:
    from hybridlab.jobs.spec import model_to_dict

    return model_to_dict(spec)


def load_folder(path: Path, device: str = "cpu"):
    """(model on ``device`` in eval mode, its spec)."""
    load = loader()
    if load is None:
        raise UserError(f"{path}: a model folder, but this hybridlab has no hybridlab.arch.load_pretrained to read it")
    try:
        loaded = load(str(path))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot load the model folder ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    model = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "model", loaded)
    spec = getattr(model, "spec", None)
    return model.to(device).eval(), spec


def folder_job(path: Path, spec, tokenizer: Optional[str]) -> dict:
    """The job dict that stands in for a run's: the model spec, and `lm` data naming the tokenizer."""
    data = {"task": "lm"}
    tok = tokenizer or folder_tokenizer(path)
    if tok:
        data["tokenizer"] = tok
    return {"model": _spec_dict(spec) if spec is not None else {}, "data": data}
