#!/usr/bin/env python3
"""Make a small real-text corpus from what this machine already has (no downloads).

    python scripts/make_local_corpus.py --out data/local-corpus            # site-packages of this Python
    python scripts/make_local_corpus.py --out data/lc --roots /usr/share/doc --max-docs 20000

Writes into OUT:

``train.jsonl``, ``val.jsonl``   one document per file found ({"text": ..., "source": path}); Python sources
                                 and docs (.py .md .rst .txt), cut at --max-chars; ~2 % to val (by path hash,
                                 so the split is stable)
``tokenizer.json``               a byte-level BPE (``tokenizers``) trained on train.jsonl, EOS <|endoftext|>
``lm_eval_tasks/``               lm-evaluation-harness task YAMLs over val.jsonl: ``local_lastword``
                                 (loglikelihood of each sampled line's last word, acc + perplexity) and
                                 ``local_ppl`` (rolling loglikelihood of whole documents: word/byte perplexity,
                                 bits per byte) — standard evals that run offline

Then train on it with ``jobs/recipes/lm-180m-local.yaml``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import site
import sys
from pathlib import Path

SUFFIXES = (".py", ".md", ".rst", ".txt")


def roots_default() -> list[str]:
    out = []
    for p in site.getsitepackages() + [site.getusersitepackages()]:
        if os.path.isdir(p) and p not in out:
            out.append(p)
    return out


def files(roots: list[str]):
    seen = set()
    for r in roots:
        for dirpath, dirnames, names in os.walk(r):
            dirnames.sort()
            for n in sorted(names):
                if n.endswith(SUFFIXES):
                    p = os.path.join(dirpath, n)
                    real = os.path.realpath(p)
                    if real not in seen:
                        seen.add(real)
                        yield p


def read(path: str, max_chars: int) -> str | None:
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read(max_chars)
    except (UnicodeDecodeError, OSError):
        return None
    text = text.strip()
    return text if len(text) >= 200 else None


def is_val(path: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), "little")
    return h / 2**32 < fraction


def lastword_items(docs: list[str], n: int, seed: int) -> list[dict]:
    """Lines of prose/code whose last word is predicted from everything before it in the document."""
    rng = random.Random(seed)
    items = []
    for d in docs:
        lines = [i for i, ln in enumerate(d.splitlines()) if len(ln.split()) >= 6 and ln.split()[-1].isalpha()]
        if not lines:
            continue
        i = rng.choice(lines)
        all_lines = d.splitlines()
        words = all_lines[i].split()
        context = "\n".join(all_lines[:i] + [all_lines[i].rsplit(words[-1], 1)[0].rstrip()])
        items.append({"context": context[-4000:], "target": words[-1]})
        if len(items) >= n:
            break
    return items


TASK_HEAD = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"


def write_tasks(folder: Path, val_docs: list[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lw = folder / "local_lastword.jsonl"
    with open(lw, "w") as f:
        for it in lastword_items(val_docs, 1000, seed):
            f.write(json.dumps(it) + "\n")
    pp = folder / "local_ppl.jsonl"
    with open(pp, "w") as f:
        for d in val_docs[:500]:
            f.write(json.dumps({"text": d}) + "\n")
    (folder / "local_lastword.yaml").write_text(
        "task: local_lastword\n" + TASK_HEAD.format(data=lw.resolve()) + "output_type: loglikelihood\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_target: \" {{target}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    (folder / "local_ppl.yaml").write_text(
        "task: local_ppl\n" + TASK_HEAD.format(data=pp.resolve()) + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


def train_tokenizer(train_jsonl: Path, out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        with open(train_jsonl) as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    tok.save(str(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--roots", nargs="*", default=None, help="folders to read (default: this Python's site-packages)")
    ap.add_argument("--max-docs", type=int, default=20000)
    ap.add_argument("--max-chars", type=int, default=24000)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    roots = args.roots or roots_default()
    for r in roots:
        if not os.path.isdir(r):
            print(f"error: --roots: {r} is not a folder", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train = n_val = chars = 0
    val_docs = []
    with open(out / "train.jsonl", "w") as tr, open(out / "val.jsonl", "w") as va:
        for p in files(roots):
            if n_train + n_val >= args.max_docs:
                break
            text = read(p, args.max_chars)
            if text is None:
                continue
            rec = json.dumps({"text": text, "source": p}) + "\n"
            if is_val(p, args.val_fraction):
                va.write(rec)
                val_docs.append(text)
                n_val += 1
            else:
                tr.write(rec)
                n_train += 1
            chars += len(text)
    if n_train == 0 or n_val == 0:
        print(f"error: found {n_train} train / {n_val} val documents under {', '.join(roots)}", file=sys.stderr)
        return 2
    train_tokenizer(out / "train.jsonl", out / "tokenizer.json", args.vocab_size)
    write_tasks(out / "lm_eval_tasks", val_docs, args.seed)
    print(f"wrote {n_train} train + {n_val} val documents ({chars / 1e6:.1f}M characters) from {', '.join(roots)}, "
          f"a {args.vocab_size}-token BPE tokenizer and lm-eval tasks local_lastword, local_ppl to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
