"""Job spec validation, overrides, sweeps, and the CLI's one-line errors (fast; no Ray run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hybridlab.arch.specio import SpecError
from hybridlab.jobs.spec import expand_sweep, flatten, from_resolved, load_job
from hybridlab.jobs.train import checkpoint_activations, deepspeed_config, lr_lambda
from hybridlab.localray import free_ports

GOOD = """\
experiment: t
model: zoo:tiny-hybrid
data: {task: mqar, vocab: 64, seq_len: 64, num_kv_pairs: 4}
train: {steps: 20, micro_batch: 8, zero_stage: 2, checkpoint_every: 10}
resources: {workers: 2}
eval:
  - {task: mqar, seq_lens: [64, 128]}
"""

HYBRIDLAB = [sys.executable, "-m", "hybridlab"]
ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def err(tmp_path, text, overrides=()) -> str:
    with pytest.raises(SpecError) as e:
        load_job(write(tmp_path, text), overrides)
    return str(e.value)


def test_good_job_resolves_and_round_trips(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    r = job.resolved
    assert r["model"]["name"] == "tiny-hybrid" and r["data"]["seq_len"] == 64
    assert r["train"]["zero_stage"] == 2 and r["resources"]["workers"] == 2
    assert r["eval"][0]["seq_lens"] == [64, 128]
    again = from_resolved(r)  # what a worker does
    assert again.resolved["model"] == r["model"]
    flat = flatten(r)
    assert flat["train.lr"] == "0.003" and flat["model.d_model"] == "128"


@pytest.mark.parametrize("text, where, words", [
    (GOOD.replace("steps: 20", "stepz: 20"), ":4 train.stepz", "did you mean 'steps'"),
    (GOOD.replace("zero_stage: 2", "zero_stage: 5"), ":4 train.zero_stage", "0, 1, 2 or 3"),
    (GOOD.replace("micro_batch: 8", "micro_batch: eight"), ":4 train.micro_batch", "expected an integer"),
    (GOOD.replace("num_kv_pairs: 4", "num_kv_pairz: 4"), ":3 data.num_kv_pairz", "unknown option"),
    (GOOD.replace("task: mqar, vocab", "task: mqr, vocab"), ":3 data.task", "did you mean 'mqar'"),
    (GOOD.replace("zoo:tiny-hybrid", "zoo:tiny-hybird"), "model", "did you mean 'tiny-hybrid'"),
    (GOOD.replace("workers: 2", "workers: 0"), ":5 resources.workers", "must be positive"),
    (GOOD.replace("experiment: t", "experimnt: t"), ":1 experimnt", "did you mean 'experiment'"),
    (GOOD.replace("seq_lens: [64, 128]", "seq_lens: [64, -1]"), ":7 eval[0].seq_lens[1]", "must be positive"),
    (GOOD + "sweep: {train.lr: []}\n", ":8 sweep.train.lr", "at least one value"),
    (GOOD.replace("resources: {workers: 2}", "resources: {workers: 2, backend: nccl}"), ":5 resources.backend", "nccl needs GPUs"),
    (GOOD.replace("experiment: t", "experiment: !!python/object:os.system t"), ":1", "not allowed"),
    (GOOD.replace("checkpoint_every: 10", "activation_checkpointing: sometimes"), ":4 train.activation_checkpointing", "expected"),
])
def test_spec_errors_are_located(tmp_path, text, where, words):
    msg = err(tmp_path, text)
    assert where in msg and words in msg, msg
    assert "\n" not in msg


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """`lr: 1e-4` (YAML 1.2; PyYAML's 1.1 reads it as a string) in a file, a --set and a sweep list."""
    path = write(tmp_path, GOOD.replace("zero_stage: 2,", "zero_stage: 2, lr: 3e-4, weight_decay: 1E-2,")
                 + "sweep: {train.lr: [1e-4, 2.5e-3]}\n")
    job = load_job(path)
    assert job.spec.train.lr == pytest.approx(3e-4) and job.spec.train.weight_decay == pytest.approx(0.01)
    assert load_job(path, ["train.lr=5e-5"]).spec.train.lr == pytest.approx(5e-5)
    assert [j.spec.train.lr for j in expand_sweep(path, [])] == [pytest.approx(1e-4), pytest.approx(2.5e-3)]
    assert "expected a number, got a string '1e-4x'" in err(tmp_path, GOOD, ["train.lr=1e-4x"])


def test_overrides_and_model_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    job = load_job(path, ["train.lr=0.01", "model.d_model=64", "data.num_kv_pairs=8"])
    assert job.spec.train.lr == 0.01 and job.model_spec.d_model == 64 and job.resolved["data"]["num_kv_pairs"] == 8
    msg = str(pytest.raises(SpecError, load_job, path, ["train.lrr=1"]).value)
    assert "--set train.lrr" in msg and "did you mean 'lr'" in msg


def test_inline_model_errors_point_into_the_job(tmp_path):
    text = GOOD.replace("model: zoo:tiny-hybrid", textwrap.dedent("""\
        model:
          name: inline
          d_model: 64
          vocab_size: 128
          blocks: {mlp: {mixer: swiglu, hidden: 128}, attn: {mixer: attention, heads: 3}}
          layout: "(attn mlp) * 2"
        """).rstrip())
    msg = err(tmp_path, text)
    assert "job.yaml:" in msg and "model.blocks.attn.heads" in msg


def test_task_vocab_must_fit_model(tmp_path):
    msg = err(tmp_path, GOOD.replace("vocab: 64", "vocab: 9000"))
    assert "data" in msg and "vocab" in msg


def test_sweep_expands_to_one_job_per_combination(tmp_path):
    path = write(tmp_path, GOOD + 'sweep: {train.zero_stage: [1, 3], model.layout: ["(m3 mlp) * 2", "attn mlp"]}\n')
    jobs = expand_sweep(path)
    assert len(jobs) == 4
    combos = {(j.spec.train.zero_stage, j.model_spec.layout_str) for j in jobs}
    assert combos == {(1, "(m3 mlp) * 2"), (3, "(m3 mlp) * 2"), (1, "attn mlp"), (3, "attn mlp")}
    assert all(j.label and not j.spec.sweep for j in jobs)


def test_deepspeed_config_and_schedule():
    train = load_job({"model": "zoo:tiny-hybrid", "data": {"task": "mqar", "vocab": 64, "seq_len": 64, "num_kv_pairs": 4},
                      "train": {"steps": 100, "warmup": 10, "grad_accum": 2, "precision": "bf16", "zero_stage": 3,
                                "deepspeed": {"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}}}).resolved["train"]
    cfg = deepspeed_config(train, world_size=4)
    assert cfg["train_batch_size"] == 8 * 2 * 4 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True} and cfg["gradient_clipping"] == 0.5
    f = lr_lambda(train)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(10) > f(50) > f(99)


def run_cli(args, cwd, env=None, timeout=120):
    e = dict(os.environ, CI="1", **(env or {}))
    return subprocess.run(HYBRIDLAB + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)


def test_cli_bad_inputs_are_one_line_exit_2(tmp_path):
    bad = write(tmp_path, GOOD.replace("steps: 20", "stepz: 20"))
    (port,) = free_ports(1)
    cases = [
        (["run", bad], "job.yaml:4 train.stepz: unknown key"),
        (["run", str(tmp_path / "missing.yaml")], "missing.yaml: file not found"),
        (["submit", write(tmp_path, GOOD, "ok.yaml"), "--address", f"http://127.0.0.1:{port}"], f"no Ray cluster at http://127.0.0.1:{port}"),
        (["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"], "no Ray cluster"),
        (["run", write(tmp_path, GOOD + f"tracking: {{uri: 'http://127.0.0.1:{port}'}}\n", "t.yaml")],
         f"MLflow tracking server at http://127.0.0.1:{port} is not reachable"),
    ]
    for args, expect in cases:
        r = run_cli(args, tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and expect in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr


def test_data_prepare(tmp_path):
    (tmp_path / "a.txt").write_text("hello hybrid world\n" * 200)
    r = run_cli(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "shards")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert any((tmp_path / "shards").iterdir())
    job = load_job({"model": "zoo:tiny-hybrid", "data": {"task": "lm", "path": str(tmp_path / "shards"), "seq_len": 32}})
    assert job.spec.data.task == "lm"


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    r = run_cli(["run", str(ROOT / "jobs" / "recipes" / "scaling-1.5b.yaml"), "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "valid; 2 run(s)" in r.stdout and "== train.zero_stage=3" in r.stdout
    assert "workers   8 x {'CPU': 8.0, 'GPU': 1.0} (GPU, nccl" in r.stdout
    assert "hybrid-1in4-1.5b: 1,501,053,696 params" in r.stdout
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "hybridlab_runs").exists()
    bad = run_cli(["run", write(tmp_path, GOOD.replace("steps: 20", "stepz: 20")), "--dry-run"], tmp_path)
    assert bad.returncode == 2 and "train.stepz: unknown key" in bad.stderr


def test_check_takes_a_job_file(tmp_path):
    import json

    r = run_cli(["check", str(ROOT / "jobs" / "recipes" / "quickstart.yaml"), "--json", "--seq-len", "64"], tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["name"] == "quickstart-hybrid" and rep["vocab_size"] == 64 and rep["num_layers"] == 8


def test_activation_checkpointing_is_a_train_option_and_keeps_gradients(tmp_path):
    job = load_job(write(tmp_path, GOOD.replace("checkpoint_every: 10", "activation_checkpointing: true")))
    assert job.resolved["train"]["activation_checkpointing"] is True
    assert load_job(write(tmp_path, GOOD)).resolved["train"]["activation_checkpointing"] is False

    import torch

    from hybridlab.arch import HybridLM, load_model_spec

    spec = load_model_spec("zoo:tiny-hybrid")
    tokens = torch.randint(0, spec.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    grads, mixer_calls = [], []
    for ckpt_on in (False, True):
        torch.manual_seed(0)
        model = HybridLM(spec)
        if ckpt_on:
            checkpoint_activations(model)
        calls = []
        model.layers[0].mixer.register_forward_pre_hook(lambda *_: calls.append(1))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        mixer_calls.append(len(calls))
    assert mixer_calls == [1, 2]  # checkpointed: the forward runs again inside the backward
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0

