"""Issue 15 without a Ray run: hostile YAML under a memory limit, pre-flight limits, plain zoo names, the
tracker against a dead server (bounded wait, spill file, `mlflow-replay`), `compare` status and one value
per step, `hybridlab ui` stopping its children, the wheel's package discovery, the CLI tree and the shared
step function (no host sync per micro-step)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hybridlab.localray import free_ports

ROOT = Path(__file__).resolve().parents[1]
HYBRIDLAB = [sys.executable, "-m", "hybridlab"]

GOOD = """\
experiment: rel
model: zoo:tiny-hybrid
data: {task: mqar, vocab: 64, seq_len: 64, num_kv_pairs: 4}
train: {steps: 4, micro_batch: 4}
resources: {workers: 1}
"""

BOMB = """\
experiment: bomb
model: zoo:tiny-hybrid
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

MEMORY_LIMIT = 3 << 30  # address space: torch and the CLI fit; a walk of the expanded bomb (~4e8 values) does not


def _limited(limit: int):
    def pre():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return pre


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln and "WARNING" not in ln]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return lines[0]


def _cli(args, cwd, timeout=120, preexec_fn=None, env=None):
    e = dict(os.environ, CI="1", MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlruns.db")
    e.update(env or {})
    return subprocess.run(HYBRIDLAB + list(args), cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


# ---------------------------------------------------------------- YAML with bounded work


@pytest.mark.parametrize("cmd", [["check"], ["run", "--dry-run"], ["run"]], ids=["check", "dry-run", "run"])
def test_alias_bomb_is_one_line_under_a_memory_limit(tmp_path, cmd):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    t0 = time.time()
    r = _cli([cmd[0], str(bomb), *cmd[1:]], tmp_path, preexec_fn=_limited(MEMORY_LIMIT))
    msg = _one_error_line(r)
    assert "bomb.yaml:" in msg and "alias bomb" in msg, msg
    assert time.time() - t0 < 60
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "hybridlab_runs").exists()


def test_yaml_bounds_and_aliases_expanded_once(tmp_path):
    from hybridlab.arch.specio import MAX_FILE_BYTES, SpecError, load_value, load_yaml_file
    from hybridlab.jobs.spec import load_job

    # a legitimate alias: each use is its own copy (an override of one never edits the other)
    p = tmp_path / "job.yaml"
    p.write_text(GOOD.replace("data: {", "data: &d {") + "eval:\n  - {<<: *d, task: mqar, seq_lens: [64]}\n")
    job = load_job(str(p), ["data.num_kv_pairs=2"])
    assert job.resolved["data"]["num_kv_pairs"] == 2 and job.resolved["eval"][0]["num_kv_pairs"] == 4
    big = tmp_path / "big.yaml"
    big.write_text("x: '" + "a" * MAX_FILE_BYTES + "'\n")
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        load_yaml_file(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(SpecError, match="nested more than"):
        load_yaml_file(deep)
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [1, *a]\n")
    with pytest.raises(SpecError, match="refers to the node that contains it"):
        load_yaml_file(loop)
    # a --set value is bounded the same way
    flow = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + [f"&{c} [" + ",".join([f"*{p}"] * 10) + "]"
                                                          for p, c in zip("abcdefg", "bcdefgh")]) + "]"
    with pytest.raises(SpecError, match="alias bomb"):
        load_value(flow)
    with pytest.raises(SpecError, match="alias bomb"):
        load_job(str(p), [f"train.deepspeed.x={flow}"])


# ---------------------------------------------------------------- pre-flight limits


def _job(tmp_path, text, name="job.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_preflight_limits_are_located_lines(tmp_path):
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.spec import load_job

    cases = [
        (GOOD, ["model.d_model=1000000000"], r"job\.yaml:2 model: the model needs .* per worker"),
        (GOOD, ["train.micro_batch=10000000"], r"job\.yaml --set train\.micro_batch: .* activations"),
        (GOOD + "eval:\n  - {task: mqar, seq_lens: [64, 10000000]}\n", [],
         r"job\.yaml:7 eval\[0\]\.seq_lens\[1\]: an eval batch of 32 x 10000000 tokens"),
        (GOOD + f"storage: {{path: {tmp_path}/job.yaml/runs}}\n", [], r"job\.yaml:6 storage\.path: .* is a file, not a folder"),
        (GOOD + "storage: {path: /proc/no/such/runs}\n", [], r"job\.yaml:6 storage\.path: .* is not writable"),
    ]
    for text, overrides, pattern in cases:
        with pytest.raises(SpecError) as e:
            load_job(_job(tmp_path, text), overrides)
        assert re.search(pattern, str(e.value)), str(e.value)
    # a worker re-reading its job, and `submit` (whose cluster checks for itself), skip this machine's limits
    assert load_job(_job(tmp_path, GOOD + "storage: {path: /proc/no/such/runs}\n"), limits=False)


def test_preflight_disk_room_counts_only_where_the_workers_write(tmp_path, monkeypatch):
    """A checkpoint that cannot fit on this disk is refused for workers on this machine, but a GPU
    job validated on a machine without GPUs (its workers run elsewhere) is not judged by this disk."""
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs import checkpoint, preflight
    from hybridlab.jobs.spec import load_job

    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000)
    job = _job(tmp_path, GOOD + f"storage: {{path: {tmp_path}/runs}}\n")
    with pytest.raises(SpecError, match=r"job\.yaml:6 storage\.path: .* free on its disk, a checkpoint"):
        load_job(job)
    no_gpu = preflight.HostLimits(memory=1 << 40, gpu_memory=None)
    monkeypatch.setattr(preflight.HostLimits, "detect", staticmethod(lambda: no_gpu))
    assert load_job(job, ["resources.gpus_per_worker=1"]).spec.resources.gpus_per_worker == 1
    with pytest.raises(SpecError, match="free on its disk"):
        load_job(job)  # CPU workers run here: this disk is theirs


def test_preflight_stops_run_and_dry_run_before_anything_starts(tmp_path):
    job = _job(tmp_path, GOOD + "storage: {path: /proc/no/such/runs}\n")
    for args in (["run", job], ["run", job, "--dry-run"], ["check", job]):
        t0 = time.time()
        msg = _one_error_line(_cli(args, tmp_path))
        assert "storage.path" in msg and time.time() - t0 < 60, msg
    assert not (tmp_path / "mlruns.db").exists()
    r = _cli(["run", _job(tmp_path, GOOD, "ok.yaml"), "--dry-run"], tmp_path)
    assert r.returncode == 0 and "memory    ~" in r.stdout, r.stdout + r.stderr


def test_local_placement_refuses_what_one_machine_cannot_place(tmp_path):
    """The embedded local Ray is one node with this machine's cores and GPUs: a run it could never place is
    refused at its key (Ray itself would wait for the resources forever)."""
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.preflight import HostLimits, check_local_placement
    from hybridlab.jobs.spec import load_job

    two_cores = HostLimits(memory=1 << 40, gpu_memory=None, cpus=2, gpus=0)
    one_gpu = HostLimits(memory=1 << 40, gpu_memory=80 << 30, cpus=16, gpus=1)
    job = _job(tmp_path, GOOD)
    cases = [
        (two_cores, ["resources.gpus_per_worker=0.25"], r"--set resources\.gpus_per_worker: 0\.25 GPU per worker, but this machine has no GPU"),
        (two_cores, ["resources.workers=3"], r"--set resources\.workers: 3 workers x 1 CPU \(cpus_per_worker\) need 3 CPUs, and this machine has 2"),
        (two_cores, ["resources.cpus_per_worker=4"], r"--set resources\.cpus_per_worker: 4 CPUs per worker, and this machine has 2"),
        (one_gpu, ["resources.workers=2", "resources.gpus_per_worker=1"], r"resources\.workers: 2 workers x 1 GPU .* need 2 GPUs, and this machine has 1"),
        (one_gpu, ["resources.workers=2", "resources.placement=STRICT_SPREAD"], r"resources\.placement: STRICT_SPREAD puts each of the 2 workers on a node"),
        (one_gpu, ["resources.custom={node_b: 1}"], r"resources\.custom: 'node_b': the local Ray has no custom resources"),
    ]
    for host, overrides, pattern in cases:
        j = load_job(job, overrides)
        with pytest.raises(SpecError, match=pattern):
            check_local_placement(j.spec, j.src, host)
    for host, overrides in ((two_cores, ["resources.workers=2"]), (two_cores, ["resources.workers=4", "resources.cpus_per_worker=0.5"]),
                            (one_gpu, ["resources.workers=8", "resources.gpus_per_worker=0.125"]), (one_gpu, ["resources.placement=STRICT_SPREAD"])):
        j = load_job(job, overrides)
        check_local_placement(j.spec, j.src, host)  # fits: nothing raised


def test_run_refuses_an_unplaceable_local_run_and_dry_run_says_it(tmp_path):
    job = _job(tmp_path, GOOD)
    msg = _one_error_line(_cli(["run", job, "--set", f"resources.workers={(os.cpu_count() or 1) + 1}"], tmp_path))
    assert "resources.workers:" in msg and "this machine has" in msg, msg
    assert not (tmp_path / "mlruns.db").exists()  # refused before anything started
    r = _cli(["run", job, "--dry-run", "--set", "resources.custom={node_b: 1}"], tmp_path)
    assert r.returncode == 0 and "`hybridlab run` on this machine would refuse it:" in r.stdout, r.stdout + r.stderr
    # inside a submitted job (Ray already there) the cluster places the workers: not judged by this machine
    r = _cli(["run", job, "--dry-run", "--set", "resources.custom={node_b: 1}"], tmp_path, env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 0 and "would refuse" not in r.stdout, r.stdout + r.stderr


PENDING_SCRIPT = """
import ray
from ray.util import placement_group
from hybridlab.pending import pending_workers_line
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
placed = placement_group([{"CPU": 1}])
ray.get(placed.ready(), timeout=60)
print("A", pending_workers_line(61, 1, {"CPU": 1}, "PACK"))
too_big = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
print("B", pending_workers_line(245, 2, {"CPU": 1}, "STRICT_SPREAD"))
ray.shutdown()
print("C", pending_workers_line(300, 1, {"CPU": 1}, "PACK"))
"""


def test_pending_workers_line_says_what_the_placement_waits_for(tmp_path):
    """What the driver prints while no worker has reported, against a real one-node Ray (in a process of
    its own: this test process must not stay joined to a Ray)."""
    r = subprocess.run([sys.executable, "-c", PENDING_SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, RAY_TRAIN_V2_ENABLED="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {ln[0]: ln[2:] for ln in r.stdout.splitlines() if ln[:2] in ("A ", "B ", "C ")}
    assert lines["A"] == ("no worker has reported after 61 s (asked: 1 × {CPU: 1}, PACK): placed; the worker "
                          "processes are starting; cluster: 1 node(s) alive, CPU 0 of 1 free"), lines
    assert lines["B"].startswith("no worker has reported after 245 s (asked: 2 × {CPU: 1}, STRICT_SPREAD): "
                                 "1 placement group(s) waiting for resources; cluster: 1 node(s) alive"), lines
    assert "the cluster's state could not be read" in lines["C"], lines


def test_driver_notes_what_workers_wait_for_until_they_start_and_after_a_failure(tmp_path, monkeypatch):
    """The cadence of the waiting line: none before a minute, one at a minute, then every NOTE_EVERY_S; none
    once the workers started; the clock starts again when a worker fails (a restart is awaited)."""
    from hybridlab import runner
    from hybridlab.jobs import record as rec
    from hybridlab.jobs.spec import load_job
    from hybridlab.pending import FIRST_NOTE_S, NOTE_EVERY_S

    class Notes:
        def __init__(self):
            self.lines = []

        def note(self, text):
            self.lines.append(text)

        def start(self, *a):
            pass

    class Tracker:
        def set_tags(self, *a):
            pass

        def log_text(self, *a):
            pass

    asked = []
    monkeypatch.setattr(runner, "pending_workers_line", lambda waited, n, per, strategy: asked.append((round(waited), n, per, strategy)) or "WAIT")
    d = runner.RunDriver(load_job(_job(tmp_path, GOOD), ["resources.workers=2"]), Tracker(), "rel", None, None, None,
                         Notes(), runner.StopSignals())
    d.run_id, d.out = "r", runner.RunOutcome(run_id="r", run_name="n", label="")
    now = time.time()
    d.waiting_since = now - (FIRST_NOTE_S - 5)
    assert d._say_what_workers_wait_for(FIRST_NOTE_S) == FIRST_NOTE_S and not asked
    d.waiting_since = now - (FIRST_NOTE_S + 1)
    due = d._say_what_workers_wait_for(FIRST_NOTE_S)
    assert asked == [(FIRST_NOTE_S + 1, 2, {"CPU": 1.0}, "PACK")] and d.progress.lines == ["WAIT"]
    assert due == pytest.approx(FIRST_NOTE_S + 1 + NOTE_EVERY_S, abs=1)
    assert d._say_what_workers_wait_for(due) == due and len(asked) == 1  # not due again yet
    d.on_message(rec.Start(step=0, steps=4, world=2, params=1, device="cpu", flops_per_token=1.0))
    assert d.waiting_since is None and d._say_what_workers_wait_for(due) == FIRST_NOTE_S and len(asked) == 1
    d.on_message(rec.Failure(rank=1, step=2, error="RuntimeError: boom"))
    assert d.waiting_since is not None and time.time() - d.waiting_since < 5  # a restart is awaited from now


def test_time_limit_durations_and_bad_values():
    from hybridlab.commands.options import duration_s

    assert [duration_s(t) for t in ("600", "90s", "7m", "2h30m", "1.5h", "1h0m1s", " 45S ")] == \
        [600, 90, 420, 9000, 5400, 3601, 45]
    for bad in ("7x", "", "-5", "1h5", "m", "5 m", "inf"):
        with pytest.raises(ValueError, match="not a duration"):
            duration_s(bad)
    for zero in ("0", "0s", "0h0m"):
        with pytest.raises(ValueError, match="more than 0"):
            duration_s(zero)


def test_time_limit_bad_value_is_one_line(tmp_path):
    msg = _one_error_line(_cli(["run", _job(tmp_path, GOOD), "--time-limit", "7x"], tmp_path))
    assert msg == "error: --time-limit 7x: not a duration (e.g. 600, 90s, 7m, 2h30m)", msg
    assert not (tmp_path / "mlruns.db").exists()


def test_time_limit_stops_like_a_first_sigint_without_raising():
    """The clock's stop goes the way of a first SIGINT while training (the relay asks the run to stop) but
    is never raised into the main thread; the summary names it instead of a signal."""
    import threading

    from hybridlab import runner

    signals = runner.StopSignals()
    done, asked = threading.Event(), threading.Event()
    signals.relay(asked.set, done)
    clock = signals.deadline(0.2)
    assert asked.wait(10) and signals.requested and signals.exit_code == 130
    assert signals.name == "time limit 0.2s" and clock is not None
    signals.expire("later")  # only the first stop counts
    assert signals.name == "time limit 0.2s"
    done.set()
    assert runner._duration_text(9000) == "2h30m" and runner._duration_text(61) == "1m1s"
    assert runner.StopSignals().deadline(None) is None


def test_time_limit_before_training_ends_the_run_as_interrupted(tmp_path):
    r = _cli(["run", _job(tmp_path, GOOD), "--time-limit", "1", "--set", f"storage.path={tmp_path}/runs"], tmp_path, timeout=300)
    assert r.returncode == 130, r.stdout + r.stderr
    assert "interrupted (time limit 1s)" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_zoo_names_are_plain_names(tmp_path):
    from hybridlab.arch import load_model_spec
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.spec import load_job

    for bad in ("../zoo/tiny-hybrid", "..", "a/b", "/etc/passwd", ".hidden"):
        with pytest.raises(SpecError, match="zoo names are plain names"):
            load_model_spec(f"zoo:{bad}")
    with pytest.raises(SpecError, match=r"job\.yaml:2 model: bad zoo name"):
        load_job(_job(tmp_path, GOOD.replace("zoo:tiny-hybrid", "zoo:../zoo/tiny-hybrid")))
    assert load_model_spec("zoo:tiny-hybrid").name == "tiny-hybrid"


# ---------------------------------------------------------------- the tracker and a dead server


def test_dead_tracking_server_bounded_wait_then_replay(tmp_path):
    from mlflow import MlflowClient

    from hybridlab.tracking import Tracker

    store = f"sqlite:///{tmp_path}/mlruns.db"
    target = MlflowClient(store)
    exp = target.create_experiment("replay")
    rid = target.create_run(exp, run_name="r").info.run_id
    (port,) = free_ports(1)  # a port nobody listens on: the server is gone for good
    t = Tracker(f"http://127.0.0.1:{port}")
    for step in (1, 2, 3):
        t.log_metrics(rid, {"train/loss": 1.0 / step}, step)
    t.set_tags(rid, {"hybridlab.status": "finished"})
    t.terminate(rid, "FINISHED")
    t0 = time.time()
    files = t.close(timeout=2, spill_dirs={rid: str(tmp_path / "run")})
    assert time.time() - t0 < 20  # seconds, not minutes
    assert len(files) == 1 and Path(files[0]).name.startswith(f"mlflow_unsent_{rid}_")
    r = _cli(["mlflow-replay", files[0], "--uri", store], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not Path(files[0]).exists() and Path(files[0] + ".replayed").exists()
    run = target.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["hybridlab.status"] == "finished"
    assert sorted(m.step for m in target.get_metric_history(rid, "train/loss")) == [1, 2, 3]
    bad = tmp_path / "mlflow_unsent_x_1.jsonl"
    bad.write_text("not json\n")
    assert "not a line of an mlflow_unsent file" in _one_error_line(_cli(["mlflow-replay", str(bad)], tmp_path))


def test_a_run_left_running_by_a_dead_driver_is_closed(tmp_path):
    from mlflow import MlflowClient

    from hybridlab.runner import _driver_id, close_orphaned_runs
    from hybridlab.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("orphans")
    host = socket.gethostname()
    dead = c.create_run(exp, tags={"hybridlab.host": host, "hybridlab.driver_pid": "999999999:1"}).info.run_id
    alive = c.create_run(exp, tags={"hybridlab.host": host, "hybridlab.driver_pid": _driver_id()}).info.run_id
    elsewhere = c.create_run(exp, tags={"hybridlab.host": "other", "hybridlab.driver_pid": "999999999:1"}).info.run_id
    t = Tracker(uri)
    close_orphaned_runs(t, "orphans")
    t.close()
    assert c.get_run(dead).info.status == "FAILED" and "exited without closing" in c.get_run(dead).data.tags["hybridlab.error"]
    assert c.get_run(alive).info.status == "RUNNING" and c.get_run(elsewhere).info.status == "RUNNING"


# ---------------------------------------------------------------- compare: status, one value per step


def test_compare_shows_status_and_one_value_per_step(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from hybridlab.compare import compare

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("st")
    ids = {}
    for name, status in (("done", "FINISHED"), ("broke", "FAILED"), ("going", None)):
        time.sleep(0.01)
        rid = c.create_run(exp, run_name=name, tags={"hybridlab.layout": name}).info.run_id
        ms = [Metric("train/loss", 3.0 - s / 10, 1000 + s, s) for s in (1, 2, 3, 4)]
        ms.append(Metric("train/loss", 9.0, 999, 3))  # step 3 logged before a restart, then again
        c.log_batch(rid, metrics=ms, synchronous=True)
        if status:
            c.set_terminated(rid, status)
        ids[name] = rid
    out = compare("st", uri=uri, out=str(tmp_path / "a"), log=False)
    assert [r.run_id for r in out.runs] == [ids["done"]]
    assert [s for s, _, _ in out.runs[0].loss_history] == [1, 2, 3, 4]
    assert out.runs[0].loss_history[2][2] == pytest.approx(2.7)  # the newest value of step 3
    r = _cli(["compare", "st", "--all", "--out", str(tmp_path / "b"), "--no-log"], tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr
    import csv

    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "b" / "summary.csv"))}
    assert {k: v["status"] for k, v in rows.items()} == {"done": "FINISHED", "broke": "FAILED", "going": "RUNNING"}
    assert "status" in r.stdout and "running" in r.stdout
    loss_rows = list(csv.DictReader(open(tmp_path / "b" / "loss.csv")))
    assert len(loss_rows) == 3 * 4
    failed = compare("st", uri=uri, out=str(tmp_path / "c"), log=False, status="failed")
    assert [r.run_id for r in failed.runs] == [ids["broke"]]


# ---------------------------------------------------------------- `hybridlab ui` stops its children


def _listening(pids: set) -> list:
    import psutil

    return [c.laddr for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _tree(pid: int) -> set:
    import psutil

    try:
        p = psutil.Process(pid)
        return {pid} | {c.pid for c in p.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_ui_binds_loopback_and_stops_its_children_on_sigterm(tmp_path):
    import psutil

    (port,) = free_ports(1)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db")
    ui = subprocess.Popen(HYBRIDLAB + ["ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, pids = time.time() + 240, set()
        while time.time() < deadline:
            pids = _tree(ui.pid)
            if any(a.port == port for a in _listening(pids)):
                break
            assert ui.poll() is None, ui.stdout.read()
            time.sleep(1)
        else:
            raise AssertionError("the MLflow UI did not start")
        time.sleep(2)
        pids = _tree(ui.pid)
        assert len(pids) >= 2  # the CLI and the MLflow server (and its workers)
        addrs = _listening(pids)
        assert addrs and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for a in addrs), addrs
        ui.send_signal(signal.SIGTERM)  # the CLI alone, as a service manager would
        assert ui.wait(60) == 128 + signal.SIGTERM
        time.sleep(1)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, [psutil.Process(p).cmdline() for p in alive]
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)


# ---------------------------------------------------------------- packaging, the CLI tree, the bench defaults


def test_setup_finds_every_package_folder():
    sys.path.insert(0, str(ROOT))
    try:
        import setup as setup_py
    finally:
        sys.path.remove(str(ROOT))
    found = set(setup_py.mapped_packages())
    expected = set()
    for name, folder in setup_py.PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in rel:
                expected.add(".".join((name, *rel)))
    assert "hybridlab.kernels.ssm_io" in found and found == expected


def test_cli_is_a_tree_and_bench_defaults_have_one_home():
    from hybridlab.kernels.bench.options import DecodeBench, SsmBench, parse

    for f in (ROOT / "platform" / "hybridlab" / "commands").glob("*.py"):
        text = f.read_text()
        assert not re.search(r"from \.\.cli import|import hybridlab\.cli|from hybridlab\.cli import|from hybridlab import cli", text), f
    assert parse(SsmBench, [], "") == SsmBench() and parse(DecodeBench, [], "") == DecodeBench()
    assert parse(SsmBench, ["--no-peers", "--ranks", "4"], "") == SsmBench(peers=False, ranks="4")
    from typer.testing import CliRunner

    from hybridlab.cli import app

    for group, cls in (("ssm", SsmBench), ("decode", DecodeBench)):
        text = CliRunner().invoke(app, ["bench", group, "--help"], env={"COLUMNS": "200"}).output
        assert cls.out in text
    import typer

    root = typer.main.get_command(app).commands
    assert {"check", "zoo", "generate", "run", "mlflow-replay", "submit", "status", "logs", "stop", "eval",
            "compare", "ui", "bench", "data"} <= set(root)
    assert {"ssm", "decode", "train"} <= set(root["bench"].commands) and "prepare" in root["data"].commands


# ---------------------------------------------------------------- the step: device statistics, no host sync


class _Engine:
    """A minimal stand-in for a DeepSpeed engine around a real module and optimizer (what TrainStep calls)."""

    def __init__(self, model, lr):
        self.module, self.opt = model, __import__("torch").optim.SGD(model.parameters(), lr=lr)

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def test_step_keeps_statistics_on_device_and_names_the_first_bad_step(monkeypatch):
    import torch

    from hybridlab.jobs.data import RandomTokens
    from hybridlab.jobs.step import StepStats, TrainStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    engine = _Engine(model, lr=0.1)
    step, stats = TrainStep(engine, torch.device("cpu")), StepStats(torch.device("cpu"))
    stream = RandomTokens(16, 8, 2, seed=0)

    def no_sync(*a, **k):
        raise AssertionError("a host sync inside the step loop")

    with monkeypatch.context() as m:  # between sync points nothing reads a device value on the host
        for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
            m.setattr(torch.Tensor, name, no_sync)
        for s in range(1, 4):
            out = step([stream.get(s, 0), stream.get(s, 1)])
            stats.add(s, out.loss)
            if s == 2:
                with torch.no_grad():
                    model[1].weight.fill_(float("nan"))
    synced = stats.sync()
    assert synced.nonfinite and synced.first_bad_step == 3 and not synced.stop
    again = stats.sync(stop=True)  # a new window
    assert not again.nonfinite and again.stop and again.first_bad_step is None


class _ExitedHead:
    """A `ray start` child that has already exited (its head.log says why)."""

    pid = 0

    def poll(self) -> int:
        return 1


def _heads(tmp_path, monkeypatch, logs: list[str]) -> list[str]:
    """LocalRay whose N-th head launch writes logs[N] into head.log; ray.init and the env join are Ray's own.
    Returns the list of launched head folders (grows as LocalRay launches)."""
    import ray

    from hybridlab import localray

    launched: list[str] = []

    def launch(self):
        log = logs[len(launched)]
        self.dir = str(tmp_path / f"head{len(launched)}")
        os.makedirs(self.dir)
        (Path(self.dir) / "head.log").write_text(log)
        launched.append(self.dir)
        self.proc = None if localray.READY_LINE in log else _ExitedHead()
        return {}, 1234

    monkeypatch.setattr(localray.LocalRay, "_launch_head", launch)
    monkeypatch.setattr(localray, "_join_env", lambda auth: None)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setenv("RAY_ADDRESS", "unset-by-the-test")  # restored after the test
    return launched


OVERLOADED = "Exception: The current node timed out during startup. This could happen because ... overloaded."


def test_local_ray_head_starts_again_once_when_its_raylet_was_too_slow(tmp_path, monkeypatch):
    from hybridlab.localray import READY_LINE, LocalRay

    launched = _heads(tmp_path, monkeypatch, [OVERLOADED, READY_LINE])
    head = LocalRay(num_cpus=1)
    head.start()
    assert len(launched) == 2 and head.address == "127.0.0.1:1234"
    assert not os.path.exists(launched[0])  # the first head's folder went with it


@pytest.mark.parametrize("logs, launches", [([OVERLOADED, OVERLOADED], 2), (["Error: port 1234 in use"], 1)])
def test_local_ray_head_gives_up_with_one_line(tmp_path, monkeypatch, logs, launches):
    from hybridlab.errors import UserError
    from hybridlab.localray import LocalRay

    launched = _heads(tmp_path, monkeypatch, logs)
    with pytest.raises(UserError, match=r"^the local Ray did not start: ") as e:
        LocalRay(num_cpus=1).start()
    assert len(launched) == launches and "\n" not in str(e.value)
    assert not any(os.path.exists(d) for d in launched)


def test_free_ports_are_distinct_and_free():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for p in ports[:8]:  # released: each can be bound again
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_sqlite_stores_artifacts_sit_beside_its_file_whatever_the_working_folder(tmp_path, monkeypatch):
    """A sweep's folder (its .db and mlruns/ beside it) is the whole store: a new experiment's artifacts go
    to mlruns/<experiment> next to the database file, not to ./mlruns of the folder the run started in
    (a store copied off a GPU machine came back without the job.yaml that --resume-sweep reads)."""
    from hybridlab.tracking import Tracker

    (tmp_path / "store").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    t = Tracker(f"sqlite:///{tmp_path / 'store' / 'runs.db'}")
    exp = t.client.get_experiment(t.experiment_id("my exp/1"))
    assert exp.artifact_location == (tmp_path / "store" / "mlruns" / "my_exp_1").as_uri()
    rid = t.client.create_run(exp.experiment_id).info.run_id
    (tmp_path / "a.txt").write_text("x")
    t.client.log_artifact(rid, str(tmp_path / "a.txt"))
    assert (tmp_path / "store" / "mlruns" / "my_exp_1" / rid / "artifacts" / "a.txt").read_text() == "x"
    assert not (tmp_path / "elsewhere" / "mlruns").exists()
    rel = Tracker("sqlite:///rel.db")  # relative to the working folder, as MLflow reads it
    assert rel.client.get_experiment(rel.experiment_id("e")).artifact_location == (tmp_path / "elsewhere" / "mlruns" / "e").as_uri()
