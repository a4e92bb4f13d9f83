"""HLOP (hlop.md "What a correct implementation must satisfy"): the projection removes the learned component, no
rows is naive, old rows stay frozen, exact rows protect old outputs, a resumed run repeats, HLOP forgets far
less than SNN naive and about as little as the exact (SVD) rows of the same size."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import run_config
from torch import nn

from clbench.config import ConfigError
from clbench.experiment import run
from clbench.subspace import LayerProjector
from strategies.hlop import HLOP, HLOPConfig

# hlop.md "Offline stand-ins" at CI size: DSR spiking MLP 64-256-256-10, T = 6, permuted digits, batch 32, lr 0.05
SNN = ("model=snn_mlp", "model.hidden=[256,256]", "model.time_steps=6", "benchmark=permuted_digits",
       "engine.batch_size=32", "engine.lr=0.05")
ROWS = ("strategy.rows=[[20,60,60],[10,40,40]]", "strategy.hebbian_lr=[0.5]", "strategy.lr_normalize=true")


@pytest.mark.parametrize("form", ["gradient", "input"])
def test_projection_is_g_minus_g_ht_h_for_rows_that_are_not_orthonormal(form):
    """HLOP's G (I − H_oldᵀ H_old) with under-converged rows (no projector): exactly that, in both forms, and
    nothing left in span(H_old) when the rows are orthonormal."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    x = torch.randn(10, 6, generator=g)
    for H in (0.6 * torch.randn(4, 6, generator=g), torch.linalg.qr(torch.randn(6, 4, generator=g))[0].T):  # 2k > d
        layer.weight.grad = None
        raw = torch.autograd.grad(layer(x).pow(2).sum(), layer.weight)[0]
        projector = LayerProjector(layer, H.T, form=form, orthonormal=False)
        projector.attach()
        layer(x).pow(2).sum().backward()
        projector.project_()
        projector.detach()
        G = layer.weight.grad
        torch.testing.assert_close(G, raw - raw @ H.T @ H)
        if torch.allclose(H @ H.T, torch.eye(4), atol=1e-6):  # orthonormal rows: nothing left in their span
            assert float((G @ H.T).abs().max()) < 1e-5
    conv = nn.Conv2d(3, 5, 3, bias=False)
    H = torch.randn(9, 27, generator=g) / 5
    conv.weight.grad = torch.randn(conv.weight.shape, generator=g)
    raw = conv.weight.grad.reshape(5, -1).clone()
    LayerProjector(conv, H.T, form="gradient", orthonormal=False).project_()
    torch.testing.assert_close(conv.weight.grad.reshape(5, -1), raw - raw @ H.T @ H)


def test_no_rows_is_naive_bit_for_bit(tmp_path):
    args = (*SNN, "benchmark.n_tasks=2", "engine.epochs=1")
    naive = run(run_config(tmp_path, "strategy=naive", *args))
    off = ("strategy.rows=[[0]]", "strategy.freeze_bn=false", "strategy.freeze_thresholds=false",
           "strategy.freeze_1d=false")
    hlop = run(run_config(tmp_path, "strategy=hlop", *args, *off))
    np.testing.assert_array_equal(hlop.R, naive.R)


def test_old_rows_stay_frozen_and_new_rows_learn_the_residual_subspace(tmp_path, monkeypatch):
    """Measured (seed 0, 3 tasks × 2 epochs): after task 1 every eigenvalue of H_oldᵀH_old is in [1.00, 1.05];
    the new rows capture 0.84-0.97 of the residual energy the exact SVD rows of the same size capture."""
    history: list[tuple[dict[str, torch.Tensor], dict[str, float]]] = []
    original = HLOP.after_experience

    def after_experience(self, ctx):
        original(self, ctx)
        history.append(({k: v.weight.clone() for k, v in self.learners.items()}, self.diagnostics()))

    monkeypatch.setattr(HLOP, "after_experience", after_experience)
    res = run(run_config(tmp_path, "strategy=hlop", *SNN, *ROWS, "benchmark.n_tasks=3", "engine.epochs=2"))
    (first, diag1), (second, _), (third, _) = history
    for name, rows in first.items():
        assert torch.equal(second[name][: rows.shape[0]], rows)  # bitwise frozen
        assert torch.equal(third[name][: second[name].shape[0]], second[name])
        assert 0.98 < diag1[f"proj_eig_min/{name}"] <= diag1[f"proj_eig_max/{name}"] < 1.1  # converged on task 1
    assert [first[n].shape[0] for n in first] == [20, 60, 60]
    assert [third[n].shape[0] for n in third] == [40, 140, 140]
    ratios = [v for _, d in history for k, v in d.items() if k.startswith("energy_ratio/")]
    assert len(ratios) == 9 and min(ratios) > 0.75 and max(ratios) <= 1.0 + 1e-9, ratios
    assert np.isfinite(res.R).all()


