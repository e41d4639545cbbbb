"""Time one training batch of each synthetic task at the shapes of the paper recipes
(jobs/recipes/paper-state-tracking.yaml, zoology-mqar.yaml): milliseconds per batch on this CPU.

    .venv/bin/python scripts/bench_datagen.py [--reps 20]

Each line: the task, its options, the batch shape, and the median / min ms of ``Task.batch`` over
``--reps`` batches of distinct seeds (the step's seed, as training draws them)."""

from __future__ import annotations

import argparse
import time

from hybridlab.jobs.tasks import batch_seed, make_task

# (label, task, options, batch, seq_len, min_len): min_len = a curriculum's variable-length batch
CASES = [
    ("parity end, curriculum 3..160", "parity", dict(target="end"), 256, 160, 3),
    ("modarith final, curriculum 3..160", "modarith", dict(target="final", modulus=5), 256, 160, 3),
    ("modarith brackets full, curriculum 3..160", "modarith",
     dict(target="final", modulus=5, brackets=True, bracket_style="full"), 256, 160, 3),
    ("modarith brackets random, curriculum 3..160", "modarith", dict(modulus=5, brackets=True), 256, 160, 3),
    ("modarith brackets full, fixed 160", "modarith",
     dict(target="final", modulus=5, brackets=True, bracket_style="full"), 256, 160, None),
    ("modarith brackets random, fixed 160", "modarith", dict(modulus=5, brackets=True), 256, 160, None),
    ("modarith brackets full, eval 256", "modarith",
     dict(target="final", modulus=5, brackets=True, bracket_style="full"), 512, 256, None),
    ("mqar zoology (64, 4)", "mqar", dict(vocab=8192, num_kv_pairs=4, query_gaps="power", echo_values=False), 512, 64, None),
    ("mqar zoology (128, 8)", "mqar", dict(vocab=8192, num_kv_pairs=8, query_gaps="power", echo_values=False), 512, 128, None),
    ("mqar zoology (256, 16)", "mqar", dict(vocab=8192, num_kv_pairs=16, query_gaps="power", echo_values=False), 256, 256, None),
    ("mqar zoology (512, 64)", "mqar", dict(vocab=8192, num_kv_pairs=64, query_gaps="power", echo_values=False), 128, 512, None),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    for label, name, opts, B, L, lo in CASES:
        t = make_task(name, seq_len=L, **opts)
        t.batch(B, batch_seed(0, 0), seq_len=L, min_len=lo)  # warm up
        ms = []
        for step in range(1, args.reps + 1):
            t0 = time.perf_counter()
            t.batch(B, batch_seed(0, step), seq_len=L, min_len=lo)
            ms.append((time.perf_counter() - t0) * 1e3)
        ms.sort()
        print(f"{label:48s} {B}x{L:<4d} median {ms[len(ms) // 2]:7.2f} ms  min {ms[0]:7.2f} ms")


if __name__ == "__main__":
    main()
