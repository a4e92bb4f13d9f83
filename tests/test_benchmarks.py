"""The benchmarks' set-ups still build what they claim to measure (they are run by hand, not in CI: a broken
set-up would otherwise go unnoticed until the next measurement, as the HLOP and OGPSA ones were)."""

from __future__ import annotations

import torch


def test_the_hlop_throughput_benchmark_trains_hlop_in_its_task_2_state():
    """One epoch of 64 samples (one step) through each contestant: the HLOP one really is HLOP, with the PMNIST
    code's frozen and new rows per layer."""
    from benchmarks.hlop import engine_epoch
    from benchmarks.loop import one_experience

    g = torch.Generator().manual_seed(0)
    bm = one_experience(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g))
    strategies = {}
    for name in ("naive", "hlop"):
        run = engine_epoch(bm, name)
        run()
        strategies[name] = run.strategy  # type: ignore[attr-defined]
    assert type(strategies["hlop"]).__name__ == "HLOP"
    rows = [(learner.n_old, learner.rows - learner.n_old) for learner in strategies["hlop"].learners.values()]
    assert rows == [(80, 70), (200, 70), (100, 70)]


def test_the_ogpsa_benchmark_runs_end_to_end():
    """The whole benchmark at its smallest: one timed repeat, reference sets of 8 samples."""
    from benchmarks.ogpsa import main

    out = main(["--repeats", "1", "--ref-samples", "8"])
    assert out["basis_floats"] > 0 and out["ratio"] > 0 and out["adapter"] == "lora"


def test_the_o3_and_olora_benchmarks_run_end_to_end():
    """Both at their smallest (one timed repeat; O3 with one request's detector)."""
    from benchmarks.o3 import main as o3
    from benchmarks.olora import main as olora

    assert o3(["--repeats", "1", "--requests", "1"])
    assert olora(["--repeats", "1"])
