"""Real Ray + DeepSpeed + MLflow runs on CPU (slow, but in CI): local runs, faults, resume, ZeRO stages.

Every test drives the real `hybridlab` CLI in a subprocess (its own local Ray on
127.0.0.1 with token auth, gloo workers, a sqlite MLflow store in tmp_path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HYBRIDLAB = [sys.executable, "-m", "hybridlab"]

TINY = """\
experiment: {exp}
model: zoo:tiny-hybrid
data: {{task: mqar, vocab: 32, seq_len: 32, num_kv_pairs: 2}}
train: {{steps: {steps}, micro_batch: 4, lr: 3.0e-3, warmup: 2, zero_stage: 2, checkpoint_every: 2, log_every: 1}}
resources: {{workers: 2, max_failures: 1}}
storage: {{path: {storage}}}
"""


def mlflow_client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")


def env_for(tmp_path: Path) -> dict:
    return dict(os.environ, CI="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db", PYTHONUNBUFFERED="1")


def job_file(tmp_path: Path, exp: str, steps: int, extra: str = "", storage: str | None = None) -> str:
    p = tmp_path / f"{exp}.yaml"
    p.write_text(TINY.format(exp=exp, steps=steps, storage=storage or str(tmp_path / "runs")) + textwrap.dedent(extra))
    return str(p)


def hl(args, tmp_path, timeout=400, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(HYBRIDLAB + args, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_id_of(out: str) -> str:
    for line in out.splitlines():
        if "MLflow run id:" in line:
            return line.split("MLflow run id:")[1].split()[0]
    raise AssertionError(f"no run id in output:\n{out}")


def steps_of(client, run_id, key="train/loss") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def test_kill_worker_resume_nan(tmp_path):
    """A killed worker restarts from the last checkpoint; --resume continues; nan stops naming the step."""
    job = job_file(tmp_path, "faults", steps=10)
    proc = subprocess.Popen(HYBRIDLAB + ["run", job], cwd=tmp_path, env=env_for(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_lines, killed = [], False
    runs = tmp_path / "runs"
    for line in proc.stdout:
        out_lines.append(line)
        if not killed and line.startswith("step 5/"):  # checkpoints at 2 and 4 exist
            info = next(runs.glob("*/workers/rank_1.json"))
            os.kill(json.loads(info.read_text())["pid"], signal.SIGKILL)
            killed = True
    proc.wait(timeout=60)
    out = "".join(out_lines)
    assert killed and proc.returncode == 0, out
    assert "workers restarted" in out and "restart(s)" in out, out
    client = mlflow_client(tmp_path)
    rid = run_id_of(out)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert steps_of(client, rid) == list(range(1, 11))  # continuous: steps 5.. re-run from the step-4 checkpoint
    assert client.get_metric_history(rid, "run/restarts")[-1].value == 1
    # params, tags and artifacts
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.d_model"] == "128"
    assert run.data.tags["hybridlab.layout"] and int(run.data.tags["hybridlab.params"]) > 0
    assert {"job.yaml", "check.txt", "checkpoint_location.txt"} <= {a.path for a in client.list_artifacts(rid)}

    # --resume continues the same run (from its latest checkpoint, step 10) with more steps and a new,
    # exploding learning rate: it stops at the first non-finite loss, the last good checkpoint stays
    r = hl(["run", job, "--resume", rid, "--set", "train.steps=16", "--set", "train.lr=1.0e+30",
            "--set", "train.warmup=0", "--set", "train.grad_clip=0"], tmp_path)
    assert "resuming at step 10" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 2, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "non-finite" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    import re

    bad = int(re.search(r"at step (\d+)", err[0]).group(1))
    good = int(re.search(r"last good checkpoint: step (\d+)", err[0]).group(1))
    assert 10 < bad <= 16 and good == (bad - 1) // 2 * 2, err[0]  # checkpoints every 2 steps
    assert steps_of(client, rid) == list(range(1, bad))  # the resumed steps continue the curve
    run_dir = next(runs.glob("faults-*"))
    assert (run_dir / f"step_{good:08d}" / "hybridlab.json").exists()
    assert not (run_dir / f"step_{bad:08d}").exists()
    failed = mlflow_client(tmp_path).get_run(rid)
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["hybridlab.error"]


def _can_unshare_tmpfs() -> list[str] | None:
    if not shutil.which("unshare"):
        return None
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        r = subprocess.run(cmd + ["sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"], capture_output=True)
        if r.returncode == 0:
            return cmd
    return None


def test_disk_full_keeps_previous_checkpoint(tmp_path):
    unshare = _can_unshare_tmpfs()
    if unshare is None:
        pytest.skip("cannot mount a small tmpfs here (needs unshare -m or -rm)")
    store = tmp_path / "small"
    store.mkdir()
    job = job_file(tmp_path, "full", steps=4, storage=str(store))
    script = f"""
        mount -t tmpfs -o size=80m tmpfs {store} || exit 99
        {' '.join(HYBRIDLAB)} run {job}; rc=$?
        echo "RC=$rc"
        ls {store}/full-*/ ; cat {store}/full-*/step_00000002/hybridlab.json
        """
    r = subprocess.run(unshare + ["sh", "-c", script], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                       text=True, timeout=400)
    assert "RC=2" in r.stdout, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "disk full" in err[0] and "step 4" in err[0] and "last good checkpoint: step 2 (intact)" in err[0], r.stderr
    assert "step_00000002" in r.stdout and '"step": 2' in r.stdout, r.stdout
    assert "step_00000004" not in r.stdout.split("RC=2")[1]


def test_zero_stages_agree_in_a_sweep(tmp_path):
    """ZeRO 1, 2 and 3 give the same loss curve (a sweep: one parent run, three children)."""
    job = job_file(tmp_path, "zero", steps=5, extra="""\
        sweep: {train.zero_stage: [1, 2, 3]}
        eval:
          - {task: mqar, seq_lens: [32, 64], batch_size: 8, batches: 1}
        """)
    r = hl(["run", job], tmp_path, timeout=500)
    assert r.returncode == 0, r.stdout + r.stderr
    client = mlflow_client(tmp_path)
    exp = client.get_experiment_by_name("zero")
    runs = client.search_runs([exp.experiment_id])
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(children) == 3 and len(parents) == 1
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    curves = {}
    for c in children:
        hist = sorted(client.get_metric_history(c.info.run_id, "train/loss"), key=lambda m: m.step)
        curves[c.data.params["train.zero_stage"]] = [m.value for m in hist]
        assert "eval/mqar/len_64/acc" in c.data.metrics and "eval/mqar/len_32/acc" in c.data.metrics
    assert set(curves) == {"1", "2", "3"} and all(len(v) == 5 for v in curves.values())
    for stage in ("2", "3"):
        for a, b in zip(curves["1"], curves[stage]):
            assert abs(a - b) <= 2e-3 * max(1.0, abs(a)), (stage, curves)


def test_worker_exception_is_said_and_kept(tmp_path):
    """A worker's own exception reaches the console and the run's MLflow record (a traceback artifact per
    attempt and rank, a tag), not only "failed"."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".staging").write_text("not a folder")  # the worker's set-up fails creating its staging folder
    job = job_file(tmp_path, "boom", steps=3)
    r = hl(["run", job, "--set", "resources.workers=1", "--set", "resources.max_failures=0"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert any("worker rank 0 failed after step 0: FileExistsError" in ln for ln in out.splitlines()), out
    client = mlflow_client(tmp_path)
    run = client.get_run(run_id_of(out))
    assert run.info.status == "FAILED" and "FileExistsError" in run.data.tags["hybridlab.error"]
    assert "FileExistsError" in run.data.tags["hybridlab.last_worker_error"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "failures")}
    assert names == {"failures/attempt_1_rank_0.txt"}, names
    text = Path(client.download_artifacts(run.info.run_id, "failures/attempt_1_rank_0.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and ".staging" in text
