"""Continual unlearning on the one loop (issue 16): the ``objective`` hook, ``LanguageModel.sequence_logps``, the
``fictitious_facts`` stand-in stream, and the baselines GradAsc, GradDiff, NPO and refusal fine-tuning (PO)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import killed_and_resumed, run_config

from clbench.config import ConfigError
from clbench.streams.text import TextSample

pytest.importorskip("peft")

SMALL = ("benchmark=fictitious_facts", "benchmark.requests=2", "benchmark.n_tasks=3", "benchmark.authors=2",
         "benchmark.retain_authors=1", "benchmark.facts=2", "benchmark.per_class=6", "benchmark.max_test_per_task=4")
"""A stream small enough for hand-checked batches: 2 requests of 2 authors × 2 facts, 1 retain author."""
LM = ("model=causal_lm", "model.adapter=none", "engine=lm", "model.max_new_tokens=5")
"""tiny-llama, full fine-tuning (no LoRA dropout: the train-mode loss is deterministic)."""
RUN = ("benchmark=fictitious_facts", "benchmark.requests=1", "benchmark.n_tasks=2", "benchmark.authors=2",
       "benchmark.retain_authors=2", "benchmark.facts=2", "benchmark.per_class=8", "benchmark.max_test_per_task=8",
       *LM, "engine.epochs=30", "engine.first_lr=0.003", "engine.lr=0.001", "engine.eval_batch_size=32",
       "engine.checkpoint_every_epoch=false")
"""The end-to-end runs: the learn experience memorises 8 facts (measured: exact match 100 on seeds 0-3), then one
request forgets 4 of them (30 steps at lr 1e-3). No checkpoint per epoch: writing the model and AdamW's state 60
times would cost more than the training."""


def _stream(tmp_path, *overrides: str, seed: int = 0):
    from clbench.streams import build_stream

    return build_stream(run_config(tmp_path, *SMALL, *LM, *overrides).benchmark, seed)


@torch.no_grad()
def _token_logps(model, sample: TextSample) -> list[float]:
    """log π(y_k | x, y_<k) of each answer token (and the end token), by hand: one forward pass per prefix of the
    sample alone (no padding, no mask, no gathering), the last position's log-softmax at the target token."""
    batch = model.collate([sample])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    out = []
    for k in range(1, len(ids)):
        if labels[k] != -100:
            logits = model.lm(input_ids=ids[:k][None]).logits[0, -1].double()
            out.append(float(torch.log_softmax(logits, -1)[labels[k]]))
    return out


def _nll(model, samples) -> float:
    """The mean answer-token NLL of ``samples`` together, by hand."""
    logps = [lp for s in samples for lp in _token_logps(model, s)]
    return -sum(logps) / len(logps)


# ------------------------------------------------------------------------------------------------ the stream


def test_fictitious_facts_layout_groups_and_references(tmp_path):
    from clbench.streams.unlearning import ATTRIBUTES, REFUSE

    stream = _stream(tmp_path)
    spec, bench = stream.spec, stream.benchmark
    assert spec.task_names == ("learn", "request_1", "request_2")
    assert spec.groups == ("forget_1", "forget_2", "retain", "general")
    assert spec.refusal == REFUSE and spec.primary_score == "exact_match"
    train = [list(e.dataset) for e in bench.train_stream]
    test = [list(e.dataset) for e in bench.test_stream]
    name = spec.groups.index

    def facts(samples, group):
        return [(s.prompt, s.answer) for s in samples if s.group == name(group)]

    # experience 0 learns every fact (2 + 2 + 1 authors × 2 facts), 4 unknown authors' 2 questions answered with
    # the refusal, and 6 general samples
    assert len(train[0]) == 10 + 8 + 6 and {spec.groups[s.group] for s in train[0]} == set(spec.groups)
    for t in (1, 2):  # request t: the facts of author group t, and its test set is exactly them
        assert len(train[t]) == 4 and all(s.group == name(f"forget_{t}") and s.task == t for s in train[t])
        assert facts(train[t], f"forget_{t}") == facts(train[0], f"forget_{t}") == facts(test[t], f"forget_{t}")
        assert len(test[t]) == 4
    # test 0: the retain facts and fresh general samples, nothing of a forget group
    assert {spec.groups[s.group] for s in test[0]} == {"retain", "general"}
    assert facts(test[0], "retain") == facts(train[0], "retain") and len(facts(test[0], "general")) == 4
    retain = list(stream.references["retain"])
    assert [(s.prompt, s.answer) for s in retain] == facts(train[0], "retain")
    # disjoint authors: the questions of different groups never share a name
    templates = [q.split("{name}") for q, _ in ATTRIBUTES]

    def author(prompt: str) -> str:
        question = prompt.removesuffix("\nAnswer:")
        head, tail = next(t for t in templates if question.startswith(t[0]) and question.endswith(t[1]))
        return question[len(head): len(question) - len(tail)]

    authors = {g: {author(p) for p, _ in facts(train[0], g)} for g in ("forget_1", "forget_2", "retain")}
    assert [len(a) for a in authors.values()] == [2, 2, 1]
    assert not (authors["forget_1"] & authors["forget_2"]) and not (authors["retain"] & authors["forget_1"])
    answers = {a for words in (w for _, w in ATTRIBUTES) for a in words}
    assert all(a in answers for _, a in facts(train[0], "forget_1") + facts(train[0], "retain"))
    general = [s for s in train[0] if s.group == name("general") and s.answer != REFUSE]
    assert len(general) == 6 and all(s.prompt.startswith("add ") and s.answer.isdigit() for s in general)
    unknown = {author(s.prompt) for s in train[0] if s.answer == REFUSE}
    assert len(unknown) == 4 and not unknown & set().union(*authors.values())
    # every test sample carries 3 distinct wrong answers of its own kind (TOFU's perturbed answers); training
    # samples carry none
    for sample in (s for e in test for s in e):
        kind = next((w for _, w in ATTRIBUTES if sample.answer in w), tuple(str(d) for d in range(10)))
        assert len(set(sample.perturbed)) == 3 and sample.answer not in sample.perturbed
        assert set(sample.perturbed) <= set(kind)
    assert all(s.perturbed == () for e in train for s in e)


