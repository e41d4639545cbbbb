"""Modular arithmetic without and with brackets (state tracking).

Token layout (m = ``modulus``): 0 pad | 1..m numbers 0..m-1 | m+1 "+" |
m+2 "-" | m+3 "*" | m+4 "(" | m+5 ")" | m+6 "=". ``vocab_size`` = m + 7 for
both variants, so one model can train on both. Answers are number tokens
(chance 1/m).

``ops``: the binary operators, ``+-*`` (default) or ``+-``.

``brackets: false``: ``n0 op n1 op ... nk`` with the usual precedence (* binds
tighter, left associative; no unary minus), evaluated mod m, as in Delétang et
al. 2023 ("1 + 2 * 3 = 2" mod 5). Such an expression has odd length; one of the
longest odd length that fits is left-padded with a pad token to ``seq_len``.
``target: running`` (default here) scores every number position with the value
of the expression read so far; ``target: final`` appends "=" and scores only the
answer after it (the format of Beck et al. 2024 / Grazzi et al. 2025).

``brackets: true``: only ``target: final`` (the default then); two grammars:

* ``bracket_style: random`` (default): a random expression tree of + - * with
  precedence, rendered with brackets where the generator wrapped a
  sub-expression (probability 0.25 per node, splits uniform); odd lengths.
* ``bracket_style: full``: the grammar of Delétang et al. 2023 (used by Grazzi et
  al. 2025): every binary operation is bracketed, ``(L op R)``, and the leaves
  of length 1..4 are ``d``, ``-d``, ``(d)``, ``(-d)`` (unary minus); an
  expression of length n >= 5 splits into a left part of uniform length in
  [1, n-4] and the rest; every length fits (no padding). ``ops`` defaults to
  ``+-`` here (Delétang's default, ``mult=False``).

Eval: ``final_acc`` (and its ``scaled_acc``).
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
        "bracket_style": Opt("choice", "random", choices=("random", "full"),
                             help="with brackets: random (sparse brackets, precedence) or full (Deletang et al.)"),
        "ops": Opt("choice", None, choices=("+-*", "+-"), allow_none=True,
                   help="binary operators; default +-* (+- with bracket_style: full)"),
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
        self.full = self.brackets and self.bracket_style == "full"
        if self.ops is None:
            self.ops = "+-" if self.full else "+-*"
            self.config["ops"] = self.ops
        self.n_ops = len(self.ops)  # the operator tokens are PLUS, MINUS[, TIMES]: the first n_ops
        self._vocab_size = self._check_vocab_knob(m + 7)
        self._answer_tokens = torch.arange(NUM0, NUM0 + m)
        self._check_len(self.seq_len)

    def _check_len(self, L):
        if self.target == "final" and L < 2:
            raise _err(f"modarith: bad value for 'seq_len': {L} (target=final needs >= 2)", "seq_len")

    def _expr_len(self, L):
        E = L if self.target == "running" else L - 1
        return E if E % 2 or self.full else E - 1

    def _fit_len(self, L):
        return L - (L - self._expr_len(L) - (self.target == "final"))  # drop the one pad of an even length

    # -- generation
    def _generate(self, B, L, rng):
        m = self.modulus
        E = self._expr_len(L)
        pad = L - E - (self.target == "final")
        full_vals = None
        if self.full:
            u = rng.random((B, 2 * E + 2))
            pairs = [self._gen_full(E, row) for row in u.tolist()]
            expr = np.asarray([p[0] for p in pairs], dtype=np.int64).reshape(B, E)
            full_vals = [p[1] for p in pairs]
        elif self.brackets:
            expr = np.stack([self._gen_tree(E, rng) for _ in range(B)])
        else:
            k = (E - 1) // 2
            expr = np.empty((B, E), dtype=np.int64)
            expr[:, 0::2] = rng.integers(0, m, (B, k + 1)) + NUM0
            expr[:, 1::2] = rng.integers(0, self.n_ops, (B, k)) + self.PLUS
        inputs = np.concatenate([np.full((B, pad), PAD, dtype=np.int64), expr], 1)
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        if self.target == "running":
            values = self._scan(torch.from_numpy(expr)).numpy()
            targets[:, pad::2] = values[:, 0::2] + NUM0
        else:
            if full_vals is not None:
                vals = full_vals
            elif self.brackets:
                vals = [self.evaluate(row) for row in expr]
            else:
                vals = self._scan(torch.from_numpy(expr))[:, -1].tolist()
            inputs = np.concatenate([inputs, np.full((B, 1), self.EQ)], 1)
            targets[:, -1] = np.asarray(vals, dtype=np.int64) + NUM0
        return inputs, targets

    def _generate_varlen(self, lengths, L, rng):
        if self.brackets:  # per-sequence generators anyway: one call per distinct length
            return super()._generate_varlen(lengths, L, rng)
        # bracket-free: one expression matrix for all rows, one precedence scan, then each row's cut
        m, B = self.modulus, len(lengths)
        E = np.array([self._expr_len(int(n)) for n in lengths])  # == n (running) or n - 1 (final): no pad
        Em = int(E.max())
        expr = np.empty((B, Em), dtype=np.int64)
        expr[:, 0::2] = rng.integers(0, m, (B, (Em + 1) // 2)) + NUM0
        expr[:, 1::2] = rng.integers(0, self.n_ops, (B, Em // 2)) + self.PLUS
        values = self._scan(torch.from_numpy(expr)).numpy() + NUM0
        inside = np.arange(Em)[None, :] < E[:, None]
        inputs = np.full((B, L), PAD, dtype=np.int64)
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        inputs[:, :Em] = np.where(inside, expr, PAD)
        if self.target == "running":
            at_number = inside & (np.arange(Em)[None, :] % 2 == 0)
            targets[:, :Em] = np.where(at_number, values, IGNORE)
        else:
            rows = np.arange(B)
            inputs[rows, E] = self.EQ
            targets[rows, E] = values[rows, E - 1]
        return inputs, targets

    def _gen_full(self, n: int, u) -> tuple:
        """Delétang et al.'s bracketed expression of exactly n tokens and its value, from the
        uniform numbers ``u`` (a list of at least 2n + 2; each node uses one or two)."""
        m, n_ops = self.modulus, self.n_ops
        out: List[int] = []
        it = iter(u)

        def emit(n: int) -> int:  # depth <= n / 4 + 1: fine for Python's recursion limit at eval lengths
            if n <= 4:
                d = int(next(it) * m)
                leaf = {1: [NUM0 + d], 2: [self.MINUS, NUM0 + d], 3: [self.LPAR, NUM0 + d, self.RPAR],
                        4: [self.LPAR, self.MINUS, NUM0 + d, self.RPAR]}[n]
                out.extend(leaf)
                return d if n in (1, 3) else -d % m
            left = 1 + int(next(it) * (n - 4))  # uniform in [1, n - 4]
            k = int(next(it) * n_ops)
            out.append(self.LPAR)
            lv = emit(left)
            out.append(self.PLUS + k)
            rv = emit(n - left - 3)
            out.append(self.RPAR)
            return (lv + rv if k == 0 else lv - rv if k == 1 else lv * rv) % m

        v = emit(n)
        return out, v

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
                op = self.PLUS + int(next(u) * self.n_ops)
                stack += [size - 1 - left, ("t", op), left]
        return np.asarray(out, dtype=np.int64)

    # -- solving
    def _scan(self, expr: torch.Tensor) -> torch.Tensor:
        """Bracket-free expressions (B, E): value of each prefix ending at a number
        (entries at operator positions are meaningless). Precedence-aware:
        keep the sum of finished terms and the signed current product term."""
        m = self.modulus
        x = expr.numpy() if torch.is_tensor(expr) else np.asarray(expr)  # numpy: ~5x less per-step overhead
        B, E = x.shape
        out = np.zeros((B, E), dtype=np.int64)
        acc = np.zeros(B, dtype=np.int64)
        term = x[:, 0] - NUM0
        out[:, 0] = term % m
        for i in range(1, E - 1, 2):
            op, n = x[:, i], x[:, i + 1] - NUM0
            is_mul = op == self.TIMES
            acc = np.where(is_mul, acc, (acc + term) % m)
            term = np.where(is_mul, term * n, np.where(op == self.PLUS, n, -n)) % m
            out[:, i + 1] = (acc + term) % m
        return torch.from_numpy(out)

    def evaluate(self, tokens: Sequence[int]) -> int:
        """Value mod m of one expression (token ids, no pad / "="): recursive descent; a "-" where a
        number is expected is a unary minus."""
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
            if t == self.MINUS:  # unary minus (bracket_style: full writes -d and (-d))
                return -factor() % m
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
