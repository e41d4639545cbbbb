"""Text evals: needle-in-a-haystack prompts and scoring, loss by position, the lm-evaluation-harness LM
(each request kind against a direct computation, then whole custom tasks over local data), their
reports (heatmap, curves, compare), and job validation. Offline: local corpus, local tokenizer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from text_fixtures import small_corpus, write_lm_eval_tasks

pytest.importorskip("datasets")

from hybridlab.arch import HybridLM, load_model_spec  # noqa: E402
from hybridlab.jobs.record import NIAH_RE, PPL_POS_RE  # noqa: E402
from hybridlab.jobs.text_evals import TextCorpus, parse_text_eval, run_text_eval  # noqa: E402
from test_packing import HYBRID  # noqa: E402


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    c = small_corpus(tmp_path, monkeypatch)
    return {**c, "src": {"dataset": {"format": "jsonl", "path": c["paths"]["jsonl"]}, "tokenizer": c["tok"]}}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return HybridLM(load_model_spec({**HYBRID, "vocab_size": 300})).eval()


class Oracle:
    """Reads the needle out of the prompt and answers it (``wrong``: off by one); records the prompts."""

    def __init__(self, tok, wrong=False):
        self.tok, self.wrong, self.prompts = tok, wrong, []

    def generate(self, x, max_new_tokens, temperature=0.0):
        rows = []
        for row in x.tolist():
            self.prompts.append(row)
            m = re.search(r"secret number is (\d+)\.", self.tok.decode(row))
            ans = str(int(m.group(1)) + (1 if self.wrong else 0))
            ids = (self.tok.encode(" " + ans) + [self.tok.eos_id] * max_new_tokens)[:max_new_tokens]
            rows.append(row + ids)
        return torch.tensor(rows)


def test_niah_prompts_and_exact_match(corpus):
    opts = {**corpus["src"], "samples": 3, "depths": [0, 0.5, 1]}
    tok = TextCorpus("niah", parse_text_eval("niah", opts)).tokenizer
    right = Oracle(tok)
    m = run_text_eval(right, "niah", opts, [160, 320], batch_size=2, batches=1, device="cpu")
    cells = {k for k in m if NIAH_RE.match(k)}
    assert cells == {f"eval/niah/len_{L}/depth_{d}/acc" for L in (160, 320) for d in (0, 50, 100)}
    assert all(v == 1.0 for v in m.values()) and m["eval/niah/len_320/acc"] == 1.0
    # every prompt has exactly L tokens, ends with the question, and holds the needle at its depth
    q = tok.encode("\nWhat is the secret number? The secret number is")
    for p in right.prompts:
        assert len(p) in (160, 320) and p[-len(q):] == q
    text = tok.decode(right.prompts[0])  # depth 0: the needle opens the prompt
    assert text.lstrip().startswith("The secret number is")
    last = tok.decode(right.prompts[6])  # L=160, depth 100 % (3 prompts per depth): right before the question
    assert re.search(r"secret number is \d+\.\s*What is the secret number", last)
    answers = {re.search(r"is (\d+)\.", tok.decode(p)).group(1) for p in right.prompts}
    assert len(answers) > 10  # a new number per prompt
    wrong = run_text_eval(Oracle(tok, wrong=True), "niah", opts, [160], batch_size=2, batches=1, device="cpu")
    assert all(v == 0.0 for v in wrong.values())


def test_niah_runs_a_real_model(corpus, model):
    m = run_text_eval(model, "niah", {**corpus["src"], "samples": 2, "depths": [0.5]}, [128], 2, 1, "cpu")
    assert set(m) == {"eval/niah/len_128/depth_50/acc", "eval/niah/len_128/acc"}


class Uniform(torch.nn.Module):
    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, x):
        return torch.zeros(*x.shape, self.V)


def test_ppl_by_pos_buckets(corpus, model):
    m = run_text_eval(Uniform(300), "ppl_by_pos", {**corpus["src"], "buckets": 4}, [64], 2, 2, "cpu")
    pos = {k: v for k, v in m.items() if PPL_POS_RE.match(k)}
    assert set(pos) == {f"eval/ppl_by_pos/len_64/pos_{a}_{a + 16}/{w}" for a in (0, 16, 32, 48) for w in ("loss", "ppl")}
    for k, v in pos.items():
        assert v == pytest.approx(math.log(300) if k.endswith("loss") else 300.0, rel=1e-6)
    real = run_text_eval(model, "ppl_by_pos", {**corpus["src"], "buckets": 4}, [96], 2, 2, "cpu")
    parts = [real[f"eval/ppl_by_pos/len_96/pos_{a}_{a + 24}/loss"] for a in (0, 24, 48, 72)]
    assert real["eval/ppl_by_pos/len_96/loss"] == pytest.approx(sum(parts) / 4, rel=1e-6)


def test_harness_requests_match_direct_computation(corpus, model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from hybridlab.jobs.lm_harness import HybridLMHarness
    from hybridlab.jobs.textdata import load_text_tokenizer

    tok = load_text_tokenizer(corpus["tok"])
    lm = HybridLMHarness(model, tok, batch_size=2, max_length=64)

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    pairs = [("the river runs", " past the mill"), ("Doc 3: quiet", " wind"), ("", "boats")]
    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c = tok.encode(ctx) if ctx else [tok.eos_id]
        whole = tok.encode(ctx + cont)
        k = whole[len(c):] if ctx else tok.encode(cont)
        ids = torch.tensor([c + k])
        logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)
        tgt = ids[0, len(c):]
        want = logp[len(c) - 1:].gather(1, tgt[:, None]).sum()
        assert lp == pytest.approx(float(want), rel=1e-5)
        assert greedy == bool((logp[len(c) - 1:].argmax(-1) == tgt).all())
    text = corpus["docs"][0] + " " + corpus["docs"][1]
    (roll,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    ids = torch.tensor([[tok.eos_id] + tok.encode(text)])
    assert ids.shape[1] - 1 > 64  # long enough to need several windows
    # disjoint windows of at most 64 predictions, each with all the context the window allows
    total, toks = 0.0, ids[0].tolist()
    n, done = len(toks) - 1, 0
    while done < n:
        pred = min(64, n - done)
        end = done + pred
        start = max(0, end - 64)
        logp = torch.log_softmax(model(torch.tensor([toks[start:end]]))[0].float(), -1)
        tgt = torch.tensor(toks[end - pred + 1:end + 1])
        total += float(logp[-pred:].gather(1, tgt[:, None]).sum())
        done = end
    assert roll == pytest.approx(total, rel=1e-4)
    (gen,) = lm.generate_until([req("generate_until", ("Doc 1:", {"until": ["."], "max_gen_toks": 5}))])
    want = model.generate(torch.tensor([tok.encode("Doc 1:")]), max_new_tokens=5)[0, len(tok.encode("Doc 1:")):]
    want = want.tolist()
    if tok.eos_id in want:
        want = want[:want.index(tok.eos_id)]
    assert gen == tok.decode(want).split(".")[0]


def test_lm_eval_custom_tasks_offline(corpus, model):
    pytest.importorskip("lm_eval")
    names = write_lm_eval_tasks(corpus["root"] / "lm_tasks", corpus["docs"])
    m = run_text_eval(model, "lm_eval", {"tokenizer": corpus["tok"], "tasks": names,
                                         "include": [str(corpus["root"] / "lm_tasks")]}, [], 4, 1, "cpu")
    for key in ("tiny_lastword/acc", "tiny_lastword/perplexity", "tiny_rolling/word_perplexity",
                "tiny_rolling/bits_per_byte", "tiny_gen/exact_match"):
        assert f"eval/lm_eval/{key}" in m, sorted(m)
    assert 0.0 <= m["eval/lm_eval/tiny_lastword/acc"] <= 1.0 and m["eval/lm_eval/tiny_rolling/bits_per_byte"] > 0


def test_reports_from_metrics(tmp_path):
    from hybridlab.text_report import niah_grid, ppl_curves, text_table, write_text_eval_plots

    m = {"eval/niah/len_128/depth_0/acc": 1.0, "eval/niah/len_128/depth_50/acc": 0.5, "eval/niah/len_256/depth_0/acc": 0.0,
         "eval/ppl_by_pos/len_256/pos_0_128/loss": 3.0, "eval/ppl_by_pos/len_256/pos_128_256/loss": 4.0,
         "eval/lm_eval/tiny_lastword/acc": 0.25}
    assert niah_grid(m) == {128: {0: 1.0, 50: 0.5}, 256: {0: 0.0}}
    assert ppl_curves(m) == {256: [(0, 128, 3.0), (128, 256, 4.0)]}
    assert "lm_eval tiny_lastword: acc 0.2500" in text_table(m)
    files = write_text_eval_plots(m, tmp_path, "my run", train_len=128)
    assert sorted(f.name for f in files) == ["niah_my-run.png", "ppl_by_position.png"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_compare_shows_text_evals(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from hybridlab.compare import compare

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lm-text")
    for name, acc in (("hybrid", 0.75), ("transformer", 0.25)):
        rid = client.create_run(exp, run_name=name, tags={"hybridlab.layout": name}).info.run_id
        client.log_param(rid, "data.seq_len", "128")
        client.log_param(rid, "data.task", "lm")
        for k, v in {"train/loss": 3.0, "eval/lm_eval/tiny_lastword/acc": acc, "eval/lm_eval/tiny_lastword/acc_stderr": 0.1,
                     "eval/niah/len_128/depth_0/acc": acc, "eval/niah/len_128/depth_100/acc": 1.0,
                     "eval/niah/len_128/acc": (acc + 1) / 2, "eval/ppl_by_pos/len_512/pos_0_256/loss": 3.0,
                     "eval/ppl_by_pos/len_512/pos_256_512/loss": 3.0 + acc, "eval/ppl_by_pos/len_512/loss": 3.2}.items():
            client.log_metric(rid, k, v, step=1)
        client.set_terminated(rid)
    from rich.console import Console
    import io

    buf = io.StringIO()
    c = compare("lm-text", out=str(tmp_path / "cmp"), uri=uri, log=False, console=Console(file=buf, width=250))
    assert c.text_columns == [("tiny_lastword", "acc")]
    assert ("niah", 128, "acc") in c.columns and ("ppl_by_pos", 512, "loss") in c.columns
    table = buf.getvalue()
    assert "lm_eval" in table and "0.750" in table and "0.250" in table
    for f in ("text_evals.csv", "niah_hybrid.png", "niah_transformer.png", "ppl_by_position.png"):
        assert (tmp_path / "cmp" / f).is_file(), f
    import csv

    rows = list(csv.DictReader(open(tmp_path / "cmp" / "summary.csv")))
    assert {r["label"]: r["lm_eval tiny_lastword acc"] for r in rows} == {"hybrid": "0.75", "transformer": "0.25"}


def test_job_validates_text_evals(corpus):
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.spec import load_job

    tasks = corpus["root"] / "lm_tasks"
    write_lm_eval_tasks(tasks, corpus["docs"])
    base = (f"experiment: t\nmodel: zoo:tiny-transformer\n"
            f"data: {{task: lm, dataset: {{format: jsonl, path: {corpus['paths']['jsonl'][0]}}}, tokenizer: {corpus['tok']}, seq_len: 32}}\n"
            f"eval:\n")
    p = corpus["root"] / "j.yaml"
    p.write_text(base + f"  - {{task: niah, samples: 2}}\n  - {{task: ppl_by_pos}}\n"
                        f"  - {{task: lm_eval, tasks: [tiny_lastword], include: {tasks}}}\n")
    job = load_job(str(p))
    assert job.resolved["eval"][0]["seq_lens"] == [32, 64, 128, 256, 512]  # 1-16x the training length
    assert job.resolved["eval"][1]["seq_lens"] == [512]
    p.write_text(base + f"  - {{task: lm_eval, tasks: [tiny_lastwrd], include: {tasks}}}\n")
    with pytest.raises(SpecError) as e:
        load_job(str(p))
    assert e.value.line == 5 and "tiny_lastwrd" in str(e.value) and "did you mean 'tiny_lastword'" in str(e.value)
    p.write_text("experiment: t\nmodel: zoo:tiny-transformer\ndata: {task: mqar, seq_len: 256}\neval:\n  - {task: niah}\n")
    with pytest.raises(SpecError, match="niah: needs text"):
        load_job(str(p))
