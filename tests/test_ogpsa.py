"""OGPSA: the reference-subspace projection's properties (ogpsa.md §7) and the strategy's step, refresh and hygiene.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import gen
from lightning.fabric import Fabric
from torch import nn

from clbench.config import ConfigError, EngineConfig, StrategyConfig
from clbench.context import Context
from clbench.engine import Engine
from clbench.models.base import ContinualModel
from clbench.streams.batches import TensorBatchSource
from clbench.subspace.reference import gram_schmidt_rows, project_gradients, reference_basis
from strategies.base import Strategy
from strategies.ogpsa import OGPSA, OGPSAConfig

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 6)}


def _grads(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {n: torch.randn(*s, generator=g, dtype=torch.float64).float() * scale for n, s in SHAPES.items()}


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def _project(g: dict[str, torch.Tensor], basis, mode: str = "orthogonal") -> dict[str, torch.Tensor]:
    out = {n: v.clone() for n, v in g.items()}
    project_gradients(out, basis, mode)
    return out


# ---------------------------------------------------------------------------------------------- the projection


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_the_projected_gradient_is_orthogonal_to_every_reference_gradient(granularity):
    refs = [_grads(1), _grads(2)]
    basis = reference_basis(refs, granularity)
    g = _grads(3)
    p = _project(g, basis)
    if granularity == "per_tensor":
        for n, U in basis.items():
            assert (U @ p[n].reshape(-1)).abs().max() <= 1e-6 * g[n].norm()
    for r in refs:  # blockwise orthogonality implies orthogonality to each flattened reference gradient
        assert abs(float(_flat(p) @ _flat(r))) <= 1e-5 * float(_flat(g).norm() * _flat(r).norm())


def test_the_projector_is_idempotent_shortening_a_descent_direction_and_exact_on_s_and_its_complement():
    basis = reference_basis([_grads(1), _grads(2)])
    g = _grads(3)
    p = _project(g, basis)
    pp = _project(p, basis)
    for n in g:
        torch.testing.assert_close(pp[n], p[n], rtol=0, atol=1e-6)
    assert _flat(p).norm() <= _flat(g).norm()
    torch.testing.assert_close(_flat(p) @ _flat(g), _flat(p).norm() ** 2, rtol=1e-5, atol=0)
    in_s = {n: 0.7 * a - 2.0 * b for (n, a), b in zip(_grads(1).items(), _grads(2).values(), strict=True)}
    assert _flat(_project(in_s, basis)).abs().max() <= 1e-5
    plane = _project(g, basis, "plane")  # g − Pg lies in S and Pg in S⊥, so Pg is unchanged by P
    orth = {n: g[n] - plane[n] for n in g}
    for n in g:
        torch.testing.assert_close(_project(orth, basis)[n], orth[n], rtol=0, atol=1e-5)


def test_rescaled_or_swapped_references_give_the_same_projection():
    a, b = _grads(1), _grads(2)
    g = _grads(3)
    ref = _project(g, reference_basis([a, b]))
    for refs in ([{n: v * 1e3 for n, v in a.items()}, {n: v * 1e-3 for n, v in b.items()}], [b, a]):
        out = _project(g, reference_basis(refs))
        for n in g:
            torch.testing.assert_close(out[n], ref[n], rtol=0, atol=1e-5)


def test_parallel_references_give_rank_one_and_a_zero_tensor_is_left_unprojected():
    a = _grads(1)
    a["b.weight"].zero_()
    basis = reference_basis([a, {n: -4.0 * v for n, v in a.items()}])
    assert {n: U.shape[0] for n, U in basis.items()} == {"a.weight": 1, "a.bias": 1}  # no b.weight basis
    assert all(torch.isfinite(U).all() for U in basis.values())
    g = _grads(3)
    p = _project(g, basis)
    assert torch.equal(p["b.weight"], g["b.weight"])
    assert gram_schmidt_rows(torch.zeros(2, 4)).shape == (0, 4)


@pytest.mark.parametrize("mode", ["orthogonal", "plane"])
def test_projecting_micro_batches_then_summing_equals_projecting_the_sum(mode):
    basis = reference_basis([_grads(1), _grads(2)])
    g1, g2 = _grads(3), _grads(4)
    summed = _project({n: g1[n] + g2[n] for n in g1}, basis, mode)
    parts = _project(g1, basis, mode), _project(g2, basis, mode)
    for n in g1:
        torch.testing.assert_close(parts[0][n] + parts[1][n], summed[n], rtol=0, atol=1e-5)


def test_threshold_mode_is_not_linear():
    """One direction u: a gradient against u loses its u-part, one along u is kept (scaled): the sum of two such
    gradients is treated unlike its parts."""
    u = {n: torch.zeros(*s) for n, s in SHAPES.items()}
    u["a.bias"][0] = 1.0
    basis = reference_basis([u])
    along = {n: torch.zeros(*s) for n, s in SHAPES.items()}
    along["a.bias"][0] = 3.0
    against = {n: -v / 3.0 for n, v in along.items()}
    parts = _project(along, basis, "threshold")["a.bias"][0] + _project(against, basis, "threshold")["a.bias"][0]
    summed = _project({n: along[n] + against[n] for n in along}, basis, "threshold")["a.bias"][0]
    assert float(parts) == 3.0 and float(summed) == 2.0


# ------------------------------------------------------------------------------------------------- first order


class _Net(ContinualModel):
    """A small nonlinear regressor with a frozen tensor; ``loss`` as clbench's models have it (its likelihood
    loss is the same)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 1)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return ((self.b(torch.tanh(self.a(x))).squeeze(-1) - y) ** 2).mean()


