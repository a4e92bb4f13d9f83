"""One GPM training step: clbench's LayerProjector against no projection and the official code's P = M Mᵀ.

The PMNIST MLP 784-100-100-10 (no bias, one shared head; all three layers protected) gets GPM's bases from
``permuted_mnist_5k``: one epoch of task 0 by hand (SGD lr 0.01, batch 10), then per layer
:func:`clbench.subspace.extend_basis` of the inputs of 300 training samples (``collect_layer_inputs``) at
ε = [0.95, 0.99, 0.99], code rule — what ``strategies/gpm.py`` stores after the first task (``--random-bases``
uses random orthonormal bases of 350/80/80 columns instead). A step on task 1's data (forward, backward,
projection, SGD step, lr 0.01) is then timed at batch 10 and 64 for:

* ``clbench``: a :class:`~clbench.subspace.LayerProjector` (``form="auto"``, ``batch_size=B``) attached to
  every protected layer and ``project_()`` after backward, as ``strategies/gpm.py`` does;
* ``naive``: no projection;
* ``official``: the official code's form, P = M Mᵀ (d × d, float32) precomputed per layer and, after
  backward, ``grad ← grad − grad·P`` on the flattened weight gradient.

Steps/s are medians over rounds of ``--steps`` steps timed round-robin in one process. The projected
gradients of clbench and of the official form on the same batch and weights are compared: max |Δ| / ‖g‖.

Run: ``python -m benchmarks.projection [--json PATH] [--steps N] [--repeats N] [--random-bases]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from benchmarks._common import finish, paired_ratio, parse_args, timeit_rounds
from clbench.config import BenchmarkConfig
from clbench.models import build_model, model_config
from clbench.models.base import ContinualModel
from clbench.streams import batch_source, build_stream
from clbench.streams.batches import BatchSource
from clbench.subspace import LayerProjector, collect_layer_inputs, extend_basis

BATCH_SIZES: tuple[int, ...] = (10, 64)
THRESHOLDS: tuple[float, ...] = (0.95, 0.99, 0.99)
SAMPLES = 300
LR = 0.01
SEED = 0
RANDOM_DIMS: tuple[int, ...] = (350, 80, 80)
TARGET_VS_OFFICIAL_B10 = 3.0

Batch = tuple[Tensor, Tensor, Tensor]


def build_data(device: str = "cpu") -> tuple[ContinualModel, BatchSource, BatchSource]:
    """The permuted_mnist_5k stream (2 tasks, seed 0): a fresh model (seeded) and tasks 0 and 1 as tensor
    caches, on ``device``."""
    stream = build_stream(BenchmarkConfig(name="permuted_mnist_5k", n_tasks=2), SEED)
    torch.manual_seed(SEED)
    model = build_model(model_config("mlp"), stream.spec).to(device)
    train = stream.benchmark.train_stream
    return model, batch_source(train[0].dataset, device), batch_source(train[1].dataset, device)


def train_first_task(model: ContinualModel, source: BatchSource, batch_size: int = 10) -> None:
    """One epoch of plain SGD (lr 0.01) on ``source``, a hand-written loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for batch in source.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED)):
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def gpm_bases(model: ContinualModel, source: BatchSource) -> dict[str, Tensor]:
    """GPM's memory after task 0: per protected layer, extend_basis(∅, R) of 300 samples' inputs (code rule)."""
    layers = model.protected_layers()
    x, _, t = source.take(SAMPLES, torch.Generator().manual_seed(SEED))
    model.eval()
    reps = collect_layer_inputs(model, layers, lambda: model(x, t), samples=dict.fromkeys(layers, SAMPLES))
    model.train()
    return {name: extend_basis(None, reps[name].float(), eps, rule="code")
            for name, eps in zip(layers, THRESHOLDS, strict=True)}


