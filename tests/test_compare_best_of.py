"""`hybridlab compare --best-of KEY --select METRIC`: the best run per group of a sweep, on runs logged
straight into a temporary MLflow store (no training)."""

from __future__ import annotations

import csv
import json
import time

import mlflow
import pytest
from mlflow.entities import Metric, Param

# (layout, lr) -> (final scaled_acc at 256, best/ of it, final loss): the best lr differs by metric and layout
RUNS = {
    ("m3", 0.001): (0.50, 0.70, 0.9),
    ("m3", 0.01): (0.80, 0.82, 0.4),
    ("m3", 0.1): (0.60, 0.95, 0.2),
    ("m2", 0.001): (0.30, 0.40, 0.7),
    ("m2", 0.01): (0.10, 0.20, 0.8),
    ("m2", 0.1): (0.20, 0.30, 0.6),
}
SEL = "eval/parity/len_256/scaled_acc"


def _log(client, exp, parent, layout, lr, acc, best, loss):
    tags = {"hybridlab.layout": layout, "hybridlab.params": "1000", "mlflow.parentRunId": parent,
            "hybridlab.sweep_values": f"model.layout={layout}, train.lr={lr}"}
    time.sleep(0.01)  # distinct start times
    rid = client.create_run(exp, run_name=f"{layout}-{lr}", tags=tags).info.run_id
    ms = [Metric(SEL, acc, 0, 100), Metric("eval/parity/len_64/scaled_acc", acc + 0.1, 0, 100),
          Metric("eval/parity/len_256/final_acc", (1 + acc) / 2, 0, 100),
          Metric("eval/parity/len_64/final_acc", (1.1 + acc) / 2, 0, 100),
          Metric("best/" + SEL, best, 0, 100), Metric("train/loss", loss, 0, 100)]
    client.log_batch(rid, metrics=ms, params=[Param("data.task", "parity"), Param("train.lr", str(lr)),
                                              Param("eval", json.dumps([{"task": "parity", "seq_lens": [64, 256]}]))],
                     synchronous=True)
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('best_of')}/mlruns.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("lrs")
    parent = client.create_run(exp, run_name="sweep", tags={"hybridlab.sweep": "model.layout, train.lr"}).info.run_id
    ids = {k: _log(client, exp, parent, *k, *v) for k, v in RUNS.items()}
    return uri, ids