def _data(seed: int, n: int = 24, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(seed)
    x = torch.randn(n, 5, generator=g) + shift
    return x, torch.sin(x.sum(1)) + shift, torch.zeros(n, dtype=torch.long)


def _grad(net: _Net, batch) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(net.loss(batch), list(params.values())), strict=True))


def test_under_sgd_the_reference_loss_changes_at_second_order_only():
    """ΔL_ref(η)/η → 0 as η → 0 with the projection; → −⟨∇L_ref, g⟩ without (ogpsa.md §7.4)."""
    net = _Net().double()
    train, ref = _data(1), _data(2, shift=0.5)
    train = tuple(t.double() if t.is_floating_point() else t for t in train)
    ref = tuple(t.double() if t.is_floating_point() else t for t in ref)
    g, r = _grad(net, train), _grad(net, ref)
    basis = reference_basis([r])
    pg = {n: v.clone() for n, v in g.items()}
    project_gradients(pg, basis)
    inner = float(_flat(r) @ _flat(g))

    def change(step: dict[str, torch.Tensor], eta: float) -> float:
        twin = _Net().double()
        twin.load_state_dict(net.state_dict())
        with torch.no_grad():
            for n, p in twin.named_parameters():
                if n in step:
                    p -= eta * step[n]
            return float(twin.loss(ref) - net.loss(ref)) / eta

    assert abs(change(g, 1e-6) + inner) <= 1e-3 * abs(inner)  # first order: −⟨∇L_ref, g⟩
    ratios = [abs(change(pg, eta)) for eta in (1e-2, 1e-3, 1e-4)]
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] <= 1e-3 * abs(inner)  # O(η): second order only


def test_under_adam_the_guarantee_does_not_hold():
    """Adam rescales each coordinate, so its step D⁻¹ᐟ²·Pg is not orthogonal to ∇L_ref (ogpsa.md §10): the
    reference loss moves at first order. Documented, not a defect of the projection."""
    net = _Net()
    train, ref = _data(1), _data(2, shift=0.5)
    r = _grad(net, ref)
    basis = reference_basis([r])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    for p, v in zip([p for p in net.parameters() if p.requires_grad], _grad(net, train).values(), strict=True):
        p.grad = v
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    project_gradients(grads, basis)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    step = _flat({n: before[n] - p.detach() for n, p in net.named_parameters() if p.requires_grad})

    def cos(v: torch.Tensor) -> float:
        return abs(float(v @ _flat(r)) / float(v.norm() * _flat(r).norm()))

    assert cos(_flat(grads)) < 1e-6  # an SGD step (along Pg) is orthogonal to ∇L_ref
    assert cos(step) > 1e-3  # Adam's first step, ~lr·sign(Pg), is not (measured: 4.4e-3 here)


# ---------------------------------------------------------------------------------------------- the strategy


