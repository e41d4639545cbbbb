"""Seeded synthetic tasks with exact answer checkers, for training and eval.

    from hybridlab.jobs.tasks import make_task, batch_seed
    task = make_task("mqar", vocab=8192, seq_len=256, num_kv_pairs=32)
    b = task.batch(batch_size=16, seed=batch_seed(base_seed, step, rank))
    b.inputs, b.targets            # (B, L) int64; targets -100 where not scored
    task.score(logits, b)          # {"acc", "seq_acc", "n_scored", "loss", "ppl", "scaled_acc"[, "final_acc"]}
    task.solve(b)                  # (B, L) exact answers at scored positions, 0 elsewhere
    task.batch(16, seed, seq_len=4 * task.seq_len)   # length generalization
    task.batch(16, seed, seq_len=160, min_len=3)     # lengths uniform in [3, 160], right-padded (a curriculum)

Tasks (see each module's docstring for its token layout and length rule):
``mqar``, ``passkey`` (alias ``needle``), ``parity``, ``modarith``, ``copy``,
``lm`` (token shards: :func:`prepare_shards`, :class:`TokenShards`).
Every task has ``vocab_size``, ``seq_len``, ``config``, ``answer_tokens`` and
``chance`` (accuracy of a uniform guess over ``answer_tokens``).
Bad names, options and values raise :class:`TaskError` (a ``ValueError``) with
a one-line message.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Type, Union

from .base import IGNORE, Batch, Opt, Task, TaskError, UnknownTask, batch_seed, did_you_mean, token_losses
from .copying import Copy
from .lm import LM, ByteTokenizer, TokenShards, load_tokenizer, prepare_shards
from .modarith import ModArith
from .mqar import MQAR
from .parity import Parity
from .passkey import Passkey

#: canonical task names -> classes
TASK_CLASSES: Dict[str, Type[Task]] = {
    "mqar": MQAR,
    "passkey": Passkey,
    "parity": Parity,
    "modarith": ModArith,
    "copy": Copy,
    "lm": LM,
}
ALIASES: Dict[str, str] = {"needle": "passkey"}
#: every accepted name (aliases included) -> class
TASKS: Dict[str, Type[Task]] = {**TASK_CLASSES, **{a: TASK_CLASSES[c] for a, c in ALIASES.items()}}


def canonical_name(name: str) -> str:
    if not isinstance(name, str) or name not in TASKS:
        raise UnknownTask(f"unknown task {name!r}{did_you_mean(str(name), list(TASKS))}; "
                        f"known: {', '.join(sorted(TASKS))}")
    return ALIASES.get(name, name)


def make_task(name: Union[str, Mapping[str, Any]], **kwargs: Any) -> Task:
    """Build a task by name with validated options, or from a spec mapping
    ``{"task": NAME, **options}`` (a job's ``data:`` section)."""
    if isinstance(name, Mapping):
        spec = dict(name)
        if "task" not in spec:
            raise TaskError(f"task spec has no 'task' key: {spec!r}"[:300])
        name = spec.pop("task")
        kwargs = {**spec, **kwargs}
    return TASKS[canonical_name(name)](**kwargs)


__all__ = [
    "ALIASES", "Batch", "ByteTokenizer", "Copy", "IGNORE", "LM", "MQAR", "ModArith", "Opt", "Parity",
    "Passkey", "TASKS", "TASK_CLASSES", "Task", "TaskError", "TokenShards", "UnknownTask", "batch_seed",
    "canonical_name", "load_tokenizer", "make_task", "prepare_shards", "token_losses",
]
