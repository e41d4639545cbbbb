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

from typing import Sequence

import numpy as np
import torch

from .base import IGNORE, Opt, Task, _err

PAD, NUM0 = 0, 1
BRACKET_P = 0.25
_SPLIT, _BRACKET, _CLOSED = 0, 1, 2  # inner nodes: "L op R", "( X )", "( L op R )" (bracket_style full)


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
        if self.brackets:
            expr, vals = self._bracketed(np.full(B, E, dtype=np.int64), rng)
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
            if not self.brackets:
                vals = self._scan(torch.from_numpy(expr))[:, -1].numpy()
            inputs = np.concatenate([inputs, np.full((B, 1), self.EQ)], 1)
            targets[:, -1] = np.asarray(vals, dtype=np.int64) + NUM0
        return inputs, targets

    def _generate_varlen(self, lengths, L, rng):
        m, B = self.modulus, len(lengths)
        E = np.array([self._expr_len(int(n)) for n in lengths])  # == n (running) or n - 1 (final): no pad
        Em = int(E.max())
        inputs = np.full((B, L), PAD, dtype=np.int64)
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        rows = np.arange(B)
        if self.brackets:  # target final: each row's expression, "=", its value
            expr, vals = self._bracketed(E, rng)
            inputs[:, :Em] = expr
            inputs[rows, E] = self.EQ
            targets[rows, E] = vals + NUM0
            return inputs, targets
        # bracket-free: one expression matrix for all rows, one precedence scan, then each row's cut
        expr = np.empty((B, Em), dtype=np.int64)
        expr[:, 0::2] = rng.integers(0, m, (B, (Em + 1) // 2)) + NUM0
        expr[:, 1::2] = rng.integers(0, self.n_ops, (B, Em // 2)) + self.PLUS
        values = self._scan(torch.from_numpy(expr)).numpy() + NUM0
        inside = np.arange(Em)[None, :] < E[:, None]
        inputs[:, :Em] = np.where(inside, expr, PAD)
        if self.target == "running":
            at_number = inside & (np.arange(Em)[None, :] % 2 == 0)
            targets[:, :Em] = np.where(at_number, values, IGNORE)
        else:
            inputs[rows, E] = self.EQ
            targets[rows, E] = values[rows, E - 1]
        return inputs, targets

    def _bracketed(self, E: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Random bracketed expressions, row i of exactly ``E[i]`` tokens: (tokens (B, max E), 0 after each
        row's end; values (B,) mod m).

        Every row's expression tree is grown one level at a time for all rows at once (a node knows its
        offset and size, so its tokens go straight to their positions), each node drawing its own uniforms;
        the values are then folded bottom-up, level by level, with the precedence of the rendered text
        (:func:`_fold`). Grammars (module docstring): ``full`` (Delétang: every operation ``(L op R)``,
        leaves ``d -d (d) (-d)``, a left size uniform in [1, n-4]) and ``random`` (a node is bracketed with
        probability ``BRACKET_P``, else split at a uniform odd left size; * binds tighter)."""
        m, n_ops, full = self.modulus, self.n_ops, self.full
        B, W = len(E), int(np.max(E))
        flat = np.zeros(B * W, dtype=np.int64)  # the token matrix, flat: a node is addressed by one index
        at0, size = np.arange(B, dtype=np.int64) * W, np.asarray(E, dtype=np.int64).copy()  # each node's first token
        node = np.arange(B)  # node ids; the roots are 0..B-1
        n_nodes = B
        leaves: list = []  # (ids, value) per level
        inner: list = []  # (ids, kind, op, left ids, right ids) per level
        digit_at = np.array([0, 0, 1, 1, 2])  # a leaf of size s has its digit at offset digit_at[s]
        while len(at0):
            u = rng.random((len(at0), 3))
            leaf = size <= (4 if full else 1)
            li, ki = np.flatnonzero(leaf), np.flatnonzero(~leaf)
            # leaves: a number, in full style also -d, (d), (-d) for sizes 2, 3, 4
            a, sz, d = at0[li], size[li], (u[li, 0] * m).astype(np.int64)
            flat[a + digit_at[sz]] = NUM0 + d
            if full:
                neg = (sz == 2) | (sz == 4)
                flat[a[neg] + (sz[neg] == 4)] = self.MINUS
                br = sz >= 3
                flat[a[br]] = self.LPAR
                flat[(a + sz - 1)[br]] = self.RPAR
                d = np.where(neg, -d, d) % m
            leaves.append((node[li], d))
            a, sz, ids, u = at0[ki], size[ki], node[ki], u[ki]
            op = (u[:, 2] * n_ops).astype(np.int64)
            if full:  # "(" left op right ")"
                left = 1 + (u[:, 1] * (sz - 4)).astype(np.int64)
                kind = np.full(len(a), _CLOSED)
                flat[a] = self.LPAR
                flat[a + 1 + left] = self.PLUS + op
                flat[a + sz - 1] = self.RPAR
                child_at = [a + 1, a + 2 + left]
                child_size = [left, sz - left - 3]
                two = np.ones(len(a), dtype=bool)
            else:  # "(" child ")" or left op right
                bracket = u[:, 0] < BRACKET_P
                left = 2 * (u[:, 1] * ((sz - 1) // 2)).astype(np.int64) + 1  # odd in [1, s - 2]
                kind = np.where(bracket, _BRACKET, _SPLIT)
                bi, si = np.flatnonzero(bracket), np.flatnonzero(~bracket)
                flat[a[bi]] = self.LPAR
                flat[a[bi] + sz[bi] - 1] = self.RPAR
                flat[a[si] + left[si]] = self.PLUS + op[si]
                child_at = [np.where(bracket, a + 1, a), a + left + 1]
                child_size = [np.where(bracket, sz - 2, left), sz - 1 - left]
                two = ~bracket
            n_two = int(two.sum())
            lid = n_nodes + np.arange(len(a))
            n_nodes += len(a)
            rid = np.full(len(a), -1)
            rid[two] = n_nodes + np.arange(n_two)
            n_nodes += n_two
            inner.append((ids, kind, op, lid, rid))
            at0 = np.concatenate([child_at[0], child_at[1][two]])
            size = np.concatenate([child_size[0], child_size[1][two]])
            node = np.concatenate([lid, rid[two]])
        tokens = flat.reshape(B, W)
        return tokens, _fold(n_nodes, leaves, inner, m)[:B]

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


def _fold(n_nodes: int, leaves: list, inner: list, m: int) -> np.ndarray:
    """Each node's value mod m, folded bottom-up from ``_bracketed``'s tree levels.

    A node's text is kept as a sum of signed products, as precedence reads it: one term ``a`` (``one``), or a
    first term ``a``, the sum ``mid`` of the terms between, and a last term ``z``. Then ``X * Y`` multiplies
    X's last term into Y's first, ``X +- Y`` adds Y's terms (its first one signed), and a bracket closes a
    text into one term (its whole value)."""
    one = np.ones(n_nodes, dtype=bool)
    a = np.zeros(n_nodes, dtype=np.int64)
    mid = np.zeros(n_nodes, dtype=np.int64)
    z = np.zeros(n_nodes, dtype=np.int64)
    for ids, v in leaves:
        a[ids] = v
    for ids, kind, op, lid, rid in reversed(inner):
        br = kind == _BRACKET
        if br.any():  # "( X )": one term, X's value
            c = lid[br]
            a[ids[br]] = np.where(one[c], a[c], a[c] + mid[c] + z[c]) % m
            one[ids[br]] = True
        pair = ~br
        ids, op, x, y = ids[pair], op[pair], lid[pair], rid[pair]
        xo, yo = one[x], one[y]
        # X * Y
        prod = np.where(xo, a[x], z[x]) * a[y] % m
        m_one = xo & yo
        m_a = np.where(xo, prod, a[x])
        m_mid = np.where(xo, 0, mid[x]) + np.where(yo, 0, mid[y]) + np.where(~xo & ~yo, prod, 0)
        m_z = np.where(yo, prod, z[y])
        # X + Y, X - Y
        sign = np.where(op == 1, -1, 1)
        s_a = a[x]
        s_mid = np.where(xo, 0, mid[x] + z[x]) + np.where(yo, 0, sign * a[y] + mid[y])
        s_z = np.where(yo, sign * a[y], z[y])
        mul = op == 2
        one[ids] = mul & m_one
        a[ids] = np.where(mul, m_a, s_a) % m
        mid[ids] = np.where(mul, m_mid, s_mid) % m
        z[ids] = np.where(mul, m_z, s_z) % m
        closed = kind[pair] == _CLOSED
        if closed.any():  # "( L op R )": one term
            c = ids[closed]
            a[c] = np.where(one[c], a[c], a[c] + mid[c] + z[c]) % m
            one[c] = True
    return np.where(one, a, a + mid + z) % m
