"""What `hybridlab import mamba-ssm` / `hybridlab export mamba-ssm` convert (the commands: ``commands/interop.py``).

The formats and the conversion live in ``hybridlab.arch`` (``pretrained``: hybridlab
model folders; ``interop.mamba_ssm``: official checkpoints); this module finds
what to convert — a model folder, a training run's checkpoint (run folder,
step folder or MLflow run id, as ``hybridlab eval`` finds them) — and says what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def import_mamba_ssm(src: str, out: str, name: Optional[str] = None, force: bool = False) -> list[str]:
    """An official checkpoint folder as a new hybridlab model folder; the lines to print."""
    from hybridlab.arch.interop.mamba_ssm import import_checkpoint
    from hybridlab.arch.pretrained import read_spec

    dst = import_checkpoint(src, out, name=name, overwrite=force)
    spec = read_spec(dst)
    return [f"wrote {dst}: {spec.name}, {len(spec.layers)} sub-blocks ({spec.layout_str}), vocab {spec.vocab_size}",
            f"use it: hybridlab check {dst} | hybridlab eval {dst} --task ... | model: {{from: {dst}}} in a job"]


def export_mamba_ssm(target: str, out: str, safetensors: bool = False, force: bool = False,
                     uri: Optional[str] = None) -> list[str]:
    """A model folder or a run's newest checkpoint as an official checkpoint folder; the lines to print."""
    from hybridlab.arch.interop.mamba_ssm import export_checkpoint, export_model_folder
    from hybridlab.arch.pretrained import is_model_dir

    p = Path(target).expanduser()
    if is_model_dir(p):
        dst = export_model_folder(p, out, safetensors=safetensors, overwrite=force)
    else:
        spec, state, prov, extra, where = _run_model(target, uri)
        dst = export_checkpoint(spec, state, out, provenance=prov, extra_files=extra, safetensors=safetensors,
                                overwrite=force, where=where)
    cfg = json.loads((dst / "config.json").read_text())
    return [f"wrote {dst}: MambaLMHeadModel with {cfg.get('n_layer')} layers (attention at "
            f"{cfg.get('attn_layer_idx') or 'none'}), d_model {cfg.get('d_model')}"]


def _run_model(target: str, uri: Optional[str]):
    """(spec, state dict, provenance, extra files, where) of a training run's newest checkpoint."""
    from hybridlab.arch import load_model_spec
    from hybridlab.arch.interop.mamba_ssm import origin_files

    from .evaluate import load_state_dict, resolve_target
    from .tracking import tracking_uri

    store = tracking_uri(uri)
    client = None
    if not Path(target).expanduser().exists():
        from .tracking import client as mlflow_client

        client = mlflow_client(store, existing=True)
    t = resolve_target(target, client, store)
    spec = load_model_spec(t.job["model"])
    state = load_state_dict(t.checkpoint, t.meta)
    origin = t.job.get("model_from")  # a fine-tune of an imported model: its provenance and tokenizer
    prov, extra = origin_files(origin) if origin and Path(origin).is_dir() else (None, {})
    return spec, state, prov, extra, f"{t.checkpoint} (model of {spec.name})"
