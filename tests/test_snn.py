"""Spiking networks (hlop.md "Spiking network details", test 7): the DSR and BPTT neurons against their equations
on hand cases, the spiking MLP's readout and protected layers, and a GPM run on it end to end."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import gen, run_config

from clbench.config import ConfigError
from clbench.experiment import run
from clbench.models import MODELS, build_model, model_config
from clbench.models.snn import BPTTNeuron, DSRNeuron, SpikingMLP, make_neuron, time_weights, weighted_rate
from clbench.streams import StreamSpec
from clbench.subspace import LayerProjector, collect_layer_inputs, threshold_basis

F64 = torch.float64




# ------------------------------------------------------------------------------------------------------- DSR


def test_dsr_forward_and_backward_match_the_equations_on_a_hand_case():
    """T = 3, τ = 2 (so every 1/τ shows), Δt = 0.05, V_th = 0.3, fire at 0.3·V_th: three neurons whose input rates
    lie inside (0, τV_th/Δt = 12), above it and below 0; forward by the recursion, backward by hlop.md's formulas."""
    tau, dt, vth, a, T = 2.0, 0.05, 0.3, 0.3, 3
    currents = [[4.0, 9.0, -3.0], [2.0, 20.0, 1.0], [6.0, 15.0, -1.0]]  # [t][neuron]
    grads = [[0.5, -1.0, 2.0], [-0.25, 3.0, 1.0], [1.5, 0.5, -2.0]]
    neuron = DSRNeuron(tau=tau, dt=dt, v_th=vth, fire_at=a).double()
    with torch.no_grad():
        neuron.v_th.fill_(vth)  # exactly 0.3 in float64, not the float32 0.3 cast up
    current = torch.tensor(currents, dtype=F64).unsqueeze(0).requires_grad_(True)  # (1, T, 3)
    out = neuron(current)
    out.backward(torch.tensor(grads, dtype=F64).unsqueeze(0))

    beta = math.exp(-dt / tau)
    w = [math.exp(-(T - t) * dt / tau) for t in range(1, T + 1)]
    expected_spikes, expected_grad, grad_vth = [], [], 0.0
    for j in range(3):
        u, spikes = 0.0, []
        for t in range(T):
            u = beta * u + (1 - beta) * currents[t][j]
            s = vth if u >= a * vth else 0.0
            u -= s
            spikes.append(s / dt)
        expected_spikes.append(spikes)
        r_in = sum(w[t] * currents[t][j] for t in range(T)) / sum(w)
        r_grad = sum(w[t] * grads[t][j] for t in range(T)) / sum(w)
        expected_grad.append([r_grad / tau if 0 < r_in < tau * vth / dt else 0.0] * T)
        grad_vth += dt * T * r_grad if r_in > tau * vth / dt else 0.0
    torch.testing.assert_close(out[0].T.detach(), torch.tensor(expected_spikes, dtype=F64), atol=1e-12, rtol=0)
    assert [sum(v > 0 for v in row) for row in expected_spikes] == [1, 3, 0]  # the recursion matters
    assert current.grad is not None and neuron.v_th.grad is not None
    torch.testing.assert_close(current.grad[0].T, torch.tensor(expected_grad, dtype=F64), atol=1e-12, rtol=0)
    assert expected_grad[0][0] != 0 and expected_grad[1][0] == 0 and expected_grad[2][0] == 0  # inside / above / below
    assert float(neuron.v_th.grad) == pytest.approx(grad_vth, abs=1e-12) and grad_vth != 0


def test_dsr_rate_is_the_clamped_input_for_constant_currents():
    """hlop.md test 7: for a constant current c over many steps the rate ≈ clamp(c, 0, V_th/Δt) (= 6)."""
    neuron = DSRNeuron().double()
    c = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0, 5.5, 6.0, 10.0], dtype=F64)
    with torch.no_grad():
        rate = neuron(c.view(1, 1, -1).expand(1, 200, -1)).mean(dim=1)[0]
    assert float((rate - c.clamp(0, 0.3 / 0.05)).abs().max()) < 0.1


