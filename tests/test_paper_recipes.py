"""The two protocol recipes validate, expand to the published grids and carry the protocols'
settings (docs/paper-protocol.md); no training here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hybridlab.jobs.spec import expand_sweep

RECIPES = Path(__file__).resolve().parents[1] / "jobs" / "recipes"


@pytest.fixture(scope="module")
def state_tracking():
    return expand_sweep(str(RECIPES / "paper-state-tracking.yaml"))


def test_state_tracking_recipe_is_the_papers_grid(state_tracking):
    jobs = state_tracking
    assert len(jobs) == 3 * 6 * 8
    lrs = sorted({j.spec.train.lr for j in jobs})
    np.testing.assert_allclose(lrs, np.logspace(-4, -2, 8), rtol=5e-3)
    tasks = Counter()
    for j in jobs:
        d, m, blocks = j.spec.data, j.model_spec, j.model_spec.layer_blocks()
        task = "parity" if d.task == "parity" else ("brackets" if d.options["brackets"] else "arith")
        tasks[task] += 1
        cur = d.curriculum
        assert (cur.min_len, cur.stages, cur.steps_per_stage) == (3, [40, 80, 120, 160], 10000)
        assert j.spec.train.steps == 40000 and j.spec.train.micro_batch == 256 and d.seq_len == 160
        mixers = [b for b in blocks if b.mixer != "swiglu"]
        assert len(mixers) == (1 if task == "parity" else 3)
        assert m.d_model == (32 if task == "parity" else 64)
        assert all(b.d_state == 64 for b in mixers if b.mixer == "mamba3")
        if task == "parity":
            assert d.options["target"] == "end"
        else:
            assert d.options["target"] == "final" and d.options["modulus"] == 5 and d.options["bracket_style"] == "full"
        (e,) = j.spec.eval
        assert e.task == d.task and 256 in e.seq_lens and e.batch_size * e.batches >= 4096
    assert tasks == {"parity": 48, "arith": 48, "brackets": 48}
    rows = Counter()
    for j in jobs:
        b = j.model_spec.layer_blocks()[0]
        rows["attention" if b.mixer == "attention" else ("mamba2 conv" if b.d_conv == 4 else "mamba2") if not b.trapezoid
             else {True: "mamba3", "standard": "std-rope", False: "no-rope"}[b.rope]] += 1
        assert b.mixer == "attention" or b.d_conv in (0, 4) and (b.d_conv == 0 or not b.trapezoid)  # only Mamba-2 convolves
    assert rows == {"mamba3": 24, "std-rope": 24, "no-rope": 24, "mamba2 conv": 24, "mamba2": 24, "attention": 24}


def test_zoology_recipe_is_figure_2():
    jobs = expand_sweep(str(RECIPES / "zoology-mqar.yaml"))
    assert len(jobs) == 4 * 4 * 4 * 4
    grid = {(j.spec.data.seq_len, j.spec.data.options["num_kv_pairs"]) for j in jobs}
    assert grid == {(64, 4), (128, 8), (256, 16), (512, 64)}
    assert {j.model_spec.d_model for j in jobs} == {64, 128, 256, 512}
    np.testing.assert_allclose(sorted({j.spec.train.lr for j in jobs}), np.logspace(-4, -2, 4), rtol=5e-3)
    for j in jobs:
        d, m = j.spec.data, j.model_spec
        assert m.vocab_size == 8192 and len(m.layers) == 2
        assert all(b.mixer != "swiglu" for b in m.layer_blocks())  # no MLP
        assert d.options["query_gaps"] == "power" and d.options["echo_values"] is False
        examples = j.spec.train.steps * j.spec.train.micro_batch
        assert 100_000 <= examples < 100_000 + j.spec.train.micro_batch  # ~100k training sequences
        assert m.blocks["attn"].resolved_head_dim(m.d_model) == 64
        assert j.spec.eval[0].seq_lens == [d.seq_len] and j.spec.eval[0].batch_size * j.spec.eval[0].batches == 3000
    m2 = jobs[0].model_spec.blocks["m2"]
    assert (m2.rope, m2.trapezoid, m2.bc_norm) == (False, False, False)
    assert jobs[0].model_spec.blocks["m3r4"].mode == "mimo"


def test_recipes_validate_and_stop_early_as_the_protocols_do(state_tracking):
    # state tracking: best validation accuracy at 256 (best/eval/<task>/len_256/scaled_acc picks the lr)
    for j in state_tracking:
        t = j.spec.train
        assert t.eval_every and t.validation.seq_lens == [256] and t.early_stop is None
    # Zoology: early stop at 0.99 validation accuracy, on the run's own training length
    for j in expand_sweep(str(RECIPES / "zoology-mqar.yaml")):
        es = j.spec.train.early_stop
        assert j.spec.train.eval_every and (es.threshold, es.mode) == (0.99, "max")
        assert es.metric == f"eval/mqar/len_{j.spec.data.seq_len}/acc"