def random_bases(model: ContinualModel) -> dict[str, Tensor]:  # on the model's device
    """Random orthonormal bases of 350/80/80 columns (QR of a seeded Gaussian matrix), capped at d."""
    g = torch.Generator().manual_seed(SEED)
    out: dict[str, Tensor] = {}
    for (name, layer), k in zip(model.protected_layers().items(), RANDOM_DIMS, strict=True):
        d = layer.weight[0].numel()
        q, _ = torch.linalg.qr(torch.randn(d, min(k, d), generator=g, dtype=torch.float64))
        out[name] = q.float().contiguous().to(layer.weight.device)
    return out


def official_matrices(bases: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official code's projection matrices: P = M Mᵀ per layer, d × d, float32."""
    return {name: (M @ M.T).float().contiguous() for name, M in bases.items()}


def official_project(layers: dict[str, nn.Module], P: dict[str, Tensor]) -> None:
    """After backward: ``grad ← grad − grad·P`` on each layer's flattened weight gradient (official form)."""
    for name, layer in layers.items():
        w = layer.weight
        g = w.grad
        assert g is not None
        flat = g.view(g.shape[0], -1)
        w.grad = (flat - flat @ P[name]).view(w.shape)


def attach_projectors(model: ContinualModel, bases: dict[str, Tensor], batch_size: int) -> list[LayerProjector]:
    """LayerProjector(form="auto", batch_size) attached on every protected layer (strategies/gpm.py's attach)."""
    layers = model.protected_layers()
    projectors = [LayerProjector(layers[name], M, form="auto", batch_size=batch_size) for name, M in bases.items()]
    for p in projectors:
        p.attach()
    return projectors


def step_loop(model: ContinualModel, batches: list[Batch], project: Callable[[], None] | None) -> Callable[[], None]:
    """A function running one SGD step (lr 0.01) per batch: forward, backward, ``project()``, step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()

    def run() -> None:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            if project is not None:
                project()
            optimizer.step()

    return run


def gradient_check(
    trained: ContinualModel, bases: dict[str, Tensor], P: dict[str, Tensor], batch: Batch
) -> dict[str, float]:
    """max |g_clbench − g_official| / ‖g_official‖ per layer after one backward on the same batch and weights."""
    ours, theirs = copy.deepcopy(trained), copy.deepcopy(trained)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    projectors = attach_projectors(ours, bases, batch[0].shape[0])
    try:
        ours.loss(batch).backward()
        for p in projectors:
            p.project_()
    finally:
        for p in projectors:
            p.detach()
    theirs.loss(batch).backward()
    official_project(theirs.protected_layers(), P)
    out: dict[str, float] = {}
    for name, layer in ours.protected_layers().items():
        g_ours = layer.weight.grad
        g_theirs = theirs.protected_layers()[name].weight.grad
        assert g_ours is not None and g_theirs is not None
        out[name] = float((g_ours - g_theirs).abs().max() / g_theirs.norm().clamp_min(1e-30))
    return out


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed call")
    parser.add_argument("--random-bases", action="store_true",
                        help="random orthonormal bases of 350/80/80 columns instead of GPM's on permuted_mnist_5k")


def main() -> dict[str, Any]:
    """Run the benchmark, print a table, return (and optionally write) the JSON payload."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "projection benchmark", setup=_setup, repeats=7)
    warnings.filterwarnings("ignore", category=UserWarning)
    with threadpool_limits(limits=args.threads):
        start = time.perf_counter()
        model, task0, task1 = build_data(args.device)
        if args.random_bases:
            bases, source = random_bases(model), "random orthonormal"
        else:
            train_first_task(model, task0)
            bases, source = gpm_bases(model, task0), "GPM on permuted_mnist_5k task 0 (1 epoch, 300 samples)"
        P = official_matrices(bases)
        dims = {name: {"k": int(M.shape[1]), "d": int(M.shape[0])} for name, M in bases.items()}
        rule = "" if args.random_bases else f", ε={list(THRESHOLDS)}, code rule"
        print(f"bases: {source}{rule}; "
              + ", ".join(f"{n} k={v['k']}/{v['d']}" for n, v in dims.items())
              + f"  (set-up {time.perf_counter() - start:.1f}s)")
        print(f"MLP 784-100-100-10, {args.device}, torch threads={torch.get_num_threads()}, {args.steps} steps per "
              f"call, {args.repeats} interleaved repeats (median)")
        header = (f"{'batch':>5} {'clbench':>9} {'naive':>9} {'official':>9} | {'cl/offic':>8} {'cl/naive':>8} | "
                  f"{'paired':>6} {'paired':>8} | forms (auto)")
        print(f"{'':>5} {'steps/s (median)':^29} | {'ratio of medians':^17} | {'per-round':^15} |")
        print(header)
        print("-" * len(header))
        ratios: dict[str, float] = {}
        paired: dict[str, float] = {}
        rates: dict[str, dict[str, float]] = {}
        forms: dict[str, dict[str, str]] = {}
        grad_diffs: dict[str, dict[str, float]] = {}
        gen = torch.Generator().manual_seed(SEED + 1)
        for b in BATCH_SIZES:
            batches = [batch for _, batch in zip(range(args.steps), task1.batches(b, shuffle=True, generator=gen),
                                                 strict=False)]
            grad_diffs[f"b{b}"] = gradient_check(model, bases, P, batches[0])
            ours, naive, official = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
            projectors = attach_projectors(ours, bases, b)
            forms[f"b{b}"] = {name: p.form for name, p in zip(bases, projectors, strict=True)}
            official_layers = official.protected_layers()

            def project_ours(projectors: list[LayerProjector] = projectors) -> None:
                for p in projectors:
                    p.project_()

            fns = {
                "clbench": step_loop(ours, batches, project_ours),
                "naive": step_loop(naive, batches, None),
                "official": step_loop(official, batches, lambda layers=official_layers: official_project(layers, P)),
            }
            rounds = timeit_rounds(fns, repeats=args.repeats, warmup=1)
            for p in projectors:
                p.detach()
            rate = {name: len(batches) / statistics.median(ts) for name, ts in rounds.items()}
            rates[f"b{b}"] = rate
            for other in ("official", "naive"):
                ratios[f"clbench_vs_{other}_b{b}"] = rate["clbench"] / rate[other]
                paired[f"clbench_vs_{other}_b{b}"] = paired_ratio(rounds[other], rounds["clbench"])
            print(f"{b:>5} {rate['clbench']:>9.0f} {rate['naive']:>9.0f} {rate['official']:>9.0f} | "
                  f"{ratios[f'clbench_vs_official_b{b}']:>8.2f} {ratios[f'clbench_vs_naive_b{b}']:>8.3f} | "
                  f"{paired[f'clbench_vs_official_b{b}']:>6.2f} {paired[f'clbench_vs_naive_b{b}']:>8.3f} | "
                  + " ".join(f"{n}:{f}" for n, f in forms[f"b{b}"].items()), flush=True)
        max_diff = max(v for d in grad_diffs.values() for v in d.values())
        print("gradients, clbench vs official, max |Δ| / ‖g‖: "
              + "; ".join(f"{b}: " + ", ".join(f"{n} {v:.1e}" for n, v in d.items()) for b, d in grad_diffs.items())
              + f"  -> max {max_diff:.1e} ({'ok' if max_diff <= 1e-5 else 'ABOVE'} 1e-5)")
        met = ratios["clbench_vs_official_b10"] >= TARGET_VS_OFFICIAL_B10
        print(f"target clbench/official ≥ {TARGET_VS_OFFICIAL_B10:g} at batch 10: {'met' if met else 'MISSED'}")
    payload: dict[str, Any] = {
        "benchmark": "projection",
        "ratios": ratios,
        "paired_ratios": paired,
        "steps_per_s": rates,
        "max_grad_diff": max_diff,
        "grad_diff": grad_diffs,
        "forms": forms,
        "basis_dims": dims,
        "bases": "random" if args.random_bases else "gpm",
        "target_met": met,
        "steps": args.steps,
    }
    return finish(args, payload)


if __name__ == "__main__":
    main()