def test_dsr_threshold_lower_bound_and_frozen_threshold():
    neuron = DSRNeuron(v_th_min=0.01)
    with torch.no_grad():
        neuron.v_th.fill_(-1.0)
    neuron(torch.ones(2, 3, 4))
    assert float(neuron.v_th.detach()) == pytest.approx(0.01)
    fixed = DSRNeuron(train_v_th=False)
    assert not list(fixed.parameters()) and "v_th" in dict(fixed.named_buffers())


def test_weighted_rate_weights():
    w = time_weights(4, 0.05, 1.0, dtype=F64)
    assert w.tolist() == pytest.approx([math.exp(-0.15), math.exp(-0.1), math.exp(-0.05), 1.0])
    z = torch.arange(8, dtype=F64).view(1, 4, 2)
    torch.testing.assert_close(weighted_rate(z, 0.05, 1.0)[0], w @ z[0] / w.sum())


# ------------------------------------------------------------------------------------------------------ BPTT


def test_bptt_neuron_forward_and_surrogate_backward_by_hand():
    """v_t = (1 − 1/τ) v_{t−1} + I_t, s_t = 1[v_t ≥ V_th], v_t −= s_t V_th (reset detached), sigmoid surrogate."""
    tau, vth, alpha = 2.0, 1.0, 4.0
    neuron = BPTTNeuron(tau=tau, v_th=vth, alpha=alpha)
    current = torch.tensor([[[1.2], [0.3]]], dtype=F64, requires_grad=True)  # (1, T = 2, 1)
    c = torch.tensor([[[0.7], [-1.3]]], dtype=F64)
    s = neuron(current)
    (s * c).sum().backward()
    v1 = 1.2
    s1 = 1.0 if v1 >= vth else 0.0
    v2 = (1 - 1 / tau) * (v1 - s1 * vth) + 0.3
    s2 = 1.0 if v2 >= vth else 0.0
    assert s[0, :, 0].tolist() == [s1, s2] == [1.0, 0.0]

    def surrogate(x: float) -> float:
        sig = 1 / (1 + math.exp(-alpha * x))
        return alpha * sig * (1 - sig)

    d1 = 0.7 * surrogate(v1 - vth) + (-1.3) * surrogate(v2 - vth) * (1 - 1 / tau)  # through v_2's leak, not reset
    d2 = (-1.3) * surrogate(v2 - vth)
    assert current.grad is not None
    assert current.grad[0, :, 0].tolist() == pytest.approx([d1, d2], abs=1e-12)
    with pytest.raises(ValueError, match="tau"):
        BPTTNeuron(tau=0.5)


# ------------------------------------------------------------------------------------------------ spiking MLP


def _net(neuron: str = "dsr", multi_head: bool = False, steps: int = 5, hidden: tuple[int, ...] = (24, 16),
         seed: int = 0) -> SpikingMLP:
    torch.manual_seed(seed)
    classes = (3, 4) if multi_head else (5, 5)
    return SpikingMLP((2, 4, 4), list(hidden), classes, multi_head, 7 if multi_head else 5, time_steps=steps,
                      neuron=lambda: make_neuron(neuron))


def _inputs(n: int, scale: float = 3.0, seed: int = 1) -> torch.Tensor:
    return scale * torch.rand(n, 2, 4, 4, generator=gen(seed))


