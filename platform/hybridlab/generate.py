"""`hybridlab generate`: generation from a checkpoint — text, token ids, or the run's own task.

Prompts (:class:`Prompts`) come as one of:

* text (``-p``): bytes as tokens (UTF-8, ids 0..255), for models with a vocabulary of >= 256,
  unless the model folder holds a ``tokenizer.json`` (an imported official model: its own
  tokenizer, through ``tokenizers``);
* token ids (``--tokens 1,2,3``), for any model (the synthetic tasks' models have small
  vocabularies: the quickstart's has 64); the output is token ids;
* ``--task-prompts N``: N sequences of the run's own training task (its eval batches), each cut
  just before its first scored answer; the output shows the tokens the model generated and the
  task's expected continuation (the scored tokens right after the prompt).

A checkpoint is one of:

* a model folder (``model.yaml`` + ``model.safetensors``, e.g. ``hybridlab import mamba-ssm``);
* a checkpoint (or run) folder of the training platform: loaded like ``hybridlab eval``
  does it (``evaluate.resolve_target`` / ``evaluate.load_model``: the spec from the
  run's ``job.yaml``, ZeRO-3 shards consolidated);
* a ``.pt``/``.pth`` file holding a state dict (or ``{"model"|"state_dict"|"module": ...,
  "spec": {...}}``);
* ``zoo:NAME`` or a spec ``.yaml`` — random weights (seeded), for smoke tests.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError


@dataclass
class Prompts:
    text: list = field(default_factory=list)  # strings (byte tokenizer)
    tokens: list = field(default_factory=list)  # "1,2,3" strings
    from_task: int = 0  # N prompts from the run's own task

    def kind(self) -> str:
        given = [k for k, v in (("text", self.text), ("tokens", self.tokens), ("task", self.from_task)) if v]
        if len(given) != 1:
            raise UserError("give prompts one way: --prompt TEXT, --tokens 1,2,3 or --task-prompts N"
                            + (f" (got {' and '.join(given)})" if given else ""))
        return given[0]


def _spec_from(ref, folder: Path | None = None):
    from hybridlab.arch import load_model_spec

    if ref:
        return load_model_spec(ref)
    if folder is not None:
        for name in ("model.yaml", "spec.yaml"):
            for d in (folder, folder.parent):
                if (d / name).exists():
                    return load_model_spec(str(d / name))
    raise UserError("the checkpoint does not say which model it is: pass --model zoo:NAME or a spec file")


def _state_dict_from_obj(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def _clean(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model(ref: str, model_ref: str | None = None, seed: int = 0):
    """(model on the CPU in fp32, a short description of where the weights came from)."""
    model, origin, _ = load_model_and_job(ref, model_ref, seed)
    return model, origin


def load_model_and_job(ref: str, model_ref: str | None = None, seed: int = 0):
    """:func:`load_model`, and the run's job (a dict) when ``ref`` is a run's checkpoint, else None."""
    import torch

    from hybridlab.arch import HybridLM

    p = Path(ref)
    if ref.startswith("zoo:") or p.suffix in (".yaml", ".yml"):
        spec = _spec_from(model_ref or ref)
        torch.manual_seed(seed)
        return HybridLM(spec), f"{ref} (random weights, seed {seed})", None
    if not p.exists():
        raise UserError(f"no checkpoint at {ref}")
    sd, spec = None, None
    if p.is_file():
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.PickleError, ImportError, AttributeError) as e:
            # torch.load's ways of saying "not a checkpoint" (a zip it cannot read, a pickle of something else)
            raise UserError(f"{ref}: not a PyTorch checkpoint ({e.__class__.__name__}: "
                            f"{' '.join(str(e).split())[:160]})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{ref}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
        if isinstance(obj, dict) and "spec" in obj and not model_ref:
            from hybridlab.arch import load_model_spec

            spec = load_model_spec(obj["spec"])
        sd = _state_dict_from_obj(obj)
        if not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise UserError(f"{ref}: not a state dict (expected parameter names mapped to tensors)")
        spec = spec or _spec_from(model_ref, p.parent)
    else:  # a training run's checkpoint or run folder: the spec comes from the run's job.yaml
        from .evaluate import load_model as load_run_model
        from .evaluate import resolve_target

        target = resolve_target(ref)
        model, spec = load_run_model(target)
        return model.float(), f"{target.checkpoint} ({spec.name})", target.job
    model = HybridLM(spec)
    missing, unexpected = model.load_state_dict(_clean(sd), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not spec.tie_embeddings]
    if missing or unexpected:
        raise UserError(f"checkpoint {ref} does not fit model {spec.name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model, f"{ref} ({spec.name})", None


def _tokenizer(checkpoint: str):
    """The model folder's own tokenizer.json when it has one, else bytes."""
    from hybridlab.jobs.tasks import ByteTokenizer

    p = Path(checkpoint).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        from hybridlab.jobs.tasks.lm import BPETokenizer

        try:
            return BPETokenizer.load(p / "tokenizer.json")
        except ImportError:
            raise UserError(f"{p / 'tokenizer.json'}: reading it needs the 'tokenizers' package (pip install tokenizers)") from None
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            raise UserError(f"{p / 'tokenizer.json'}: not a tokenizers file ({' '.join(str(e).split())[:120]})") from None
    return ByteTokenizer()


