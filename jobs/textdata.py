"""Text from where users keep it: HF ``datasets`` sources, tokenizers, and packed, resumable batches.

A job's language-model data::

    data:
      task: lm
      dataset: {format: jsonl, path: corpus/*.jsonl, text_field: text}   # hf | json | jsonl | parquet | text
      tokenizer: tokenizer.json        # a tokenizers file, a local HF tokenizer folder, an HF name, or byte
      seq_len: 2048
      pack: true

* :class:`DatasetSpec` — the ``dataset`` mapping. File formats read ``path`` (a file, a
  folder, a glob, or a list of them; sorted, so the order is fixed) through the ``datasets``
  builders (``json``, ``parquet``, ``text``: one document per file by default, ``sample_by:
  line | paragraph`` otherwise); ``hf`` is ``datasets.load_dataset(path, name, split=split)``
  (a Hub name or a local dataset folder; a ``save_to_disk`` folder works too). Always streamed.
* :func:`load_text_tokenizer` — ``tokenizers`` for a ``tokenizer.json``, ``transformers``
  ``AutoTokenizer`` for a folder or a name; EOS from the tokenizer (or ``eos_token``).
* :class:`PackedStream` — one rank's batches: the rank's share of the documents
  (``datasets.distributed.split_dataset_by_node``), each document's tokens followed by EOS,
  concatenated and cut into rows of ``seq_len + 1`` tokens (inputs = ``row[:-1]``, targets =
  ``row[1:]``). Every row carries ``seq_idx`` (the document of each input position, from 0);
  the target that would predict a document's first token from the previous document is
  masked (-100), so the loss never crosses a boundary. ``pack: false`` gives one document per
  row (truncated, EOS-padded, padding not scored). ``state_dict()`` is the exact position (the
  source's own ``state_dict`` plus the tokens read but not yet emitted): a run resumed from it
  sees exactly the batches it would have seen, without re-reading what came before.

Errors are :class:`~hybridlab.jobs.tasks.TaskError` lines naming the option
(``dataset.path``, ``dataset.text_field``, ``tokenizer``, ...), which the job loader turns into
``job.yaml:LINE data.dataset.path: ...``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np
import torch

from hybridlab.jobs.tasks.base import IGNORE, Batch, TaskError, _one_line

FORMATS = ("hf", "json", "jsonl", "parquet", "text")
_BUILDER = {"json": "json", "jsonl": "json", "parquet": "parquet", "text": "text"}
_SUFFIXES = {"json": (".json", ".json.gz"), "jsonl": (".jsonl", ".jsonl.gz", ".json"), "parquet": (".parquet",),
             "text": (".txt", ".md", ".rst", ".text")}
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]")
DATASET_KEYS = ("format", "path", "name", "split", "text_field", "sample_by")


def _err(task: str, key: str, value: Any, why: str) -> TaskError:
    return TaskError(_one_line(f"{task}: bad value for '{key}': {value!r} ({why})"), key)


# --------------------------------------------------------------------------- the dataset mapping


@dataclass(frozen=True)
class DatasetSpec:
    format: str
    path: Any  # str or list of str
    name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    sample_by: str = "document"  # format text: document | line | paragraph

    @classmethod
    def from_mapping(cls, d: Any, task: str = "lm") -> "DatasetSpec":
        if not isinstance(d, dict):
            raise _err(task, "dataset", d, "expected a mapping {format, path, name, split, text_field}")
        for k in d:
            if k not in DATASET_KEYS:
                from hybridlab.arch.specio import did_you_mean

                raise TaskError(f"{task}: unknown option 'dataset.{k}'{did_you_mean(k, DATASET_KEYS)}; "
                                f"options: {', '.join(DATASET_KEYS)}", f"dataset.{k}")
        fmt = d.get("format")
        if fmt not in FORMATS:
            raise _err(task, "dataset.format", fmt, f"choose one of: {', '.join(FORMATS)}")
        path = d.get("path")
        ok = isinstance(path, str) and path or (isinstance(path, list) and path and all(isinstance(p, str) and p for p in path))
        if not ok:
            raise _err(task, "dataset.path", path, "a file, folder, glob or HF dataset name, or a list of them")
        for key in ("name", "split", "text_field"):
            v = d.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                raise _err(task, f"dataset.{key}", v, "must be a non-empty string")
        sample_by = d.get("sample_by", "document")
        if sample_by not in ("document", "line", "paragraph"):
            raise _err(task, "dataset.sample_by", sample_by, "choose document, line or paragraph")
        return cls(fmt, path, d.get("name"), d.get("split") or "train", d.get("text_field") or "text", sample_by)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def resolve_files(spec: DatasetSpec, task: str = "lm") -> List[str]:
    """The files of a file-format dataset, sorted (folders: every file with the format's suffixes)."""
    out: List[str] = []
    for p in ([spec.path] if isinstance(spec.path, str) else spec.path):
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and f.name.endswith(_SUFFIXES[spec.format]))
            if not found:
                raise _err(task, "dataset.path", p, f"folder has no {'/'.join(_SUFFIXES[spec.format])} files")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        elif glob.has_magic(p):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise _err(task, "dataset.path", p, "no file matches this pattern")
            out += found
        else:
            raise _err(task, "dataset.path", p, "no such file or folder")
    return out


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()) and \
        ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _import_datasets(task: str):
    try:
        import datasets
    except ImportError:
        raise TaskError(f"{task}: 'dataset' needs the HF datasets package (pip install 'hybridlab[train]')") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def open_dataset(spec: DatasetSpec, task: str = "lm", rank: int = 0, world: int = 1):
    """The rank's share of the documents as a streaming ``datasets.IterableDataset`` of ``{text_field: str}``."""
    datasets = _import_datasets(task)
    try:
        if spec.format == "hf":
            p = Path(os.path.expanduser(spec.path)) if isinstance(spec.path, str) else None
            if p is not None and _is_saved_dataset(p):
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    if spec.split not in ds:
                        raise _err(task, "dataset.split", spec.split, f"splits here: {', '.join(ds)}")
                    ds = ds[spec.split]
                ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))
            else:
                ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True)
        else:
            kwargs = {"sample_by": spec.sample_by} if spec.format == "text" else {}
            ds = datasets.load_dataset(_BUILDER[spec.format], data_files={"train": resolve_files(spec, task)},
                                       split="train", streaming=True, **kwargs)
    except TaskError:
        raise
    except Exception as e:  # a source datasets cannot read: one line, naming what was given
        key = "dataset.split" if "split" in str(e).lower() and "Unknown split" in str(e) else "dataset.path"
        raise _err(task, key, spec.path if key == "dataset.path" else spec.split,
                   f"datasets cannot load it: {type(e).__name__}: {str(e)[:240]}") from None
    if world > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    return ds


