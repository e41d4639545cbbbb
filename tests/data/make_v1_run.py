"""Regenerate tests/data/v1_run/ with hybridlab as it was before spec versions (commit 3d776c7).

A training run's folder as that version wrote it (resolved job.yaml, a ZeRO-0 DeepSpeed
checkpoint's module states, hybridlab.json) plus the logits that version computed
for fixed tokens: today's code must load it and compute the same.

    git archive 3d776c7 | tar -x -C /tmp/oldhl
    mkdir -p /tmp/oldpkg && cp -r /tmp/oldhl/platform/hybridlab /tmp/oldpkg/hybridlab
    for d in arch kernels jobs; do cp -r /tmp/oldhl/$d /tmp/oldpkg/hybridlab/$d; done
    python tests/data/make_v1_run.py /tmp/oldpkg
"""

import json
import sys
from pathlib import Path

sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # not today's editable install
sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402

from hybridlab.arch import HybridLM  # noqa: E402
from hybridlab.jobs.spec import load_job  # noqa: E402

OUT = Path(__file__).parent / "v1_run"
JOB = {
    "experiment": "v1",
    "model": {
        "name": "v1-tiny", "d_model": 32, "vocab_size": 64,
        "blocks": {
            "m3": {"mixer": "mamba3", "d_state": 16, "headdim": 16, "out_norm": "pre_gate_grouped", "a_init_max": 4},
            "m3r2": {"mixer": "mamba3", "mode": "mimo", "rank": 2, "d_state": 16, "headdim": 16},
            "attn": {"mixer": "attention", "heads": 2},
            "mlp": {"mixer": "swiglu", "hidden": 64},
        },
        "layout": "m3 mlp m3r2 mlp attn mlp",
    },
    "data": {"task": "mqar", "vocab": 64, "seq_len": 16, "num_kv_pairs": 2},
    "train": {"steps": 2, "zero_stage": 0},
}

job = load_job(JOB, file="<v1 job>")
assert "spec_version" not in job.resolved["model"]
torch.manual_seed(0)
model = HybridLM(job.model_spec)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.3)
tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(tokens)
ckpt = OUT / "step_00000002"
(ckpt / "ds").mkdir(parents=True, exist_ok=True)
(OUT / "job.yaml").write_text(job.to_yaml())
torch.save({"module": model.state_dict()}, ckpt / "ds" / "mp_rank_00_model_states.pt")
(ckpt / "hybridlab.json").write_text(json.dumps({"step": 2, "tokens": 0, "world": 1, "zero_stage": 0, "precision": "fp32"}))
torch.save({"tokens": tokens, "logits": logits}, OUT / "expected_logits.pt")
print(f"wrote {OUT}")
