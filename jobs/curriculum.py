"""A length curriculum for the synthetic tasks: the job spec's ``data.curriculum``.

```yaml
data:
  task: parity
  target: end
  curriculum: {min_len: 3, max_len: [40, 80, 120, 160], steps_per_stage: 10000}
```

Training runs in stages: stage k (counting from 0) covers optimizer steps
``k * steps_per_stage + 1 .. (k + 1) * steps_per_stage``, the last stage runs to
the end of training. In stage k every training sequence has its own length,
drawn uniformly in ``[min_len, max_len[k]]`` (``Task.batch(..., min_len=...)``),
and the batch is right-padded to ``max_len[k]`` (targets -100 there, so the
loss and the accuracy only see real tokens; each sequence's answer is at its
own end). ``max_len`` given as one number is a single stage: variable lengths
without a schedule (Grazzi et al. 2025 train on 3..40 that way).

The stage is a pure function of the step, and the lengths are drawn from the
batch's own seed (``tasks.batch_seed(seed, step, rank)``), so a run resumed at
step s continues in the stage, and with the batches, it would have had.
``data.seq_len`` is the longest ``max_len`` (filled in when omitted): FLOP
counts and the default eval length use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

KEYS = ("min_len", "max_len", "steps_per_stage")


@dataclass
class Curriculum:
    min_len: int
    max_len: Union[int, list[int]]
    steps_per_stage: int = 0  # required when max_len has more than one stage

    @property
    def stages(self) -> list[int]:
        """The longest length of each stage."""
        return [int(m) for m in self.max_len] if isinstance(self.max_len, list) else [int(self.max_len)]

    @property
    def longest(self) -> int:
        return max(self.stages)

    def stage_at(self, step: int) -> int:
        """The stage (0-based) of optimizer step ``step`` (steps count from 1)."""
        n = len(self.stages)
        if n == 1:
            return 0
        return min(max(step - 1, 0) // self.steps_per_stage, n - 1)

    def max_len_at(self, step: int) -> int:
        return self.stages[self.stage_at(step)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Curriculum":
        return cls(**{k: d[k] for k in KEYS if k in d})

    def check(self, src, path: tuple) -> None:
        """Cross-field checks, located at ``path`` (``data.curriculum``) in ``src``'s file."""
        from hybridlab.arch.specio import positive

        positive(src, path + ("min_len",), self.min_len)
        if isinstance(self.max_len, list) and not self.max_len:
            raise src.error(path + ("max_len",), "expected a length or a non-empty list of lengths (one per stage)")
        many = isinstance(self.max_len, list)
        for i, m in enumerate(self.stages):
            where = path + (("max_len", i) if many else ("max_len",))
            if m < self.min_len:
                raise src.error(where, f"{m} is below min_len {self.min_len}")
            if i and m < self.stages[i - 1]:
                raise src.error(where, f"{m} is below the previous stage's {self.stages[i - 1]} (stages only grow)")
        if len(self.stages) > 1 and self.steps_per_stage <= 0:
            raise src.error(path + ("steps_per_stage",), f"must be positive with {len(self.stages)} stages, "
                            f"got {self.steps_per_stage}")
        if self.steps_per_stage < 0:
            raise src.error(path + ("steps_per_stage",), f"must be >= 0, got {self.steps_per_stage}")
