"""Per-step cost of a job's Worker loop (jobs/train.py) without Ray: where a small model's step goes.

Runs the real ``Worker`` (set-up, the step loop with its log points, the final checkpoint) in this
process on a world of one, with Ray Train's context and report stubbed out (the point is the loop's
own host-side cost, not Ray's start-up). Prints the median ``train/step_time_s`` of the log windows
(past the first), as ms per step, and with ``--profile N`` the N costliest functions by own time. Process CPU time per step is printed too: on a shared CPU it is steadier than wall time.

    python scripts/profile_step.py --seq-len 1024 --micro-batch 1 --steps 60 [--device cuda] [--profile 30]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import types


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="zoo:tiny-hybrid")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--compile", default="auto", choices=("auto", "true", "false"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of the worker (resources.cpus_per_worker)")
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest functions (cProfile, own time)")
    ap.add_argument("--set", action="append", default=[], help="job overrides key.path=value")
    a = ap.parse_args(argv)

    import ray.train

    from hybridlab.jobs import record as rec
    from hybridlab.jobs import train as tr
    from hybridlab.jobs.spec import load_job

    ctx = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0,
                                get_node_rank=lambda: 0)
    ray.train.get_context = lambda: ctx  # a world of one, without Ray Train
    ray.train.report = lambda *args, **kw: None  # the checkpoint stays in staging (deleted): its cost is still paid
    tr.Worker._write_worker_info = lambda self: None
    if a.device == "cuda":
        import ray.train.torch as rtt
        import torch

        rtt.get_device = lambda: torch.device("cuda", 0)  # what Ray Train would hand the one worker
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)

    cuda = a.device == "cuda"
    tmp = tempfile.mkdtemp(prefix="hybridlab-profile-")
    job = load_job({
        "experiment": "profile-step", "model": a.spec,
        "data": {"task": "mqar", "vocab": 8192, "seq_len": a.seq_len, "num_kv_pairs": 8},
        "train": {"steps": a.steps, "micro_batch": a.micro_batch, "precision": a.precision or ("bf16" if cuda else "fp32"),
                  "zero_stage": 2, "log_every": a.log_every, "warmup": 0, "lr": 1e-4,
                  "compile": {"auto": "auto", "true": True, "false": False}[a.compile]},
        "resources": {"workers": 1, "gpus_per_worker": 1 if cuda else 0, "cpus_per_worker": a.threads},
        "storage": {"path": tmp},
    }, a.set, limits=False)

    class Sink:  # rank 0's progress messages, kept
        def __init__(self):
            self.msgs = []

        def put(self, msg, timeout=None):
            self.msgs.append(msg)

    sink = Sink()
    w = tr.Worker(job, tr.RunPlace(name="profile", storage=tmp), sink=sink)
    w.set_up()
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = w.train()
    cpu_ms, wall_ms = [(time.process_time() - cpu0) * 1e3 / a.steps, (time.perf_counter() - wall0) * 1e3 / a.steps]
    if prof:
        prof.disable()
    w.progress.close()
    w.stop_system_metrics()
    steps = [m.metrics[rec.Metric.STEP_TIME_S] for m in sink.msgs if isinstance(m, rec.Metrics)]
    med = statistics.median(steps[1:] or steps) * 1e3
    tps = statistics.median([m.metrics[rec.Metric.TOKENS_PER_S] for m in sink.msgs if isinstance(m, rec.Metrics)][1:] or [0])
    print(f"worker loop {a.spec} seq {a.seq_len} x mb {a.micro_batch} on {a.device}: {med:.2f} ms/step median "
          f"({tps:,.0f} tokens/s; whole loop incl. first step and final checkpoint: {wall_ms:.2f} ms wall, "
          f"{cpu_ms:.2f} ms process CPU time per step; windows {', '.join(f'{s * 1e3:.1f}' for s in steps)} ms; end {end.status})", flush=True)
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(a.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
