"""Helpers shared by the benchmarks: timing (median of repeats), command line, JSON output."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["default_device", "parse_args", "synchronize", "timeit", "timeit_many", "write_json"]


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    """Wait for queued CUDA work (a no-op unless CUDA has been initialised)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` untimed calls.

    CUDA work is synchronised before and after each timed call, so asynchronous kernels are counted.
    """
    if repeats < 1:
        raise ValueError(f"timeit: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timeit_many(fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (one call of each per repeat).

    Interleaving makes ratios between the functions robust to load that changes during the benchmark.
    """
    return {name: statistics.median(ts) for name, ts in timeit_rounds(fns, repeats, warmup).items()}


def parse_args(
    description: str,
    setup: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
    repeats: int = 5,
) -> argparse.Namespace:
    """Parse the common benchmark options and apply ``--threads`` to torch.

    Common options: ``--json PATH``, ``--device`` (default cuda if available), ``--threads`` (torch and, via
    threadpoolctl in each benchmark, NumPy's BLAS; default 1) and ``--repeats`` (default ``repeats``).
    ``setup`` may add benchmark-specific options before parsing ``argv`` (default sys.argv).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--device", default=default_device(), help="torch device for clbench's side (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and NumPy's BLAS")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per measurement (median)")
    if setup is not None:
        setup(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def finish(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    """Add the run's repeats and torch threads to ``payload``, write it to ``--json`` if given, return it."""
    payload = payload | {"repeats": args.repeats, "threads": torch.get_num_threads()}
    if args.json is not None:
        write_json(args.json, payload)
    return payload


def timeit_rounds(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of every call of each function, timed round-robin as :func:`timeit_many` does.

    Entry ``i`` of every list comes from round ``i``, so ``a[i] / b[i]`` pairs calls made close in time: the
    median of such per-round ratios is robust to load that drifts between rounds (shared machines). ``clock``:
    wall time by default; ``time.process_time`` counts this process's CPU seconds only, which other processes
    competing for the cores change much less (they still share caches and memory bandwidth).
    """
    if repeats < 1:
        raise ValueError(f"timeit_rounds: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            start = clock()
            fn()
            synchronize()
            times[name].append(clock() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]`` (see :func:`timeit_rounds`)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio: two non-empty sequences of the same length expected")
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def train_one_experience(ctx: Any, strategy: Any, engine: Any, losses: list[float]) -> Callable[[], None]:
    """A function that trains experience 0 of ``ctx`` as a run does: ``before_experience``, a fresh optimizer and
    schedule, ``attach``, the engine's ``fit`` (each epoch's loss appended to ``losses``), ``detach``,
    ``after_experience``."""

    def run() -> None:
        ctx.experience, ctx.epoch, ctx.step = 0, 0, 0
        strategy.before_experience(ctx)
        ctx.optimizer = engine.optimizer(strategy.parameters_to_train(ctx), 0)
        ctx.schedule = engine.schedule(ctx.optimizer, ctx.module)
        strategy.attach(ctx)
        try:
            engine.fit(ctx, strategy, 0, lambda epoch, loss, extra=None: losses.append(loss))
        finally:
            strategy.detach(ctx)
        strategy.after_experience(ctx)
        ctx.optimizer = ctx.schedule = None

    return run


__all__ += ["paired_ratio", "timeit_rounds", "train_one_experience"]