def _ctx(net: _Net, refs: dict[str, TensorBatchSource], batch_size: int = 4, n_tasks: int = 1) -> Context:
    stream = SimpleNamespace(references=refs, spec=SimpleNamespace(name="toy", n_tasks=n_tasks))
    return Context(model=net, module=net, fabric=Fabric(accelerator="cpu", devices=1), stream=stream,  # type: ignore[arg-type]
                   seed=0, batch_size=batch_size, sources=lambda source: source,
                   train_source=TensorBatchSource(*_data(1, n=40)))


def _refs() -> dict[str, TensorBatchSource]:
    return {"shifted": TensorBatchSource(*_data(2, shift=0.5)), "scaled": TensorBatchSource(*_data(3, shift=-1.0))}


class _Recording(OGPSA):
    """OGPSA that records the step of each build and checks each projected gradient against the basis in use."""

    def __init__(self, cfg: OGPSAConfig) -> None:
        super().__init__(cfg)
        self.builds: list[int] = []
        self.worst = 0.0

    def build(self, ctx: Context) -> None:
        super().build(ctx)
        self.builds.append(self.steps)

    def project(self, ctx: Context) -> None:
        super().project(ctx)
        for n, p in ctx.module.named_parameters():
            if n in self.basis and p.grad is not None:
                self.worst = max(self.worst, float((self.basis[n] @ p.grad.reshape(-1)).abs().max() /
                                                   p.grad.norm().clamp_min(1e-30)))


def _fit(strategy: Strategy, epochs: int = 1, experience: int = 0, **engine: object) -> _Net:
    net = _Net()
    ctx = _ctx(net, _refs(), n_tasks=experience + 1)
    ctx.experience = experience
    cfg = EngineConfig(epochs=epochs, batch_size=4, lr=0.05, **engine)  # type: ignore[arg-type]
    eng = Engine(cfg, ctx.fabric)
    strategy.setup(ctx)
    strategy.before_experience(ctx)
    ctx.optimizer = eng.optimizer(strategy.parameters_to_train(ctx), 0)
    ctx.schedule = eng.schedule(ctx.optimizer, net)
    strategy.attach(ctx)
    torch.manual_seed(5)
    eng.fit(ctx, strategy, 0, lambda *a, **k: None)
    return net


@pytest.mark.parametrize("engine", [{}, {"clip_norm": 1.0, "accumulate": 2}], ids=["plain", "clip+accumulate"])
def test_bases_are_rebuilt_every_k_steps_and_every_applied_gradient_is_orthogonal_to_them(engine):
    strategy = _Recording(OGPSAConfig(name="ogpsa", ref_sets=["shifted", "scaled"], refresh_every=3,
                                      ref_samples=12))
    _fit(strategy, epochs=1, **engine)
    steps = strategy.steps
    assert strategy.builds == list(range(0, steps, 3)) and steps >= 5
    assert strategy.worst <= 1e-6


def test_refresh_every_may_give_one_k_per_experience():
    """SFT→DPO at the code's values: K = 5 in the second stage."""
    strategy = _Recording(OGPSAConfig(name="ogpsa", ref_sets=["shifted"], refresh_every=[30, 5], ref_samples=12))
    _fit(strategy, epochs=2, experience=1)
    assert strategy.builds == list(range(0, strategy.steps, 5)) and strategy.steps > 10
    with pytest.raises(ConfigError, match=r"strategy\.refresh_every.*3 values for 2 experiences"):
        OGPSA(OGPSAConfig(name="ogpsa", ref_sets=["shifted"], refresh_every=[30, 5, 5])).setup(
            _ctx(_Net(), _refs(), n_tasks=2))


def test_ref_sets_may_give_one_list_per_experience():
    """The code's SFT→DPO: two sets in the first stage, one other set in the second."""
    strategy = _Recording(OGPSAConfig(name="ogpsa", ref_sets=[["shifted", "scaled"], ["scaled"]], refresh_every=4,
                                      ref_samples=12))
    _fit(strategy, experience=1)
    assert set(strategy.diagnostics()) >= {"ogpsa/ref_loss/scaled"}
    assert "ogpsa/ref_loss/shifted" not in strategy.diagnostics()
    assert all(U.shape[0] == 1 for U in strategy.basis.values())  # one set: rank 1 a tensor
    assert strategy.worst <= 1e-6
    with pytest.raises(ConfigError, match=r"strategy\.ref_sets.*3 lists for 2 experiences"):
        OGPSA(OGPSAConfig(name="ogpsa", ref_sets=[["shifted"], ["scaled"], ["shifted"]])).setup(
            _ctx(_Net(), _refs(), n_tasks=2))


