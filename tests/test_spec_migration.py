"""Saved specs keep computing what they computed; new specs get the official heavy-tail A.

``tests/data/v1_run`` is a run folder written by hybridlab before spec versions
(commit 3d776c7, ``tests/data/make_v1_run.py``): its resolved job.yaml has no
``a_activation``, its checkpoint holds per-head A biases, and ``expected_logits.pt``
is what that version computed. Also: explicit ``spec_version``, recorded choices,
``model: {from: DIR}`` jobs, and resuming with the run's own saved model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from hybridlab.arch import HybridLM, load_model_spec
from hybridlab.arch.spec import SPEC_VERSION
from hybridlab.arch.specio import SpecError

V1_RUN = Path(__file__).parent / "data" / "v1_run"
EXPECTED = torch.load(V1_RUN / "expected_logits.pt", weights_only=True)


@pytest.fixture
def v1_run(tmp_path):
    dst = tmp_path / "runs" / "v1-run"
    shutil.copytree(V1_RUN, dst)
    return dst


def _v1_model_dict():
    return yaml.safe_load((V1_RUN / "job.yaml").read_text())["model"]


# ============================================================================ old checkpoints


def test_v1_run_checkpoint_computes_what_it_computed(v1_run):
    from hybridlab.evaluate import load_model, resolve_target

    model, spec = load_model(resolve_target(str(v1_run)))
    for name in ("m3", "m3r2"):
        assert spec.blocks[name].a_activation == "softplus" and spec.blocks[name].a_bias
    assert spec.blocks["m3"].a_init_max == 4.0  # the saved init range survives
    with torch.no_grad():
        got = model(EXPECTED["tokens"])
    torch.testing.assert_close(got, EXPECTED["logits"], rtol=1e-5, atol=1e-5)


def test_v1_weights_under_the_new_default_would_differ(v1_run):
    """The check above can fail: the same weights read with today's default A compute something else."""
    from hybridlab.evaluate import load_model, resolve_target

    model, spec = load_model(resolve_target(str(v1_run)))
    data = _v1_model_dict()
    for blk in data["blocks"].values():
        if blk["mixer"] == "mamba3":
            blk.update(a_activation="heavy_tail", a_bias=False, a_init_min=None, a_init_max=None)
    new = HybridLM(load_model_spec(data))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("mixer.a_bias")}
    new.load_state_dict(sd)
    with torch.no_grad():
        err = ((new(EXPECTED["tokens"]) - EXPECTED["logits"]).norm() / EXPECTED["logits"].norm()).item()
    assert err > 1e-2, err


def test_v1_run_through_generate_and_eval_cli(v1_run, cli):
    from hybridlab.generate import load_model

    model, _ = load_model(str(v1_run))
    with torch.no_grad():
        torch.testing.assert_close(model(EXPECTED["tokens"]), EXPECTED["logits"], rtol=1e-5, atol=1e-5)
    r = cli("eval", str(v1_run), "--task", "mqar", "--lengths", "16", "--batches", "1", "--batch-size", "4", "--no-log")
    assert r.returncode == 0, r.stderr
    assert "mqar len 16: acc" in r.stdout


def test_worker_reload_of_a_v1_resolved_job():
    """What the training worker does with the job it is handed: load_model_spec(job['model'])."""
    from hybridlab.jobs.spec import from_resolved

    job = from_resolved(yaml.safe_load((V1_RUN / "job.yaml").read_text()))
    assert job.model_spec.blocks["m3r2"].a_activation == "softplus" and job.model_spec.blocks["m3r2"].a_bias
    assert job.resolved["model"]["spec_version"] == SPEC_VERSION
    assert job.resolved["model"]["blocks"]["m3"]["a_activation"] == "softplus"


