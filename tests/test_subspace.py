"""Tests of the subspace core (GPM notes §6: orthogonality, memory, energy rules, unfolding, interference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import gen
from torch import Tensor, nn

from clbench.subspace import (
    LayerProjector,
    basis_union,
    collect_layer_inputs,
    energy_rank,
    extend_basis,
    layer_input_matrix,
    orthonormal_complement,
    principal_angles,
    project_out,
    threshold_basis,
    top_singular,
)

torch.set_num_threads(1)




def _orthonormal(d: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen(seed), dtype=torch.float64))
    return q.to(dtype)


def _activations(d: int, n: int, seed: int = 0, rank: int = 32) -> Tensor:
    """ReLU of a low-rank product plus noise: a decaying spectrum like real layer inputs."""
    g = gen(seed)
    r = min(d, n, rank)
    scale = torch.logspace(0, -2, r, dtype=torch.float64)
    a = torch.randn(d, r, generator=g, dtype=torch.float64) * scale
    x = a @ torch.randn(r, n, generator=g, dtype=torch.float64) + 0.01 * torch.randn(d, n, generator=g)
    return torch.relu(x).float()


def _ortho_err(M: Tensor) -> float:
    eye = torch.eye(M.shape[1], dtype=M.dtype)
    return float((M.T @ M - eye).abs().max()) if M.shape[1] else 0.0


# --------------------------------------------------------------------------------------------- projection


def _rel_overlap(g: Tensor, M: Tensor) -> float:
    g2 = g.reshape(g.shape[0], -1)
    return float(torch.linalg.matrix_norm(g2 @ M) / torch.linalg.matrix_norm(g2))


@pytest.mark.parametrize("k", [5, 40, 90])  # 90 > d/2 → complement path for d = 100
def test_gradient_form_orthogonal_idempotent(k: int) -> None:
    lin = nn.Linear(100, 30, bias=False)
    M = _orthonormal(100, k, seed=k)
    lin.weight.grad = torch.randn(30, 100, generator=gen(1))
    g0 = lin.weight.grad.clone()
    proj = LayerProjector(lin, M, form="gradient")
    proj.project_()
    g1 = lin.weight.grad.clone()
    assert _rel_overlap(g1, M) <= 1e-5
    proj.project_()
    torch.testing.assert_close(lin.weight.grad, g1, atol=1e-6, rtol=0)  # twice == once
    torch.testing.assert_close(proj.project(g0), g1, atol=1e-6, rtol=0)
    torch.testing.assert_close(project_out(g0, M), g1, atol=1e-5, rtol=0)  # complement path == direct path


def test_complement_path_equals_direct_path() -> None:
    d, k = 64, 50
    M = _orthonormal(d, k, seed=3, dtype=torch.float64)
    g = torch.randn(7, d, generator=gen(4), dtype=torch.float64)
    lin = nn.Linear(d, 7).double()
    proj = LayerProjector(lin, M, form="gradient")
    direct = g - (g @ M) @ M.T
    C = orthonormal_complement(M)
    assert C.shape == (d, d - k)
    assert float((C.T @ M).abs().max()) < 1e-12
    torch.testing.assert_close(proj.project(g), direct, atol=1e-12, rtol=0)


def test_conv_gradient_form_orthogonal() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(4, 3, 8, 8, generator=gen(0))
    R = layer_input_matrix(conv, x)
    M = threshold_basis(R, 0.9)
    assert 0 < M.shape[1] < 27
    conv(x).square().sum().backward()
    proj = LayerProjector(conv, M, form="auto", batch_size=4)
    assert proj.form == "gradient"
    proj.project_()
    assert conv.weight.grad is not None
    assert _rel_overlap(conv.weight.grad, M) <= 1e-5


@pytest.mark.parametrize("k", [20, 70])
def test_input_form_matches_gradient_form(k: int) -> None:
    d, out, batch = 100, 40, 10
    M = _orthonormal(d, k, seed=k)
    x = torch.randn(batch, d, generator=gen(5))
    t = torch.randn(batch, out, generator=gen(6))

    def run(lin: nn.Linear, xin: Tensor) -> None:
        F.mse_loss(lin(xin), t).backward()

    ref = nn.Linear(d, out)
    run(ref, x)
    assert ref.weight.grad is not None and ref.bias.grad is not None
    ref_proj = LayerProjector(ref, M, form="gradient")
    ref_bias = ref.bias.grad.clone()
    ref_proj.project_()

    lin = nn.Linear(d, out)
    lin.load_state_dict(ref.state_dict())
    proj = LayerProjector(lin, M, form="input")
    proj.attach()
    xin = x.clone().requires_grad_(True)
    run(lin, xin)
    proj.project_()  # no-op for the input form
    assert lin.weight.grad is not None and lin.bias.grad is not None
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(lin.bias.grad, ref_bias, atol=1e-6, rtol=0)  # bias not projected
    assert _rel_overlap(lin.weight.grad, M) <= 1e-5

    # grad_x unchanged by the input form
    plain = nn.Linear(d, out)
    plain.load_state_dict(ref.state_dict())
    xref = x.clone().requires_grad_(True)
    run(plain, xref)
    assert xin.grad is not None and xref.grad is not None
    torch.testing.assert_close(xin.grad, xref.grad, atol=1e-6, rtol=0)

    proj.detach()
    proj.detach()  # idempotent
    assert "forward" not in lin.__dict__


def test_input_form_extra_leading_dims() -> None:
    d, out = 16, 12
    M = _orthonormal(d, 5, seed=2)
    x = torch.randn(3, 4, d, generator=gen(1))
    lin = nn.Linear(d, out)
    ref = nn.Linear(d, out)
    ref.load_state_dict(lin.state_dict())
    proj = LayerProjector(lin, M, form="input")
    proj.attach()
    lin(x).sum().backward()
    ref(x).sum().backward()
    assert lin.weight.grad is not None and ref.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, project_out(ref.weight.grad, M), atol=1e-5, rtol=0)


def test_auto_form_and_empty_basis() -> None:
    lin = nn.Linear(784, 100)  # PMNIST layer 1 with GPM's task-0 basis size (k = 78)
    assert LayerProjector(lin, _orthonormal(784, 78), batch_size=10).form == "input"
    assert LayerProjector(lin, _orthonormal(784, 78), batch_size=256).form == "gradient"
    assert LayerProjector(lin, _orthonormal(784, 78)).form == "gradient"
    # a small layer: projecting its gradient costs less than the input form's fixed overhead
    assert LayerProjector(nn.Linear(100, 100), _orthonormal(100, 31), batch_size=10).form == "gradient"
    conv = nn.Conv2d(3, 64, 4)
    assert LayerProjector(conv, _orthonormal(48, 10), batch_size=10).form == "gradient"
    with pytest.raises(ValueError, match="Linear"):
        LayerProjector(conv, _orthonormal(48, 10), form="input")

    empty = LayerProjector(lin, torch.zeros(784, 0), form="input")
    empty.attach()
    assert "forward" not in lin.__dict__
    g = torch.randn(100, 784, generator=gen(0))
    assert torch.equal(empty.project(g), g)
    assert empty.rank == 0 and empty.dim == 784


# ---------------------------------------------------------------------------------------------------- bases


def test_energy_rank_rules() -> None:
    sv2 = torch.tensor([50.0, 30.0, 15.0, 5.0])
    assert energy_rank(sv2, 0.9, rule="paper") == 3
    assert energy_rank(sv2, 0.9, rule="code") == 2
    assert energy_rank(sv2, 0.8, rule="paper") == 2  # exactly hit: 80/100
    assert energy_rank(sv2, 0.8, rule="code") == 1  # always paper k − 1
    assert energy_rank(sv2, 0.9, total=200.0, already=190.0, rule="paper") == 0
    assert energy_rank(sv2, 0.9, total=200.0, already=100.0, rule="paper") == 2  # 100+50+30 = 180
    assert energy_rank(sv2, 1.0, rule="paper") == 4
    R = torch.randn(8, 20, generator=gen(0))
    assert threshold_basis(R, 0.0, rule="paper").shape == (8, 0)  # ε = 0: empty memory (GPM test 6.6)
    assert threshold_basis(R, 0.0, rule="code").shape == (8, 0)
    with pytest.raises(ValueError, match="rule"):
        energy_rank(sv2, 0.9, rule="nope")


@pytest.mark.parametrize("shape", [(48, 900), (120, 60), (64, 64)])
def test_threshold_basis_energy_minimal(shape: tuple[int, int]) -> None:
    R = _activations(*shape, seed=1).double()
    total = float(R.square().sum())
    for eps in (0.9, 0.97):
        M = threshold_basis(R, eps, rule="paper")
        k = M.shape[1]
        assert _ortho_err(M) < 1e-5
        assert float((M.T @ R).square().sum()) / total >= eps - 1e-9
        assert float((M[:, : k - 1].T @ R).square().sum()) / total < eps  # minimal
        assert threshold_basis(R, eps, rule="code").shape[1] == k - 1  # code rule: paper k − 1 on task 1


def test_known_subspace_recovered() -> None:
    d, n = 20, 200
    S = _orthonormal(d, 3, seed=7, dtype=torch.float64)
    R = S @ torch.randn(3, n, generator=gen(8), dtype=torch.float64)
    for method in ("svd", "gram", "auto"):
        M = threshold_basis(R, 1.0, rule="paper", method=method)
        assert M.shape[1] == 3, method
        assert float(principal_angles(M, S).max()) < 1e-5
    # fewer samples than dimensions (tall R): the Rᵀ R Gram route
    M = threshold_basis(R[:, :15], 1.0, rule="paper")
    assert M.shape[1] == 3
    assert float(principal_angles(M, S).max()) < 1e-5


# (300, 4000): blocked symmetric product and chunked up-cast of the Gram route
@pytest.mark.parametrize("shape", [(48, 6000), (96, 1500), (300, 3600), (300, 80), (160, 40), (50, 50)])
def test_svd_and_gram_agree(shape: tuple[int, int]) -> None:
    R = _activations(*shape, seed=2)
    ref_U, ref_s2 = top_singular(R, method="svd")
    for method in ("gram", "gram32", "auto"):
        U, s2 = top_singular(R, method=method)
        assert _ortho_err(U) < 1e-5
        torch.testing.assert_close(s2[:5], ref_s2[:5], rtol=1e-4, atol=0)
    k_ref = energy_rank(ref_s2, 0.97)
    for method in ("gram", "gram32", "auto"):
        M = threshold_basis(R, 0.97, method=method)
        k = min(M.shape[1], k_ref)
        assert abs(M.shape[1] - k_ref) <= 1
        assert float(principal_angles(M[:, :k], ref_U[:, :k]).max()) < 1e-4, method


def test_extend_basis() -> None:
    d = 60
    R1 = _activations(d, 400, seed=3, rank=20)
    R2 = _activations(d, 400, seed=4, rank=20)
    eps = 0.95
    M1 = extend_basis(None, R1, eps, rule="paper")
    torch.testing.assert_close(M1, threshold_basis(R1, eps, rule="paper"))
    M2 = extend_basis(M1, R2, eps, rule="paper")
    k1 = M1.shape[1]
    assert M2.shape[1] > k1
    assert torch.equal(M2[:, :k1], M1)
    assert float((M1.T @ M2[:, k1:]).abs().max()) < 1e-5  # new ⟂ old
    assert _ortho_err(M2) < 1e-5
    R2d = R2.double()
    captured = float((M2.double().T @ R2d).square().sum() / R2d.square().sum())
    assert captured >= eps - 1e-6
    # the code rule counts Eq. 9 like the paper
    assert extend_basis(M1, R2, eps, rule="code").shape == M2.shape
    # already satisfied → unchanged
    assert extend_basis(M2, R1, eps) is M2
    # columns never exceed d nor max_dim
    Rfull = torch.randn(d, 500, generator=gen(9))
    assert extend_basis(M2, Rfull, 1.0, rule="paper").shape[1] <= d
    assert extend_basis(M2, Rfull, 1.0, rule="paper", max_dim=M2.shape[1] + 2).shape[1] == M2.shape[1] + 2


def test_basis_union() -> None:
    S = _orthonormal(30, 6, seed=11, dtype=torch.float64)
    A, B = S[:, :4], S[:, 2:]  # overlapping spans, union = span(S)
    U = basis_union([A, B @ torch.randn(4, 4, generator=gen(1), dtype=torch.float64)])
    assert U.shape == (30, 6)
    assert _ortho_err(U) < 1e-10
    assert float(principal_angles(U, S).max()) < 1e-8
    assert basis_union([torch.zeros(30, 0)]).shape == (30, 0)
    torch.testing.assert_close(orthonormal_complement(torch.zeros(4, 0)), torch.eye(4))


# ------------------------------------------------------------------------------------------------ unfolding


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_unfolding_matches_conv2d(stride: int, padding: int) -> None:
    conv = nn.Conv2d(3, 5, (3, 2), stride=stride, padding=padding, bias=False).double()
    x = torch.randn(2, 3, 9, 8, generator=gen(0), dtype=torch.float64)
    y = F.conv2d(x, conv.weight, stride=stride, padding=padding)
    R = layer_input_matrix(conv, x)
    n, out, h, w = y.shape
    assert R.shape == (3 * 3 * 2, n * h * w)
    y2 = (conv.weight.view(out, -1) @ R).view(out, n, h, w).transpose(0, 1)
    torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_unfolding_same_padding_and_errors() -> None:
    conv = nn.Conv2d(2, 4, 4, padding="same", bias=False).double()
    x = torch.randn(2, 2, 7, 7, generator=gen(0), dtype=torch.float64)
    y = conv(x)
    y2 = (conv.weight.view(4, -1) @ layer_input_matrix(conv, x)).view(4, 2, 7, 7).transpose(0, 1)
    torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)
    lin = nn.Linear(5, 3)
    torch.testing.assert_close(layer_input_matrix(lin, torch.ones(4, 5)), torch.ones(5, 4))
    with pytest.raises(TypeError, match="BatchNorm1d"):
        layer_input_matrix(nn.BatchNorm1d(3), torch.ones(2, 3))
    with pytest.raises(NotImplementedError, match="reflect"):
        layer_input_matrix(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), torch.ones(1, 2, 5, 5))


# ---------------------------------------------------------------------------------------- zero interference


def test_zero_interference_single_layer() -> None:
    torch.manual_seed(0)
    d, out = 20, 5
    g = gen(0)
    basis1 = _orthonormal(d, 6, seed=1, dtype=torch.float64)  # task-1 inputs live in a 6-d subspace
    x1 = torch.randn(200, 6, generator=g, dtype=torch.float64) @ basis1.T
    y1 = torch.randn(200, out, generator=g, dtype=torch.float64)
    x2 = torch.randn(200, d, generator=g, dtype=torch.float64)
    y2 = torch.randn(200, out, generator=g, dtype=torch.float64)
    layer = nn.Linear(d, out, bias=False).double()

    def train(x: Tensor, y: Tensor, proj: LayerProjector | None) -> None:
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        for _ in range(5):
            for i in range(0, len(x), 10):
                opt.zero_grad()
                F.mse_loss(layer(x[i : i + 10]), y[i : i + 10]).backward()
                if proj is not None:
                    proj.project_()
                opt.step()

    train(x1, y1, None)
    with torch.no_grad():
        before = layer(x1).clone()
    R = collect_layer_inputs(layer, {"fc": layer}, lambda: layer(x1[:100]))["fc"]
    M = threshold_basis(R, 1.0, rule="paper")
    assert M.shape[1] == 6
    for form in ("gradient", "input"):
        proj = LayerProjector(layer, M, form=form, batch_size=10)
        proj.attach()
        w0 = layer.weight.detach().clone()
        train(x2, y2, proj)
        proj.detach()
        assert float((layer.weight.detach() - w0).abs().max()) > 1e-2  # it did learn task 2
        with torch.no_grad():
            torch.testing.assert_close(layer(x1), before, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- angles


def test_principal_angles_known() -> None:
    d = 5
    Q = _orthonormal(d, d, seed=3, dtype=torch.float64)
    e1, e2, f1, f2 = Q[:, 0], Q[:, 1], Q[:, 2], Q[:, 3]
    thetas = (1e-6, 0.1)
    A = torch.stack([e1, e2], dim=1)
    pairs = zip(thetas, (e1, e2), (f1, f2), strict=True)
    B = torch.stack([math.cos(t) * e + math.sin(t) * f for t, e, f in pairs], 1)
    ang = principal_angles(A, B @ torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64))
    assert ang.shape == (2,)
    assert abs(float(ang[0]) - 1e-6) < 1e-6 * 1e-8 + 1e-15
    assert abs(float(ang[1]) - 0.1) < 1e-8 * 0.1
    mix = torch.randn(2, 2, generator=gen(0), dtype=torch.float64)
    assert float(principal_angles(A, A @ mix).max()) < 1e-12
    # orthogonal and different dimensions: min(rank) angles
    ang = principal_angles(Q[:, :3], Q[:, 3:])
    assert ang.shape == (2,)
    torch.testing.assert_close(ang, torch.full((2,), math.pi / 2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- collect inputs


def test_collect_layer_inputs_hooks_and_samples() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(6, 1, 6, 6, generator=gen(0))
    layers = {"conv": model[0], "fc": model[2]}

    def run() -> None:
        with torch.no_grad():
            model(x[:4])
            model(x[4:])

    reps = collect_layer_inputs(model, layers, run, samples={"conv": 3})
    assert reps["conv"].shape == (9, 3 * 16)
    torch.testing.assert_close(reps["conv"], layer_input_matrix(model[0], x[:3]))
    assert reps["fc"].shape == (32, 6)  # two calls concatenated
    for m in model:
        assert len(m._forward_pre_hooks) == 0

    def boom() -> None:
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_layer_inputs(model, layers, boom)
    assert all(len(m._forward_pre_hooks) == 0 for m in model)
    with pytest.raises(ValueError, match="submodule"):
        collect_layer_inputs(model, {"other": nn.Linear(2, 2)}, run)


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    dev = torch.device("cuda")
    R1, R2 = _activations(64, 3000, seed=1), _activations(64, 3000, seed=2)
    M_cpu = extend_basis(threshold_basis(R1, 0.97), R2, 0.97)
    M_gpu = extend_basis(threshold_basis(R1.to(dev), 0.97), R2.to(dev), 0.97)
    assert M_gpu.device.type == "cuda"
    assert M_gpu.shape == M_cpu.shape
    assert float(principal_angles(M_gpu.cpu(), M_cpu).max()) < 1e-4
    for method in ("svd", "gram", "gram32"):
        U, _ = top_singular(R1.to(dev), method=method)
        assert U.device.type == "cuda"
    lin = nn.Linear(64, 100).to(dev)
    proj = LayerProjector(lin, M_gpu, batch_size=10)
    assert proj.form == "input"
    proj.attach()
    lin(torch.randn(10, 64, device=dev)).sum().backward()
    assert lin.weight.grad is not None
    assert _rel_overlap(lin.weight.grad, M_gpu) <= 1e-5


def test_empty_memory_after_first_task_counts_like_eq9() -> None:
    """Official GPM: a layer that kept 0 columns on task 1 still takes the Eq. 9 path (paper count) later."""
    U = torch.linalg.qr(torch.randn(6, 3, generator=gen(3), dtype=torch.float64))[0]
    R = U * torch.tensor([60.0, 30.0, 10.0], dtype=torch.float64).sqrt()  # σ² = [60, 30, 10]
    assert extend_basis(None, R, 0.5, rule="code").shape[1] == 0  # #{ratio < 0.5} = 0
    assert extend_basis(torch.zeros(6, 0, dtype=torch.float64), R, 0.5, rule="code").shape[1] == 1
