"""The whole path on CPU: `hybridlab run` on jsonl text with a local tokenizer and packing (2 gloo workers),
evals (lm perplexity, NIAH, loss by position, custom offline lm-eval tasks) and system metrics in MLflow,
the data position saved with each checkpoint; then `hybridlab eval --lm-eval` and `hybridlab compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from text_fixtures import documents, offline_env, train_tokenizer, write_corpus, write_lm_eval_tasks

pytestmark = pytest.mark.slow
pytest.importorskip("datasets")
pytest.importorskip("lm_eval")

JOB = """\
experiment: text-lm
model:
  name: tiny-text
  d_model: 32
  vocab_size: 320
  blocks:
    m3: {{mixer: mamba3, d_state: 16, headdim: 8, chunk_size: 8}}
    attn: {{mixer: attention, heads: 2}}
    mlp: {{mixer: swiglu, hidden: 64}}
  layout: m3 mlp attn mlp
data:
  task: lm
  dataset: {{format: jsonl, path: corpus/*.jsonl}}
  tokenizer: tok/tokenizer.json
  seq_len: 48
  pack: true
train: {{steps: 6, micro_batch: 2, lr: 3.0e-3, warmup: 1, zero_stage: 1, checkpoint_every: 3, log_every: 2}}
resources: {{workers: 2}}
tracking: {{system_metrics_interval: 1}}
storage: {{path: {storage}}}
eval:
  - {{task: lm, seq_lens: [48, 96], batch_size: 2, batches: 1}}
  - {{task: niah, seq_lens: [128, 192], depths: [0, 1], samples: 2, batch_size: 2}}
  - {{task: ppl_by_pos, seq_lens: [192], buckets: 4, batch_size: 2, batches: 1}}
  - {{task: lm_eval, tasks: [tiny_lastword, tiny_gen], include: lm_tasks, batch_size: 4}}
"""


def test_text_lm_run_eval_compare(tmp_path):
    docs = documents(40)
    write_corpus(tmp_path / "corpus", docs)
    train_tokenizer(tmp_path / "tok" / "tokenizer.json", docs)
    write_lm_eval_tasks(tmp_path / "lm_tasks", docs)
    (tmp_path / "job.yaml").write_text(JOB.format(storage=tmp_path / "runs"))
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = dict(os.environ, CI="1", MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", **offline_env(tmp_path))

    def hl(*args, timeout=600):
        p = subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    out = hl("run", "job.yaml")
    run_id = next(ln.split("MLflow run id:")[1].split()[0] for ln in out.splitlines() if "MLflow run id:" in ln)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    m = client.get_run(run_id).data.metrics
    for key in ("eval/lm/len_96/loss", "eval/niah/len_192/depth_100/acc", "eval/niah/len_128/acc",
                "eval/ppl_by_pos/len_192/pos_144_192/loss", "eval/lm_eval/tiny_lastword/acc",
                "eval/lm_eval/tiny_gen/exact_match", "system/node_0/cpu_utilization_percentage",
                "system/node_0/system_memory_usage_megabytes"):
        assert key in m, (key, sorted(m))
    arts = {a.path for a in client.list_artifacts(run_id, "evals")}
    assert {"evals/niah_text-lm.png", "evals/ppl_by_position.png", "evals/text_evals.txt"} <= arts
    # each rank's position in its text stream is saved with the checkpoint: 6 steps x 2 rows
    ck = sorted((tmp_path / "runs").glob("*/step_00000006"))[0]
    for rank in (0, 1):
        state = json.loads((ck / "data_state" / f"rank_{rank}.json").read_text())
        assert state["rows"] == 12 and state["rank"] == rank and state["world"] == 2

    hl("eval", run_id, "--lm-eval", "tiny_rolling", "--lm-eval-include", "lm_tasks", "--batch-size", "4")
    m = client.get_run(run_id).data.metrics
    assert "eval/lm_eval/tiny_rolling/bits_per_byte" in m

    out = hl("compare", "text-lm", "--out", "cmp", "--no-log")
    assert "lm_eval" in out and "tiny_rolling" in out
    for f in ("text_evals.csv", "ppl_by_position.png", "accuracy_vs_length.png"):
        assert (tmp_path / "cmp" / f).is_file(), f
    assert list((tmp_path / "cmp").glob("niah_*.png"))
