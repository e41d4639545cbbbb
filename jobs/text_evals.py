"""Evals of a language model on text: needle-in-a-haystack, per-position perplexity, lm-evaluation-harness.

Job ``eval:`` entries (and ``hybridlab eval``) name them like the synthetic tasks; they borrow the
job's text source and tokenizer (``data.dataset`` / ``data.path``, ``data.tokenizer``) unless the
entry gives its own::

    eval:
      - {task: niah, seq_lens: [2048, 4096, 8192], depths: [0, 0.25, 0.5, 0.75, 1], samples: 8}
      - {task: ppl_by_pos, seq_lens: [16384], buckets: 16, batch_size: 2, batches: 4}
      - {task: lm_eval, tasks: [local_lastword], include: evals/lm_eval_tasks, limit: 500}

* ``niah`` — a needle sentence (``The secret number is 48213.``) at each depth (0 = the start of the
  haystack, 1 = its end) of haystacks cut from the eval corpus (documents joined by blank lines, never
  EOS), prompts of exactly L tokens ending in the question ``What is the secret number? The secret
  number is``; greedy decoding; exact match of the first number generated. ``samples`` prompts per
  (length, depth), each with its own number and haystack offset (seeded).
* ``ppl_by_pos`` — L-token windows of the same joined text; the mean next-token loss (and its
  perplexity) per position bucket (``buckets`` equal slices of [0, L)), so a curve shows what
  happens past the training length.
* ``lm_eval`` — lm-evaluation-harness tasks through ``hybridlab.jobs.lm_harness`` (the registered
  ``hybridlab`` LM); ``include`` names folders of task YAMLs (local data, no downloads).

Metric names: ``hybridlab.jobs.record`` (``eval/niah/len_<L>/depth_<D>/acc``,
``eval/ppl_by_pos/len_<L>/pos_<a>_<b>/loss``, ``eval/lm_eval/<task>/<metric>``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hybridlab.jobs.record import metric_name, niah_metric, ppl_pos_metric
from hybridlab.jobs.tasks.base import Opt, TaskError, parse_options

TEXT_EVALS = ("niah", "ppl_by_pos", "lm_eval")

SOURCE = {
    "path": Opt("str", None, allow_none=True, help="token shards (their tokenizer)"),
    "dataset": Opt("mapping", None, allow_none=True, help="a text source, as data.dataset"),
    "tokenizer": Opt("str", None, allow_none=True),
    "eos_token": Opt("str", None, allow_none=True),
    "pack": Opt("bool", True),
    "train_seq_len": Opt("int", None, min=1, allow_none=True, help="the training length (set from data.seq_len)"),
}
OPTIONS = {
    "niah": {**SOURCE, "samples": Opt("int", 4, min=1), "seed": Opt("int", 0), "digits": Opt("int", 5, min=1, max=12),
             "needle": Opt("str", "The secret number is {answer}."),
             "question": Opt("str", "What is the secret number? The secret number is"),
             "max_new_tokens": Opt("int", None, min=1, allow_none=True)},
    "ppl_by_pos": {**SOURCE, "buckets": Opt("int", 16, min=1), "seed": Opt("int", 0)},
    "lm_eval": {**SOURCE, "limit": Opt("float", None, min=0, allow_none=True, help="examples per task (< 1: a fraction)"),
                "num_fewshot": Opt("int", None, min=0, allow_none=True), "max_length": Opt("int", None, min=1, allow_none=True),
                "bootstrap_iters": Opt("int", 0, min=0)},
}
LIST_OPTS = {"niah": {"depths": (0.0, 0.25, 0.5, 0.75, 1.0)}, "ppl_by_pos": {}, "lm_eval": {"tasks": None, "include": ()}}
DEFAULT_MULTIPLES = {"niah": (1, 2, 4, 8, 16), "ppl_by_pos": (16,), "lm_eval": (1,)}


def parse_text_eval(name: str, options: dict) -> dict:
    """Validated options of a text eval (one-line TaskError naming the option)."""
    opts = dict(options)
    lists = {}
    for key, default in LIST_OPTS[name].items():
        v = opts.pop(key, default)
        if key == "tasks":
            if isinstance(v, str):
                v = [t.strip() for t in v.split(",") if t.strip()]
            if not v or not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t for t in v):
                raise TaskError(f"lm_eval: bad value for 'tasks': {v!r} (a list of lm-eval task names)", "tasks")
        elif key == "include":
            v = [v] if isinstance(v, str) else list(v or ())
            if not all(isinstance(p, str) and p for p in v):
                raise TaskError(f"lm_eval: bad value for 'include': {v!r} (folders of task YAMLs)", "include")
            import os

            for p in v:
                if not os.path.isdir(os.path.expanduser(p)):
                    raise TaskError(f"lm_eval: bad value for 'include': {p!r} (no such folder)", "include")
        elif key == "depths":
            if not isinstance(v, (list, tuple)) or not v or not all(
                    isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in v):
                raise TaskError(f"niah: bad value for 'depths': {v!r} (a list of fractions in [0, 1])", "depths")
            v = [float(d) for d in v]
        lists[key] = list(v)
    out = parse_options(name, OPTIONS[name], opts)
    out.update(lists)
    if out["dataset"] is None and out["path"] is None and name != "lm_eval":
        raise TaskError(f"{name}: needs text: train on `lm` data (its dataset is used) or give 'dataset' (+ 'tokenizer')")
    if out["tokenizer"] is None and out["path"] is None:
        raise TaskError(f"{name}: needs a tokenizer: train on `lm` data or give 'tokenizer'")
    return out


def default_lengths(name: str, train_seq_len: Optional[int]) -> list[int]:
    return [m * int(train_seq_len) for m in DEFAULT_MULTIPLES[name]] if train_seq_len else []


def check_text_eval(name: str, options: dict) -> dict:
    """Everything that can be checked before training: options, tokenizer, corpus, lm-eval task names."""
    opts = parse_text_eval(name, options)
    corpus = TextCorpus(name, opts)
    if name == "lm_eval":
        from hybridlab.jobs.lm_harness import find_tasks

        find_tasks(opts["tasks"], opts["include"])
    else:
        corpus.check()
    return opts


# --------------------------------------------------------------------------- the text


class TextCorpus:
    """The eval's tokenizer and its text as one token stream (documents joined by a blank line)."""

    SEP = "\n\n"

    def __init__(self, name: str, opts: dict):
        from hybridlab.jobs import textdata

        self.name, self.opts = name, opts
        self.spec = None
        if opts.get("path") is not None:
            from hybridlab.jobs.tasks.lm import TokenShards, load_tokenizer

            try:
                self.shards = TokenShards(opts["path"])
                base = load_tokenizer(opts["path"])
            except TaskError as e:
                raise TaskError(f"{name}: bad value for 'path': {opts['path']!r} ({e})", "path") from None
            self.tokenizer = textdata.as_text_tokenizer(base, opts["path"])
        else:
            self.tokenizer = textdata.load_text_tokenizer(opts["tokenizer"], opts.get("eos_token"), task=name)
            if opts.get("dataset") is not None:
                self.spec = textdata.DatasetSpec.from_mapping(opts["dataset"], task=name)
        self._tokens: list[int] = []
        self._exhausted = False
        self._docs = None

    def check(self) -> None:
        if self.spec is not None:
            from hybridlab.jobs.textdata import peek

            peek(self.spec, self.name)

    def _doc_ids(self):
        """Each document's tokens, in order, once."""
        if self.spec is not None:
            from hybridlab.jobs.textdata import stream_documents

            batch = []
            for text in stream_documents(self.spec, self.name):
                batch.append(text)
                if len(batch) == 32:
                    yield from self.tokenizer.encode_batch(batch)
                    batch = []
            if batch:
                yield from self.tokenizer.encode_batch(batch)
            return
        split = "val" if "val" in self.shards.splits else "train"
        toks = self.shards.tokens(split).astype(np.int64)
        eos = self.shards.eos_id
        cuts = np.flatnonzero(toks == eos)
        a = 0
        for c in list(cuts) + [len(toks)]:
            if c > a:
                yield toks[a:c].tolist()
            a = c + 1

    def tokens(self, n: int) -> list[int]:
        """At least ``n`` tokens of joined text (the corpus repeats when it is shorter)."""
        if self._docs is None:
            self._docs = self._doc_ids()
            self._sep = self.tokenizer.encode(self.SEP)
        while len(self._tokens) < n and not self._exhausted:
            try:
                ids = next(self._docs)
            except StopIteration:
                self._exhausted = True
                break
            if self._tokens:
                self._tokens.extend(self._sep)
            self._tokens.extend(ids)
        if not self._tokens:
            raise TaskError(f"{self.name}: the eval text is empty")
        out = list(self._tokens)
        while len(out) < n:
            out = out + self._sep + self._tokens
        return out


