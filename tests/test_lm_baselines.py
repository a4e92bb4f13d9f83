"""Replay, EWC and LwF through the model interface (strategies/replay_lm.py, ewc_lm.py, lwf_lm.py): the
baselines of O-LoRA's tables on the same text streams, where Avalanche's refuse language models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import gen, killed_and_resumed, run_config
from lightning.fabric import Fabric
from torch import nn
from torch.nn import functional as F

from clbench.config import ConfigError
from clbench.context import Context
from clbench.experiment import run
from clbench.models.base import ContinualModel
from clbench.streams.batches import TensorBatchSource, batch_len
from clbench.streams.text import TextSample
from strategies import build_strategy, strategy_config
from strategies.lwf_lm import distillation
from strategies.replay_lm import share

pytest.importorskip("peft")

FAST = ("model=causal_lm", "benchmark=keyword_topics", "benchmark.n_tasks=2", "benchmark.per_class=8",
        "benchmark.max_test_per_task=4", "engine=lm", "engine.epochs=2", "engine.lr=0.01", "engine.eval_batch_size=16",
        "model.max_new_tokens=3", "model.max_length=96")


# ------------------------------------------------------------------------------------------------ helpers


class Softmax(ContinualModel):
    """A linear softmax classifier on ``(x, y, t)``: per-sample gradients of its loss have a closed form."""

    def __init__(self, d: int = 5, c: int = 3) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(c, d, generator=gen(1), dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(c, generator=gen(2), dtype=torch.float64))

    def outputs(self, batch):
        return batch[0] @ self.W.T + self.b

    def loss(self, batch):
        return F.cross_entropy(self.outputs(batch), batch[1])


def _ctx(module: nn.Module, source=None, n_tasks: int = 3, experience: int = 0) -> Context:
    stream = SimpleNamespace(spec=SimpleNamespace(n_tasks=n_tasks))
    return Context(model=module, module=module, fabric=Fabric(accelerator="cpu", devices=1), stream=stream,  # type: ignore[arg-type]
                   seed=0, batch_size=4, sources=None, train_source=source, experience=experience)


def _xy(n: int, seed: int, d: int = 5, width: int | None = None) -> TensorBatchSource:
    g = gen(seed)
    x = torch.randn(n, width or d, generator=g, dtype=torch.float64)
    return TensorBatchSource(x, torch.randint(0, 3, (n,), generator=g), torch.full((n,), seed))


def _lm():
    from clbench.models.lm import LMConfig, build_lm

    torch.manual_seed(0)
    return build_lm(LMConfig(name="causal_lm", lora_dropout=0.0))


def _text(model, task: int, n: int = 6) -> TensorBatchSource:
    words = ["apple", "river", "tiger"]
    samples = [TextSample(f"Task{task} word{k} topic{k % 3}{' long' * task}\nAnswer:", words[(k + task) % 3], task)
               for k in range(n)]
    return TensorBatchSource(**model.collate(samples))


def _rows(batch) -> set[tuple[float, ...]]:
    x = batch[0] if isinstance(batch, tuple) else batch["input_ids"]
    return {tuple(r.tolist()) for r in x}


def _finish(strategy, ctx: Context, t: int, source) -> None:
    ctx.experience, ctx.train_source = t, source
    strategy.before_experience(ctx)
    strategy.attach(ctx)
    strategy.detach(ctx)
    strategy.after_experience(ctx)


# ------------------------------------------------------------------------------------------------ replay


def test_equal_shares_sum_to_the_memory_and_never_grow():
    for M in (3, 10, 17, 200):
        for t in range(1, min(M, 15) + 1):
            counts = share(M, t)
            assert sum(counts) == M and max(counts) - min(counts) <= 1
            if t > 1:
                assert all(a <= b for a, b in zip(counts, share(M, t - 1), strict=False))
    assert share(10, 3) == [4, 3, 3]


def test_the_memory_holds_each_tasks_equal_share_of_its_own_samples():
    strategy = build_strategy(strategy_config("replay_lm", memory_size=10))
    model = Softmax()
    ctx = _ctx(model)
    sources = [_xy(20, 0), _xy(20, 1), _xy(3, 2)]  # the third task has fewer samples than its share
    before = None
    for t, source in enumerate(sources):
        _finish(strategy, ctx, t, source)
        expected = [min(c, len(s)) for c, s in zip(share(10, t + 1), sources, strict=False)]
        assert strategy.counts() == expected
        for j, stored in enumerate(strategy.memory):
            assert _rows(stored) <= _rows(sources[j].all())  # its own samples, distinct
            assert len(_rows(stored)) == batch_len(stored)
            if before is not None and j < len(before):  # a shrinking task keeps a prefix of what it held
                assert torch.equal(stored[0], before[j][0][: batch_len(stored)])
        before = list(strategy.memory)
    assert strategy.counts() == [4, 3, 3] and strategy.diagnostics() == {"memory/samples": 10.0}


def test_the_replayed_loss_is_the_models_loss_on_memory_samples():
    """On an LM: the penalty is w·model.loss of a batch of stored samples of the earlier task (the same batch the
    strategy draws again from the same generator), and its gradient reaches the LoRA parameters."""
    model = _lm()
    strategy = build_strategy(strategy_config("replay_lm", memory_size=4, memory_weight=0.5))
    ctx = _ctx(model, n_tasks=2)
    old = _text(model, 0)
    _finish(strategy, ctx, 0, old)
    assert strategy.counts() == [4]
    ctx.experience, ctx.train_source = 1, _text(model, 1)
    strategy.attach(ctx)
    batch = ctx.train_source.all()
    assert strategy.penalty(ctx, batch) is not None
    strategy._draws = None  # the generator restarts: the same draw again
    penalty = strategy.penalty(ctx, batch)
    strategy._draws = None
    memory = strategy.memory_batch(ctx, ctx.batch_size)
    assert batch_len(memory) == 4 and _rows(memory) <= _rows(old.all())
    torch.testing.assert_close(penalty, 0.5 * model.loss(memory), rtol=1e-6, atol=0)
    penalty.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_memory_batches_mix_tasks_whose_rows_stack_and_the_memory_survives_a_checkpoint():
    strategy = build_strategy(strategy_config("replay_lm", memory_size=40, batch_size_mem=30))
    ctx = _ctx(Softmax(), n_tasks=4)
    for t in range(2):
        _finish(strategy, ctx, t, _xy(50, t))
    ctx.experience, ctx.epoch = 2, 0
    strategy.attach(ctx)
    draw = strategy.memory_batch(ctx, 30)
    assert set(draw[2].tolist()) == {0, 1}  # equal shapes: one pool over both tasks
    _finish(strategy, ctx, 2, _xy(50, 2, width=7))  # another width: its own group
    assert len(strategy._groups) == 2 and strategy.counts() == [14, 13, 13]
    ctx.experience = 3
    strategy.attach(ctx)
    draws = [strategy.memory_batch(ctx, 30) for _ in range(3)]
    restored = build_strategy(strategy_config("replay_lm", memory_size=40, batch_size_mem=30))
    restored.load_state_dict(strategy.state_dict())
    restored.attach(ctx)
    assert restored.counts() == strategy.counts()
    for a, b in zip(draws, [restored.memory_batch(ctx, 30) for _ in range(3)], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    with pytest.raises(ConfigError, match=r"'strategy\.memory_size'.*>= the 4 experiences"):
        build_strategy(strategy_config("replay_lm", memory_size=3)).setup(ctx)


# ------------------------------------------------------------------------------------------------ EWC


def test_the_fisher_is_the_mean_squared_per_sample_gradient():
    """The empirical Fisher of a softmax classifier against the closed form: ∂ℓ_n/∂W = (p_n − e_{y_n}) x_nᵀ,
    ∂ℓ_n/∂b = p_n − e_{y_n}."""
    model = Softmax()
    source = _xy(12, 0)
    strategy = build_strategy(strategy_config("ewc_lm", fisher_samples=None))
    _finish(strategy, _ctx(model), 0, source)
    x, y, _ = source.all()
    with torch.no_grad():
        r = torch.softmax(x @ model.W.T + model.b, 1) - F.one_hot(y, 3)
    expected_W = torch.einsum("nc,nd->ncd", r, x).square().mean(0)
    torch.testing.assert_close(strategy.last_fisher["W"], expected_W, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(strategy.last_fisher["b"], r.square().mean(0), rtol=1e-10, atol=1e-12)
    assert strategy.diagnostics()["ewc/params"] == 18.0


def test_the_penalty_is_zero_at_the_anchor_with_gradient_lambda_f_delta():
    model = Softmax()
    strategy = build_strategy(strategy_config("ewc_lm", ewc_lambda=3.0, fisher_samples=None))
    ctx = _ctx(model)
    _finish(strategy, ctx, 0, _xy(12, 0))
    Fw, Fb = strategy.last_fisher["W"].double(), strategy.last_fisher["b"].double()
    ctx.experience = 1
    strategy.attach(ctx)
    assert float(strategy.penalty(ctx, None).detach()) == 0.0
    dW, db = torch.randn(3, 5, generator=gen(7), dtype=torch.float64), torch.randn(3, generator=gen(8),
                                                                                   dtype=torch.float64)
    with torch.no_grad():
        model.W += dW
        model.b += db
    penalty = strategy.penalty(ctx, None)
    assert float(penalty.detach()) == pytest.approx(1.5 * float((Fw * dW**2).sum() + (Fb * db**2).sum()), rel=1e-5)
    penalty.backward()
    torch.testing.assert_close(model.W.grad, 3.0 * Fw * dW, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(model.b.grad, 3.0 * Fb * db, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_two_tasks_penalty_is_the_sum_of_the_papers_quadratics(mode):
    """separate: (λ/2)·Σ_k F_k (θ − θ*_k)² (Kirkpatrick et al. Eq. 3, one term per task); online:
    (λ/2)·(γF_0 + F_1)(θ − θ*_1)²."""
    model = Softmax()
    strategy = build_strategy(strategy_config("ewc_lm", ewc_lambda=2.0, mode=mode, decay_factor=0.5,
                                              fisher_samples=None))
    ctx = _ctx(model)
    fishers, anchors = [], []
    for t in range(2):
        with torch.no_grad():
            model.W += torch.randn(3, 5, generator=gen(20 + t), dtype=torch.float64)
        _finish(strategy, ctx, t, _xy(10, t))
        fishers.append(strategy.last_fisher["W"].double())
        anchors.append(model.W.detach().clone())
    ctx.experience = 2
    strategy.attach(ctx)
    with torch.no_grad():
        model.W += torch.randn(3, 5, generator=gen(30), dtype=torch.float64)
    W = model.W.detach()
    if mode == "separate":
        expected = sum(float((Fk * (W - Wk) ** 2).sum()) for Fk, Wk in zip(fishers, anchors, strict=True))
    else:
        expected = float(((0.5 * fishers[0] + fishers[1]) * (W - anchors[1]) ** 2).sum())
    # b never moved, so its terms are 0; λ/2 = 1
    assert float(strategy.penalty(ctx, None).detach()) == pytest.approx(expected, rel=1e-9)


def test_ewc_on_lora_anchors_the_adapter_only_and_refuses_a_parameter_that_stopped_training():
    model = _lm()
    strategy = build_strategy(strategy_config("ewc_lm", fisher_samples=3))
    ctx = _ctx(model)
    _finish(strategy, ctx, 0, _text(model, 0))
    assert strategy.importance and all(".lora_A." in k or ".lora_B." in k for k in strategy.importance)
    assert all(bool(torch.isfinite(v).all()) and float(v.min()) >= 0 for v in strategy.importance.values())
    assert any(float(v.max()) > 0 for v in strategy.importance.values())
    next(p for n, p in model.named_parameters() if n in strategy.importance).requires_grad_(False)
    with pytest.raises(ConfigError, match=r"one shared set of trainable parameters"):
        strategy.attach(ctx)


# ------------------------------------------------------------------------------------------------ LwF


def test_the_distillation_is_the_kl_of_the_softened_distributions():
    a, b = torch.randn(4, 6, generator=gen(0)), torch.randn(4, 6, generator=gen(1))
    p, q = torch.softmax(a / 3.0, 1), torch.softmax(b / 3.0, 1)
    explicit = sum(float(q[i, j] * math.log(q[i, j] / p[i, j])) for i in range(4) for j in range(6)) / 4
    assert float(distillation(a, b, 3.0)) == pytest.approx(explicit, rel=1e-5)
    assert float(distillation(a, a, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_lwf_is_zero_at_the_old_model_and_distils_from_a_snapshot_of_the_adapter():
    model = _lm()
    strategy = build_strategy(strategy_config("lwf_lm", alpha=1.0, temperature=2.0))
    ctx = _ctx(model)
    source = _text(model, 0)
    batch = source.all()
    assert (strategy.attach(ctx), strategy.penalty(ctx, batch))[1] is None  # nothing on the first task
    _finish(strategy, ctx, 0, source)
    assert strategy.teacher and all(".lora_" in k for k in strategy.teacher)  # the base model is not copied
    ctx.experience = 1
    strategy.attach(ctx)
    assert abs(float(strategy.penalty(ctx, batch).detach())) < 1e-6
    with torch.no_grad():
        before = model.target_logits(batch)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen(5)))
        live = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(strategy.teacher_logits(ctx, batch), before, rtol=0, atol=1e-6)
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())  # the teacher pass changed nothing
    loss = model.loss(batch)  # a graph built before the teacher pass, as in the engine
    penalty = strategy.penalty(ctx, batch)
    assert float(penalty.detach()) > 1e-4
    (loss + penalty).backward()
    assert model.training


@pytest.mark.parametrize("family", ["causal_lm", "seq2seq_lm"])
def test_the_target_logits_of_an_lm_are_its_answer_positions(family):
    """One row per answer token (the end token included), in the order of the answer tokens: their cross-entropy
    against those tokens is the model's loss."""
    from clbench.models.lm import IGNORE, LMConfig, build_lm

    model = build_lm(LMConfig(name=family, lora_dropout=0.0)).eval()
    batch = model.collate([TextSample("short one\nAnswer:", "apple pie", 0),
                           TextSample("a much longer prompt than that " * 3, "river", 0)])
    labels = batch["labels"] if family == "seq2seq_lm" else batch["labels"][:, 1:]
    answers = labels[labels != IGNORE]
    with torch.no_grad():
        logits = model.target_logits(batch)
        assert logits.shape == (answers.numel(), len(model.tokenizer))
        torch.testing.assert_close(F.cross_entropy(logits, answers), model.loss(batch), rtol=1e-5, atol=1e-6)