@pytest.mark.parametrize("neuron", ["dsr", "bptt"])
def test_spiking_mlp_shapes_readout_and_gradients(neuron):
    net = _net(neuron, steps=5)
    with torch.no_grad():  # strong enough that some DSR inputs saturate (r_in > τV_th/Δt), so ∂L/∂V_th ≠ 0
        net.hidden[1].weight.mul_(4.0)
    x = _inputs(6, scale=20.0)
    y, t = torch.randint(0, 5, (6,), generator=gen(2)), torch.zeros(6, dtype=torch.long)
    s = net.spikes(x)
    assert s.shape == (6, 5, 16)
    spike = 1.0 if neuron == "bptt" else 0.3 / 0.05  # 0/1, or V_th/Δt for DSR
    assert bool(((s == 0) | ((s - spike).abs() < 1e-5)).all()) and bool((s > 0).any())
    per_step = net.head(s)  # (B, T, C): the head at every step, then the readout over time
    logits = net(x, t)
    assert logits.shape == (6, 5) and per_step.shape == (6, 5, 5)
    torch.testing.assert_close(logits, net.neurons[-1].rate(per_step), atol=1e-5, rtol=1e-5)
    if neuron == "bptt":
        torch.testing.assert_close(logits, per_step.mean(dim=1), atol=1e-5, rtol=1e-5)
    assert net.predict((x, y, t)).shape == (6,)
    first = net.loss((x, y, t))
    (first + net.loss((x, y, t))).backward()  # a second forward (its V_th clamp) keeps the first graph valid
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name  # V_th included (DSR, some saturate)
    assert net.rate(s).shape == (6, 16) and torch.equal(net.rate(x.flatten(1)), x.flatten(1))


def test_time_steps_are_configurable_and_the_model_is_registered():
    assert "snn_mlp" in MODELS
    spec = StreamSpec("digits", 2, (64,), (10, 10), 10, False)
    for steps in (1, 7):
        net = build_model(model_config("snn_mlp", hidden=[8], time_steps=steps), spec)
        assert isinstance(net, SpikingMLP) and net.spikes(torch.rand(3, 64)).shape == (3, steps, 8)
    bptt = build_model(model_config("snn_mlp", hidden=[8], neuron="bptt", tau=3.0), spec)
    assert isinstance(bptt.neurons[0], BPTTNeuron) and bptt.neurons[0].tau == 3.0 and bptt.neurons[0].v_th == 1.0
    dsr = build_model(model_config("snn_mlp", hidden=[8]), spec)
    assert isinstance(dsr.neurons[0], DSRNeuron) and float(dsr.neurons[0].v_th.detach()) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="hidden"):
        SpikingMLP((64,), [], (10,), False, 10, time_steps=2, neuron=DSRNeuron)


def test_protected_layers_like_the_mlp():
    assert list(_net().protected_layers()) == ["hidden.0", "hidden.1", "head"]
    multi = _net(multi_head=True)
    assert list(multi.protected_layers()) == ["hidden.0", "hidden.1"]
    assert not set(multi.protected_layers()) & multi.head_names()


@pytest.mark.parametrize("neuron", ["dsr", "bptt"])
def test_recorded_inputs_are_what_a_projection_must_protect(neuron):
    """collect_layer_inputs records hidden.0's input once per sample, every step's spikes at hidden.i (one column
    per sample and step) and the rates at the head; an update of every protected weight orthogonal to those spans
    leaves the old samples' spike trains and logits unchanged, an unprojected one does not."""
    net = _net(neuron, steps=4).double()
    n = 6
    x, t = _inputs(n).double(), torch.zeros(n, dtype=torch.long)
    layers = net.protected_layers()
    with torch.no_grad():
        reps = collect_layer_inputs(net, layers, lambda: net(x, t))
        limited = collect_layer_inputs(net, layers, lambda: net(x, t), samples={"hidden.1": 2})
        spikes, logits = net.spikes(x), net(x, t)
    assert {k: tuple(v.shape) for k, v in reps.items()} == {"hidden.0": (32, n), "hidden.1": (24, n * 4),
                                                           "head": (16, n)}
    assert tuple(limited["hidden.1"].shape) == (24, 2 * 4)  # sample limits count samples, not steps
    torch.testing.assert_close(reps["head"].T, net.features(x))

    def step(project: bool) -> SpikingMLP:
        moved = _net(neuron, steps=4).double()
        moved.load_state_dict(net.state_dict())
        for name, layer in moved.protected_layers().items():
            g = torch.randn(layer.weight.shape, generator=gen(len(name)), dtype=F64)
            if project:
                g = LayerProjector(layer, threshold_basis(reps[name], 1.0, rule="paper")).project(g)
            with torch.no_grad():
                layer.weight -= 0.3 * g
        return moved

    kept = step(project=True)
    with torch.no_grad():
        assert torch.equal(kept.spikes(x), spikes)
        torch.testing.assert_close(kept(x, t), logits, atol=1e-10, rtol=0)
        assert not torch.allclose(step(project=False)(x, t), logits, atol=1e-3)


