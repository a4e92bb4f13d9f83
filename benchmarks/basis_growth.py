"""GPM's memory update as the memory grows over 20 tasks: time and peak memory of extend_basis per task.

AlexNet-5's representation matrices at GPM's CIFAR sizes (conv1 48×20184, conv2 576×14400, conv3 512×2500,
fc1 1024×125, fc2 2048×125) are drawn for tasks 1..``--tasks`` (default 20) from random but structured data:
per layer a fixed random orthonormal d × d dictionary Q; task t's columns are Q[:, S_t] C_t + noise, with S_t a
shared core of d/16 directions (energies 1/(j+1)) plus a window of d/12 directions (energy 1/4 each) that
slides by d/24 per task, so each task half-overlaps the previous one and brings new directions: the memory keeps
growing (until a layer's R has fewer columns than new directions, or the memory reaches d). C_t is Gaussian and
the noise holds < 0.5 % of the energy. After each task the memory is updated as ``strategies/gpm.py`` does:
M ← :func:`clbench.subspace.extend_basis` (M, R_t) at ε = 0.97, code rule (the first task: Eq. 5).

Per task and layer: the median time of ``extend_basis`` over ``--repeats`` calls (same M, same R), the part of
it spent on the memory's own products Mᵀ R and R − M (Mᵀ R) (timed alone, same shapes), and the peak memory
of one call above what was allocated before it. Memory is measured as the process's peak resident set
(Linux VmHWM, reset through ``/proc/self/clear_refs`` before the call; glibc's mmap threshold pinned at
128 KiB so freed blocks leave the resident set) on the CPU, or ``torch.cuda.max_memory_allocated`` on a GPU.
Also the stored memory M (float32) and, as information, the time of the Eq. 5 basis of R_t alone
(``threshold_basis``), which ``strategies/gpm.py`` computes per task for its principal-angle diagnostics.

The target (issue): the per-task cost stays flat, or its growth is explained. Reported: the per-task table,
and the mean time / peak of the last five tasks over that of tasks 2-6 (task 1 is Eq. 5, no memory yet).

Run: ``python -m benchmarks.basis_growth [--json PATH] [--tasks N] [--repeats N] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from benchmarks._common import finish, parse_args, synchronize, timeit
from clbench.subspace import extend_basis, threshold_basis

LAYERS: dict[str, tuple[int, int]] = {
    "conv1": (48, 20184), "conv2": (576, 14400), "conv3": (512, 2500), "fc1": (1024, 125), "fc2": (2048, 125)}
THRESHOLD = 0.97
TASKS = 20
SEED = 0
NOISE = 0.01
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


class TaskData:
    """Structured random representation matrices of one layer (see the module docstring)."""

    def __init__(self, d: int, n: int, seed: int) -> None:
        self.d, self.n = d, n
        self.gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=self.gen, dtype=torch.float64))
        self.Q = q.float().contiguous()
        self.core = max(1, d // 16)
        self.width = max(2, d // 12)
        self.step = max(1, d // 24)

    def directions(self, task: int) -> Tensor:
        """Columns of Q that task ``task`` (0-based) spans: the core and its window (clipped at d)."""
        start = self.core + task * self.step
        window = torch.arange(start, min(start + self.width, self.d))
        return torch.cat([torch.arange(self.core), window])

    def matrix(self, task: int) -> Tensor:
        """R_t (d × n, float32)."""
        idx = self.directions(task)
        scales = torch.cat([(torch.arange(self.core, dtype=torch.float32) + 1.0).rsqrt(),
                            torch.full((idx.numel() - self.core,), 0.5)])
        coeffs = torch.randn(idx.numel(), self.n, generator=self.gen) * scales[:, None]
        R = self.Q[:, idx] @ coeffs
        return R.add_(torch.randn(self.d, self.n, generator=self.gen), alpha=NOISE).contiguous()


class PeakMemory:
    """Peak bytes allocated by a call above what was allocated before it (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "none"
        if device.type == "cuda":
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            pinned = libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) == 1
            self._rss()
            self._reset()
            self.method = "VmHWM (peak RSS) − RSS, reset via /proc/self/clear_refs" + (
                ", mmap threshold 128 KiB" if pinned else " (mmap threshold NOT pinned)")
        except (OSError, AttributeError):
            self.method = "none"

    @staticmethod
    def _rss() -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        values: dict[str, int] = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1]) * 1024
        return values["VmRSS"], values["VmHWM"]

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float | None]:
        """``fn()``'s result and its peak extra bytes (None when no method is available)."""
        if self.method == "none":
            return fn(), None
        if self.device.type == "cuda":
            synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            result = fn()
            synchronize()
            return result, float(torch.cuda.max_memory_allocated(self.device) - before)
        self._reset()
        before, _ = self._rss()
        result = fn()
        _, peak = self._rss()
        return result, float(max(0, peak - before))