def peek(spec: DatasetSpec, task: str = "lm") -> str:
    """The first document's text (validates the source and ``text_field``)."""
    ds = open_dataset(spec, task)
    try:
        first = next(iter(ds), None)
    except Exception as e:
        raise _err(task, "dataset.path", spec.path, f"cannot read it: {type(e).__name__}: {str(e)[:240]}") from None
    if first is None:
        raise _err(task, "dataset.path", spec.path, "holds no documents")
    if spec.text_field not in first:
        raise _err(task, "dataset.text_field", spec.text_field, f"the records have: {', '.join(map(str, first))}")
    if not isinstance(first[spec.text_field], str):
        raise _err(task, "dataset.text_field", spec.text_field,
                   f"holds {type(first[spec.text_field]).__name__}, not text")
    return first[spec.text_field]


# --------------------------------------------------------------------------- tokenizers


class TextTokenizer:
    """What the data and the evals need of a tokenizer: ids in, text out, the vocabulary, EOS."""

    def __init__(self, name: str, kind: str, backend: Any, vocab_size: int, eos_id: int):
        self.name, self.kind, self.backend, self.vocab_size, self.eos_id = name, kind, backend, int(vocab_size), int(eos_id)

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self.kind == "tokenizers":
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if self.kind == "hf":
            return list(self.backend(list(texts), add_special_tokens=False)["input_ids"])
        return [self.backend.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self.backend.decode(ids, skip_special_tokens=True)
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.backend.decode(ids)

    def describe(self) -> dict:
        return {"tokenizer": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _eos(task: str, ref: str, lookup, eos_token: Optional[str], default: Optional[int] = None) -> int:
    if eos_token is not None:
        i = lookup(eos_token)
        if i is None:
            raise _err(task, "eos_token", eos_token, f"not a token of the tokenizer {ref}")
        return int(i)
    if default is not None:
        return int(default)
    for c in EOS_CANDIDATES:
        i = lookup(c)
        if i is not None:
            return int(i)
    raise _err(task, "tokenizer", ref, f"has no EOS token (looked for {', '.join(EOS_CANDIDATES)}); set data.eos_token")


def load_text_tokenizer(ref: str, eos_token: Optional[str] = None, task: str = "lm") -> TextTokenizer:
    """``byte``, a ``tokenizer.json`` file, a local HF tokenizer folder, or an HF Hub name."""
    if not isinstance(ref, str) or not ref:
        raise _err(task, "tokenizer", ref, "a tokenizer.json file, a tokenizer folder, an HF name, or byte")
    if ref == "byte":
        from hybridlab.jobs.tasks.lm import ByteTokenizer

        bt = ByteTokenizer()
        return TextTokenizer("byte", "byte", bt, bt.vocab_size, bt.eos_id)
    p = Path(os.path.expanduser(ref))
    if p.is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise _err(task, "tokenizer", ref, f"does not load: {type(e).__name__}: {str(e)[:200]}") from None
        eos = _eos(task, ref, tok.token_to_id, eos_token)
        return TextTokenizer(str(p), "tokenizers", tok, max(tok.get_vocab_size(with_added_tokens=True), eos + 1), eos)
    if p.exists() and not p.is_dir():
        raise _err(task, "tokenizer", ref, "not a file or folder")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        if p.is_dir() and (p / "tokenizer.json").is_file():
            return load_text_tokenizer(str(p / "tokenizer.json"), eos_token, task)
        raise _err(task, "tokenizer", ref, "a tokenizer folder or HF name needs transformers (pip install transformers)") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if p.is_dir() else ref, local_files_only=p.is_dir())
    except Exception as e:
        if p.is_dir() and (p / "tokenizer.json").is_file():
            return load_text_tokenizer(str(p / "tokenizer.json"), eos_token, task)
        where = "folder" if p.is_dir() else "HF name (no such local path; the Hub was asked)"
        raise _err(task, "tokenizer", ref, f"{where} does not load: {type(e).__name__}: {str(e)[:200]}") from None

    def lookup(t):
        i = tok.convert_tokens_to_ids(t)
        return None if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id and t != tok.unk_token) else i

    eos = _eos(task, ref, lookup, eos_token, tok.eos_token_id)
    return TextTokenizer(str(p) if p.is_dir() else ref, "hf", tok, max(len(tok), eos + 1), eos)