# ------------------------------------------------------------------------------------------------ end to end


def test_gpm_on_the_spiking_mlp_end_to_end(tmp_path):
    cfg = run_config(tmp_path, "model=snn_mlp", "strategy=gpm", "benchmark=permuted_digits", "benchmark.n_tasks=2",
                     "engine.epochs=1", "engine.lr=0.1", "model.hidden=[32]", "model.time_steps=4",
                     "strategy.samples=[100]")
    assert cfg.model.name == "snn_mlp" and cfg.model.neuron == "dsr" and cfg.model.time_steps == 4
    res = run(cfg)
    assert res.R.shape == (2, 2)
    assert res.R[0, 0] > 50 and res.R[1, 1] > 50 and res.R[1, 0] > 50  # % (10 classes); measured 79, 81, 72


def test_model_config_checks(tmp_path):
    for override, key in (("model.time_steps=0", "model.time_steps"), ("model.neuron=if", "model.neuron"),
                          ("model.tau=0.5", "model.tau"), ("model.dt=0", "model.dt"),
                          ("model.fire_at=1.5", "model.fire_at"), ("model.hidden=[]", "model.hidden")):
        extra = ("model.neuron=bptt",) if override == "model.tau=0.5" else ()
        with pytest.raises(ConfigError, match=key):
            run_config(tmp_path, "model=snn_mlp", override, *extra)


@pytest.mark.parametrize(("neuron", "shared"), [("dsr", True), ("bptt", False)])
def test_time_shared_linear_gives_the_gradients_of_nn_linear(monkeypatch, neuron, shared):
    """model.time_shared_grad: every parameter's gradient equals the plain net's to float rounding; under DSR the
    layers over spikes take the once-for-all-steps route (their output gradient is one tensor expanded over T),
    under BPTT (a gradient per step) the general one."""
    from clbench.models import snn

    plain = _net(neuron, steps=6, hidden=(24, 16, 12))
    fast = SpikingMLP((2, 4, 4), [24, 16, 12], (5, 5), False, 5, time_steps=6, neuron=lambda: make_neuron(neuron),
                      time_shared_grad=True)
    fast.load_state_dict(plain.state_dict())
    assert [type(m) for m in fast.hidden] == [torch.nn.Linear, snn.TimeSharedLinear, snn.TimeSharedLinear]
    routes = []
    backward = snn._TimeSharedLinearFn.backward

    def spy(ctx, grad):
        routes.append(grad.stride(1) == 0)
        return backward(ctx, grad)

    monkeypatch.setattr(snn._TimeSharedLinearFn, "backward", staticmethod(spy))
    x, y = _inputs(8), torch.arange(8) % 5
    for net in (plain, fast):
        torch.nn.functional.cross_entropy(net(x, torch.zeros(8, dtype=torch.long)), y).backward()
    assert routes == [shared, shared]
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7 * float(p.grad.abs().max()) + 1e-12)
    assert any(float(p.grad.abs().max()) > 0 for p in plain.hidden[1:].parameters())  # a gradient to compare


def test_model_time_shared_grad_builds_time_shared_layers_over_spikes():
    from clbench.models import build_model, model_config
    from clbench.models.snn import TimeSharedLinear
    from clbench.streams.core import StreamSpec

    spec = StreamSpec("permuted_digits", 2, (64,), (10, 10), 10, False)
    for flag in (False, True):
        net = build_model(model_config("snn_mlp", hidden=[8, 8, 8], time_shared_grad=flag), spec)
        assert [isinstance(m, TimeSharedLinear) for m in net.hidden] == [False, flag, flag]
