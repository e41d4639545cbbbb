"""The layout pattern language: names, groups ``( … )``, repeats ``* n``.

    layout  := term+
    term    := atom ('*' INT)?
    atom    := NAME | '(' layout ')'

``"(m3 mlp m3 mlp attn mlp) * 2 m3"`` expands to a flat list of names. The
grammar has no operators beyond these, nothing is evaluated.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)|(?P<int>\d+)|(?P<op>[()*])|(?P<bad>\S))")

MAX_LAYERS = 100_000


class LayoutError(ValueError):
    """A syntax error at character ``col`` (1-based) of the pattern."""

    def __init__(self, message: str, col: int):
        self.col = col
        super().__init__(f"{message} at column {col}")


def _tokens(text: str):
    pos = 0
    out = []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            break
        kind = m.lastgroup
        start = m.start(kind) + 1
        if kind == "bad":
            raise LayoutError(f"unexpected character {m.group('bad')!r}", start)
        out.append((kind, m.group(kind), start))
        pos = m.end()
    out.append(("end", "", len(text) + 1))
    return out


def parse_layout(text: str) -> list[str]:
    """Expand a layout pattern into the flat list of block names."""
    toks = _tokens(text)
    i = 0

    def seq(closing: bool) -> list[str]:
        names: list[str] = []
        while True:
            kind, val, col = toks[i]
            if kind == "end" or (kind == "op" and val == ")"):
                if kind == "end" and closing:
                    raise LayoutError("unclosed '('", col)
                if kind == "op" and not closing:
                    raise LayoutError("unmatched ')'", col)
                if not names:
                    raise LayoutError("empty group" if closing else "empty layout", col)
                return names
            names.extend(term())

    def term() -> list[str]:
        nonlocal i
        kind, val, col = toks[i]
        if kind == "name":
            i += 1
            items = [val]
        elif kind == "op" and val == "(":
            i += 1
            items = seq(closing=True)
            i += 1  # the ')'
        else:
            raise LayoutError(f"expected a block name or '(' but found {val!r}", col)
        if toks[i][:2] == ("op", "*"):
            i += 1
            kind, val, col = toks[i]
            if kind != "int":
                raise LayoutError(f"expected a repeat count after '*' but found {val or 'the end'!r}", col)
            n = int(val)
            if n < 1:
                raise LayoutError(f"repeat count must be at least 1, got {n}", col)
            if len(items) * n > MAX_LAYERS:
                raise LayoutError(f"layout expands to more than {MAX_LAYERS} layers", col)
            i += 1
            items = items * n
        return items

    return seq(closing=False)
