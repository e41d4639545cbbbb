"""Language modelling on memory-mapped token shards.

On-disk format (a folder)::

    index.json           {"format": "hybridlab-token-shards", "version": 1,
                          "dtype": "uint16" | "uint32", "vocab_size": V,
                          "eos_id": E, "tokenizer": {"kind": "byte"} |
                                                    {"kind": "bpe", "file": "tokenizer.json"},
                          "shards": [{"file": "shard_00000.bin", "tokens": n}, ...],
                          "splits": {"train": [[shard, start, end], ...], "val": [...]},
                          "total_tokens": T, "sources": [...]}
    shard_00000.bin      raw little-endian tokens, numpy memmap-able
    tokenizer.json       (BPE only) a `tokenizers` tokenizer

Every input file is one document; documents are concatenated with ``eos_id``
after each. The last ``val_fraction`` of the token stream is the ``val`` split,
the rest ``train``. The byte tokenizer maps bytes to ids 0..255 and EOS to 256
(vocab 257); BPE is a byte-level BPE trained locally on the given files
(nothing is downloaded) with ``<|endoftext|>`` as EOS.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from .base import Opt, Task, TaskError, _err

FORMAT = "hybridlab-token-shards"
INDEX = "index.json"
EOS_TEXT = "<|endoftext|>"
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS_TEXT)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, files: Sequence[str], vocab_size: int) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as e:  # pragma: no cover
            raise _err("prepare_shards: tokenizer='bpe' needs the 'tokenizers' package (pip install tokenizers)") from e
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train([str(f) for f in files], trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: PathLike) -> None:
        self.tok.save(str(path))

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(shards_dir: PathLike):
    """The tokenizer a shard folder was prepared with (``encode``/``decode``)."""
    index = _read_index(Path(shards_dir))
    meta = index["tokenizer"]
    kind = meta["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("tokenizers", "hf"):  # a user's tokenizer, saved beside the shards by prepare_shards_from_dataset
        from hybridlab.jobs.textdata import load_text_tokenizer

        tok = load_text_tokenizer(str(Path(shards_dir) / meta.get("file", meta.get("dir", ""))), task="token shards")
        tok.eos_id = int(meta.get("eos_id", tok.eos_id))
        return tok
    return BPETokenizer.load(Path(shards_dir) / meta["file"])


# --------------------------------------------------------------------------- prepare


def _text_chunks(path: Path, chunk_chars: int = 1 << 20):
    """A file's text in pieces of about ``chunk_chars`` ending at line breaks."""
    buf: List[str] = []
    size = 0
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= chunk_chars:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def _check_shard_args(shard_tokens, val_fraction) -> None:
    """The shard size and validation split of both prepare_shards paths (text files, datasets)."""
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise _err(f"prepare_shards: bad value for 'shard_tokens': {shard_tokens!r} (must be a positive integer)")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise _err(f"prepare_shards: bad value for 'val_fraction': {val_fraction!r} (must be in [0, 1))")


