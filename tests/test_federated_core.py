"""Tests of the federated building blocks (fot.md §7): partitions, GPSE, FedProject, secure sum, bytes."""

from __future__ import annotations

import pytest
import torch
from helpers import gen
from torch import Tensor, nn

from clbench.federated import (
    GPSEConfig,
    PairwiseMasking,
    ResidualSketcher,
    Traffic,
    client_sketch,
    dirichlet_partition,
    effective_threshold,
    expand_basis,
    gpse_traffic,
    iid_partition,
    mean_ratio,
    pack_sketches,
    partition,
    project_update,
    round_traffic,
    secure_sum,
    shard_partition,
    sketch_shapes,
    sum_sketches,
    tensor_bytes,
    unpack_sketches,
)
from clbench.subspace import extend_basis, principal_angles, threshold_basis

torch.set_num_threads(1)

GPM_EXACT = GPSEConfig(sketch="gram", ratio="squared", ratio_mean="pooled", always_add=False)




def _orthonormal(d: int, k: int, seed: int) -> Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen(seed), dtype=torch.float64))[0]


def _low_rank(B: Tensor, n: int, seed: int) -> Tensor:
    """n columns in span(B) with well-spread coefficients (rank B exactly)."""
    return B @ torch.randn(B.shape[1], n, generator=gen(seed), dtype=torch.float64)


def _decaying(d: int, n: int, seed: int, axes: int | None = None) -> Tensor:
    """Full-rank activations with a decaying spectrum along random axes (seeded by ``axes``, default seed)."""
    g = gen(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    rotation = _orthonormal(d, d, 100 + (seed if axes is None else axes))
    return rotation @ (scales[:, None] * torch.randn(d, n, generator=g, dtype=torch.float64))


def _split(A: Tensor, sizes: list[int]) -> list[Tensor]:
    assert sum(sizes) == A.shape[1]
    return list(A.split(sizes, dim=1))


def _server(basis: Tensor | None, parts: list[Tensor], eps: float, cfg: GPSEConfig, m: int | None) -> Tensor:
    """One GPSE exchange: every client sketches its part with its own generator; the server sums and expands."""
    uploads = [
        {"w": client_sketch(A, basis, m, None if cfg.sketch == "gram" else gen(1000 + k), cfg)}
        for k, A in enumerate(parts)
    ]
    return expand_basis(basis, sum_sketches(uploads)["w"], eps, cfg)


def _max_angle(A: Tensor, B: Tensor) -> float:
    return float(principal_angles(A, B).max())


def _assert_orthonormal(U: Tensor) -> None:
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    assert float((U.T @ U - eye).abs().max()) < 1e-10


# ---------------------------------------------------------------- partitions


def _assert_cover(parts: list[Tensor], n: int) -> None:
    allidx = torch.cat(parts)
    assert allidx.numel() == n
    assert torch.equal(allidx.sort().values, torch.arange(n))


def test_iid_covers_every_index_once_and_is_seeded() -> None:
    parts = iid_partition(103, 10, seed=3)
    _assert_cover(parts, 103)
    assert sorted({p.numel() for p in parts}) == [10, 11]
    again = iid_partition(103, 10, seed=gen(3))
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = iid_partition(103, 10, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))


def test_shards_give_each_client_two_labels_on_balanced_data() -> None:
    y = torch.arange(10).repeat_interleave(40)[torch.randperm(400, generator=gen(0))]
    parts = shard_partition(y, 10, seed=1)  # 20 shards of 20 = half a class each
    _assert_cover(parts, 400)
    labels_per_client = [torch.unique(y[p]).numel() for p in parts]
    assert max(labels_per_client) <= 2
    assert all(p.numel() == 40 for p in parts)
    assert labels_per_client.count(2) >= 5  # random pairs of shards mostly come from different classes
    # unbalanced classes, shards no longer than the smallest class: ≤ 2 labels per shard, ≤ 4 per client
    y2 = torch.cat([torch.full((n,), c) for c, n in enumerate([30, 51, 44, 37, 60])])
    parts2 = partition(y2, 5, "shards", seed=2)
    _assert_cover(parts2, 222)
    assert max(torch.unique(y2[p]).numel() for p in parts2) <= 4


