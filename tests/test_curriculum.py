"""Variable-length batches (``Task.batch(min_len=...)``), the paper's scaled accuracy, and the
length curriculum (``data.curriculum``): layout, masking, determinism, resumption, located errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridlab.arch.specio import SpecError
from hybridlab.jobs.curriculum import Curriculum
from hybridlab.jobs.data import TrainStream, eval_task_options
from hybridlab.jobs.spec import load_job
from hybridlab.jobs.tasks import TaskError, batch_seed, make_task

from test_tasks import check_against_independent

IGN = -100

VARLEN = [
    ("parity", dict(target="running")),
    ("parity", dict(target="end")),
    ("parity", dict(target="final")),
    ("modarith", dict(target="running")),
    ("modarith", dict(target="final")),
    ("modarith", dict(brackets=True, bracket_style="full")),
    ("modarith", dict(brackets=True)),
    ("mqar", dict(vocab=128, num_kv_pairs=3, query_gaps="power", echo_values=False)),
    ("copy", dict(vocab=16)),
    ("passkey", dict(passkey_len=2)),
]
VIDS = [f"{n}-{i}" for i, (n, _) in enumerate(VARLEN)]


@pytest.mark.parametrize("name,kw", VARLEN, ids=VIDS)
def test_varlen_batches_are_right_padded_and_answer_at_their_own_end(name, kw):
    t = make_task(name, seq_len=40, **kw)
    lo = 12
    b = t.batch(64, seed=3, seq_len=40, min_len=lo)
    lengths = b.meta["lengths"]
    assert b.inputs.shape == b.targets.shape == (64, 40) and lengths.shape == (64,)
    assert int(lengths.min()) >= lo - 1 and int(lengths.max()) <= 40  # _fit_len drops at most one pad
    assert len(set(lengths.tolist())) > 5  # lengths really vary within the batch
    pos = torch.arange(40)[None, :]
    pad = pos >= lengths[:, None]
    assert (b.inputs[pad] == 0).all() and (b.targets[pad] == IGN).all()  # right padding, never scored
    for i in range(64):  # each row alone is the task's own sequence at its length: the independent solver agrees
        n = int(lengths[i])
        row = type(b)(b.inputs[i: i + 1, :n], b.targets[i: i + 1, :n])
        check_against_independent(t, row)
        if t.REPORT_FINAL:  # the answer sits at the row's own end
            assert int(b.targets[i, n - 1]) != IGN
        assert int(b.inputs[i, 0]) != 0  # no padding before real tokens (every task starts with a real token)
    # the oracle scores 1 (solve works on variable-length batches), chance is chance
    sol = t.solve(b)
    assert torch.equal(sol[b.mask], b.targets[b.mask])
    r = t.score(F.one_hot(sol, t.vocab_size).float() * 20, b)
    assert r["acc"] == 1.0 and r["scaled_acc"] == 1.0
    # deterministic per seed, seed-dependent, and a different stream from fixed-length batches
    again = t.batch(64, seed=3, seq_len=40, min_len=lo)
    assert torch.equal(again.inputs, b.inputs) and torch.equal(again.meta["lengths"], lengths)
    assert not torch.equal(t.batch(64, seed=4, seq_len=40, min_len=lo).inputs, b.inputs)


def test_varlen_lengths_are_uniform_in_range():
    t = make_task("parity", target="end")
    lengths = t.batch(4000, seed=0, seq_len=40, min_len=3).meta["lengths"]
    counts = torch.bincount(lengths, minlength=41)[3:]
    assert int(lengths.min()) == 3 and int(lengths.max()) == 40
    expected = 4000 / 38
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


def test_modarith_fit_len_never_pads_the_front():
    for kw in (dict(target="final"), dict(target="running"), dict(brackets=True)):
        t = make_task("modarith", **kw)
        for L in range(3, 30):
            n = t._fit_len(L)
            assert n in (L, L - 1)
            assert (t.batch(4, seed=L, seq_len=n).inputs[:, 0] != 0).all()
    full = make_task("modarith", brackets=True, bracket_style="full")
    assert all(full._fit_len(L) == L for L in range(2, 30))  # every length fits Deletang's grammar


def test_modarith_full_grammar_matches_deletang():
    t = make_task("modarith", brackets=True, bracket_style="full", seq_len=60)
    m = t.modulus
    assert t.ops == "+-" and t.target == "final" and t.vocab_size == m + 7
    rows = t.batch(200, seed=1).inputs.tolist()
    seen_unary = False
    for row in rows:
        expr = row[:-1]
        assert row[-1] == t.EQ and t.TIMES not in expr  # ops +- only (Deletang's mult=False)
        # every binary operator sits inside its own brackets: #"(" = #")" >= #binary ops
        assert expr.count(t.LPAR) == expr.count(t.RPAR)
        unary = sum(1 for i, x in enumerate(expr) if x == t.MINUS and (i == 0 or expr[i - 1] in (t.LPAR, t.PLUS, t.MINUS)))
        seen_unary |= unary > 0
        binary = sum(1 for x in expr if x in (t.PLUS, t.MINUS)) - unary
        assert expr.count(t.LPAR) >= binary
    assert seen_unary
    assert t.evaluate([t.LPAR, t.MINUS, 1 + 2, t.RPAR]) == (-2) % m  # "(-2)"
    with pytest.raises(TaskError, match="ops"):
        make_task("modarith", ops="*")


def test_scaled_accuracy_is_chance_zero_perfect_one():
    t = make_task("modarith", target="final", modulus=5)
    b = t.batch(4000, seed=2, seq_len=20)
    sol = t.solve(b)
    assert t.score(sol, b)["scaled_acc"] == 1.0
    g = torch.Generator().manual_seed(0)
    rand = t.answer_tokens[torch.randint(5, b.targets.shape, generator=g)]
    r = t.score(rand, b)
    assert r["scaled_acc"] == pytest.approx((r["final_acc"] - 0.2) / 0.8)
    assert abs(r["scaled_acc"]) < 0.05
    # parity, running target: scaled_acc is about the final answer, not every position
    p = make_task("parity")
    bp = p.batch(64, seed=1, seq_len=20)
    preds = p.solve(bp).clone()
    preds[:, -1] = 3 - preds[:, -1]
    r = p.score(preds, bp)
    assert r["acc"] == pytest.approx(19 / 20) and r["final_acc"] == 0.0 and r["scaled_acc"] == -1.0
    # a task without a final answer scales acc
    q = make_task("mqar", vocab=64, seq_len=32, num_kv_pairs=4)
    bq = q.batch(8, seed=0)
    r = q.score(q.solve(bq), bq)
    assert r["scaled_acc"] == 1.0


def test_bad_min_len_is_a_one_line_task_error():
    t = make_task("mqar", vocab=128, seq_len=64, num_kv_pairs=8)
    for bad, words in ((0, "min_len"), (65, "above"), (20, "needs >= 31"), ("3", "'3'")):
        with pytest.raises(TaskError) as ei:
            t.batch(2, seed=0, seq_len=64, min_len=bad)
        assert "min_len" in str(ei.value) and words in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------- the curriculum schedule


def test_curriculum_stages():
    c = Curriculum(min_len=3, max_len=[40, 80, 120, 160], steps_per_stage=10)
    assert [c.max_len_at(s) for s in (1, 10, 11, 20, 21, 31, 40, 41, 10_000)] == [40, 40, 80, 80, 120, 160, 160, 160, 160]
    assert c.longest == 160 and c.stage_at(1) == 0 and c.stage_at(31) == 3
    one = Curriculum(min_len=3, max_len=40)
    assert one.stages == [40] and one.max_len_at(12345) == 40
    assert Curriculum.from_dict(c.to_dict()) == c
    # a count per stage (the last left out, or given): long stages get more steps
    for counts in ([2, 3, 5], [2, 3, 5, 7]):
        v = Curriculum(min_len=3, max_len=[8, 16, 32, 64], steps_per_stage=counts)
        assert [v.max_len_at(s) for s in range(1, 14)] == [8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 64, 64, 64]
        assert v.stage_ends == [2, 5, 10] and Curriculum.from_dict(v.to_dict()) == v
    assert v.describe(12) == "lengths 3 to max: 8 to step 2, 16 to step 5, 32 to step 10, 64 to the end (12)"
    assert v.describe(4) == ("lengths 3 to max: 8 to step 2, 16 to the end (4); train.steps 4 ends in stage 2 of 4: "
                             "max_len 32, 64 never trained")


def _job(tmp_path, data: str, extra: str = "") -> str:
    p = tmp_path / "job.yaml"
    p.write_text(f"""experiment: cur
