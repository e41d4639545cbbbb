"""A tiny local corpus (jsonl, parquet, text) and a tokenizer trained on it: nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

# every test that touches datasets/transformers stays offline and keeps its caches in tmp
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}

# set at import, before any test module imports datasets / huggingface_hub (they read these once)
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

WORDS = ("the river runs past the old mill and the children count boats in the morning light while "
         "a quiet wind moves over fields of barley near the stone bridge where merchants rest").split()


def documents(n: int = 24, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(4, 40)
        words = [rng.choice(WORDS) for _ in range(k)]
        docs.append(f"Doc {i}: " + " ".join(words) + ".")
    return docs


def write_corpus(root: Path, docs: list[str]) -> dict:
    """The same documents as jsonl (2 files), parquet (2 files) and text (one file per document)."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    paths = {"jsonl": [], "parquet": [], "text": root / "txt"}
    for j, part in enumerate((docs[:half], docs[half:])):
        p = root / f"part{j}.jsonl"
        with open(p, "w") as f:
            for i, d in enumerate(part):
                f.write(json.dumps({"text": d, "id": i}) + "\n")
        paths["jsonl"].append(str(p))
        import pyarrow as pa
        import pyarrow.parquet as pq

        q = root / f"part{j}.parquet"
        pq.write_table(pa.table({"body": part, "id": list(range(len(part)))}), q)
        paths["parquet"].append(str(q))
    paths["text"].mkdir(exist_ok=True)
    for i, d in enumerate(docs):
        (paths["text"] / f"doc{i:03d}.txt").write_text(d)
    return paths


def train_tokenizer(path: Path, docs: list[str], vocab_size: int = 300) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs + [" ".join(WORDS)] * 4 + ["0123456789 The secret number is ?"] * 4, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)


def offline_env(tmp_path: Path) -> dict:
    env = dict(OFFLINE)
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_home" / "datasets")
    return env


def set_offline(monkeypatch, tmp_path: Path) -> None:
    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    os.makedirs(tmp_path / "hf_home", exist_ok=True)


def small_corpus(tmp_path: Path, monkeypatch, n_docs: int = 24) -> dict:
    """Offline HF env, ``n_docs`` documents written in every format and a tokenizer trained on them:
    {"docs", "paths" (format -> path), "tok" (tokenizer.json path), "root"}."""
    set_offline(monkeypatch, tmp_path)
    docs = documents(n_docs)
    paths = write_corpus(tmp_path / "corpus", docs)
    tok = train_tokenizer(tmp_path / "tok" / "tokenizer.json", docs)
    return {"docs": docs, "paths": paths, "tok": tok, "root": tmp_path}


def write_lm_eval_tasks(folder: Path, docs: list[str], n: int = 6) -> list[str]:
    """Three lm-eval task YAMLs over local jsonl (one per request kind); returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    with open(data, "w") as f:
        for d in docs[:n]:
            words = d.rstrip(".").split()
            f.write(json.dumps({"context": " ".join(words[:-1]), "target": words[-1], "text": d,
                                "prompt": "Doc 1:", "answer": " the"}) + "\n")
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "lastword.yaml").write_text(
        "task: tiny_lastword\n" + head + "output_type: loglikelihood\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_target: \" {{target}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    (folder / "rolling.yaml").write_text(
        "task: tiny_rolling\n" + head + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: tiny_gen\n" + head + "output_type: generate_until\n"
        "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return ["tiny_lastword", "tiny_rolling", "tiny_gen"]