def test_exact_rows_that_capture_every_input_keep_old_outputs(tmp_path, monkeypatch):
    """hlop.md test 6 on a plain MLP (no spikes to flip at a threshold): the SVD rows hold the whole span of every
    layer's input on all of task 1's training samples, so training task 2 leaves its outputs unchanged."""
    outputs: list[torch.Tensor] = []
    original = HLOP.after_experience

    def after_experience(self, ctx):
        original(self, ctx)
        if ctx.experience == 0:
            self.probe = ctx.train_source.take(10_000)
        x, _, t = self.probe
        with torch.no_grad():
            ctx.module.eval()
            outputs.append(ctx.module(x, t).clone())
            ctx.module.train()

    monkeypatch.setattr(HLOP, "after_experience", after_experience)
    run(run_config(tmp_path, "strategy=hlop", "model=mlp", "benchmark=permuted_digits", "benchmark.n_tasks=2",
                   "engine.epochs=2", "engine.lr=0.05", "strategy.subspace_method=svd", "strategy.rows=[[1000]]",
                   "strategy.samples=10000", "strategy.activity=steps"))
    before, after = outputs
    assert float((after - before).abs().max()) < 1e-4 * float(before.abs().max())


def test_resume_mid_experience_repeats_the_run(tmp_path, monkeypatch):
    import clbench.experiment

    args = ("strategy=hlop", *SNN, *ROWS, "benchmark.n_tasks=2", "engine.epochs=3")
    full = run(run_config(tmp_path / "full", *args))
    original = clbench.experiment.Tracker.log_metrics

    def log_metrics(self, values, step):
        if "loss" in values and step == 4:  # experience 2, epoch 2: its epoch-1 snapshot is on disk
            raise KeyboardInterrupt
        original(self, values, step)

    monkeypatch.setattr(clbench.experiment.Tracker, "log_metrics", log_metrics)
    with pytest.raises(KeyboardInterrupt):
        run(run_config(tmp_path / "cut", *args))
    monkeypatch.undo()
    resumed = run(run_config(tmp_path / "cut", *args, "resume=true"))
    np.testing.assert_allclose(resumed.R, full.R, atol=1e-6)


def test_bad_rows_and_activity_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy\.rows.*3 protected layers"):
        run(run_config(tmp_path, "strategy=hlop", *SNN, "strategy.rows=[[1,2]]"))
    with pytest.raises(ConfigError, match=r"strategy\.activity=rate"):
        run(run_config(tmp_path, "strategy=hlop", "model=mlp", "benchmark=permuted_digits", "strategy.activity=rate"))
    with pytest.raises(ConfigError, match=r"strategy\.subspace_method"):
        run_config(tmp_path, "strategy=hlop", "strategy.subspace_method=pca")
    assert not (tmp_path / "mlflow.db").exists()


def test_hlop_at_its_default_hebbian_settings_forgets_far_less_than_snn_naive(tmp_path):
    """The defaults (η = 0.001, 0.01, 0.01; 5 iterations; momentum 0.9; hebbian_samples = 60,000, here 40 extra
    Hebbian passes a task), with row counts scaled to the 64-256-256 net. Measured (seed 0, 3 tasks × 2 epochs):
    naive ACC 64.62 / BWT −30.64, HLOP 81.99 / +0.42 (Hebbian in the training passes only: 82.08 / −1.81; no
    rows, i.e. no protection: naive's R, so this fails)."""
    args = (*SNN, "benchmark.n_tasks=3", "engine.epochs=2", "seed=0")
    naive = run(run_config(tmp_path, "strategy=naive", *args)).scores
    hlop = run(run_config(tmp_path, "strategy=hlop", "strategy.rows=[[20,60,60],[10,40,40]]", *args)).scores
    assert hlop["bwt"] > naive["bwt"] + 20.0, (hlop, naive)
    assert hlop["acc"] > naive["acc"] + 10.0, (hlop, naive)


