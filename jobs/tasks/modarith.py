"""Modular arithmetic without and with brackets (state tracking).

Token layout (m = ``modulus``): 0 pad | 1..m numbers 0..m-1 | m+1 "+" |
m+2 "-" | m+3 "*" | m+4 "(" | m+5 ")" | m+6 "=". ``vocab_size`` = m + 7 for
both variants, so one model can train on both. Answers are number tokens
(chance 1/m).

Expressions use numbers 0..m-1 and the binary operators + - * with the usual
precedence (* binds tighter, left associative; no unary minus), evaluated mod m,
as in Deletang et al. 2023 ("1 + 2 * 3 = 2" mod 5). Every such expression has
odd length; an expression of the longest odd length that fits is left-padded
with pad tokens to ``seq_len``.

``brackets: false``: ``n0 op n1 op ... nk``. ``target: running`` (default here)
scores every number position with the value of the expression read so far;
``target: final`` appends "=" and scores only the answer after it.
``brackets: true``: a random expression tree rendered with brackets where the
generator wrapped a sub-expression (probability 0.25 per node, splits uniform);
only ``target: final`` is allowed (the default then). Eval: ``final_acc``.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .base import IGNORE, Opt, Task, _err

PAD, NUM0 = 0, 1
BRACKET_P = 0.25


class ModArith(Task):
    name = "modarith"
    REPORT_FINAL = True
    OPTIONS = {
        "modulus": Opt("int", 5, min=2),
        "brackets": Opt("bool", False),
        "seq_len": Opt("int", 64, min=1),
        "target": Opt("choice", None, choices=("running", "final"), allow_none=True,
                      help="default: running without brackets, final with brackets"),
        "vocab": Opt("int", None, min=1, allow_none=True, help="optional: checked to be >= modulus + 7"),
    }

    def _setup(self):
        m = self.modulus
        self.PLUS, self.MINUS, self.TIMES, self.LPAR, self.RPAR, self.EQ = (m + 1 + i for i in range(6))
        if self.target is None:
            self.target = "final" if self.brackets else "running"
            self.config["target"] = self.target
        if self.brackets and self.target == "running":
            raise _err("modarith: bad value for 'target': 'running' (only 'final' with brackets: true)", "target")
        self._vocab_size = self._check_vocab_knob(m + 7)
        self._answer_tokens = torch.arange(NUM0, NUM0 + m)
        self._check_len(self.seq_len)

    def _check_len(self, L):
        if self.target == "final" and L < 2:
            raise _err(f"modarith: bad value for 'seq_len': {L} (target=final needs >= 2)", "seq_len")

    def _expr_len(self, L):
        E = L if self.target == "running" else L - 1
        return E if E % 2 else E - 1

    # -- generation
    def _generate(self, B, L, rng):
        m = self.modulus
        E = self._expr_len(L)
        pad = L - E - (self.target == "final")
        if self.brackets:
            expr = np.stack([self._gen_tree(E, rng) for _ in range(B)])
        else:
            k = (E - 1) // 2
            expr = np.empty((B, E), dtype=np.int64)
            expr[:, 0::2] = rng.integers(0, m, (B, k + 1)) + NUM0
            expr[:, 1::2] = rng.integers(0, 3, (B, k)) + self.PLUS
        inputs = np.concatenate([np.full((B, pad), PAD, dtype=np.int64), expr], 1)
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        if self.target == "running":
            values = self._scan(torch.from_numpy(expr)).numpy()
            targets[:, pad::2] = values[:, 0::2] + NUM0
        else:
            vals = [self.evaluate(row) for row in expr] if self.brackets else \
                self._scan(torch.from_numpy(expr))[:, -1].tolist()
            inputs = np.concatenate([inputs, np.full((B, 1), self.EQ)], 1)
            targets[:, -1] = np.asarray(vals, dtype=np.int64) + NUM0
        return inputs, targets

    def _gen_tree(self, n: int, rng) -> np.ndarray:
        """Random bracketed expression of exactly n (odd) tokens."""
        m = self.modulus
        u = iter(rng.random(4 * n + 4).tolist())
        out: List[int] = []
        stack: List[object] = [n]  # ints: expressions to render; tokens as ("tok", id)
        while stack:
            item = stack.pop()
            if isinstance(item, tuple):
                out.append(item[1])
                continue
            size = item
            if size == 1:
                out.append(NUM0 + int(next(u) * m))
            elif next(u) < BRACKET_P:
                stack += [("t", self.RPAR), size - 2, ("t", self.LPAR)]
            else:
                left = 2 * int(next(u) * ((size - 1) // 2)) + 1  # odd in [1, size-2]
                op = self.PLUS + int(next(u) * 3)
                stack += [size - 1 - left, ("t", op), left]
        return np.asarray(out, dtype=np.int64)

    # -- solving
    def _scan(self, expr: torch.Tensor) -> torch.Tensor:
        """Bracket-free expressions (B, E): value of each prefix ending at a number
        (entries at operator positions are meaningless). Precedence-aware:
        keep the sum of finished terms and the signed current product term."""
        m = self.modulus
        B, E = expr.shape
        out = torch.zeros(B, E, dtype=torch.long)
        acc = torch.zeros(B, dtype=torch.long)
        term = expr[:, 0] - NUM0
        out[:, 0] = term % m
        for i in range(1, E - 1, 2):
            op, n = expr[:, i], expr[:, i + 1] - NUM0
            is_mul = op == self.TIMES
            acc = torch.where(is_mul, acc, (acc + term) % m)
            term = torch.where(is_mul, term * n, torch.where(op == self.PLUS, n, -n)) % m
            out[:, i + 1] = (acc + term) % m
        return out

    def evaluate(self, tokens: Sequence[int]) -> int:
        """Value mod m of one expression (token ids, no pad / "="): recursive descent."""
        m = self.modulus
        toks = [int(t) for t in tokens]
        pos = 0

        def expr() -> int:
            nonlocal pos
            v = term()
            while pos < len(toks) and toks[pos] in (self.PLUS, self.MINUS):
                op = toks[pos]
                pos += 1
                r = term()
                v = (v + r) % m if op == self.PLUS else (v - r) % m
            return v

        def term() -> int:
            nonlocal pos
            v = factor()
            while pos < len(toks) and toks[pos] == self.TIMES:
                pos += 1
                v = (v * factor()) % m
            return v

        def factor() -> int:
            nonlocal pos
            t = toks[pos]
            pos += 1
            if t == self.LPAR:
                v = expr()
                pos += 1  # ")"
                return v
            return (t - NUM0) % m

        v = expr()
        if pos != len(toks):
            raise ValueError("trailing tokens in expression")
        return v

    def _solve(self, inputs):
        B, L = inputs.shape
        out = torch.zeros_like(inputs)
        E = self._expr_len(L)
        if self.target == "running":
            pad = L - E
            vals = self._scan(inputs[:, pad:]) + NUM0
            out[:, pad::2] = vals[:, 0::2]
            return out
        pad = L - 1 - E
        if self.brackets:
            vals = torch.tensor([self.evaluate(row[pad:L - 1].tolist()) for row in inputs])
        else:
            vals = self._scan(inputs[:, pad:L - 1])[:, -1]
        out[:, -1] = vals + NUM0
        return out
