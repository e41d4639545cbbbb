"""Data plumbing between the job spec and the tasks: building tasks, per-rank seeded batches.

Every batch of a synthetic task (and of token shards) is a pure function of
``(task config, seed, step, micro-step, rank)`` (``tasks.batch_seed``), so each rank
sees its own shard of the stream and a run resumed at step ``s`` sees exactly the
batches it would have seen. With a ``data.curriculum`` (``jobs/curriculum.py``) the
step also fixes the stage, so the same holds for variable-length batches. Text read
through a dataset (``lm`` with ``dataset``) is a sequential stream per rank instead;
its position is ``state_dict()``, saved with every checkpoint and restored on resume
(``resume``), so the same holds for it.
"""

from __future__ import annotations

from typing import Any, Optional

from hybridlab.jobs import tasks as _tasks
from hybridlab.jobs.curriculum import Curriculum


def task_options(name: str, options: dict, seq_len: Optional[int]) -> dict:
    """The task's kwargs: its options, plus ``seq_len`` when the task takes one."""
    opts = dict(options)
    cls = _tasks.TASKS.get(name)
    if seq_len is not None and cls is not None and "seq_len" in getattr(cls, "OPTIONS", {}) and "seq_len" not in opts:
        opts["seq_len"] = int(seq_len)
    return opts


def build_task(name: str, options: dict, seq_len: Optional[int] = None):
    return _tasks.make_task(name, **task_options(name, options, seq_len))


TEXT_SOURCE_KEYS = ("path", "dataset", "tokenizer", "eos_token", "pack")  # what a text eval borrows from `lm` data


def eval_task_options(eval_entry: dict, data: dict) -> tuple[str, dict]:
    """An eval of the training task inherits the training data options (vocab, pairs...); a text
    eval (niah, ppl_by_pos, lm_eval) of an ``lm`` job inherits its text source and tokenizer."""
    name = eval_entry["task"]
    own = {k: v for k, v in eval_entry.items() if k not in ("task", "seq_lens", "batch_size", "batches")}
    if _canonical(name) == _canonical(data.get("task", "")):
        base = {k: v for k, v in data.items() if k not in ("task", "curriculum")}  # evals run at fixed lengths
        return name, {**base, **own}
    from hybridlab.jobs.text_evals import TEXT_EVALS

    if name in TEXT_EVALS and _canonical(data.get("task", "")) == "lm":
        base = {k: v for k, v in data.items() if k in TEXT_SOURCE_KEYS}
        if "seq_len" in data:
            base["train_seq_len"] = data["seq_len"]
        return name, {**base, **own}
    return name, own


def _canonical(name: str) -> str:
    try:
        return _tasks.canonical_name(name)
    except _tasks.TaskError:  # an unknown name is reported where the task is built
        return str(name)


class TrainStream:
    """Micro-batches of one rank: ``stream.get(step, micro)`` (steps count from 1).

    Seeded tasks answer any (step, micro) directly. A text stream answers them in order; asked
    for a later one it reads forward, for an earlier one it starts over (both are correct, only
    slower: ``resume`` with the checkpoint's ``state_dict()`` is the fast way back)."""

    def __init__(self, data: dict, micro_batch: int, grad_accum: int, seed: int, rank: int, world: int = 1):
        opts = {k: v for k, v in data.items() if k not in ("task", "curriculum")}
        self.seq_len = int(opts.pop("seq_len"))
        self.task = build_task(data["task"], opts, self.seq_len)
        self.curriculum = Curriculum.from_dict(data["curriculum"]) if data.get("curriculum") else None
        self.micro_batch, self.grad_accum, self.seed, self.rank, self.world = micro_batch, grad_accum, seed, rank, world
        self.packed = self.task.train_stream(rank, world, self.seq_len) if getattr(self.task, "streaming", False) else None
        self.fast_forwarded = 0  # micro-batches read and dropped to reach a position (0 after an exact resume)

    def seq_len_at(self, step: int) -> int:
        """The (padded) length of step ``step``'s batches: the curriculum stage's max_len, else seq_len."""
        return self.curriculum.max_len_at(step) if self.curriculum else self.seq_len

    def get(self, step: int, micro: int = 0) -> Any:
        index = (step - 1) * self.grad_accum + micro
        if self.packed is None:
            seed = _tasks.batch_seed(self.seed, index, self.rank)
            if self.curriculum is None:
                return self.task.batch(self.micro_batch, seed, seq_len=self.seq_len)
            return self.task.batch(self.micro_batch, seed, seq_len=self.seq_len_at(step), min_len=self.curriculum.min_len)
        done = self.packed.rows // self.micro_batch
        if index < done:
            self.packed.reset()
            done = 0
        while done < index:
            self.packed.next_batch(self.micro_batch)
            self.fast_forwarded += 1
            done += 1
        return self.packed.next_batch(self.micro_batch)

    def state_dict(self) -> Optional[dict]:
        """The stream's position (None for seeded tasks: their position is the step)."""
        if self.packed is None:
            return None
        return {"micro_batch": self.micro_batch, **self.packed.state_dict()}

    def resume(self, state: Optional[dict]) -> bool:
        """Continue from a checkpoint's ``state_dict()``; False (position left to ``get``) when it does not fit."""
        if self.packed is None or not state or state.get("micro_batch") != self.micro_batch:
            return False
        try:
            self.packed.load_state_dict(state)
        except (ValueError, KeyError):
            self.packed.reset()
            return False
        return True


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
