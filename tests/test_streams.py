"""Tests of :mod:`clbench.streams`: offline streams, config validation, real-loader errors, batch sources."""

from __future__ import annotations

import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clbench.config import BenchmarkConfig
from clbench.streams import STREAMS, BatchSource, Stream, batch_source, build_stream
from clbench.streams.batches import LoaderBatchSource, TensorBatchSource, direct_tensors
from clbench.streams.core import PixelNorm, TensorSamples, make_dataset, pmnist_permutations
from clbench.streams.offline import mnist1d_split

torch.set_num_threads(1)

CPU = torch.device("cpu")


def build(name: str, seed: int = 0, **kw: object) -> Stream:
    """Build a stream from a config with the given overrides."""
    return build_stream(BenchmarkConfig(name=name, **kw), seed)  # type: ignore[arg-type]


def tensors(dataset: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole experience dataset as CPU tensors (through the cached batch source)."""
    return batch_source(dataset, CPU).all()


def read_by_getitem(dataset: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dataset read sample by sample through a plain DataLoader (the reference for the fast path)."""
    xs, ys, ts = [], [], []
    for x, y, t in DataLoader(dataset, batch_size=256, collate_fn=getattr(dataset, "collate_fn", None)):
        xs.append(x)
        ys.append(torch.as_tensor(y))
        ts.append(torch.as_tensor(t))
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()


def row_set(x: torch.Tensor) -> set[bytes]:
    """The rows of ``x`` as a set of byte strings."""
    return {r.tobytes() for r in x.numpy()}


# ---------------------------------------------------------------------------------------------- registry


def test_registry_has_every_stream() -> None:
    assert set(STREAMS) == {
        "permuted_digits",
        "keyword_topics",
        "offline_text",
        "olora_standard",
        "olora_long",
        "safety_toy",
        "ogpsa_alignment",
        "fictitious_facts",
        "scienceqa_unlearning",
        "tofu_unlearning",
        "clinc_unlearning",
        "split_digits",
        "permuted_mnist1d",
        "split_mnist1d",
        "permuted_mnist_5k",
        "pmnist",
        "split_cifar100",
        "split_digits_32",
        "split_mnist_5k_32",
        "permuted_mnist_5k_32",
        "five_datasets",
        "miniimagenet",
    }
    assert BenchmarkConfig().name == "permuted_mnist_5k"


def test_unknown_name_names_key_and_choices() -> None:
    with pytest.raises(ValueError, match=r"benchmark\.name") as err:
        build("nope")
    assert "permuted_mnist_5k" in str(err.value)


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("permuted_mnist_5k", {"n_tasks": 0}, "benchmark.n_tasks"),
        ("permuted_digits", {"n_tasks": -1}, "benchmark.n_tasks"),
        ("split_digits", {"n_tasks": 3, "scenario": "task"}, "benchmark.n_tasks"),
        ("split_digits", {"n_tasks": 10, "scenario": "task"}, "benchmark.n_tasks"),
        ("split_digits", {"n_tasks": 11, "scenario": "class"}, "benchmark.n_tasks"),
        ("split_digits", {"n_tasks": 5, "scenario": "domain"}, "benchmark.scenario"),
        ("permuted_digits", {"test_fraction": 0.0}, "benchmark.test_fraction"),
        ("permuted_mnist_5k", {"test_fraction": 1.0}, "benchmark.test_fraction"),
        ("permuted_digits", {"validation_fraction": 1.0}, "benchmark.validation_fraction"),
        ("permuted_digits", {"max_train_per_task": -1}, "benchmark.max_train_per_task"),
        ("split_cifar100", {"n_tasks": 7, "scenario": "task"}, "benchmark.n_tasks"),
    ],
)
def test_bad_values_name_the_key(name: str, overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        build(name, **overrides)
    assert "valid" in str(err.value)


def test_split_digits_valid_task_counts() -> None:
    assert build("split_digits", n_tasks=2, scenario="task").spec.classes_per_task == (5, 5)
    assert build("split_digits", n_tasks=10, scenario="class").spec.classes_per_task == (1,) * 10


# -------------------------------------------------------------------------------------- offline streams


def check_experiences(stream: Stream) -> None:
    """Every experience: task label i, samples (x, y, t) of the spec's shape, labels in the head's range."""
    spec, bm = stream.spec, stream.benchmark
    names = ["train", "test"] + (["valid"] if "valid" in bm.streams else [])
    for name in names:
        exps = list(bm.streams[name])
        assert len(exps) == spec.n_tasks
        for i, exp in enumerate(exps):
            assert exp.task_label == i
            assert exp.current_experience == i
            x, y, t = exp.dataset[0]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
            assert tuple(x.shape) == spec.input_shape
            assert isinstance(y, int) and t == i
            _, ys, ts = tensors(exp.dataset)
            assert bool((ts == i).all())
            assert len(set(ys.tolist())) == spec.classes_per_task[i]
            head = spec.classes_per_task[i] if spec.multi_head else spec.n_classes
            assert int(ys.min()) >= 0 and int(ys.max()) < head


def test_permuted_digits() -> None:
    from sklearn.datasets import load_digits

    stream = build("permuted_digits", seed=3, n_tasks=4)
    assert stream.spec.input_shape == (64,)
    assert stream.spec.classes_per_task == (10,) * 4
    assert (stream.spec.n_classes, stream.spec.multi_head) == (10, False)
    check_experiences(stream)
    bm = stream.benchmark
    assert len(bm.train_stream[0].dataset) + len(bm.test_stream[0].dataset) == 1797
    assert len(bm.test_stream[0].dataset) == pytest.approx(0.2 * 1797, abs=10)
    original = row_set(torch.from_numpy(load_digits().data.astype(np.float32) / 16.0))
    for split in ("train", "test"):
        x0, y0, _ = tensors(bm.streams[split][0].dataset)
        assert float(x0.min()) >= 0.0 and float(x0.max()) <= 1.0
        assert row_set(x0) <= original  # task 0 is unpermuted
        for i in range(1, 4):
            xi, yi, _ = tensors(bm.streams[split][i].dataset)
            assert torch.equal(yi, y0)  # the same samples, in the same order
            assert torch.equal(xi.sort(dim=1).values, x0.sort(dim=1).values)  # same pixel values...
            assert not torch.equal(xi, x0)  # ...in another order
            assert len(row_set(xi) & original) < 0.05 * len(xi)
    a, b = build("permuted_digits", seed=3, n_tasks=4), build("permuted_digits", seed=4, n_tasks=4)
    assert torch.equal(
        tensors(a.benchmark.train_stream[2].dataset)[0], tensors(bm.train_stream[2].dataset)[0]
    )
    assert not torch.equal(
        tensors(a.benchmark.train_stream[2].dataset)[0], tensors(b.benchmark.train_stream[2].dataset)[0]
    )


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_split_digits_labels(scenario: str) -> None:
    stream = build("split_digits", n_tasks=5, scenario=scenario)
    spec = stream.spec
    assert spec.classes_per_task == (2,) * 5 and spec.n_classes == 10
    assert spec.multi_head is (scenario == "task")
    check_experiences(stream)
    total = 0
    for t, (tr, te) in enumerate(
        zip(stream.benchmark.train_stream, stream.benchmark.test_stream, strict=True)
    ):
        expected = {0, 1} if scenario == "task" else {2 * t, 2 * t + 1}
        for exp in (tr, te):
            assert set(tensors(exp.dataset)[1].tolist()) == expected
            assert set(exp.classes_in_this_experience) == expected
            total += len(exp.dataset)
    assert total == 1797


def test_permuted_mnist_5k() -> None:
    stream = build("permuted_mnist_5k", seed=0)
    spec = stream.spec
    assert (spec.n_tasks, spec.input_shape, spec.n_classes, spec.multi_head) == (10, (784,), 10, False)
    bm = stream.benchmark
    assert list(bm.streams) == ["train", "test"]
    xs = {}
    for split, n in (("train", 4000), ("test", 1000)):
        exps = list(bm.streams[split])
        assert len(exps) == 10
        base = None
        for i, exp in enumerate(exps):
            assert exp.task_label == i and len(exp.dataset) == n
            x, y, t = tensors(exp.dataset)
            assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), n // 10))
            assert bool((t == i).all())
            if base is None:
                base = x[:300].sort(dim=1).values
            else:
                assert torch.equal(x[:300].sort(dim=1).values, base)  # every task: the same images, permuted
            xs[split, i] = x
        # normalised with (0.1307, 0.3081): a zero pixel maps to -0.1307 / 0.3081
        assert float(base.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    perms = pmnist_permutations(10, 0)
    assert all(not torch.equal(p, torch.arange(784)) for p in perms)  # no identity task
    assert len({tuple(p.tolist()) for p in perms}) == 10
    assert all(not torch.equal(xs["train", i], xs["train", j]) for i in range(10) for j in range(i))
    # deterministic across builds; a different run seed changes the permutations, never the split. (Under the
    # protocol task i has only 10 possible permutations, 100*r + i: seeds 0 and 1 share r for tasks 0 and 9.)
    again = build("permuted_mnist_5k", seed=0).benchmark
    other = build("permuted_mnist_5k", seed=1).benchmark
    for split in ("train", "test"):
        for i in (0, 1):
            assert torch.equal(tensors(again.streams[split][i].dataset)[0], xs[split, i])
            x1, y1, _ = tensors(other.streams[split][i].dataset)
            assert torch.equal(x1, xs[split, i]) == (i == 0)
            assert torch.equal(x1[:300].sort(dim=1).values, xs[split, 0][:300].sort(dim=1).values)
            assert torch.equal(y1, tensors(again.streams[split][0].dataset)[1])
    # stream_seed overrides the run seed
    a = build("permuted_mnist_5k", seed=0, stream_seed=7, n_tasks=2).benchmark
    b = build("permuted_mnist_5k", seed=1, stream_seed=7, n_tasks=2).benchmark
    assert torch.equal(tensors(a.train_stream[1].dataset)[0], tensors(b.train_stream[1].dataset)[0])


def test_pmnist_permutations_protocol() -> None:
    ten = pmnist_permutations(10, 5)
    three = pmnist_permutations(3, 5)
    assert all(torch.equal(a, b) for a, b in zip(three, ten[:3], strict=False))  # a prefix of the 10 tasks
    order = np.random.RandomState(5).permutation(10)
    assert torch.equal(
        ten[4], torch.from_numpy(np.random.RandomState(100 * int(order[4]) + 4).permutation(784))
    )
    assert len(pmnist_permutations(12, 5)) == 12


def test_mnist1d_streams_and_global_rng() -> None:
    mnist1d_split.cache_clear()
    random.seed(11)
    np.random.seed(11)
    py_state, np_state = random.random(), np.random.random()
    random.seed(11)
    np.random.seed(11)
    perm = build("permuted_mnist1d", n_tasks=3)
    assert (random.random(), np.random.random()) == (py_state, np_state)  # make_dataset's reseeding undone
    assert perm.spec.input_shape == (40,) and perm.spec.n_classes == 10 and not perm.spec.multi_head
    check_experiences(perm)
    x0, y0, _ = tensors(perm.benchmark.train_stream[0].dataset)
    assert x0.shape == (4000, 40)
    assert float(x0.mean()) == pytest.approx(0.0, abs=1e-4) and float(x0.std()) == pytest.approx(
        1.0, abs=1e-3
    )
    x1, y1, _ = tensors(perm.benchmark.train_stream[1].dataset)
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    assert torch.equal(x0.sort(dim=1).values, x1.sort(dim=1).values)
    assert len(perm.benchmark.test_stream[0].dataset) == 1000
    split = build("split_mnist1d", n_tasks=5, scenario="task")
    assert split.spec.multi_head and split.spec.classes_per_task == (2,) * 5
    check_experiences(split)
    assert sum(len(e.dataset) for e in split.benchmark.train_stream) == 4000


def test_validation_split_and_cap() -> None:
    kw = {"n_tasks": 5, "scenario": "class", "validation_fraction": 0.2, "max_train_per_task": 50}
    stream = build("split_digits", seed=2, **kw)
    bm = stream.benchmark
    assert list(bm.streams) == ["train", "valid", "test"]
    check_experiences(stream)
    full = build("split_digits", seed=2, n_tasks=5, scenario="class").benchmark
    for i in range(5):
        n_full = len(full.train_stream[i].dataset)
        xv, yv, _ = tensors(bm.valid_stream[i].dataset)
        xt, _, _ = tensors(bm.train_stream[i].dataset)
        assert len(xt) == 50
        assert len(xv) == pytest.approx(0.2 * n_full, abs=2)
        assert set(yv.tolist()) == {2 * i, 2 * i + 1}  # stratified: both classes held out
        assert not row_set(xv) & row_set(xt)
        assert row_set(xv) | row_set(xt) <= row_set(tensors(full.train_stream[i].dataset)[0])
    again = build("split_digits", seed=2, **kw).benchmark
    assert torch.equal(tensors(again.valid_stream[3].dataset)[0], tensors(bm.valid_stream[3].dataset)[0])
    assert torch.equal(tensors(again.train_stream[3].dataset)[0], tensors(bm.train_stream[3].dataset)[0])


# -------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize(("name", "label"), [("pmnist", "MNIST"), ("split_cifar100", "CIFAR-100")])
def test_missing_real_data_fails_fast(tmp_path: Path, name: str, label: str) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        build(name, data_root=str(root), download=False, scenario="task")
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert str(root) in message and label in message and "benchmark.download=true" in message


# ------------------------------------------------------------------------------------------ batch sources


def id_dataset(n: int = 103, task: int = 2) -> object:
    """An Avalanche dataset whose x is the sample index, so batches can be traced back to samples."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return make_dataset(TensorSamples(x, torch.arange(n) % 3), task)


def epoch(source: BatchSource, batch_size: int, shuffle: bool, seed: int | None) -> list[torch.Tensor]:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return [x[:, 0].long() for x, _, _ in source.batches(batch_size, shuffle, gen)]


def test_tensor_batch_source() -> None:
    ds = id_dataset()
    src = batch_source(ds, CPU)
    assert isinstance(src, TensorBatchSource) and src.cached and len(src) == 103
    assert src.num_batches(10) == 11
    plain = epoch(src, 10, False, None)
    assert [len(b) for b in plain] == [10] * 10 + [3]  # last partial batch included
    assert torch.equal(torch.cat(plain), torch.arange(103))
    shuffled = epoch(src, 10, True, 0)
    order = torch.cat(shuffled)
    assert torch.equal(order.sort().values, torch.arange(103))  # every sample exactly once
    assert not torch.equal(order, torch.arange(103))
    assert torch.equal(order, torch.cat(epoch(src, 10, True, 0)))  # same generator seed, same order
    assert not torch.equal(order, torch.cat(epoch(src, 10, True, 1)))
    assert torch.equal(order, torch.randperm(103, generator=torch.Generator().manual_seed(0)))
    for x, y, t in src.batches(7, True, torch.Generator().manual_seed(3)):
        assert torch.equal(y, x[:, 0].long() % 3) and bool((t == 2).all())
        assert x.device == y.device == t.device == CPU
    x, y, t = src.take(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3) and len(set(x[:, 0].tolist())) == 5 and torch.equal(y, x[:, 0].long() % 3)
    assert len(src.take(1000)[0]) == 103
    with pytest.raises(ValueError):
        src.take(0)
    with pytest.raises(ValueError):
        src.num_batches(0)


def test_loader_batch_source_matches_cached() -> None:
    ds = id_dataset()
    cached = batch_source(ds, CPU)
    loader = batch_source(ds, CPU, max_bytes=100)
    assert isinstance(loader, LoaderBatchSource) and not loader.cached and len(loader) == 103
    for shuffle in (False, True):
        a = list(cached.batches(16, shuffle, torch.Generator().manual_seed(5)))
        b = list(loader.batches(16, shuffle, torch.Generator().manual_seed(5)))
        assert len(a) == len(b) == loader.num_batches(16) == 7
        for ba, bb in zip(a, b, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(ba, bb, strict=True))
    ta, tb = (
        cached.take(9, torch.Generator().manual_seed(1)),
        loader.take(9, torch.Generator().manual_seed(1)),
    )
    assert all(torch.equal(u, v) for u, v in zip(ta, tb, strict=True))
    with pytest.raises(RuntimeError):
        loader.all()


def test_direct_read_equals_getitem_on_real_experiences() -> None:
    bm = build("split_digits", n_tasks=5, scenario="task", validation_fraction=0.1).benchmark
    for exp in (bm.train_stream[1], bm.valid_stream[2], bm.test_stream[4]):
        for ds in (exp.dataset, exp.dataset.eval(), exp.dataset.train()):  # strategies switch groups
            direct = direct_tensors(ds)
            assert direct is not None
            assert all(torch.equal(u, v) for u, v in zip(direct, read_by_getitem(ds), strict=True))
    pm = build("permuted_mnist_5k", n_tasks=2).benchmark.train_stream[1].dataset
    direct = direct_tensors(pm)
    assert direct is not None
    assert all(torch.equal(u, v) for u, v in zip(direct, read_by_getitem(pm), strict=True))


def test_direct_read_through_avalanche_subsets_and_concat() -> None:
    a, b = id_dataset(50, task=1), id_dataset(30, task=4)
    mixed = a.concat(b).subset([49, 0, 55, 3, 79, 10, 50])
    direct = direct_tensors(mixed)
    assert direct is not None
    assert direct[0][:, 0].tolist() == [49, 0, 5, 3, 29, 10, 0]
    assert direct[2].tolist() == [1, 1, 4, 1, 4, 1, 4]
    assert all(torch.equal(u, v) for u, v in zip(direct, read_by_getitem(mixed), strict=True))


def test_transformed_dataset_falls_back_to_the_loader() -> None:
    ds = id_dataset(20).replace_current_transform_group(lambda x: x * 2)
    assert direct_tensors(ds) is None
    x, _, t = batch_source(ds, CPU).all()
    assert torch.equal(x[:, 0], torch.arange(20, dtype=torch.float32) * 2) and bool((t == 2).all())


def test_plain_tensor_dataset_without_task_labels() -> None:
    ds = TensorDataset(torch.randn(12, 4), torch.arange(12))
    x, y, t = batch_source(ds, CPU).all()
    assert torch.equal(x, ds.tensors[0]) and torch.equal(y, ds.tensors[1]) and not bool(t.any())
    assert x.data_ptr() != ds.tensors[0].data_ptr()  # a copy: the cache never aliases the dataset


def test_avalanche_strategy_runs_on_a_multi_head_stream() -> None:
    from avalanche.models import MTSimpleMLP
    from avalanche.training import Naive

    stream = build("split_digits", n_tasks=5, scenario="task", max_train_per_task=64)
    bm = stream.benchmark
    assert bm.train_stream[1].classes_in_this_experience == [0, 1]
    assert bm.train_stream[1].previous_classes == [0, 1] and bm.train_stream[0].future_classes == []
    torch.manual_seed(0)
    model = MTSimpleMLP(input_size=64, hidden_size=16)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=32,
        train_epochs=1,
        eval_mb_size=64,
        evaluator=None,
    )
    for exp in bm.train_stream[:2]:
        strategy.train(exp)  # MultiHeadClassifier.adaptation indexes a tensor with classes_in_this_experience
    strategy.eval(bm.test_stream[:2])
    assert set(model.classifier.classifiers.keys()) == {"0", "1"}


# ---------------------------------------------------------------------------------------- image streams


def test_pixel_norm_decodes_on_access() -> None:
    x = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    before = x.clone()
    norm = PixelNorm(mean=(0.5,), std=(0.25,))
    view = TensorSamples(x, torch.arange(6), torch.tensor([4, 1]), None, norm)
    assert view.sample_shape == (3, 32, 32) and view.sample_nbytes == 3 * 32 * 32 * 4
    xs, ys = view.gather()
    assert xs.shape == (2, 3, 32, 32) and xs.dtype == torch.float32 and xs.is_contiguous()
    expected = (x[4].float() / 255 - 0.5) / 0.25
    assert torch.equal(xs[0, 2], expected[0]) and torch.equal(xs[:, 0], xs[:, 1])
    assert torch.equal(view[0][0], xs[0]) and view[1][1] == 1 and ys.tolist() == [4, 1]
    assert torch.equal(x, before)  # decoding never writes into the stored pixels
    rgb = PixelNorm(mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0), divisor=1.0)(torch.ones(3, 2, 2))
    assert rgb[:, 0, 0].tolist() == pytest.approx([0.9, 0.4, 0.175])
    with pytest.raises(ValueError):
        PixelNorm(mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(ValueError):
        TensorSamples(torch.zeros(2, 4), torch.zeros(2), norm=norm)


def decoded_pixels(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Undo ``(p/255 - mean)/std`` on channel 0 of images ``x``: the stored uint8 pixels."""
    return ((x[:, 0] * std + mean) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", ["split_digits_32", "split_mnist_5k_32"])
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_offline_image_streams(name: str, scenario: str) -> None:
    stream = build(name, seed=1, n_tasks=5, scenario=scenario)
    spec = stream.spec
    assert (spec.input_shape, spec.classes_per_task, spec.n_classes) == ((3, 32, 32), (2,) * 5, 10)
    assert spec.multi_head is (scenario == "task")
    check_experiences(stream)
    bm = stream.benchmark
    train = [tensors(e.dataset) for e in bm.train_stream]
    for t, (x, y, _) in enumerate(train):
        assert set(y.tolist()) == ({0, 1} if scenario == "task" else {2 * t, 2 * t + 1})
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated to RGB
        assert torch.isfinite(x).all()
    x_all = torch.cat([x for x, _, _ in train])
    if name == "split_digits_32":
        assert len(x_all) + sum(len(e.dataset) for e in bm.test_stream) == 1797
        # standardised with the training split's scalar mean / std (the upsampled pixels lie in [0, 1])
        assert float(x_all.mean()) == pytest.approx(0.0, abs=1e-3)
        assert float(x_all.std()) == pytest.approx(1.0, abs=1e-3)
        grey = x_all[:, 0]
        assert float((grey == grey.min()).float().mean()) > 0.2  # the blank background stays blank
        assert torch.unique(grey).numel() > 17  # bilinear: values between the 17 grey levels of the 8x8 digits
    else:
        assert [len(x) for x, _, _ in train] == [800] * 5
        assert sum(len(e.dataset) for e in bm.test_stream) == 1000
        from clbench.streams.offline import _mnist_5k_raw

        pixels = decoded_pixels(x_all, 0.1, 0.2752)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert not pixels[:, border].any()  # the 2-pixel zero padding
        assert row_set(pixels[:, 2:30, 2:30].reshape(len(pixels), -1)) <= row_set(_mnist_5k_raw()[0])
        assert float(x_all.min()) == pytest.approx(-0.1 / 0.2752, abs=1e-5)
    again = build(name, seed=1, n_tasks=5, scenario=scenario).benchmark
    other = build(name, seed=2, n_tasks=5, scenario=scenario).benchmark
    assert torch.equal(tensors(again.test_stream[3].dataset)[0], tensors(bm.test_stream[3].dataset)[0])
    # the digits' test split follows the seed; the mnist_5k split is fixed (seed 0) whatever the run seed
    same = torch.equal(tensors(other.test_stream[3].dataset)[0], tensors(bm.test_stream[3].dataset)[0])
    assert same is (name == "split_mnist_5k_32")


PERMUTED_32 = {"n_tasks": 5, "test_fraction": 0.1, "max_train_per_task": 1000}
"""conf/benchmark/permuted_mnist_5k_32.yaml's keys (the GPM table's conv stand-in)."""


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_permuted_mnist_5k_32(scenario: str) -> None:
    """Every task: all 10 digits, the fixed 5k split's images with the pixel positions of the padded 32x32 image
    moved by that task's PMNIST permutation (from the seed); 1,000 training / 500 test digits a task; one
    10-way head per task (task) or one shared head (domain); the same stream again from the same seed."""
    from clbench.streams.core import pad_to_32
    from clbench.streams.offline import _mnist_5k_raw, _mnist_5k_rows

    stream = build("permuted_mnist_5k_32", seed=1, scenario=scenario, **PERMUTED_32)
    spec = stream.spec
    assert (spec.input_shape, spec.classes_per_task) == ((3, 32, 32), (10,) * 5)
    assert (spec.multi_head, spec.n_classes) == ((True, 50) if scenario == "task" else (False, 10))
    check_experiences(stream)
    bm = stream.benchmark
    assert [len(e.dataset) for e in bm.train_stream] == [1000] * 5
    assert [len(e.dataset) for e in bm.test_stream] == [500] * 5
    xu8, y = _mnist_5k_raw()
    _, test_rows = _mnist_5k_rows(0.1)
    base = pad_to_32(xu8)[test_rows].flatten(1)  # the fixed split's test digits, unpermuted
    perms = pmnist_permutations(5, 1, 1024)
    firsts = []
    for t, exp in enumerate(bm.test_stream):
        x, labels, _ = tensors(exp.dataset)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated to RGB
        pixels = decoded_pixels(x, 0.1, 0.2752).flatten(1)
        assert torch.equal(pixels, base[:, perms[t]])  # the task's permutation of every pixel, padding included
        assert torch.equal(labels, y[test_rows])  # all 10 digits, labels 0..9 in every task
        firsts.append(pixels)
    assert not torch.equal(firsts[0], firsts[1])  # tasks differ in their permutation
    train = [tensors(e.dataset)[0] for e in bm.train_stream]
    # each task its own seeded subset of the 4,500 training digits: the sorted pixel multisets tell them apart
    sets = [row_set(decoded_pixels(x, 0.1, 0.2752).flatten(1).sort(dim=1).values) for x in train]
    assert all(len(s) > 900 for s in sets) and len(sets[0] & sets[1]) < 600
    again = build("permuted_mnist_5k_32", seed=1, scenario=scenario, **PERMUTED_32).benchmark
    for a, b in ((again.train_stream[3], bm.train_stream[3]), (again.test_stream[4], bm.test_stream[4])):
        assert all(torch.equal(u, v) for u, v in zip(tensors(a.dataset), tensors(b.dataset), strict=True))
    other = build("permuted_mnist_5k_32", seed=2, scenario=scenario, **PERMUTED_32).benchmark
    x2 = decoded_pixels(tensors(other.test_stream[0].dataset)[0], 0.1, 0.2752).flatten(1)
    assert not torch.equal(x2, firsts[0])  # another seed, other permutations ...
    assert torch.equal(x2.sort(dim=1).values, firsts[0].sort(dim=1).values)  # ... of the same test digits


def test_permuted_mnist_5k_32_refuses_the_class_scenario() -> None:
    with pytest.raises(ValueError, match=r"benchmark\.scenario.*'task'.*'domain'"):
        build("permuted_mnist_5k_32", scenario="class", **PERMUTED_32)


def test_image_stream_direct_read_and_validation() -> None:
    stream = build("split_mnist_5k_32", n_tasks=5, scenario="task", validation_fraction=0.1)
    bm = stream.benchmark
    assert [len(e.dataset) for e in bm.valid_stream] == [80] * 5
    for exp in (bm.train_stream[2], bm.valid_stream[2], bm.test_stream[0]):
        direct = direct_tensors(exp.dataset)
        assert direct is not None and direct[0].dtype == torch.float32
        assert all(torch.equal(u, v) for u, v in zip(direct, read_by_getitem(exp.dataset), strict=True))
    xs = batch_source(bm.train_stream[0].dataset, CPU, max_bytes=1000)  # streamed: decoded sample by sample
    x, _, _ = next(iter(xs.batches(16, False)))
    assert torch.equal(x, tensors(bm.train_stream[0].dataset)[0][:16])


@pytest.mark.parametrize(
    ("name", "overrides", "key", "valid"),
    [
        ("split_digits_32", {"n_tasks": 3, "scenario": "task"}, "benchmark.n_tasks", "valid"),
        ("split_mnist_5k_32", {"n_tasks": 5, "scenario": "domain"}, "benchmark.scenario", "valid"),
        ("five_datasets", {"n_tasks": 4, "scenario": "task"}, "benchmark.n_tasks", "valid: 5"),
        ("five_datasets", {"n_tasks": 5, "scenario": "class"}, "benchmark.scenario", "valid: 'task'"),
        ("miniimagenet", {"n_tasks": 21, "scenario": "task"}, "benchmark.n_tasks", "valid: 1..20"),
        ("miniimagenet", {"n_tasks": 0, "scenario": "task"}, "benchmark.n_tasks", "valid"),
        ("miniimagenet", {"n_tasks": 20, "scenario": "domain"}, "benchmark.scenario", "valid: 'task'"),
    ],
)
def test_image_stream_bad_values(tmp_path: Path, name: str, overrides: dict[str, object], key: str, valid: str) -> None:
    # checked before any file is looked for: the data root is empty
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        build(name, data_root=str(tmp_path), **overrides)
    assert valid in str(err.value)


@pytest.mark.parametrize(
    ("name", "n_tasks", "files", "source"),
    [
        ("five_datasets", 5, ["notmnist/notmnist_train.pkl", "notmnist/notmnist_test.pkl"], "nkundiushuti"),
        ("miniimagenet", 20, ["miniimagenet/train.pkl", "miniimagenet/test.pkl"], "drive.google.com"),
    ],
)
def test_missing_pickled_data_fails_fast(
    tmp_path: Path, name: str, n_tasks: int, files: list[str], source: str
) -> None:
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        build(name, data_root=str(tmp_path), download=True, n_tasks=n_tasks, scenario="task")
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert all(str(tmp_path / f) in message for f in files) and source in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created, even with download=true


def write_pickle(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f)


def fake_notmnist(root: Path, n_train: int = 30, n_test: int = 20) -> None:
    """notMNIST pickles in the layout of nkundiushuti/notmnist_convert: uint8 (N, 1, 32, 32) and uint8 labels."""
    gen = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        features = gen.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
        write_pickle(root / "notmnist" / f"notmnist_{split}.pkl",
                     {"features": features, "labels": (np.arange(n) % 10).astype(np.uint8)})


def test_five_datasets_missing_torchvision_set_names_it(tmp_path: Path) -> None:
    fake_notmnist(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        build("five_datasets", data_root=str(tmp_path), n_tasks=5, scenario="task")
    message = str(err.value)
    assert "CIFAR-10" in message and str(tmp_path) in message and "benchmark.download=true" in message


class FakeVision:
    """Stands in for a torchvision data set class: tiny random data in the attribute formats torchvision uses."""

    calls: list[tuple[str, dict[str, object]]] = []  # noqa: RUF012

    kind = "cifar"

    def __init__(self, root: str, download: bool, **which: object) -> None:
        FakeVision.calls.append((type(self).__name__, {"root": root, "download": download, **which}))
        n = 30 if which.get("train", which.get("split") == "train") else 20
        gen = np.random.default_rng(n)
        labels = np.arange(n) % 10
        if self.kind == "cifar":
            self.data = gen.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = labels.tolist()
        elif self.kind == "mnist":
            self.data = torch.from_numpy(gen.integers(1, 256, (n, 28, 28), dtype=np.uint8))
            self.targets = torch.from_numpy(labels)
        else:
            self.data = gen.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            self.labels = labels


class FakeCIFAR10(FakeVision):
    kind = "cifar"


class FakeMNIST(FakeVision):
    kind = "mnist"


class FakeFashionMNIST(FakeVision):
    kind = "mnist"


class FakeSVHN(FakeVision):
    kind = "svhn"


def test_five_datasets_on_fake_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    from clbench.streams.real import FIVE_DATASETS_NORMS

    for name, cls in (("CIFAR10", FakeCIFAR10), ("MNIST", FakeMNIST), ("SVHN", FakeSVHN),
                      ("FashionMNIST", FakeFashionMNIST)):
        monkeypatch.setattr(torchvision.datasets, name, cls)
    FakeVision.calls = []
    fake_notmnist(tmp_path)
    stream = build("five_datasets", data_root=str(tmp_path), n_tasks=5, scenario="task", validation_fraction=0.2)
    spec = stream.spec
    assert (spec.n_tasks, spec.input_shape, spec.classes_per_task) == (5, (3, 32, 32), (10,) * 5)
    assert (spec.n_classes, spec.multi_head) == (50, True)
    check_experiences(stream)
    bm = stream.benchmark
    # 3 training samples per class, round(0.2 * 3) = 1 of each class held out
    assert [len(e.dataset) for e in bm.train_stream] == [20] * 5
    assert [len(e.dataset) for e in bm.valid_stream] == [10] * 5
    assert [len(e.dataset) for e in bm.test_stream] == [20] * 5
    order = [c for c, _ in FakeVision.calls]
    assert order == ["FakeCIFAR10"] * 2 + ["FakeMNIST"] * 2 + ["FakeSVHN"] * 2 + ["FakeFashionMNIST"] * 2
    assert all(kw["root"] == str(tmp_path) and kw["download"] is False for _, kw in FakeVision.calls)
    assert [kw.get("split") for c, kw in FakeVision.calls if c == "FakeSVHN"] == ["train", "test"]
    # test streams are the data sets' test splits in order, decoded with each set's mean / std
    cifar = FakeCIFAR10(root="", download=False, train=False)
    x, y, _ = tensors(bm.test_stream[0].dataset)
    expected = (torch.from_numpy(cifar.data).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(FIVE_DATASETS_NORMS[0].mean).view(1, 3, 1, 1)) / torch.tensor(
                    FIVE_DATASETS_NORMS[0].std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5) and y.tolist() == cifar.targets
    mnist = FakeMNIST(root="", download=False, train=False)
    x, _, _ = tensors(bm.test_stream[1].dataset)
    assert torch.equal(decoded_pixels(x, 0.1, 0.2752)[:, 2:30, 2:30], mnist.data)
    assert float(x[0, 1, 0, 0]) == pytest.approx(-0.1 / 0.2752) and torch.equal(x[:, 0], x[:, 2])
    x, _, _ = tensors(bm.test_stream[3].dataset)
    assert float(x[0, 0, 1, 1]) == pytest.approx(-0.2190 / 0.3318)  # Fashion-MNIST: padded, its own stats
    with open(tmp_path / "notmnist" / "notmnist_test.pkl", "rb") as f:
        notmnist = pickle.load(f)
    x, y, _ = tensors(bm.test_stream[4].dataset)
    assert torch.equal(decoded_pixels(x, 0.4254, 0.4501), torch.from_numpy(notmnist["features"][:, 0]))
    assert y.tolist() == notmnist["labels"].tolist() and torch.equal(x[:, 0], x[:, 1])


def fake_miniimagenet(root: Path, per_class: dict[str, int], size: int = 84) -> None:
    """miniImageNet pickles in ROGO's layout; every image is filled with its class id (to trace it back)."""
    for split, n in per_class.items():
        labels = [c for c in range(100) for _ in range(n)]
        images = [np.full((size, size, 3), c, dtype=np.uint8) for c in labels]
        write_pickle(root / "miniimagenet" / f"{split}.pkl",
                     {"images": images if split == "train" else np.stack(images), "labels": labels})


def test_miniimagenet_on_fake_pickles(tmp_path: Path) -> None:
    from clbench.streams.real import IMAGENET_MEAN, IMAGENET_STD

    fake_miniimagenet(tmp_path, {"train": 2, "test": 1})
    kw = {"data_root": str(tmp_path), "scenario": "task", "validation_fraction": 0.5}
    stream = build("miniimagenet", seed=37, n_tasks=3, **kw)
    spec = stream.spec
    assert (spec.n_tasks, spec.input_shape, spec.classes_per_task) == (3, (3, 84, 84), (5, 5, 5))
    assert (spec.n_classes, spec.multi_head) == (15, True)
    check_experiences(stream)
    bm = stream.benchmark
    order = np.random.RandomState(37).permutation(100)  # ROGO: np.random.seed(seed); permutation(100)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for t in range(3):
        for split, n in (("train", 5), ("valid", 5), ("test", 5)):
            x, y, _ = tensors(bm.streams[split][t].dataset)
            assert len(x) == n
            classes = ((x[:, :, 0, 0] * std + mean) * 255).round().long()  # each image is filled with its class
            assert bool((classes == classes[:, :1]).all())
            assert [int(order[5 * t + int(label)]) for label in y] == classes[:, 0].tolist()
    again = build("miniimagenet", seed=37, n_tasks=3, **kw).benchmark
    other = build("miniimagenet", seed=1, stream_seed=37, n_tasks=3, **kw).benchmark
    shifted = build("miniimagenet", seed=38, n_tasks=3, **kw).benchmark
    x0 = tensors(bm.test_stream[2].dataset)[0]
    assert torch.equal(tensors(again.test_stream[2].dataset)[0], x0)
    assert torch.equal(tensors(other.test_stream[2].dataset)[0], x0)
    assert not torch.equal(tensors(shifted.test_stream[2].dataset)[0], x0)


def test_miniimagenet_loader_resizes_and_checks(tmp_path: Path) -> None:
    from clbench.streams.real import load_miniimagenet

    fake_miniimagenet(tmp_path, {"train": 1}, size=10)
    x, y = load_miniimagenet(str(tmp_path / "miniimagenet" / "train.pkl"))
    assert x.shape == (100, 3, 84, 84) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0, 40, 40], y.to(torch.uint8))  # a constant image stays constant
    write_pickle(tmp_path / "bad.pkl", {"images": np.zeros((3, 84, 84, 3), np.uint8), "labels": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"0\.\.99"):
        load_miniimagenet(str(tmp_path / "bad.pkl"))
