"""Validation during training (train.eval_every / validation), best/ metrics and early stopping
(train.early_stop): the keys' checks, the loop's state, and one run end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hybridlab.arch.specio import SpecError
from hybridlab.jobs.spec import load_job
from hybridlab.jobs.validation import Validation, validation_evals

BASE = {
    "model": "zoo:tiny-hybrid",
    "data": {"task": "mqar", "vocab": 64, "seq_len": 32, "num_kv_pairs": 2},
    "train": {"steps": 10},
    "eval": [{"task": "mqar", "seq_lens": [32, 64], "batch_size": 4, "batches": 1},
             {"task": "parity", "seq_lens": [16], "batch_size": 4, "batches": 1}],
}


def job(**train):
    d = {**BASE, "train": {**BASE["train"], **train}}
    return load_job(d, limits=False)


def test_good_keys_load_and_resolve():
    j = job(eval_every=5, validation={"tasks": ["mqar"], "seq_lens": [64], "batches": 3},
            early_stop={"metric": "eval/mqar/len_64/acc", "threshold": 0.99, "patience": 2})
    t = j.resolved["train"]
    assert t["eval_every"] == 5 and t["early_stop"]["mode"] == "max" and t["early_stop"]["patience"] == 2
    entries = validation_evals(j.resolved["eval"], t["validation"])
    assert [(e["task"], e["seq_lens"], e["batches"]) for e in entries] == [("mqar", [64], 3)]
    assert job().resolved["train"]["eval_every"] is None  # off by default
    job(eval_every=2, early_stop={"metric": "eval/parity/len_16/final_acc", "threshold": 0.1, "mode": "min"})


@pytest.mark.parametrize("train,where,words", [
    (dict(eval_every=0), "train.eval_every", "must be a positive"),
    (dict(eval_every=-3), "train.eval_every", "-3"),
    (dict(early_stop={"metric": "eval/mqar/len_32/acc", "threshold": 0.9}), "train.early_stop", "needs train.eval_every"),
    (dict(eval_every=2, early_stop={"metric": "val/mqar/acc", "threshold": 0.9}), "train.early_stop.metric",
     "unknown metric prefix"),
    (dict(eval_every=2, early_stop={"metric": "eval/mqar/len_32/acc", "threshold": 0.9, "mode": "maximum"}),
     "train.early_stop.mode", "'maximum'"),
    (dict(eval_every=2, early_stop={"metric": "eval/mqar/len_128/acc", "threshold": 0.9}), "train.early_stop.metric",
     "not written by the validation evals"),
    (dict(eval_every=2, early_stop={"metric": "eval/mqar/len_32/final_acc", "threshold": 0.9}),  # mqar has no final_acc
     "train.early_stop.metric", "not written"),
    (dict(eval_every=2, validation={"tasks": ["parity"]}, early_stop={"metric": "eval/mqar/len_32/acc", "threshold": 1}),
     "train.early_stop.metric", "not written"),
    (dict(eval_every=2, early_stop={"metric": "eval/mqar/len_32/acc", "threshold": 0.9, "patience": 0}),
     "train.early_stop.patience", "must be a positive"),
    (dict(eval_every=2, early_stop={"threshold": 0.9}), "train.early_stop", "missing required key 'metric'"),
    (dict(eval_every=2, validation={"tasks": ["mqr"]}), "train.validation.tasks[0]", "did you mean 'mqar'"),
    (dict(eval_every=2, validation={"seq_lens": [48]}), "train.validation.seq_lens[0]", "48 is not a length"),
    (dict(eval_every=2, validation={"batches": 0}), "train.validation.batches", "must be positive"),
    (dict(eval_every=2, validation={"every": 3}), "train.validation.every", "unknown key"),
])
def test_bad_keys_are_refused_at_their_key(train, where, words):
    with pytest.raises(SpecError) as e:
        job(**train)
    msg = str(e.value)
    assert "\n" not in msg and where in msg and words in msg, msg


def test_no_evals_to_validate_with():
    with pytest.raises(SpecError, match="train.eval_every.*no evals"):
        load_job({**BASE, "eval": [], "train": {"eval_every": 2}}, limits=False)


def test_best_values_patience_and_resume_state():
    v = Validation({"eval_every": 2, "early_stop": {"metric": "eval/m/len_8/acc", "threshold": 0.9, "mode": "max",
                                                    "patience": 2}},
                   [{"task": "mqar", "seq_lens": [8]}])
    assert v.due(2, 10) and not v.due(3, 10) and not v.due(10, 10)  # the last step has the final evals
    seq = [(2, 0.5, 1.0), (4, 0.95, 0.7), (6, 0.8, 0.9), (8, 0.92, 0.8), (10, 0.97, 0.75)]
    stops = []
    for step, acc, loss in seq:
        m = {"eval/m/len_8/acc": acc, "eval/m/len_8/loss": loss}
        v.observe(step, m)
        stops.append(v.should_stop(m))
    assert stops == [False, False, False, False, True]  # two in a row at or above 0.9: steps 8 and 10
    best = v.best_metrics()
    assert best["best/eval/m/len_8/acc"] == 0.97 and best["best_step/eval/m/len_8/acc"] == 10
    assert best["best/eval/m/len_8/loss"] == 0.7 and best["best_step/eval/m/len_8/loss"] == 4  # loss: lower is better
    again = Validation({"eval_every": 2, "early_stop": {"metric": "eval/m/len_8/acc", "threshold": 0.9, "patience": 3}},
                       [{"task": "mqar", "seq_lens": [8]}])
    again.load_state_dict(v.state_dict())
    assert again.best_metrics() == best and again.should_stop({"eval/m/len_8/acc": 0.99})  # hits carried over: 3
    low = Validation({"eval_every": 1, "early_stop": {"metric": "eval/m/len_8/loss", "threshold": 0.5, "mode": "min"}}, [])
    assert not low.should_stop({"eval/m/len_8/loss": 0.6}) and low.should_stop({"eval/m/len_8/loss": 0.4})


@pytest.mark.slow
def test_early_stop_run_ends_finished_with_tag_best_metrics_and_final_evals(tmp_path):
    """End to end (Ray Train worker, DeepSpeed, MLflow): validation logged at its steps, the run stops at the
    second validation point (patience 2 of a threshold always met), FINISHED, tagged, final evals and best/."""
    from mlflow import MlflowClient

    jf = tmp_path / "es.yaml"
    jf.write_text(f"""experiment: es-e2e