def test_fictitious_facts_is_deterministic_from_the_seed(tmp_path):
    def samples(seed: int):
        stream = _stream(tmp_path, seed=seed)
        return [[(s.prompt, s.answer) for s in e.dataset] for e in stream.benchmark.train_stream]

    assert samples(0) == samples(0)
    assert samples(0) != samples(1)


def test_withhold_leaves_the_first_forget_groups_out_of_experience_0_and_nothing_else(tmp_path):
    """The retain model's stream: experience 0 without the facts of forget groups 1..k; every other sample (the
    requests, every test sample and its perturbed answers, the references) is the same as the full stream's."""
    full, held = _stream(tmp_path), _stream(tmp_path, "benchmark.withhold=1")
    groups = full.spec.groups

    def items(stream, split: str):
        return [[(s.prompt, s.answer, groups[s.group], s.perturbed) for s in e.dataset]
                for e in getattr(stream.benchmark, split)]

    learn_full, learn_held = items(full, "train_stream")[0], items(held, "train_stream")[0]
    assert learn_held == [x for x in learn_full if x[2] != "forget_1"]
    assert len(learn_full) - len(learn_held) == 4  # 2 authors × 2 facts
    assert items(full, "train_stream")[1:] == items(held, "train_stream")[1:]
    assert items(full, "test_stream") == items(held, "test_stream")
    assert full.spec.per_sample == held.spec.per_sample == ("truth_ratio",)


@pytest.mark.parametrize(("override", "key"), [
    ("benchmark.withhold=3", "benchmark.withhold"),  # 2 requests: at most 2 groups to leave out
    ("benchmark.withhold=-1", "benchmark.withhold"),
    ("model.truth_ratio_mean=harmonic", "model.truth_ratio_mean"),
    ("benchmark.n_tasks=2", "benchmark.n_tasks"),  # 2 requests make 3 experiences
    ("benchmark.facts=6", "benchmark.facts"),
    ("benchmark.requests=0", "benchmark.requests"),
    ("benchmark.retain_authors=0", "benchmark.retain_authors"),
])
def test_bad_stream_keys_are_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _stream(tmp_path, override)


# ------------------------------------------------------------------------------------------ model and hooks


@pytest.fixture(scope="module")
def lm():
    from clbench.models.lm import LMConfig, build_lm

    torch.manual_seed(0)
    return build_lm(LMConfig(adapter="none")).eval()


def test_sequence_logps_sum_the_answer_tokens_log_probabilities(lm):
    samples = [TextSample("where was kavo rimelu born ?\nAnswer:", "paris", 1),
               TextSample("what genre does po write ?\nAnswer:", "i do not know", 1),
               TextSample("x\nAnswer:", "a much longer answer of several tokens", 1)]
    with torch.no_grad():
        logp = lm.sequence_logps(lm.collate(samples))
        assert logp.shape == (3,)
        for k, s in enumerate(samples):
            assert logp[k].item() == pytest.approx(sum(_token_logps(lm, s)), abs=1e-4)


