"""Checkpoint interchange commands: `hybridlab import mamba-ssm`, `hybridlab export mamba-ssm`."""

from __future__ import annotations

from typing import Optional

import typer

from .options import UriOpt

import_app = typer.Typer(no_args_is_help=True, help="Bring other projects' checkpoints in as hybridlab model folders.")
export_app = typer.Typer(no_args_is_help=True, help="Write hybridlab models in other projects' checkpoint formats.")


@import_app.command("mamba-ssm")
def import_mamba_ssm(
    src: str = typer.Argument(..., help="Official checkpoint folder: config.json + pytorch_model.bin or model.safetensors."),
    out: str = typer.Option(..., "--out", help="New hybridlab model folder (model.yaml + model.safetensors)."),
    name: Optional[str] = typer.Option(None, "--name", help="Spec name (default: the source folder's name)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
):
    """An official state-spaces/mamba MambaLMHeadModel (Mamba-3, MHA, GatedMLP) as a hybridlab model folder."""
    from .. import interop

    print("\n".join(interop.import_mamba_ssm(src, out, name=name, force=force)))


@export_app.command("mamba-ssm")
def export_mamba_ssm(
    target: str = typer.Argument(..., help="A hybridlab model folder, a run or checkpoint folder, or an MLflow run id."),
    out: str = typer.Option(..., "--out", help="New official checkpoint folder (config.json + pytorch_model.bin)."),
    safetensors: bool = typer.Option(False, "--safetensors", help="Write model.safetensors instead of pytorch_model.bin."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    uri: Optional[str] = UriOpt,
):
    """A hybridlab model whose layers the official code has, as an official MambaLMHeadModel checkpoint."""
    from .. import interop

    print("\n".join(interop.export_mamba_ssm(target, out, safetensors=safetensors, force=force, uri=uri)))