def test_best_of_lr_per_layout(store, tmp_path):
    from hybridlab.compare import compare

    uri, ids = store
    out = tmp_path / "c"
    c = compare("lrs", uri=uri, out=str(out), log=False, best_of=["train.lr"], select=SEL)
    assert [r.run_id for r in c.runs] == [ids[("m3", 0.01)], ids[("m2", 0.001)]]
    assert [r.label for r in c.runs] == ["m3", "m2"] and [r.chosen for r in c.runs] == [{"train.lr": "0.01"}, {"train.lr": "0.001"}]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["label"], r["train.lr"], float(r[SEL]), r["run_id"]) for r in rows] == [
        ("m3", "0.01", 0.80, ids[("m3", 0.01)]), ("m2", "0.001", 0.30, ids[("m2", 0.001)])]
    assert float(rows[0]["parity@256 final_acc"]) == pytest.approx(0.9)  # the table's own eval columns
    data = json.loads((out / "comparison.json").read_text())
    assert data["best_of"] == ["train.lr"] and len(data["groups"]) == 2 and len(data["groups"][0]["candidates"]) == 3
    assert (out / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    assert "lr" in (out / "table.txt").read_text()
    # selecting on the run's best validation value (best/...) picks another lr; --select-mode min on a loss
    b = compare("lrs", uri=uri, out=str(tmp_path / "b"), log=False, best_of=["train.lr"], select="best/" + SEL)
    assert [r.run_id for r in b.runs] == [ids[("m3", 0.1)], ids[("m2", 0.001)]]
    m = compare("lrs", uri=uri, out=str(tmp_path / "m"), log=False, best_of=["train.lr"], select="train/loss",
                select_mode="min")
    assert [r.run_id for r in m.runs] == [ids[("m3", 0.1)], ids[("m2", 0.1)]]
    # best of every swept key: one group, the single best run
    one = compare("lrs", uri=uri, out=str(tmp_path / "o"), log=False, best_of=["train.lr,model.layout"], select=SEL)
    assert [r.run_id for r in one.runs] == [ids[("m3", 0.01)]]


def test_best_of_through_the_cli(store, tmp_path, capsys):
    from hybridlab.cli import main

    main(["compare", "lrs", "--best-of", "train.lr", "--select", SEL, "--out", str(tmp_path / "cli"), "--no-log",
          "--uri", store[0]])
    out = capsys.readouterr().out
    assert "best of train.lr" in out and "0.01" in out


def test_x_curves_one_line_per_layout(store, tmp_path):
    """``--x train.lr``: per eval column, one curve per layout over the lr values (Zoology's accuracy-vs-d_model
    figure is ``--x model.d_model``); in comparison.json and as eval_vs_lr.png."""
    from hybridlab.compare import compare

    uri, _ = store
    out = tmp_path / "x"
    c = compare("lrs", uri=uri, out=str(out), log=False, x="train.lr")
    want = {lay: [[lr, pytest.approx((1 + v[0]) / 2)] for (l2, lr), v in sorted(RUNS.items()) if l2 == lay]
            for lay in ("m3", "m2")}
    assert c.curves["parity@256 final_acc"] == want
    assert json.loads((out / "comparison.json").read_text())["curves"]["parity@64 final_acc"]["m2"][0][0] == 0.001
    assert (out / "eval_vs_lr.png").read_bytes()[:4] == b"\x89PNG" and "eval_vs_lr.png" in c.files


@pytest.mark.parametrize("argv,words", [
    (["--best-of", "train.lrr", "--select", SEL], ["--best-of 'train.lrr'", "did you mean 'train.lr'"]),
    (["--best-of", "train.lr", "--select", "eval/parity/len_256/scaled_ac"], ["--select", "did you mean"]),
    (["--best-of", "train.lr"], ["--best-of needs --select"]),
    (["--select", SEL], ["--select", "--best-of"]),
    (["--best-of", "train.lr", "--select", SEL, "--select-mode", "maximum"], ["--select-mode"]),
    (["--x", "model.d_model"], ["--x 'model.d_model'", "swept keys: model.layout, train.lr"]),
    (["--x", "model.layout"], ["--x 'model.layout'", "not a number"]),
    (["--x", "train.lr", "--best-of", "train.lr", "--select", SEL], ["--x 'train.lr'", "--best-of"]),
])
def test_bad_best_of_or_select_is_one_line_exit_2(store, tmp_path, capsys, argv, words):
    from hybridlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "lrs", "--out", str(tmp_path / "x"), "--no-log", "--uri", store[0], *argv])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err


def test_best_of_a_key_swept_in_one_group_only(tmp_path):
    """A sweep of two groups, seeds swept only in the first (as GPU 7's arithmetic sweep): the other group's
    chosen run shows the seed it logged as a param (the spec's), not None."""
    from hybridlab.compare import compare

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("groups")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    ids = {}
    for layout, seed, acc in (("m3", 0, 0.9), ("m3", 1, 0.95), ("m2", None, 0.1)):
        values = f"model.layout={layout}" + (f", train.seed={seed}" if seed is not None else "")
        rid = client.create_run(exp, run_name=layout, tags={"mlflow.parentRunId": parent,
                                                            "hybridlab.sweep_values": values}).info.run_id
        client.log_batch(rid, metrics=[Metric(SEL, acc, 0, 100)],
                         params=[Param("data.task", "parity"), Param("train.seed", str(seed or 7))], synchronous=True)
        client.set_terminated(rid)
        ids[(layout, seed)] = rid
        time.sleep(0.01)
    c = compare("groups", uri=uri, out=str(tmp_path / "c"), log=False, best_of=["train.seed"], select=SEL)
    assert [(r.run_id, r.chosen) for r in c.runs] == [(ids[("m3", 1)], {"train.seed": "1"}),
                                                      (ids[("m2", None)], {"train.seed": "7"})]
