"""Language-model data from where users keep it (jsonl / parquet / text through HF datasets, a
tokenizers file or a tokenizer folder), packed with document boundaries, deterministic and resumable;
bad inputs give one located line."""

from __future__ import annotations

import textwrap

import pytest
import torch
from text_fixtures import documents, small_corpus  # sets the HF offline env first

pytest.importorskip("datasets")

from hybridlab.arch.specio import SpecError  # noqa: E402
from hybridlab.jobs.tasks import IGNORE, TaskError, make_task  # noqa: E402


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    return small_corpus(tmp_path, monkeypatch)


def _task(corpus, fmt="jsonl", seq_len=32, **kw):
    path = corpus["paths"][fmt] if fmt != "text" else str(corpus["paths"]["text"])
    ds = {"format": fmt, "path": path}
    if fmt == "parquet":
        ds["text_field"] = "body"
    return make_task("lm", dataset=ds, tokenizer=corpus["tok"], seq_len=seq_len, **kw)


def _stream_tokens(task, n_rows, seq_len):
    s = task.train_stream(0, 1, seq_len)
    return s.next_batch(n_rows)


def test_packing_keeps_documents_apart(corpus):
    task = _task(corpus)
    tok = task.text_tokenizer
    b = _stream_tokens(task, 6, 32)
    assert b.inputs.shape == b.targets.shape == b.seq_idx.shape == (6, 32)
    # the rows are the documents' tokens, each followed by EOS, concatenated (rows of seq_len + 1)
    flat = []
    for d in corpus["docs"]:
        flat += tok.encode(d) + [tok.eos_id]
    rows = [flat[i * 33:(i + 1) * 33] for i in range(6)]
    for r in range(6):
        assert b.inputs[r].tolist() == rows[r][:32]
        ids = b.seq_idx[r]
        assert ids[0] == 0 and bool((ids[1:] >= ids[:-1]).all())
        for i in range(32):
            if b.inputs[r, i] == tok.eos_id:  # the target after a document's EOS is the next document: masked
                assert b.targets[r, i] == IGNORE
            else:  # every other target is the next token of the same document
                assert b.targets[r, i] == rows[r][i + 1]
        # a new document starts right after each EOS inside the row
        eos_at = [i for i in range(31) if b.inputs[r, i] == tok.eos_id]
        for i in eos_at:
            assert ids[i + 1] == ids[i] + 1
    assert int(b.seq_idx.max()) >= 1  # the rows really hold several documents


def test_formats_read_the_same_documents(corpus):
    rows = [_stream_tokens(_task(corpus, fmt), 4, 32).inputs for fmt in ("jsonl", "parquet", "text")]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])


def test_pack_false_is_one_document_per_row(corpus):
    task = _task(corpus, pack=False, seq_len=16)
    b = task.train_stream(0, 1, 16).next_batch(3)
    assert b.seq_idx is None
    tok = task.text_tokenizer
    for r in range(3):
        ids = (tok.encode(corpus["docs"][r]) + [tok.eos_id])[:17]
        n = len(ids)
        assert b.inputs[r, : n - 1].tolist() == ids[: n - 1]
        assert b.targets[r, : n - 1].tolist() == ids[1:n]
        assert (b.targets[r, n - 1:] == IGNORE).all()


def test_train_stream_is_deterministic_and_resumes_exactly(corpus):
    from hybridlab.jobs.data import TrainStream

    data = {"task": "lm", "dataset": {"format": "jsonl", "path": corpus["paths"]["jsonl"]}, "tokenizer": corpus["tok"],
            "seq_len": 24}
    whole = TrainStream(data, micro_batch=2, grad_accum=2, seed=0, rank=0)
    want = [whole.get(s, m).inputs for s in range(1, 9) for m in range(2)]  # 8 steps: wraps around the corpus
    again = TrainStream(data, micro_batch=2, grad_accum=2, seed=0, rank=0)
    first = [again.get(s, m).inputs for s in range(1, 4) for m in range(2)]
    state = again.state_dict()
    import json

    state = json.loads(json.dumps(state))  # what a checkpoint holds
    resumed = TrainStream(data, micro_batch=2, grad_accum=2, seed=0, rank=0)
    assert resumed.resume(state)
    rest = [resumed.get(s, m).inputs for s in range(4, 9) for m in range(2)]
    assert resumed.fast_forwarded == 0  # continued from the saved position, nothing re-read
    for a, b in zip(first + rest, want):
        assert torch.equal(a, b)
    # without a state it still gets there (reading forward), and a later step equals the same batch
    cold = TrainStream(data, micro_batch=2, grad_accum=2, seed=0, rank=0)
    assert torch.equal(cold.get(6, 1).inputs, want[11]) and cold.fast_forwarded == 11


def test_ranks_read_disjoint_documents(corpus):
    task = _task(corpus, seq_len=8, pack=False)
    seen = []
    for rank in range(2):
        s = task.train_stream(rank, 2, 8)
        seen.append({tuple(r.tolist()) for r in s.next_batch(6).inputs})
    assert seen[0].isdisjoint(seen[1])


