"""Issue 15 with real runs (local Ray + DeepSpeed + MLflow on CPU, as tests/test_jobs_run.py):

* SIGINT to the process group (a terminal's Ctrl-C) and SIGTERM to the driver alone (a preemption):
  the workers stop cleanly and checkpoint, the MLflow run is KILLED with an end time, one line gives the
  ``--resume RUN_ID`` command, exit 130 / 143; ``--resume`` then continues to a finished run with one
  metric value per step;
* while training, every listening socket of the run's processes is on 127.0.0.1;
* ``generate`` on that synthetic-task checkpoint (token ids, task prompts);
* two ``hybridlab run`` at once into one sqlite store and one storage folder both finish, unmixed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import cli_runs
import pytest

pytestmark = pytest.mark.slow

HYBRIDLAB = cli_runs.HYBRIDLAB
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")

def job_text(exp: str, steps: int, every: int, workers: int, storage: Path) -> str:
    """A tiny job; its model has a vocabulary of 32, as synthetic-task models do (the byte tokenizer needs 256)."""
    import yaml

    model = {"name": "sig-tiny", "d_model": 64, "vocab_size": 32, "layout": "m3 mlp attn mlp",
             "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16},
                        "attn": {"mixer": "attention", "heads": 2}, "mlp": {"mixer": "swiglu", "hidden": 128}}}
    return yaml.safe_dump({
        "experiment": exp, "model": model,
        "data": {"task": "mqar", "vocab": 32, "seq_len": 32, "num_kv_pairs": 2},
        "train": {"steps": steps, "micro_batch": 4, "lr": 3.0e-3, "warmup": 2, "zero_stage": 2,
                  "checkpoint_every": every, "log_every": 1},
        "resources": {"workers": workers}, "storage": {"path": str(storage)},
    }, sort_keys=False)


def env_for(tmp_path: Path) -> dict:
    return dict(os.environ, CI="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db", PYTHONUNBUFFERED="1")


def client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")


def job_file(tmp_path: Path, exp: str, steps: int, every: int = 0, workers: int = 2) -> str:
    p = tmp_path / f"{exp}.yaml"
    p.write_text(job_text(exp, steps, every, workers, tmp_path / "runs"))
    return str(p)


def listening_addresses(pid: int) -> list:
    """Every listening TCP socket of ``pid`` and its descendants (the private Ray head, raylet, workers...)."""
    import psutil

    root = psutil.Process(pid)
    pids = {pid} | {c.pid for c in root.children(recursive=True)}
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def run_until(args, tmp_path, when: str, action, timeout=600):
    """``action(proc)`` on the first output line starting with ``when``."""
    return cli_runs.run_until(args, tmp_path, env_for(tmp_path), lambda lines: lines[-1].startswith(when), action, timeout)


def resume_line(out: str, rid: str) -> str:
    lines = [ln for ln in out.splitlines() if "--resume" in ln]
    assert len(lines) == 1 and f"--resume {rid}" in lines[0] and lines[0].startswith("interrupted ("), out
    return lines[0]


def run_id_of(out: str) -> str:
    for line in out.splitlines():
        if "MLflow run id:" in line:
            return line.split("MLflow run id:")[1].split()[0]
    raise AssertionError(f"no run id in output:\n{out}")


def test_sigint_sigterm_kill_cleanly_and_resume(tmp_path):
    job = job_file(tmp_path, "sig", steps=200)  # checkpoint_every 0: only at the end, so a stop must checkpoint
    sockets = []

    def inspect_then_ctrl_c(proc):
        sockets.extend(listening_addresses(proc.pid))
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole foreground group

    rc, out = run_until(["run", job], tmp_path, "step 3/", inspect_then_ctrl_c)
    assert rc == 128 + signal.SIGINT, out
    rid = run_id_of(out)
    assert "Traceback" not in out
    resume_line(out, rid)
    # the embedded default listens on loopback only: GCS, raylet, workers, agents, the driver
    assert len(sockets) >= 5 and all(ip in LOOPBACK for ip, _, _ in sockets), sockets

    c = client(tmp_path)
    run = c.get_run(rid)
    assert run.info.status == "KILLED" and run.info.end_time and run.data.tags["hybridlab.status"] == "killed"
    first_stop = max(m.step for m in c.get_metric_history(rid, "train/loss"))
    run_dir = next((tmp_path / "runs").glob("sig-*"))
    ckpts = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("step_*") if (p / "hybridlab.json").exists())
    assert ckpts and ckpts[-1] >= 3, ckpts  # saved when stopped (no periodic checkpoint had been written)

    # --resume continues from that checkpoint; SIGTERM to the driver alone (a preemption) stops it again
    stop_at = ckpts[-1] + 2
    rc, out = run_until(["run", job, "--resume", rid], tmp_path, f"step {stop_at}/",
                        lambda proc: proc.send_signal(signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM, out
    assert f"resuming at step {ckpts[-1]}" in out, out
    resume_line(out, rid)
    run = c.get_run(rid)
    assert run.info.status == "KILLED" and run.info.end_time
    second = max(int(p.name.split("_")[1]) for p in run_dir.glob("step_*") if (p / "hybridlab.json").exists())
    assert second >= stop_at

    # and once more, to the end: a finished run with one value per step, steps 1..N without a gap; writes
    # that an earlier driver could not send (a spill file in the run's folder) are replayed first
    spill = run_dir / f"mlflow_unsent_{rid}_1.jsonl"
    spill.write_text(json.dumps({"kind": "metrics", "run_id": rid, "metrics": [["test/replayed", 7.0, 1000, 1]]}) + "\n")
    final = second + 3
    r = subprocess.run(HYBRIDLAB + ["run", job, "--resume", rid, "--set", f"train.steps={final}"], cwd=tmp_path,
                       env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["hybridlab.status"] == "finished"
    hist = c.get_metric_history(rid, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, final + 1)), (first_stop, [m.step for m in hist])
    assert run.data.metrics["test/replayed"] == 7.0 and not spill.exists() and "replayed 1 MLflow writes" in r.stdout

    # generate works on this synthetic-task checkpoint (vocab 32 < the byte tokenizer's 256)
    g = subprocess.run(HYBRIDLAB + ["generate", str(run_dir), "--tokens", "1,2,3", "--tokens", "4,5", "-n", "3", "--json"],
                       cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr
    res = json.loads(g.stdout)["results"]
    assert [r["prompt_tokens"] for r in res] == [[1, 2, 3], [4, 5]]
    assert all(len(r["tokens"]) == 3 and all(0 <= t < 32 for t in r["tokens"]) for r in res)
    g = subprocess.run(HYBRIDLAB + ["generate", str(run_dir), "--task-prompts", "2", "-n", "1"], cwd=tmp_path,
                       env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert g.returncode == 0 and g.stdout.count("expected:") == 2, g.stdout + g.stderr
    g = subprocess.run(HYBRIDLAB + ["generate", str(run_dir), "-p", "hi"], cwd=tmp_path, env=env_for(tmp_path),
                       capture_output=True, text=True, timeout=300)
    err = [ln for ln in g.stderr.splitlines() if ln.startswith("error:")]
    assert g.returncode == 2 and len(err) == 1 and "--tokens" in err[0], g.stderr


def test_two_runs_at_once_into_one_store(tmp_path):
    jobs = [job_file(tmp_path, f"conc{i}", steps=4, every=2, workers=1) for i in (0, 1)]
    procs = [subprocess.Popen(HYBRIDLAB + ["run", j], cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for j in jobs]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    c = client(tmp_path)
    for i, out in enumerate(outs):
        rid = run_id_of(out)
        run = c.get_run(rid)
        assert run.info.status == "FINISHED" and c.get_experiment(run.info.experiment_id).name == f"conc{i}"
        assert sorted(m.step for m in c.get_metric_history(rid, "train/loss")) == [1, 2, 3, 4]
        run_dir = tmp_path / "runs" / run.data.tags["hybridlab.run_name"]
        assert (run_dir / "mlflow_run_id").read_text().strip() == rid
        assert json.loads((run_dir / "step_00000004" / "hybridlab.json").read_text())["step"] == 4
    assert len({run_id_of(o) for o in outs}) == 2
