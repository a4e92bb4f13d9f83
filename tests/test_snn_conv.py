"""HLOP's spiking conv nets (hlop.md "Networks"): time-distributed layers, the spiking CNN and reduced spiking
ResNet-18 (shapes, protected layers, what each protected layer receives, gradients, readout rate), the
representation matrix of a (n, T, C, H, W) conv input, and the registry / configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import gen, run_config
from torch import Tensor, nn

from clbench.config import ConfigError
from clbench.models import MODELS, build_model, model_config
from clbench.models.snn import BPTTNeuron, DSRNeuron, SpikingClassifier, make_neuron
from clbench.models.snn_conv import (
    SpikingBasicBlock,
    SpikingCNN,
    SpikingResNet18,
    TimeAvgPool2d,
    TimeBatchNorm2d,
    TimeConv2d,
)
from clbench.streams import StreamSpec
from clbench.subspace import LayerProjector, collect_layer_inputs, layer_input_matrix, threshold_basis

F64 = torch.float64
RESNET_ORDER = ["conv1", "layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2",
                "layers.2.conv1", "layers.2.conv2", "layers.2.downsample", "layers.3.conv1", "layers.3.conv2",
                "layers.4.conv1", "layers.4.conv2", "layers.4.downsample", "layers.5.conv1", "layers.5.conv2",
                "layers.6.conv1", "layers.6.conv2", "layers.6.downsample", "layers.7.conv1", "layers.7.conv2"]




def _cnn(neuron: str = "dsr", multi_head: bool = False, steps: int = 3, channels: tuple[int, ...] = (4, 6, 8),
         size: int = 8, seed: int = 0) -> SpikingCNN:
    torch.manual_seed(seed)
    classes = (3, 4) if multi_head else (5, 5)
    return SpikingCNN((3, size, size), classes, multi_head, 7 if multi_head else 5, time_steps=steps,
                      neuron=lambda: make_neuron(neuron), channels=channels)


def _resnet(neuron: str = "dsr", multi_head: bool = False, steps: int = 2, nf: int = 4, stem_stride: int = 1,
            seed: int = 0) -> SpikingResNet18:
    torch.manual_seed(seed)
    classes = (3, 4) if multi_head else (5, 5)
    return SpikingResNet18((3, 8, 8), classes, multi_head, 7 if multi_head else 5, time_steps=steps,
                           neuron=lambda: make_neuron(neuron), nf=nf, stem_stride=stem_stride)


def _images(n: int, size: int = 8, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=gen(seed))


# ------------------------------------------------------------------------------------ time-distributed layers


def test_time_distributed_layers_fold_time_into_the_batch():
    x = torch.randn(2, 3, 4, 6, 6, generator=gen(0))  # (B, T, C, H, W)
    x[:, 1] += 5.0  # step 1 has another mean: BN statistics must pool the steps, not normalise each
    conv = TimeConv2d(4, 5, 3, stride=2, padding=1)
    seen: list[tuple[int, ...]] = []
    conv.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    y = conv(x)
    assert isinstance(conv, nn.Conv2d) and seen == [(2, 3, 4, 6, 6)] and y.shape == (2, 3, 5, 3, 3)
    for t in range(3):
        torch.testing.assert_close(y[:, t], F.conv2d(x[:, t], conv.weight, conv.bias, stride=2, padding=1))
    torch.testing.assert_close(conv(x[:, 0]), y[:, 0])  # a 4-D input: the plain conv

    bn = TimeBatchNorm2d(4, track_running_stats=False)
    z = bn(x).detach()
    assert isinstance(bn, nn.BatchNorm2d) and z.shape == x.shape
    mean = z.mean(dim=(0, 1, 3, 4))
    assert float(mean.abs().max()) < 1e-5  # normalised over B·T·H·W …
    assert float(z[:, 1].mean()) > 1.0 > float(z[:, 0].mean())  # … not per step
    torch.testing.assert_close(z, F.batch_norm(x.flatten(0, 1), None, None, training=True).unflatten(0, (2, 3)))

    pool = TimeAvgPool2d(2)
    p = pool(x)
    assert p.shape == (2, 3, 4, 3, 3)
    torch.testing.assert_close(p[:, 2], F.avg_pool2d(x[:, 2], 2))


# ------------------------------------------------------------------------------------------- nets: structure


@pytest.mark.parametrize("multi_head", [False, True])
def test_output_shapes_and_feature_sizes(multi_head):
    x, n = _images(3), 3
    t = torch.zeros(n, dtype=torch.long) if not multi_head else torch.tensor([0, 1, 1])
    y = torch.tensor([0, 2, 1])
    cnn = _cnn(multi_head=multi_head, steps=3)
    res = _resnet(multi_head=multi_head, steps=2)
    assert cnn.flat_features == 8 * 1 * 1 and cnn.spikes(x).shape == (n, 3, 8, 1, 1)
    assert res.flat_features == 32 and res.spikes(x).shape == (n, 2, 32, 1, 1)  # 8 → 8, 8, 4, 2, 1
    for net in (cnn, res):
        assert net.features(x).shape == (n, net.flat_features)
        if multi_head:
            assert [h.out_features for h in net.heads] == [3, 4]
            assert net(x[:1], t[:1]).shape == (1, 3) and net(x[1:], t[1:]).shape == (2, 4)
        else:
            assert net(x, t).shape == (n, 5)
        assert net.predict((x, y, t)).shape == (n,) and torch.isfinite(net.loss((x, y, t)))
    big = SpikingCNN((3, 16, 16), (5,), False, 5, time_steps=2, neuron=DSRNeuron, channels=(4, 6))
    assert big.flat_features == 6 * 4 * 4  # 16 → 8 → 4
    stem2 = _resnet(stem_stride=2)
    assert stem2.spikes(x).shape == (n, 2, 32, 1, 1)  # 8 → 4 → 4, 2, 1, 1
    with pytest.raises(ValueError, match="too small"):
        SpikingCNN((3, 4, 4), (5,), False, 5, time_steps=2, neuron=DSRNeuron)  # 3 pools need ≥ 8 pixels


def test_protected_layers_names_order_and_types():
    cnn, cnn_multi = _cnn(), _cnn(multi_head=True)
    assert list(cnn.protected_layers()) == ["convs.0", "convs.1", "convs.2", "head"]
    assert list(cnn_multi.protected_layers()) == ["convs.0", "convs.1", "convs.2"]
    assert [m.weight[0].numel() for m in cnn_multi.protected_layers().values()] == [27, 36, 54]  # C_in·3·3
    res, res_multi = _resnet(), _resnet(multi_head=True)
    assert list(res_multi.protected_layers()) == RESNET_ORDER
    assert list(res.protected_layers()) == [*RESNET_ORDER, "head"]
    assert not set(res_multi.protected_layers()) & res_multi.head_names()
    for net in (cnn, res):
        named = dict(net.named_modules())
        for name, layer in net.protected_layers().items():
            assert named[name] is layer
            assert isinstance(layer, nn.Linear if name == "head" else TimeConv2d)
            assert isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.bias is None
    layers = res.protected_layers()
    for name in ("layers.2.downsample", "layers.4.downsample", "layers.6.downsample"):
        conv = layers[name]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert res.conv1.kernel_size == (3, 3) and res.conv1.stride == (1, 1)
    stem = _resnet(stem_stride=2).conv1
    assert stem.kernel_size == (5, 5) and stem.stride == (2, 2) and stem.padding == (2, 2)


def _record_inputs(net: nn.Module, names: list[str], run) -> dict[str, Tensor]:
    modules = dict(net.named_modules())
    seen: dict[str, Tensor] = {}
    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0].detach()))
               for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_what_each_layer_receives():
    """The first conv sees the image once (4-D), later convs every step's spikes (5-D), a shared head the rate;
    a downsample takes the first BN-LIF output (what its block's conv1 takes), an identity block adds its
    input to conv2's output."""
    x, t = _images(2), torch.zeros(2, dtype=torch.long)
    cnn = _cnn(steps=3)
    got = _record_inputs(cnn, ["convs.0", "convs.1", "convs.2", "head"], lambda: cnn(x, t))
    assert torch.equal(got["convs.0"], x)
    assert got["convs.1"].shape == (2, 3, 4, 4, 4) and got["convs.2"].shape == (2, 3, 6, 2, 2)
    torch.testing.assert_close(got["head"], cnn.features(x))

    res = _resnet(steps=2)
    names = ["conv1", "layers.0.conv1", "layers.2.conv1", "layers.2.downsample", "layers.2.conv2"]
    got = _record_inputs(res, names, lambda: res(x, t))
    assert torch.equal(got["conv1"], x)
    assert got["layers.0.conv1"].shape == (2, 2, 4, 8, 8)
    assert torch.equal(got["layers.2.downsample"], got["layers.2.conv1"])
    assert got["layers.2.conv1"].shape == (2, 2, 4, 8, 8) and got["layers.2.conv2"].shape == (2, 2, 8, 4, 4)

    block = res.layers[1]
    assert isinstance(block, SpikingBasicBlock) and block.downsample is None
    h = torch.randn(2, 2, 4, 8, 8, generator=gen(3))
    out2: list[Tensor] = []
    block.conv2.register_forward_hook(lambda _m, _a, o: out2.append(o))
    torch.testing.assert_close(block(h), out2[0] + h)
    first = res.layers[0]  # after the stem its input is 4-D, constant over time: added at every step
    assert isinstance(first, SpikingBasicBlock) and first.downsample is None
    h4 = torch.randn(2, 4, 8, 8, generator=gen(4))
    first.conv2.register_forward_hook(lambda _m, _a, o: out2.append(o))
    torch.testing.assert_close(first(h4), out2[1] + h4.unsqueeze(1))


def test_spikes_of_the_conv_stages():
    """The CNN's pooled spikes are averages of 0 / V_th/Δt spikes over 2×2 windows."""
    x = _images(2)
    cnn = _cnn(steps=3)
    got = _record_inputs(cnn, ["convs.1"], lambda: cnn.spikes(x))
    quarters = got["convs.1"] / (0.3 / 0.05) * 4  # number of spikes in each 2×2 window
    assert bool(((quarters - quarters.round()).abs() < 1e-4).all()) and bool((quarters > 0).any())


# ---------------------------------------------------------------------------------- representation matrices


def test_layer_input_matrix_of_a_time_distributed_conv():
    """R of (n, T, C, H, W) = the unfolding of the (n·T) flattened tensor: column (n'·T + t)·L + l is the patch of
    sample n', step t at position l, and W.view(out, −1) @ R reproduces the conv's output at every step."""
    n, T = 2, 3
    conv = TimeConv2d(4, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(n, T, 4, 6, 6, generator=gen(5))
    R = layer_input_matrix(conv, x)
    L = 9
    assert R.shape == (4 * 9, n * T * L)
    flat = F.unfold(x.flatten(0, 1), 3, padding=1, stride=2)  # (n·T, 36, L)
    for sample, step, pos in ((0, 0, 0), (1, 2, 8), (1, 0, 4)):
        torch.testing.assert_close(R[:, (sample * T + step) * L + pos], flat[sample * T + step, :, pos])
        assert torch.equal(R[:, (sample * T + step) * L + pos], F.unfold(x[sample, step:step + 1], 3, padding=1,
                                                                         stride=2)[0, :, pos])
    out = (conv.weight.view(5, -1) @ R).view(5, n, T, 3, 3).permute(1, 2, 0, 3, 4)
    torch.testing.assert_close(out, conv(x).detach())
    lin = nn.Linear(4, 2)
    z = torch.randn(n, T, 4, generator=gen(6))
    assert torch.equal(layer_input_matrix(lin, z), z.reshape(n * T, 4).t())


def test_collect_layer_inputs_counts_samples_not_steps():
    n_all, n_keep, T = 5, 2, 3
    cnn = _cnn(steps=T)
    x, t = _images(n_all), torch.zeros(n_all, dtype=torch.long)
    layers = cnn.protected_layers()
    with torch.no_grad():
        full = collect_layer_inputs(cnn, layers, lambda: cnn(x, t))
        kept = collect_layer_inputs(cnn, layers, lambda: cnn(x, t),
                                    samples={"convs.0": n_keep, "convs.1": n_keep, "convs.2": n_keep, "head": 1})
    L = {"convs.0": 64, "convs.1": 16, "convs.2": 4}
    assert full["convs.0"].shape == (27, n_all * L["convs.0"])  # the image once per sample
    assert full["convs.1"].shape == (36, n_all * T * L["convs.1"]) and full["head"].shape == (8, n_all)
    assert kept["convs.0"].shape == (27, n_keep * L["convs.0"])
    for name in ("convs.1", "convs.2"):
        cols = n_keep * T * L[name]
        assert kept[name].shape == (full[name].shape[0], cols)
        assert torch.equal(kept[name], full[name][:, :cols])  # the first n samples, all of their steps
    assert torch.equal(kept["head"], full["head"][:, :1])


# ------------------------------------------------------------------------------------ gradients and readout


@pytest.mark.parametrize("neuron", ["dsr", "bptt"])
def test_gradients_reach_every_conv(neuron):
    x, y = _images(4), torch.tensor([0, 1, 2, 0])
    t = torch.zeros(4, dtype=torch.long)
    for net in (_cnn(neuron, multi_head=True), _resnet(neuron, multi_head=True)):
        net.loss((x, y, t)).backward()
        for name, layer in net.protected_layers().items():
            assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0), (neuron, name)
        assert net.heads[1].weight.grad is None or not bool(net.heads[1].weight.grad.any())  # unused head


@pytest.mark.parametrize("neuron", ["dsr", "bptt"])
def test_rate_is_the_readout_mean_over_time(neuron):
    T = 4
    for net in (_cnn(neuron, steps=T), _resnet(neuron, steps=T)):
        assert isinstance(net, SpikingClassifier) and net.timed_rank == 5
        a = torch.rand(2, T, 3, 5, 5, generator=gen(7))
        if neuron == "dsr":
            w = torch.tensor([math.exp(-(T - s) * 0.05 / 1.0) for s in range(1, T + 1)])
        else:
            w = torch.ones(T)
        expected = (a * (w / w.sum()).view(1, T, 1, 1, 1)).sum(dim=1)
        assert not torch.allclose(a[:, -1], expected)
        torch.testing.assert_close(net.rate(a), expected)
        four, two = torch.rand(2, 3, 5, 5), torch.rand(2, 8)
        assert net.rate(four) is four and net.rate(two) is two  # no time dim: as is
    dsr_w = torch.tensor([math.exp(-(T - s) * 0.05) for s in range(1, T + 1)])
    assert float(dsr_w[0]) < float(dsr_w[-1]) == 1.0  # DSR weighs late steps more (not a plain mean)


@pytest.mark.parametrize("neuron", ["dsr", "bptt"])
def test_readout_equals_the_head_at_every_step_then_the_rate(neuron):
    """The official readout: logits at every step, then the (weighted) rate; ours: the head on the rate."""
    x, t = _images(3), torch.zeros(3, dtype=torch.long)
    cnn, res = _cnn(neuron, steps=3), _resnet(neuron, steps=3)
    with torch.no_grad():
        per_step = cnn.head(cnn.spikes(x).flatten(2))  # (B, T, classes)
        torch.testing.assert_close(cnn(x, t), cnn.rate(per_step.unsqueeze(-1).unsqueeze(-1)).flatten(1))
        per_step = res.head(res.spikes(x).mean(dim=(-2, -1)))
        torch.testing.assert_close(res(x, t), res.rate(per_step.unsqueeze(-1).unsqueeze(-1)).flatten(1))


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_updates_orthogonal_to_the_recorded_inputs_keep_old_outputs(kind):
    """Every protected layer's recorded input (image, spikes of every step, downsample input, head rate) is what a
    projection must protect: an update of all protected weights orthogonal to those spans leaves the old
    sample's spike trains and logits unchanged (BN on batch statistics, V_th fixed); an unprojected one does
    not. One sample on 4×4 images keeps every R rank-deficient, so no projection is trivially zero."""

    def make() -> SpikingClassifier:
        torch.manual_seed(0)
        if kind == "cnn":
            return SpikingCNN((3, 4, 4), (5,), False, 5, time_steps=2, neuron=DSRNeuron, channels=(8, 16)).double()
        return SpikingResNet18((3, 4, 4), (5,), False, 5, time_steps=6, neuron=DSRNeuron, nf=32).double()

    net = make()
    x, t = 3.0 * torch.randn(1, 3, 4, 4, generator=gen(8), dtype=F64), torch.zeros(1, dtype=torch.long)
    layers = net.protected_layers()
    with torch.no_grad():
        reps = collect_layer_inputs(net, layers, lambda: net(x, t))
        spikes, logits = net.spikes(x), net(x, t)
    assert bool((spikes > 0).any())

    def step(project: bool) -> SpikingClassifier:
        moved = make()
        moved.load_state_dict(net.state_dict())
        for i, (name, layer) in enumerate(moved.protected_layers().items()):
            g = torch.randn(layer.weight.shape, generator=gen(100 + i), dtype=F64)
            if project:
                g = LayerProjector(layer, threshold_basis(reps[name], 1.0, rule="paper")).project(g)
                assert float(g.norm()) > 0.1, name  # a real update in every layer
            with torch.no_grad():
                layer.weight -= 0.3 * g
        return moved

    kept = step(project=True)
    with torch.no_grad():
        assert torch.equal(kept.spikes(x), spikes)
        torch.testing.assert_close(kept(x, t), logits, atol=1e-10, rtol=0)
        assert not torch.allclose(step(project=False)(x, t), logits, atol=1e-3)


# -------------------------------------------------------------------------------------- registry and configs


def test_models_build_from_config_for_a_32x32_stream():
    assert {"snn_cnn", "snn_resnet18"} <= set(MODELS)
    spec = StreamSpec("cifar", 2, (3, 32, 32), (10, 10), 20, True)
    cnn = build_model(model_config("snn_cnn", time_steps=2), spec)
    assert isinstance(cnn, SpikingCNN) and cnn.multi_head and cnn.time_steps == 2
    assert cnn.flat_features == 4096 and [(h.in_features, h.out_features) for h in cnn.heads] == [(4096, 10)] * 2
    assert [c.out_channels for c in cnn.convs] == [64, 128, 256] and isinstance(cnn.neurons[0], DSRNeuron)
    std = float(cnn.convs[2].weight.detach().std())
    assert std == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.03)  # the official He fan-out init
    x = torch.randn(2, 3, 32, 32, generator=gen(9))
    with torch.no_grad():
        assert cnn(x, torch.zeros(2, dtype=torch.long)).shape == (2, 10)
    res = build_model(model_config("snn_resnet18", time_steps=2, neuron="bptt", tau=3.0), spec)
    assert isinstance(res, SpikingResNet18) and res.flat_features == 160 and res.conv1.kernel_size == (3, 3)
    assert isinstance(res.sn1, BPTTNeuron) and res.sn1.tau == 3.0
    assert res.heads[0].in_features == 160 and res.layers[7].conv2.out_channels == 160
    with torch.no_grad():
        assert res(x, torch.ones(2, dtype=torch.long)).shape == (2, 10)
    mini = StreamSpec("mini", 2, (3, 84, 84), (5, 5), 10, True)
    res84 = build_model(model_config("snn_resnet18", width=4, stem_stride=2, bn_running_stats=True), mini)
    assert isinstance(res84, SpikingResNet18) and res84.conv1.kernel_size == (5, 5) and res84.flat_features == 32
    assert res84.bn1.track_running_stats and not cnn.bns[0].track_running_stats
    small = build_model(model_config("snn_cnn", channels=[4, 8]), StreamSpec("s", 1, (1, 8, 8), (3,), 3, False))
    assert isinstance(small, SpikingCNN) and small.flat_features == 8 * 2 * 2 and not small.multi_head
    flat = StreamSpec("digits", 2, (64,), (5, 5), 10, True)
    for name in ("snn_cnn", "snn_resnet18"):
        with pytest.raises(ValueError, match=rf"model.name={name}.*digits"):
            build_model(model_config(name), flat)


def test_config_files(tmp_path):
    cnn = run_config(tmp_path, "model=snn_cnn").model
    assert (cnn.name, cnn.channels, cnn.time_steps, cnn.neuron, cnn.bias) == ("snn_cnn", [64, 128, 256], 20, "dsr",
                                                                               False)
    res = run_config(tmp_path, "model=snn_resnet18", "model.stem_stride=2").model
    assert (res.name, res.width, res.stem_stride, res.time_steps, res.neuron) == ("snn_resnet18", 20, 2, 20, "dsr")
    with pytest.raises(ConfigError, match=r"model\.channels"):
        run_config(tmp_path, "model=snn_cnn", "model.channels=[]")
