"""MQAR — Zoology-style multi-query associative recall.

Token layout (``vocab`` = V):
    0                  filler / pad
    [1, 1 + K)         keys,   K = (V - 1) // 2
    [1 + K, V)         values

Sequence (stream of L + 1 tokens, see ``base``):
    k1 v1 k2 v2 ... kN vN | query region
The N keys are distinct, as are the N values. The query region holds every key
exactly once, in random order, each immediately followed by its value, at
uniformly chosen even offsets (slots) of the region; every other position is
filler 0. The value after each query key is scored (target at the key's position),
so accuracy is over the N value tokens of the query region.

Zoology's generator (Arora et al. 2023, ``zoology/data/multiquery_ar.py``, its
Figure 2 settings) differs in two ways, both options here:
``query_gaps: power`` draws the N slots without replacement with probability
proportional to ``i ** (power_a - 1)`` for slot i = 1, 2, ... (``power_a`` 0.01:
most queries come soon after the key-value context), and ``echo_values: false``
leaves filler after each query key instead of its value. Its key/value split
(keys below V/2, values from V/2) is this one for an even ``vocab`` (8192).

Length rule: the region has ``(L + 1 - 2N) // 2`` slots and must fit N queries,
so ``seq_len >= 4N - 1``. With ``kv_rule: fixed`` (default) N = ``num_kv_pairs``
at every length: a longer ``seq_len`` (length generalization) only adds filler,
i.e. longer gaps between a pair and its query. With ``kv_rule: scale`` N grows
with the length, ``N(L) = max(1, num_kv_pairs * L // seq_len)``.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Opt, Task, _err, shift


class MQAR(Task):
    name = "mqar"
    OPTIONS = {
        "vocab": Opt("int", 8192, min=3, help="model vocab; keys and values split it in halves"),
        "seq_len": Opt("int", 256, min=1, help="default length"),
        "num_kv_pairs": Opt("int", 32, min=1, help="key-value pairs per sequence"),
        "kv_rule": Opt("choice", "fixed", choices=("fixed", "scale"),
                       help="pairs at other lengths: fixed count, or scale with length"),
        "query_gaps": Opt("choice", "uniform", choices=("uniform", "power"),
                          help="query slots: uniform, or Zoology's power law (power_a)"),
        "power_a": Opt("float", 0.01, min=1e-6, max=1.0, help="Zoology's power-law exponent (query_gaps: power)"),
        "echo_values": Opt("bool", True, help="the value follows each query key in the input (Zoology: false)"),
    }

    def _setup(self):
        V = self.vocab
        self.num_keys = (V - 1) // 2
        self.key_lo = 1
        self.val_lo = 1 + self.num_keys
        self.num_values = V - self.val_lo
        N = self.num_kv_pairs
        if self.num_keys < N:
            raise _err(f"mqar: bad value for 'vocab': {V} (too small for num_kv_pairs={N}, needs >= {2 * N + 1})", "vocab")
        if self.seq_len < 4 * N - 1:
            raise _err(f"mqar: bad value for 'num_kv_pairs': {N} (too many for seq_len={self.seq_len}, "
                       f"needs seq_len >= 4*num_kv_pairs-1 = {4 * N - 1})", "num_kv_pairs")
        self._vocab_size = V
        self._answer_tokens = torch.arange(self.val_lo, V)

    def pairs_for(self, L: int) -> int:
        if self.kv_rule == "fixed":
            return self.num_kv_pairs
        return max(1, self.num_kv_pairs * L // self.seq_len)

    def _check_len(self, L):
        N = self.pairs_for(L)
        if L < 4 * N - 1:
            raise _err(f"mqar: bad value for 'seq_len': {L} (too short for {N} kv pairs, needs >= {4 * N - 1})", "seq_len")
        if N > self.num_keys:
            raise _err(f"mqar: bad value for 'seq_len': {L} ({N} kv pairs exceed the {self.num_keys} keys of vocab={self.vocab})", "seq_len")

    def _generate(self, B, L, rng):
        # one vectorised pass for the whole batch (a per-row rng.choice loop cost ~25 ms at Zoology's 512x64)
        N = self.pairs_for(L)
        seq = np.zeros((B, L + 1), dtype=np.int64)
        scored = np.zeros((B, L + 1), dtype=bool)
        slots = (L + 1 - 2 * N) // 2
        keys = _distinct(rng, B, N, self.num_keys) + self.key_lo
        vals = _distinct(rng, B, N, self.num_values) + self.val_lo
        seq[:, 0:2 * N:2] = keys
        seq[:, 1:2 * N:2] = vals
        # N distinct slots per row: the N largest of log(weight) + Gumbel noise, i.e. successive draws
        # without replacement with probability proportional to the weights (uniform weights: any N equally likely)
        score = rng.gumbel(size=(B, slots))
        if self.query_gaps == "power":
            score += (self.power_a - 1) * np.log(np.arange(1, slots + 1, dtype=np.float64))
        chosen = np.argpartition(-score, N - 1, axis=1)[:, :N] if N < slots else np.tile(np.arange(slots), (B, 1))
        pos = 2 * N + 2 * chosen
        order = np.argsort(rng.random((B, N)), axis=1)  # each key goes to a uniformly random chosen slot
        rows = np.arange(B)[:, None]
        seq[rows, pos] = np.take_along_axis(keys, order, 1)
        seq[rows, pos + 1] = np.take_along_axis(vals, order, 1)
        scored[rows, pos + 1] = True
        inputs, targets = shift(seq, scored)
        if not self.echo_values:  # Zoology: filler where the model would read each answer
            inputs[scored[:, :L]] = 0
        return inputs, targets

    def _solve(self, inputs):
        B, L = inputs.shape
        N = self.pairs_for(L)
        table = torch.zeros(B, self.vocab, dtype=torch.long)
        table.scatter_(1, inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2])
        is_query = (inputs >= self.key_lo) & (inputs < self.val_lo)
        is_query[:, : 2 * N] = False
        return torch.where(is_query, table.gather(1, inputs), torch.zeros_like(inputs))


def _distinct(rng: np.random.Generator, B: int, N: int, K: int) -> np.ndarray:
    """(B, N): each row N distinct integers of [0, K) in random order (a uniformly random ordered sample)."""
    if N * (N - 1) > 2 * K:  # many pairs for the range: shuffle the range per row (cost B x K)
        return np.argsort(rng.random((B, K)), axis=1)[:, :N]
    # few pairs: draw with replacement and redraw the rows that repeat a value (a row is distinct with
    # probability ~exp(-N(N-1)/2K) >= 1/e here, so few rounds); conditioned on distinctness an i.i.d. row is a uniform ordered sample
    out = rng.integers(0, K, (B, N))
    todo = np.arange(B)
    while len(todo):
        s = np.sort(out[todo], axis=1)
        todo = todo[(s[:, 1:] == s[:, :-1]).any(1)]
        out[todo] = rng.integers(0, K, (len(todo), N))
    return out
