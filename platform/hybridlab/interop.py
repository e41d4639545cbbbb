"""`hybridlab import mamba-ssm SRC --out DST` and `hybridlab export mamba-ssm RUN_OR_DIR --out DST`.

The formats and the conversion live in ``hybridlab.arch`` (``pretrained``: hybridlab
model folders; ``interop.mamba_ssm``: official checkpoints); this module finds
what to convert — a model folder, a training run's checkpoint (run folder,
step folder or MLflow run id, as ``hybridlab eval`` finds them) — and prints the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli import app

import_app = typer.Typer(no_args_is_help=True, help="Bring other projects' checkpoints in as hybridlab model folders.")
export_app = typer.Typer(no_args_is_help=True, help="Write hybridlab models in other projects' checkpoint formats.")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")


@import_app.command("mamba-ssm")
def import_mamba_ssm(
    src: str = typer.Argument(..., help="Official checkpoint folder: config.json + pytorch_model.bin or model.safetensors."),
    out: str = typer.Option(..., "--out", help="New hybridlab model folder (model.yaml + model.safetensors)."),
    name: Optional[str] = typer.Option(None, "--name", help="Spec name (default: the source folder's name)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
):
    """An official state-spaces/mamba MambaLMHeadModel (Mamba-3, MHA, GatedMLP) as a hybridlab model folder."""
    from hybridlab.arch.interop.mamba_ssm import import_checkpoint
    from hybridlab.arch.pretrained import read_spec

    dst = import_checkpoint(src, out, name=name, overwrite=force)
    spec = read_spec(dst)
    print(f"wrote {dst}: {spec.name}, {len(spec.layers)} sub-blocks ({spec.layout_str}), vocab {spec.vocab_size}")
    print(f"use it: hybridlab check {dst} | hybridlab eval {dst} --task ... | model: {{from: {dst}}} in a job")


@export_app.command("mamba-ssm")
def export_mamba_ssm(
    target: str = typer.Argument(..., help="A hybridlab model folder, a run or checkpoint folder, or an MLflow run id."),
    out: str = typer.Option(..., "--out", help="New official checkpoint folder (config.json + pytorch_model.bin)."),
    safetensors: bool = typer.Option(False, "--safetensors", help="Write model.safetensors instead of pytorch_model.bin."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    uri: Optional[str] = typer.Option(None, "--uri", help="Tracking URI for a run id (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)."),
):
    """A hybridlab model whose layers the official code has, as an official MambaLMHeadModel checkpoint."""
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
    print(f"wrote {dst}: MambaLMHeadModel with {cfg.get('n_layer')} layers (attention at "
          f"{cfg.get('attn_layer_idx') or 'none'}), d_model {cfg.get('d_model')}")


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

        client = mlflow_client(store)
    t = resolve_target(target, client, store)
    spec = load_model_spec(t.job["model"])
    state = load_state_dict(t.checkpoint, t.meta)
    origin = t.job.get("model_from")  # a fine-tune of an imported model: its provenance and tokenizer
    prov, extra = origin_files(origin) if origin and Path(origin).is_dir() else (None, {})
    return spec, state, prov, extra, f"{t.checkpoint} (model of {spec.name})"
