"""Passkey / needle retrieval: a digit passkey hidden in synthetic filler.

Token layout (``vocab`` = V):
    0 pad | 1..10 digits 0-9 | 11 KEY ("the pass key is") | 12 END |
    13 QUERY ("what is the pass key?") | [14, V) filler words

Sequence (stream of L + 1 tokens):
    filler[:p]  KEY d1..dk END  filler[p:]  QUERY d1..dk
with F = L + 1 - (2k + 3) filler tokens and p = round(depth * F): depth 0 puts
the needle at the start, depth 1 right before the question. The k digits after
QUERY are scored (target at QUERY is d1, ..., at d(k-1) is dk). ``depth: null``
(default) draws a depth uniformly per sequence (training); evals set it.
``filler: random`` draws filler words uniformly; ``repeat`` tiles one fixed
16-word "sentence" (the classic "the grass is green..." haystack).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Opt, Task, _err, shift

PAD, DIG0, KEY, END, QUERY, FILL0 = 0, 1, 11, 12, 13, 14


class Passkey(Task):
    name = "passkey"
    OPTIONS = {
        "vocab": Opt("int", 64, min=FILL0 + 2, help="model vocab; [14, vocab) are filler words"),
        "seq_len": Opt("int", 256, min=1),
        "depth": Opt("float", None, min=0.0, max=1.0, allow_none=True,
                     help="needle depth in the filler, 0..1; null = uniform per sequence"),
        "passkey_len": Opt("int", 5, min=1, help="digits in the passkey"),
        "filler": Opt("choice", "random", choices=("random", "repeat")),
    }

    def _setup(self):
        self._vocab_size = self.vocab
        self._answer_tokens = torch.arange(DIG0, DIG0 + 10)
        self._check_len(self.seq_len)
        sentence = np.random.default_rng(1234).integers(FILL0, self.vocab, 16)
        self._sentence = sentence

    def _check_len(self, L):
        need = 2 * self.passkey_len + 3
        if L < need:
            raise _err(f"passkey: bad value for 'seq_len': {L} (too short for passkey_len={self.passkey_len}, needs >= {need})", "seq_len")

    def _generate(self, B, L, rng):
        k = self.passkey_len
        F = L + 1 - (2 * k + 3)
        digits = rng.integers(0, 10, (B, k)) + DIG0
        depth = np.full(B, self.depth) if self.depth is not None else rng.random(B)
        prefix = np.rint(depth * F).astype(np.int64)
        if self.filler == "random":
            fill = rng.integers(FILL0, self.vocab, (B, F))
        else:
            fill = np.resize(self._sentence, F)[None].repeat(B, 0)
        seq = np.zeros((B, L + 1), dtype=np.int64)
        for b in range(B):
            p = prefix[b]
            seq[b] = np.concatenate([fill[b, :p], [KEY], digits[b], [END], fill[b, p:], [QUERY], digits[b]])
        scored = np.zeros((B, L + 1), dtype=bool)
        scored[:, L + 1 - k:] = True
        return shift(seq, scored)

    def _solve(self, inputs):
        B, L = inputs.shape
        k = self.passkey_len
        out = torch.zeros_like(inputs)
        for b in range(B):
            row = inputs[b]
            kp = int(torch.nonzero(row == KEY)[0, 0])
            q = int(torch.nonzero(row == QUERY)[0, 0])
            digits = row[kp + 1: kp + 1 + k]
            n = min(k, L - q)
            out[b, q:q + n] = digits[:n]
        return out
