"""Models: multi-head routing, which layers the projection family may protect (gpm.md §6.7), GPM's conv nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clbench.models import MODELS, build_model, model_config
from clbench.models import alexnet as alexnet_mod
from clbench.models import resnet as resnet_mod
from clbench.models.alexnet import AlexNet
from clbench.models.mlp import MLP
from clbench.models.resnet import ResNet18
from clbench.streams import StreamSpec
from clbench.subspace import LayerProjector, collect_layer_inputs, extend_basis


def test_single_head_protects_every_layer_including_the_shared_head():
    m = MLP((784,), [100, 100], (10,) * 10, multi_head=False, n_classes=10)
    assert list(m.protected_layers()) == ["hidden.0", "hidden.1", "head"]
    assert all(p.ndim == 2 for p in m.parameters())  # GPM's nets have no biases


def test_multi_head_never_protects_heads():
    m = MLP((64,), [100, 100], (2,) * 5, multi_head=True, n_classes=10)
    names = set(m.protected_layers())
    assert names == {"hidden.0", "hidden.1"}
    assert not names & m.head_names()


def test_mixed_task_batch_routes_each_sample_to_its_head():
    torch.manual_seed(0)
    m = MLP((8,), [16], (2, 3), multi_head=True, n_classes=5)
    x = torch.randn(6, 8)
    t = torch.tensor([0, 1, 0, 1, 1, 0])
    y = torch.tensor([1, 2, 0, 0, 1, 1])
    h = m.features(x)
    expected = sum(F.cross_entropy(m.heads[int(ti)](h[i:i + 1]), y[i:i + 1]) for i, ti in enumerate(t)) / 6
    torch.testing.assert_close(m.loss((x, y, t)), expected)
    pred = m.predict((x, y, t))
    for i, ti in enumerate(t):
        assert pred[i] == m.heads[int(ti)](h[i:i + 1]).argmax()


# --- GPM's conv nets (gpm.md §2, §4) -------------------------------------------------------------------------

CIFAR = (3, 32, 32)
MINI = (3, 84, 84)
RESNET_PROTECTED = [
    "conv1",
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.conv", "layer2.1.conv1", "layer2.1.conv2",
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.shortcut.conv", "layer3.1.conv1", "layer3.1.conv2",
    "layer4.0.conv1", "layer4.0.conv2", "layer4.0.shortcut.conv", "layer4.1.conv1", "layer4.1.conv2",
]


def _alexnet(multi_head: bool = True) -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(CIFAR, (10,) * 3, multi_head=multi_head, n_classes=30)


def _resnet(shape: tuple[int, int, int] = CIFAR, stem_stride: int = 1, multi_head: bool = True) -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(shape, (5,) * 3, multi_head=multi_head, n_classes=15, nf=20, stem_stride=stem_stride)


def _batch(n: int, shape: tuple[int, int, int], task: int = 0, classes: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g), torch.full((n,), task)


def test_alexnet_shapes_and_flat_size_from_the_input_shape():
    m = _alexnet()
    assert m.flat_features == 1024 and m.fc1.in_features == 1024  # 256·2·2 for 3×32×32
    x, y, t = _batch(4, CIFAR, task=1)
    assert m.features(x).shape == (4, 2048)
    assert m(x, t).shape == (4, 10)
    assert m.loss((x, y, t)).ndim == 0 and m.predict((x, y, t)).shape == (4,)
    assert [m.conv1.kernel_size, m.conv2.kernel_size, m.conv3.kernel_size] == [(4, 4), (3, 3), (2, 2)]
    assert [d.p for d in m.drops] == [0.2, 0.2, 0.5, 0.5, 0.5]
    other = AlexNet((1, 40, 40), (10,), multi_head=False, n_classes=10)  # 40→37→18→16→8→7→3
    assert other.conv1.in_channels == 1 and other.flat_features == 256 * 3 * 3
    assert other(torch.randn(2, 1, 40, 40), torch.zeros(2, dtype=torch.long)).shape == (2, 10)


def test_resnet18_feature_sizes_640_and_1440():
    m = _resnet()
    assert m.flat_features == 640
    x, y, t = _batch(2, CIFAR, task=2)
    assert m.features(x).shape == (2, 640)
    assert m(x, t).shape == (2, 5) and m.loss((x, y, t)).ndim == 0
    mini = _resnet(MINI, stem_stride=2)
    assert mini.flat_features == 1440 and mini.conv1.stride == (2, 2)
    assert mini.features(_batch(2, MINI)[0]).shape == (2, 1440)


def test_conv_nets_have_no_biases_and_only_batch_statistics_norms():
    for m in (_alexnet(), _resnet()):
        for name, p in m.named_parameters():
            assert p.ndim > 1 or ".bn" in f".{name}" or name.startswith("bn"), name  # 1-D: BN γ/β only
        norms = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(not n.track_running_stats and n.running_mean is None and n.affine for n in norms)


@pytest.mark.parametrize("make, shape", [(_alexnet, CIFAR), (_resnet, CIFAR)], ids=["alexnet", "resnet18"])
def test_batchnorm_uses_batch_statistics_in_eval(make, shape):
    m = make()
    x, _, t = _batch(6, shape)
    m.train()
    for mod in m.modules():  # train-mode BN, dropout off
        if isinstance(mod, nn.Dropout):
            mod.eval()
    with torch.no_grad():
        train_out = m(x, t)
        m.eval()
        eval_out = m(x, t)
        eval_part = m(x[:3], t[:3])
    torch.testing.assert_close(eval_out, train_out)
    assert not torch.allclose(eval_part, eval_out[:3], atol=1e-4)  # statistics come from the batch


def test_alexnet_protected_layers():
    m = _alexnet()
    assert list(m.protected_layers()) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert not set(m.protected_layers()) & m.head_names()
    assert list(m.protected_layers().values()) == [m.conv1, m.conv2, m.conv3, m.fc1, m.fc2]
    single = _alexnet(multi_head=False)
    assert list(single.protected_layers()) == ["conv1", "conv2", "conv3", "fc1", "fc2", "head"]
    assert len(alexnet_mod.GPM_SAMPLES) == 5


def test_resnet18_protects_its_20_convs_in_forward_order():
    m = _resnet()
    layers = m.protected_layers()
    assert list(layers) == RESNET_PROTECTED
    assert all(isinstance(mod, nn.Conv2d) for mod in layers.values())
    assert sum(mod.kernel_size == (3, 3) for mod in layers.values()) == 17
    assert sum(mod.kernel_size == (1, 1) for mod in layers.values()) == 3
    assert not set(layers) & m.head_names()
    modules = dict(m.named_modules())
    assert all(modules[name] is mod for name, mod in layers.items())  # keys are the modules' own names
    # every 4-D weight is protected, in forward (call) order
    assert [id(p) for p in m.parameters() if p.ndim == 4] == [id(mod.weight) for mod in layers.values()]
    order: list[nn.Module] = []
    hooks = [mod.register_forward_pre_hook(lambda mod, _a: order.append(mod)) for mod in layers.values()]
    m(_batch(2, CIFAR)[0], torch.zeros(2, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert order == list(layers.values())
    assert list(_resnet(multi_head=False).protected_layers()) == [*RESNET_PROTECTED, "head"]
    assert len(resnet_mod.GPM_SAMPLES) == 20
    # 17 3×3 convs 10×8, 50×3, 100×6; shortcuts take their block's count (gpm.md §2)
    samples = dict(zip(RESNET_PROTECTED, resnet_mod.GPM_SAMPLES, strict=True))
    convs3 = [samples[n] for n in RESNET_PROTECTED if "shortcut" not in n]
    assert convs3 == [10] * 8 + [50] * 3 + [100] * 6
    for s in (2, 3, 4):
        assert samples[f"layer{s}.0.shortcut.conv"] == samples[f"layer{s}.0.conv1"] == samples[f"layer{s}.0.conv2"]


def test_alexnet_representation_matrices_match_gpm_sizes():
    m = _alexnet()
    m.eval()
    x, _, t = _batch(125, CIFAR)
    layers = m.protected_layers()
    samples = dict(zip(layers, alexnet_mod.GPM_SAMPLES, strict=True))
    with torch.no_grad():
        reps = collect_layer_inputs(m, layers, lambda: m(x, t), samples=samples)
    assert {k: tuple(v.shape) for k, v in reps.items()} == {
        "conv1": (48, 29 * 29 * 24), "conv2": (576, 12 * 12 * 100), "conv3": (512, 5 * 5 * 100),
        "fc1": (1024, 125), "fc2": (2048, 125)}
    assert reps["conv1"].shape == (48, 20184) and reps["conv2"].shape == (576, 14400)


def test_resnet18_representation_matrices():
    m = _resnet()
    m.eval()
    n = 3
    x, _, t = _batch(n, CIFAR)
    layers = m.protected_layers()
    samples = {name: 1 if "shortcut" in name else 2 for name in layers}
    with torch.no_grad():
        reps = collect_layer_inputs(m, layers, lambda: m(x, t), samples=samples)
    # (rows = C_in·k·k, output positions): padding 1 and the conv's stride; shortcuts 1×1 on the block input
    expected = {"conv1": (27, 32 * 32)}
    for s, (c_in, c, size) in enumerate([(20, 20, 32), (20, 40, 16), (40, 80, 8), (80, 160, 4)], start=1):
        expected |= {f"layer{s}.0.conv1": (9 * c_in, size ** 2), f"layer{s}.0.conv2": (9 * c, size ** 2),
                     f"layer{s}.1.conv1": (9 * c, size ** 2), f"layer{s}.1.conv2": (9 * c, size ** 2)}
        if s > 1:
            expected[f"layer{s}.0.shortcut.conv"] = (c_in, size ** 2)
    assert set(expected) == set(reps)
    for name, (rows, positions) in expected.items():
        assert tuple(reps[name].shape) == (rows, positions * samples[name]), name


@pytest.mark.parametrize("make, shape", [(_alexnet, CIFAR), (_resnet, CIFAR)], ids=["alexnet", "resnet18"])
def test_projection_is_orthogonal_on_every_protected_layer(make, shape):
    m = make()
    layers = m.protected_layers()
    x, _, t = _batch(4, shape)
    m.eval()
    with torch.no_grad():
        reps = collect_layer_inputs(m, layers, lambda: m(x, t))
    bases = {name: extend_basis(None, R, 0.9) for name, R in reps.items()}
    assert all(0 < b.shape[1] < b.shape[0] for b in bases.values())
    batch = _batch(4, shape, task=1)

    def grads(project: bool) -> dict[str, torch.Tensor]:
        m.zero_grad()
        m.train()
        projectors = [LayerProjector(layers[n], b, form="auto", batch_size=4) for n, b in bases.items()]
        if project:
            for p in projectors:
                p.attach()
        torch.manual_seed(3)  # same dropout masks in both passes
        m.loss(batch).backward()
        if project:
            for p in projectors:
                p.project_()
                p.detach()
        return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}

    plain, projected = grads(False), grads(True)
    for name, M in bases.items():
        g = projected[f"{name}.weight"]
        g0 = plain[f"{name}.weight"]
        assert torch.linalg.norm(g.reshape(g.shape[0], -1) @ M) <= 1e-5 * torch.linalg.norm(g0), name
        assert torch.linalg.norm(g) > 0, name
    heads = [f"{name}.weight" for name in m.head_names() if f"{name}.weight" in plain]
    assert heads == ["heads.1.weight"]  # the batch's task; the other heads get no gradient
    for name in heads:
        torch.testing.assert_close(projected[name], plain[name], rtol=0, atol=0)  # heads are never projected


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_conv_nets_refuse_flat_streams_and_are_registered(name):
    assert name in MODELS
    flat = StreamSpec("split_digits", 5, (64,), (2,) * 5, 10, True)
    with pytest.raises(ValueError, match=rf"model.name={name}.*split_digits.*\(64,\)"):
        build_model(model_config(name), flat)
    tiny = StreamSpec("tiny_images", 2, (3, 4, 4), (2, 2), 4, True)
    with pytest.raises(ValueError, match=rf"model.name={name}.*tiny_images.*too small"):
        build_model(model_config(name), tiny)
    images = StreamSpec("images", 2, CIFAR, (3, 4), 7, True)
    model = build_model(model_config(name), images)
    assert model.multi_head and [h.out_features for h in model.heads] == [3, 4]


def test_resnet18_config_width_and_stem_stride():
    spec = StreamSpec("mini", 2, MINI, (5, 5), 10, False)
    model = build_model(model_config("resnet18", width=8, stem_stride=2), spec)
    assert isinstance(model, ResNet18) and model.flat_features == 8 * 8 * 3 * 3
    assert not model.multi_head and model.head.out_features == 10