def test_resume_trains_the_model_the_run_trained(v1_run, tmp_path):
    """`run JOB --resume RUN`: the job file's own model (no a_activation: today's default) loses to the run's."""
    from hybridlab.jobs.spec import load_job
    from hybridlab.runner import _resumed

    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "experiment": "v1",
        "model": {"name": "v1-tiny", "d_model": 32, "vocab_size": 64,
                  "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16, "out_norm": "pre_gate_grouped"},
                             "m3r2": {"mixer": "mamba3", "mode": "mimo", "rank": 2, "d_state": 16, "headdim": 16},
                             "attn": {"mixer": "attention", "heads": 2}, "mlp": {"mixer": "swiglu", "hidden": 64}},
                  "layout": "m3 mlp m3r2 mlp attn mlp"},
        "data": {"task": "mqar", "vocab": 64, "seq_len": 16, "num_kv_pairs": 2},
        "train": {"steps": 4, "zero_stage": 0},
    }))
    fresh = load_job(str(job_file), ["train.lr=0.001"])
    assert fresh.model_spec.blocks["m3"].a_activation == "heavy_tail"
    info = {"run_id": "x", "run_name": v1_run.name, "storage": str(v1_run.parent)}
    job = _resumed(str(job_file), ["train.lr=0.001"], fresh, info, tracker=None)
    b = job.model_spec.blocks
    assert b["m3"].a_activation == "softplus" and b["m3"].a_bias and b["m3"].a_init_max == 4.0
    assert job.resolved["train"]["steps"] == 4 and job.resolved["train"]["lr"] == 0.001  # the job file's rest
    model = HybridLM(job.model_spec)
    from hybridlab.evaluate import load_state_dict

    sd = load_state_dict(str(v1_run / "step_00000002"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}


# ============================================================================ new specs


def test_user_spec_without_the_key_gets_the_official_default():
    spec = load_model_spec({"name": "u", "d_model": 32, "vocab_size": 64,
                            "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16}}, "layout": "m3"})
    blk = spec.blocks["m3"]
    assert (blk.a_activation, blk.a_bias, blk.a_init_min, blk.a_init_max) == ("heavy_tail", False, None, None)
    names = [n for n, _ in HybridLM(spec).named_parameters()]
    assert not any(n.endswith("a_bias") for n in names)


def test_saved_specs_record_the_choices_and_reload_unchanged():
    spec = load_model_spec("zoo:tiny-hybrid", ["blocks.m3.a_activation=softplus", "blocks.m3.a_bias=true"])
    d = spec.to_dict()
    assert d["spec_version"] == SPEC_VERSION
    assert d["blocks"]["m3"]["a_activation"] == "softplus" and d["blocks"]["m3"]["a_bias"] is True
    assert d["blocks"]["m3r2"]["a_activation"] == "heavy_tail" and d["blocks"]["m3r2"]["a_bias"] is False
    again = load_model_spec(yaml.safe_load(yaml.safe_dump(d)))
    assert again.to_dict() == d
    # a version-2 block carries every version-1 key too: it must not be taken for version 1
    d.pop("spec_version")
    assert load_model_spec(d).blocks["m3r2"].a_activation == "heavy_tail"


def test_explicit_spec_version():
    base = {"name": "u", "d_model": 32, "vocab_size": 64, "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16}},
            "layout": "m3"}
    v1 = load_model_spec({**base, "spec_version": 1}).blocks["m3"]
    assert v1.a_activation == "softplus" and v1.a_bias and (v1.a_init_min, v1.a_init_max) == (1.0, 16.0)
    assert load_model_spec({**base, "spec_version": 2}).blocks["m3"].a_activation == "heavy_tail"
    with pytest.raises(SpecError, match="spec_version"):
        load_model_spec({**base, "spec_version": 3})


def test_a_init_without_a_bias_is_a_one_line_error(tmp_path, cli):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nd_model: 32\nvocab_size: 64\nblocks:\n  m3: {mixer: mamba3, d_state: 16, headdim: 16, a_init_max: 4}\nlayout: m3\n")
    r = cli("check", str(p))
    assert r.returncode == 2 and "blocks.m3.a_init_max" in r.stderr and "a_bias: true" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_heavy_tail_a_bias_init_range():
    spec = load_model_spec({"name": "u", "d_model": 64, "vocab_size": 64, "layout": "m3",
                            "blocks": {"m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16, "a_bias": True,
                                              "a_init_min": 0.05, "a_init_max": 8}}})
    torch.manual_seed(0)
    m = HybridLM(spec).layers[0].mixer
    from hybridlab.kernels.ssm_io.reference import heavy_tail

    a = heavy_tail(m.a_bias.detach())  # |A| at a zero projection
    assert a.min() >= 0.05 - 1e-6 and a.max() <= 8 + 1e-5 and a.min() < 1 < a.max()


# ============================================================================ model: {from: DIR}


@pytest.fixture
def model_dir(tmp_path):
    from hybridlab.arch.pretrained import model_state, save_pretrained

    spec = load_model_spec("zoo:tiny-hybrid", ["vocab_size=64"])
    torch.manual_seed(0)
    return save_pretrained(tmp_path / "pretrained", spec, model_state(HybridLM(spec)))


def _job(tmp_path, model, extra=None):
    p = tmp_path / "ft.yaml"
    p.write_text(yaml.safe_dump({"experiment": "ft", "model": model, **(extra or {}),
                                 "data": {"task": "mqar", "vocab": 64, "seq_len": 16, "num_kv_pairs": 2},
                                 "train": {"steps": 2, "zero_stage": 0}}))
    return str(p)


def test_job_from_a_model_folder(tmp_path, model_dir):
    from hybridlab.jobs.spec import from_resolved, load_job

    job = load_job(_job(tmp_path, {"from": "pretrained"}), ["model.blocks.m3.chunk_size=16"])  # relative to the job file
    assert job.resolved["model_from"] == str(model_dir.resolve())
    assert job.model_spec.blocks["m3"].chunk_size == 16 and job.model_spec.name == "tiny-hybrid"
    assert job.resolved["model"]["blocks"]["m3"]["chunk_size"] == 16
    assert job.resolved["model_ref"].startswith("from:")
    again = from_resolved(yaml.safe_load(job.to_yaml()))  # the worker's view, and a submitted job.yaml
    assert again.resolved["model_from"] == job.resolved["model_from"]
    assert again.model_spec.to_dict() == job.model_spec.to_dict()


@pytest.mark.parametrize("bad, where", [
    ({"from": "nowhere"}, "model.from"),
    ({"from": "pretrained", "d_model": 64}, "model.d_model"),
])
def test_job_from_bad(tmp_path, model_dir, bad, where):
    from hybridlab.jobs.spec import load_job

    with pytest.raises(SpecError) as e:
        load_job(_job(tmp_path, bad))
    assert where in str(e.value)


def test_job_from_refuses_shape_changes(tmp_path, model_dir, cli):
    r = cli("check", _job(tmp_path, {"from": "pretrained"}), "--set", "model.blocks.m3.d_state=16")
    assert r.returncode == 2 and "model.from" in r.stderr and "do not fit" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_load_weights_fills_the_model(model_dir):
    from hybridlab.arch import load_pretrained
    from hybridlab.arch.pretrained import load_weights

    ref = load_pretrained(model_dir)
    torch.manual_seed(123)
    fresh = HybridLM(ref.spec)
    load_weights(fresh, model_dir)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.state_dict().values()))
    assert fresh.lm_head.weight is fresh.embed.weight
