"""`hybridlab eval` and `hybridlab compare`.

* bad input (unknown task, run id not found, non-positive length, unknown
  experiment, bad --metric) -> one line on stderr, exit 2;
* compare on runs logged straight through the MLflow API (fast, no Ray);
* the real thing: a two-run sweep trained by `hybridlab run` (a few steps of a
  tiny parity model), then `hybridlab eval` (logs the expected metric names,
  into the run and into a child run) and `hybridlab compare` (table, PNGs,
  CSV/JSON, a comparison run holding them as artifacts).
"""

from __future__ import annotations

import csv
import json
import textwrap
import time

import os
import subprocess
import sys

import pytest

mlflow = pytest.importorskip("mlflow")


def run_cli(*args, env=None, timeout=300):
    """The real CLI in a subprocess, as `python -m hybridlab` (all commands registered)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=root, env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def _env(tmp_path):
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db", "CI": "1"}


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " INFO " not in ln and "WARNING" not in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---------------------------------------------------------------- bad input (in-process: fast)


def _main_error(capsys, argv):
    from hybridlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_eval_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    msg = _main_error(capsys, ["eval", "0" * 32, "--task", "parityy", "--lengths", "64"])
    assert "unknown task 'parityy'" in msg and "did you mean 'parity'" in msg
    for bad in ("0", "64,-8", "abc", "64,0"):
        msg = _main_error(capsys, ["eval", "0" * 32, "--task", "parity", "--lengths", bad])
        assert "--lengths" in msg
    msg = _main_error(capsys, ["eval", "0" * 32, "--task", "parity", "--lengths", "64", "--batches", "0"])
    assert "--batches" in msg
    msg = _main_error(capsys, ["eval", "0123456789abcdef0123456789abcdef", "--task", "parity", "--lengths", "64"])
    assert "no MLflow run or checkpoint folder '0123456789abcdef0123456789abcdef'" in msg
    msg = _main_error(capsys, ["eval", str(tmp_path), "--task", "parity", "--lengths", "64"])
    assert "no checkpoint in this folder" in msg


def test_compare_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    client = mlflow.MlflowClient()
    client.create_experiment("layouts")
    msg = _main_error(capsys, ["compare", "layoutz"])
    assert "no MLflow experiment 'layoutz'" in msg and "did you mean 'layouts'" in msg
    msg = _main_error(capsys, ["compare", "layouts"])
    assert "no training runs" in msg
    msg = _main_error(capsys, ["compare", "layouts", "--metric", "accuracy"])
    assert "--metric" in msg


def test_reading_a_store_that_is_not_there_makes_none(tmp_path, capsys, monkeypatch):
    """compare and export only read: a mistyped sqlite path is reported, and no empty store (nor its folder) appears."""
    missing = tmp_path / "typo" / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    msg = _main_error(capsys, ["compare", "layouts"])
    assert "no MLflow experiment 'layouts'" in msg and f"the store {missing} does not exist" in msg
    msg = _main_error(capsys, ["export", "mamba-ssm", "0" * 32, "--out", str(tmp_path / "out")])
    assert f"no MLflow store at {missing}" in msg
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------- bad input (the real CLI in a subprocess)


@pytest.mark.parametrize("cmd", [["compare", "layouts"], ["eval", "0" * 32, "--task", "parity", "--lengths", "64"],
                                 ["ui"]])
def test_file_path_tracking_uri_is_one_line(tmp_path, cmd):
    db = tmp_path / "x.db"
    msg = _one_line_error(run_cli(*cmd, "--uri", str(db), env=_env(tmp_path), timeout=120))
    assert repr(str(db)) in msg and f"did you mean sqlite:///{db}?" in msg


@pytest.mark.parametrize("target", ["/nonexistent/run", "missing.pt", "0123456789abcdef0123456789abcdef"])
def test_eval_missing_target_is_one_line(tmp_path, target):
    msg = _one_line_error(run_cli("eval", target, "--task", "mqar", "--lengths", "64", env=_env(tmp_path), timeout=120))
    assert f"no MLflow run or checkpoint folder {target!r}" in msg


@pytest.mark.parametrize("port", ["99999", "0"])
def test_ui_port_out_of_range_is_one_line(tmp_path, port):
    msg = _one_line_error(run_cli("ui", "--port", port, env=_env(tmp_path), timeout=120))
    assert f"--port {port}" in msg


# ---------------------------------------------------------------- compare on API-logged runs


def _log_fake_run(client, exp_id, name, layout, params_n, accs, loss0, parent=None):
    from mlflow.entities import Metric, Param

    tags = {"hybridlab.layout": layout, "hybridlab.params": str(params_n), "hybridlab.flops_per_token_train": "1000",
            "hybridlab.sweep_values": f"model.layout={layout}"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    time.sleep(0.01)  # distinct start times: runs are listed in start order
    rid = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    ts = int(time.time() * 1000)
    ms = []
    for step in range(10, 101, 10):
        ms.append(Metric("train/loss", loss0 / step ** 0.5, ts, step))
        ms.append(Metric("train/tokens", step * 512.0, ts, step))
    for L, a in accs.items():
        ms.append(Metric(f"eval/parity/len_{L}/acc", a, ts, 100))
        ms.append(Metric(f"eval/parity/len_{L}/final_acc", a - 0.01, ts, 100))
        ms.append(Metric(f"eval/mqar/len_{L}/acc", a / 2, ts, 100))
    params = [Param("data.task", "parity"), Param("data.seq_len", "16"),
              Param("eval", json.dumps([{"task": "parity", "seq_lens": list(accs)}]))]
    client.log_batch(rid, metrics=ms, params=params, synchronous=True)
    client.set_terminated(rid)
    return rid


def test_compare_api_logged_runs(tmp_path, monkeypatch):
    from hybridlab.compare import compare

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fake")
    parent = client.create_run(exp, run_name="sweep", tags={"hybridlab.sweep": "model.layout"}).info.run_id
    a = _log_fake_run(client, exp, "a", "(m3 mlp) * 2", 50_000, {16: 1.0, 32: 0.9, 64: 0.6}, 2.0, parent)
    b = _log_fake_run(client, exp, "b", "(attn mlp) * 2", 40_000, {16: 0.7, 32: 0.5, 64: 0.5}, 3.0, parent)
    out = tmp_path / "cmp"
    c = compare("fake", uri=uri, out=str(out))
    assert [r.run_id for r in c.runs] == [a, b]  # the sweep parent is not a training run
    assert [r.label for r in c.runs] == ["(m3 mlp) * 2", "(attn mlp) * 2"]
    # auto: final_acc where a task reports it (parity), acc otherwise (mqar)
    assert ("parity", 32, "final_acc") in c.columns and ("mqar", 32, "acc") in c.columns
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["run_id"] for r in rows] == [a, b]
    assert float(rows[0]["parity@32 final_acc"]) == pytest.approx(0.89)
    assert rows[1]["params"] == "40000"
    assert len(list(csv.DictReader(open(out / "evals.csv")))) == 2 * 3 * 3
    assert len(list(csv.DictReader(open(out / "loss.csv")))) == 20
    data = json.loads((out / "comparison.json").read_text())
    assert data["runs"][0]["chance"] == {"parity": 0.5}
    for png in ("accuracy_vs_length.png", "loss_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the comparison run holds the files and is not itself compared next time
    crun = client.get_run(c.comparison_run_id)
    assert crun.data.tags["hybridlab.kind"] == "comparison"
    arts = {f.path for f in client.list_artifacts(c.comparison_run_id)}
    assert {"summary.csv", "evals.csv", "comparison.json", "accuracy_vs_length.png", "loss_vs_tokens.png"} <= arts
    # --runs by parent id, by name; --metric acc
    c2 = compare("fake", runs=[parent], uri=uri, out=str(tmp_path / "c2"), log=False)
    assert [r.run_id for r in c2.runs] == [a, b]
    # a run name is a name even where it is also the start of another run's id; a long prefix is an id
    named_like_a_prefix = _log_fake_run(client, exp, a[:6], "(m3 mlp) * 1", 1, {16: 0.1}, 1.0)  # also a prefix of a's id
    assert [r.run_id for r in compare("fake", runs=[a[:6]], uri=uri, out=str(tmp_path / "c4"), log=False).runs] \
        == [named_like_a_prefix]
    assert [r.run_id for r in compare("fake", runs=[b[:8]], uri=uri, out=str(tmp_path / "c5"), log=False).runs] == [b]
    client.delete_run(named_like_a_prefix)
    c3 = compare("fake", runs=["b"], metric="acc", uri=uri, out=str(tmp_path / "c3"), log=False)
    assert [r.run_id for r in c3.runs] == [b] and ("parity", 16, "acc") in c3.columns
    # a child eval run (hybridlab eval --child) counts as its parent's
    from mlflow.entities import Metric

    kid = client.create_run(exp, run_name="ev", tags={"hybridlab.kind": "eval", "mlflow.parentRunId": b}).info.run_id
    client.log_batch(kid, metrics=[Metric("eval/parity/len_128/final_acc", 0.25, 0, 100)], synchronous=True)
    c4 = compare("fake", uri=uri, out=str(tmp_path / "c4"), log=False)
    assert [r.run_id for r in c4.runs] == [a, b]
    assert c4.runs[1].evals["parity"][128]["final_acc"] == 0.25
    with pytest.raises(Exception, match="no run 'nope'"):
        compare("fake", runs=["nope"], uri=uri, out=str(tmp_path / "c5"), log=False)


# ---------------------------------------------------------------- real runs through `hybridlab run`

JOB = """
experiment: cmp-test
model:
  name: cmp-tiny
  d_model: 32
  vocab_size: 8
  blocks:
    m3: {{mixer: mamba3, d_state: 8, headdim: 16, chunk_size: 8}}
    mlp: {{mixer: swiglu, hidden: 64}}
  layout: (m3 mlp) * 1
