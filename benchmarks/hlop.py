"""HLOP: Hebbian subspace extraction against the SVD, and the cost of HLOP in spiking training.

``extraction``: an activity matrix X (n × d) with a known spectrum (the top k eigenvalues of the uncentred
E[xxᵀ] from 10 down to 4, the rest from 0.5 down to 0.05, plus a mean offset: hlop.md test 1's data) at
d ∈ {64, 256, 784}, n = 4,096, k = d/8. Contestants: clbench's Hebbian learner (Oja's subspace rule with the
code's momentum 0.9, 5 iterations per batch of 64, η = 0.5/E‖x‖², k rows from scratch) for 1 and 5 passes over
X, clbench's ``top_singular`` (Gram route, float64) and NumPy's SVD of X (float64). Reported per size: seconds,
the Hebbian/SVD time ratio, and the quality of the Hebbian rows: the largest and mean principal angle to the
exact top-k subspace, and the energy they capture over the exact subspace's (1 = exact).

``throughput``: HLOP's PMNIST spiking MLP (784-800-800-10, DSR, T = 20, no biases, one head) on 640 random
784-d samples, one epoch at batch 64, SGD lr 0.1. Contestants, round-robin in one process:

* ``slice``: a hand-written loop (randperm, index_select, forward, cross-entropy, backward, SGD step);
* ``naive``: clbench's engine with the naive strategy (the production path of ``benchmarks.loop``);
* ``hlop``: clbench's engine with HLOP in the state of task 2 of the PMNIST code (80/200/100 frozen rows and 70
  new rows per layer): the Hebbian step (5 iterations on the rate activity of each protected layer) and the
  projection G(I − H_oldᵀH_old) in every step;
* ``naive_shared``, ``hlop_shared``: the same with ``model.time_shared_grad`` (the 800 × 800 layer's gradients
  computed once for all 20 steps, as DSR makes them equal).

Reported: samples/s, hlop/naive − 1 (the target: HLOP's overhead ≤ 15 % of a naive step), naive/slice, and the
speed-up of ``time_shared_grad`` with HLOP's overhead over the faster naive step.

Run: ``python -m benchmarks.hlop [--part extraction|throughput|both] [--json PATH] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from benchmarks._common import finish, paired_ratio, parse_args, timeit, timeit_rounds
from benchmarks.loop import one_experience
from clbench.models.snn import SpikingMLP, make_neuron
from clbench.subspace import HebbianSubspace, principal_angles, top_singular

SIZES = (64, 256, 784)
SAMPLES = 4096
BATCH = 64
SEED = 0
LR = 0.1
TARGET_OVERHEAD = 0.15


def spectrum_data(d: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """n samples (n × d) whose uncentred second moment has top-k eigenvalues 10 → 4 and the rest 0.5 → 0.05."""
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    f64 = torch.float64
    ev = torch.cat([torch.linspace(10, 4, k, dtype=f64), torch.linspace(0.5, 0.05, d - k, dtype=f64)])
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * ev.sqrt()
    mean = 0.3 * Q[:, 0]  # a mean offset along the top direction: the statistics are uncentred
    return (z @ Q.T + mean).float()


def hebbian_rows(X: torch.Tensor, k: int, lr: float, passes: int) -> HebbianSubspace:
    """k Hebbian rows learned from scratch over ``passes`` passes of X (n × d) in batches of 64, then merged."""
    learner = HebbianSubspace(X.shape[1], lr=lr)
    learner.add_rows(k, generator=torch.Generator().manual_seed(1))
    learner.fit(X.T, batch_size=BATCH, epochs=passes)
    learner.merge()
    return learner


def extraction(repeats: int) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(SEED)
    for d in SIZES:
        k = d // 8
        X = spectrum_data(d, SAMPLES, k, g)
        Xd = X.double()
        exact = top_singular(Xd.T)[0][:, :k]
        lr = 0.5 / float(X.pow(2).sum(1).mean())
        row: dict[str, Any] = {"d": d, "n": SAMPLES, "k": k}
        for passes in (1, 5):
            row[f"hebbian_{passes}_s"] = timeit(partial(hebbian_rows, X, k, lr, passes), repeats=repeats, warmup=0)
            basis = hebbian_rows(X, k, lr, passes).basis("old").double()
            theta = principal_angles(basis, exact)
            row[f"hebbian_{passes}_angle_max_deg"] = float(theta.max().rad2deg())
            row[f"hebbian_{passes}_angle_mean_deg"] = float(theta.mean().rad2deg())
            row[f"hebbian_{passes}_energy_ratio"] = float((Xd @ basis).pow(2).sum() / (Xd @ exact).pow(2).sum())
        row["top_singular_s"] = timeit(partial(top_singular, Xd.T), repeats=repeats)
        row["numpy_svd_s"] = timeit(partial(np.linalg.svd, Xd.numpy().T, full_matrices=False), repeats=repeats)
        row["hebbian_1_over_numpy_svd"] = row["hebbian_1_s"] / row["numpy_svd_s"]
        row["hebbian_1_over_top_singular"] = row["hebbian_1_s"] / row["top_singular_s"]
        rows.append(row)
    return rows


def make_snn(time_shared: bool = False) -> SpikingMLP:
    torch.manual_seed(SEED)
    return SpikingMLP((784,), [800, 800], (10,), multi_head=False, n_classes=10, time_steps=20,
                      neuron=lambda: make_neuron("dsr"), time_shared_grad=time_shared)


def slice_epoch(x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = make_snn()
    model.train()
    t = torch.zeros(BATCH, dtype=torch.int64)
    gen = torch.Generator().manual_seed(SEED)

    def run() -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for idx in torch.randperm(x.shape[0], generator=gen).split(BATCH):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.index_select(0, idx), t[: idx.shape[0]]), y.index_select(0, idx))
            loss.backward()
            optimizer.step()

    return run


def engine_epoch(bm: Any, strategy_name: str, time_shared: bool = False) -> Callable[[], None]:
    """clbench's engine on one experience with ``naive`` or ``hlop`` (HLOP put in the state of task 2), the net
    with ``model.time_shared_grad`` when ``time_shared``."""
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.context import Context
    from clbench.engine import Engine
    from clbench.streams import Stream, StreamSpec, batch_source
    from strategies import build_strategy, strategy_config

    cfg = EngineConfig(epochs=1, batch_size=BATCH, lr=LR, accelerator="cpu", devices=1, progress="none",
                       checkpoint_every_epoch=False)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    module = make_snn(time_shared)
    model = fabric.setup_module(module)
    model.mark_forward_method("loss")
    spec = StreamSpec("bench_snn", 2, (784,), (10,), 10, multi_head=False)
    sources = lambda dataset: batch_source(dataset, device=fabric.device, max_bytes=cfg.cache_bytes)  # noqa: E731
    ctx = Context(model=model, module=module, fabric=fabric, stream=Stream(spec, bm), seed=SEED, batch_size=BATCH,
                  sources=sources)
    ctx.train_source = sources(bm.train_stream[0].dataset)
    strategy = build_strategy(strategy_config(strategy_name))
    strategy.setup(ctx)
    if strategy_name == "hlop":  # task 1's rows, frozen, then task 2's new rows (the PMNIST code's counts)
        g = torch.Generator().manual_seed(SEED)
        for learner, (first, later) in zip(strategy.learners.values(), ((80, 70), (200, 70), (100, 70)), strict=True):
            learner.add_rows(first, generator=g)
            learner.fit(torch.randn(learner.dim, 256, generator=g), batch_size=BATCH)
            learner.merge()
            learner.add_rows(later, generator=g)
    engine = Engine(cfg, fabric)

    def run() -> None:
        ctx.experience, ctx.epoch = 1, 0
        ctx.optimizer = engine.optimizer(strategy.parameters_to_train(ctx), 1)
        ctx.schedule = engine.schedule(ctx.optimizer, module)
        strategy.attach(ctx)
        try:
            engine.fit(ctx, strategy, 0, lambda epoch, loss, extra=None: None)
        finally:
            strategy.detach(ctx)
        ctx.optimizer = ctx.schedule = None

    run.strategy = strategy  # type: ignore[attr-defined]  # for tests/test_benchmarks.py
    return run


def throughput(repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(640, 784, generator=g)
    y = torch.randint(0, 10, (640,), generator=g)
    bm = one_experience(x, y)
    fns = {"slice": slice_epoch(x, y), "naive": engine_epoch(bm, "naive"), "hlop": engine_epoch(bm, "hlop"),
           "naive_shared": engine_epoch(bm, "naive", time_shared=True),
           "hlop_shared": engine_epoch(bm, "hlop", time_shared=True)}
    times = timeit_rounds(fns, repeats=repeats, warmup=1)
    med = {k: float(np.median(v)) for k, v in times.items()}
    overhead = paired_ratio(times["hlop"], times["naive"]) - 1.0
    return {"samples_per_s": {k: x.shape[0] / v for k, v in med.items()},
            "hlop_overhead": overhead, "naive_over_slice": paired_ratio(times["naive"], times["slice"]),
            "overhead_target": TARGET_OVERHEAD, "overhead_met": overhead <= TARGET_OVERHEAD,
            "time_shared_speedup": {k: paired_ratio(times[k], times[f"{k}_shared"]) for k in ("naive", "hlop")},
            "hlop_overhead_shared": paired_ratio(times["hlop_shared"], times["naive_shared"]) - 1.0}


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=("extraction", "throughput", "both"), default="both")


def main() -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], _setup, repeats=3)
    payload: dict[str, Any] = {}
    start = time.perf_counter()
    with threadpool_limits(args.threads):
        if args.part in ("extraction", "both"):
            payload["extraction"] = extraction(args.repeats)
            for r in payload["extraction"]:
                print(f"d={r['d']:4d} k={r['k']:3d}: Hebbian 1 pass {r['hebbian_1_s'] * 1e3:7.1f} ms (max angle "
                      f"{r['hebbian_1_angle_max_deg']:5.1f}°, energy {r['hebbian_1_energy_ratio']:.3f}), 5 passes "
                      f"{r['hebbian_5_s'] * 1e3:7.1f} ms ({r['hebbian_5_angle_max_deg']:5.1f}°, "
                      f"{r['hebbian_5_energy_ratio']:.3f}); top_singular {r['top_singular_s'] * 1e3:6.1f} ms, "
                      f"NumPy SVD {r['numpy_svd_s'] * 1e3:6.1f} ms")
        if args.part in ("throughput", "both"):
            t = payload["throughput"] = throughput(args.repeats)
            sps = t["samples_per_s"]
            print(f"spiking MLP 784-800-800 T=20, batch {BATCH}: slice {sps['slice']:.0f}, naive {sps['naive']:.0f}, "
                  f"hlop {sps['hlop']:.0f} samples/s; HLOP overhead {t['hlop_overhead'] * 100:+.1f}% (target ≤ "
                  f"{TARGET_OVERHEAD * 100:.0f}%: {'met' if t['overhead_met'] else 'MISSED'}); naive/slice "
                  f"{t['naive_over_slice']:.2f}")
            fast = t["time_shared_speedup"]
            print(f"model.time_shared_grad: naive {fast['naive']:.2f}× and hlop {fast['hlop']:.2f}× faster; HLOP "
                  f"overhead over the faster naive {t['hlop_overhead_shared'] * 100:+.1f}%")
    payload["seconds"] = time.perf_counter() - start
    return finish(args, payload)


if __name__ == "__main__":
    main()
