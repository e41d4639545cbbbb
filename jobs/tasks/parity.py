"""Parity of a bit string (state tracking).

Token layout: 0 pad | 1 bit 0 | 2 bit 1 | 3 "=" | 4 start (``bos``). Answers are bit tokens
(1 = even, 2 = odd), so ``vocab_size`` is 4 (5 with ``bos``) and chance is 50%.

``target: running`` (default): inputs are L random bits; the target at
position i is the parity of bits 0..i, so every position gives a training
signal and the last position is the parity of the whole string.
``target: end``: inputs are L random bits and only the last position is
scored, with the parity of the whole string (no "=" token; the format of
Delétang et al. 2023 / Beck et al. 2024 / Grazzi et al. 2025, where the
answer is read right after the last bit).
``target: final``: inputs are L-1 bits then "="; only the "=" position is scored.
``bos: true``: every string starts with a start token (4) before its bits (one bit fewer in the same
length): a state-space layer without one sees no first position to measure the string's phase from.

Eval should report ``final_acc`` (``score`` always returns it): the accuracy of
the whole-string parity, i.e. the last scored token of each sequence, which is
the paper's state-tracking number in every mode (``scaled_acc`` rescales it so
that chance is 0).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import IGNORE, Opt, Task, _err

PAD, ZERO, ONE, EQ, BOS = 0, 1, 2, 3, 4


class Parity(Task):
    name = "parity"
    REPORT_FINAL = True
    OPTIONS = {
        "seq_len": Opt("int", 64, min=1),
        "target": Opt("choice", "running", choices=("running", "end", "final")),
        "vocab": Opt("int", None, min=1, allow_none=True, help="optional: checked to be >= 4 (5 with bos)"),
        "bos": Opt("bool", False, help="a start token before the bits"),
    }

    def _setup(self):
        self._vocab_size = self._check_vocab_knob(5 if self.bos else 4)
        self._answer_tokens = torch.tensor([ZERO, ONE])
        self._check_len(self.seq_len)

    def _check_len(self, L):
        # one position each beyond the one bit: the "=" (target=final), the start token (bos)
        extra = [w for w, on in (("target=final", self.target == "final"), ("bos", self.bos)) if on]
        if L < 1 + len(extra):
            raise _err(f"parity: bad value for 'seq_len': {L} ({' and '.join(extra)} needs >= {1 + len(extra)})",
                       "seq_len")

    def _generate(self, B, L, rng):
        return self._generate_varlen(np.full(B, L), L, rng)

    def _generate_varlen(self, lengths, L, rng):
        # one vectorised pass for every row length: bits, their running parity, then the mode's mask
        B = len(lengths)
        pos = np.arange(L)[None, :]
        first = int(bool(self.bos))  # the first bit's position
        n_bits = lengths - (self.target == "final") - first
        is_bit = (pos >= first) & (pos < (first + n_bits)[:, None])
        bits = np.zeros((B, L), dtype=np.int64)
        n_max = int(n_bits.max())
        bits[:, first:first + n_max] = rng.integers(0, 2, (B, n_max))  # (B, L-1) draws for a fixed-length "final" batch
        bits *= is_bit
        running = np.cumsum(bits, 1) % 2 + ZERO  # at the "=" (no bit) it repeats the last bit's value
        inputs = np.where(is_bit, bits + ZERO, PAD)
        if first:
            inputs[:, 0] = BOS
        rows, last = np.arange(B), lengths - 1
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        if self.target == "running":
            targets = np.where(is_bit, running, IGNORE)
        else:
            targets[rows, last] = running[rows, last]
            if self.target == "final":
                inputs[rows, last] = EQ
        return inputs, targets

    def _solve(self, inputs):
        bits = (inputs == ONE).long()
        running = torch.cumsum(bits, 1) % 2 + ZERO
        if self.target == "running":
            return running
        out = torch.zeros_like(inputs)
        out[:, -1] = running[:, -1]  # "end" and "final" both answer at the last position
        return out