def test_a_build_leaves_parameters_gradients_optimizer_and_random_state_untouched():
    net = _Net()
    ctx = _ctx(net, _refs())
    strategy = OGPSA(OGPSAConfig(name="ogpsa", ref_sets=["shifted", "scaled"]))
    strategy.setup(ctx)
    strategy.before_experience(ctx)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net.loss(tuple(ctx.train_source.all())).backward()
    opt.step()
    before = ({n: p.detach().clone() for n, p in net.named_parameters()},
              {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
              {k: {a: b.clone() if torch.is_tensor(b) else b for a, b in v.items()}
               for k, v in opt.state_dict()["state"].items()}, torch.get_rng_state())
    strategy.build(ctx)
    assert all(torch.equal(p, before[0][n]) for n, p in net.named_parameters())
    assert all(torch.equal(p.grad, before[1][n]) for n, p in net.named_parameters() if p.grad is not None)
    assert all(torch.equal(v, before[2][k][a]) for k, s in opt.state_dict()["state"].items()
               for a, v in s.items() if torch.is_tensor(v))
    assert torch.equal(torch.get_rng_state(), before[3])
    assert "frozen" not in strategy.basis and set(strategy.basis) <= {n for n, p in net.named_parameters()
                                                                      if p.requires_grad}


def test_the_bases_are_the_raw_reference_gradients_span():
    """A build's basis spans exactly the mean gradients of the sets at the current θ (not projected ones)."""
    net = _Net()
    ctx = _ctx(net, _refs())
    strategy = OGPSA(OGPSAConfig(name="ogpsa", ref_sets=["shifted"], ref_samples=8))
    strategy.setup(ctx)
    strategy.before_experience(ctx)
    strategy.build(ctx)
    x, y, t = _data(2, shift=0.5)
    halves = [(x[:4], y[:4], t[:4]), (x[4:8], y[4:8], t[4:8])]  # the first 8 samples in batches of 4
    mean = {n: (a + b) / 2 for (n, a), b in zip(_grad(net, halves[0]).items(), _grad(net, halves[1]).values(),
                                                  strict=True)}
    for n, U in strategy.basis.items():
        torch.testing.assert_close(U[0], mean[n].reshape(-1) / mean[n].norm(), rtol=0, atol=1e-6)


def test_mode_none_is_the_plain_run_bit_for_bit():
    plain = _fit(Strategy(StrategyConfig()), epochs=2)
    off = _fit(OGPSA(OGPSAConfig(name="ogpsa", mode="none")), epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values(),
                                                  strict=True))
    projected = _fit(OGPSA(OGPSAConfig(name="ogpsa", ref_sets=["shifted"])), epochs=2)
    assert not torch.equal(projected.a.weight, plain.a.weight)
    assert torch.equal(projected.frozen, plain.frozen)


@pytest.mark.parametrize(("values", "key"), [
    ({"ref_sets": []}, "strategy.ref_sets"),
    ({"ref_sets": ["a", "a"]}, "strategy.ref_sets"),
    ({"ref_sets": [["a"], []]}, "strategy.ref_sets"),
    ({"ref_sets": [["a"], "b"]}, "strategy.ref_sets"),
    ({"ref_sets": [["a", "b"], ["c"]], "mode": "threshold"}, "strategy.ref_sets"),
    ({"ref_sets": ["a", "b"], "mode": "threshold"}, "strategy.ref_sets"),
    ({"ref_sets": ["a"], "refresh_every": 0}, "strategy.refresh_every"),
    ({"ref_sets": ["a"], "refresh_every": [30, 0]}, "strategy.refresh_every"),
    ({"ref_sets": ["a"], "refresh_every": []}, "strategy.refresh_every"),
    ({"ref_sets": ["a"], "refresh_every": 2.5}, "strategy.refresh_every"),
    ({"ref_sets": ["a"], "ref_samples": 0}, "strategy.ref_samples"),
    ({"ref_sets": ["a"], "mode": "sideways"}, "strategy.mode"),
    ({"ref_sets": ["a"], "granularity": "layer"}, "strategy.granularity"),
])
def test_bad_keys_are_refused_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        OGPSAConfig(name="ogpsa", **values).validate()


