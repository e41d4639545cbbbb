"""Loading YAML specs into typed dataclasses with errors that point at the file.

Every spec error reads ``FILE:LINE key.path: message`` and is raised as
:class:`SpecError`; the CLI prints it on one line and exits 2. The arch spec
and the job spec (``hybridlab.jobs``) both build on this module.

YAML goes through ``yaml.SafeLoader`` only (with YAML 1.2's ``1e-4`` floats); tags outside the YAML core schema
(``!!python/...`` and friends) are rejected before anything is constructed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Path_ = tuple  # a key path: str keys and int list indices


class SpecError(ValueError):
    """A spec problem, located in its source: ``file:line key.path: message``."""

    def __init__(self, message: str, file: str | None = None, line: int | str | None = None, path: Path_ = ()):
        self.message, self.file, self.line, self.path = message, file, line, tuple(path)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file if self.line is None else f"{self.file}:{self.line}" if isinstance(self.line, int) else f"{self.file} {self.line}"
        elif isinstance(self.line, str):
            where = self.line
        key = format_path(self.path)
        head = " ".join(x for x in (where, key) if x)
        return f"{head}: {self.message}" if head else self.message


def format_path(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_CORE_TAGS = {
    "tag:yaml.org,2002:" + t for t in ("map", "seq", "str", "int", "float", "bool", "null", "timestamp", "binary", "set", "omap", "pairs", "merge", "value")
}


@dataclasses.dataclass
class Source:
    """Where a spec came from: its file name and the line of every key path."""

    file: str = "<spec>"
    lines: dict = dataclasses.field(default_factory=dict)

    def line_of(self, path: Path_):
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def error(self, path: Path_, message: str) -> SpecError:
        return SpecError(message, self.file, self.line_of(path), path)


# Bounds on every spec/job file: YAML aliases share one node, so a few hundred bytes of nested
# aliases (a "billion laughs" file) describe an exponentially large document. Everything that
# walks the data (the line index, overrides, validation, flattening into MLflow params) would do
# that exponential work, so a document is measured on its node graph first (linear time) and
# rejected when its expanded form is larger or deeper than any real spec.
MAX_FILE_BYTES = 1 << 20  # 1 MiB
MAX_VALUES = 100_000  # scalars + mappings + lists after aliases are expanded
MAX_DEPTH = 64  # nesting levels


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_bounds(root, file: str = "<spec>") -> None:
    """Raise SpecError when the document under ``root`` expands beyond MAX_VALUES values or
    MAX_DEPTH levels, or refers to itself; linear in the number of distinct nodes."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        kids = _children(node)
        if children_done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[key] > MAX_VALUES:
                raise SpecError(f"the YAML expands to more than {MAX_VALUES:,} values (aliases are expanded "
                                f"once each: is this an alias bomb?)", file, line)
            if depth[key] > MAX_DEPTH:
                raise SpecError(f"the YAML is nested more than {MAX_DEPTH} levels deep", file, line)
            continue
        if key in open_:
            raise SpecError("a YAML alias refers to the node that contains it", file, node.start_mark.line + 1)
        open_.add(key)
        stack.append((node, True))
        for k in kids:
            if id(k) in open_:
                raise SpecError("a YAML alias refers to the node that contains it", file, k.start_mark.line + 1)
            if id(k) not in size:
                stack.append((k, False))


def _unshare(x):
    """A tree copy of constructed data: every alias becomes its own copy (bounded by check_bounds),
    so editing one place (an override) never edits another."""
    if isinstance(x, dict):
        return {k: _unshare(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshare(v) for v in x]
    return x


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2's floats: ``1e-4`` and ``3E5`` (YAML 1.1, PyYAML's, wants a dot in
    the mantissa and reads them as strings, so ``lr: 1e-4`` failed as "expected a number")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _compose(text: str, file: str):
    """(the loader, the document's root node or None), the node graph bounded."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    except RecursionError:
        raise SpecError(f"the YAML is nested more than {MAX_DEPTH} levels deep", file) from None
    if node is not None:
        check_bounds(node, file)
    return loader, node


def _construct(loader, node, file: str):
    try:
        return _unshare(loader.construct_document(node))
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    finally:
        loader.dispose()


def load_value(text: str, file: str = "<value>"):
    """One YAML value (a ``--set`` value, a task ``--option``) with the same bounds as a file."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise SpecError(f"the value is larger than {MAX_FILE_BYTES >> 20} MiB", file)
    loader, node = _compose(text, file)
    if node is None:
        loader.dispose()
        return None
    _index(node, (), Source(file))  # the same tag rules as a file
    return _construct(loader, node, file)


def parse_yaml(text: str, file: str = "<spec>") -> tuple[Any, Source]:
    """Parse YAML text safely and with bounded work; return the data and its :class:`Source`."""
    src = Source(file)
    if len(text.encode()) > MAX_FILE_BYTES:
        raise SpecError(f"the file is larger than {MAX_FILE_BYTES >> 20} MiB (a spec or job file is a few KB)", file)
    loader, node = _compose(text, file)
    if node is None:
        loader.dispose()
        raise SpecError("the file is empty", file, 1)
    _index(node, (), src)
    return _construct(loader, node, file), src


def load_yaml_file(path: str | Path) -> tuple[Any, Source]:
    p = Path(path)
    try:
        with open(p, "rb") as f:  # read at most the limit: a device file or a huge file never fills memory
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError("file not found", str(path)) from None
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"cannot read: {e.__class__.__name__}", str(path)) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e.__class__.__name__}", str(path)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(f"the file is larger than {MAX_FILE_BYTES >> 20} MiB (a spec or job file is a few KB)", str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("cannot read: UnicodeDecodeError", str(path)) from None
    return parse_yaml(text, str(path))