def _perturbed_lwf(model, ctx: Context, source, scale: float):
    """lwf_lm after task 0 on ``source``, the trainable parameters then moved by ``scale``·N(0, 1), in task 1."""
    strategy = build_strategy(strategy_config("lwf_lm", alpha=0.7, temperature=2.0))
    _finish(strategy, ctx, 0, source)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen(3), dtype=p.dtype))
    ctx.experience = 1
    strategy.attach(ctx)
    return strategy


def test_lwf_gradient_matches_finite_differences():
    """Central differences of the penalty against autograd: every coordinate of a float64 softmax classifier (its
    target logits are its outputs), to 1e-6."""
    model = Softmax()
    ctx = _ctx(model)
    source = _xy(8, 0)
    strategy = _perturbed_lwf(model, ctx, source, 0.5)
    batch = source.all()
    penalty = strategy.penalty(ctx, batch)
    penalty.backward()
    h = 1e-6
    for p in (model.W, model.b):
        fd = torch.zeros_like(p)
        for idx in np.ndindex(*p.shape):
            with torch.no_grad():
                p[idx] += h
                up = float(strategy.penalty(ctx, batch))
                p[idx] -= 2 * h
                down = float(strategy.penalty(ctx, batch))
                p[idx] += h
            fd[idx] = (up - down) / (2 * h)
        torch.testing.assert_close(p.grad, fd, rtol=1e-6, atol=1e-9)
    assert float(penalty.detach()) > 1e-3


