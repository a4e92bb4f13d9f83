"""Training-loop throughput: clbench's Fabric engine against a hand-written tensor-slice loop and Avalanche.

``--model mlp`` (default): one experience of sklearn's digits replicated ×20 (35,940 samples, 64-d, scaled by
1/16), the MLP 64-100-100-10 (no bias, one head), plain SGD lr 0.01, one epoch, at batch 64 and at batch 10.
``--model alexnet`` / ``--model resnet18``: GPM's AlexNet-5 / reduced ResNet-18 (nf 20; batch-statistics BN,
no bias, one 10-way head) on the first ``--samples`` (default 640) training images of ``split_digits_32``
(3×32×32, all 10 classes in one experience), SGD lr 0.01, one epoch at batch 64 (GPM's CIFAR / 5-Datasets
batch). Contestants (the same for every model):

* ``clbench``: the production path — ``Fabric(accelerator="cpu", devices=1)``, ``setup_module`` with the
  ``loss`` forward method marked, the experience's Avalanche dataset turned into a tensor cache by
  :func:`clbench.streams.batch_source`, a :class:`~clbench.context.Context`, and
  :class:`~clbench.engine.Engine` (``optimizer`` + ``fit``) with the naive strategy;
* ``slice``: tensors in memory, ``randperm`` per epoch, ``index_select`` per batch, forward, cross-entropy,
  backward, SGD step; no Fabric;
* ``avalanche``: ``avalanche.training.Naive`` on the same experience (no metrics, no loggers), ``train`` only.

Each timed call is one epoch including its per-epoch and per-experience work (shuffle, optimizer); one-time
set-up (Fabric, ``setup_module``, materialising the cache, building the Avalanche strategy) is outside.
The three run round-robin in one process (``timeit_rounds``), medians of ``--repeats`` calls.
Reported: samples/s and the ratios clbench/slice (target ≥ 0.9, every model) and clbench/avalanche (target ≥ 2
for the MLP only: a conv net's step is compute-bound, so the loop's Python overhead is a small share of it and
the ratio is reported without a target) as ratios of medians, and as medians of per-round ratios (robust to
load drifting between rounds on a shared machine); the extra µs per step of each Fabric indirection on the
engine's hot path (``fabric_overheads``).
``--profile`` adds a cProfile of one clbench epoch per batch size.

Run: ``python -m benchmarks.loop [--model mlp|alexnet|resnet18] [--samples N] [--json PATH] [--repeats N]
[--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from benchmarks._common import finish, paired_ratio, parse_args, timeit_rounds, train_one_experience
from clbench.models.alexnet import AlexNet
from clbench.models.base import ContinualModel
from clbench.models.mlp import MLP
from clbench.models.resnet import ResNet18

MODELS: tuple[str, ...] = ("mlp", "alexnet", "resnet18")
BATCH_SIZES: dict[str, tuple[int, ...]] = {"mlp": (64, 10), "alexnet": (64,), "resnet18": (64,)}
IMAGE_SAMPLES = 640
IMAGE_SHAPE: tuple[int, int, int] = (3, 32, 32)
REPLICAS = 20
LR = 0.01
SEED = 0
TARGETS = {"slice": 0.9, "avalanche": 2.0}


def digits_tensors(replicas: int = REPLICAS) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits (1,797 × 64, values / 16) replicated ``replicas`` times: float32 x, int64 y."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    return x.repeat(replicas, 1).contiguous(), y.repeat(replicas).contiguous()


def image_tensors(samples: int = IMAGE_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` training images of ``split_digits_32`` (stream seed 0), decoded as the stream does
    (standardised, grey replicated to 3 channels): float32 x (n, 3, 32, 32), int64 y (global labels 0..9)."""
    from clbench.streams.offline import digits_32_split

    (x, y, _, _), norm = digits_32_split(0.2, SEED)
    return norm(x[:samples]).contiguous(), y[:samples].contiguous()


