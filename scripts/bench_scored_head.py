"""The LM head over the scored positions only (``HybridLM(..., scored_at=)``) against the head over every
position, through the job's own step (``jobs/step.py TrainStep``) on a recipe's task batches.

    python scripts/bench_scored_head.py [--recipe jobs/recipes/zoology-mqar.yaml] [--layouts "m3 m3,attn attn"]
                                        [--micro-batch 64] [--steps 10] [--device cpu|cuda]

One line per layout and way: ms per step (mean after 2 warm-up steps) and the losses, which must agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import yaml

import hybridlab.jobs.step as step_mod
from hybridlab.arch import HybridLM, load_model_spec
from hybridlab.jobs.data import TrainStream
from hybridlab.jobs.spec import TrainSpec
from hybridlab.jobs.throughput import _init_distributed


def _model(recipe: dict, layout: str) -> HybridLM:
    spec = dict(recipe["model"], layout=layout)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(spec, f)
        f.flush()
        torch.manual_seed(0)
        return HybridLM(load_model_spec(f.name))


def _time(recipe: dict, layout: str, scored: bool, micro_batch: int, steps: int, device: torch.device):
    real = step_mod.scored_positions
    step_mod.scored_positions = real if scored else (lambda targets, **kw: None)
    try:
        train = TrainSpec(steps=steps, micro_batch=micro_batch, lr=1e-3, warmup=0, zero_stage=0, precision="fp32",
                          compile=False)
        engine, _ = step_mod.build_engine(_model(recipe, layout).to(device), train, 1, device)
        step = step_mod.TrainStep(engine, device)
        stream = TrainStream(recipe["data"], micro_batch, 1, 0, 0)
        batches = [stream.get(s) for s in range(steps + 2)]
        for b in batches[:2]:
            step([b])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step([b]).loss for b in batches[2:]]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps, float(losses[0]), float(losses[-1])
    finally:
        step_mod.scored_positions = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="jobs/recipes/zoology-mqar.yaml")
    ap.add_argument("--layouts", default="m3 m3,attn attn")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    _init_distributed(device)
    recipe = yaml.safe_load(open(a.recipe))
    seq = recipe["data"].get("seq_len")
    print(f"{a.recipe}: task {recipe['data']['task']}, seq {seq}, micro-batch {a.micro_batch}, "
          f"vocab {recipe['model']['vocab_size']}, d_model {recipe['model']['d_model']}, {device}, "
          f"{torch.get_num_threads()} threads")
    for layout in a.layouts.split(","):
        full = _time(recipe, layout, False, a.micro_batch, a.steps, device)
        part = _time(recipe, layout, True, a.micro_batch, a.steps, device)
        for name, (dt, l0, l1) in (("every position", full), ("scored only", part)):
            print(f"{layout:12s} head over {name:15s} {dt * 1e3:8.2f} ms/step   loss {l0:.4f} -> {l1:.4f}")
        print(f"{layout:12s} speed-up {full[0] / part[0]:.2f}x")


if __name__ == "__main__":
    main()