@pytest.mark.slow
def test_hlop_at_its_defaults_on_the_pmnist_stand_in_beats_snn_naive_and_matches_gpm(tmp_path):
    """The HLOP table's stand-in cell (results/hlop_table.md: permuted_mnist_5k, spiking MLP 784-800-800, DSR,
    T = 20, 1 epoch, batch 64, lr 0.1), seed 0, every strategy at its defaults. Measured: naive 80.83 / −8.43,
    GPM 85.31 / −1.31, HLOP 86.73 / −1.16; HLOP with Hebbian steps in the training passes only
    (hebbian_samples=0, the code's loop: 15× fewer updates here) 79.63 / −9.14, which fails the first assert.
    About 10 minutes on one CPU thread."""
    args = ("benchmark=permuted_mnist_5k", "model=snn_mlp", "engine.epochs=1", "engine.batch_size=64",
            "engine.lr=0.1", "engine.eval_batch_size=64", "seed=0")
    scores = {name: run(run_config(tmp_path, f"strategy={name}", *args)).scores for name in ("naive", "gpm", "hlop")}
    assert scores["hlop"]["bwt"] > scores["naive"]["bwt"] + 5.0, scores
    assert scores["hlop"]["acc"] > scores["naive"]["acc"] + 4.0, scores
    assert scores["hlop"]["acc"] > scores["gpm"]["acc"] - 1.0, scores


@pytest.mark.slow  # a variant; the defaults' protection is the fast test above
def test_hlop_with_normalised_eta_0_5_forgets_far_less_than_snn_naive_and_close_to_exact_rows(tmp_path):
    """The lr-normalised variant (η_l = 0.5 / E‖x‖², a deviation) with Hebbian steps in the training passes only
    (hebbian_samples=0, the code's loop). Measured (3 tasks × 2 epochs), BWT over seeds 0-3: naive −30.6,
    −40.7, −46.1, −37.7; HLOP −1.1, −3.5, −3.2, −1.5; exact (SVD) rows of the same size +1.1, −2.4, −1.5, −1.8.
    Seeds 0-1: naive −35.7, HLOP −2.3, SVD −0.6 (ACC 62.1, 80.7, 80.6)."""
    args = (*SNN, "benchmark.n_tasks=3", "engine.epochs=2")
    variant = (*ROWS, "strategy.hebbian_samples=0")
    bwt = {}
    for name, extra in (("naive", ("strategy=naive",)), ("hlop", ("strategy=hlop", *variant)),
                        ("svd", ("strategy=hlop", *variant, "strategy.subspace_method=svd"))):
        bwt[name] = np.mean([run(run_config(tmp_path, *extra, f"seed={s}", *args)).scores["bwt"] for s in (0, 1)])
    assert bwt["hlop"] > bwt["naive"] + 20.0, bwt
    assert bwt["hlop"] > bwt["svd"] - 5.0, bwt


@pytest.mark.parametrize(("n", "epochs", "passes"), [(60_000, 1, 0), (5_000, 200, 0), (2_500, 100, 0),
                                                      (4_000, 1, 14), (1_437, 2, 40), (30_000, 1, 1)])
def test_extra_hebbian_passes_bring_a_task_up_to_the_papers_60k_samples(n, epochs, passes):
    """p = ⌈(S − E·n)/n⌉ with S = 60,000 by default: none on the published settings (PMNIST 60k × 1 epoch,
    CIFAR-100 5k × 200, miniImageNet 2.5k × 100), 14 on permuted_mnist_5k (4,000 × 1), none with S = 0."""
    ctx = SimpleNamespace(train_source=[None] * n, epochs=epochs)
    assert HLOP(HLOPConfig()).extra_passes(ctx) == passes
    assert HLOP(HLOPConfig(hebbian_samples=0)).extra_passes(ctx) == 0
    assert HLOP(HLOPConfig(hebbian_samples=None)).extra_passes(ctx) == 0


def test_a_precomputed_residual_gives_the_same_hebbian_step():
    """The extra passes form X − H_oldᵀH_old X once per task; a step on it equals the step that forms it."""
    from clbench.subspace import HebbianSubspace

    g = torch.Generator().manual_seed(0)
    a = HebbianSubspace(40)
    a.add_rows(6, generator=g)
    a.merge()
    a.add_rows(4, generator=g)
    b = HebbianSubspace(40)
    b.load_state_dict(a.state_dict())
    X = torch.randn(200, 40, generator=g)
    R = a.residual(X)
    for idx in torch.randperm(200, generator=g).split(32):
        a.step(X[idx])
        b.step(X[idx], residual=R[idx])
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="residual"):
        b.step(X[:8], residual=R[:4])


def test_config_dataclass_defaults_are_the_pmnist_code():
    cfg = HLOPConfig()
    assert cfg.rows[0] == [80, 200, 100] and cfg.rows[-1] == [10] and len(cfg.rows) == 10
    assert dataclasses.asdict(cfg)["hebbian_lr"] == [0.001, 0.01, 0.01]
