"""Energy-threshold bases: clbench (torch, Gram route) against the official GPM code's NumPy SVD.

For each of GPM's representation-matrix shapes (PMNIST fc1 784×300; CIFAR AlexNet conv1 48×20184,
conv2 576×14400, fc1 1024×125, fc2 2048×125) a synthetic R with a decaying spectrum like real activations
(ReLU of a low-rank product plus noise, fixed seed) is reduced to a basis at ε = 0.97 with the code rule:

* baseline: ``np.linalg.svd(R, full_matrices=False)``, k = #{cumsum(σ²)/Σσ² < ε} (the official code);
* clbench: :func:`clbench.subspace.threshold_basis` (method "auto"), plus each method on its own.

Reported: the speed-up (median NumPy time / median clbench time, timed round-robin), whether both pick
the same k, and the largest principal angle between the two bases. Both libraries are limited to the
same number of threads.

Run: ``python -m benchmarks.basis [--json PATH] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from benchmarks._common import parse_args, timeit_many, write_json
from clbench.subspace import principal_angles, threshold_basis

SHAPES: tuple[tuple[int, int], ...] = ((784, 300), (48, 20184), (576, 14400), (1024, 125), (2048, 125))
THRESHOLD = 0.97
METHODS = ("svd", "gram", "gram32")


def activations(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """ReLU(A B + noise), A: d×r, B: r×n, power-law column scales (i^-1): a decaying activation spectrum."""
    g = torch.Generator().manual_seed(seed)
    r = min(d, n)
    scales = torch.arange(1, r + 1, dtype=torch.float32) ** -1.0
    A = torch.randn(d, r, generator=g) * scales
    B = torch.randn(r, n, generator=g)
    noise = 0.02 * torch.randn(d, n, generator=g)
    return torch.relu((A @ B) / r**0.5 + noise).contiguous()


def numpy_basis(R: np.ndarray, threshold: float) -> np.ndarray:
    """The official code's first-task basis: full NumPy SVD, k = #{cumsum(σ²)/Σσ² < ε}."""
    U, S, _ = np.linalg.svd(R, full_matrices=False)
    ratio = np.cumsum(S.astype(np.float64) ** 2) / float(np.sum(S.astype(np.float64) ** 2))
    k = int(np.sum(ratio < threshold))
    return U[:, :k]


def main() -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "basis benchmark", repeats=3)
    device = torch.device(args.device)
    with threadpool_limits(limits=args.threads):
        blas = [
            f"{info.get('internal_api')}:{info.get('num_threads')}"
            for info in threadpool_info()
            if info.get("user_api") == "blas"
        ]
        print(
            f"device={device} ({platform.processor() or platform.machine()})  torch threads="
            f"{torch.get_num_threads()} (MKL/OpenMP)  numpy BLAS={blas}  ε={THRESHOLD}, code rule"
        )
        header = (
            f"{'shape':>10} {'numpy':>9} {'clbench':>9} {'speed-up':>8} {'k np':>5} {'k cl':>5} "
            f"{'max angle':>9}" + "".join(f" | {m + ': time, speed-up, angle':>29}" for m in METHODS)
        )
        print(header)
        print("-" * len(header))
        ratios: dict[str, float] = {}
        angles: dict[str, float] = {}
        ranks_equal: dict[str, bool] = {}
        ranks: dict[str, dict[str, int]] = {}
        times: dict[str, dict[str, float]] = {}
        methods: dict[str, dict[str, dict[str, float]]] = {m: {} for m in METHODS}
        for d, n in SHAPES:
            key = f"{d}x{n}"
            R = activations(d, n)
            R_np = R.numpy()
            R_dev = R.to(device)
            slow = d * n * min(d, n) > 1e9  # seconds per call: no untimed warm-up
            fns: dict[str, Callable[[], Any]] = {"numpy": lambda R_np=R_np: numpy_basis(R_np, THRESHOLD)}
            for m in ("auto", *METHODS):
                fns[m] = lambda R_dev=R_dev, m=m: threshold_basis(R_dev, THRESHOLD, rule="code", method=m)
            measured = timeit_many(fns, repeats=args.repeats, warmup=0 if slow else 1)
            M_np = torch.from_numpy(numpy_basis(R_np, THRESHOLD))

            def angle_to_numpy(M: torch.Tensor, M_np: torch.Tensor = M_np) -> float:
                return float(principal_angles(M, M_np).max()) if min(M_np.shape[1], M.shape[1]) else 0.0

            M_cl = threshold_basis(R_dev, THRESHOLD, rule="code").cpu()
            t_np, t_cl = measured["numpy"], measured["auto"]
            ratios[key] = t_np / t_cl
            angles[key] = angle_to_numpy(M_cl)
            ranks_equal[key] = M_np.shape[1] == M_cl.shape[1]
            ranks[key] = {"numpy": M_np.shape[1], "clbench": M_cl.shape[1], "d": d}
            times[key] = {"numpy_svd": t_np, **{f"clbench_{m}": measured[m] for m in ("auto", *METHODS)}}
            cells = ""
            for m in METHODS:
                M_m = threshold_basis(R_dev, THRESHOLD, rule="code", method=m).cpu()
                entry = {
                    "speedup": t_np / measured[m],
                    "angle": angle_to_numpy(M_m),
                    "k": float(M_m.shape[1]),
                }
                methods[m][key] = entry
                cells += f" | {measured[m] * 1e3:9.1f}ms {entry['speedup']:6.1f}x {entry['angle']:9.1e}"
            print(
                f"{key:>10} {t_np * 1e3:7.1f}ms {t_cl * 1e3:7.1f}ms {ratios[key]:7.1f}x {M_np.shape[1]:>5} "
                f"{M_cl.shape[1]:>5} {angles[key]:9.1e}{cells}",
                flush=True,
            )
    payload: dict[str, Any] = {
        "benchmark": "basis",
        "ratios": ratios,
        "angles": angles,
        "ranks_equal": ranks_equal,
        "ranks": ranks,
        "times_s": times,
        "methods": methods,
        "threshold": THRESHOLD,
        "rule": "code",
        "device": str(device),
        "threads": {"torch": torch.get_num_threads(), "blas": blas},
    }
    if args.json is not None:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
