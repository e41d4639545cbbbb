"""Issue 16: sweeps that run several combinations at once (``resources.concurrent_runs``) and sweeps that span
several calls (``--resume-sweep PARENT_RUN_ID``), with real runs (local Ray + DeepSpeed + MLflow on CPU, as
tests/test_run_signals.py), plus the located errors of both, which need no Ray.

* three runs at once (fractional CPUs) all start before any ends; Ctrl-C stops every one of them cleanly
  (each KILLED with its checkpoint, one ``--resume-sweep`` line); ``--resume-sweep`` finishes them, three
  children only, one metric value per step each, unmixed;
* the resume plan on a real MLflow store (no Ray): a finished child is skipped, a killed one with a
  checkpoint continued (same run id), one without a checkpoint superseded, a missing one started; a job
  whose sweep differs is refused in one located line.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import cli_runs
import pytest
import yaml

HYBRIDLAB = cli_runs.HYBRIDLAB
LRS = [0.001, 0.002, 0.003]


def job_file(tmp_path: Path, exp: str, steps: int, concurrent: int) -> str:
    model = {"name": "sweep-tiny", "d_model": 64, "vocab_size": 32, "layout": "m3 mlp attn mlp",
             "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16},
                        "attn": {"mixer": "attention", "heads": 2}, "mlp": {"mixer": "swiglu", "hidden": 128}}}
    p = tmp_path / f"{exp}.yaml"
    p.write_text(yaml.safe_dump({
        "experiment": exp, "model": model,
        "data": {"task": "mqar", "vocab": 32, "seq_len": 32, "num_kv_pairs": 2},
        "train": {"steps": steps, "micro_batch": 4, "lr": 3.0e-3, "warmup": 2, "zero_stage": 2,
                  "checkpoint_every": 0, "log_every": 1},  # checkpoint only at the end: a stop must checkpoint
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "concurrent_runs": concurrent},
        "storage": {"path": str(tmp_path / "runs")},
        "sweep": {"train.lr": LRS},
    }, sort_keys=False))
    return str(p)


def env_for(tmp_path: Path) -> dict:
    return dict(os.environ, CI="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db", PYTHONUNBUFFERED="1")


def client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")


def run_until(args, tmp_path, trigger, timeout=600):
    """Ctrl-C to `hybridlab ARGS` once ``trigger(lines so far)`` is true; (exit code, output)."""
    return cli_runs.run_until(args, tmp_path, env_for(tmp_path), trigger, cli_runs.ctrl_c, timeout)


def run(args, tmp_path):
    r = subprocess.run(HYBRIDLAB + args, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
                       timeout=600)
    return r.returncode, r.stdout + r.stderr


def parent_of(out: str) -> str:
    return next(ln.split("sweep parent run id:")[1].split()[0] for ln in out.splitlines() if "sweep parent run id:" in ln)


def children(c, parent: str) -> dict:
    """{train.lr value: run} of a sweep parent's children (asserting one child per combination)."""
    p = c.get_run(parent)
    runs = c.search_runs([p.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_lr = {float(r.data.params["train.lr"]): r for r in runs}
    assert len(by_lr) == len(runs), [r.data.tags.get("hybridlab.sweep_values") for r in runs]
    for lr, r in by_lr.items():  # its own combination, its own folder
        assert r.data.tags["hybridlab.sweep_values"] == f"train.lr={lr}"
    return by_lr


def steps_of(c, run_id: str) -> list:
    return sorted(m.step for m in c.get_metric_history(run_id, "train/loss"))


def checkpoints(tmp_path: Path, run) -> list:
    d = tmp_path / "runs" / run.data.tags["hybridlab.run_name"]
    assert (d / "mlflow_run_id").read_text().strip() == run.info.run_id
    return sorted(int(p.name.split("_")[1]) for p in d.glob("step_*") if (p / "hybridlab.json").exists())


def resume_lines(out: str) -> list:
    return [ln for ln in out.splitlines() if "--resume" in ln]


@pytest.mark.slow
def test_concurrent_runs_stop_together_and_resume_as_a_sweep(tmp_path):
    job = job_file(tmp_path, "conc", steps=400, concurrent=3)

    def all_training(lines):
        return sum(" training 400 steps" in ln for ln in lines) == 3

    rc, out = run_until(["run", job], tmp_path, all_training)
    assert rc == 128 + signal.SIGINT and "Traceback" not in out, out
    # all three were training at once: every run's workers started before any run ended
    starts = [i for i, ln in enumerate(out.splitlines()) if " training 400 steps" in ln]
    ends = [i for i, ln in enumerate(out.splitlines()) if ln.startswith("[train.lr=") and " killed at step" in ln]
    assert len(starts) == 3 and len(ends) == 3 and max(starts) < min(ends), out
    assert all(any(ln.startswith(f"[train.lr={lr}] step ") for ln in out.splitlines()) for lr in LRS), out  # prefixed
    parent = parent_of(out)
    lines = resume_lines(out)
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT): 3 of 3 sweep runs unfinished"), out
    assert lines[0].endswith(f"hybridlab run {job} --resume-sweep {parent}"), lines

    c = client(tmp_path)
    assert c.get_run(parent).info.status == "KILLED"
    kids = children(c, parent)
    assert sorted(kids) == LRS
    saved = {}
    for lr, r in kids.items():
        assert r.info.status == "KILLED" and r.info.end_time and r.data.tags["hybridlab.status"] == "killed"
        ck = checkpoints(tmp_path, r)
        assert ck and ck[-1] >= 1, (lr, ck)  # each saved its own checkpoint when stopped
        saved[lr] = ck[-1]

    # --resume-sweep continues every child from its checkpoint, three at once, to the end
    final = max(saved.values()) + 3
    rc, out2 = run(["run", job, "--set", f"train.steps={final}", "--resume-sweep", parent], tmp_path)
    assert rc == 0, out2
    for lr in LRS:
        assert f"[train.lr={lr}] training {final} steps (resuming at step {saved[lr]})" in out2, out2
    kids2 = children(c, parent)
    assert {lr: r.info.run_id for lr, r in kids2.items()} == {lr: r.info.run_id for lr, r in kids.items()}  # no new child
    for lr, r in kids2.items():
        assert r.info.status == "FINISHED" and float(r.data.params["train.lr"]) == lr
        assert steps_of(c, r.info.run_id) == list(range(1, final + 1)), lr  # one value per step, no gap
        assert checkpoints(tmp_path, r)[-1] == final
    assert c.get_run(parent).info.status == "FINISHED"
    summary = [ln for ln in out2.splitlines() if "MLflow run id:" in ln]
    assert len(summary) == 3 and all("status: finished" in ln for ln in summary), out2


# ---------------------------------------------------------------- located errors (no Ray)


def test_concurrent_runs_must_be_a_positive_integer(tmp_path):
    job = job_file(tmp_path, "bad", steps=4, concurrent=2)
    for value, words in (("0", "must be positive, got 0"), ("1.5", "expected an integer")):
        rc, err = run(["run", job, "--dry-run", "--set", f"resources.concurrent_runs={value}"], tmp_path)
        errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(errs) == 1 and "resources.concurrent_runs" in errs[0] and words in errs[0], err


def test_dry_run_shows_the_concurrency_and_resources_per_run(tmp_path):
    job = job_file(tmp_path, "plan", steps=4, concurrent=2)
    rc, out = run(["run", job, "--dry-run", "--set", "resources.workers=2"], tmp_path)
    assert rc == 0, out
    assert "concurrency 2 run(s) at once" in out
    assert out.count("per run   {'CPU': 1.0}; 2 at once: {'CPU': 2.0}") == 3, out


def test_resume_sweep_refuses_what_is_not_its_sweep(tmp_path):
    from hybridlab.errors import UserError
    from hybridlab.jobs.record import Tag
    from hybridlab.runner import run_job
    from hybridlab.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        job = job_file(tmp_path, "refuse", steps=4, concurrent=1)
        t = Tracker(uri)
        plain_run = t.create_run("refuse", "one-run", {Tag.RUN_NAME: "x", Tag.STORAGE: str(tmp_path)})
        t.close()
        with pytest.raises(UserError, match="is not the parent run of a `hybridlab run` sweep"):
            run_job(job, resume_sweep=plain_run)
        with pytest.raises(UserError, match="no MLflow run 'nope'"):
            run_job(job, resume_sweep="nope")
        with pytest.raises(UserError, match="this job has no sweep"):
            run_job(job, overrides=["sweep={}"], resume_sweep=plain_run)
        with pytest.raises(UserError, match="give one of them"):
            run_job(job, resume=plain_run, resume_sweep=plain_run)
        for empty in ("", "  "):  # a script's unset variable: an error, not a new sweep started in its place
            with pytest.raises(UserError, match="--resume-sweep: empty run id"):
                run_job(job, resume_sweep=empty)
            with pytest.raises(UserError, match="--resume: empty run id"):
                run_job(job, resume=empty)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_resume_sweep_plan_skips_finished_continues_checkpointed_restarts_the_rest(tmp_path, monkeypatch):
    """The plan on a real MLflow store (no Ray): a FINISHED child is skipped, a KILLED one with a registered
    checkpoint is continued (same run), a KILLED one without any starts anew (the old one tagged)."""
    import json

    from hybridlab.jobs.record import Tag
    from hybridlab.jobs.spec import dump_yaml, expand_sweep, load_job
    from hybridlab.runner import _sweep_resume_plan
    from hybridlab.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    job_path = job_file(tmp_path, "plan", steps=4, concurrent=2)
    job = load_job(job_path)
    jobs = expand_sweep(job_path, job=job)
    storage = str(tmp_path / "runs")
    t = Tracker(uri)
    parent = t.create_run("plan", "plan-sweep", {Tag.SWEEP: "train.lr"})
    t.log_text(parent, dump_yaml({**job.resolved, "sweep": job.spec.sweep}), "job.yaml")
    kids = []
    for i, (j, status) in enumerate(zip(jobs, ("FINISHED", "KILLED", "KILLED"))):
        rid = t.create_run("plan", j.label, {Tag.RUN_NAME: f"r{i}", Tag.STORAGE: storage, Tag.SWEEP_VALUES: j.label},
                           parent)
        t.log_metrics(rid, {"train/loss": 1.0 + i}, 4)
        t.terminate(rid, status)
        kids.append(rid)
    t.close()
    ckpt = tmp_path / "runs" / "r1" / "step_00000002"  # only the second child has a registered checkpoint
    ckpt.mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": ckpt.name}}))
    (tmp_path / "runs" / "r2").mkdir()

    t = Tracker(uri)
    try:
        experiment, targets, finished = _sweep_resume_plan(t, parent, job_path, job, jobs)
    finally:
        t.close()
    assert experiment == "plan"
    assert list(finished) == [0] and finished[0].run_id == kids[0] and finished[0].step == 4
    assert targets[0] is None
    assert targets[1] is not None and (targets[1].run_id, targets[1].run_name, targets[1].storage) == (kids[1], "r1", storage)
    assert targets[2] is None  # a new child
    assert "no checkpoint" in client(tmp_path).get_run(kids[2]).data.tags[Tag.SUPERSEDED]