def as_text_tokenizer(tok: Any, name: str = "") -> TextTokenizer:
    """Wrap a token-shards tokenizer (``tasks.lm.ByteTokenizer`` / ``BPETokenizer``) or pass a TextTokenizer through."""
    if isinstance(tok, TextTokenizer):
        return tok
    if getattr(tok, "kind", "") == "byte":
        return TextTokenizer("byte", "byte", tok, tok.vocab_size, tok.eos_id)
    return TextTokenizer(name or "bpe", "tokenizers", tok.tok, tok.vocab_size, tok.eos_id)


# --------------------------------------------------------------------------- paths in a job


def resolve_data_paths(options: dict, base_dir: Optional[str]) -> dict:
    """Make the local paths of a data/eval mapping absolute (relative to the working directory, else
    to the job file's folder), so workers anywhere read the same files. Hub names stay as they are."""
    out = dict(options)

    def fix(p):
        if not isinstance(p, str) or not p or p == "byte" or "://" in p:
            return p
        q = os.path.expanduser(p)
        for base in (None, base_dir):
            cand = q if base is None or os.path.isabs(q) else os.path.join(base, q)
            if os.path.exists(cand) or (glob.has_magic(cand) and glob.glob(cand, recursive=True)):
                return os.path.abspath(cand)
        return p

    ds = out.get("dataset")
    if isinstance(ds, dict) and "path" in ds:
        ds = dict(ds)
        ds["path"] = [fix(x) for x in ds["path"]] if isinstance(ds["path"], list) else fix(ds["path"])
        out["dataset"] = ds
    for key in ("tokenizer", "path", "include"):  # include: lm-eval task folders
        if key in out:
            out[key] = [fix(x) for x in out[key]] if isinstance(out[key], list) else fix(out[key])
    return out


# --------------------------------------------------------------------------- packing


@dataclass
class _Buffer:
    tokens: List[int] = field(default_factory=list)
    starts: List[int] = field(default_factory=list)  # indices into tokens where a document begins


