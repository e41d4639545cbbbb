"""A real two-node Ray cluster (head + a simulated node_b, token auth on) and a real `mlflow server`.

`hybridlab submit` sends a 2-worker ZeRO-2 job that must be placed across both
nodes; the test follows it through the Jobs API, then `status` and `logs` report
it; the MLflow server is frozen mid-run and thawed: training goes on and the
buffered metrics arrive. Only processes
this test started are stopped (by pid; Ray's by their private temp dir).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from hybridlab.localray import AGENT_PORT_FLAGS, free_ports, port_args

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
HYBRIDLAB = [sys.executable, "-m", "hybridlab"]


def kill_matching(token: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line holds ``token`` (our private temp dir)."""
    me = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = False
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if token in cmd:
                found = True
                try:
                    os.kill(int(d.name), sig)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(2)


def start_mlflow(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    p = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                          "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                          "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240  # ~15 s on an idle machine; much longer on 2 busy cores
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return p
        except Exception:
            time.sleep(1)
    stop_proc(p)
    raise RuntimeError("mlflow server did not start")


def stop_proc(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGCONT)
        except OSError:
            pass
        os.killpg(p.pid, signal.SIGTERM)  # its own session: the server and its gunicorn/uvicorn workers
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


@pytest.fixture
def cluster():
    tmp = tempfile.mkdtemp(prefix="hlray")  # short: Ray's socket paths must stay under ~107 chars
    port, dash, *agents = free_ports(2 + 2 * len(AGENT_PORT_FLAGS))
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               RAY_AUTH_TOKEN_PATH=f"{tmp}/auth_token")
    Path(f"{tmp}/auth_token").write_text(os.urandom(16).hex())
    ray = str(BIN / "ray")

    def own_ports(node: int):  # two "nodes" on one host (and other Ray users here) must not share agent ports
        return port_args(AGENT_PORT_FLAGS, agents[node * len(AGENT_PORT_FLAGS):(node + 1) * len(AGENT_PORT_FLAGS)])

    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "1",
                        "--temp-dir", tmp, "--disable-usage-stats", *own_ports(0)], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--resources", '{"node_b": 1}', "--temp-dir", tmp, "--disable-usage-stats",
                        *own_ports(1)],
                       env=env, check=True, capture_output=True, timeout=120)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "tmp": tmp}
    finally:
        kill_matching(tmp)


def jobs_client(cluster, monkeypatch):
    """A Jobs API client of this test's cluster, with its token (set in this process for the test only)."""
    from hybridlab.cluster import client

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(k, cluster["env"][k])
    return client(cluster["address"])


def test_submit_across_two_nodes_with_mlflow_server_outage(cluster, tmp_path, monkeypatch):
    (mport,) = free_ports(1)
    uri = f"http://127.0.0.1:{mport}"
    server = start_mlflow(tmp_path / "srv.db", tmp_path / "artifacts", mport)
    env = dict(cluster["env"], CI="1", MLFLOW_TRACKING_URI=uri, HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT="400")
    job = tmp_path / "job.yaml"
    store = tmp_path / "runs"
    job.write_text(f"""\
experiment: cluster
model: zoo:tiny-hybrid
data: {{task: mqar, vocab: 32, seq_len: 32, num_kv_pairs: 2}}
train: {{steps: 24, micro_batch: 4, zero_stage: 2, checkpoint_every: 12, log_every: 1, warmup: 2}}
resources: {{workers: 2, placement: STRICT_SPREAD}}
storage: {{path: {store}}}
""")

    def hl(*args, timeout=120):
        return subprocess.run(HYBRIDLAB + list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        # without the token the cluster refuses us: one clear line
        no_tok = dict(env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "none"))
        r = subprocess.run(HYBRIDLAB + ["status", "raysubmit_nope", "--address", cluster["address"]], cwd=tmp_path,
                           env=no_tok, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr

        r = hl("submit", str(job), "--address", cluster["address"], "--time-limit", "1h")
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = r.stdout.split("submitted:")[1].split()[0]

        # Followed in-process through the Jobs API (what `status` and `logs` call, once each below): a CLI
        # process per poll would spend seconds of CPU each, taken from the job on a 2-core machine.
        jobs = jobs_client(cluster, monkeypatch)
        status = lambda: str(jobs.get_job_status(job_id).value)  # noqa: E731
        assert jobs.get_job_info(job_id).entrypoint == "python -m hybridlab run job.yaml --time-limit 3600"

        # wait for training to start, then take the tracking server away for a while
        deadline = time.time() + 600
        while time.time() < deadline:
            logs = jobs.get_job_logs(job_id)
            if "step 3/" in logs:
                break
            assert status() not in ("FAILED", "STOPPED"), logs
            time.sleep(2)
        else:
            raise AssertionError("training did not start:\n" + logs)
        # the server stops answering (frozen: connections hang and time out), then comes back
        os.killpg(server.pid, signal.SIGSTOP)
        time.sleep(15)  # longer than the tracker's 10 s request timeout
        os.killpg(server.pid, signal.SIGCONT)

        deadline = time.time() + 600
        while time.time() < deadline and status() not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(3)
        st = hl("status", job_id, "--address", cluster["address"]).stdout
        logs = hl("logs", job_id, "--address", cluster["address"]).stdout
        assert f"{job_id}: SUCCEEDED" in st, st + logs
        assert "is unreachable" in logs and "buffered" in logs, logs
        assert "is back" in logs, logs

        # placed across both nodes
        infos = [json.loads(p.read_text()) for p in store.glob("cluster-*/workers/rank_*.json")]
        assert len({i["node_id"] for i in infos}) == 2, infos

        # every step's metrics reached the server, plus params and artifacts
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("cluster")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
        assert steps == list(range(1, 25))
        assert run.data.params["resources.placement"] == "STRICT_SPREAD"
        assert "job.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        stop_proc(server)