class YamlSyntaxError(SpecError):
    """The text is not YAML (a SpecError located at the offending line)."""


def _yaml_error(e: yaml.YAMLError, file: str) -> SpecError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and ctx_mark is not None and ctx_mark is not mark:
        ctx = f"{ctx} started at line {ctx_mark.line + 1}"
    msg = f"YAML syntax error: {problem}" + (f" ({ctx})" if ctx else "")
    return YamlSyntaxError(msg, file, mark.line + 1 if mark else None)


def _index(node, path: Path_, src: Source) -> None:
    """Record the line of each key path; reject non-core tags and duplicate keys."""
    if node.tag not in _CORE_TAGS:
        raise SpecError(f"tag {node.tag!r} is not allowed (specs are plain data)", src.file, node.start_mark.line + 1, path)
    src.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for knode, vnode in node.value:
            if knode.tag not in _CORE_TAGS:
                raise SpecError(f"tag {knode.tag!r} is not allowed (specs are plain data)", src.file, knode.start_mark.line + 1, path)
            key = knode.value
            if key in seen:
                raise SpecError(f"duplicate key {key!r}", src.file, knode.start_mark.line + 1, path + (key,))
            seen.add(key)
            src.lines[path + (key,)] = knode.start_mark.line + 1
            _index(vnode, path + (key,), src)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            src.lines[path + (i,)] = item.start_mark.line + 1
            _index(item, path + (i,), src)


# ---------------------------------------------------------------- overrides


def apply_overrides(data: dict, overrides, src: Source, prefix: Path_ = ()) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/flow)."""
    for item in overrides or ():
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key.path=value", src.file)
        key, _, raw = item.partition("=")
        keys = [k for k in key.strip().split(".")]
        if not all(keys):
            raise SpecError(f"--set {item!r}: empty key in the path", src.file)
        try:
            value = load_value(raw, f"--set {key.strip()}") if raw.strip() else ""
        except SpecError as e:
            if isinstance(e, YamlSyntaxError):
                raise SpecError(f"--set {item!r}: the value is not valid YAML", src.file) from None
            raise
        node = data
        path = tuple(prefix)
        for k in keys[:-1]:
            path += (k,)
            if not isinstance(node, dict):
                raise SpecError(f"--set {key}: {format_path(path[:-1])} is not a mapping", src.file)
            node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {key}: {format_path(path)} is not a mapping", src.file)
        node[keys[-1]] = value
        full = tuple(prefix) + tuple(keys)
        src.lines[full] = "--set"
        for p in list(src.lines):  # lines below an overridden key no longer apply
            if len(p) > len(full) and p[: len(full)] == full:
                src.lines[p] = "--set"
    return data


# ---------------------------------------------------------------- dataclasses


def build(cls, data: Any, src: Source, path: Path_ = ()):
    """Construct dataclass ``cls`` from plain data, checking keys and types.

    Unknown keys get a did-you-mean; missing required keys and wrong types are
    errors located at their key path. ``cls.__post_init__`` may raise
    ``SpecError`` via ``src`` for cross-field checks; call ``validate`` hooks
    from the caller when the check needs more context.
    """
    if not isinstance(data, dict):
        raise src.error(path, f"expected a mapping, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise src.error(path + (key,), f"unknown key{did_you_mean(key, fields)}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], src, path + (name,))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise src.error(path, f"missing required key {name!r}")
    return cls(**kwargs)


def _shape(tp) -> str:
    """'list', 'mapping' or 'scalar': what kind of YAML node a type (or a value's type) is."""
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        return "list"
    return "mapping" if origin is dict or dataclasses.is_dataclass(tp) else "scalar"


def coerce(tp, value: Any, src: Source, path: Path_):
    """Check ``value`` against type ``tp``; return it converted (int -> float, nested dataclasses)."""
    origin = typing.get_origin(tp) or (tp if tp in (list, dict) else None)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, src, path)
            except SpecError as e:
                errors.append((a, e))
        # a list against int-or-list: the list alternative's own error names the bad item
        same_shape = [e for a, e in errors if isinstance(value, (list, dict)) and _shape(a) == _shape(type(value))]
        if len(errors) == 1 or len(same_shape) == 1:
            raise (errors[0][1] if len(errors) == 1 else same_shape[0])
        raise src.error(path, f"expected {_type_name(tp)}, got {_kind(value)} {value!r}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise src.error(path, f"{value!r} is not one of {', '.join(repr(a) for a in args)}{did_you_mean(value, args)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise src.error(path, f"expected a list, got {_kind(value)}")
        return [coerce(args[0] if args else Any, v, src, path + (i,)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise src.error(path, f"expected a mapping, got {_kind(value)}")
        return {str(k): coerce(args[1] if args else Any, v, src, path + (k,)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, src, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise src.error(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise src.error(path, f"expected an integer, got {_kind(value)} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise src.error(path, f"expected a number, got {_kind(value)} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise src.error(path, f"expected a string, got {_kind(value)} {value!r}")
    raise TypeError(f"specio.coerce: unsupported type {tp!r}")


def _kind(value) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _type_name(tp) -> str:
    """A union's members as a user writes them: bool as true or false, a Literal as its values."""
    names = []
    for a in typing.get_args(tp):
        if a is type(None):
            continue
        if a is bool:
            names.append("true or false")
        elif typing.get_origin(a) is Literal:
            names.extend(repr(v) for v in typing.get_args(a))
        else:
            names.append(getattr(a, "__name__", str(a)))
    return " or ".join(names)


def positive(src: Source, path: Path_, value, what: str = "") -> None:
    """Raise unless ``value`` > 0."""
    if value is not None and value <= 0:
        raise src.error(path, f"must be positive, got {value}{what}")
