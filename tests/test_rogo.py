"""ROGO (rogo.md §6): relaxation off is GPM, Q lies in the frozen space, the search's closed form equals the
code's greedy loop, the raw weights never move inside span(M), the merge adds exactly W Q (S − I) Qᵀ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_config

from clbench.config import ConfigError
from clbench.experiment import run
from clbench.subspace import split_by_alignment
from strategies.rogo import ROGO, relaxation_delta

TASKS = ("benchmark=permuted_digits", "benchmark.n_tasks=3", "engine.epochs=2", "engine.lr=0.05")


def _orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def _greedy(F: torch.Tensor, U: torch.Tensor, eps: float) -> torch.Tensor:
    """The official code's loop (rogo.md §2 R4): repeatedly take the unit vector of span(F) closest to span(U)
    while its cosine is ≥ ε and remove it from F."""
    chosen = []
    P = U @ U.T
    while F.shape[1]:
        _, vecs = torch.linalg.eigh(F.T @ P @ F)
        u = F @ vecs[:, -1:]
        u = u / u.norm()
        if float((P @ u).norm()) < eps:
            break
        chosen.append(u)
        F = torch.linalg.qr(torch.cat([u, F], dim=1))[0][:, 1 : F.shape[1]]
    return torch.cat(chosen, dim=1) if chosen else F[:, :0]


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_search_equals_the_greedy_loop(seed):
    g = torch.Generator().manual_seed(seed)
    d = 12
    U = _orthonormal(d, 4, g)
    # F shares two directions with span(U) nearly and the rest at random
    near = U[:, :2] + 0.05 * torch.randn(d, 2, generator=g, dtype=torch.float64)
    F = torch.linalg.qr(torch.cat([near, torch.randn(d, 4, generator=g, dtype=torch.float64)], dim=1))[0]
    aligned, rest = split_by_alignment(F, U, 0.9)
    loop = _greedy(F, U, 0.9)
    assert aligned.shape[1] == loop.shape[1] >= 2
    torch.testing.assert_close(aligned @ aligned.T, loop @ loop.T, atol=1e-10, rtol=0)  # same subspace
    cos = (U @ U.T @ aligned).norm(dim=0)
    assert bool((cos >= 0.9).all())
    brute = max(float((U.T @ F @ v / v.norm()).norm()) for v in torch.randn(F.shape[1], 20000, generator=g,
                                                                               dtype=torch.float64).T)
    assert float(cos[0]) >= brute - 1e-12  # the first one maximises the cosine over span(F)
    both = torch.cat([aligned, rest], dim=1)
    torch.testing.assert_close(both.T @ both, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(both @ both.T, F @ F.T, atol=1e-12, rtol=0)  # a split of span(F)


def test_mixing_gradient_matches_the_formula_and_finite_differences():
    """∂/∂S of L(W̃) + β‖S − I‖² = Qᵀ Wᵀ G̃ Q + 2β(S − I) (rogo.md §2 R3), in float64."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    Q = _orthonormal(8, 3, g)
    S = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=g, dtype=torch.float64))
    S.requires_grad_(True)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    beta = 0.7

    def loss(S: torch.Tensor) -> torch.Tensor:
        Wt = W + relaxation_delta(W, Q, S)
        return torch.tanh(x @ Wt.T).sum() + beta * ((S - torch.eye(3, dtype=torch.float64)) ** 2).sum()

    (grad,) = torch.autograd.grad(loss(S), S)
    Wt = (W + relaxation_delta(W, Q, S)).detach().requires_grad_(True)
    (G,) = torch.autograd.grad(torch.tanh(x @ Wt.T).sum(), Wt)
    formula = Q.T @ W.T @ G @ Q + 2 * beta * (S.detach() - torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(grad, formula, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(loss, (S,))


def test_rogo_without_relaxation_is_gpm_bit_for_bit(tmp_path):
    gpm = run(run_config(tmp_path, "strategy=gpm", *TASKS))
    rogo = run(run_config(tmp_path, "strategy=rogo", "strategy.search_schedule=never", *TASKS))
    np.testing.assert_array_equal(rogo.R, gpm.R)


def test_relaxation_invariants_along_a_real_run(tmp_path, monkeypatch):
    """With ε_s = 0.5 searches succeed; after every epoch and at the merge, check rogo.md §6 tests 2, 4, 5."""
    checks = {"epochs": 0, "gained": 0, "merges": 0}
    start: dict[str, torch.Tensor] = {}
    probe = {}
    original_before, original_after_epoch = ROGO.before_experience, ROGO.after_epoch
    original_after = ROGO.after_experience

    def before_experience(self, ctx):
        original_before(self, ctx)
        layers = ctx.module.protected_layers()
        start.clear()
        start.update({n: layers[n].weight.detach().clone() for n in self.relaxed})
        x, _, t = ctx.train_source.take(32, torch.Generator().manual_seed(0))
        probe.update(x=x, t=t)

    def after_epoch(self, ctx, report):
        module = ctx.module
        module.eval()
        with torch.no_grad():
            before = module(probe["x"], probe["t"])
        dims = {n: q.shape[1] for n, q in self.relaxed.items()}
        original_after_epoch(self, ctx, report)
        with torch.no_grad():
            after = module(probe["x"], probe["t"])
        module.train()
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)  # a new S block is I: outputs unchanged
        layers = module.protected_layers()
        for name, Q in self.relaxed.items():
            M, F = self.bases[name], self.frozen[name]
            r = Q.shape[1]
            checks["gained"] += r - dims[name]
            assert float(torch.linalg.matrix_norm(Q - M @ (M.T @ Q))) < 1e-5  # Q ⊆ span(M)
            torch.testing.assert_close(Q.T @ Q, torch.eye(r), atol=1e-5, rtol=0)
            assert (Q.T @ F).numel() == 0 or float((Q.T @ F).abs().max()) < 1e-5
            assert r + F.shape[1] == M.shape[1]
            moved = (layers[name].weight.detach() - start[name]).flatten(1) @ M
            assert float(moved.abs().max()) < 1e-5  # the raw W never moves inside span(M)
        checks["epochs"] += 1

    def after_experience(self, ctx):
        layers = ctx.module.protected_layers()
        expected = {n: relaxation_delta(layers[n].weight, q, self.mixing[n]) for n, q in self.relaxed.items()}
        old = {n: layers[n].weight.detach().clone() for n in self.relaxed}
        original_after(self, ctx)
        for name, delta in expected.items():
            M = start_bases[name]
            change = (layers[name].weight.detach() - old[name]).flatten(1)
            torch.testing.assert_close(change @ M @ M.T, delta.flatten(1), atol=1e-5, rtol=0)
            checks["merges"] += 1
        start_bases.clear()
        start_bases.update({n: b.clone() for n, b in self.bases.items()})

    start_bases: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(ROGO, "before_experience", before_experience)
    monkeypatch.setattr(ROGO, "after_epoch", after_epoch)
    monkeypatch.setattr(ROGO, "after_experience", after_experience)
    run(run_config(tmp_path, "strategy=rogo", "strategy.space_threshold=[0.5]", "strategy.beta=0.1", *TASKS))
    assert checks["epochs"] == 6 and checks["merges"] == 6 and checks["gained"] > 0, checks


def test_bad_rogo_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy\.search_schedule"):
        run_config(tmp_path, "strategy=rogo", "strategy.search_schedule=sometimes")
    with pytest.raises(ConfigError, match=r"strategy\.space_threshold"):
        run_config(tmp_path, "strategy=rogo", "strategy.space_threshold=[1.5]")


def test_gradient_basis_source_is_the_transposed_weight_gradient(tmp_path, monkeypatch):
    """basis_source=gradients: R = (∂L/∂W)ᵀ (in × out); with ε = 1 and the paper rule the memory spans it
    (up to the directions below float32 rounding that the update never adds: measured residual ≤ 3e-4·‖R‖)."""
    from strategies.gpm import GPM

    seen = []
    original = GPM.after_experience

    def after_experience(self, ctx):
        reps = self.representations(ctx)
        original(self, ctx)
        layers = ctx.module.protected_layers()
        for name, R in reps.items():
            assert R.shape == layers[name].weight.flatten(1).T.shape
            M = self.bases[name]
            assert float(torch.linalg.matrix_norm(R - M @ (M.T @ R))) < 1e-2 * float(torch.linalg.matrix_norm(R))
            seen.append(name)

    monkeypatch.setattr(GPM, "after_experience", after_experience)
    run(run_config(tmp_path, "strategy=gpm", "strategy.basis_source=gradients", "strategy.rank_rule=paper",
                   "strategy.threshold=[1.0]", "benchmark=permuted_digits", "benchmark.n_tasks=2", "engine.epochs=1"))
    assert seen == ["hidden.0", "hidden.1", "head"] * 2
