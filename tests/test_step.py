"""The job's training step (jobs/step.py, issue 14): the model's own chunked loss, the fused-optimizer
choice, train.compile, and the plain-PyTorch baseline of ``bench train --baseline``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hybridlab.arch import HybridLM, load_model_spec

TINY = ["d_model=32", "blocks.m3.d_state=16", "blocks.m3.headdim=16", "layout=m3 mlp attn mlp", "vocab_size=64"]


def _model(sets=(), seed=0):
    torch.manual_seed(seed)
    return HybridLM(load_model_spec("zoo:tiny-hybrid", list(TINY) + list(sets)))


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_equals_cross_entropy_of_logits_values_and_grads(tied):
    """forward(targets=) (chunked LM head + CE, never T x V fp32 logits) == F.cross_entropy on the logits,
    with ignore_index -100 and packed documents (seq_idx); tied embeddings get one gradient."""
    a = _model([f"tie_embeddings={str(tied).lower()}"])
    b = _model([f"tie_embeddings={str(tied).lower()}"])
    b.load_state_dict(a.state_dict())
    assert (a.lm_head.weight is a.embed.weight) == tied
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 64, (2, 24), generator=g)
    tgt = torch.randint(0, 64, (2, 24), generator=g)
    tgt[0, :5] = -100
    tgt[1, -3:] = -100
    seq_idx = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    loss = a(tok, seq_idx=seq_idx, targets=tgt)
    ref = F.cross_entropy(b(tok, seq_idx=seq_idx).flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (loss.item(), ref.item())
    loss.backward()
    ref.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    assert torch.equal(a.loss(tok, tgt, seq_idx), loss.detach())  # loss() is the same path
    h = a(tok, return_hidden=True)
    assert h.shape == (2, 24, 32) and torch.allclose(a.lm_head(h), a(tok))


def test_optimizer_choice_and_param_groups():
    from hybridlab.jobs.spec import TrainSpec
    from hybridlab.jobs.step import DEEPSPEED, TORCH, TORCH_FUSED, make_optimizer, optimizer_choice, param_groups

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for z in (0, 1, 2):
        assert optimizer_choice(TrainSpec(zero_stage=z), cuda) == TORCH_FUSED
        assert optimizer_choice(TrainSpec(zero_stage=z), cpu) == TORCH
    assert optimizer_choice(TrainSpec(zero_stage=3), cuda) == DEEPSPEED
    user = TrainSpec(zero_stage=2, deepspeed={"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}})
    assert optimizer_choice(user, cuda) == DEEPSPEED and make_optimizer(_model(), user, cuda) is None
    model = _model()
    t = TrainSpec(lr=2e-3, betas=[0.8, 0.9], weight_decay=0.05)
    opt = make_optimizer(model, t, cpu)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["betas"] == (0.8, 0.9)
    want = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in want] == [0.05, 0.0]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g["params"]] for g in want]


def _job_with_train(tmp_path, train_yaml: str):
    """A small job file whose ``train:`` mapping is ``train_yaml``, loaded."""
    from hybridlab.jobs.spec import load_job

    p = tmp_path / "job.yaml"
    p.write_text("model: zoo:tiny-hybrid\ndata: {task: mqar, vocab: 64, seq_len: 32, num_kv_pairs: 2}\n"
                 f"train: {{{train_yaml}}}\n")
    return load_job(str(p))


def test_train_compile_key_is_validated(tmp_path):
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.step import use_compile

    def job(value):
        return _job_with_train(tmp_path, f"steps: 2, compile: {value}")

    assert job("auto").spec.train.compile == "auto"
    assert job("true").spec.train.compile is True and job("false").spec.train.compile is False
    with pytest.raises(SpecError) as e:
        job("yes please")
    assert "train.compile" in str(e.value) and "yes please" in str(e.value)
    assert use_compile("auto", torch.device("cpu")) is False and use_compile("auto", torch.device("cuda")) is True
    assert use_compile(True, torch.device("cpu")) is True and use_compile(False, torch.device("cuda")) is False
    assert use_compile("auto", torch.device("cuda"), zero_stage=3) is False and use_compile(True, torch.device("cuda"), 3)



def test_train_compile_mode_key_and_options(tmp_path, cli):
    """train.compile_mode takes torch.compile's modes (reduce-overhead: CUDA graphs) and nothing else; the
    compile keywords of each mode; `bench train --compile-mode` refuses a bad mode in one line, exit 2."""
    from hybridlab.arch.specio import SpecError
    from hybridlab.jobs.spec import load_job
    from hybridlab.jobs.step import compile_options

    def job(value):
        return _job_with_train(tmp_path, f"steps: 2, compile_mode: {value}")

    assert job("reduce-overhead").spec.train.compile_mode == "reduce-overhead"
    assert load_job({"model": "zoo:tiny-hybrid", "data": {"task": "mqar", "vocab": 64, "seq_len": 32,
                                                          "num_kv_pairs": 2}}).spec.train.compile_mode == "default"
    with pytest.raises(SpecError) as e:
        job("cudagraphs")
    assert "train.compile_mode" in str(e.value) and "cudagraphs" in str(e.value) and "reduce-overhead" in str(e.value)
    # a curriculum's stage lengths are compiled one static shape each (dynamic=False), in every mode
    assert compile_options("default") == {"dynamic": False}
    assert compile_options("reduce-overhead") == {"mode": "reduce-overhead", "dynamic": False}
    assert compile_options("reduce-overhead", backend="aot_eager") == {"backend": "aot_eager", "dynamic": False}
    r = cli("bench", "train", "zoo:tiny-hybrid", "--compile-mode", "fastest")
    assert r.returncode == 2 and "--compile-mode" in r.stderr and "fastest" in r.stderr and "Traceback" not in r.stderr

def _engine_losses(compile_setting, steps=3, backend="aot_eager", precision="fp32", deepspeed=None):
    from hybridlab.jobs.data import RandomTokens
    from hybridlab.jobs.spec import TrainSpec
    from hybridlab.jobs.step import StepStats, TrainStep, build_engine
    from hybridlab.jobs.throughput import _init_distributed

    cpu = torch.device("cpu")
    _init_distributed(cpu)
    torch._dynamo.reset()
    model = _model()
    train = TrainSpec(steps=steps, micro_batch=2, grad_accum=2, lr=1e-2, warmup=0, zero_stage=2, precision=precision,
                      compile=compile_setting, deepspeed=deepspeed or {})
    engine, _ = build_engine(model, train, 1, cpu, compile_backend=backend)
    step, stats = TrainStep(engine, cpu), StepStats(cpu)
    stream = RandomTokens(64, 16, 2, seed=0)
    stream_batches = [stream.get(1, m) for m in range(2)]
    losses = []
    for s in range(1, steps + 1):
        out = step([stream_batches[m] for m in range(2)], keep_predictions=s == steps)  # one batch: the loss falls
        stats.add(s, out.loss)
        losses.append(stats.sync().loss)
    return losses, step, out


def test_compiled_step_trains_like_eager():
    """train.compile=true (aot_eager here: no C++ build) trains a tiny HybridLM through the job's engine and
    TrainStep with the eager step's losses; the first step's time is reported; predictions at a log point."""
    from torch._dynamo.utils import counters

    eager, e_step, e_out = _engine_losses(False)
    counters.clear()
    comp, c_step, c_out = _engine_losses(True)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # dynamo did compile the loss path
    assert e_step.compile_s is None and not e_step.compiled
    assert c_step.compiled and c_step.compile_s is not None and c_step.compile_s > 0
    assert eager[-1] < eager[0]  # it trains
    assert comp == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert e_out.predictions.shape == (2, 16) and e_out.predictions.dtype == torch.int64
    assert (c_out.predictions == e_out.predictions).float().mean() > 0.95  # arg-max ties aside, the same ids


def test_plain_pytorch_baseline_runs_at_tiny_size():
    from hybridlab.jobs.baseline import measure_baseline

    sets = TINY
    for comp in (False, True):
        r = measure_baseline("zoo:tiny-hybrid", seq_len=16, micro_batch=2, steps=2, warmup=1, compile=comp,
                             overrides=sets, compile_backend="aot_eager")
        assert {"tokens_per_s", "step_ms", "peak_memory_gib", "mfu", "compile", "final_loss"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["compile"] is comp
        assert 0 < r["final_loss"] < 10 and r["peak_memory_gib"] > 0  # ln(64) ~ 4.2 at the start


def test_log_point_scores_predictions_taken_on_device_as_the_logits_would():
    """train/acc from the arg-max ids (what the worker sends to the host) equals the score of the logits
    themselves, padded vocabulary and unscored positions included; a HybridLM's ids come from its LM head
    over the scored positions only, scored as its full logits would be; only log points (and every rank
    under ZeRO-3, whose forward is collective) run the extra forward."""
    from hybridlab.jobs.step import keeps_predictions, predictions
    from hybridlab.jobs.tasks import make_task

    task = make_task("mqar", vocab=64, seq_len=32, num_kv_pairs=4)
    batch = task.batch(8, seed=3)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 32, 80, generator=g)  # a vocabulary padded past the task's 64
    logits[:4, :, 70] += 5.0  # some arg-maxes land in the padding: wrong, and counted so both ways
    right = batch.targets.clamp(min=0)
    logits[4:].scatter_(-1, right[4:, :, None], 20.0)  # half the rows all right
    ids = predictions(lambda x: logits.to(torch.bfloat16), batch.inputs, batch.targets)
    assert ids.dtype == torch.int64 and ids.shape == (8, 32)
    want = task.score(logits, batch)
    got = task.score(ids, batch)
    assert got["acc"] == want["acc"] and got["seq_acc"] == want["seq_acc"] and 0 < got["acc"] < 1
    m = _model().eval()
    with torch.no_grad():
        ids = predictions(m, batch.inputs, batch.targets)
        full = m(batch.inputs)
    assert ids.shape == (8, 32) and (ids == -1).any()  # the head ran over the scored positions only
    scored = batch.targets != -100
    assert torch.equal(ids[scored], full.argmax(-1)[scored])  # the same ids where the task scores them
    by_ids, by_logits = task.score(ids, batch), task.score(full, batch)
    assert by_ids == {k: by_logits[k] for k in by_ids}  # acc, seq_acc, scaled_acc, ... (loss needs the logits)
    assert [keeps_predictions(lp, r, z) for lp, r, z in ((True, 0, 2), (True, 1, 2), (True, 1, 3), (False, 0, 3))] == \
        [True, False, True, False]


def test_one_fp32_worker_runs_zero_1_2_as_stage_0_unless_the_user_says_otherwise():
    from hybridlab.jobs.spec import TrainSpec
    from hybridlab.jobs.step import build_engine, engine_zero_stage
    from hybridlab.jobs.throughput import _init_distributed

    assert [engine_zero_stage(TrainSpec(zero_stage=z), 1) for z in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [engine_zero_stage(TrainSpec(zero_stage=z), 4) for z in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert [engine_zero_stage(TrainSpec(zero_stage=z, precision="bf16"), 1) for z in (0, 1, 2, 3)] == [0, 1, 2, 3]
    forced = TrainSpec(zero_stage=2, deepspeed={"zero_optimization": {"stage": 2}})
    assert engine_zero_stage(forced, 1) == 2
    _init_distributed(torch.device("cpu"))
    for t, want in ((TrainSpec(zero_stage=2, precision="fp32", compile=False), 0), (forced, 2)):
        engine, _ = build_engine(_model(), dataclasses_replace(t, precision="fp32", compile=False), 1, torch.device("cpu"))
        assert engine.zero_optimization_stage() == want and engine.enable_backward_allreduce == (want != 0)
    # the lean engine (stage 0, no all-reduce) trains exactly like ZeRO-2, with gradient accumulation
    lean, _, _ = _engine_losses(False)
    zero2, _, _ = _engine_losses(False, deepspeed={"zero_optimization": {"stage": 2}})
    assert lean == pytest.approx(zero2, rel=1e-5)



def test_bf16_mixed_keeps_fp32_parameters_and_runs_the_forward_under_autocast(tmp_path):
    """precision: bf16-mixed — fp32 parameters (no master copy), DeepSpeed's torch autocast over the forward
    (the Linear layers compute in bf16), ZeRO 1-2 on one worker as stage 0 like fp32; it trains, close to fp32."""
    from hybridlab.jobs.preflight import model_state_bytes
    from hybridlab.jobs.spec import TrainSpec
    from hybridlab.jobs.step import build_engine, deepspeed_config, engine_zero_stage
    from hybridlab.jobs.throughput import _init_distributed

    assert _job_with_train(tmp_path, "steps: 2, precision: bf16-mixed").spec.train.precision == "bf16-mixed"
    cfg = deepspeed_config(TrainSpec(precision="bf16-mixed"), 1)
    assert cfg["torch_autocast"]["enabled"] and not cfg["bf16"]["enabled"]
    assert not deepspeed_config(TrainSpec(precision="bf16"), 1)["torch_autocast"]["enabled"]
    assert [engine_zero_stage(TrainSpec(zero_stage=z, precision="bf16-mixed"), 1) for z in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert model_state_bytes(1000, 0, 1, "bf16-mixed") == model_state_bytes(1000, 0, 1, "fp32") == 16000
    _init_distributed(torch.device("cpu"))
    engine, _ = build_engine(_model(), TrainSpec(zero_stage=2, precision="bf16-mixed", compile=False), 1,
                             torch.device("cpu"))
    assert engine.zero_optimization_stage() == 0 and engine.torch_autocast_enabled()
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    seen = []
    hook = engine.module.layers[0].mixer.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tok = torch.randint(0, 64, (2, 17))
    engine(tok[:, :-1], targets=tok[:, 1:])
    assert seen == [torch.bfloat16]
    # the log point's forward for train/acc goes to the module itself: under the engine's autocast too
    from hybridlab.jobs.step import TrainStep
    from hybridlab.jobs.tasks import Batch

    seen.clear()
    out = TrainStep(engine, torch.device("cpu"))([Batch(inputs=tok[:, :-1], targets=tok[:, 1:])], keep_predictions=True)
    hook.remove()
    assert out.predictions is not None and seen == [torch.bfloat16, torch.bfloat16]  # the predictions, then the step
    mixed, _, _ = _engine_losses(False, precision="bf16-mixed")
    full, _, _ = _engine_losses(False, precision="fp32")
    assert mixed[-1] < mixed[0] and mixed == pytest.approx(full, abs=0.05)

def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("zoo", ["tiny-hybrid", "hybrid-1in4-180m"])
def test_training_loss_path_compiles_on_cuda(zoo):
    """The job's compiled path (compile_training: inductor over forward(targets=), the chunked CE inside) under
    bf16 autocast: one graph, no breaks, loss and gradients close to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HybridLM(load_model_spec(f"zoo:{zoo}")).cuda()
    tok = torch.randint(0, model.spec.vocab_size, (2, 512), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tok[:, :-1], targets=tok[:, 1:])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = step()
    model.compile_training()
    counters.clear()
    loss, grads = step()
    assert not dict(counters["graph_break"]) and counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(loss, eager_loss, rtol=2e-2)
    for a, b in zip(grads, eager_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)) < 5e-2


