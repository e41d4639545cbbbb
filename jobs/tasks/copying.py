"""Copying a random string.

Token layout (``vocab`` = V): 0 pad | 1 SEP | [2, V) alphabet.
Stream of L + 1 tokens: ``pad? x1..xn SEP x1..xn`` with n = L // 2 (one pad at
the front when L is odd). The second copy is scored (n tokens: the target at
SEP is x1, ..., at x(n-1) is xn). Chance is 1 / (V - 2).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Opt, Task, _err, shift

PAD, SEP, A0 = 0, 1, 2


class Copy(Task):
    name = "copy"
    OPTIONS = {
        "vocab": Opt("int", 32, min=3, help="model vocab; [2, vocab) is the alphabet"),
        "seq_len": Opt("int", 128, min=1),
    }

    def _setup(self):
        self._vocab_size = self.vocab
        self._answer_tokens = torch.arange(A0, self.vocab)
        self._check_len(self.seq_len)

    def _check_len(self, L):
        if L < 2:
            raise _err(f"copy: bad value for 'seq_len': {L} (needs >= 2)", "seq_len")

    def _fit_len(self, L):
        return L - L % 2  # an odd length starts with a pad

    def _generate(self, B, L, rng):
        n = L // 2
        pad = L + 1 - (2 * n + 1)
        x = rng.integers(A0, self.vocab, (B, n))
        seq = np.concatenate([np.full((B, pad), PAD), x, np.full((B, 1), SEP), x], 1)
        scored = np.zeros_like(seq, dtype=bool)
        scored[:, L + 1 - n:] = True
        return shift(seq, scored)

    def _solve(self, inputs):
        B, L = inputs.shape
        n = L // 2
        pad = L + 1 - (2 * n + 1)
        out = torch.zeros_like(inputs)
        out[:, L - n:] = inputs[:, pad:pad + n]
        return out
