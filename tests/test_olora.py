"""O-LoRA: the properties olora.md lists ("What a correct implementation must satisfy") and its bad input."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from helpers import gen, killed_and_resumed, run_config
from lightning.fabric import Fabric
from torch import nn

from clbench.config import ConfigError
from clbench.context import Context
from clbench.experiment import run
from clbench.models.adapters import STACK, LoraAdapters
from clbench.streams.text import TextSample
from clbench.subspace import row_overlap
from strategies import build_strategy, strategy_config

peft = pytest.importorskip("peft")

FAST = ("model=causal_lm", "benchmark=keyword_topics", "benchmark.n_tasks=3", "benchmark.per_class=16",
        "benchmark.max_test_per_task=8", "engine=lm", "engine.epochs=1", "engine.lr=0.01", "engine.eval_batch_size=16",
        "model.max_new_tokens=4", "model.max_length=96")


def _ctx(module: nn.Module, n_tasks: int = 3) -> Context:
    stream = SimpleNamespace(spec=SimpleNamespace(n_tasks=n_tasks))
    return Context(model=module, module=module, fabric=Fabric(accelerator="cpu", devices=1), stream=stream,  # type: ignore[arg-type]
                   seed=0, batch_size=4, sources=None)


def _lm():
    from clbench.models.lm import LMConfig, build_lm

    torch.manual_seed(0)
    return build_lm(LMConfig(name="causal_lm", lora_dropout=0.0))


def _batch(model, n: int = 6):
    samples = [TextSample(f"word{k} topic{k % 3} thing\nAnswer:", ["apple", "river", "tiger"][k % 3], 0)
               for k in range(n)]
    return model.collate(samples)


def _begin(strategy, ctx: Context, t: int) -> None:
    ctx.experience = t
    strategy.before_experience(ctx)
    strategy.attach(ctx)


def _train(strategy, ctx: Context, batch, steps: int = 3) -> None:
    params = [p for p in ctx.module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss = ctx.module.loss(batch)
        extra = strategy.penalty(ctx, batch)
        (loss if extra is None else loss + extra).backward()
        opt.step()


def test_one_adapter_per_task_the_old_ones_frozen_untouched_and_without_gradient():
    model = _lm()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora", lambda1=0.5, lambda2=0.1))
    strategy.setup(ctx)
    batch = _batch(model)
    for t in range(3):
        _begin(strategy, ctx, t)
        assert model.adapter_names() == ["default", "task1", "task2"][: t + 1]
        old = {a: {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in model.lora_factors(a).items()}
               for a in model.adapter_names()[:-1]}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f".{model.adapter_names()[-1]}." in n for n in trainable)
        assert model.stacked_adapters() == model.adapter_names()[:-1]  # the frozen ones run as one stack
        model.zero_grad(set_to_none=True)
        _train(strategy, ctx, batch)
        strategy.detach(ctx)
        strategy.after_experience(ctx)  # the task's adapter joins the stack
        assert model.stacked_adapters() == model.adapter_names()
        for a, layers in old.items():
            for k, (A, B) in model.lora_factors(a).items():
                assert torch.equal(A, layers[k][0]) and torch.equal(B, layers[k][1])
                assert A.grad is None and B.grad is None
        for A, B in model.lora_factors(STACK).values():
            assert not A.requires_grad and not B.requires_grad and A.grad is None and B.grad is None


def test_the_orthogonality_gradient_reaches_only_the_new_A():
    model = _lm()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora", lambda1=1.0))
    strategy.setup(ctx)
    for t in range(3):
        _begin(strategy, ctx, t)
    strategy.penalty(ctx, None).backward()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert ".lora_A.task2." in name, name
    assert all(A.grad is not None and A.grad.abs().sum() > 0 for A, _ in model.lora_factors("task2").values())


def test_a_new_adapter_leaves_the_function_unchanged():
    """Exactly, as the loop runs it (the trained adapter joins the stack at the end of its task, then the new one
    is added); folding the trained adapter into the stack changes the function only by rounding."""
    model = _lm().eval()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora"))
    strategy.setup(ctx)
    batch = _batch(model)
    for t in range(3):
        if t > 0:
            with torch.no_grad():
                before = model.outputs(batch)
        _begin(strategy, ctx, t)
        if t > 0:
            with torch.no_grad():
                after = model.outputs(batch)
            torch.testing.assert_close(after, before, rtol=0, atol=0)
        _train(strategy, ctx, batch)
        model.eval()
        with torch.no_grad():
            trained = model.outputs(batch)
        strategy.detach(ctx)
        strategy.after_experience(ctx)
        with torch.no_grad():
            folded = model.outputs(batch)
        torch.testing.assert_close(folded, trained, rtol=0, atol=1e-5)


def test_the_penalty_is_the_explicit_sum_zero_for_orthogonal_rows_and_absent_where_it_should_be():
    model = _lm()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora", lambda1=0.7))
    strategy.setup(ctx)
    assert (_begin(strategy, ctx, 0), strategy.penalty(ctx, None))[1] is None  # no L_orth on the first task
    _begin(strategy, ctx, 1)
    _begin(strategy, ctx, 2)
    explicit = 0.0
    for layer, (A_new, _) in model.lora_factors("task2").items():
        A_t = A_new.detach()
        for old in ("default", "task1"):
            A_i = model.lora_factors(old)[layer][0]
            for j in range(A_i.shape[0]):
                for k in range(A_t.shape[0]):
                    explicit += abs(float(sum(A_i[j, m] * A_t[k, m] for m in range(A_t.shape[1]))))
    assert float(strategy.penalty(ctx, None).detach()) == pytest.approx(0.7 * explicit, rel=1e-5)
    squared = build_strategy(strategy_config("olora", lambda1=1.0, norm="squared"))
    squared.setup(ctx)
    squared.adapters = strategy.adapters
    squared.attach(ctx)
    expected = sum(float(((model.lora_factors(o)[layer][0] @ A_t.detach().T) ** 2).sum())
                   for layer, (A_t, _) in model.lora_factors("task2").items() for o in ("default", "task1"))
    assert float(squared.penalty(ctx, None).detach()) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # rows built orthogonal (QR): the penalty vanishes
        for layer in model.lora_factors("task2"):
            blocks = [model.lora_factors(a)[layer][0] for a in ("default", "task1", "task2")]
            r, d = blocks[0].shape
            Q, _ = torch.linalg.qr(torch.randn(d, 3 * r, generator=gen(1)))
            for i, block in enumerate(blocks):
                block.copy_(Q[:, i * r:(i + 1) * r].T)
    model.stack_adapters(["default", "task1"])  # the stack and the penalty's rows are copies: taken again
    strategy.attach(ctx)
    assert float(strategy.penalty(ctx, None).detach()) < 1e-5
    inc = build_strategy(strategy_config("inclora"))
    inc.setup(ctx)
    inc.adapters = strategy.adapters
    inc.attach(ctx)
    assert inc.penalty(ctx, None) is None  # λ1 = 0 is IncLoRA: no term at all


def test_the_merged_adapter_reproduces_the_summed_forward_pass():
    model = _lm().eval()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora"))
    strategy.setup(ctx)
    for t in range(3):
        _begin(strategy, ctx, t)
        with torch.no_grad():  # as training would: the current adapter's B moves away from 0
            for _, B in model.lora_factors(model.adapter_names()[-1]).values():
                B.copy_(torch.randn(B.shape, generator=gen(t)) * 0.1)
    batch = _batch(model)
    with torch.no_grad():
        summed = model.outputs(batch)
        names = model.adapter_names()
        model.lm.base_model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="cat")
        model.use_adapters(["merged"])
        merged = model.outputs(batch)
    torch.testing.assert_close(merged, summed, rtol=1e-5, atol=1e-5)


def _per_adapter_penalty(model, old, new, norm):
    return sum(float(row_overlap([model.lora_factors(o)[layer][0] for o in old], A_t.detach(), norm))
               for layer, (A_t, _) in model.lora_factors(new).items())


def test_the_stack_is_the_frozen_adapters_in_cat_form_same_forward_same_penalty():
    """The frozen adapters of task 3 run as one stacked adapter: its A is their A's rows and its B their B's columns
    (bit for bit, the scaling α/r unchanged), its forward pass the per-adapter summed one to 1e-6, and the penalty
    over its rows the sum over the adapters (both norms); the per-task adapters stay stored and inactive."""
    model = _lm().eval()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora", lambda1=1.0))
    strategy.setup(ctx)
    for t in range(3):
        _begin(strategy, ctx, t)
        with torch.no_grad():
            for _, B in model.lora_factors(model.adapter_names()[-1]).values():
                B.copy_(torch.randn(B.shape, generator=gen(10 + t)) * 0.1)
        strategy.detach(ctx)
        if t < 2:
            strategy.after_experience(ctx)
    assert model.adapter_names() == ["default", "task1", "task2"] and model.stacked_adapters() == ["default", "task1"]
    assert strategy.state_dict()["stacked"] == ["default", "task1"]
    old = [model.lora_factors(a) for a in ("default", "task1")]
    for layer, (A, B) in model.lora_factors(STACK).items():
        assert torch.equal(A, torch.cat([f[layer][0] for f in old], 0))
        assert torch.equal(B, torch.cat([f[layer][1] for f in old], 1))
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and all(m.scaling[STACK] == m.scaling["default"] == 4.0 and m.r[STACK] == 16 for m in layers)
    assert all(m.active_adapters == [STACK, "task2"] for m in layers)
    batch = _batch(model)
    with torch.no_grad():
        stacked = model.outputs(batch)
        model.use_adapters(["default", "task1", "task2"], trainable=["task2"])
        summed = model.outputs(batch)
        model.use_adapters(["task2"])
        without = model.outputs(batch)
        model.use_adapters([STACK, "task2"], trainable=["task2"])
    assert float((summed - without).abs().max()) > 1e-2  # the old adapters matter: the comparison is not vacuous
    torch.testing.assert_close(stacked, summed, rtol=0, atol=1e-6)
    strategy.attach(ctx)
    for norm in ("l1", "squared"):
        strategy.cfg.norm = norm
        expected = _per_adapter_penalty(model, ["default", "task1"], "task2", norm)
        assert float(strategy.penalty(ctx, None).detach()) == pytest.approx(expected, rel=1e-6)


def test_stacking_adapters_of_other_ranks_and_scalings_keeps_the_sum():
    """The stack of adapters with their own r and α folds each s_i = α_i/r_i into its B block (s_i/s), so
    s·B_stack A_stack x = Σ_i s_i B_i A_i x."""
    model = _Toy()
    model.lm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=12, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():
        for a in ("default", "other"):
            for _, B in model.lora_factors(a).values():
                B.copy_(torch.randn(B.shape, generator=gen(len(a))))
    x = torch.randn(5, 64, generator=gen(3))
    model.use_adapters(["default", "other"])
    with torch.no_grad():
        summed = model.lm(x)
    model.stack_adapters(["default", "other"])
    model.use_adapters([STACK])
    with torch.no_grad():
        stacked = model.lm(x)
    torch.testing.assert_close(stacked, summed, rtol=0, atol=1e-5)
    assert model.lora_factors(STACK)["lm.base_model.model.proj"][0].shape == (11, 64)
    with pytest.raises(ValueError, match="nope"):
        model.stack_adapters(["default", "nope"])
    with pytest.raises(ValueError, match=STACK):
        model.add_adapter(STACK)


@pytest.mark.parametrize("boundary", [True, False])
def test_rebuild_recreates_the_adapters_and_the_stack_so_the_weights_load(boundary):
    """What a resumed run does (load_state_dict, rebuild, then the model's weights, strictly), at the end of task 2
    (everything stacked) and inside task 3 (two adapters stacked, the third training): the same modules, the same
    active and trainable adapters, the same outputs."""
    model = _lm().eval()
    ctx = _ctx(model)
    strategy = build_strategy(strategy_config("olora"))
    strategy.setup(ctx)
    batch = _batch(model)
    for t in range(2 if boundary else 3):
        _begin(strategy, ctx, t)
        with torch.no_grad():
            for _, B in model.lora_factors(model.adapter_names()[-1]).values():
                B.copy_(torch.randn(B.shape, generator=gen(20 + t)) * 0.1)
        strategy.detach(ctx)
        if boundary or t < 2:
            strategy.after_experience(ctx)
    with torch.no_grad():
        expected = model.outputs(batch)
    fresh = _lm().eval()
    again = build_strategy(strategy_config("olora"))
    again.setup(_ctx(fresh))
    again.load_state_dict(strategy.state_dict())
    again.rebuild(_ctx(fresh))
    fresh.load_state_dict(model.state_dict())  # strict: the same parameters, the stack's included
    assert fresh.adapter_names() == model.adapter_names() and fresh.stacked_adapters() == model.stacked_adapters()
    layers = [(m, n) for (_, m), (_, n) in zip(model.named_modules(), fresh.named_modules(), strict=True)
              if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and all(m.active_adapters == n.active_adapters for m, n in layers)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == \
        {k for k, p in fresh.named_parameters() if p.requires_grad}
    with torch.no_grad():
        torch.testing.assert_close(fresh.outputs(batch), expected, rtol=0, atol=0)


def test_evaluation_takes_text_only():
    model = _lm()
    batch = _batch(model)
    assert not any("task" in k for k in batch)
    other = model.collate([dataclasses.replace(s, task=7) for s in
                           [TextSample(f"word{k} topic{k % 3} thing\nAnswer:", ["apple", "river", "tiger"][k % 3], 0)
                            for k in range(6)]])
    assert all(torch.equal(other[k], batch[k]) for k in batch)


class _Toy(LoraAdapters, nn.Module):
    """A linear layer W₀ = 0 (64 → 64) with LoRA r = 8 (olora.md property 7)."""

    def __init__(self) -> None:
        super().__init__()
        base = nn.Sequential()
        base.add_module("proj", nn.Linear(64, 64, bias=False))
        nn.init.zeros_(base.proj.weight)
        self.lora_config = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"])
        self.lm = peft.get_peft_model(base, self.lora_config)

    def loss(self, batch):
        x, y = batch
        return ((self.lm(x) - y) ** 2).mean()


def _toy_run(method: str, seed: int) -> list[float]:
    """Relative MSE on tasks 0 and 1 after 3 tasks whose inputs lie in random 8-dim subspaces of R^64."""
    torch.manual_seed(seed)
    g = gen(100 + seed)
    bases = [torch.linalg.qr(torch.randn(64, 8, generator=g))[0] for _ in range(3)]
    maps = [torch.randn(64, 64, generator=g) / 8 for _ in range(3)]
    tasks = []
    for U, M in zip(bases, maps, strict=True):
        x = torch.randn(256, 8, generator=g) @ U.T
        tasks.append((x, x @ M.T))
    model = _Toy()
    ctx = _ctx(model)
    strategy = None if method == "seqlora" else build_strategy(
        strategy_config(method, lambda1=1.0 / (8 * 64) if method == "olora" else 0.0))
    if strategy is not None:
        strategy.setup(ctx)
    for t, batch in enumerate(tasks):
        if strategy is not None:
            _begin(strategy, ctx, t)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(300):
            opt.zero_grad()
            loss = model.loss(batch)
            extra = None if strategy is None else strategy.penalty(ctx, batch)
            (loss if extra is None else loss + extra).backward()
            opt.step()
    with torch.no_grad():
        return [float(model.loss(tasks[j]) / (tasks[j][1] ** 2).mean()) for j in (0, 1)]


def test_linear_toy_old_tasks_olora_below_inclora_below_seqlora():
    """olora.md property 7 (3 seeds, λ1 = 1 / numel(A_old)): the error left on the old tasks orders O-LoRA <
    IncLoRA < SeqLoRA. Measured (relative MSE on tasks 1 / 2, mean of seeds 0-2): O-LoRA 0.25 / 0.12, IncLoRA
    0.54 / 0.27, SeqLoRA 4.05 / 2.04 (olora.md's: 0.15 / 0.07, 0.47 / 0.23, 2.06 / 1.26)."""
    errors = {m: [sum(_toy_run(m, s)) for s in range(3)] for m in ("olora", "inclora", "seqlora")}
    mean = {m: sum(v) / 3 for m, v in errors.items()}
    assert mean["olora"] < mean["inclora"] < mean["seqlora"], mean


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["strategy.lambda1=-0.1"], r"'strategy.lambda1'.*>= 0"),
    (["strategy.lambda2=[0.1,0.2]"], r"'strategy.lambda2'.*2 values for 3 tasks"),
    (["strategy.norm=l3"], r"'strategy.norm'.*'l1', 'squared'"),
    (["model.adapter=none"], r"strategy 'olora' trains one LoRA adapter per task"),
    (["model.lora_r=0"], r"'model.lora_r'"),
    (["model.lora_targets=[nope]"], r"nope"),
])
def test_bad_olora_input_is_refused_before_training(tmp_path, overrides, pattern):
    with pytest.raises((ConfigError, ValueError), match=pattern):
        run(run_config(tmp_path, "strategy=olora", *FAST, *overrides))


def test_olora_resumes_inside_task_3_with_its_adapters_and_their_stack(tmp_path, monkeypatch):
    cfg = run_config(tmp_path, "strategy=olora", *FAST, "engine.epochs=2", "strategy.lambda2=0.01")
    whole, resumed = killed_and_resumed(cfg, monkeypatch, task=2)
    torch.testing.assert_close(torch.tensor(resumed.R), torch.tensor(whole.R), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(resumed.others["loss"]), torch.tensor(whole.others["loss"]),
                               atol=1e-6, rtol=0)
