"""O3 (strategies/o3.py; ../shared/methods/o3.md "What a correct implementation must satisfy"): the per-input gate
of the adapters, the model's switch from full fine-tuning to its LoRA, the orthogonality penalty, the bad-input
errors, and a continual unlearning run with its detectors (resumed mid-request to the same numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import killed_and_resumed, run_config

from clbench.config import ConfigError

pytest.importorskip("peft")

ALL_LINEAR = "model.lora_targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
SMALL = ("benchmark=fictitious_facts", "benchmark.requests=2", "benchmark.n_tasks=3", "benchmark.authors=2",
         "benchmark.retain_authors=1", "benchmark.facts=5", "benchmark.per_class=6", "benchmark.max_test_per_task=4",
         "model=causal_lm", "model.adapter_from=1", "model.lora_dropout=0", "engine=lm", "model.max_new_tokens=4",
         "strategy=o3", "+strategy.detector.max_length=16", "+strategy.detector.epochs=1")
"""2 requests of 10 facts (the detector's split: 8 training, 2 held out), tiny-llama learning them in experience 0
with full fine-tuning, then the unlearning LoRA (no dropout: deterministic training losses)."""


def _module(tmp_path, *overrides: str):
    from clbench.experiment import setup

    ctx, strategy = setup(run_config(tmp_path, *SMALL, *overrides))
    return ctx, strategy


def _randomise_lora(module, seed: int = 0) -> None:
    """Non-zero B's (a fresh adapter has B = 0, which would hide the gate)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ------------------------------------------------------------------------- the model: adapter_from, the gate


def test_adapter_from_fine_tunes_everything_first_then_only_the_adapter(tmp_path):
    ctx, _ = _module(tmp_path)
    module = ctx.module
    lora = {n for n, _ in module.named_parameters() if ".lora_" in n}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert module.full and trainable.isdisjoint(lora) and len(trainable) > 0
    assert set(module.protected_layers()) and all(".lora_" not in n for n in module.protected_layers())
    module.begin_experience(1)
    assert not module.full and {n for n, p in module.named_parameters() if p.requires_grad} == lora
    module.begin_experience(2)  # no switch: nothing changes
    assert {n for n, p in module.named_parameters() if p.requires_grad} == lora


def test_adapter_from_needs_lora(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.adapter_from"):
        run_config(tmp_path, *SMALL, "model.adapter=none")


def test_gate_zero_is_the_base_model_and_each_row_takes_its_own_weight(tmp_path):
    """o3.md property 1: w = 0 gives the base logits exactly (peft's disabled adapter), w = 1 the adapter's, and
    a batch mixing them gives each row its own."""
    ctx, _ = _module(tmp_path)
    module = ctx.module
    module.begin_experience(1)
    _randomise_lora(module)
    module.eval()
    ids = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with module.lm.disable_adapter():
            base = module.lm(input_ids=ids).logits
        full = module.lm(input_ids=ids).logits
        with module.gated(torch.zeros(2)):
            zero = module.lm(input_ids=ids).logits
        with module.gated(torch.tensor([0.0, 1.0])):
            mixed = module.lm(input_ids=ids).logits
    assert (full - base).abs().max() > 1e-3  # the adapter does change the function
    torch.testing.assert_close(zero, base, rtol=0, atol=0)
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], full[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="3 weights for a batch of 2"), module.gated(torch.ones(3)):
        module.lm(input_ids=ids)


def test_the_gated_adapter_path_is_linear_in_w(tmp_path):
    """A wrapped layer's output is W0 x + w·s·BAx: its change from w = 0 scales exactly with w (the first layer's
    input does not depend on w)."""
    ctx, _ = _module(tmp_path)
    module = ctx.module
    module.begin_experience(1)
    _randomise_lora(module)
    module.eval()
    layer = module.lm.base_model.model.model.layers[0].self_attn.q_proj
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    ids = torch.randint(5, 200, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for w in (0.0, 1.0, 2.5):
            with module.gated(torch.full((3,), w)):
                module.lm(input_ids=ids)
    handle.remove()
    y0, y1, y25 = seen
    torch.testing.assert_close(y25 - y0, 2.5 * (y1 - y0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- the orthogonality penalty


def test_layer_count_groups_modules_by_their_layer():
    from strategies.o3 import layer_count

    names = ["lm.model.layers.0.self_attn.q_proj", "lm.model.layers.0.mlp.up_proj",
             "lm.model.layers.1.self_attn.q_proj", "encoder.block.0.q", "decoder.block.0.q"]
    assert layer_count(names) == 4
    assert layer_count(["proj"]) == 1


def test_penalty_is_the_explicit_formula_and_reaches_only_the_current_A(tmp_path):
    """o3.md property 2: λ_o · (1/N_L) · Σ_modules Σ_{i<t} ‖Â_i A_curᵀ‖_F², with N_L = 2 decoder layers; 0 for rows
    orthogonal to every snapshot; the gradient reaches only the current A's; the snapshots never change."""
    ctx, strategy = _module(tmp_path, ALL_LINEAR)
    module = ctx.module
    module.begin_experience(1)
    factors = module.lora_factors("default")
    assert strategy.n_layers == 2 and len(factors) == 14
    g = torch.Generator().manual_seed(3)
    snaps = [{layer: torch.randn(A.shape, generator=g) for layer, (A, _) in factors.items()} for _ in range(2)]
    strategy.snapshots = [{k: v.clone() for k, v in s.items()} for s in snaps]
    ctx.experience = 3  # the third request: two snapshots
    strategy.attach(ctx)
    penalty = strategy.penalty(ctx, None)
    explicit = sum(float((s[layer].double() @ A.detach().double().T).square().sum())
                   for s in snaps for layer, (A, _) in factors.items())
    assert math.isclose(float(penalty.detach()), 0.1 * explicit / 2, rel_tol=1e-5)
    penalty.backward()
    assert all(A.grad is not None and B.grad is None for A, B in factors.values())
    assert all(torch.equal(strategy.snapshots[i][k], snaps[i][k]) for i in range(2) for k in snaps[i])
    with torch.no_grad():  # rows orthogonal to every snapshot: Â in the first d/2 coordinates, A in the rest
        for s in strategy.snapshots:
            for layer, (A, _) in factors.items():
                s[layer][:, A.shape[1] // 2:] = 0
                A[:, : A.shape[1] // 2] = 0
    strategy.attach(ctx)
    assert float(strategy.penalty(ctx, None).detach()) == 0.0


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("override", "key"), [
    ("strategy.lambda_o=-0.1", "strategy.lambda_o"),
    ("+strategy.detector.nu=1.5", "strategy.detector.nu"),
    ("+strategy.detector.threshold=0.5", "strategy.detector.threshold"),
    ("strategy.hard_threshold=0.05", "strategy.hard_threshold"),
    ("strategy.quantiser=exam", "strategy.quantiser"),
    ("strategy.quantiser=[{low: 0.5, high: 0.9, scale: 1}, {low: 0.2, high: 0.4, scale: 1}]", "strategy.quantiser"),
    ("strategy.gate=maybe", "strategy.gate"),
    ("strategy.adapters=many", "strategy.adapters"),
])
def test_bad_o3_keys_are_named_before_training(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_config(tmp_path, *SMALL, override)


@pytest.mark.parametrize(("overrides", "key"), [
    (("model.adapter=none", "model.adapter_from=0"), "model.adapter"),
    (("model.adapter_from=0",), "model.adapter_from"),
    (("benchmark.facts=2",), "strategy.detector.train_fraction"),  # 4 forget facts: 3 / 1 cannot split
    (("strategy.select_on=forget",), "strategy.select_on"),  # not a reference set of the stream
    (("+strategy.detector.encoder=/nonexistent/roberta-large",), "strategy.detector.encoder"),
])
def test_o3_refuses_a_model_or_stream_it_cannot_unlearn(tmp_path, overrides, key):
    from clbench.experiment import run

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(run_config(tmp_path, *SMALL, *overrides))


# ------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("o3")


def test_o3_resumed_mid_request_equals_the_uninterrupted_run(store, monkeypatch):
    """Killed in the second request, after request 1's detector was fitted (with checkpoint selection on the
    retain set) and checkpointed: the resumed run re-creates that detector (its encoder adapter, score, SVM and
    weight map) and the snapshot, and ends with the same matrices; every request's inputs still load the LoRA at
    the end (max over detectors)."""
    import clbench.checkpoint

    cfg = run_config(store / "resume", *SMALL, "engine.epochs=2", "engine.lr=0.01", "engine.first_lr=0.003",
                     "strategy.select_on=retain")
    whole, resumed = killed_and_resumed(cfg, monkeypatch, task=2, epoch=0)
    np.testing.assert_array_equal(whole.R, resumed.R)
    for name, M in whole.others.items():
        np.testing.assert_array_equal(M, resumed.others[name], err_msg=name)
    state = clbench.checkpoint.load(clbench.checkpoint.checkpoint_path(cfg))["strategy"]
    assert len(state["snapshots"]) == 2 and len(state["detectors"]) == 2
    assert state["scores"]["o3_orth/2"] > 0  # the single adapter starts request 2 at its own snapshot
    assert state["scores"]["o3_gate_mean/1"] > 0 and state["scores"]["o3_gate_mean/2"] > 0
    assert all(len(d["selection"]) == 2 and d["selected_epoch"] in (0, 1) for d in state["detectors"])
    assert state["scores"]["o3_detector_selected_epoch/2"] == state["detectors"][1]["selected_epoch"]


@pytest.mark.slow
def test_o3_forgets_the_requests_and_keeps_what_the_ungated_lora_loses(store):
    """``experiment=o3_facts``, the table's stand-in cell (results/o3_table.md, seed 0): O3 forgets every requested
    author group (exact match ≤ 10 % after the last request, from ≥ 50 % after learning), keeps modular addition
    exactly (its inputs never load the LoRA) and keeps more retained facts than the same LoRA without the gate,
    which loses them and the modular addition too (measured, seed 0: retain 54.2 vs 12.5 of 79.2 learnt; general
    23 vs 0 of 23)."""
    from clbench.experiment import run
    from clbench.fingerprint import fingerprint
    from clbench.tables import cells, load_spec

    results = {gate: run(run_config(store / f"margin_{gate}", "experiment=o3_facts", f"strategy.gate={gate}"))
               for gate in ("soft", "always")}
    table_cell = next(c for c in cells(load_spec("o3")) if c.method == "o3" and c.column == "facts")
    assert fingerprint(run_config(store, "experiment=o3_facts"), with_seed=False) == table_cell.config_key
    o3, always = results["soft"], results["always"]
    T = o3.R.shape[0] - 1
    assert all(o3.R[0, j] >= 50 for j in range(1, T + 1)), o3.R
    assert all(o3.R[T, j] <= 10 for j in range(1, T + 1)), o3.R
    general = o3.others["exact_match.general"][:, 0]
    assert general[T] == general[0] > always.others["exact_match.general"][T, 0]
    retain_o3, retain_always = o3.others["exact_match.retain"][T, 0], always.others["exact_match.retain"][T, 0]
    assert retain_always <= 20 and retain_o3 >= retain_always + 30, (retain_o3, retain_always)