def memory_products(M: Tensor, R: Tensor) -> Tensor:
    """The memory's share of extend_basis (Eq. 8): Mᵀ R and R − M (Mᵀ R)."""
    proj = M.T @ R
    return R - M @ proj


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=TASKS, help="number of tasks (default: %(default)s)")


def main() -> dict[str, Any]:
    """Run the benchmark, print a table, return (and optionally write) the JSON payload."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "basis growth benchmark", setup=_setup, repeats=3)
    device = torch.device(args.device)
    peak = PeakMemory(device)
    names = list(LAYERS)
    with threadpool_limits(limits=args.threads), torch.no_grad():
        data = {name: TaskData(d, n, SEED + i) for i, (name, (d, n)) in enumerate(LAYERS.items())}
        print(f"AlexNet-5 representation shapes {', '.join(f'{k} {d}×{n}' for k, (d, n) in LAYERS.items())}; "
              f"ε={THRESHOLD}, code rule; device={device}, torch threads={torch.get_num_threads()}, "
              f"{args.repeats} repeats (median); memory: {peak.method}")
        header = (f"{'task':>4} | " + " ".join(f"{n:>5}" for n in names) + " | "
                  + " ".join(f"{n:>6}" for n in names) + f" | {'total':>6} {'MᵀR':>6} {'own':>6} | "
                  f"{'peak':>6} {'M':>5}")
        print(f"{'':>4} | {'memory dims m after the task':^29} | {'extend_basis ms per layer':^34} | "
              f"{'ms, all layers':^20} | {'MB':^12}")
        print(header)
        print("-" * len(header))
        bases: dict[str, Tensor | None] = dict.fromkeys(names)
        rows: list[dict[str, Any]] = []
        for task in range(args.tasks):
            row: dict[str, Any] = {"task": task + 1, "m_before": {}, "m": {}, "ms": {}, "memory_ms": {},
                                   "own_ms": {}, "peak_mb": {}}
            for name in names:
                R = data[name].matrix(task).to(device)
                M = bases[name]
                row["m_before"][name] = 0 if M is None else int(M.shape[1])

                def update(M: Tensor | None = M, R: Tensor = R) -> Tensor:
                    return extend_basis(M, R, THRESHOLD, rule="code")

                row["ms"][name] = timeit(update, args.repeats, warmup=0) * 1e3
                if M is not None and M.shape[1] > 0:
                    products = functools.partial(memory_products, M, R)
                    row["memory_ms"][name] = timeit(products, args.repeats, warmup=0) * 1e3
                else:
                    row["memory_ms"][name] = 0.0
                row["own_ms"][name] = timeit(lambda R=R: threshold_basis(R, THRESHOLD, rule="code"), 1, warmup=0) * 1e3
                new, used = peak.measure(update)
                row["peak_mb"][name] = None if used is None else used / 2**20
                bases[name] = new
                row["m"][name] = int(new.shape[1])
                del R
            row["total_ms"] = sum(row["ms"].values())
            row["memory_total_ms"] = sum(row["memory_ms"].values())
            row["own_total_ms"] = sum(row["own_ms"].values())
            peaks = [v for v in row["peak_mb"].values() if v is not None]
            row["peak_max_mb"] = max(peaks) if peaks else None
            row["stored_mb"] = sum(0 if M is None else M.numel() * M.element_size() for M in bases.values()) / 2**20
            rows.append(row)
            peak_cell = f"{row['peak_max_mb']:>6.1f}" if row["peak_max_mb"] is not None else f"{'n/a':>6}"
            print(f"{task + 1:>4} | " + " ".join(f"{row['m'][n]:>5}" for n in names) + " | "
                  + " ".join(f"{row['ms'][n]:>6.1f}" for n in names)
                  + f" | {row['total_ms']:>6.0f} {row['memory_total_ms']:>6.0f} {row['own_total_ms']:>6.0f} | "
                  f"{peak_cell} {row['stored_mb']:>5.1f}", flush=True)
        summary: dict[str, Any] = {}
        if args.tasks >= 10:
            early, late = rows[1:6], rows[-5:]
            for key in ("total_ms", "memory_total_ms", "peak_max_mb"):
                a = [r[key] for r in early if r[key] is not None]
                b = [r[key] for r in late if r[key] is not None]
                if a and b and statistics.mean(a) > 0:
                    summary[f"{key}_late_over_early"] = statistics.mean(b) / statistics.mean(a)
            for name in names:
                a = statistics.mean(r["ms"][name] for r in early)
                summary[f"{name}_ms_late_over_early"] = statistics.mean(r["ms"][name] for r in late) / a
            print("last 5 tasks / tasks 2-6 (means): "
                  + ", ".join(f"{k.replace('_late_over_early', '')} {v:.2f}x" for k, v in summary.items()))
    payload: dict[str, Any] = {
        "benchmark": "basis_growth",
        "layers": {k: list(v) for k, v in LAYERS.items()},
        "rows": rows,
        "summary": summary,
        "threshold": THRESHOLD,
        "memory_method": peak.method,
        "device": str(device),
    }
    return finish(args, payload)


if __name__ == "__main__":
    main()