def make_mlp() -> MLP:
    """The benchmark's network: MLP 64-100-100-10, ReLU, no bias, one shared head (seeded)."""
    torch.manual_seed(SEED)
    return MLP((64,), [100, 100], (10,), multi_head=False, n_classes=10, bias=False)


def make_model(name: str) -> ContinualModel:
    """The seeded network ``name``: the MLP, GPM's AlexNet-5 or reduced ResNet-18 (3×32×32, one 10-way head)."""
    if name == "mlp":
        return make_mlp()
    torch.manual_seed(SEED)
    if name == "alexnet":
        return AlexNet(IMAGE_SHAPE, (10,), multi_head=False, n_classes=10)
    if name == "resnet18":
        return ResNet18(IMAGE_SHAPE, (10,), multi_head=False, n_classes=10)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


class LogitsAdapter(nn.Module):
    """Lets Avalanche call ``model(x)``: forwards to ``model(x, zeros)`` (task 0) and returns the logits."""

    def __init__(self, model: ContinualModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` with task label 0."""
        return self.model(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))


def one_experience(x: torch.Tensor, y: torch.Tensor) -> Any:
    """An Avalanche benchmark with one train (and the same test) experience, built as clbench's streams do:
    a :class:`~clbench.streams.core.TensorSamples` view wrapped by ``make_dataset`` (samples ``(x, y, t=0)``),
    ``benchmark_from_datasets`` + ``with_task_labels``."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels

    from clbench.streams.core import TensorSamples, add_classes_timeline, make_dataset

    dataset = make_dataset(TensorSamples(x, y), task=0)
    bm = with_task_labels(benchmark_from_datasets(train=[dataset], test=[dataset]))
    classes = [sorted(torch.unique(y).tolist())]
    for stream in bm.streams.values():
        add_classes_timeline(stream, classes)
    return bm


def clbench_epoch(bm: Any, batch_size: int, model_name: str = "mlp") -> Callable[[], None]:
    """Set up clbench's production path once; return a function that trains one experience of one epoch."""
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.context import Context
    from clbench.engine import Engine
    from clbench.streams import Stream, StreamSpec, batch_source
    from strategies import build_strategy
    from strategies.naive import NaiveConfig

    cfg = EngineConfig(epochs=1, batch_size=batch_size, lr=LR, accelerator="cpu", devices=1, progress="none",
                       checkpoint_every_epoch=False)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    module = make_model(model_name)
    model = fabric.setup_module(module)
    model.mark_forward_method("loss")
    x0 = bm.train_stream[0].dataset[0][0]
    spec = StreamSpec(f"bench_{model_name}", 1, tuple(x0.shape), (10,), 10, multi_head=False)
    sources = lambda dataset: batch_source(dataset, device=fabric.device, max_bytes=cfg.cache_bytes)  # noqa: E731
    ctx = Context(model=model, module=module, fabric=fabric, stream=Stream(spec, bm), seed=SEED,
                  batch_size=batch_size, sources=sources)
    ctx.train_source = sources(bm.train_stream[0].dataset)  # materialisation: one-time set-up
    strategy = build_strategy(NaiveConfig())
    strategy.setup(ctx)
    engine = Engine(cfg, fabric)
    losses: list[float] = []

    return train_one_experience(ctx, strategy, engine, losses)


def slice_epoch(x: torch.Tensor, y: torch.Tensor, batch_size: int, model_name: str = "mlp") -> Callable[[], None]:
    """A hand-written loop: randperm per epoch, index_select per batch, forward, CE, backward, SGD step."""
    model = make_model(model_name)
    model.train()
    t = torch.zeros(batch_size, dtype=torch.int64)
    gen = torch.Generator().manual_seed(SEED)
    n = x.shape[0]

    def run() -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb, t[: idx.shape[0]]), yb)
            loss.backward()
            optimizer.step()

    return run


def avalanche_epoch(bm: Any, batch_size: int, model_name: str = "mlp") -> Callable[[], None]:
    """``avalanche.training.Naive`` (quiet evaluator) built once; the function trains on the experience."""
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    adapter = LogitsAdapter(make_model(model_name))
    strategy = Naive(model=adapter, optimizer=torch.optim.SGD(adapter.parameters(), lr=LR),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=batch_size, train_epochs=1,
                     eval_mb_size=1000, device="cpu", evaluator=EvaluationPlugin(loggers=[]))
    experience = bm.train_stream[0]

    def run() -> None:
        strategy.train(experience)

    return run


def profile_clbench(fn: Callable[[], None], top: int = 25) -> str:
    """cProfile of one call of ``fn``, the ``top`` entries by total time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _per_call_us(fn: Callable[[], Any], calls: int = 2000, repeats: int = 5) -> float:
    """Best-of-``repeats`` mean microseconds of one ``fn()`` over ``calls`` calls (noise only adds time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def fabric_overheads() -> dict[str, float]:
    """Extra microseconds per training step of each Fabric indirection the engine's loop takes, against the
    plain call the slice loop makes (measured on trivial work, so only the Python overhead is left):

    ``model.loss`` looked up on the ``_FabricModule`` (``__getattr__`` falls through nn.Module's, which raises,
    to the wrapped module) vs on the module; ``fabric.backward`` vs ``Tensor.backward``; the
    ``_FabricOptimizer``'s ``zero_grad`` and ``step`` vs the optimizer's; the epoch-loss accumulation.
    """
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    module = make_mlp()
    wrapped = fabric.setup_module(module)
    wrapped.mark_forward_method("loss")
    plain_opt = torch.optim.SGD(module.parameters(), lr=LR)
    fabric_opt = fabric.setup_optimizers(torch.optim.SGD(module.parameters(), lr=LR))
    module.zero_grad(set_to_none=True)  # no gradients: step() does only its bookkeeping
    w = torch.zeros((), requires_grad=True)
    total, loss = torch.zeros(()), torch.ones(())

    def accumulate() -> None:
        total.add_(loss.detach())

    pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "model.loss lookup": (lambda: wrapped.loss, lambda: module.loss),
        "fabric.backward": (lambda: fabric.backward(w * 2.0), lambda: (w * 2.0).backward()),
        "optimizer.zero_grad": (lambda: fabric_opt.zero_grad(set_to_none=True),
                                lambda: plain_opt.zero_grad(set_to_none=True)),
        "optimizer.step": (fabric_opt.step, plain_opt.step),
        "loss accumulation": (accumulate, lambda: None),
    }
    return {name: _per_call_us(fab) - _per_call_us(plain) for name, (fab, plain) in pairs.items()}


def _us(value: float) -> str:
    """A 7-character cell for a µs figure: one decimal below 10 ms, none above (conv nets' steps)."""
    return f"{value:>7.1f}" if value < 1e4 else f"{value:>7.0f}"


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="mlp", help="network (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=IMAGE_SAMPLES,
                        help="training images per epoch for the conv nets (default: %(default)s)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one clbench epoch")


def main() -> dict[str, Any]:
    """Run the benchmark, print a table, return (and optionally write) the JSON payload."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "loop benchmark", setup=_setup, repeats=5)
    warnings.filterwarnings("ignore", category=UserWarning)
    name = args.model
    if name == "mlp":
        x, y = digits_tensors()
        what = f"digits ×{REPLICAS}: {x.shape[0]} samples, MLP 64-100-100-10"
    else:
        x, y = image_tensors(args.samples)
        what = (f"split_digits_32 (first {x.shape[0]} training images, 3×32×32, one 10-way head), "
                f"{'AlexNet-5' if name == 'alexnet' else 'reduced ResNet-18 (nf 20)'}")
    n = x.shape[0]
    with threadpool_limits(limits=args.threads):
        bm = one_experience(x, y)
        print(f"{what}, SGD lr {LR}, 1 epoch, CPU, "
              f"torch threads={torch.get_num_threads()}, {args.repeats} interleaved repeats (median)")
        header = (f"{'batch':>5} {'clbench':>9} {'slice':>9} {'avalanche':>9} | {'cl/slice':>8} {'cl/aval':>8}"
                  f" | {'paired':>6} {'paired':>7} | {'clbench':>7} {'slice':>7}")
        print(f"{'':>5} {'samples/s (median)':^29} | {'ratio of medians':^17} | {'per-round':^14} | "
              f"{'µs/step':^15}")
        print(header)
        print("-" * len(header))
        ratios: dict[str, float] = {}
        paired: dict[str, float] = {}
        rates: dict[str, dict[str, float]] = {}
        step_us: dict[str, dict[str, float]] = {}
        profiles: dict[int, str] = {}
        for b in BATCH_SIZES[name]:
            fns = {
                "clbench": clbench_epoch(bm, b, name),
                "slice": slice_epoch(x, y, b, name),
                "avalanche": avalanche_epoch(bm, b, name),
            }
            fns["clbench"]()  # warm-up; Avalanche's epoch is long (seconds), its first call is timed like the rest
            fns["slice"]()
            rounds = timeit_rounds(fns, repeats=args.repeats, warmup=0)
            seconds = {key: statistics.median(ts) for key, ts in rounds.items()}
            steps = math.ceil(n / b)
            rate = {key: n / s for key, s in seconds.items()}
            rates[f"b{b}"] = rate
            step_us[f"b{b}"] = {key: s / steps * 1e6 for key, s in seconds.items()}
            for other in ("slice", "avalanche"):
                ratios[f"clbench_vs_{other}_b{b}"] = rate["clbench"] / rate[other]
                paired[f"clbench_vs_{other}_b{b}"] = paired_ratio(rounds[other], rounds["clbench"])
            print(f"{b:>5} {rate['clbench']:>9.0f} {rate['slice']:>9.0f} {rate['avalanche']:>9.0f} | "
                  f"{ratios[f'clbench_vs_slice_b{b}']:>8.3f} {ratios[f'clbench_vs_avalanche_b{b}']:>8.2f} | "
                  f"{paired[f'clbench_vs_slice_b{b}']:>6.3f} {paired[f'clbench_vs_avalanche_b{b}']:>7.2f} | "
                  f"{_us(step_us[f'b{b}']['clbench'])} {_us(step_us[f'b{b}']['slice'])}", flush=True)
            if args.profile:
                profiles[b] = profile_clbench(fns["clbench"])
        targets = TARGETS if name == "mlp" else {"slice": TARGETS["slice"]}
        met = {key: value >= targets[key.split("_")[2]] for key, value in ratios.items()
               if key.split("_")[2] in targets}
        print(f"targets ({', '.join(f'clbench/{k} ≥ {v:g}' for k, v in targets.items())}): "
              + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in met.items()))
        overheads = fabric_overheads()
        print("Fabric indirections on the engine's hot path, extra µs per call vs the plain call, measured in "
              "isolation (a lower bound: cache-cold inside the loop they cost more): "
              + ", ".join(f"{k} {v:+.1f}" for k, v in overheads.items())
              + f"; sum {sum(overheads.values()):+.1f}")
        for b, text in profiles.items():
            print(f"\n== cProfile of one clbench epoch at batch {b} (by total time)\n{text}")
    payload: dict[str, Any] = {
        "benchmark": "loop",
        "model": name,
        "ratios": ratios,
        "paired_ratios": paired,
        "samples_per_s": rates,
        "us_per_step": step_us,
        "fabric_overhead_us_per_step": overheads,
        "targets_met": met,
        "samples": n,
    }
    return finish(args, payload)


if __name__ == "__main__":
    main()
