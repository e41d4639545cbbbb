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
* The workers' process group. torch's rendezvous store (TCPStore) listens on every interface and
  has no bind option, so :class:`LoopbackTorchConfig` serves it from a socket bound to 127.0.0.1
  (``master_listen_fd``) in rank 0 and lets every rank join it as a client; gloo and NCCL open their
  sockets on ``lo`` (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless set).
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
from typing import Optional

from .errors import UserError

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NO_DRAIN_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing here drains (no Serve): stop at once
# One fixed machine: no autoscaler to monitor, no drain to watch for. Each is a Python process (1-2.5 s of CPU to
# start) per run, a few per cent of a short run's CPU on a 2-core machine. (Ray Client's server cannot be left out:
# `ray start` always starts it when its dependencies are installed.)
HEAD_WITHOUT_EXTRAS = ("--no-monitor",)
NO_PREEMPTION_WATCH_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
SHUTDOWN_TIMEOUT_S = 20.0
LOOPBACK_IFACE_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
START_TIMEOUT_S = float(os.environ.get("HYBRIDLAB_RAY_START_TIMEOUT", "180"))
READY_LINE = "Ray runtime started"
# The ports every Ray node on a machine needs its own of (Ray's defaults are fixed numbers: two runs would collide).
AGENT_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                    "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
# Ray gives its raylet a fixed 30 s to register with the GCS; on a machine busy with other work that can pass
# once without anything being wrong, so the head is started a second time before giving up.
OVERLOADED_LINE = "timed out during startup"
HEAD_ATTEMPTS = 2


class HeadOverloaded(UserError):
    """The head's raylet did not register within Ray's fixed start-up wait."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. The sockets stay bound until all are chosen: one bound and closed
    at a time, the kernel can hand the same port out twice (seen: a dashboard and a metrics port alike)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_args(flags, ports) -> list[str]:
    """``--flag PORT`` pairs for a `ray start` command line."""
    return [x for flag, p in zip(flags, ports, strict=True) for x in (flag, str(p))]


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
        self.address: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        """Start the head and join it; on any failure (or a signal meanwhile) nothing is left running."""
        try:
            for attempt in range(1, HEAD_ATTEMPTS + 1):
                auth, port = self._launch_head()
                try:
                    self._wait_ready()
                    break
                except HeadOverloaded:
                    if attempt == HEAD_ATTEMPTS:
                        raise
                    self.stop()
            _join_env(auth)
            os.environ["RAY_ADDRESS"] = self.address = f"{LOOPBACK}:{port}"  # this process's helpers find it too
            import ray

            ray.init(address=self.address, log_to_driver=self.verbose, logging_level="WARNING")
        except BaseException:
            self.stop()
            raise

    def _launch_head(self) -> tuple[dict, int]:
        self.dir = tempfile.mkdtemp(prefix="hlray-")
        token = Path(self.dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        flags = (*AGENT_PORT_FLAGS, "--ray-client-server-port")
        port, *agent_ports = free_ports(1 + len(flags))
        # RAY_ADDRESS: Ray's own helpers inside the cluster (Ray Train's controller, the state API) look the
        # cluster up by address "auto", which fails when other Ray instances run on this machine
        env = dict(os.environ, **SINGLE_MACHINE_ENV, **NO_DRAIN_ENV, **auth, RAY_TRAIN_V2_ENABLED="1",
                   RAY_ADDRESS=f"{LOOPBACK}:{port}")
        for k, v in LOOPBACK_IFACE_ENV.items():
            env.setdefault(k, v)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address", LOOPBACK, "--port", str(port), "--num-cpus", str(self.num_cpus),
               "--include-dashboard", "false", "--temp-dir", self.dir, "--disable-usage-stats",
               *HEAD_WITHOUT_EXTRAS, *port_args(flags, agent_ports)]
        with open(Path(self.dir) / "head.log", "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        return auth, port

    def _wait_ready(self) -> None:
        log_path = Path(self.dir) / "head.log"
        deadline = time.time() + START_TIMEOUT_S
        while READY_LINE not in log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline:
                text = log_path.read_text(errors="replace")
                tail = text.strip().splitlines()[-3:]
                error = HeadOverloaded if OVERLOADED_LINE in text else UserError
                raise error("the local Ray did not start: " + (" | ".join(tail) or "no output"))
            time.sleep(0.2)

    def stop(self) -> None:
        if "ray" in sys.modules:
            import threading

            import ray

            if ray.is_initialized():  # bounded: a wedged Ray must not keep the command from exiting
                t = threading.Thread(target=ray.shutdown, name="hybridlab-ray-shutdown", daemon=True)
                t.start()
                t.join(SHUTDOWN_TIMEOUT_S)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops what it started on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if self.address and os.environ.get("RAY_ADDRESS") == self.address:
            del os.environ["RAY_ADDRESS"]
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ---------------------------------------------------------------- the workers' process group on loopback

_STORE = None  # rank 0's rendezvous store server, alive as long as the worker process


def serve_store_on_loopback(world_size: int, timeout_s: float) -> int:
    """In rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    import datetime

    import torch.distributed as dist

    global _STORE
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(max(128, world_size))
    # wait_for_workers=False: the ranks join when they init their process group, after this returns
    _STORE = (sock, dist.TCPStore(LOOPBACK, sock.getsockname()[1], world_size, True,
                                  datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                                  master_listen_fd=sock.fileno()))
    return sock.getsockname()[1]


def join_store(port: int) -> None:
    """In every rank: env:// rendezvous against the store rank 0 serves (torch's "agent store" mode)."""
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                      TORCHELASTIC_RESTART_COUNT="0")


def loopback_torch_config(backend: str, timeout_s: int = 1800):
    """A Ray Train ``TorchConfig`` whose process group rendezvous never listens beyond 127.0.0.1."""
    import ray
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    class LoopbackBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            n = len(worker_group)
            port = worker_group.execute_single(0, serve_store_on_loopback, n, backend_config.timeout_s)
            worker_group.execute(join_store, port=port)
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                       world_rank=i, world_size=n, init_method="env://",
                                                       timeout_s=backend_config.timeout_s) for i in range(n)])

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackBackend

    return LoopbackTorchConfig(backend=backend, timeout_s=timeout_s)


def _join_env(auth: dict) -> None:
    """This process joins as a single-machine Ray with the head's token. Ray reads both switches when it
    is imported (and caches its config); a Ray imported earlier is told again."""
    already = "ray" in sys.modules
    os.environ.update(SINGLE_MACHINE_ENV)
    os.environ.update(auth)
    for k, v in NO_PREEMPTION_WATCH_ENV.items():  # read by Ray Train's controller (propagated from here)
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if already:
        import ray._private.ray_constants as ray_constants
        from ray._raylet import Config

        ray_constants.ENABLE_RAY_CLUSTER = False
        Config.initialize("")  # re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH


def _ray_joined() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def starts_local_ray() -> bool:
    """Whether `hybridlab run` here trains on the private local Ray (this machine, one node)."""
    return not _ray_joined() and not os.environ.get("RAY_ADDRESS")


def ensure_ray(verbose: bool = False) -> Optional[LocalRay]:
    """Join the Ray of a submitted job ($RAY_ADDRESS), or start the private local one (returned: stop it)."""
    if _ray_joined():
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
    head.start()
    return head