model:
  name: t
  d_model: 16
  vocab_size: 16
  blocks: {{m: {{mixer: mamba3, d_state: 8, headdim: 8}}}}
  layout: m
data:
{data}
train: {{steps: 4, micro_batch: 4}}
eval:
  - {{task: parity, seq_lens: [64]}}
{extra}""")
    return str(p)


def test_curriculum_job_resolves_and_streams(tmp_path):
    f = _job(tmp_path, "  task: parity\n  target: end\n  curriculum: {min_len: 3, max_len: [8, 16], steps_per_stage: 2}")
    job = load_job(f)
    data = job.resolved["data"]
    assert data["seq_len"] == 16 and data["curriculum"] == {"min_len": 3, "max_len": [8, 16], "steps_per_stage": 2}
    # the eval of the training task inherits the format (target end), not the curriculum
    name, opts = eval_task_options(job.resolved["eval"][0], data)
    assert opts["target"] == "end" and "curriculum" not in opts
    s = TrainStream(data, micro_batch=32, grad_accum=1, seed=7, rank=0)
    assert [s.seq_len_at(k) for k in (1, 2, 3, 99)] == [8, 8, 16, 16]
    b1, b3 = s.get(1), s.get(3)
    assert b1.inputs.shape == (32, 8) and b3.inputs.shape == (32, 16)
    assert int(b3.meta["lengths"].min()) >= 3 and int(b3.meta["lengths"].max()) > 8
    # deterministic per (seed, step, rank): a resumed stream (a new object) gives the same batch at step 3
    s2 = TrainStream(data, micro_batch=32, grad_accum=1, seed=7, rank=0)
    assert torch.equal(s2.get(3).inputs, b3.inputs)
    assert not torch.equal(TrainStream(data, 32, 1, 7, rank=1).get(3).inputs, b3.inputs)
    seed = batch_seed(7, 2, 0)
    assert torch.equal(make_task("parity", target="end", seq_len=16).batch(32, seed, seq_len=16, min_len=3).inputs, b3.inputs)
    # round trip through the resolved dict (what a worker or a --resume gets)
    from hybridlab.jobs.spec import from_resolved

    assert from_resolved(job.resolved).spec.data.curriculum == job.spec.data.curriculum


@pytest.mark.parametrize("data,where,words", [
    ("  task: parity\n  curriculum: {min_len: 3, max_len: [8, 4], steps_per_stage: 2}", "data.curriculum.max_len[1]", "stages only grow"),
    ("  task: parity\n  curriculum: {min_len: 9, max_len: [8, 16], steps_per_stage: 2}", "data.curriculum.max_len[0]", "below min_len"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: [8, 16]}", "data.curriculum.steps_per_stage", "must be positive"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: 8, stages: 2}", "data.curriculum.stages", "unknown key"),
    ("  task: parity\n  curriculum: {min_len: 0, max_len: 8}", "data.curriculum.min_len", "positive"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: []}", "data.curriculum.max_len", "non-empty"),
    ("  task: parity\n  seq_len: 64\n  curriculum: {min_len: 3, max_len: 8}", "data.seq_len", "longest max_len"),
    ("  task: parity\n  target: final\n  curriculum: {min_len: 1, max_len: 8}", "data.curriculum.min_len", "min_len"),
    ("  task: mqar\n  vocab: 16\n  num_kv_pairs: 4\n  curriculum: {min_len: 8, max_len: 32}", "data.curriculum.min_len", "needs >= 15"),
    ("  task: parity\n  curriculum: 12", "data.curriculum", "mapping"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: [8, 16, 32], steps_per_stage: [2]}",
     "data.curriculum.steps_per_stage", "one count per stage (3 stages"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: [8, 16, 32], steps_per_stage: [2, 0]}",
     "data.curriculum.steps_per_stage[1]", "must be positive, got 0"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: 8, steps_per_stage: [2]}",
     "data.curriculum.steps_per_stage", "single stage"),
    ("  task: parity\n  curriculum: {min_len: 3, max_len: [8, 16], steps_per_stage: [2, many]}",
     "data.curriculum.steps_per_stage[1]", "expected an integer, got a string 'many'"),
])
def test_curriculum_errors_are_located(tmp_path, data, where, words):
    with pytest.raises(SpecError) as ei:
        load_job(_job(tmp_path, data))
    msg = str(ei.value)
    assert where in msg and words in msg and "\n" not in msg, msg
    assert "job.yaml:" in msg  # file:line


def test_evals_log_scaled_acc_and_the_summary_shows_it():
    from hybridlab.jobs.evals import eval_table, run_evals
    from hybridlab.jobs.record import EVAL_METRIC_RE, EVAL_METRICS

    assert "scaled_acc" in EVAL_METRICS and EVAL_METRIC_RE.match("eval/parity/len_256/scaled_acc")["what"] == "scaled_acc"
    task = make_task("parity", target="end")

    def oracle(tokens):  # the whole-string parity at every position (only the last is scored)
        bits = (tokens == 2).long().cumsum(1) % 2 + 1
        return F.one_hot(bits, 4).float() * 10

    out = run_evals(oracle, [{"task": "parity", "seq_lens": [16, 32], "batch_size": 8, "batches": 2}], {"task": "parity", "target": "end"})
    assert out["eval/parity/len_32/scaled_acc"] == 1.0 and out["eval/parity/len_16/final_acc"] == 1.0
    flipped = run_evals(lambda t: oracle(t).flip(-1).roll(-1, -1), [{"task": "parity", "seq_lens": [16]}], {"task": "parity", "target": "end"})
    assert flipped["eval/parity/len_16/scaled_acc"] == pytest.approx(2 * flipped["eval/parity/len_16/final_acc"] - 1)
    line = eval_table(out)
    assert "len 16: acc 1.000 scaled_acc 1.000" in line
    assert eval_table({"eval/mqar/len_8/acc": 0.5}) == "mqar       len 8: 0.500"  # a task with one metric: bare values
    assert "scaled_acc" in eval_table(out, EVAL_METRICS, layout="table").splitlines()[0]
    assert task.chance == 0.5


@pytest.mark.slow
def test_a_curriculum_run_trains_through_its_stages_and_logs_scaled_acc(tmp_path):
    """End to end through `hybridlab run` (Ray Train worker, DeepSpeed, MLflow): the worker's batches
    follow the stages (train/tokens grows by batch x the stage's max_len) and the evals log scaled_acc."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    job = tmp_path / "cur.yaml"
    job.write_text(f"""experiment: cur-e2e
model:
  name: t
  d_model: 16
  vocab_size: 16
  blocks: {{m: {{mixer: mamba3, d_state: 8, headdim: 8, rope: standard}}}}
  layout: m
data:
  task: modarith
  target: final
  curriculum: {{min_len: 3, max_len: [8, 16, 24], steps_per_stage: 2}}
train: {{steps: 5, micro_batch: 4, warmup: 1, zero_stage: 0, log_every: 1}}
resources: {{workers: 1}}
eval:
  - {{seq_lens: [32], batch_size: 8, batches: 1}}
storage: {{path: {tmp_path / "runs"}}}
""")
    env = dict(os.environ, CI="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db")
    r = subprocess.run([sys.executable, "-m", "hybridlab", "run", str(job)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "scaled_acc" in r.stdout  # the run's eval summary
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("cur-e2e").experiment_id])
    tokens = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/tokens"), key=lambda m: m.step)]
    assert tokens == [32, 64, 128, 192, 288]  # 4 x (8, 8, 16, 16, 24)
    assert "eval/modarith/len_32/scaled_acc" in run.data.metrics
    assert run.data.params["data.curriculum.max_len"] == "[8, 16, 24]"