# --------------------------------------------------------------------------- running


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)


def _token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(B, L) next-token losses in float32, computed in slices of the logits (long windows, large vocabularies)."""
    logits = _logits(model, inputs)
    V = logits.shape[-1]
    out = []
    for a in range(0, logits.shape[1], chunk):
        sl = logits[:, a:a + chunk].float()
        out.append(F.cross_entropy(sl.reshape(-1, V), targets[:, a:a + chunk].reshape(-1), reduction="none").view(sl.shape[:2]))
    return torch.cat(out, dim=1)


def run_ppl_by_pos(model, corpus: TextCorpus, lengths: Sequence[int], buckets: int, batch_size: int, batches: int,
                   device, seed: int = 0) -> dict:
    out: dict[str, float] = {}
    for L in lengths:
        L = int(L)
        stream = corpus.tokens(max(2, batches * batch_size) * (L + 1))  # room for distinct windows
        rng = np.random.default_rng([seed, L])
        tot = torch.zeros(L, dtype=torch.float64)
        n = 0
        for _ in range(batches):
            starts = rng.integers(0, max(1, len(stream) - L - 1), batch_size)
            w = torch.tensor([stream[s:s + L + 1] for s in starts], dtype=torch.long, device=device)
            losses = _token_losses(model, w[:, :-1], w[:, 1:])
            tot += losses.double().sum(0).cpu()
            n += w.shape[0]
        mean = tot / n
        edges = np.linspace(0, L, min(buckets, L) + 1).round().astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            v = float(mean[a:b].mean())
            out[ppl_pos_metric(L, int(a), int(b), "loss")] = v
            out[ppl_pos_metric(L, int(a), int(b), "ppl")] = math.exp(min(v, 700.0))
        v = float(mean.mean())
        out[metric_name("ppl_by_pos", L, "loss")] = v
        out[metric_name("ppl_by_pos", L, "ppl")] = math.exp(min(v, 700.0))
    return out


_NUMBER = re.compile(r"\d+")


def _boundary(tok, hay: list[int], pos: int, back: int = 48) -> int:
    """The closest position at or before ``pos`` that follows a sentence end (within ``back`` tokens)."""
    for p in range(pos, max(0, pos - back), -1):
        piece = tok.decode([hay[p - 1]])
        if any(c in piece for c in ".!?\n"):
            return p
    return pos


def niah_prompts(corpus: TextCorpus, L: int, depth: float, samples: int, rng: np.random.Generator, needle: str,
                 question: str, digits: int):
    """``samples`` prompts of exactly L tokens with their answers (strings of ``digits`` digits)."""
    tok = corpus.tokenizer
    q_ids = tok.encode("\n" + question)
    prompts, answers = [], []
    for _ in range(samples):
        answer = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        n_ids = tok.encode(" " + needle.format(answer=answer))
        n_hay = L - len(n_ids) - len(q_ids)
        if n_hay < 1:
            raise TaskError(f"niah: length {L} is too short for the needle and question "
                            f"({len(n_ids) + len(q_ids)} tokens)")
        stream = corpus.tokens(n_hay + 4 * L)
        off = int(rng.integers(0, max(1, len(stream) - n_hay)))
        hay = stream[off:off + n_hay]
        pos = _boundary(tok, hay, int(round(depth * n_hay))) if 0 < depth < 1 else int(round(depth * n_hay))
        prompts.append(hay[:pos] + n_ids + hay[pos:] + q_ids)
        answers.append(answer)
    return prompts, answers


def run_niah(model, corpus: TextCorpus, lengths: Sequence[int], depths: Sequence[float], samples: int, batch_size: int,
             device, seed: int = 0, needle: str = OPTIONS["niah"]["needle"].default,
             question: str = OPTIONS["niah"]["question"].default, digits: int = 5,
             max_new_tokens: Optional[int] = None, on_result: Optional[Callable] = None) -> dict:
    out: dict[str, float] = {}
    tok = corpus.tokenizer
    k = max_new_tokens or len(tok.encode(" " + "9" * digits)) + 2
    for L in lengths:
        L = int(L)
        accs = []
        for d in depths:
            rng = np.random.default_rng([seed, L, int(round(d * 1000))])
            prompts, answers = niah_prompts(corpus, L, d, samples, rng, needle, question, digits)
            right = 0
            for a in range(0, len(prompts), batch_size):
                x = torch.tensor(prompts[a:a + batch_size], dtype=torch.long, device=device)
                gen = model.generate(x, max_new_tokens=k, temperature=0.0)[:, L:]
                for row, ans in zip(gen.tolist(), answers[a:a + batch_size]):
                    if tok.eos_id in row:
                        row = row[:row.index(tok.eos_id)]
                    m = _NUMBER.search(tok.decode(row))
                    right += int(m is not None and m.group(0) == ans)
            acc = right / len(prompts)
            accs.append(acc)
            out[niah_metric(L, int(round(100 * d)))] = acc
        out[niah_metric(L)] = float(np.mean(accs))
        if on_result:
            on_result("niah", L, {"acc": out[niah_metric(L)]})
    return out


@torch.no_grad()
def run_text_eval(model, name: str, options: dict, lengths: Sequence[int], batch_size: int, batches: int, device,
                  on_result: Optional[Callable] = None) -> dict:
    """One text eval entry on ``model`` (tokens -> logits, with ``generate``); flat metrics."""
    opts = parse_text_eval(name, options)
    lengths = [int(L) for L in lengths if L] or default_lengths(name, opts.get("train_seq_len"))
    corpus = TextCorpus(name, opts)
    if name == "niah":
        if not lengths:
            raise TaskError("niah: give seq_lens")
        return run_niah(model, corpus, lengths, opts["depths"], opts["samples"], batch_size, device, opts["seed"],
                        opts["needle"], opts["question"], opts["digits"], opts["max_new_tokens"], on_result)
    if name == "ppl_by_pos":
        if not lengths:
            raise TaskError("ppl_by_pos: give seq_lens")
        res = run_ppl_by_pos(model, corpus, lengths, opts["buckets"], batch_size, batches, device, opts["seed"])
        if on_result:
            for L in lengths:
                on_result("ppl_by_pos", int(L), {"loss": res[metric_name("ppl_by_pos", int(L), "loss")]})
        return res
    from hybridlab.jobs.lm_harness import run_lm_eval

    metrics, _ = run_lm_eval(model, corpus.tokenizer, opts["tasks"], opts["include"], limit=opts["limit"],
                             num_fewshot=opts["num_fewshot"], batch_size=batch_size,
                             max_length=opts["max_length"] or opts.get("train_seq_len") or 2048,
                             bootstrap_iters=opts["bootstrap_iters"], device=device)
    return metrics


def is_text_eval(name: Any) -> bool:
    return isinstance(name, str) and name in TEXT_EVALS


__all__ = ["TEXT_EVALS", "TextCorpus", "check_text_eval", "default_lengths", "is_text_eval", "parse_text_eval",
           "run_niah", "run_ppl_by_pos", "run_text_eval"]