def prepare_shards(text_files: Sequence[PathLike], out_dir: PathLike, tokenizer: str = "byte",
                   vocab_size: Optional[int] = None, shard_tokens: int = 1 << 26,
                   val_fraction: float = 0.01) -> "TokenShards":
    """Tokenize ``text_files`` (UTF-8, one document each) into memory-mapped shards.

    ``tokenizer``: ``byte`` (default, vocab 257) or ``bpe`` (byte-level BPE trained
    here on the same files; ``vocab_size`` required, >= 260). Returns the
    :class:`TokenShards` reader of ``out_dir``."""
    files = [Path(f) for f in (text_files if not isinstance(text_files, (str, os.PathLike)) else [text_files])]
    if not files:
        raise _err("prepare_shards: no text files given")
    for f in files:
        if not f.is_file():
            raise _err(f"prepare_shards: text file not found: {f}")
    if tokenizer not in ("byte", "bpe"):
        raise _err(f"prepare_shards: bad value for 'tokenizer': {tokenizer!r} (choose byte or bpe)")
    _check_shard_args(shard_tokens, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer == "byte":
        if vocab_size not in (None, 257):
            raise _err(f"prepare_shards: bad value for 'vocab_size': {vocab_size!r} (the byte tokenizer has 257)")
        tok = ByteTokenizer()
        tok_meta: Dict[str, str] = {"kind": "byte"}
    else:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 260:
            raise _err(f"prepare_shards: bad value for 'vocab_size': {vocab_size!r} (bpe needs an integer >= 260)")
        tok = BPETokenizer.train([str(f) for f in files], vocab_size)
        tok.save(out / "tokenizer.json")
        tok_meta = {"kind": "bpe", "file": "tokenizer.json"}

    def docs():
        for f in files:
            yield (tok.encode(chunk) for chunk in _text_chunks(f))

    return _write_shards(docs(), tok, tok_meta, out, shard_tokens, val_fraction, [str(f) for f in files])


def _write_shards(documents, tok, tok_meta: Dict, out: Path, shard_tokens: int, val_fraction: float,
                  sources: Sequence[str]) -> "TokenShards":
    """Write documents (each an iterable of token-id pieces) as shards + index; EOS after each document."""
    V = tok.vocab_size
    dtype = np.uint16 if V <= 1 << 16 else np.uint32
    for old in out.glob("shard_*.bin"):
        old.unlink()

    shards: List[Dict] = []
    pending: List[np.ndarray] = []
    pending_n = 0

    def flush(final: bool = False):
        nonlocal pending, pending_n
        while pending_n >= shard_tokens or (final and pending_n):
            data = np.concatenate(pending) if len(pending) > 1 else pending[0]
            take, rest = data[:shard_tokens], data[shard_tokens:]
            name = f"shard_{len(shards):05d}.bin"
            take.astype(dtype).tofile(out / name)
            shards.append({"file": name, "tokens": int(len(take))})
            pending = [rest] if len(rest) else []
            pending_n = len(rest)

    for doc in documents:  # each document: its token pieces, then EOS
        for ids in doc:
            pending.append(np.asarray(ids, dtype=np.int64))
            pending_n += len(ids)
            flush()
        pending.append(np.asarray([tok.eos_id], dtype=np.int64))
        pending_n += 1
        flush()
    flush(final=True)

    total = sum(s["tokens"] for s in shards)
    n_val = int(math.floor(total * val_fraction))
    cut = total - n_val
    splits: Dict[str, List[List]] = {"train": [], "val": []}
    start = 0
    for s in shards:
        a, b = start, start + s["tokens"]
        if a < cut:
            splits["train"].append([s["file"], 0, min(b, cut) - a])
        if b > cut:
            splits["val"].append([s["file"], max(a, cut) - a, s["tokens"]])
        start = b
    index = {
        "format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name, "vocab_size": int(V),
        "eos_id": int(tok.eos_id), "tokenizer": tok_meta, "shards": shards, "splits": splits,
        "total_tokens": int(total), "sources": list(sources),
    }
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / INDEX)
    return TokenShards(out)


