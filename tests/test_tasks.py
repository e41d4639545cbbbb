"""Synthetic tasks (hybridlab.jobs.tasks): determinism, independent answer checks,
oracle / chance scoring, length generalization, errors, token shards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridlab.jobs.tasks import (
    TASKS, Batch, TaskError, TokenShards, batch_seed, load_tokenizer, make_task, prepare_shards,
)

IGN = -100

# --------------------------------------------------------------------------- independent solvers
# Plain Python over token lists, from the token layouts documented in each task
# module. Each returns {position: expected target}; every other position must be -100.


def mqar_expected(task, row):
    V = task.vocab
    K = (V - 1) // 2
    key_lo, val_lo = 1, 1 + K
    # context: leading key-value pairs (keys in [1, 1+K), values in [1+K, V))
    kv = {}
    i = 0
    while i + 1 < len(row) and key_lo <= row[i] < val_lo and val_lo <= row[i + 1] < V and row[i] not in kv:
        kv[row[i]] = row[i + 1]
        i += 2
    n = len(kv)
    assert n == task.pairs_for(len(row))
    assert len(set(kv.values())) == n  # distinct values
    exp = {}
    for p in range(2 * n, len(row)):
        if key_lo <= row[p] < val_lo:
            assert row[p] in kv and row[p] not in [row[q] for q in exp]  # each key queried once
            exp[p] = kv[row[p]]
            if p + 1 < len(row):
                assert row[p + 1] == (kv[row[p]] if task.echo_values else 0)
        elif row[p] != 0:
            assert task.echo_values and p > 2 * n and key_lo <= row[p - 1] < val_lo  # a value right after its key
    return exp


def passkey_expected(task, row):
    KEY, END, QUERY = 11, 12, 13
    assert row.count(KEY) == 1 and row.count(QUERY) == 1
    k0 = row.index(KEY)
    digits = []
    j = k0 + 1
    while row[j] != END:
        assert 1 <= row[j] <= 10
        digits.append(row[j])
        j += 1
    assert len(digits) == task.passkey_len
    q = row.index(QUERY)
    if task.depth is not None:
        F_ = len(row) + 1 - (2 * task.passkey_len + 3)
        assert k0 == round(task.depth * F_)
    return {q + i: d for i, d in enumerate(digits) if q + i < len(row)}


def parity_expected(task, row):
    exp, acc = {}, 0
    for p, t in enumerate(row):
        if t == 3:  # "="
            assert p == len(row) - 1
            exp[p] = acc + 1
        else:
            assert t in (1, 2)
            acc ^= t - 1
            if task.target == "running":
                exp[p] = acc + 1
    if task.target == "end":  # whole-string parity read right after the last bit
        exp[len(row) - 1] = acc + 1
    return exp


def modarith_expected(task, row):
    m = task.modulus
    sym = {1 + i: str(i) for i in range(m)}
    sym.update({m + 1: "+", m + 2: "-", m + 3: "*", m + 4: "(", m + 5: ")"})
    s = [sym.get(t, "") for t in row]  # pad -> ""
    exp = {}
    if task.target == "final":
        assert row[-1] == m + 6 and m + 6 not in row[:-1]
        exp[len(row) - 1] = eval("".join(s[:-1])) % m + 1
    else:
        assert "(" not in s
        for p in range(len(row)):
            if s[p] and s[p].isdigit():
                exp[p] = eval("".join(s[: p + 1])) % m + 1
    return exp


def copy_expected(task, row):
    sep = row.index(1)
    src = [t for t in row[:sep] if t != 0]
    assert all(2 <= t < task.vocab for t in src)
    return {sep + i: src[i] for i in range(len(src)) if sep + i < len(row)}


EXPECTED = {"mqar": mqar_expected, "passkey": passkey_expected, "parity": parity_expected,
            "modarith": modarith_expected, "copy": copy_expected}

CASES = [
    ("mqar", dict(vocab=256, seq_len=64, num_kv_pairs=8)),
    ("mqar", dict(vocab=128, seq_len=48, num_kv_pairs=6, kv_rule="scale")),
    ("passkey", dict(seq_len=64, depth=0.25)),
    ("needle", dict(seq_len=50, passkey_len=3, filler="repeat")),
    ("parity", dict(seq_len=32)),
    ("parity", dict(seq_len=33, target="final")),
    ("modarith", dict(seq_len=31)),
    ("modarith", dict(seq_len=30, target="final", modulus=7)),
    ("modarith", dict(seq_len=40, brackets=True)),
    ("copy", dict(seq_len=41, vocab=16)),
    # the paper protocol's formats (docs/paper-protocol.md)
    ("parity", dict(seq_len=30, target="end")),
    ("modarith", dict(seq_len=41, brackets=True, bracket_style="full")),
    ("modarith", dict(seq_len=30, brackets=True, bracket_style="full", ops="+-*", modulus=7)),
    ("modarith", dict(seq_len=26, target="final", ops="+-")),
    ("mqar", dict(vocab=256, seq_len=64, num_kv_pairs=8, query_gaps="power", echo_values=False)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def check_against_independent(task, b: Batch):
    fn = EXPECTED[task.name]
    for row, tgt in zip(b.inputs.tolist(), b.targets.tolist()):
        exp = fn(task, row)
        assert exp, "no scored positions"
        got = {p: t for p, t in enumerate(tgt) if t != IGN}
        assert got == exp


def oracle_logits(task, b):
    return F.one_hot(task.solve(b), task.vocab_size).float() * 20.0


# --------------------------------------------------------------------------- per-task behaviour


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_deterministic_and_seed_dependent(name, kw):
    t = make_task(name, **kw)
    a, b, c = t.batch(8, seed=11), t.batch(8, seed=11), t.batch(8, seed=12)
    assert a.inputs.dtype == torch.long and a.targets.dtype == torch.long
    assert a.inputs.shape == a.targets.shape == (8, t.seq_len)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    assert int(a.inputs.max()) < t.vocab_size and int(a.inputs.min()) >= 0
    # a fresh instance with the same config gives the same data
    assert torch.equal(make_task(name, **kw).batch(8, seed=11).inputs, a.inputs)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_answers_match_independent_solver(name, kw):
    t = make_task(name, **kw)
    check_against_independent(t, t.batch(16, seed=3))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_oracle_scores_100(name, kw):
    t = make_task(name, **kw)
    b = t.batch(16, seed=5)
    sol = t.solve(b)
    assert torch.equal(sol[b.mask], b.targets[b.mask])
    r = t.score(oracle_logits(t, b), b)
    assert r["acc"] == 1.0 and r["seq_acc"] == 1.0 and r["loss"] < 1e-3
    assert t.score(sol, b)["acc"] == 1.0  # predictions accepted as well
    if "final_acc" in r:
        assert r["final_acc"] == 1.0


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_random_predictor_scores_chance(name, kw):
    t = make_task(name, **kw)
    n_target = 6000
    b0 = t.batch(4, seed=0)
    per_batch = max(1, int(b0.mask.sum()) // 4)
    b = t.batch(max(8, n_target // per_batch), seed=9)
    g = torch.Generator().manual_seed(0)
    ans = t.answer_tokens
    preds = ans[torch.randint(len(ans), b.targets.shape, generator=g)]
    r = t.score(preds, b)
    p, n = t.chance, r["n_scored"]
    assert abs(r["acc"] - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (r, p)
    # uniform logits: loss is log(vocab)
    r2 = t.score(torch.zeros(*b.targets.shape, t.vocab_size), b)
    assert abs(r2["loss"] - math.log(t.vocab_size)) < 1e-4


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_lengths_beyond_default(name, kw):
    t = make_task(name, **kw)
    for mult in (2, 4, 8):
        L = t.seq_len * mult + 1
        b = t.batch(4, seed=7, seq_len=L)
        assert b.inputs.shape == (4, L)
        check_against_independent(t, b)
        assert t.score(oracle_logits(t, b), b)["acc"] == 1.0
        assert torch.equal(b.inputs, t.batch(4, seed=7, seq_len=L).inputs)


def test_mqar_length_rules():
    fixed = make_task("mqar", vocab=512, seq_len=64, num_kv_pairs=8)
    scale = make_task("mqar", vocab=512, seq_len=64, num_kv_pairs=8, kv_rule="scale")
    for L in (64, 256, 1024):
        n_fixed = int(fixed.batch(2, seed=1, seq_len=L).mask.sum(1)[0])
        n_scale = int(scale.batch(2, seed=1, seq_len=L).mask.sum(1)[0])
        assert n_fixed == 8  # same pairs, more filler
        assert n_scale == 8 * L // 64
    with pytest.raises(TaskError, match="seq_len"):
        fixed.batch(2, seed=1, seq_len=30)  # 8 pairs need >= 31


def test_mqar_defaults_match_design_spec():
    t = make_task({"task": "mqar", "vocab": 8192, "seq_len": 256, "num_kv_pairs": 32})
    b = t.batch(4, seed=0)
    assert t.vocab_size == 8192 and b.inputs.shape == (4, 256)
    assert (b.mask.sum(1) == 32).all()
    assert t.chance == pytest.approx(1 / 4096)


def test_passkey_depth_and_alias():
    assert TASKS["needle"] is TASKS["passkey"]
    assert make_task("needle").name == "passkey"
    for depth in (0.0, 0.5, 1.0):
        t = make_task("passkey", seq_len=100, depth=depth)
        row = t.batch(1, seed=0).inputs[0].tolist()
        k0, q = row.index(11), row.index(13)
        F_ = 101 - (2 * 5 + 3)
        assert k0 == round(depth * F_)
        if depth == 1.0:
            assert q == k0 + 5 + 2  # needle right before the question


def test_parity_final_acc_and_modes():
    run, fin = make_task("parity", seq_len=20), make_task("parity", seq_len=20, target="final")
    b = run.batch(64, seed=1)
    preds = run.solve(b).clone()
    preds[:, -1] = 3 - preds[:, -1]  # flip only the final answer
    r = run.score(preds, b)
    assert r["final_acc"] == 0.0 and r["seq_acc"] == 0.0 and r["acc"] == pytest.approx(19 / 20)
    bf = fin.batch(8, seed=1)
    assert (bf.mask.sum(1) == 1).all() and (bf.inputs[:, -1] == 3).all()
    assert run.vocab_size == 4 and run.chance == 0.5


def test_parity_bos_start_token():
    """bos: true puts the start token 4 first, one bit fewer; the answers are the parity of the bits only."""
    for target in ("running", "end", "final"):
        t = make_task("parity", seq_len=12, target=target, bos=True)
        b = t.batch(32, seed=3, min_len=4)
        assert t.vocab_size == 5 and (b.inputs[:, 0] == 4).all() and not b.mask[:, 0].any()
        bits = (b.inputs == 2).long()
        want = torch.cumsum(bits, 1) % 2 + 1
        assert torch.equal(b.targets[b.mask], want[b.mask])  # the parity of the bits so far, the start token not counted
        assert t.score(t.solve(b), b)["final_acc"] == 1.0
    short = make_task("parity", seq_len=12, target="end", bos=True).batch(64, seed=0, min_len=2)
    n_bits = ((short.inputs == 1) | (short.inputs == 2)).sum(1)
    assert n_bits.min() == 1 and (short.mask.sum(1) == 1).all()  # the shortest string: the start token and one bit
    with pytest.raises(TaskError, match="bos needs >= 2"):
        make_task("parity", seq_len=1, bos=True)
    with pytest.raises(TaskError, match="needs >= 5"):
        make_task("parity", seq_len=8, bos=True, vocab=4)

def test_modarith_precedence_example():
    t = make_task("modarith", modulus=5, target="final", seq_len=6)
    # "1 + 2 * 3 =" -> 7 mod 5 = 2 (precedence, as in Deletang et al.)
    toks = [2, 6, 3, 8, 4]
    assert t.evaluate(toks) == 2
    assert make_task("modarith", brackets=True).target == "final"
    assert make_task("modarith").target == "running"


def test_score_shapes_and_batch_args():
    t = make_task("copy", seq_len=16)
    b = t.batch(2, seed=0)
    with pytest.raises(TaskError):
        t.score(torch.zeros(2, 15, t.vocab_size), b)
    with pytest.raises(TaskError):
        t.score(torch.zeros(2, 16, 3), b)  # fewer classes than the vocab
    big = torch.zeros(2, 16, t.vocab_size + 50)  # padded model vocab is fine
    big[..., :t.vocab_size] = oracle_logits(t, b)
    assert t.score(big, b)["acc"] == 1.0
    for bad in (0, -3):
        with pytest.raises(TaskError, match="batch_size"):
            t.batch(bad, seed=0)
    moved = b.to("cpu")
    assert torch.equal(moved.inputs, b.inputs)


# --------------------------------------------------------------------------- seeds


def test_batch_seed_stable():
    s = batch_seed(1234, 10, 3)
    assert isinstance(s, int) and 0 <= s < 2 ** 63
    assert s == batch_seed(1234, 10, 3)
    seeds = {batch_seed(b, st, r) for b in (0, 1) for st in range(50) for r in range(8)}
    assert len(seeds) == 2 * 50 * 8
    with pytest.raises(TaskError):
        batch_seed(1, 2.5, 0)


def test_seeds_and_batches_stable_across_processes():
    code = (
        "import hashlib;from hybridlab.jobs.tasks import make_task, batch_seed;"
        "s=batch_seed(7,100,2);t=make_task('mqar',vocab=128,seq_len=64,num_kv_pairs=4);"
        "print(s, hashlib.sha1(t.batch(4,s).inputs.numpy().tobytes()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import hashlib

    s = batch_seed(7, 100, 2)
    t = make_task("mqar", vocab=128, seq_len=64, num_kv_pairs=4)
    here = f"{s} {hashlib.sha1(t.batch(4, s).inputs.numpy().tobytes()).hexdigest()}"
    assert out.stdout.strip() == here


# --------------------------------------------------------------------------- errors


def _one_line_error(fn, *words):
    with pytest.raises(TaskError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, (w, msg)
    assert isinstance(ei.value, ValueError)
    return msg


def test_bad_inputs_raise_one_line_errors():
    _one_line_error(lambda: make_task("mqr"), "mqr", "did you mean 'mqar'")
    _one_line_error(lambda: make_task("mqar", num_kv=3), "num_kv", "3", "did you mean 'num_kv_pairs'")
    _one_line_error(lambda: make_task("parity", seq_len=0), "seq_len", "0")
    _one_line_error(lambda: make_task("copy", seq_len=-4), "seq_len", "-4")
    _one_line_error(lambda: make_task("parity").batch(2, seed=0, seq_len=0), "seq_len", "0")
    _one_line_error(lambda: make_task("mqar", seq_len=64, num_kv_pairs=32), "num_kv_pairs", "32", "seq_len=64")
    _one_line_error(lambda: make_task("mqar", vocab=40, num_kv_pairs=32), "vocab", "40")
    _one_line_error(lambda: make_task("parity", vocab=3), "vocab", "3")
    _one_line_error(lambda: make_task("modarith", modulus=5, vocab=11), "vocab", "11")
    _one_line_error(lambda: make_task("passkey", vocab=10), "vocab", "10")
    _one_line_error(lambda: make_task("passkey", seq_len=8), "seq_len", "8")
    _one_line_error(lambda: make_task("passkey", depth=1.5), "depth", "1.5")
    _one_line_error(lambda: make_task("parity", target="last"), "target", "last")
    _one_line_error(lambda: make_task("modarith", brackets=True, target="running"), "target", "running")
    _one_line_error(lambda: make_task("mqar", seq_len="256"), "seq_len", "'256'")
    _one_line_error(lambda: make_task("mqar", num_kv_pairs=True), "num_kv_pairs", "True")
    _one_line_error(lambda: make_task("lm"), "path")
    _one_line_error(lambda: make_task("lm", path="/nonexistent/shards"), "path", "/nonexistent/shards")
    _one_line_error(lambda: make_task({"vocab": 3}), "task")


# --------------------------------------------------------------------------- token shards / lm

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\nSecond line, with   spaces.\n" * 30,
    "Ünïcödé: naïve café, 東京, emoji 🙂 and tabs\tend\n" * 20,
    "def f(x):\n    return x * 2  # code-ish text\n\n" * 25,
]


@pytest.fixture
def text_files(tmp_path):
    paths = []
    for i, t in enumerate(TEXTS):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    return paths


def _docs(shards: TokenShards):
    stream = np.concatenate([shards.tokens("train"), shards.tokens("val")]).tolist()
    docs, cur = [], []
    for t in stream:
        if t == shards.eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []  # stream ends with EOS
    return docs


@pytest.mark.parametrize("tokenizer,vocab_size", [("byte", None), ("bpe", 320)])
def test_shards_round_trip(tmp_path, text_files, tokenizer, vocab_size):
    out = tmp_path / f"shards_{tokenizer}"
    sh = prepare_shards(text_files, out, tokenizer=tokenizer, vocab_size=vocab_size,
                        shard_tokens=500, val_fraction=0.1)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 2 and index["dtype"] == "uint16"
    assert index["vocab_size"] == (257 if tokenizer == "byte" else 320)
    tok = load_tokenizer(out)
    assert [tok.decode(d) for d in _docs(sh)] == TEXTS
    assert sh.num_tokens("train") + sh.num_tokens("val") == index["total_tokens"]
    assert sh.num_tokens("val") == int(index["total_tokens"] * 0.1)
    if tokenizer == "bpe":
        assert index["total_tokens"] < sum(len(t.encode()) for t in TEXTS) * 0.8  # merges happened
    # memmaps reopen after pickling (Ray workers)
    import pickle

    sh2 = pickle.loads(pickle.dumps(sh))
    assert np.array_equal(sh2.tokens("val"), sh.tokens("val"))


def test_lm_task_windows_and_scores(tmp_path, text_files):
    out = tmp_path / "shards"
    prepare_shards(text_files, out, shard_tokens=700, val_fraction=0.2)
    t = make_task("lm", path=str(out), seq_len=64)
    tv = make_task("lm", path=str(out), seq_len=64, split="val")
    assert t.vocab_size == 257
    b = t.batch(8, seed=1)
    assert torch.equal(t.batch(8, seed=1).inputs, b.inputs)
    assert not torch.equal(t.batch(8, seed=2).inputs, b.inputs)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1]) and (b.targets != -100).all()
    # every window is a contiguous piece of its split's token stream
    sh = TokenShards(out)
    stream = sh.tokens("train").astype(np.int64)
    for row_in, row_t in zip(b.inputs.numpy(), b.targets.numpy()):
        w = np.concatenate([row_in, row_t[-1:]])
        hits = np.flatnonzero(stream[: len(stream) - 64] == w[0])
        assert any(np.array_equal(stream[h:h + 65], w) for h in hits)
    r = t.score(oracle_logits(t, b), b)
    assert r["acc"] == 1.0 and r["ppl"] < 1.01
    u = t.score(torch.zeros(8, 64, 257), b)
    assert u["ppl"] == pytest.approx(257, rel=1e-4)
    bv = tv.batch(4, seed=1, seq_len=128)  # longer than training
    assert bv.inputs.shape == (4, 128)
    with pytest.raises(TaskError, match="window"):
        t.batch(2, seed=0, seq_len=10_000)
    with pytest.raises(TaskError, match="split"):
        make_task("lm", path=str(out), split="test")


# --------------------------------------------------------------------------- the vectorised generators' distributions


def _match(expr, i, lpar, rpar):
    depth = 0
    for j in range(i, len(expr)):
        depth += (expr[j] == lpar) - (expr[j] == rpar)
        if depth == 0:
            return j
    raise AssertionError("unbalanced")


def test_modarith_bracketed_trees_have_the_grammars_distribution():
    # random style: the root is "( X )" with probability BRACKET_P = 0.25
    t = make_task("modarith", brackets=True, seq_len=40)
    rows = t.batch(4000, seed=5).inputs[:, :-1].tolist()
    root_bracket = sum(r[0] == t.LPAR and _match(r, 0, t.LPAR, t.RPAR) == len(r) - 1 for r in rows) / len(rows)
    assert abs(root_bracket - 0.25) < 0.03
    # full style (Deletang): the root "(L op R)" splits at a left size uniform in [1, n - 4]
    f = make_task("modarith", brackets=True, bracket_style="full", seq_len=21)  # n = 20 tokens, left in [1, 16]
    left_sizes = []
    for r in f.batch(3200, seed=6).inputs[:, :-1].tolist():
        assert r[0] == f.LPAR and r[-1] == f.RPAR
        j = _match(r, 1, f.LPAR, f.RPAR) if r[1] == f.LPAR else (2 if r[1] == f.MINUS else 1)
        left_sizes.append(j)  # the left part is r[1 : j + 1]
        assert r[j + 1] in (f.PLUS, f.MINUS)
    counts = torch.bincount(torch.tensor(left_sizes), minlength=17)[1:]
    assert counts.shape[0] == 16 and int(counts.min()) > 200 - 5 * 14 and int(counts.max()) < 200 + 5 * 14


def test_mqar_slots_and_keys_have_zoologys_distribution():
    # keys: distinct, uniform over the key range; power-law query slots: P(slot i) ~ i^(a-1), without replacement
    t = make_task("mqar", vocab=64, seq_len=40, num_kv_pairs=1, query_gaps="power", power_a=0.5, echo_values=False)
    b = t.batch(6000, seed=7)
    slots = (41 - 2) // 2
    q = (b.inputs[:, 2:] == b.inputs[:, :1]).float().argmax(1)  # the query key's offset in the region
    assert (q % 2 == 0).all()
    freq = torch.bincount(q // 2, minlength=slots).double() / 6000
    w = torch.arange(1, slots + 1, dtype=torch.float64) ** (0.5 - 1)
    assert (freq - w / w.sum()).abs().max() < 0.02
    many = make_task("mqar", vocab=64, seq_len=124, num_kv_pairs=31)  # N(N-1) > 2K: the shuffle branch
    for task in (many, make_task("mqar", vocab=8192, seq_len=512, num_kv_pairs=64)):
        k = task.batch(64, seed=8).inputs[:, 0:2 * task.num_kv_pairs:2]
        assert all(len(set(r)) == task.num_kv_pairs for r in k.tolist())
        assert int(k.min()) >= task.key_lo and int(k.max()) < task.val_lo
    first = many.batch(3000, seed=9).inputs[:, 0]
    counts = torch.bincount(first - many.key_lo, minlength=many.num_keys)
    assert int(counts.min()) > 3000 / 31 - 5 * 10 and int(counts.max()) < 3000 / 31 + 5 * 10


@pytest.mark.parametrize("name,kw", [("mqar", {"vocab": 64, "seq_len": 32, "num_kv_pairs": 4}),
                                     ("modarith", {"seq_len": 23, "target": "final"})])
def test_eval_scores_from_device_side_predictions_equal_scores_of_the_logits(name, kw):
    """run_evals keeps the logits on the device and hands the task (predictions, per-token loss): every
    metric equals scoring the logits themselves."""
    from hybridlab.jobs.evals import _host_scores

    t = make_task(name, **kw)
    b = t.batch(8, seed=3)
    torch.manual_seed(0)
    logits = torch.randn(8, b.inputs.shape[1], t.vocab_size + 5)
    preds, token_loss = _host_scores(lambda x: logits, t, b, "cpu")
    want, got = t.score(logits, b), t.score(preds, b, token_loss=token_loss)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k
    with pytest.raises(TaskError, match="classes"):
        _host_scores(lambda x: logits[..., :3], t, b, "cpu")
    with pytest.raises(TaskError, match="token_loss shape"):
        t.score(preds, b, token_loss=token_loss[:, :-1])