def _check_device(device: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (CUDA only where there is one) -> the torch device string."""
    import torch

    dev = (device or "").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", dev)
    if not m:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA here")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _token_rows(items: list, vocab: int) -> list[list[int]]:
    rows = []
    for item in items:
        try:
            row = [int(t) for t in re.split(r"[,\s]+", str(item).strip()) if t]
        except ValueError:
            raise UserError(f"--tokens {item!r}: expected comma-separated token ids, e.g. --tokens 1,2,3") from None
        if not row:
            raise UserError("--tokens: give at least one token id")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise UserError(f"--tokens {item!r}: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        rows.append(row)
    return rows


def _task_rows(job: Optional[dict], n: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, expected answers): ``n`` sequences of the run's training task, each cut before its first answer."""
    if job is None:
        raise UserError("--task-prompts needs a training run's checkpoint (its job names the task)")
    from hybridlab.jobs.data import build_task
    from hybridlab.jobs.evals import eval_seed
    from hybridlab.jobs.tasks import IGNORE, TaskError

    data = dict(job.get("data") or {})
    name = data.pop("task", None)
    seq_len = data.pop("seq_len", None)
    try:
        task = build_task(name, data, seq_len)
        b = task.batch(n, eval_seed(name, int(task.seq_len), 0), seq_len=int(task.seq_len))
    except TaskError as e:
        raise UserError(str(e)) from None
    prompts, answers = [], []
    for inp, tgt in zip(b.inputs.tolist(), b.targets.tolist()):
        first = next((i for i, t in enumerate(tgt) if t != IGNORE), len(tgt) - 1)
        prompts.append(inp[: first + 1])
        run = []  # the expected continuation: the scored positions right after the prompt, up to the first gap
        for t in tgt[first:]:
            if t == IGNORE:
                break
            run.append(t)
        answers.append(run)
    return prompts, answers


def run_generate(checkpoint: str, prompts: Prompts, model_ref: str | None, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int, device: str, dtype: str, cuda_graph: bool,
                 as_json: bool) -> None:
    import torch

    kind = prompts.kind()
    if top_p is not None and top_p <= 0:  # typer checks [0, 1]; the interval is open at 0
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    device = _check_device(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in dtypes:
        raise UserError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    model, origin, job = load_model_and_job(checkpoint, model_ref, seed)
    vocab = model.spec.vocab_size
    answers = None
    if kind == "text":
        tok = _tokenizer(checkpoint)
        if tok.kind == "byte" and vocab < 256:
            raise UserError(f"model {model.spec.name} has {vocab} tokens; the byte tokenizer needs 256: give token ids "
                            f"(--tokens 1,2,3) or prompts from its task (--task-prompts 4)")
        rows = [tok.encode(p) or [10] for p in prompts.text]
    elif kind == "tokens":
        tok, rows = None, _token_rows(prompts.tokens, vocab)
    else:
        tok = None
        rows, answers = _task_rows(job, prompts.from_task)
    model = model.to(device=device, dtype=dtypes[dtype]).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                         cuda_graph=cuda_graph and device.startswith("cuda"))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    width = max(len(r) for r in rows)
    results = []
    for i, r in enumerate(rows):
        new = out[i, width:].tolist()
        res = {"prompt_tokens": r, "tokens": new}
        if tok is not None:
            res.update(prompt=prompts.text[i], completion=tok.decode(new))
        if answers is not None:
            res["expected"] = answers[i]
        results.append(res)
    if as_json:
        print(json.dumps({"model": origin, "device": device, "dtype": dtype, "seconds": secs, "results": results}))
        return
    for res in results:
        if tok is not None:
            print(res["prompt"] + res["completion"])
        else:
            line = f"{' '.join(map(str, res['prompt_tokens']))} -> {' '.join(map(str, res['tokens']))}"
            if "expected" in res:
                line += f"   (expected: {' '.join(map(str, res['expected']))})"
            print(line)
    n = len(rows) * max_new_tokens
    print(f"# {origin} on {device} {dtype}: {n} tokens in {secs:.2f} s ({n / max(secs, 1e-9):.0f} tok/s, prefill included)",
          file=sys.stderr)
