"""The embedded default's Ray: a private head on 127.0.0.1, in its own session, with its own token.

``hybridlab run`` without ``$RAY_ADDRESS`` starts ``ray start --head --block`` as a
child process and joins it. Why not ``ray.init()`` in-process:

* Binding. Ray replaces a loopback node IP by the host's address
  (``services.resolve_ip_for_localhost``) unless it runs as a single-machine
  Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for that mode, which
  only changes which node IP it picks). With the node IP 127.0.0.1 every Ray
  server — GCS, raylet (node and object manager), workers and actors, the
  dashboard agent and the runtime-env agent, the monitor — listens on loopback.
* Signals. A terminal's Ctrl-C or a preemption's SIGTERM goes to the driver's
  process group; Ray's own processes started from the driver are in that group
  and would die with it, taking the workers before they can checkpoint. The head
  runs in its own session, so only the driver gets the signal and can stop the
  run cleanly (``runner``).
* Isolation. A private temp dir (short: Ray's socket paths must stay under ~107
  characters), free ports chosen here for the agents (so two runs on one machine do
  not collide), and a per-run random token (token authentication stays on).

The head shares the driver's fate: it gets SIGTERM when the driver dies, and on
SIGTERM ``ray start --block`` stops everything it started.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
START_TIMEOUT_S = float(os.environ.get("HYBRIDLAB_RAY_START_TIMEOUT", "180"))
READY_LINE = "Ray runtime started"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the driver dies (Linux prctl PR_SET_PDEATHSIG)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


class LocalRay:
    """A private single-node Ray for this process; ``start()`` joins it, ``stop()`` ends it."""

    def __init__(self, num_cpus: int, verbose: bool = False):
        self.num_cpus, self.verbose = num_cpus, verbose
        self.dir: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    def start(self, aborted: Callable[[], bool] = lambda: False) -> None:
        self.dir = tempfile.mkdtemp(prefix="hlray-")
        token = Path(self.dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        env = dict(os.environ, **SINGLE_MACHINE_ENV, **auth, RAY_TRAIN_V2_ENABLED="1")
        env.pop("RAY_ADDRESS", None)
        port = _free_port()
        ports = {flag: str(_free_port()) for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                      "--metrics-export-port", "--runtime-env-agent-port",
                                                      "--node-manager-port", "--object-manager-port",
                                                      "--ray-client-server-port")}
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address", LOOPBACK, "--port", str(port), "--num-cpus", str(self.num_cpus),
               "--include-dashboard", "false", "--temp-dir", self.dir, "--disable-usage-stats",
               *[x for kv in ports.items() for x in kv]]
        log_path = Path(self.dir) / "head.log"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        deadline = time.time() + START_TIMEOUT_S
        while READY_LINE not in log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline or aborted():
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                self.stop()
                if aborted():
                    return
                raise UserError("the local Ray did not start: " + (" | ".join(tail) or "no output"))
            time.sleep(0.2)
        _join_env(auth)
        import ray

        ray.init(address=f"{LOOPBACK}:{port}", log_to_driver=self.verbose, logging_level="WARNING")

    def stop(self) -> None:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops what it started on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _join_env(auth: dict) -> None:
    """This process joins as a single-machine Ray with the head's token. Ray reads both switches when it
    is imported (and caches its config); a Ray imported earlier is told again."""
    already = "ray" in sys.modules
    os.environ.update(SINGLE_MACHINE_ENV)
    os.environ.update(auth)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if already:
        import ray._private.ray_constants as ray_constants
        from ray._raylet import Config

        ray_constants.ENABLE_RAY_CLUSTER = False
        Config.initialize("")  # re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH


def ensure_ray(verbose: bool = False, aborted: Callable[[], bool] = lambda: False) -> Optional[LocalRay]:
    """Join the Ray of a submitted job ($RAY_ADDRESS), or start the private local one (returned: stop it)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return None
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if os.environ.get("RAY_ADDRESS"):
        import ray

        try:
            ray.init(log_to_driver=verbose, logging_level="WARNING")
        except ConnectionError as e:
            raise UserError(f"cannot join the Ray cluster at {os.environ['RAY_ADDRESS']}: {e}") from None
        return None
    head = LocalRay(num_cpus=os.cpu_count() or 1, verbose=verbose)
    head.start(aborted)
    return head
