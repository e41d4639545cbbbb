"""Sweeps: the mapping form (one product), a list of mappings (a union of products), zip groups,
the runner-facing view (key -> values), YAML round trip, and located errors."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from hybridlab.arch.specio import SpecError
from hybridlab.jobs.spec import Sweep, dump_yaml, expand_sweep, load_job

BASE = """\
experiment: t
model: zoo:tiny-hybrid
data: {task: mqar, vocab: 64, seq_len: 64, num_kv_pairs: 4}
train: {steps: 2, micro_batch: 4}
"""


def write(tmp_path, sweep: str) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(BASE + textwrap.dedent(sweep))
    return str(p)


def combos(jobs):
    return [(j.spec.train.lr, j.model_spec.layout_str, j.spec.data.seq_len) for j in jobs]


def test_mapping_form_is_one_product(tmp_path):
    jobs = expand_sweep(write(tmp_path, 'sweep: {train.lr: [0.001, 0.01], model.layout: ["m3 mlp", "attn mlp"]}\n'))
    assert combos(jobs) == [(0.001, "m3 mlp", 64), (0.001, "attn mlp", 64), (0.01, "m3 mlp", 64), (0.01, "attn mlp", 64)]
    assert jobs[0].label == "train.lr=0.001, model.layout=m3 mlp"
    assert jobs[0].sweep_values == {"train.lr": 0.001, "model.layout": "m3 mlp"}


def test_list_form_is_a_union_of_products_with_single_values_and_zip(tmp_path):
    path = write(tmp_path, """\
        sweep:
          - model.layout: m3 mlp          # a single value
            train.lr: [0.001, 0.01]
          - zip: {data.seq_len: [32, 128], data.num_kv_pairs: [2, 8]}
            model.layout: attn mlp
        """)
    job = load_job(path)
    sweep = job.spec.sweep
    assert isinstance(sweep, Sweep) and len(sweep.products) == 2 and sweep.form == "list"
    # the runner's view: every swept key -> every value it takes (keys joined for the parent run's tag)
    assert dict(sweep) == {"model.layout": ["m3 mlp", "attn mlp"], "train.lr": [0.001, 0.01],
                           "data.seq_len": [32, 128], "data.num_kv_pairs": [2, 8]}
    jobs = expand_sweep(path)
    assert combos(jobs) == [(0.001, "m3 mlp", 64), (0.01, "m3 mlp", 64), (0.003, "attn mlp", 32), (0.003, "attn mlp", 128)]
    assert [j.spec.data.options["num_kv_pairs"] for j in jobs] == [4, 4, 2, 8]  # zipped, not crossed
    assert jobs[2].label == "data.seq_len=32, data.num_kv_pairs=2, model.layout=attn mlp"
    assert all(not j.spec.sweep for j in jobs)
    # it dumps back as written (a submitted job re-expands to the same runs) and re-loads
    text = dump_yaml({"sweep": sweep})
    again = yaml.safe_load(text)["sweep"]
    assert again == sweep.raw() and isinstance(again, list) and len(again) == 2
    assert load_job({**yaml.safe_load(open(path)), "sweep": again}).spec.sweep.combinations() == sweep.combinations()


def test_sweeping_list_values_needs_a_list_of_lists(tmp_path):
    path = write(tmp_path, """\
        sweep:
          - eval: [[{task: mqar, seq_lens: [64]}], [{task: mqar, seq_lens: [128]}]]
        """)
    jobs = expand_sweep(path)
    assert [j.spec.eval[0].seq_lens for j in jobs] == [[64], [128]]


@pytest.mark.parametrize("sweep,where,words", [
    ("sweep: [train.lr]\n", "sweep[0]", "expected a non-empty mapping"),
    ("sweep: []\n", "sweep", "at least one product"),
    ("sweep: 3\n", "sweep", "a list of such mappings"),
    ("sweep:\n  - {train.lr: []}\n", "sweep[0].train.lr", "at least one value"),
    ("sweep:\n  - {trian.lr: [1]}\n", "sweep[0].trian.lr", "cannot sweep"),
    ("sweep:\n  - {zip: {train.lr: [1, 2], train.steps: [3]}}\n", "sweep[0].zip.train.steps", "equally long"),
    ("sweep:\n  - {zip: 7}\n", "sweep[0].zip", "mapping"),
    ("sweep:\n  - {zip: [1]}\n", "sweep[0].zip[0]", "mapping"),
    ("sweep:\n  - {zip: []}\n", "sweep[0].zip", "or a list of them"),
    ("sweep:\n  - {train.lr: [1], zip: {train.lr: [2]}}\n", "sweep[0].train.lr", "give it once"),
    ("sweep:\n  - {train.lr: [0.1, 0.2]}\n  - {train.lr: [0.2]}\n", "sweep[1]", "comes twice (first in sweep entry 0)"),
    ("sweep: {train.lr: [0.1, 0.1]}\n", "sweep", "comes twice"),
    ("sweep: {experiment: [a, b]}\n", "sweep.experiment", "cannot sweep"),
])
def test_sweep_errors_are_located(tmp_path, sweep, where, words):
    with pytest.raises(SpecError) as ei:
        load_job(write(tmp_path, sweep))
    msg = str(ei.value)
    assert f"job.yaml:" in msg and f" {where}:" in msg and words in msg and "\n" not in msg, msg


def test_several_zip_groups_and_eval_defaults_to_the_training_task(tmp_path):
    path = write(tmp_path, """\
        eval: [{seq_lens: [16]}]
        sweep:
          zip:
            - {data.seq_len: [32, 64], data.num_kv_pairs: [2, 4]}
            - {model.d_model: [64, 128], model.blocks.attn.heads: [2, 4]}
          train.lr: [0.001, 0.01]
        """)
    jobs = expand_sweep(path)
    assert len(jobs) == 2 * 2 * 2
    got = {(j.spec.data.seq_len, j.spec.data.options["num_kv_pairs"], j.model_spec.d_model,
            j.model_spec.blocks["attn"].heads, j.spec.train.lr) for j in jobs}
    assert (32, 2, 128, 4, 0.01) in got and (64, 4, 64, 2, 0.001) in got and len(got) == 8
    assert not any(nkv == 4 and L == 32 for L, nkv, *_ in got)  # zipped within a group
    e = jobs[0].spec.eval[0]
    assert e.task == "mqar" and e.seq_lens == [16]
    with pytest.raises(SpecError) as ei:
        load_job(write(tmp_path, "sweep:\n  zip: [{train.lr: [1, 2]}, {train.lr: [3, 4]}]\n"))
    assert "sweep.train.lr:" in str(ei.value) and "swept twice" in str(ei.value)
