"""A job that starts from an imported official checkpoint (`model: {from: DIR}`), end to end (slow: Ray + DeepSpeed).

import mamba-ssm -> run (the worker loads the folder's weights before training) -> eval the run
-> export mamba-ssm RUN_ID: with a learning rate of 1e-9 the exported weights are the imported ones.
"""

from __future__ import annotations

import sys
import subprocess

import pytest
import torch
import yaml

from test_jobs_run import env_for, run_id_of
from test_mamba_ssm_interop import SISO, official_state, write_official

pytestmark = pytest.mark.slow


def hl(args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def test_finetune_from_an_imported_checkpoint(tmp_path):
    sd = official_state(SISO, seed=11)
    src = write_official(tmp_path / "official", SISO, sd)
    r = hl(["import", "mamba-ssm", str(src), "--out", str(tmp_path / "m3")], tmp_path)
    assert r.returncode == 0, r.stderr
    job = tmp_path / "ft.yaml"
    job.write_text(yaml.safe_dump({
        "experiment": "finetune", "model": {"from": "m3"},
        "data": {"task": "mqar", "vocab": 32, "seq_len": 32, "num_kv_pairs": 2},
        "train": {"steps": 2, "micro_batch": 2, "lr": 1.0e-9, "warmup": 0, "zero_stage": 0, "log_every": 1},
        "resources": {"workers": 1}, "storage": {"path": str(tmp_path / "runs")},
        "eval": [{"task": "mqar", "seq_lens": [32], "batches": 1, "batch_size": 4}],
    }))
    r = hl(["run", str(job), "--plain", "--set", "model.blocks.m3.chunk_size=32"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_id = run_id_of(r.stdout)
    r = hl(["export", "mamba-ssm", run_id, "--out", str(tmp_path / "back")], tmp_path)
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
    assert set(got) == set(sd)
    worst = max((got[k].float() - sd[k].float()).abs().max().item() for k in sd)
    assert worst < 1e-5, worst  # the run trained the imported weights (random ones would be O(1) away)
    assert (tmp_path / "back" / "tokenizer.json").is_file()  # the import's tokenizer and provenance followed
    assert yaml.safe_load((tmp_path / "back" / "config.json").read_text())["ssm_cfg"] == SISO["ssm_cfg"]