model: zoo:tiny-hybrid
data: {{task: mqar, vocab: 32, seq_len: 32, num_kv_pairs: 2}}
train:
  steps: 20
  micro_batch: 4
  warmup: 1
  zero_stage: 0
  log_every: 1
  eval_every: 2
  validation: {{seq_lens: [32]}}
  early_stop: {{metric: eval/mqar/len_32/loss, threshold: 1000.0, mode: min, patience: 2}}
resources: {{workers: 1}}
eval:
  - {{seq_lens: [32, 64], batch_size: 8, batches: 1}}
storage: {{path: {tmp_path / "runs"}}}
""")
    env = dict(os.environ, CI="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db")
    r = subprocess.run([sys.executable, "-m", "hybridlab", "run", str(jf)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("es-e2e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["hybridlab.status"] == "finished"
    assert run.data.tags["hybridlab.stopped_early"] == "4"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "eval/mqar/len_32/acc")}) == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/mqar/len_64/acc")] == [4]  # final only
    mets = run.data.metrics
    for k in ("acc", "loss"):
        name = f"eval/mqar/len_32/{k}"
        hist = [m.value for m in client.get_metric_history(run.info.run_id, name)]
        assert mets[f"best/{name}"] == (max(hist) if k == "acc" else min(hist))
        assert mets[f"best_step/{name}"] in (2.0, 4.0)
        # logged at each validation point too (a run stopped midway keeps its best so far)
        assert 2 in {m.step for m in client.get_metric_history(run.info.run_id, f"best/{name}")}
    assert "best/eval/mqar/len_64/acc" not in mets  # not validated
