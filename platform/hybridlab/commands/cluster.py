"""Ray cluster commands: submit, status, logs, stop."""

from __future__ import annotations

from typing import List, Optional

import typer

from .options import AddressOpt, SetOpt, time_limit_option

app = typer.Typer()


@app.command()
def submit(
    job: str = typer.Argument(..., help="Job spec (YAML)."),
    address: Optional[str] = AddressOpt,
    set_: Optional[List[str]] = SetOpt,
    wait: bool = typer.Option(False, "--wait", help="Follow the logs until the job ends."),
    time_limit: Optional[float] = time_limit_option("from the job's start on the cluster"),
):
    """Submit a job to a Ray cluster through the Ray Jobs API; prints the job id."""
    from ..cluster import submit_job

    submit_job(job, address=address, overrides=set_ or [], wait=wait, time_limit_s=time_limit)


@app.command()
def status(job_id: str = typer.Argument(..., help="Ray job id from `hybridlab submit`."), address: Optional[str] = AddressOpt):
    """Status of a submitted job."""
    from ..cluster import job_status

    job_status(job_id, address)


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Ray job id from `hybridlab submit`."),
    address: Optional[str] = AddressOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
):
    """Logs of a submitted job."""
    from ..cluster import job_logs

    job_logs(job_id, address, follow)


@app.command()
def stop(job_id: str = typer.Argument(..., help="Ray job id from `hybridlab submit`."), address: Optional[str] = AddressOpt):
    """Stop a submitted job (its checkpoints stay; continue it with `run --resume`)."""
    from ..cluster import stop_job

    stop_job(job_id, address)