def test_a_cpu_engine_starts_past_a_stale_extension_build_lock(tmp_path):
    """DeepSpeed's CPU comm would JIT-build its shared-memory op and wait on torch's build lock file; one
    left by a worker killed mid-build hung every later worker (CI, 2026-12-01). The job's engine starts
    without building it: a stale lock in the extensions folder is never waited on, nothing is built."""
    import subprocess
    import sys

    ext = tmp_path / "torch_extensions"
    stale = ext / "deepspeed_shm_comm"  # with $TORCH_EXTENSIONS_DIR set, torch builds in <dir>/<name>
    stale.mkdir(parents=True)
    (stale / "lock").write_text("")  # what a killed build leaves
    code = f"""
import torch
from hybridlab.arch import HybridLM, load_model_spec
from hybridlab.jobs.step import build_engine
from hybridlab.jobs.throughput import _init_distributed
from hybridlab.jobs.spec import TrainSpec
_init_distributed(torch.device("cpu"))
model = HybridLM(load_model_spec("zoo:tiny-hybrid", {TINY!r}))
engine, _ = build_engine(model, TrainSpec(steps=1, micro_batch=1, zero_stage=2, compile="false"), 1, torch.device("cpu"))
print("engine up")
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), MASTER_PORT=str(20000 + os.getpid() % 20000))
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the engine waited on the stale build lock")
    assert r.returncode == 0 and "engine up" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in stale.iterdir()) == ["lock"]  # nothing was built


def test_scored_positions_pick_every_scored_token_and_pad_with_unscored_ones():
    from hybridlab.jobs.step import scored_positions

    t = torch.full((3, 40), -100)
    t[0, [3, 17, 39]] = 5
    t[1, 10] = 2
    t[2, [0, 1, 2, 3, 4, 5, 6, 7, 8]] = 1  # 9 scored: k rounds up to 16
    at = scored_positions(t)
    assert at.shape == (3, 16) and at.dtype == torch.int64
    for row, want in enumerate(([3, 17, 39], [10], list(range(9)))):
        assert at[row, :len(want)].tolist() == want
        assert (t[row, at[row, len(want):]] == -100).all() and len(set(at[row].tolist())) == 16
    assert scored_positions(torch.zeros(2, 40, dtype=torch.long)) is None  # all scored: the head over all of them
    assert scored_positions(torch.full((2, 12), -100)) is None  # k's floor of 8 is more than half of 12
    assert scored_positions(t.cuda() if torch.cuda.is_available() else t.to("meta")) is None  # never syncs a device


@pytest.mark.parametrize("seq_idx", [False, True])
def test_loss_over_scored_positions_equals_the_full_loss_values_and_grads(seq_idx):
    """HybridLM(..., targets=, scored_at=) runs the LM head over the scored positions only: the same loss and
    gradients as over every position (MQAR-like targets: a few scored tokens a row)."""
    from hybridlab.jobs.step import scored_positions

    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(2)
    tok = torch.randint(0, 64, (3, 48), generator=g)
    tgt = torch.full((3, 48), -100)
    for row, cols in enumerate(([5, 20, 47], [30], [1, 2, 40, 41, 42])):
        tgt[row, cols] = torch.randint(0, 64, (len(cols),), generator=g)
    kw = {"seq_idx": torch.tensor([[0] * 20 + [1] * 28] * 3)} if seq_idx else {}
    at = scored_positions(tgt)
    assert at is not None and at.shape == (3, 8)
    loss = a(tok, targets=tgt, scored_at=at, **kw)
    ref = b(tok, targets=tgt, **kw)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (loss.item(), ref.item())
    loss.backward()
    ref.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    with pytest.raises(ValueError, match="scored_at"):
        a(tok, scored_at=at)
    with pytest.raises(ValueError, match="scored_at"):
        a(tok, targets=tgt, scored_at=at[0])


@pytest.mark.parametrize("name,kw", [("mqar", {"vocab": 64, "seq_len": 48, "num_kv_pairs": 4}),
                                     ("parity", {"seq_len": 24})])  # MQAR: a few scored; parity: all scored
def test_evals_of_a_hybrid_lm_over_its_scored_positions_equal_evals_of_its_full_logits(name, kw):
    """run_evals puts only a HybridLM's scored positions through its LM head: every metric, the loss
    included, equals scoring the logits of every position (the model behind a plain callable)."""
    from hybridlab.jobs.evals import _host_scores, run_evals
    from hybridlab.jobs.tasks import make_task

    m = _model().eval()
    t = make_task(name, **kw)
    b = t.batch(6, seed=4)
    preds, loss = _host_scores(m, t, b, "cpu")
    assert preds.shape == loss.shape == b.targets.shape
    evals = [{"task": name, "batch_size": 6, "batches": 2, **kw}]
    got = run_evals(m, evals, {"task": name, **kw})
    want = run_evals(lambda x: m(x), evals, {"task": name, **kw})
    assert set(got) == set(want) and got
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def test_compiled_loss_over_scored_positions_has_no_graph_break():
    from torch._dynamo.utils import counters

    from hybridlab.jobs.step import scored_positions

    torch._dynamo.reset()
    a = _model()
    tok = torch.randint(0, 64, (2, 32))
    tgt = torch.full((2, 32), -100)
    tgt[:, [7, 15, 31]] = 3
    at = scored_positions(tgt)
    eager = a(tok, targets=tgt, scored_at=at)
    counters.clear()
    a.compile_training(backend="aot_eager")
    comp = a(tok, targets=tgt, scored_at=at)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(comp, eager, rtol=1e-5, atol=1e-6)


def test_a_compiled_step_keeps_compiling_past_dynamos_default_of_8_shapes():
    """A curriculum of more than 8 stage lengths: every length gets its own graph (dynamo's default limit, 8,
    would silently run the later, longer stages eager)."""
    from torch._dynamo.utils import counters

    from hybridlab.jobs.data import RandomTokens
    from hybridlab.jobs.spec import TrainSpec
    from hybridlab.jobs.step import TrainStep, build_engine
    from hybridlab.jobs.throughput import _init_distributed

    cpu = torch.device("cpu")
    _init_distributed(cpu)
    torch._dynamo.reset()
    train = TrainSpec(steps=10, micro_batch=2, lr=1e-3, warmup=0, zero_stage=0, precision="fp32", compile=True)
    engine, _ = build_engine(_model(["layout=m3"]), train, 1, cpu, compile_backend="aot_eager")
    step = TrainStep(engine, cpu)
    counters.clear()
    lengths = [4, 6, 8, 10, 12, 14, 16, 18, 20, 24]
    for i, L in enumerate(lengths):
        step([RandomTokens(64, L, 2, seed=i).get(1)])
    assert counters["stats"]["unique_graphs"] == len(lengths), dict(counters["stats"])
