"""lm-evaluation-harness on a hybridlab model: the registered ``hybridlab`` LM and ``run_lm_eval``.

``HybridLMHarness(model, tokenizer, batch_size, max_length)`` answers lm-eval's three request kinds:

* ``loglikelihood`` — context and continuation tokenized together (trailing spaces of the context go
  to the continuation, as lm-eval's HF model does), the last ``max_length`` tokens kept, the
  continuation's log-probability summed and whether greedy decoding would produce it; batched, longest
  first, right-padded (padding lies after every scored position of a causal model).
* ``loglikelihood_rolling`` — the whole text in disjoint windows of ``max_length`` (lm-eval's rolling
  windows, EOS as the first context), summed.
* ``generate_until`` — ``HybridLM.generate`` (chunked prefill, then the cached decode: a CUDA graph on
  GPU), batched with left padding, greedy unless ``do_sample``; cut at EOS and at the ``until`` strings.

With lm-eval installed, ``lm_eval --model hybridlab --model_args pretrained=MODEL_DIR`` works on a model
folder that ``hybridlab.arch.load_pretrained`` reads (tokenizer.json in the folder, or ``tokenizer=``).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from hybridlab.jobs.record import lm_eval_metric
from hybridlab.jobs.tasks.base import TaskError

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - lm-eval is in the `train` extra
    _LMBase, register_model = object, None


def _need_lm_eval():
    if register_model is None:
        raise TaskError("lm_eval: needs lm-evaluation-harness (pip install 'hybridlab[train]' or lm-eval)")


class HybridLMHarness(_LMBase):
    def __init__(self, model=None, tokenizer=None, batch_size: int = 16, max_length: int = 2048, device=None,
                 pretrained: Optional[str] = None, **_):
        _need_lm_eval()
        super().__init__()
        if model is None:
            model, tokenizer = _from_folder(pretrained, tokenizer)
        if isinstance(tokenizer, str):
            from hybridlab.jobs.textdata import load_text_tokenizer

            tokenizer = load_text_tokenizer(tokenizer, task="lm_eval")
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        p = next(model.parameters())
        self._device = torch.device(device) if device is not None else p.device

    # -- helpers
    def _amp(self):
        dev = self._device
        if dev.type == "cuda" and next(self.model.parameters()).dtype == torch.float32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text) if text else []

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self._encode(continuation)
        if not ctx:
            ctx = [self.tok.eos_id]
        return ctx, cont

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists -> (sum log p(continuation), greedy?) each."""
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            full = (ctx + cont)[-(self.max_length + 1):]
            inp = full[:-1]
            n = min(len(cont), len(inp))
            items.append((i, inp, cont[len(cont) - n:], n))
        items.sort(key=lambda t: -len(t[1]))
        out: list[Any] = [None] * len(items)
        self.model.eval()
        for a in range(0, len(items), self.batch_size):
            chunk = items[a:a + self.batch_size]
            width = len(chunk[0][1])
            x = torch.full((len(chunk), width), self.tok.eos_id, dtype=torch.long)
            for r, (_, inp, _, _) in enumerate(chunk):
                x[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            with self._amp():
                logits = self.model(x.to(self._device))
            for r, (i, inp, cont, n) in enumerate(chunk):
                if n == 0:
                    out[i] = (0.0, True)
                    continue
                lp = F.log_softmax(logits[r, len(inp) - n:len(inp)].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                out[i] = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
        return out

    # -- the LM interface
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        res = self._score([self._pair(*r.args) for r in requests])
        for r, v in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", r.args, v)
        return res

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            toks = self._encode(r.args[0])
            for w in get_rolling_token_windows(toks, self.tok.eos_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = self._score(windows)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for r, v in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, v)
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out: list[Any] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        self.model.eval()
        for key, idx in groups.items():
            kw = dict(requests[idx[0]].args[1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            room = max(1, self.max_length - max_new)
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for a in range(0, len(idx), self.batch_size):
                chunk = idx[a:a + self.batch_size]
                prompts = [(self._encode(requests[i].args[0]) or [self.tok.eos_id])[-room:] for i in chunk]
                # no autocast here: the decode may be captured as a CUDA graph, which autocast's weight cache breaks
                gen = self.model.generate(prompts, max_new_tokens=max_new, temperature=temperature, pad_id=self.tok.eos_id)
                width = max(len(p) for p in prompts)
                for i, row in zip(chunk, gen[:, width:].tolist()):
                    if self.tok.eos_id in row:
                        row = row[:row.index(self.tok.eos_id)]
                    text = self.tok.decode(row)
                    for u in until:
                        if u and u in text:
                            text = text[:text.index(u)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


if register_model is not None:
    register_model("hybridlab")(HybridLMHarness)


def _from_folder(pretrained: Optional[str], tokenizer: Any):
    """``--model_args pretrained=DIR``: a model folder read by ``hybridlab.arch.load_pretrained``."""
    import hybridlab.arch as arch

    if not pretrained:
        raise TaskError("lm_eval: the hybridlab model needs model= or pretrained=MODEL_DIR")
    load = getattr(arch, "load_pretrained", None)
    if load is None:
        raise TaskError("lm_eval: this hybridlab has no hybridlab.arch.load_pretrained to read model folders")
    loaded = load(pretrained)
    model = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "model", loaded)
    if tokenizer is None:
        from pathlib import Path

        tokenizer = str(Path(pretrained) / "tokenizer.json") if (Path(pretrained) / "tokenizer.json").is_file() else pretrained
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- running tasks

_MANAGERS: dict = {}


def _task_manager(include: Sequence[str], defaults: bool):
    key = (tuple(include), defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_path=list(include) or None, include_defaults=defaults)
    return _MANAGERS[key]


def find_tasks(tasks: Sequence[str], include: Sequence[str] = ()):
    """The TaskManager that knows every name in ``tasks`` (the built-in index is read only when needed)."""
    _need_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if include:
        tm = _task_manager(include, False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    tm = _task_manager(include, True)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        from hybridlab.arch.specio import did_you_mean

        raise TaskError(f"lm_eval: bad value for 'tasks': unknown lm-eval task {missing[0]!r}"
                        f"{did_you_mean(missing[0], list(tm.all_tasks))}"
                        + ("" if include else " (custom task YAMLs: give 'include')"), "tasks")
    return tm


def results_to_metrics(results: dict) -> dict[str, float]:
    """lm-eval's ``results`` -> ``{eval/lm_eval/<task>/<metric>: value}`` (numbers only)."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, vals in (results.get(section) or {}).items():
            for key, v in vals.items():
                if key in ("alias", "sample_len", "samples") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                out[lm_eval_metric(task, metric, filt or "none")] = float(v)
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str], include: Sequence[str] = (), limit: Optional[float] = None,
                num_fewshot: Optional[int] = None, batch_size: int = 16, max_length: int = 2048,
                bootstrap_iters: int = 0, device=None) -> tuple[dict[str, float], dict]:
    """Run lm-eval ``tasks`` on ``model``; returns (flat metrics, lm-eval's results without samples)."""
    import lm_eval

    tm = find_tasks(tasks, include)
    lm = HybridLMHarness(model, tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    if limit is not None and limit >= 1:
        limit = int(limit)
    was_training = getattr(model, "training", False)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=False, bootstrap_iters=bootstrap_iters,
                                      batch_size=batch_size)
    finally:
        if was_training:
            model.train()
    res = {k: v for k, v in (res or {}).items() if k in ("results", "groups", "configs", "versions", "n-shot", "higher_is_better")}
    return results_to_metrics(res), res
