"""Data plumbing between the job spec and the tasks: building tasks, per-rank seeded batches.

Every batch is a pure function of ``(task config, seed, step, micro-step, rank)``
(``tasks.batch_seed``), so each rank sees its own shard of the stream and a run
resumed at step ``s`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Any, Optional

from hybridlab.jobs import tasks as _tasks


def task_options(name: str, options: dict, seq_len: Optional[int]) -> dict:
    """The task's kwargs: its options, plus ``seq_len`` when the task takes one."""
    opts = dict(options)
    cls = _tasks.TASKS.get(name)
    if seq_len is not None and cls is not None and "seq_len" in getattr(cls, "OPTIONS", {}) and "seq_len" not in opts:
        opts["seq_len"] = int(seq_len)
    return opts


def build_task(name: str, options: dict, seq_len: Optional[int] = None):
    return _tasks.make_task(name, **task_options(name, options, seq_len))


def eval_task_options(eval_entry: dict, data: dict) -> tuple[str, dict]:
    """An eval of the training task inherits the training data options (vocab, pairs...)."""
    name = eval_entry["task"]
    own = {k: v for k, v in eval_entry.items() if k not in ("task", "seq_lens", "batch_size", "batches")}
    if _canonical(name) == _canonical(data.get("task", "")):
        base = {k: v for k, v in data.items() if k != "task"}
        return name, {**base, **own}
    return name, own


def _canonical(name: str) -> str:
    try:
        return _tasks.canonical_name(name)
    except _tasks.TaskError:  # an unknown name is reported where the task is built
        return str(name)


class TrainStream:
    """Seeded micro-batches of one rank: ``stream.get(step, micro)``."""

    def __init__(self, data: dict, micro_batch: int, grad_accum: int, seed: int, rank: int):
        opts = {k: v for k, v in data.items() if k not in ("task",)}
        self.seq_len = int(opts.pop("seq_len"))
        self.task = build_task(data["task"], opts, self.seq_len)
        self.micro_batch, self.grad_accum, self.seed, self.rank = micro_batch, grad_accum, seed, rank

    def get(self, step: int, micro: int = 0) -> Any:
        seed = _tasks.batch_seed(self.seed, (step - 1) * self.grad_accum + micro, self.rank)
        return self.task.batch(self.micro_batch, seed, seq_len=self.seq_len)


class RandomTokens:
    """Uniform random tokens with a stream's interface (``get(step, micro)``), for throughput benchmarks:
    the same host-to-device path as a task's batches, without a task's generation cost."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch: int, seed: int = 0, rank: int = 0):
        import torch

        self.seq_len, self.micro_batch = seq_len, micro_batch
        self._gen = torch.Generator().manual_seed(_tasks.batch_seed(seed, 0, rank))
        self._vocab = vocab_size

    def get(self, step: int, micro: int = 0) -> Any:
        import torch

        tokens = torch.randint(0, self._vocab, (self.micro_batch, self.seq_len + 1), generator=self._gen)
        return _tasks.Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:])
