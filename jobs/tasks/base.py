"""Shared machinery of the task generators: options, batches, scoring, seeds.

Conventions every task follows
------------------------------
* A task builds, per sequence, a token stream ``seq`` of length ``L + 1`` and a
  boolean ``scored`` mask over it. ``inputs = seq[:, :L]`` and
  ``targets[:, i] = seq[:, i + 1]`` where ``scored[:, i + 1]`` else ``-100``:
  the target at position ``i`` is what the model must output after reading
  ``inputs[:, : i + 1]``. (Parity and running modular arithmetic label each
  position with a state instead of the next input token; they say so.)
* Randomness comes from ``numpy.random.Generator`` seeded by
  ``(seed, task name, seq_len)``, so a batch is a pure function of
  ``(task config, batch_size, seed, seq_len)`` on every platform and process.
* Variable-length batches (``batch(..., min_len=m)``, a length curriculum):
  each sequence gets its own length, drawn uniformly in ``[m, seq_len]``
  (then shortened to the task's nearest natural length, :meth:`Task._fit_len`,
  so a sequence never starts with the task's own padding). Sequences are
  *right*-padded with token 0 to ``seq_len`` and their targets there are
  ``-100``: a causal model never reads padding before a real token, and each
  sequence's answers sit at its own end. ``meta["lengths"]`` holds the real
  lengths. The seed stream is keyed by ``(seed, task, seq_len, min_len)``.
* ``solve(batch)`` recomputes the answers from ``batch.inputs`` alone (the
  language-model task is the exception: its answers are the data) and returns
  a ``(B, L)`` LongTensor holding the answer at every scored position and ``0``
  elsewhere, so ``one_hot(solve(b))`` is an oracle's logits.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hybridlab.arch.specio import did_you_mean  # noqa: F401  (re-exported for the task modules)

IGNORE = -100


class TaskError(ValueError):
    """Bad task name, option or argument. The message is one line; ``option`` names the task
    option at fault (when one is), so a job spec can point its error at that key."""

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


class UnknownTask(TaskError):
    """No task of that name."""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _err(msg: str, option: Optional[str] = None) -> TaskError:
    return TaskError(_one_line(msg), option)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def batch_seed(base_seed: int, step: int, rank: int = 0) -> int:
    """Seed for the batch of ``rank`` at ``step``: stable across processes and runs.

    A BLAKE2b hash of the three integers (never Python's salted ``hash()``),
    folded to a non-negative 63-bit int accepted by numpy and ``torch.manual_seed``.
    """
    for name, v in (("base_seed", base_seed), ("step", step), ("rank", rank)):
        if not _is_int(v):
            raise _err(f"batch_seed: {name} must be an int, got {v!r}")
    h = hashlib.blake2b(f"hybridlab/{int(base_seed)}/{int(step)}/{int(rank)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Opt:
    """One knob of a task. ``kind``: int | float | bool | choice | str | mapping (checked by the task)."""

    kind: str
    default: Any = None
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Sequence[str] = ()
    allow_none: bool = False
    required: bool = False
    help: str = ""


def parse_options(task: str, spec: Mapping[str, Opt], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in spec:
            raise _err(
                f"{task}: unknown option '{key}' = {value!r}{did_you_mean(key, spec)}; "
                f"options: {', '.join(sorted(spec))}", key
            )
    for key, opt in spec.items():
        if key not in kwargs:
            if opt.required:
                raise _err(f"{task}: option '{key}' is required", key)
            out[key] = opt.default
            continue
        value = kwargs[key]
        bad = f"{task}: bad value for '{key}': {value!r}"
        if value is None:
            if not opt.allow_none:
                raise _err(f"{bad} (must not be null)", key)
            out[key] = None
            continue
        if opt.kind == "int":
            if not _is_int(value):
                raise _err(f"{bad} (must be an integer)", key)
            value = int(value)
        elif opt.kind == "float":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise _err(f"{bad} (must be a number)", key)
            value = float(value)
            if not math.isfinite(value):
                raise _err(f"{bad} (must be finite)", key)
        elif opt.kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise _err(f"{bad} (must be true or false)", key)
            value = bool(value)
        elif opt.kind == "choice":
            if value not in opt.choices:
                raise _err(f"{bad} (choose one of: {', '.join(opt.choices)}){did_you_mean(value, opt.choices)}", key)
        elif opt.kind == "str":
            if not isinstance(value, str) or not value:
                raise _err(f"{bad} (must be a non-empty string)", key)
        elif opt.kind == "mapping":
            if not isinstance(value, Mapping):
                raise _err(f"{bad} (must be a mapping)", key)
            value = dict(value)
        if opt.min is not None and value < opt.min:
            raise _err(f"{bad} (must be >= {opt.min:g})", key)
        if opt.max is not None and value > opt.max:
            raise _err(f"{bad} (must be <= {opt.max:g})", key)
        out[key] = value
    return out


# --------------------------------------------------------------------------- batch


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, -100 where not scored
    meta: Dict[str, Any] = field(default_factory=dict)
    seq_idx: Optional[torch.Tensor] = None  # (B, L) int32: packed documents (HybridLM.forward(..., seq_idx=))

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.inputs.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            dict(self.meta),
            None if self.seq_idx is None else self.seq_idx.to(device, non_blocking=non_blocking),
        )


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L) fp32 cross-entropy of each position's logits (B, L, V) against ``targets`` (0 where not scored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)


def shift(seq: np.ndarray, scored: np.ndarray):
    """(B, L+1) stream + mask -> (inputs, targets) int64 arrays of shape (B, L)."""
    seq = np.asarray(seq, dtype=np.int64)
    inputs = np.ascontiguousarray(seq[:, :-1])
    targets = np.where(scored[:, 1:], seq[:, 1:], IGNORE).astype(np.int64)
    return inputs, targets


# --------------------------------------------------------------------------- task base


class Task:
    """Base class. Subclasses set ``name``, ``OPTIONS`` and implement
    ``_setup``, ``_generate`` and ``_solve``."""

    name: str = "task"
    OPTIONS: Dict[str, Opt] = {}
    #: also report the accuracy of the last scored token of every sequence
    REPORT_FINAL: bool = False
    #: the token that right-pads variable-length batches (every task keeps 0 for padding / filler)
    PAD_ID: int = 0
    #: whether ``batch(..., min_len=...)`` (variable lengths, a length curriculum) is supported
    VARIABLE_LENGTH: bool = True

    def __init__(self, **kwargs: Any):
        self.config: Dict[str, Any] = parse_options(self.name, self.OPTIONS, kwargs)
        for k, v in self.config.items():
            setattr(self, k, v)
        self._setup()

    # -- to override
    def _setup(self) -> None:  # validate cross-option constraints, build vocab layout
        pass

    def _generate(self, batch_size: int, seq_len: int, rng: np.random.Generator):
        raise NotImplementedError

    def _solve(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_len(self, seq_len: int) -> None:
        """Raise TaskError when ``seq_len`` is too short for this task."""

    def _fit_len(self, seq_len: int) -> int:
        """The longest length <= ``seq_len`` whose sequences carry none of the task's own padding
        (a variable-length batch draws a length, then uses this one, so no sequence starts with padding)."""
        return seq_len

    def _generate_varlen(self, lengths: np.ndarray, L: int, rng: np.random.Generator):
        """(inputs, targets), each (B, L): row i holds a sequence of length ``lengths[i]`` (a
        ``_fit_len`` value), then padding (token ``PAD_ID``, target -100). This default makes one
        ``_generate`` call per distinct length; tasks with a vectorised form override it."""
        B = len(lengths)
        inputs = np.full((B, L), self.PAD_ID, dtype=np.int64)
        targets = np.full((B, L), IGNORE, dtype=np.int64)
        for c in np.unique(lengths):
            rows = np.nonzero(lengths == c)[0]
            x, y = self._generate(len(rows), int(c), rng)
            inputs[rows, :c] = x
            targets[rows, :c] = y
        return inputs, targets

    # -- properties
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def answer_tokens(self) -> torch.Tensor:
        """Token ids an answer can take (a uniform guess over them scores ``chance``)."""
        return self._answer_tokens

    @property
    def chance(self) -> float:
        return 1.0 / len(self.answer_tokens)

    def _check_vocab_knob(self, needed: int) -> int:
        """``vocab`` knob given: must cover ``needed``; returns the vocab size."""
        vocab = self.config.get("vocab")
        if vocab is not None and vocab < needed:
            raise _err(f"{self.name}: bad value for 'vocab': {vocab} (too small, needs >= {needed})", "vocab")
        return needed

    def describe(self) -> Dict[str, Any]:
        return {"task": self.name, **self.config, "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    # -- API
    def resolve_len(self, seq_len: Optional[int]) -> int:
        L = self.seq_len if seq_len is None else seq_len
        if not _is_int(L) or L <= 0:
            raise _err(f"{self.name}: bad value for 'seq_len': {L!r} (must be a positive integer)", "seq_len")
        L = int(L)
        self._check_len(L)
        return L

    def resolve_min_len(self, min_len: Any, seq_len: int) -> int:
        """Check the shortest length of a variable-length batch against the task and ``seq_len``."""
        if not self.VARIABLE_LENGTH:
            raise _err(f"{self.name}: variable-length batches (min_len, a length curriculum) are for the synthetic tasks")
        if not _is_int(min_len) or min_len <= 0:
            raise _err(f"{self.name}: bad value for 'min_len': {min_len!r} (must be a positive integer)")
        if min_len > seq_len:
            raise _err(f"{self.name}: bad value for 'min_len': {min_len} (above the longest length {seq_len})")
        try:
            self._check_len(self._fit_len(int(min_len)))
        except TaskError as e:  # the task words it for seq_len; here the user's key is min_len
            raise _err(str(e).replace("'seq_len'", "'min_len'")) from None
        return int(min_len)

    def batch(self, batch_size: int, seed: int, seq_len: Optional[int] = None, min_len: Optional[int] = None) -> Batch:
        """``batch_size`` sequences of length ``seq_len`` (default: the task's); with ``min_len``,
        of lengths drawn uniformly in ``[min_len, seq_len]``, right-padded (module docstring)."""
        if not _is_int(batch_size) or batch_size <= 0:
            raise _err(f"{self.name}: bad value for 'batch_size': {batch_size!r} (must be a positive integer)")
        if not _is_int(seed):
            raise _err(f"{self.name}: bad value for 'seed': {seed!r} (must be an integer)")
        L = self.resolve_len(seq_len)
        meta: Dict[str, Any] = {"task": self.name, "seq_len": L, "seed": int(seed)}
        seq_idx = None
        if min_len is None:
            ss = np.random.SeedSequence([int(seed) % (1 << 64), zlib.crc32(self.name.encode()), L])
            rng = np.random.default_rng(ss)
            out = self._generate(int(batch_size), L, rng)
            inputs, targets = out[0], out[1]
            seq_idx = out[2] if len(out) > 2 else None  # tasks that pack documents say where they are
        else:
            lo = self.resolve_min_len(min_len, L)
            ss = np.random.SeedSequence([int(seed) % (1 << 64), zlib.crc32(self.name.encode()), L, lo])
            rng = np.random.default_rng(ss)
            drawn = rng.integers(lo, L + 1, size=int(batch_size))
            fit = {int(n): self._fit_len(int(n)) for n in np.unique(drawn)}
            lengths = np.array([fit[int(n)] for n in drawn], dtype=np.int64)
            inputs, targets = self._generate_varlen(lengths, L, rng)
            meta.update(min_len=lo, lengths=torch.from_numpy(lengths))
        b = Batch(torch.from_numpy(np.asarray(inputs, dtype=np.int64)),
                  torch.from_numpy(np.asarray(targets, dtype=np.int64)), meta,
                  None if seq_idx is None else torch.from_numpy(np.asarray(seq_idx, dtype=np.int32)))
        assert b.inputs.shape == (batch_size, L) and b.targets.shape == (batch_size, L)
        return b

    def solve(self, b: Batch) -> torch.Tensor:
        inputs = b.inputs.cpu()
        lengths = b.meta.get("lengths")
        if lengths is None:
            return self._solve(inputs).to(torch.long)
        out = torch.zeros_like(inputs, dtype=torch.long)  # a variable-length batch: solve each length's rows alone
        for c in torch.unique(lengths).tolist():
            rows = torch.nonzero(lengths == c).squeeze(1)
            out[rows, :c] = self._solve(inputs[rows, :c]).to(torch.long)
        return out

    def check_logits(self, shape, b: Batch) -> None:
        """Logits of shape ``shape`` fit this batch: (B, L) of its targets, at least the task's vocabulary."""
        if len(shape) != 3 or tuple(shape[:2]) != tuple(b.targets.shape):
            raise _err(f"{self.name}: logits shape {tuple(shape)} does not match targets {tuple(b.targets.shape)}")
        if shape[-1] < self.vocab_size:
            raise _err(f"{self.name}: logits have {shape[-1]} classes, task needs vocab_size {self.vocab_size}")

    def score(self, out: Any, b: Batch, token_loss: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Score logits ``(B, L, V)`` (float) or predictions ``(B, L)`` (int).

        ``token_loss`` (B, L) float, with predictions: each position's cross-entropy, computed where the
        logits were (``evals.run_evals`` keeps them on the device), for ``loss`` and ``ppl``.

        Returns ``acc`` (over scored tokens), ``seq_acc`` (sequences whose scored
        tokens are all right), ``n_scored``; with logits also ``loss`` (mean CE
        over scored tokens) and ``ppl``; tasks with a final answer add
        ``final_acc`` (last scored token of each sequence). ``scaled_acc`` is the
        headline accuracy (``final_acc`` where reported, else ``acc``) rescaled so
        that a uniform guess over ``answer_tokens`` scores 0 and a perfect model 1:
        ``(acc - chance) / (1 - chance)`` (Grazzi et al. 2025; x100 is the Mamba-3
        paper's state-tracking table)."""
        targets = b.targets
        logits = None
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out)
        if not torch.is_tensor(out):
            raise _err(f"{self.name}: score expects a tensor of logits or predictions, got {type(out).__name__}")
        if out.is_floating_point():
            self.check_logits(out.shape, b)
            logits = out
            preds = out.argmax(-1)
        else:
            if tuple(out.shape) != tuple(targets.shape):
                raise _err(f"{self.name}: predictions shape {tuple(out.shape)} does not match targets {tuple(targets.shape)}")
            preds = out.long()
        targets = targets.to(preds.device)
        mask = targets != IGNORE
        n = int(mask.sum())
        if n == 0:
            raise _err(f"{self.name}: batch has no scored tokens")
        correct = (preds == targets) & mask
        has = mask.any(1)
        seq_ok = (correct | ~mask).all(1) & has
        res: Dict[str, float] = {
            "acc": float(correct.sum()) / n,
            "seq_acc": float(seq_ok.sum()) / max(int(has.sum()), 1),
            "n_scored": n,
        }
        if logits is not None:
            token_loss = token_losses(logits, targets)
        if token_loss is not None:
            if tuple(token_loss.shape) != tuple(targets.shape):
                raise _err(f"{self.name}: token_loss shape {tuple(token_loss.shape)} does not match targets "
                           f"{tuple(targets.shape)}")
            loss = token_loss.to(targets.device)[mask].double().sum() / n
            res["loss"] = float(loss)
            res["ppl"] = float(math.exp(min(res["loss"], 700.0)))
        if self.REPORT_FINAL:
            L = mask.shape[1]
            pos = torch.arange(L, device=mask.device).expand_as(mask)
            last = torch.where(mask, pos, torch.full_like(pos, -1)).max(1).values
            rows = torch.nonzero(has).squeeze(1)
            fin = correct[rows, last[rows]]
            res["final_acc"] = float(fin.float().mean()) if len(rows) else float("nan")
        head = res["final_acc"] if self.REPORT_FINAL else res["acc"]
        p = self.chance
        res["scaled_acc"] = (head - p) / (1.0 - p) if p < 1.0 else float("nan")
        return res