def test_tokenizer_folder_and_byte(corpus, tmp_path):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_file=corpus["tok"], eos_token="<|endoftext|>").save_pretrained(str(folder))
    a = _task(corpus, seq_len=16)
    ds = {"format": "jsonl", "path": corpus["paths"]["jsonl"]}
    b = make_task("lm", dataset=ds, tokenizer=str(folder), seq_len=16)
    assert b.text_tokenizer.kind == "hf" and b.text_tokenizer.eos_id == a.text_tokenizer.eos_id
    assert torch.equal(_stream_tokens(a, 2, 16).inputs, _stream_tokens(b, 2, 16).inputs)
    c = make_task("lm", dataset=ds, tokenizer="byte", seq_len=16)
    assert c.vocab_size == 257 and _stream_tokens(c, 1, 16).inputs[0, :4].tolist() == list(b"Doc ")


@pytest.mark.parametrize("change,needle", [
    ({"dataset": {"format": "csv", "path": "X"}}, "'dataset.format': 'csv'"),
    ({"dataset": {"format": "jsonl", "path": "/nonexistent/*.jsonl"}}, "'dataset.path'"),
    ({"dataset": {"format": "jsonl", "path": "X", "text_field": "body"}}, "'dataset.text_field': 'body'"),
    ({"tokenizer": "/nonexistent/tok.json"}, "'tokenizer'"),
    ({"dataset": {"format": "jsonl", "path": "X", "colour": 1}}, "unknown option 'dataset.colour'"),
])
def test_bad_inputs_are_one_line_task_errors(corpus, change, needle):
    opts = {"dataset": {"format": "jsonl", "path": corpus["paths"]["jsonl"]}, "tokenizer": corpus["tok"], "seq_len": 16}
    for k, v in change.items():
        if isinstance(v, dict) and v.get("path") == "X":
            v = {**v, "path": corpus["paths"]["jsonl"]}
        opts[k] = v
    with pytest.raises(TaskError) as e:
        make_task("lm", **opts)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_broken_tokenizer_file(corpus, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(TaskError, match="'tokenizer'.*does not load"):
        make_task("lm", dataset={"format": "jsonl", "path": corpus["paths"]["jsonl"]}, tokenizer=str(bad))


JOB = """\
experiment: text
model: zoo:tiny-transformer
data:
  task: lm
  dataset:
    format: {fmt}
    path: {path}
    text_field: {field}
  tokenizer: {tok}
  seq_len: 32
  pack: true
train: {{steps: 2}}
"""


def _job(corpus, **kw):
    args = {"fmt": "jsonl", "path": corpus["paths"]["jsonl"][0], "field": "text", "tok": corpus["tok"], **kw}
    p = corpus["root"] / "job.yaml"
    p.write_text(JOB.format(**args))
    return str(p)


def test_job_errors_point_at_the_key(corpus):
    from hybridlab.jobs.spec import load_job

    job = load_job(_job(corpus))
    assert job.resolved["data"]["dataset"]["path"] == corpus["paths"]["jsonl"][0]
    cases = [({"field": "body"}, 8, "data.dataset.text_field"), ({"fmt": "csv"}, 6, "data.dataset.format"),
             ({"path": "missing.jsonl"}, 7, "data.dataset.path"), ({"tok": "missing-tok.json"}, 9, "data.tokenizer")]
    for kw, line, key in cases:
        with pytest.raises(SpecError) as e:
            load_job(_job(corpus, **kw))
        assert e.value.line == line and ".".join(map(str, e.value.path)) == key, (str(e.value), kw)
    with pytest.raises(SpecError) as e:  # tokenizer vocab (300) larger than the model's: shrink the model
        load_job(_job(corpus), overrides=["model.vocab_size=64"])
    assert e.value.line == 9 and "vocabulary of 300" in str(e.value)


def test_relative_paths_resolve_against_the_job_file(corpus, monkeypatch, tmp_path):
    from hybridlab.jobs.spec import load_job

    monkeypatch.chdir(tmp_path / "tok")  # not where the job is
    job = load_job(_job(corpus, path="corpus/part0.jsonl", tok="tok/tokenizer.json"))
    assert job.resolved["data"]["dataset"]["path"] == str(corpus["root"] / "corpus" / "part0.jsonl")
    assert job.resolved["data"]["tokenizer"] == corpus["tok"]


def test_cli_bad_dataset_exits_2_with_one_line(corpus):
    from conftest import run_cli
    from text_fixtures import offline_env

    proc = run_cli("run", _job(corpus, field="body"), "--dry-run", env=offline_env(corpus["root"]), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "job.yaml:8 data.dataset.text_field" in lines[0], lines


def test_data_prepare_reads_the_same_sources(corpus, tmp_path):
    """`hybridlab data prepare --format jsonl --tokenizer FILE` makes shards holding every document + EOS."""
    from conftest import run_cli
    from text_fixtures import offline_env

    from hybridlab.jobs.tasks import load_tokenizer, make_task

    out = tmp_path / "shards"
    proc = run_cli("data", "prepare", *corpus["paths"]["jsonl"], "--format", "jsonl", "--tokenizer", corpus["tok"],
                   "--out", str(out), "--val-fraction", "0", env=offline_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    task = make_task("lm", path=str(out), seq_len=16)
    tok = load_tokenizer(str(out))
    want = []
    for d in corpus["docs"]:
        want += tok.encode(d) + [tok.eos_id]
    assert task.shards.tokens("train").tolist() == want and task.vocab_size == 300
    bad = run_cli("data", "prepare", "--format", "parquet", "--dataset", str(tmp_path / "none.parquet"), "--out",
                  str(tmp_path / "x"), env=offline_env(tmp_path), timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "'dataset.path'" in bad.stderr