def prepare_shards_from_dataset(dataset: Dict, out_dir: PathLike, tokenizer: str = "byte",
                                vocab_size: Optional[int] = None, shard_tokens: int = 1 << 26,
                                val_fraction: float = 0.01, eos_token: Optional[str] = None) -> "TokenShards":
    """Tokenize a ``data.dataset`` source (hf | json | jsonl | parquet | text, read with HF ``datasets``)
    into shards. ``tokenizer``: ``byte``, ``bpe`` (trained here on the source; ``vocab_size``) or any
    tokenizer ``data.tokenizer`` accepts (a tokenizer.json, an HF tokenizer folder or name), saved beside."""
    from hybridlab.jobs import textdata

    spec = textdata.DatasetSpec.from_mapping(dataset, task="prepare_shards")
    textdata.peek(spec, "prepare_shards")
    _check_shard_args(shard_tokens, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 260:
            raise _err(f"prepare_shards: bad value for 'vocab_size': {vocab_size!r} (bpe needs an integer >= 260)")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(textdata.stream_documents(spec, "prepare_shards"), trainer)
        bpe.save(str(out / "tokenizer.json"))
        tok, meta = BPETokenizer(bpe), {"kind": "bpe", "file": "tokenizer.json"}
    elif tokenizer == "byte":
        tok, meta = ByteTokenizer(), {"kind": "byte"}
    else:
        text_tok = textdata.load_text_tokenizer(tokenizer, eos_token, task="prepare_shards")
        if text_tok.kind == "hf":
            text_tok.backend.save_pretrained(str(out / "tokenizer"))
            meta = {"kind": "hf", "dir": "tokenizer", "eos_id": text_tok.eos_id}
        else:
            text_tok.backend.save(str(out / "tokenizer.json"))
            meta = {"kind": "tokenizers", "file": "tokenizer.json", "eos_id": text_tok.eos_id}
        tok = text_tok

    def docs():
        batch = []
        for text in textdata.stream_documents(spec, "prepare_shards"):
            batch.append(text)
            if len(batch) == 64:
                yield from ([ids] for ids in _encode_batch(tok, batch))
                batch = []
        if batch:
            yield from ([ids] for ids in _encode_batch(tok, batch))

    return _write_shards(docs(), tok, meta, out, shard_tokens, val_fraction, [str(p) for p in (
        spec.path if isinstance(spec.path, list) else [spec.path])])


def _encode_batch(tok, texts):
    fn = getattr(tok, "encode_batch", None)
    return fn(texts) if fn else [tok.encode(t) for t in texts]


# --------------------------------------------------------------------------- reader


def _read_index(root: Path) -> Dict:
    p = root / INDEX
    if not p.is_file():
        raise _err(f"token shards: no {INDEX} in {root}")
    try:
        index = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise _err(f"token shards: {p} is not valid JSON ({e})") from e
    if index.get("format") != FORMAT:
        raise _err(f"token shards: {p} is not a {FORMAT} index")
    return index


class TokenShards:
    """Reader of a prepared shard folder; memmaps are opened lazily (picklable)."""

    def __init__(self, path: PathLike):
        self.root = Path(path)
        self.index = _read_index(self.root)
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index["eos_id"])
        self._maps: Dict[str, np.memmap] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_maps"] = {}
        return d

    @property
    def splits(self) -> List[str]:
        return [k for k, v in self.index["splits"].items() if v]

    def num_tokens(self, split: str = "train") -> int:
        return sum(e - s for _, s, e in self._ranges(split))

    def _ranges(self, split: str):
        ranges = self.index["splits"].get(split)
        if not ranges:
            have = ", ".join(self.splits) or "none"
            raise _err(f"token shards: split '{split}' is empty or missing in {self.root} (splits: {have})")
        return ranges

    def _map(self, name: str) -> np.memmap:
        m = self._maps.get(name)
        if m is None:
            m = np.memmap(self.root / name, dtype=self.dtype, mode="r")
            self._maps[name] = m
        return m

    def tokens(self, split: str = "train") -> np.ndarray:
        """All tokens of a split, concatenated (for small data and tests)."""
        parts = [np.asarray(self._map(f)[s:e]) for f, s, e in self._ranges(split)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def sample(self, batch_size: int, length: int, seed_or_rng, split: str = "train") -> np.ndarray:
        """``batch_size`` windows of ``length`` consecutive tokens (int64), seeded.
        A window never crosses a shard range."""
        rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
        ranges = self._ranges(split)
        starts = np.array([max(0, (e - s) - length + 1) for _, s, e in ranges], dtype=np.int64)
        total = int(starts.sum())
        if total == 0:
            longest = max(e - s for _, s, e in ranges)
            raise _err(f"token shards: split '{split}' has no window of {length} tokens "
                       f"(longest shard range {longest}); lower seq_len or prepare more text")
        u = rng.integers(0, total, batch_size)
        cum = np.cumsum(starts)
        which = np.searchsorted(cum, u, side="right")
        offs = u - (cum[which] - starts[which])
        out = np.empty((batch_size, length), dtype=np.int64)
        for i, (w, o) in enumerate(zip(which, offs)):
            f, s, _ = ranges[w]
            out[i] = self._map(f)[s + o: s + o + length]
        return out


class LM(Task):
    """Next-token prediction on text; the scored positions are every next token of a document.

    Two sources: ``path`` (token shards made by ``prepare_shards``) or ``dataset`` + ``tokenizer``
    (text read through HF ``datasets``, tokenized on the fly; see ``hybridlab.jobs.textdata``),
    with ``pack`` (default true: documents concatenated to ``seq_len`` and kept apart by
    ``seq_idx``). Training reads a dataset as one sequential stream per rank
    (``train_stream``); ``batch`` (evals) draws seeded rows from the first packed rows of the
    source. ``score`` with logits gives ``loss`` (mean CE, nats) and ``ppl``."""

    name = "lm"
    VARIABLE_LENGTH = False  # windows of one token stream: no length curriculum
    OPTIONS = {
        "path": Opt("str", None, allow_none=True, help="folder made by prepare_shards"),
        "dataset": Opt("mapping", None, allow_none=True, help="{format: hf|json|jsonl|parquet|text, path, name, split, text_field}"),
        "tokenizer": Opt("str", None, allow_none=True, help="tokenizer.json, a local HF tokenizer folder, an HF name, or byte"),
        "pack": Opt("bool", True, help="concatenate documents to seq_len (kept apart); false: one document per row"),
        "eos_token": Opt("str", None, allow_none=True, help="the end-of-document token (default: the tokenizer's)"),
        "seq_len": Opt("int", 256, min=1),
        "split": Opt("str", "train", help="shards: train | val"),
        "vocab": Opt("int", None, min=1, allow_none=True, help="optional: checked to be >= the data's vocab"),
    }
    POOL_TOKENS = 1 << 20  # eval batches are drawn from the first ~1M tokens of the source

    def _setup(self):
        self._pools = {}
        if (self.path is None) == (self.dataset is None):
            raise _err("lm: give one source: 'path' (token shards) or 'dataset' (+ 'tokenizer')")
        if self.path is not None:
            for key in ("tokenizer", "eos_token"):
                if self.config.get(key) is not None:
                    raise _err(f"lm: bad value for '{key}': {self.config[key]!r} (token shards carry their own tokenizer; "
                               f"'{key}' goes with 'dataset')", key)
            try:
                self.shards = TokenShards(self.path)
            except TaskError as e:
                raise _err(f"lm: bad value for 'path': {self.path!r} ({e})", "path") from None
            if self.split not in self.index_splits():
                raise _err(f"lm: bad value for 'split': {self.split!r} (splits here: {', '.join(self.shards.splits) or 'none'})", "split")
            self._vocab_size = self._check_vocab_knob(self.shards.vocab_size)
            self._answer_tokens = torch.arange(self.shards.vocab_size)
            return
        from hybridlab.jobs import textdata

        if self.tokenizer is None:
            raise _err("lm: option 'tokenizer' is required with 'dataset' (a tokenizer.json, a tokenizer folder, an HF name, or byte)", "tokenizer")
        self.source = textdata.DatasetSpec.from_mapping(self.dataset)
        self.text_tokenizer = textdata.load_text_tokenizer(self.tokenizer, self.eos_token)
        textdata.peek(self.source)
        self._vocab_size = self._check_vocab_knob(self.text_tokenizer.vocab_size)
        self._answer_tokens = torch.arange(self.text_tokenizer.vocab_size)

    @property
    def streaming(self) -> bool:
        """True when training reads the source as a stream (``train_stream``), not by seeded windows."""
        return self.dataset is not None

    def train_stream(self, rank: int = 0, world: int = 1, seq_len: Optional[int] = None):
        from hybridlab.jobs.textdata import PackedStream

        return PackedStream(self.source, self.text_tokenizer, seq_len or self.seq_len, self.pack, rank, world)

    def tokenizer_for_text(self):
        """The tokenizer of this data (``encode``/``decode``/``eos_id``/``vocab_size``)."""
        return self.text_tokenizer if self.dataset is not None else load_tokenizer(self.path)

    def index_splits(self):
        return self.shards.splits

    def _pool(self, L: int):
        pool = self._pools.get(L)
        if pool is None:
            stream = self.train_stream(0, 1, L)
            rows = max(1, self.POOL_TOKENS // (L + 1))
            first = stream.next_batch(1)
            batches, seen_epoch = [first], False
            while stream.rows < rows and not seen_epoch:  # stop at the end of the source (small eval sets)
                batches.append(stream.next_batch(1))
                seen_epoch = stream.epoch > 0
            pool = (torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches]),
                    torch.cat([b.seq_idx for b in batches]) if self.pack else None)
            self._pools[L] = pool
        return pool

    def _generate(self, B, L, rng):
        if self.dataset is not None:
            inputs, targets, seq_idx = self._pool(L)
            pick = torch.from_numpy(rng.integers(0, inputs.shape[0], B))
            out = (inputs[pick].numpy(), targets[pick].numpy())
            return out + ((seq_idx[pick].numpy(),) if seq_idx is not None else ())
        w = self.shards.sample(B, L + 1, rng, split=self.split)
        return w[:, :-1], w[:, 1:]

    def solve(self, b):
        # the answers of language modelling are the data itself
        return b.targets.clone()