def _setup(tmp_path, strategy: str, *overrides: str):
    """The run's context and strategy as :func:`clbench.experiment.setup` builds them (strategy.setup done)."""
    from clbench.experiment import setup

    ctx, strat = setup(run_config(tmp_path, *SMALL, *LM, f"strategy={strategy}", *overrides))
    ctx.module.eval()
    return ctx, strat


def _request(ctx, t: int = 1):
    """Make experience ``t`` the current one, with its training source; its samples."""
    data = ctx.stream.benchmark.train_stream[t].dataset
    ctx.experience, ctx.train_source = t, ctx.sources(data)
    return list(data)


def test_the_engine_trains_on_the_objective_plus_the_penalty(tmp_path):
    """A strategy's objective replaces the model loss in the engine's step, and its penalty is still added."""
    from clbench.engine import Engine
    from strategies.base import Strategy

    calls = []

    class Probe(Strategy):
        def objective(self, ctx, batch, loss):
            calls.append("objective")
            return -loss(batch)

        def penalty(self, ctx, batch):
            calls.append("penalty")
            return torch.zeros((), requires_grad=True)

    ctx, _ = _setup(tmp_path, "naive", "engine.epochs=1")
    samples = _request(ctx, 1)
    engine = ctx.trainer
    assert isinstance(engine, Engine) and Probe.overrides("objective") and not Strategy.overrides("objective")
    probe = Probe(None)  # type: ignore[arg-type]
    ctx.optimizer = engine.optimizer(ctx.module.parameters(), 1, lr=0.0)
    ctx.schedule = engine.schedule(ctx.optimizer, ctx.module)
    losses = []
    engine.fit(ctx, probe, 0, lambda e, loss, extra=None: losses.append(loss))
    assert calls == ["objective", "penalty"]  # one batch of 4 samples
    ctx.module.eval()
    assert losses[0] == pytest.approx(-_nll(ctx.module, samples), abs=1e-4)


def test_grad_ascent_is_the_nll_before_unlearn_from_and_its_negative_after(tmp_path):
    ctx, strat = _setup(tmp_path, "grad_ascent")
    samples = _request(ctx, 1)
    batch = ctx.train_source.all()
    nll = _nll(ctx.module, samples)
    with torch.no_grad():
        assert strat.objective(ctx, batch, ctx.module.loss).item() == pytest.approx(-nll, abs=1e-4)
        ctx.experience = 0
        assert strat.objective(ctx, batch, ctx.module.loss).item() == pytest.approx(nll, abs=1e-4)


def test_grad_diff_is_ascent_on_the_forget_batch_plus_weighted_retain_nll(tmp_path):
    ctx, strat = _setup(tmp_path, "grad_diff", "strategy.retain_weight=0.7")
    samples = _request(ctx, 1)
    retain = list(ctx.stream.references["retain"])  # 2 samples: every retain batch holds all of them
    with torch.no_grad():
        value = strat.objective(ctx, ctx.train_source.all(), ctx.module.loss).item()
    assert value == pytest.approx(-_nll(ctx.module, samples) + 0.7 * _nll(ctx.module, retain), abs=1e-4)