data: {{task: parity, seq_len: 8}}
train: {{steps: 4, micro_batch: 4, lr: 1.0e-3, warmup: 1, log_every: 2, zero_stage: 2}}
resources: {{workers: 1}}
storage: {{path: {storage}}}
eval:
  - {{task: parity, seq_lens: [8, 16], batch_size: 8, batches: 1}}
sweep: {{model.blocks.m3.rope: [true, false]}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    job = tmp / "job.yaml"
    job.write_text(textwrap.dedent(JOB.format(storage=tmp / "runs")))
    proc = run_cli("run", str(job), "--plain", env=_env(tmp), timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlruns.db")
    exp = client.get_experiment_by_name("cmp-test")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "hybridlab.sweep" not in r.data.tags]
    assert len(runs) == 2
    return tmp, client, sorted(runs, key=lambda r: r.info.start_time)


def _main(argv):
    """The CLI in-process (the training above was the real subprocess): exit code."""
    from hybridlab.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


def test_eval_logs_expected_metrics(trained, capsys):
    tmp, client, runs = trained
    uri = ["--uri", f"sqlite:///{tmp}/mlruns.db"]
    rid = runs[0].info.run_id
    assert _main(["eval", rid, "--task", "parity", "--lengths", "8,24", "--batches", "1", "--batch-size", "4", *uri]) == 0
    assert "parity len 24" in capsys.readouterr().out
    metrics = client.get_run(rid).data.metrics
    for L in (8, 24):
        for what in ("acc", "seq_acc", "final_acc", "loss"):
            assert f"eval/parity/len_{L}/{what}" in metrics
        assert 0.0 <= metrics[f"eval/parity/len_{L}/acc"] <= 1.0
    hist = client.get_metric_history(rid, "eval/parity/len_24/acc")
    assert [m.step for m in hist] == [4]  # logged at the checkpoint's step
    assert any(a.path == "evals" for a in client.list_artifacts(rid))
    # a checkpoint folder as the target, logging into a child run of the owning run
    ckpt = sorted((tmp / "runs").glob(f"{runs[1].data.tags['hybridlab.run_name']}/step_*"))[-1]
    assert _main(["eval", str(ckpt), "--task", "parity", "--lengths", "12", "--batches", "1", "--batch-size", "4",
                  "--child", *uri]) == 0
    kids = client.search_runs([runs[1].info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{runs[1].info.run_id}'")
    assert len(kids) == 1 and kids[0].data.tags["hybridlab.kind"] == "eval"
    assert "eval/parity/len_12/final_acc" in kids[0].data.metrics
    # a task option the task rejects, on a real run: one line, exit 2
    capsys.readouterr()
    assert _main(["eval", rid, "--task", "parity", "--lengths", "8", "--option", "target=last", *uri]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(err) == 1 and err[0].startswith("error: parity: bad value for 'target'")


def test_compare_real_runs(trained):
    tmp, client, runs = trained
    out = tmp / "cmp-out"
    proc = run_cli("compare", "cmp-test", "--out", str(out), env=_env(tmp), timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rope=true" in proc.stdout and "rope=false" in proc.stdout
    assert "parity" in proc.stdout
    for f in ("summary.csv", "evals.csv", "loss.csv", "comparison.json", "table.txt",
              "accuracy_vs_length.png", "loss_vs_tokens.png"):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["run_id"] for r in rows} == {r.info.run_id for r in runs}
    assert all(r["layout"] == "(m3 mlp) * 1" and int(r["params"]) > 0 and float(r["final_loss"]) > 0 for r in rows)
    assert all(r["parity@16 final_acc"] != "" for r in rows)
    exp = client.get_experiment_by_name("cmp-test")
    comps = client.search_runs([exp.experiment_id], filter_string="tags.`hybridlab.kind` = 'comparison'")
    assert len(comps) == 1
    arts = {a.path for a in client.list_artifacts(comps[0].info.run_id)}
    assert {"summary.csv", "comparison.json", "accuracy_vs_length.png", "loss_vs_tokens.png"} <= arts


def test_accuracy_axes_keep_a_scaled_accuracy_below_chance_in_view():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridlab.compare import _accuracy_ylim

    fig, ax = plt.subplots()
    ax.plot([160, 256], [0.97, -0.30])  # scaled_acc is negative below chance
    _accuracy_ylim(ax)
    low, high = ax.get_ylim()
    assert low < -0.30 and high == 1.05
    ax2 = fig.add_subplot(2, 1, 2)
    ax2.plot([1, 2], [0.2, 0.9])
    _accuracy_ylim(ax2)
    assert ax2.get_ylim() == (-0.02, 1.05)
    plt.close(fig)
