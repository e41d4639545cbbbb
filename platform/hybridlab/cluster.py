"""`hybridlab submit | status | logs | stop`: jobs on a Ray cluster through the Ray Jobs API.

``submit`` validates the job here (errors point into the file), writes the
resolved, self-contained job (model spec inlined) into a fresh folder that
travels as the job's ``runtime_env.working_dir``, and starts
``python -m hybridlab run job.yaml`` on the cluster: the same driver as
``hybridlab run``, joined to the cluster through ``$RAY_ADDRESS``.

Token authentication (on by default in Ray 2.60) stays on: when a token is
available (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)
every request carries it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from .errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "HYBRIDLAB_PEAK_FLOPS", "HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT")


def resolve_address(address: Optional[str]) -> str:
    addr = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr


def _enable_token_auth() -> None:
    """Send the cluster token when one exists and the user did not choose a mode."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    have = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
        or (Path.home() / ".ray" / "auth_token").exists()
    if have:
        os.environ["RAY_AUTH_MODE"] = "token"


class ClusterError(UserError):
    """The cluster could not be used (one line, exit 2)."""


class ClusterUnreachable(ClusterError):
    """Nothing answers at the address."""


class ClusterAuthRejected(ClusterError):
    """The cluster refused our token (or its absence)."""


class JobNotFound(ClusterError):
    """The cluster does not know the job id."""


AUTH_HINT = ("the cluster rejected the request (token authentication): set RAY_AUTH_MODE=token and "
             "RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token")


def _classified(e: BaseException, addr: str, what: str) -> ClusterError:
    """The Jobs API's failure as one of our error kinds, by the exception's type."""
    from ray.exceptions import AuthenticationError

    if isinstance(e, AuthenticationError):
        return ClusterAuthRejected(f"{what} at {addr}: {AUTH_HINT}")
    if isinstance(e, (ConnectionError, OSError)):  # refused, reset, DNS; requests' errors are OSErrors
        return ClusterUnreachable(f"no Ray cluster at {addr}: connection refused (is the head running? `ray start --head`)")
    return ClusterError(f"{what} at {addr} failed: {' '.join(str(e).split())[:300]}")


def client(address: Optional[str]):
    _enable_token_auth()
    addr = resolve_address(address)
    import logging

    logging.getLogger("ray").setLevel(logging.ERROR)
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    try:
        c = JobSubmissionClient(addr)
    except (RayError, OSError, RuntimeError, ValueError) as e:
        err = _classified(e, addr, "connecting")
        if type(err) is ClusterError:
            err = ClusterUnreachable(f"no Ray cluster at {addr}: {' '.join(str(e).split())[:300]}")
        raise err from None
    c.hybridlab_address = addr
    return c


def _call(c, what: str, fn, *args):
    from ray.exceptions import RayError

    try:
        return fn(*args)
    except (RayError, OSError, RuntimeError, ValueError) as e:
        raise _classified(e, c.hybridlab_address, what) from None


def _existing(c, job_id: str) -> None:
    """JobNotFound unless the cluster knows ``job_id`` (a submission id or a job id)."""
    jobs = _call(c, "listing jobs", c.list_jobs)
    if not any(job_id in (j.submission_id, j.job_id) for j in jobs):
        raise JobNotFound(f"no job {job_id!r} on this cluster")


def entrypoint(time_limit_s: Optional[float] = None) -> str:
    """The submitted job's command: the same driver as `hybridlab run`, on the cluster."""
    return "python -m hybridlab run job.yaml" + (f" --time-limit {time_limit_s:g}" if time_limit_s else "")


def submit_job(job_file: str, address: Optional[str] = None, overrides=(), wait: bool = False,
               time_limit_s: Optional[float] = None) -> str:
    from hybridlab.jobs.spec import dump_yaml, expand_sweep, load_job

    # validate here (errors point into the local file); this machine's limits are not the cluster's:
    # the driver checks those on the cluster (`hybridlab run` there)
    job = load_job(job_file, overrides, limits=False)
    expand_sweep(job_file, overrides, job=job, limits=False)
    resolved = dict(job.resolved)
    resolved.pop("model_ref", None)
    store = resolved["storage"]["path"]
    if "://" not in store and not os.path.isabs(os.path.expanduser(store)):
        # a relative path would land in the job's temporary working dir on the cluster
        resolved["storage"]["path"] = "~/hybridlab_runs"
    if job.spec.sweep:
        resolved["sweep"] = job.spec.sweep
    c = client(address)
    work = Path(tempfile.mkdtemp(prefix="hybridlab-submit-"))
    (work / "job.yaml").write_text(dump_yaml(resolved))
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env["PYTHONUNBUFFERED"] = "1"
    env["CI"] = "1"  # plain progress lines in the job's log
    deadline = time.time() + 60
    while True:
        try:
            job_id = c.submit_job(
                entrypoint=entrypoint(time_limit_s),
                runtime_env={"working_dir": str(work), "env_vars": env},
                metadata={"hybridlab_job": Path(job_file).name, "experiment": job.spec.experiment},
            )
            break
        except RuntimeError as e:  # the Jobs API's HTTP errors: a head still starting has no agent yet
            if time.time() < deadline:
                time.sleep(3)
                continue
            raise _classified(e, c.hybridlab_address, "submitting") from None
        except (OSError, ValueError) as e:
            raise _classified(e, c.hybridlab_address, "submitting") from None
    print(f"submitted: {job_id}")
    print(f"  hybridlab status {job_id}   hybridlab logs {job_id} --follow   hybridlab stop {job_id}")
    if wait:
        job_logs(job_id, address, follow=True)
    return job_id


def job_status(job_id: str, address: Optional[str] = None) -> str:
    c = client(address)
    _existing(c, job_id)
    info = _call(c, "status", c.get_job_info, job_id)
    st = str(getattr(info.status, "value", info.status))
    line = f"{job_id}: {st}"
    if info.message:
        line += f"  ({' '.join(info.message.split())[:300]})"
    print(line)
    return st


def job_logs(job_id: str, address: Optional[str] = None, follow: bool = False) -> None:
    c = client(address)
    _existing(c, job_id)
    if not follow:
        print(_call(c, "logs", c.get_job_logs, job_id), end="")
        return
    import asyncio

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except (OSError, RuntimeError) as e:  # the connection dropped
        raise _classified(e, c.hybridlab_address, "following logs") from None
    job_status(job_id, address)


def stop_job(job_id: str, address: Optional[str] = None, wait_s: float = 30) -> None:
    c = client(address)
    _existing(c, job_id)
    stopped = _call(c, "stop", c.stop_job, job_id)
    if not stopped:
        print(f"{job_id}: already finished")
        return
    deadline = time.time() + wait_s
    st = ""
    while time.time() < deadline:
        st = str(getattr(_call(c, "status", c.get_job_info, job_id).status, "value", ""))
        if st in ("STOPPED", "SUCCEEDED", "FAILED"):
            break
        time.sleep(1)
    print(f"{job_id}: {st or 'stop requested'}")