def test_partition_rejects_impossible_inputs() -> None:
    with pytest.raises(ValueError, match="shards"):
        shard_partition(torch.arange(15) % 3, 10, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition([0, 1], 0, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition([0, 1], 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition([0, 1], 2, "dirichlet", seed=0)
    with pytest.raises(ValueError, match="scheme"):
        partition([0, 1], 2, "pathological", seed=0)
    with pytest.raises(ValueError, match="labels"):
        shard_partition(torch.rand(10), 2, seed=0)


def test_dirichlet_is_uniform_for_large_alpha_and_skewed_for_small() -> None:
    y = torch.arange(10).repeat_interleave(200)

    def shares(alpha: float) -> Tensor:
        parts = dirichlet_partition(y, 5, alpha, seed=gen(0))
        _assert_cover(parts, 2000)
        counts = torch.stack([torch.bincount(y[p], minlength=10) for p in parts]).double()
        return counts / counts.sum(0)  # client × class: each class's share per client

    assert float((shares(1000.0) - 0.2).abs().max()) < 0.05  # measured 0.015
    assert float(shares(0.05).max(0).values.mean()) > 0.7  # measured 0.96: one client holds most of a class
    first = dirichlet_partition(y, 5, 0.5, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, dirichlet_partition(y, 5, 0.5, seed=7), strict=True))


# ---------------------------------------------------------------- GPSE


def test_global_subspace_equals_pooled_subspace_for_rank_q_activations() -> None:
    d, q, sizes = 20, 5, [13, 30, 7, 50]
    B1 = _orthonormal(d, q, seed=1)
    parts = _split(_low_rank(B1, sum(sizes), seed=2), sizes)
    eps = 1 - 1e-10
    # the sketch width m = d is far below N = 100 and above rank q: col(R G) = col(R)
    U1 = _server(None, parts, eps, GPSEConfig(), m=d)
    assert U1.shape == (d, q)
    _assert_orthonormal(U1)
    assert _max_angle(U1, B1) < 1e-6
    # task 2: a new rank-3 subspace overlapping the old one in one direction
    B2 = torch.cat([B1[:, :1], _orthonormal(d, 2, seed=3)], dim=1)
    parts2 = _split(_low_rank(B2, sum(sizes), seed=4), sizes)
    U2 = _server(U1, parts2, eps, GPSEConfig(), m=d)
    assert torch.equal(U2[:, :q], U1)  # old columns kept
    _assert_orthonormal(U2)
    assert U2.shape[1] <= q + 3  # the shared direction is not counted twice
    assert _max_angle(U2, torch.cat([B1, B2], dim=1)) < 1e-6
    assert _max_angle(torch.cat([B1, B2], dim=1), U2) < 1e-6


def test_gram_mode_gives_the_pooled_gpm_basis_for_any_partition() -> None:
    d, sizes, eps = 16, [9, 40, 23], 0.9
    A1, A2 = _decaying(d, sum(sizes), seed=5), _decaying(d, sum(sizes), seed=6)
    gpm1 = threshold_basis(A1, eps, rule="paper")
    U1 = _server(None, _split(A1, sizes), eps, GPM_EXACT, m=None)
    assert U1.shape == gpm1.shape and 0 < U1.shape[1] < d
    assert _max_angle(U1, gpm1) < 1e-6
    gpm2 = extend_basis(gpm1, A2, eps)
    U2 = _server(U1, _split(A2, sizes), eps, GPM_EXACT, m=None)
    assert U2.shape == gpm2.shape and U2.shape[1] > U1.shape[1]
    assert _max_angle(U2, gpm2) < 1e-6


def test_one_client_with_the_code_defaults_and_an_exact_sketch() -> None:
    d, n, eps = 16, 60, 0.9
    A1, A2 = _decaying(d, n, seed=7), _decaying(d, n, seed=8, axes=7)  # task 2 mostly inside task 1's span
    code = GPSEConfig(sketch="gram")  # code defaults otherwise: norm ratio, sample-weighted mean, always_add
    U1 = _server(None, [A1], eps, code, m=None)
    gpm1 = threshold_basis(A1, eps, rule="paper")  # task 1: ρ = 1, ε′ = ε for every ratio flag
    assert U1.shape == gpm1.shape and _max_angle(U1, gpm1) < 1e-6
    # task 2: the norm ratio ρ = ‖R‖/‖A‖ > ‖R‖²/‖A‖² raises ε′, so the code keeps more directions than GPM
    U2 = _server(U1, [A2], eps, code, m=None)
    gpm2 = extend_basis(U1, A2, eps)
    assert U2.shape[1] > gpm2.shape[1]  # measured: GPM adds none (ρ² = 0.09 < 1 − ε), the code 2 (ρ = 0.30)
    assert _max_angle(gpm2, U2) < 1e-6  # GPM's basis is contained in the code's larger one
    assert torch.equal(_server(U1, [A2], eps, GPM_EXACT, m=None), gpm2)  # the GPM flags: nothing added either


def test_random_sketch_energy_matches_the_pooled_energy() -> None:
    """Gaussian sketches (the code's default) estimate the pooled energies; a wider sketch estimates better."""
    d, sizes, eps = 16, [50, 70, 80], 0.9
    gaps: dict[int, list[float]] = {d: [], 5 * d: []}
    for seed in range(9, 14):
        A = _decaying(d, sum(sizes), seed=seed)
        gpm = threshold_basis(A, eps, rule="paper")
        captured_gpm = float((gpm.T @ A).square().sum() / A.square().sum())
        for m, gap in gaps.items():
            U = _server(None, _split(A, sizes), eps, GPSEConfig(), m=m)
            _assert_orthonormal(U)
            if m == 5 * d:
                assert abs(U.shape[1] - gpm.shape[1]) <= 1  # measured: equal for 4 of 5 seeds, +1 once
            gap.append(abs(float((U.T @ A).square().sum() / A.square().sum()) - captured_gpm))
    mean_gap = {m: sum(g) / len(g) for m, g in gaps.items()}
    assert mean_gap[5 * d] < 0.02  # measured 0.011 (the captured fraction of ‖A‖², GPM's 0.91-0.92)
    assert mean_gap[d] > mean_gap[5 * d]  # measured 0.042


def test_effective_threshold_and_mean_ratio() -> None:
    assert effective_threshold(0.9, 1.0) == pytest.approx(0.9)
    assert effective_threshold(0.9, 0.5) == pytest.approx(0.8)  # (0.5 − 0.1) / 0.5
    assert effective_threshold(0.9, 0.05) < 0
    d = 6
    U = _orthonormal(d, 2, seed=10)
    outside = (torch.eye(d, dtype=torch.float64) - U @ U.T)[:, :1]
    A = torch.cat([U @ torch.ones(2, 3, dtype=torch.float64), outside], dim=1)  # 4 columns, one outside
    R_energy = float((A - U @ (U.T @ A)).square().sum())
    energy = float(A.square().sum())
    by_flag = {}
    for ratio in ("norm", "squared"):
        for mean in ("samples", "pooled"):
            cfg = GPSEConfig(sketch="gram", ratio=ratio, ratio_mean=mean)
            by_flag[ratio, mean] = mean_ratio(client_sketch(A, U, None, None, cfg), cfg)
    assert by_flag["squared", "pooled"] == pytest.approx(R_energy / energy)
    assert by_flag["squared", "samples"] == pytest.approx(R_energy / energy)  # one client: the same
    assert by_flag["norm", "pooled"] == pytest.approx((R_energy / energy) ** 0.5)
    assert by_flag["norm", "samples"] == pytest.approx((R_energy / energy) ** 0.5)
    # two clients of different sizes: the code's sample-weighted mean of ratios ≠ the pooled ratio
    B = U @ torch.ones(2, 9, dtype=torch.float64)  # entirely inside span(U): ρ = 0
    cfg_code, cfg_pool = GPSEConfig(sketch="gram"), GPSEConfig(sketch="gram", ratio_mean="pooled")
    total_code = sum_sketches([{"w": client_sketch(X, U, None, None, cfg_code)} for X in (A, B)])["w"]
    total_pool = sum_sketches([{"w": client_sketch(X, U, None, None, cfg_pool)} for X in (A, B)])["w"]
    rho_a = (R_energy / energy) ** 0.5
    assert mean_ratio(total_code, cfg_code) == pytest.approx(4 * rho_a / 13)
    pooled = (R_energy / (energy + float(B.square().sum()))) ** 0.5
    assert mean_ratio(total_pool, cfg_pool) == pytest.approx(pooled)


def test_always_add_flag_when_the_old_basis_already_holds_eps() -> None:
    d = 10
    U = _orthonormal(d, 3, seed=12)
    inside = U @ torch.randn(3, 40, generator=gen(13), dtype=torch.float64)
    A = inside + 1e-2 * _decaying(d, 40, seed=14)  # residual energy ≪ (1 − ε)
    cfg = GPSEConfig(sketch="gram")
    total = client_sketch(A, U, None, None, cfg)
    assert effective_threshold(0.9, mean_ratio(total, cfg)) < 0
    assert expand_basis(U, total, 0.9, cfg).shape == (d, 4)  # the code adds its top direction
    gpm_like = GPSEConfig(sketch="gram", always_add=False)
    assert torch.equal(expand_basis(U, total, 0.9, gpm_like), U)


def test_no_client_message_has_a_sample_count_dimension(monkeypatch: pytest.MonkeyPatch) -> None:
    d, m, chunk = 12, 24, 96  # 96 // max(d, m) = 4 rows of G_k at a time
    drawn: list[int] = []
    original = ResidualSketcher._draw

    def spy(self: ResidualSketcher, rows: int, device: torch.device) -> Tensor:
        drawn.append(rows)
        return original(self, rows, device)

    monkeypatch.setattr(ResidualSketcher, "_draw", spy)
    U = _orthonormal(d, 3, seed=15)
    for n in (7, 33, 129, 500):
        A = _decaying(d, n, seed=n)
        for cfg, width in ((GPSEConfig(), m), (GPSEConfig(sketch="uniform"), m), (GPSEConfig(sketch="gram"), d)):
            for basis in (None, U):
                msg = client_sketch(A, basis, m, gen(n), cfg, chunk_elements=chunk)
                shapes = [tuple(t.shape) for t in pack_sketches({"w": msg}).values()]
                assert shapes == [(d, width), (), ()]
                assert all(n not in s for s in shapes)
        assert max(drawn) <= 4  # G_k is never formed in full
        drawn.clear()


def test_streamed_blocks_equal_one_block() -> None:
    d = 8
    U = _orthonormal(d, 2, seed=16)
    A = _decaying(d, 50, seed=17)
    cfg = GPSEConfig(sketch="gram", ratio_mean="pooled")
    whole = client_sketch(A, U, None, None, cfg)
    sketcher = ResidualSketcher(U, None, None, cfg, chunk_elements=16)
    for block in A.split([5, 30, 15], dim=1):
        sketcher.update(block.float())  # float32 input, float64 arithmetic
    streamed = sketcher.message()
    assert sketcher.columns == 50
    assert torch.allclose(streamed.sketch, whole.sketch, rtol=1e-6, atol=1e-6)
    assert streamed.ratio_num == pytest.approx(whole.ratio_num, rel=1e-6)
    assert streamed.ratio_den == pytest.approx(whole.ratio_den, rel=1e-6)
    with pytest.raises(RuntimeError, match="no activations"):
        ResidualSketcher(None, 4, gen(0)).message()
    with pytest.raises(ValueError, match="sketch_dim"):
        ResidualSketcher(None, None, gen(0))
    with pytest.raises(ValueError, match="rows"):
        ResidualSketcher(U, 4, gen(0)).update(torch.ones(d + 1, 3))


# ---------------------------------------------------------------- secure sum


def test_masked_uploads_hide_the_sketches_but_sum_exactly() -> None:
    d, m, clients = 10, 20, [3, 7, 11, 40]
    U = _orthonormal(d, 2, seed=18)
    raw = []
    for c in clients:
        upload = {
            "a.weight": client_sketch(_decaying(d, 30 + c, seed=c), U, m, gen(c)),
            "b.weight": client_sketch(_decaying(d, 25, seed=c + 1), None, m, gen(c + 1)),
        }
        raw.append(pack_sketches(upload))
    masking = PairwiseMasking(clients, seed=99)
    masked = [masking.mask(c, r) for c, r in zip(clients, raw, strict=True)]
    for r, x in zip(raw, masked, strict=True):
        assert x.keys() == r.keys()
        assert all(float((x[k] - r[k]).abs().min()) > 1e-3 for k in r if r[k].dim() == 2)
        assert all(float((x[k] - r[k]).abs()) > 1e-3 for k in r if r[k].dim() == 0)
    plain, hidden = secure_sum(raw), secure_sum(masked)
    for k in plain:
        assert float((hidden[k] - plain[k]).norm()) <= 1e-5 * float(plain[k].norm())
    assert torch.equal(masking.mask(7, raw[1])["a.weight/sketch"], masked[1]["a.weight/sketch"])  # seeded
    # the server's basis is the same from the masked sum
    total = unpack_sketches(hidden)["a.weight"]
    reference = sum_sketches([unpack_sketches(r) for r in raw])["a.weight"]
    assert _max_angle(expand_basis(U, total, 0.9), expand_basis(U, reference, 0.9)) < 1e-6
    with pytest.raises(ValueError, match="participants"):
        masking.mask(5, raw[0])
    with pytest.raises(ValueError, match="keys"):
        secure_sum([raw[0], {"x": torch.zeros(1)}])


# ---------------------------------------------------------------- FedProject


def test_project_update_removes_the_subspace_and_passes_the_rest() -> None:
    g = gen(19)
    update = {
        "fc.weight": torch.randn(7, 10, generator=g),
        "fc.bias": torch.randn(7, generator=g),
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "head.weight": torch.randn(3, 7, generator=g),
    }
    bases = {"fc.weight": _orthonormal(10, 4, seed=20), "conv.weight": _orthonormal(18, 5, seed=21)}
    out = project_update(update, bases)
    for name, U in bases.items():
        delta = out[name].double().reshape(out[name].shape[0], -1)
        assert out[name].dtype == update[name].dtype and out[name].shape == update[name].shape
        assert float((delta @ U).norm()) <= 1e-6 * float(delta.norm())
        assert float(out[name].norm()) > 0.5 * float(update[name].norm())  # only the span(U) part went
    # layer outputs for inputs in span(U) are unchanged by the projected update
    x = bases["fc.weight"] @ torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert float((out["fc.weight"].double() @ x).abs().max()) < 1e-5
    assert out["fc.bias"] is update["fc.bias"] and out["head.weight"] is update["head.weight"]
    empty = project_update(update, {"fc.weight": None, "conv.weight": torch.zeros(18, 0)})
    assert all(empty[k] is update[k] for k in update)  # no bases: FedAvg's update, bit for bit
    with pytest.raises(KeyError, match="missing"):
        project_update(update, {"missing": bases["fc.weight"]})


# ---------------------------------------------------------------- bytes


def test_byte_counts_match_hand_arithmetic() -> None:
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = mlp.state_dict()
    assert tensor_bytes(state) == (6 * 5 + 5 + 5 * 3 + 3) * 4 == 212
    assert tensor_bytes(list(state.values())) == 212
    assert round_traffic(212, 4) == Traffic(up=848, down=848)  # FedAvg = FOT per round
    shapes = sketch_shapes(state, ["0.weight", "2.weight"], factor={"0.weight": 1, "2.weight": 5})
    assert shapes == {"0.weight": (6, 6), "2.weight": (5, 25)}
    bases = {"0.weight": torch.zeros(6, 2), "2.weight": None}
    assert gpse_traffic(shapes, 3, bases) == Traffic(up=3 * (36 + 125 + 4) * 4, down=3 * 12 * 4)
    assert round_traffic(212, 4, basis_bytes=48) == Traffic(up=848, down=4 * 260)  # the code resends bases
    # real float64 messages have exactly the counted size
    msgs = {
        name: client_sketch(torch.randn(d, 11, generator=gen(0)), None, m, gen(1)) for name, (d, m) in shapes.items()
    }
    assert tensor_bytes(pack_sketches(msgs)) == gpse_traffic(shapes, 1, bytes_per_float=8).up
    # fot.md §3: MLP 784-400-400-400-10, all 4 weights projected, m = d
    big = nn.Sequential(nn.Linear(784, 400), nn.Linear(400, 400), nn.Linear(400, 400), nn.Linear(400, 10))
    params = sum(p.numel() for p in big.parameters())
    assert params == 638_810
    big_shapes = sketch_shapes(big.state_dict(), [f"{i}.weight" for i in range(4)])
    assert gpse_traffic(big_shapes, 1).up == (784**2 + 3 * 400**2 + 8) * 4
    assert gpse_traffic(big_shapes, 1).up / (params * 4) == pytest.approx(1.71, abs=0.01)