class PackedStream:
    """One rank's rows of packed (or padded) documents, in a fixed order, resumable by state."""

    READ = 32  # documents tokenized per read

    def __init__(self, spec: DatasetSpec, tokenizer: TextTokenizer, seq_len: int, pack: bool = True,
                 rank: int = 0, world: int = 1, task: str = "lm"):
        self.spec, self.tok, self.seq_len, self.pack = spec, tokenizer, int(seq_len), bool(pack)
        self.rank, self.world, self.task = rank, world, task
        self.rows = 0  # rows emitted so far
        self.epoch = 0
        self._buf = _Buffer()
        self._ds = None
        self._it: Optional[Iterator] = None
        self._docs_this_epoch = 0

    # -- the source
    def _source(self):
        if self._ds is None:
            self._ds = open_dataset(self.spec, self.task, self.rank, self.world).select_columns([self.spec.text_field])
        return self._ds

    def _read(self) -> None:
        """Tokenize the next few documents into the buffer (a new epoch when the source is exhausted)."""
        texts = []
        while len(texts) < self.READ:
            if self._it is None:
                ds = self._source()
                ds.set_epoch(self.epoch)
                self._it = iter(ds)
            try:
                rec = next(self._it)
            except StopIteration:
                if self._docs_this_epoch == 0 and not texts:
                    raise TaskError(f"{self.task}: rank {self.rank} of {self.world} got no documents from "
                                    f"{self.spec.path!r} (fewer documents than workers?)") from None
                self.epoch += 1
                self._docs_this_epoch = 0
                self._it = None
                if texts:
                    break
                continue
            text = rec[self.spec.text_field]
            if not isinstance(text, str):
                raise _err(self.task, "dataset.text_field", self.spec.text_field, f"a record holds {type(text).__name__}")
            texts.append(text)
            self._docs_this_epoch += 1
        for ids in self.tok.encode_batch(texts):
            self._buf.starts.append(len(self._buf.tokens))
            self._buf.tokens.extend(ids)
            self._buf.tokens.append(self.tok.eos_id)

    # -- rows
    def _row(self):
        L = self.seq_len
        if not self.pack:
            while len(self._buf.starts) < 2:
                self._read()
            a, b = self._buf.starts[0], self._buf.starts[1]
            doc = self._buf.tokens[a:b][: L + 1]
            del self._buf.tokens[:b]
            self._buf.starts = [s - b for s in self._buf.starts[1:]]
            n = len(doc)
            row = np.full(L + 1, self.tok.eos_id, dtype=np.int64)
            row[:n] = doc
            scored = np.zeros(L + 1, dtype=bool)
            scored[1:n] = True
            return row, scored, None
        while len(self._buf.tokens) < L + 1:
            self._read()
        row = np.asarray(self._buf.tokens[: L + 1], dtype=np.int64)
        ids = np.zeros(L + 1, dtype=np.int32)
        for s in self._buf.starts:
            if 0 < s <= L:
                ids[s:] += 1
            elif s > L:
                break
        del self._buf.tokens[: L + 1]
        self._buf.starts = [s - (L + 1) for s in self._buf.starts if s > L]
        scored = np.ones(L + 1, dtype=bool)
        scored[1:] = ids[1:] == ids[:-1]  # never predict a document's first token from the one before
        scored[0] = False
        return row, scored, ids

    def next_batch(self, batch_size: int) -> Batch:
        rows, scored, ids = zip(*(self._row() for _ in range(batch_size)))
        self.rows += batch_size
        seq = np.stack(rows)
        sc = np.stack(scored)
        inputs = torch.from_numpy(np.ascontiguousarray(seq[:, :-1]))
        targets = torch.from_numpy(np.where(sc[:, 1:], seq[:, 1:], IGNORE).astype(np.int64))
        seq_idx = torch.from_numpy(np.stack(ids)[:, :-1].copy()) if self.pack else None
        return Batch(inputs, targets, {"task": self.task, "seq_len": self.seq_len}, seq_idx=seq_idx)

    # -- position
    def state_dict(self) -> dict:
        return {"version": 1, "rows": self.rows, "epoch": self.epoch, "rank": self.rank, "world": self.world,
                "docs_this_epoch": self._docs_this_epoch, "tokens": list(self._buf.tokens),
                "starts": list(self._buf.starts),
                "source": self._ds.state_dict() if self._ds is not None and self._it is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rank") != self.rank or state.get("world") != self.world:
            raise ValueError(f"data state of rank {state.get('rank')}/{state.get('world')} given to rank {self.rank}/{self.world}")
        self.rows, self.epoch = int(state["rows"]), int(state["epoch"])
        self._docs_this_epoch = int(state.get("docs_this_epoch", 0))
        self._buf = _Buffer(list(state["tokens"]), list(state["starts"]))
        self._ds, self._it = None, None
        if state.get("source") is not None:
            ds = self._source()
            ds.load_state_dict(state["source"])
            ds.set_epoch(self.epoch)
            self._it = iter(ds)

    def reset(self) -> None:
        self.rows, self.epoch, self._docs_this_epoch = 0, 0, 0
        self._buf, self._ds, self._it = _Buffer(), None, None


def stream_documents(spec: DatasetSpec, task: str = "lm") -> Iterator[str]:
    """Every document's text once, in order (one process)."""
    for rec in open_dataset(spec, task).select_columns([spec.text_field]):
        yield rec[spec.text_field]