def test_lwf_gradient_on_the_lm_matches_the_directional_derivative():
    """On the LM's answer positions (float64 weights; LLaMA's RMSNorm computes in float32, so one direction with
    a large step rather than coordinates): (f(θ + εu) − f(θ − εu)) / 2ε = ⟨∇f, u⟩ for u = ∇f / ‖∇f‖."""
    model = _lm().double()
    ctx = _ctx(model)
    source = _text(model, 0, n=3)
    strategy = _perturbed_lwf(model, ctx, source, 0.2)
    batch = source.all()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(strategy.penalty(ctx, batch), params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    eps = 1e-3

    def moved(step: float) -> float:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(step * g / norm)
            value = float(strategy.penalty(ctx, batch))
            for p, g in zip(params, grads, strict=True):
                p.sub_(step * g / norm)
        return value

    assert (moved(eps) - moved(-eps)) / (2 * eps) == pytest.approx(float(norm), rel=1e-3)
    assert float(norm) > 1e-4


# ------------------------------------------------------------------------------------------- on the loop


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store and checkpoint folder for the runs of this module (creating a store costs seconds)."""
    return tmp_path_factory.mktemp("lm_baselines")


@pytest.mark.parametrize(("strategy", "extra"), [
    ("replay_lm", ("strategy.memory_size=8",)),
    ("ewc_lm", ("strategy.fisher_samples=4", "strategy.ewc_lambda=100")),
    ("lwf_lm", ()),
])
def test_a_text_run_killed_inside_task_2_resumes_to_the_same_scores(store, monkeypatch, strategy, extra):
    """tiny-llama + LoRA on keyword_topics: the run ends with finite scores, and killed after the first of task 2's
    two epochs and resumed, it ends with the uninterrupted run's exact match and answer-loss matrices."""
    cfg = run_config(store, f"strategy={strategy}", *FAST, *extra)
    whole, resumed = killed_and_resumed(cfg, monkeypatch)
    assert np.isfinite(whole.R).all() and np.isfinite(whole.others["loss"]).all()
    np.testing.assert_allclose(resumed.R, whole.R, atol=1e-6, rtol=0)
    np.testing.assert_allclose(resumed.others["loss"], whole.others["loss"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("method", "variant"), [("ewc", "ewc_lm"), ("lwf", "lwf_lm"), ("er", "replay_lm")])
def test_avalanches_baselines_point_a_language_model_at_the_lm_variants(tmp_path, method, variant):
    with pytest.raises(ConfigError, match=rf"not a classifier.*for a language model, strategy={variant} runs"):
        run(run_config(tmp_path, f"strategy={method}", *FAST))


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["strategy=replay_lm", "strategy.memory_size=0"], r"'strategy\.memory_size'.*>= 1"),
    (["strategy=replay_lm", "strategy.batch_size_mem=0"], r"'strategy\.batch_size_mem'.*>= 1"),
    (["strategy=replay_lm", "strategy.memory_weight=-1"], r"'strategy\.memory_weight'.*>= 0"),
    (["strategy=ewc_lm", "strategy.ewc_lambda=-1"], r"'strategy\.ewc_lambda'.*>= 0"),
    (["strategy=ewc_lm", "strategy.mode=online"], r"'strategy\.decay_factor'.*\(0, 1\]"),
    (["strategy=ewc_lm", "strategy.mode=fisher"], r"'strategy\.mode'.*\['separate', 'online'\]"),
    (["strategy=ewc_lm", "strategy.fisher_samples=0"], r"'strategy\.fisher_samples'.*>= 1"),
    (["strategy=lwf_lm", "strategy.temperature=0"], r"'strategy\.temperature'.*> 0"),
    (["strategy=lwf_lm", "strategy.alpha=-0.1"], r"'strategy\.alpha'.*>= 0"),
])
def test_bad_hyper_parameter_is_a_config_error_naming_the_key(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        run_config(tmp_path, *overrides)