def test_an_unknown_reference_set_is_refused_listing_the_streams_sets():
    strategy = OGPSA(OGPSAConfig(name="ogpsa", ref_sets=["shifted", "maths"]))
    with pytest.raises(ConfigError, match=r"'maths' is not a reference set.*\['scaled', 'shifted'\]"):
        strategy.setup(_ctx(_Net(), _refs()))


def test_the_svd_variant_keeps_the_top_directions_of_the_per_batch_gradients():
    """Rows from batches in a 2-dimensional span: rank 3 asked, 2 kept, orthonormal, spanning them."""
    a, b = _grads(1), _grads(2)
    rows = [{n: c1 * a[n] + c2 * b[n] for n in a} for c1, c2 in ((1.0, 0.5), (-2.0, 1.0), (0.3, 0.3))]
    basis = reference_basis(rows, basis="svd", rank=3)
    for U in basis.values():
        assert U.shape[0] == 2
        torch.testing.assert_close(U @ U.T, torch.eye(2), rtol=0, atol=1e-5)
    for r in rows:  # each row lies in the span: nothing of it survives the projection
        assert _flat(_project(r, basis)).abs().max() <= 1e-4 * _flat(r).norm()


def test_the_logged_cosine_is_the_mean_share_of_the_gradient_in_the_reference_subspace():
    strategy = _Recording(OGPSAConfig(name="ogpsa", ref_sets=["shifted", "scaled"], refresh_every=4,
                                      ref_samples=12))
    _fit(strategy)
    out = strategy.diagnostics()
    assert 0.0 < out["ogpsa/cos_g_S"] <= 1.0 and out["ogpsa/removed"] == out["ogpsa/cos_g_S"]
    assert out["ogpsa/refreshes"] == len(strategy.builds)
    assert set(k for k in out if k.startswith("ogpsa/ref_loss/")) == {"ogpsa/ref_loss/shifted",
                                                                     "ogpsa/ref_loss/scaled"}
    # two sets: rank 2 a tensor, but 1 for the one-element bias of b (rank ≤ its size)
    assert out["ogpsa/basis_floats"] == sum(min(2, p.numel()) * p.numel() for p in _Net().parameters()
                                            if p.requires_grad)


def test_safety_toy_has_general_then_safety_with_fresh_reference_sets_and_unseen_test_verbs(tmp_path):
    from helpers import run_config

    from clbench.streams import build_stream
    from clbench.streams.alignment import HARMFUL, REFUSE, VERBS_TEST, VERBS_TRAIN

    cfg = run_config(tmp_path, "benchmark=safety_toy", "model=causal_lm", "engine=lm", "benchmark.per_class=30",
                     "benchmark.max_test_per_task=30")
    stream = build_stream(cfg.benchmark, 0)
    train = [list(e.dataset) for e in stream.benchmark.train_stream]
    test = [list(e.dataset) for e in stream.benchmark.test_stream]
    assert [len(t) for t in train] == [90, 30] and [len(t) for t in test] == [30, 30]
    assert all(s.answer == REFUSE and s.prompt.split()[3] in VERBS_TRAIN for s in train[1])
    assert all(s.answer == REFUSE and s.prompt.split()[3] in VERBS_TEST for s in test[1])
    assert not any(s.answer == REFUSE or any(h in s.prompt for h in HARMFUL) for s in train[0] + test[0])
    assert sorted(stream.references) == ["arithmetic", "howto", "recall"]
    seen = {s.prompt for s in train[0]}
    ref = [s.prompt for s in stream.references["recall"]]
    assert len(ref) == 30 and len(set(ref) & seen) < 3  # fresh draws (a 3-key recall prompt rarely repeats)
    again = build_stream(cfg.benchmark, 0)
    assert [s.prompt for s in again.benchmark.train_stream[1].dataset] == [s.prompt for s in train[1]]
