"""A length curriculum for the synthetic tasks: the job spec's ``data.curriculum``.

```yaml
data:
  task: parity
  target: end
  curriculum: {min_len: 3, max_len: [40, 80, 120, 160], steps_per_stage: 10000}
```

Training runs in stages: stage k (counting from 0) covers optimizer steps
``k * steps_per_stage + 1 .. (k + 1) * steps_per_stage``, the last stage runs to
the end of training. ``steps_per_stage`` may also be a list, one count per stage
(the last may be left out: that stage runs to the end anyway), to give the long
stages more steps than the short ones:

```yaml
  curriculum: {min_len: 3, max_len: [10, 20, 40, 80, 160], steps_per_stage: [500, 500, 1000, 3000, 5000]}
```
 In stage k every training sequence has its own length,
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

import bisect
import dataclasses
from dataclasses import dataclass
from itertools import accumulate
from typing import Union

KEYS = ("min_len", "max_len", "steps_per_stage")


@dataclass
class Curriculum:
    min_len: int
    max_len: Union[int, list[int]]
    steps_per_stage: Union[int, list[int]] = 0  # required when max_len has more than one stage

    @property
    def stages(self) -> list[int]:
        """The longest length of each stage."""
        return [int(m) for m in self.max_len] if isinstance(self.max_len, list) else [int(self.max_len)]

    @property
    def longest(self) -> int:
        return max(self.stages)

    @property
    def stage_ends(self) -> list[int]:
        """The last optimizer step of every stage but the last (which runs to the end of training)."""
        n = len(self.stages)
        counts = self.steps_per_stage if isinstance(self.steps_per_stage, list) else [self.steps_per_stage] * n
        return list(accumulate(int(c) for c in counts[:n - 1]))

    def stage_at(self, step: int) -> int:
        """The stage (0-based) of optimizer step ``step`` (steps count from 1)."""
        return bisect.bisect_left(self.stage_ends, step)

    def describe(self, steps: int) -> str:
        """One line for ``run --dry-run``: each stage's longest length and last step, and the stages that
        ``steps`` (train.steps) never reaches."""
        last = self.stage_at(steps)
        parts = [f"{m} to step {e:,}" for m, e in zip(self.stages[:last], self.stage_ends)]
        parts.append(f"{self.stages[last]} to the end ({steps:,})")
        text = f"lengths {self.min_len} to max: " + ", ".join(parts)
        if last < len(self.stages) - 1:
            unreached = self.stages[last + 1:]
            text += (f"; train.steps {steps:,} ends in stage {last + 1} of {len(self.stages)}: max_len "
                     f"{', '.join(map(str, unreached))} never trained")
        return text

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
        n, counts = len(self.stages), self.steps_per_stage
        if isinstance(counts, list):
            if n == 1:
                raise src.error(path + ("steps_per_stage",), "max_len is a single stage: give steps_per_stage as "
                                "one number, or leave it out")
            if len(counts) not in (n - 1, n):
                raise src.error(path + ("steps_per_stage",), f"expected one count per stage ({n} stages; the last "
                                f"may be left out), got {len(counts)}")
            for i, c in enumerate(counts):
                if c <= 0:
                    raise src.error(path + ("steps_per_stage", i), f"must be positive, got {c}")
            return
        if n > 1 and counts <= 0:
            raise src.error(path + ("steps_per_stage",), f"must be positive with {n} stages, got {counts}")
        if counts < 0:
            raise src.error(path + ("steps_per_stage",), f"must be >= 0, got {counts}")