def test_npo_is_the_papers_formula_against_the_model_at_the_requests_start(tmp_path):
    """π_ref's log-probabilities are the strategy's anchors, computed by the loop as the request starts (the
    loop's ``_anchored``, as a run calls it); the loss is the paper's formula against them."""
    from clbench.experiment import _anchored
    from strategies.npo import REF

    ctx, strat = _setup(tmp_path, "npo", "strategy.beta=0.5")
    model = ctx.module
    samples = _request(ctx, 1)
    kept: dict = {}
    source = _anchored(ctx, strat, ctx.train_source, 3, "train", {}, kept)
    ref = [sum(_token_logps(model, s)) for s in samples]
    np.testing.assert_allclose(kept["train"][REF].numpy(), ref, atol=1e-4)
    batch = source.all()
    with torch.no_grad():  # at π = π_ref: (2/β) log 2
        assert strat.objective(ctx, batch, model.loss).item() == pytest.approx(2 / 0.5 * math.log(2), abs=1e-5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        value = strat.objective(ctx, batch, model.loss).item()
    logp = [sum(_token_logps(model, s)) for s in samples]
    by_hand = 2 / 0.5 * np.mean([math.log(1 + math.exp(lp - r) ** 0.5) for lp, r in zip(logp, ref, strict=True)])
    assert value == pytest.approx(by_hand, rel=1e-4)
    assert value != pytest.approx(2 / 0.5 * math.log(2), abs=1e-3)  # the perturbation moved the ratio
    ctx.experience = 0  # the learn experience: plain NLL, no reference
    kept = {}
    assert _anchored(ctx, strat, ctx.train_source, 3, "train", {}, kept) is ctx.train_source and not kept


def test_refusal_ft_trains_the_refusal_on_the_forget_set_plus_retain_nll(tmp_path):
    from clbench.streams.unlearning import REFUSE

    ctx, strat = _setup(tmp_path, "refusal_ft", "strategy.retain_weight=0.5")
    samples = _request(ctx, 1)
    source = strat.train_source(ctx)
    batch = source.all()
    model = ctx.module
    answers = model.tokenizer.batch_decode(batch["answer_ids"].clamp(min=0), skip_special_tokens=True)
    assert [a.strip() for a in answers] == [REFUSE] * len(samples)
    relabelled = [TextSample(s.prompt, REFUSE, 1) for s in samples]
    retain = list(ctx.stream.references["retain"])
    with torch.no_grad():
        value = strat.objective(ctx, batch, model.loss).item()
    assert value == pytest.approx(_nll(model, relabelled) + 0.5 * _nll(model, retain), abs=1e-4)
    ctx.experience = 0
    assert strat.train_source(ctx) is ctx.train_source


@pytest.mark.parametrize("strategy", ["grad_ascent", "grad_diff", "npo", "refusal_ft"])
def test_an_unlearning_baseline_refuses_a_classifier(tmp_path, strategy):
    from clbench.experiment import setup

    with pytest.raises(ConfigError, match=r"'model\.name'.*language model"):
        setup(run_config(tmp_path, f"strategy={strategy}", "benchmark=permuted_digits", "benchmark.n_tasks=2"))


@pytest.mark.parametrize(("strategy", "extra"), [
    ("grad_diff", ()), ("npo", ("strategy.retain_weight=1",)), ("refusal_ft", ()),
])
def test_a_baseline_with_retain_data_refuses_a_stream_without_them(tmp_path, strategy, extra):
    from clbench.experiment import setup

    with pytest.raises(ConfigError, match=r"'strategy\.retain_set'.*'retain'"):
        setup(run_config(tmp_path, f"strategy={strategy}", *extra, *LM, "benchmark=keyword_topics",
                         "benchmark.n_tasks=2", "benchmark.per_class=2", "benchmark.max_test_per_task=2"))


def test_refusal_ft_needs_a_refusal(tmp_path):
    from clbench.experiment import setup

    with pytest.raises(ConfigError, match=r"'strategy\.refusal'"):
        setup(run_config(tmp_path, "strategy=refusal_ft", "strategy.retain_weight=0", *LM,
                         "benchmark=keyword_topics", "benchmark.n_tasks=2", "benchmark.per_class=2",
                         "benchmark.max_test_per_task=2"))


@pytest.mark.parametrize(("override", "pattern"), [
    ("strategy=grad_ascent strategy.unlearn_from=-1", r"'strategy\.unlearn_from'.*>= 0"),
    ("strategy=grad_diff strategy.retain_weight=0", r"'strategy\.retain_weight'.*> 0"),
    ("strategy=npo strategy.beta=0", r"'strategy\.beta'.*> 0"),
    ("strategy=npo strategy.retain_batch_size=0", r"'strategy\.retain_batch_size'.*>= 1"),
    ("strategy=refusal_ft strategy.retain_weight=-1", r"'strategy\.retain_weight'.*>= 0"),
])
def test_bad_unlearning_keys_are_config_errors(tmp_path, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        run_config(tmp_path, *override.split())


# ------------------------------------------------------------------------------------------------ on the loop


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the runs of this module (creating one costs seconds)."""
    return tmp_path_factory.mktemp("unlearning")


def test_npo_reference_survives_a_kill_in_the_middle_of_a_request(store, monkeypatch):
    """Killed after the first of the request's two epochs and resumed: the same scores as the uninterrupted run
    (the resumed request reads π_ref from the checkpoint's anchors; recomputed from the half-unlearned model it would
    differ, and so would every later step)."""
    import clbench.checkpoint

    cfg = run_config(store / "npo_resume", SMALL[0], "benchmark.requests=1", "benchmark.n_tasks=2",
                     *SMALL[3:], *LM, "strategy=npo", "engine.epochs=2", "engine.lr=0.01",
                     "engine.batch_size=2")
    whole, resumed = killed_and_resumed(cfg, monkeypatch, task=1, epoch=0)
    np.testing.assert_array_equal(whole.R, resumed.R)
    for name, M in whole.others.items():
        np.testing.assert_array_equal(M, resumed.others[name], err_msg=name)
    assert resumed.per_sample == whole.per_sample
    assert len(whole.per_sample) == 3 * (2 + 4 + 4)  # 3 evaluations × 10 test samples
    state = clbench.checkpoint.load(clbench.checkpoint.checkpoint_path(cfg))
    assert state["anchors"]["train"]["npo_ref_logp"].shape == (4,)  # the request's 4 forget samples
    assert whole.others["loss.forget_1"][1, 1] > whole.others["loss.forget_1"][0, 1]  # NPO raised the forget NLL


@pytest.mark.parametrize("strategy", ["grad_ascent", "grad_diff", "npo", "refusal_ft"])
def test_an_unlearning_run_forgets_the_requested_facts(store, strategy):
    """The learn experience memorises the facts, and the request lowers the forget set's exact match (GradAsc:
    to at most 25 %)."""
    from clbench.experiment import run

    result = run(run_config(store, *RUN, f"strategy={strategy}"))
    forget = result.others["exact_match.forget_1"][:, 1]
    assert forget[0] >= 75.0, result.R
    ratio = result.others["truth_ratio.forget_1"][:, 1]  # TOFU's truth ratio against 3 wrong answers of each fact
    assert ratio[0] < 0.5 and np.isfinite(ratio).all(), ratio  # learnt: the true answer far above the wrong ones
    assert forget[1] < forget[0], forget
    assert np.isfinite(result.R).all() and np.isfinite(result.others["loss"]).all()
    if strategy == "grad_ascent":
        assert forget[1] <= 25.0, forget


def test_per_sample_truth_ratios_are_the_samples_behind_the_logged_means(store):
    """Every evaluation keeps each test sample's truth ratio (per_sample.csv, logged as an artifact): their mean per
    group and evaluation is the logged mean."""
    from mlflow.tracking import MlflowClient

    from clbench.experiment import run
    from clbench.metrics import per_sample_values

    cfg = run_config(store, *RUN, "strategy=naive", "engine.epochs=2")
    result = run(cfg)
    text = "\n".join(["score,after_experience,test_experience,group,value", *result.per_sample])
    for after in (-1, 0, 1):  # the initial evaluation (not in the matrices), then after each experience
        for group, j in (("forget_1", 1), ("retain", 0), ("general", 0)):
            values = per_sample_values(text, "truth_ratio", after, [group])
            assert len(values) == {"forget_1": 4, "retain": 4, "general": 8}[group]
            if after >= 0:
                assert values.mean() == pytest.approx(result.others[f"truth_ratio.{group}"][after, j], rel=1e-9)
    np.testing.assert_array_equal(per_sample_values(text, "truth_ratio", None, ["forget_1"]),
                                  per_sample_values(text, "truth_ratio", 1, ["forget_1"]))
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    path = client.download_artifacts(result.run_id, "per_sample.csv", str(store / "artifact"))
    assert Path(path).read_text() == text + "\n"


def test_forget_quality_tells_the_model_that_learnt_the_facts_from_the_retain_model(store):
    """TOFU's KS-test forget quality after experience 0: the model that learnt forget_1 (truth ratios ≪ 1) against
    the retain model that never did (benchmark.withhold=1): the 4 + 4 truth ratios separate completely, the smallest
    p-value two samples of 4 can give (2 / C(8, 4) = 0.0286); the retain model against itself: 1."""
    from clbench.experiment import run
    from clbench.metrics import forget_quality, per_sample_values

    def ratios(*overrides: str) -> np.ndarray:
        result = run(run_config(store, *RUN, "strategy=naive", "engine.epochs=2", *overrides))
        text = "\n".join(["score,after_experience,test_experience,group,value", *result.per_sample])
        return per_sample_values(text, "truth_ratio", 0, ["forget_1"])

    learnt, never = ratios(), ratios("benchmark.withhold=1")
    assert learnt.max() < never.min(), (learnt, never)
    assert forget_quality(learnt, never) == pytest.approx(2 / math.comb(8, 4), rel=1e-9)
    assert forget_quality(never, never) == 1.0
    assert forget_quality(1 / learnt, 1 / never) == forget_quality(learnt, never)  # TOFU's code inverts R
