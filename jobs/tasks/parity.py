"""Parity of a bit string (state tracking).

Token layout: 0 pad | 1 bit 0 | 2 bit 1 | 3 "=". Answers are bit tokens
(1 = even, 2 = odd), so ``vocab_size`` is 4 and chance is 50%.

``target: running`` (default, used for training): inputs are L random bits;
the target at position i is the parity of bits 0..i, so every position gives a
training signal and the last position is the parity of the whole string.
``target: final``: inputs are L-1 bits then "="; only the "=" position is scored.

Eval should report ``final_acc`` (``score`` always returns it): the accuracy of
the whole-string parity, i.e. the last scored token of each sequence, which is
the paper's state-tracking number in either mode.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import IGNORE, Opt, Task, _err

PAD, ZERO, ONE, EQ = 0, 1, 2, 3


class Parity(Task):
    name = "parity"
    REPORT_FINAL = True
    OPTIONS = {
        "seq_len": Opt("int", 64, min=1),
        "target": Opt("choice", "running", choices=("running", "final")),
        "vocab": Opt("int", None, min=1, allow_none=True, help="optional: checked to be >= 4"),
    }

    def _setup(self):
        self._vocab_size = self._check_vocab_knob(4)
        self._answer_tokens = torch.tensor([ZERO, ONE])
        self._check_len(self.seq_len)

    def _check_len(self, L):
        if self.target == "final" and L < 2:
            raise _err(f"parity: bad value for 'seq_len': {L} (target=final needs >= 2)", "seq_len")

    def _generate(self, B, L, rng):
        if self.target == "running":
            bits = rng.integers(0, 2, (B, L))
            return bits + ZERO, np.cumsum(bits, 1) % 2 + ZERO
        bits = rng.integers(0, 2, (B, L - 1))
        inputs = np.concatenate([bits + ZERO, np.full((B, 1), EQ)], 1)
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        targets[:, -1] = bits.sum(1) % 2 + ZERO
        return inputs, targets

    def _solve(self, inputs):
        bits = (inputs == ONE).long()
        running = torch.cumsum(bits, 1) % 2 + ZERO
        if self.target == "running":
            return running
        return torch.where(inputs == EQ, running, torch.zeros_like(inputs))
