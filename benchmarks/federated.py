"""Continual federated learning (FOT, issue 6): the in-process engine's rounds per second, GPSE's server-side
extraction time, and the bytes FOT and FedAvg send per task against fot.md §3's arithmetic.

**(a) Rounds per second of the in-process engine** (:class:`clbench.federated.loop.FederatedLoop`) with
K = 2, 10 and 50 clients, all of them in every round (C = K), FedAvg, on ``permuted_digits`` task 0 (1,437
training digits split IID, so one round is one pass over the task whatever K), MLP 64-100-100-10, one local
epoch, SGD lr 0.1, batch 16 (the table's stand-in, ``clbench/conf/table/fot.yaml``). A round is timed between
two consecutive round callbacks of ``train_task`` (sampling, messages, each client's engine fit with its own
optimizer, uniform averaging, byte counting); the per-task set-up (each client's batch source of its part) is
timed apart. Against it, the same clients' local training in a plain loop without the federated machinery:
per client, ``load_state_dict``, a fresh ``torch.optim.SGD``, ``randperm`` batches, forward, cross-entropy,
backward, step, then the uniform mean of the states. Reported: rounds/s and the ratio federated / plain (ratio
of medians and median of paired ratios, interleaved), and the machinery's extra ms per round and µs per local
step (a round is 90-100 steps at every K: one pass over the task). No target.

**(d) Rounds per second, in-process vs Flower** (``federated.engine=flower`` on a local federation: a SuperLink
and K SuperNodes as processes on 127.0.0.1, :mod:`clbench.flower.launch`). The same whole run on each
engine — FedAvg, C = K, one task of ``permuted_digits`` (the stand-in of (a)), ``--flower-rounds`` rounds —
timed alike from the MLflow timestamps of its per-round metric ``round_loss`` (logged after each aggregation):
a round's time is the gap between two consecutive ones (the first round also pays the start, so it is left
out), the median over the run. Both runs give the same R (checked). What a Flower round costs besides the
training: each message starts a fresh ClientApp process, which imports torch, Lightning and Avalanche and
builds the stream and the model before it trains — timed alone here as the ClientApp start-up (a fresh
interpreter building :func:`clbench.flower.app.client_for`, median of ``--repeats``), and the C
start-ups of a round share the machine's cores; and the ServerApp's grid polls for replies every 3 s
(flwr 1.41 ``HttpGrid.send_and_receive``), so a round lasts a multiple of 3 s. No target: the figures say what
Flower's process-per-message model costs for a model this small.

**(b) GPSE server-side extraction time** (fot.md §2 step 6) for the paper's PMNIST MLP 784-400-400-400-10, all
4 weights projected, m = d, U[−1, 1] sketches, ε = 0.96. Synthetic layer inputs per task: per layer a fixed
random orthonormal d × d dictionary Q; task t's inputs span a shared core of d/16 directions plus a window of
d/12 directions sliding by d/24 per task (energies as ``benchmarks/basis_growth.py``), 600 columns per task
split evenly over the clients, each client sending its real sketch (:func:`clbench.federated.client_sketch`)
with the current bases. The server's work per task end, timed: the sum of the K packed uploads
(:func:`clbench.federated.secure_sum`) and, per layer, ρ̄ and :func:`clbench.federated.expand_basis` on the
summed sketch. Swept: K = 2, 5, 10, 20, 50 at task 6 (after 5 tasks with K = 10), and tasks 1..``--tasks``
(default 10) with K = 10. Target: the extraction is flat in K (the summed sketch is d × m whatever K; only the
sum grows, linearly and cheaply): max/min over K ≤ 1.25; the growth over tasks is explained by its parts,
timed alone per task: the SVD of a d × m matrix (fixed size) and the products with the grown basis
(Uᵀ Y and Y − U(Uᵀ Y), O(d·k·m) with k the basis size).

**(c) Bytes per task, FOT vs FedAvg.** The in-process loop runs FOT and FedAvg with the paper's MLP
(784-400-400-400-10 with biases) on ``permuted_mnist_5k`` (2 tasks, 256 training samples each, K = 4, C = 2,
2 rounds per task); its per-task byte counts (``task_bytes_*``, ``gpse_bytes_*``: what ``clbench`` logs to
MLflow) are compared with fot.md §3's arithmetic: |θ| = 638,810 floats per model each way per client and
round, and per client at a task end Σ_l d_l·m_l + 2·L = 784² + 3·400² + 8 = 1,094,664 floats up (the
sketches; clbench packs them in float64, 8 bytes, the official code in float32) and the bases Σ_l d_l·k_l
down. Target: exact equality. Also the paper's full PMNIST setting (C = 64, 200 rounds) per task from the
comm helpers (:func:`clbench.federated.round_traffic`, :func:`clbench.federated.gpse_traffic`).

``--repeats`` (default 3) applies to (b); (a) interleaves ``--round-repeats`` (default 9) rounds of each kind.

Run: ``python -m benchmarks.federated [--json PATH] [--repeats N] [--round-repeats N] [--tasks N]
[--flower-clients 2,5,10,20,50] [--flower-rounds N] [--device cpu|cuda]`` (``--flower-clients ''`` skips (d)).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import Tensor

from benchmarks._common import finish, paired_ratio, parse_args, synchronize, timeit
from clbench.federated import (
    GPSEConfig,
    client_sketch,
    expand_basis,
    gpse_traffic,
    mean_ratio,
    pack_sketches,
    round_traffic,
    secure_sum,
    sketch_shapes,
    unpack_sketches,
)

CLIENTS_A = (2, 10, 50)
CLIENTS_D = (2, 5, 10, 20, 50)
ROUND_REPEATS = 9
LR, BATCH, WEIGHT_DECAY = 0.1, 16, 1e-5
STAND_IN = ("benchmark=permuted_digits", "model=mlp", f"engine.batch_size={BATCH}", f"engine.lr={LR}",
            f"engine.weight_decay={WEIGHT_DECAY}", "engine.progress=none")

LAYERS_B: dict[str, int] = {"hidden.0": 784, "hidden.1": 400, "hidden.2": 400, "head": 400}  # d_l, m_l = d_l
CLIENTS_B = (2, 5, 10, 20, 50)
COLUMNS_PER_TASK = 600
THRESHOLD = 0.96
TASKS = 10
SWEEP_TASK = 5  # 0-based: the clients sweep extends the basis after 5 tasks
NOISE = 0.01
FLAT_TARGET = 1.25
SEED = 0

PAPER_THETA = 638_810  # fot.md §3: |θ| of 784-400-400-400-10 with biases, floats
PAPER_SKETCH = 784**2 + 3 * 400**2 + 2 * 4  # fot.md §3: sketch upload per client and task end, floats
PAPER_ROUNDS, PAPER_PER_ROUND = 200, 64  # fot.md §4, PMNIST
PAPER_MLP = ("benchmark=permuted_mnist_5k", "benchmark.n_tasks=2", "benchmark.max_train_per_task=256", "model=mlp",
             "model.hidden=[400,400,400]", "model.bias=true", "model.dropout=0.5", "engine.batch_size=64",
             "engine.lr=0.01", "engine.weight_decay=1e-5", "engine.progress=none", "federated.clients=4",
             "federated.per_round=2", "federated.rounds_per_task=2")
FOT_KEYS = ("strategy=fot", "strategy.threshold=[0.96]", "strategy.sketch=uniform")


# ------------------------------------------------------------------------------------------ set-up


class Federation:
    """What ``clbench.experiment.run`` builds before its first task, for a federated strategy: the context, the
    strategy (set up, :func:`clbench.experiment.setup`) and the :class:`~clbench.federated.loop.FederatedLoop`."""

    def __init__(self, overrides: Sequence[str], device: str) -> None:
        from clbench.experiment import setup
        from clbench.federated.loop import FederatedLoop
        from clbench.tables import compose

        (cfg,) = compose([*overrides, f"engine.accelerator={torch.device(device).type}"])
        self.ctx, self.strategy = setup(cfg)
        self.cfg = cfg
        self.loop = FederatedLoop(cfg.federated, cfg.engine, self.ctx, self.strategy)  # type: ignore[arg-type]

    def train_task(self, task: int) -> tuple[dict[str, float], list[float], list[dict[str, float]]]:
        """Train task ``task``: the loop's per-task bytes, the time of each round callback (perf_counter, the
        first entry the start) and each round's metrics."""
        self.ctx.experience, self.ctx.epoch = task, 0
        stamps = [time.perf_counter()]
        rounds: list[dict[str, float]] = []

        def on_round(r: int, g: int, scores: dict[str, float]) -> None:
            synchronize()
            stamps.append(time.perf_counter())
            rounds.append(dict(scores))

        out = self.loop.train_task(self.ctx, on_round)
        return out, stamps, rounds


# ------------------------------------------------------------------------------------------ (a) rounds/s


def plain_round(fed: Federation) -> tuple[Any, dict[str, Tensor]]:
    """The same clients' round without the federated machinery (see the module docstring): a function that runs
    one round from the global state it keeps, and that state."""
    ctx, loop = fed.ctx, fed.loop
    dataset = ctx.stream.benchmark.train_stream[0].dataset
    data = []
    for idx in loop.parts[0]:
        x, y, t = ctx.sources(dataset.subset(idx.tolist())).all()
        data.append((x, y, t))
    net = copy.deepcopy(ctx.module)
    net.train()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)

    def run() -> None:
        states = []
        for x, y, t in data:
            net.load_state_dict(state)
            opt = torch.optim.SGD(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
            for idx in torch.randperm(x.shape[0], generator=gen).split(BATCH):
                idx = idx.to(x.device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x.index_select(0, idx), t.index_select(0, idx)), y.index_select(0, idx)).backward()
                opt.step()
            states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        for key in state:
            state[key] = torch.stack([s[key] for s in states]).mean(dim=0)

    return run, state


def task_setup(fed: Federation, repeats: int) -> float:
    """Seconds of the loop's per-task set-up: each client's batch source of its part of task 0."""
    ctx = fed.ctx
    dataset = ctx.stream.benchmark.train_stream[0].dataset
    return timeit(lambda: [ctx.sources(dataset.subset(idx.tolist())) for idx in fed.loop.parts[0]], repeats)


def rounds_per_second(args: argparse.Namespace) -> dict[str, Any]:
    print(f"(a) in-process engine, FedAvg, C = K, permuted_digits task 0 ({BATCH=}, {LR=}), MLP 64-100-100-10, "
          f"{args.round_repeats} interleaved repeats (median)")
    header = (f"{'K':>4} {'n/client':>8} | {'fed ms':>8} {'rounds/s':>8} {'set-up ms':>9} | {'plain ms':>8} "
              f"{'rounds/s':>8} | {'fed/plain':>9} {'paired':>6} | {'+ms/round':>9} {'+µs/step':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for K in CLIENTS_A:
        fed = Federation([*STAND_IN, "strategy=fedavg", f"federated.clients={K}", f"federated.per_round={K}",
                          "federated.rounds_per_task=2"], args.device)
        plain, _ = plain_round(fed)
        fed.train_task(0)  # warm-up of both
        plain()
        fed_s, plain_s = [], []
        for _ in range(args.round_repeats):
            _, stamps, _ = fed.train_task(0)
            fed_s.append(stamps[2] - stamps[1])  # the task's second round: no set-up, no task end
            plain_s.append(timeit(plain, 1, warmup=0))
        f, p = statistics.median(fed_s), statistics.median(plain_s)
        row = {"clients": K, "samples_per_client": len(fed.loop.parts[0][0]), "fed_round_s": f, "plain_round_s": p,
               "fed_rounds_per_s": 1 / f, "plain_rounds_per_s": 1 / p, "setup_s": task_setup(fed, args.repeats),
               "fed_over_plain": f / p, "fed_over_plain_paired": paired_ratio(fed_s, plain_s),
               "steps_per_round": sum(-(-len(idx) // BATCH) for idx in fed.loop.parts[0]),
               "overhead_ms_per_round": (f - p) * 1e3}
        row["overhead_us_per_step"] = (f - p) / row["steps_per_round"] * 1e6
        rows.append(row)
        print(f"{K:>4} {row['samples_per_client']:>8} | {f * 1e3:>8.1f} {1 / f:>8.2f} {row['setup_s'] * 1e3:>9.1f} | "
              f"{p * 1e3:>8.1f} {1 / p:>8.2f} | {f / p:>9.2f} {row['fed_over_plain_paired']:>6.2f} | "
              f"{row['overhead_ms_per_round']:>9.1f} {row['overhead_us_per_step']:>8.0f}", flush=True)
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ (d) vs Flower


def _round_seconds(uri: str, run_id: str) -> list[float]:
    """Gaps between consecutive ``round_loss`` timestamps of an MLflow run, the first round left out."""
    from mlflow.tracking import MlflowClient

    stamps = sorted(m.timestamp for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "round_loss"))
    return [(b - a) / 1e3 for a, b in itertools.pairwise(stamps)]


def clientapp_startup(text: str, repeats: int) -> float:
    """Seconds a fresh interpreter takes to build a ClientApp's run (:func:`~clbench.flower.app.
    client_for`) from the config ``text``: the start-up every Flower message pays before the client trains."""
    code = "import sys; from clbench.flower.app import client_for; client_for(sys.stdin.read())"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], input=text, text=True, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flower_vs_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    from clbench.experiment import run
    from clbench.flower.app import config_text
    from clbench.tables import compose

    print(f"\n(d) rounds/s, in-process vs Flower (local SuperLink + K SuperNodes on 127.0.0.1), FedAvg, C = K, "
          f"permuted_digits task 0, {args.flower_rounds} rounds, round times from MLflow (median, first round out)")
    rows, startup = [], None
    for K in args.flower_clients:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            (cfg,) = compose([*STAND_IN, "strategy=fedavg", "benchmark.n_tasks=1", f"federated.clients={K}",
                              f"federated.per_round={K}", f"federated.rounds_per_task={args.flower_rounds}",
                              "engine.accelerator=cpu", f"tracking.uri={uri}", f"tracking.artifact_root={tmp}/art",
                              f"checkpoint_dir={tmp}/ckpt", f"threads={args.threads}"])
            if startup is None:
                startup = clientapp_startup(config_text(cfg), args.repeats)
                print(f"    ClientApp start-up alone (fresh interpreter: imports, stream and model): {startup:.1f} s; "
                      "the grid polls replies every 3 s")
                header = (f"{'K':>4} | {'in-proc s':>9} {'rounds/s':>8} | {'Flower s':>8} {'rounds/s':>8} | "
                          f"{'Flower/in':>9} | {'run s':>6} | same R")
                print(header)
                print("-" * len(header))
            flower_cfg = dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, engine="flower"))
            results, seconds = {}, {}
            try:
                for name, c in (("inprocess", cfg), ("flower", flower_cfg)):
                    with contextlib.redirect_stdout(io.StringIO()):
                        t0 = time.perf_counter()
                        results[name] = run(c)
                        seconds[name] = time.perf_counter() - t0
            except RuntimeError as e:  # e.g. more SuperNodes than this machine holds: reported, the sweep goes on
                reason = str(e).splitlines()[0]
                rows.append({"clients": K, "failed": reason})
                print(f"{K:>4} | failed after {time.perf_counter() - t0:.0f} s: {reason}", flush=True)
                continue
            inproc = statistics.median(_round_seconds(uri, results["inprocess"].run_id))
            flower = statistics.median(_round_seconds(uri, results["flower"].run_id))
        row = {"clients": K, "inprocess_round_s": inproc, "flower_round_s": flower,
               "flower_over_inprocess": flower / inproc, "flower_run_s": seconds["flower"],
               "inprocess_run_s": seconds["inprocess"],
               "same_R": bool(np.array_equal(results["flower"].R, results["inprocess"].R, equal_nan=True))}
        rows.append(row)
        print(f"{K:>4} | {inproc:>9.3f} {1 / inproc:>8.2f} | {flower:>8.1f} {1 / flower:>8.3f} | "
              f"{flower / inproc:>9.0f} | {seconds['flower']:>6.0f} | {row['same_R']}", flush=True)
    return {"rows": rows, "rounds": args.flower_rounds, "clientapp_startup_s": startup, "grid_poll_s": 3.0}


# ------------------------------------------------------------------------------------------ (b) GPSE server


class LayerInputs:
    """Synthetic inputs of one layer, task by task (see the module docstring)."""

    def __init__(self, d: int, seed: int) -> None:
        self.d = d
        self.gen = torch.Generator().manual_seed(seed)
        self.Q, _ = torch.linalg.qr(torch.randn(d, d, generator=self.gen, dtype=torch.float64))
        self.core, self.width, self.step = max(1, d // 16), max(2, d // 12), max(1, d // 24)

    def columns(self, task: int, n: int) -> Tensor:
        """n input columns of task ``task`` (d × n, float32)."""
        window = torch.arange(self.core + task * self.step, min(self.core + task * self.step + self.width, self.d))
        idx = torch.cat([torch.arange(self.core), window])
        scales = torch.cat([(torch.arange(self.core, dtype=torch.float64) + 1.0).rsqrt(),
                            torch.full((idx.numel() - self.core,), 0.5, dtype=torch.float64)])
        A = self.Q[:, idx] @ (torch.randn(idx.numel(), n, generator=self.gen, dtype=torch.float64) * scales[:, None])
        return (A + NOISE * torch.randn(self.d, n, generator=self.gen, dtype=torch.float64)).float()


GPSE = GPSEConfig(sketch="uniform")


def uploads(inputs: dict[str, LayerInputs], bases: dict[str, Tensor | None], task: int,
            clients: int) -> list[dict[str, Tensor]]:
    """Each client's packed GPSE upload for ``task`` (``COLUMNS_PER_TASK`` columns split over the clients)."""
    sizes = [COLUMNS_PER_TASK // clients + (k < COLUMNS_PER_TASK % clients) for k in range(clients)]
    out = []
    for k, n in enumerate(sizes):
        sketches = {}
        for i, (name, src) in enumerate(inputs.items()):
            gen = torch.Generator().manual_seed(SEED + 1000 * task + 10 * k + i)
            sketches[name] = client_sketch(src.columns(task, n), bases[name], src.d, gen, GPSE)
        out.append(pack_sketches(sketches))
    return out


def extract(bases: dict[str, Tensor | None], total: dict[str, Tensor]) -> dict[str, Tensor]:
    """The server's basis extension from the summed uploads (``strategies/fot.py``'s ``task_end``)."""
    out = {}
    for name, summed in unpack_sketches(total).items():
        mean_ratio(summed, GPSE)
        out[name] = expand_basis(bases[name], summed, THRESHOLD, GPSE)
    return out


def parts(bases: dict[str, Tensor | None], total: dict[str, Tensor], repeats: int) -> tuple[float, float]:
    """Seconds of extract's two parts, timed alone: the SVDs of the d × m sketches, the products with U."""
    sums = unpack_sketches(total)
    Ys = [s.sketch for s in sums.values()]
    svd = timeit(lambda: [torch.linalg.svd(Y, full_matrices=False) for Y in Ys], repeats, warmup=0)

    def products() -> None:
        for name, Y in zip(sums, Ys, strict=True):
            U = bases[name]
            if U is not None and U.shape[1]:
                Y - U @ (U.T @ Y)

    return svd, timeit(products, repeats, warmup=0)


def gpse_server(args: argparse.Namespace) -> dict[str, Any]:
    names = list(LAYERS_B)
    print(f"\n(b) GPSE on the server: PMNIST MLP layers {', '.join(f'{n} d={d}' for n, d in LAYERS_B.items())}, "
          f"m = d, uniform sketches, ε = {THRESHOLD}, {COLUMNS_PER_TASK} input columns per task over the clients; "
          f"{args.repeats} repeats (median)")
    inputs = {name: LayerInputs(d, SEED + i) for i, (name, d) in enumerate(LAYERS_B.items())}
    bases: dict[str, Tensor | None] = dict.fromkeys(names)
    header = (f"{'task':>4} | " + " ".join(f"{n:>8}" for n in names) + f" | {'sum ms':>6} {'extract ms':>10} | "
              f"{'SVDs ms':>7} {'U·Y ms':>6}")
    print(f"  tasks 1..{args.tasks} with K = 10: basis columns k after the task, server time per task end")
    print(header)
    print("-" * len(header))
    task_rows = []
    sweep_bases: dict[str, Tensor | None] = {}
    for task in range(args.tasks):
        if task == SWEEP_TASK:
            sweep_bases = dict(bases)
        ups = uploads(inputs, bases, task, 10)
        total = secure_sum(ups)
        sum_s = timeit(lambda ups=ups: secure_sum(ups), args.repeats)
        ext_s = timeit(lambda bases=bases, total=total: extract(bases, total), args.repeats, warmup=0)
        svd_s, prod_s = parts(bases, total, args.repeats)
        new = extract(bases, total)
        row = {"task": task + 1, "k_before": {n: 0 if bases[n] is None else int(bases[n].shape[1]) for n in names},
               "k": {n: int(new[n].shape[1]) for n in names}, "sum_ms": sum_s * 1e3, "extract_ms": ext_s * 1e3,
               "svd_ms": svd_s * 1e3, "products_ms": prod_s * 1e3}
        bases = dict(new)
        task_rows.append(row)
        print(f"{task + 1:>4} | " + " ".join(f"{row['k'][n]:>8}" for n in names)
              + f" | {row['sum_ms']:>6.1f} {row['extract_ms']:>10.0f} | {row['svd_ms']:>7.0f} "
              f"{row['products_ms']:>6.0f}", flush=True)
    client_rows = []
    if sweep_bases:
        print(f"  task {SWEEP_TASK + 1} (bases of tasks 1..{SWEEP_TASK}, k = "
              + ", ".join(f"{n} {0 if sweep_bases[n] is None else sweep_bases[n].shape[1]}" for n in names)
              + ") with K clients")
        head2 = f"{'K':>4} {'cols/client':>11} | {'sum ms':>6} {'extract ms':>10} | {'new k':>22}"
        print(head2)
        print("-" * len(head2))
        for K in CLIENTS_B:
            ups = uploads(inputs, sweep_bases, SWEEP_TASK, K)
            total = secure_sum(ups)
            sum_s = timeit(lambda ups=ups: secure_sum(ups), args.repeats)
            ext_s = timeit(lambda total=total: extract(sweep_bases, total), args.repeats, warmup=0)
            added = {n: int(v.shape[1]) for n, v in extract(sweep_bases, total).items()}
            client_rows.append({"clients": K, "sum_ms": sum_s * 1e3, "extract_ms": ext_s * 1e3, "k": added})
            print(f"{K:>4} {COLUMNS_PER_TASK // K:>11} | {sum_s * 1e3:>6.1f} {ext_s * 1e3:>10.0f} | "
                  + " ".join(str(added[n]) for n in names).rjust(22), flush=True)
    summary: dict[str, Any] = {}
    if client_rows:
        ext = [r["extract_ms"] for r in client_rows]
        summary["extract_max_over_min_clients"] = max(ext) / min(ext)
        summary["sum_ms_per_client"] = (client_rows[-1]["sum_ms"] - client_rows[0]["sum_ms"]) / (
            CLIENTS_B[-1] - CLIENTS_B[0])
        summary["flat_in_clients"] = summary["extract_max_over_min_clients"] <= FLAT_TARGET
    if len(task_rows) >= 2:
        first, later = task_rows[1], task_rows[-1]  # task 1 has no basis: SVD only
        summary["extract_last_over_task2"] = later["extract_ms"] / first["extract_ms"]
        summary["svd_last_over_task2"] = later["svd_ms"] / first["svd_ms"]
        summary["products_ms_task2_last"] = [first["products_ms"], later["products_ms"]]
    if client_rows:
        print(f"  extraction over K: max/min {summary['extract_max_over_min_clients']:.2f} (target ≤ {FLAT_TARGET}: "
              f"{'met' if summary['flat_in_clients'] else 'MISSED'}); the sum grows by "
              f"{summary['sum_ms_per_client']:.2f} ms per client (K additions of d × m float64 arrays)")
    if len(task_rows) >= 2:
        print(f"  over tasks: extraction task {len(task_rows)} / task 2 = {summary['extract_last_over_task2']:.2f}, "
              f"of which the SVDs of the fixed-size d × m sketches {summary['svd_last_over_task2']:.2f}; the "
              f"products with the grown bases go from {first['products_ms']:.0f} to {later['products_ms']:.0f} ms "
              f"(O(d·k·m), k the basis size)")
    return {"tasks": task_rows, "clients": client_rows, "summary": summary, "threshold": THRESHOLD,
            "columns_per_task": COLUMNS_PER_TASK, "layers": LAYERS_B}


# ------------------------------------------------------------------------------------------ (c) bytes


def bytes_per_task(args: argparse.Namespace) -> dict[str, Any]:
    print("\n(c) bytes per task, paper's PMNIST MLP 784-400-400-400-10 (biases), permuted_mnist_5k, 2 tasks, "
          "K = 4, C = 2, 2 rounds per task; the loop's counts (logged as task_bytes_* / gpse_bytes_*) vs fot.md §3")
    runs: dict[str, Any] = {}
    for method, keys in (("fedavg", ("strategy=fedavg",)), ("fot", FOT_KEYS)):
        fed = Federation([*PAPER_MLP, *keys], args.device)
        state = fed.ctx.module.state_dict()
        theta = sum(v.numel() for v in state.values())
        layers = [f"{n}.weight" for n in fed.ctx.module.protected_layers()]
        shapes = sketch_shapes(state, layers, 1)
        tasks = []
        for t in range(fed.cfg.benchmark.n_tasks):
            before = {n: U.shape[1] for n, U in getattr(fed.strategy, "bases", {}).items()}
            out, _, rounds = fed.train_task(t)
            R, C = fed.loop.rounds[t], fed.cfg.federated.per_round
            expected = round_traffic(4 * theta, C) * R
            if method == "fot":  # the bases sent down: d_l × k_l float64 each, k_l before the task
                sent = {k: torch.empty(shapes[k][0], before.get(k.removesuffix(".weight"), 0)) for k in shapes}
                expected = expected + gpse_traffic(shapes, C, sent, bytes_per_float=8)
            tasks.append({"task": t + 1, "logged": out, "expected_up": expected.up, "expected_down": expected.down,
                          "rounds_sum_up": sum(r["bytes_up"] for r in rounds),
                          "rounds_sum_down": sum(r["bytes_down"] for r in rounds),
                          "bases_before": before,
                          "equal": (out["task_bytes_up"], out["task_bytes_down"]) == (expected.up, expected.down)
                          and (out["task_bytes_up"], out["task_bytes_down"])
                          == (sum(r["bytes_up"] for r in rounds), sum(r["bytes_down"] for r in rounds))})
        runs[method] = {"theta": theta, "sketch_floats": sum(d * m for d, m in shapes.values()) + 2 * len(shapes),
                        "tasks": tasks, "rounds": R, "per_round": C}
    fot, avg = runs["fot"], runs["fedavg"]
    print(f"  |θ| = {fot['theta']:,} floats (fot.md §3: {PAPER_THETA:,}); sketch upload per client = "
          f"{fot['sketch_floats']:,} floats (fot.md §3: 784² + 3·400² + 8 = {PAPER_SKETCH:,}) = "
          f"{fot['sketch_floats'] / fot['theta']:.2f} |θ| (fot.md: 1.7)")
    header = (f"{'method':>6} {'task':>4} | {'logged up':>11} {'expected up':>11} | {'logged down':>11} "
              f"{'expected down':>13} | {'gpse up':>9} {'gpse down':>9} | equal")
    print(header)
    print("-" * len(header))
    for method, run in runs.items():
        for row in run["tasks"]:
            lg = row["logged"]
            print(f"{method:>6} {row['task']:>4} | {lg['task_bytes_up']:>11,} {row['expected_up']:>11,} | "
                  f"{lg['task_bytes_down']:>11,} {row['expected_down']:>13,} | {lg['gpse_bytes_up']:>9,} "
                  f"{lg['gpse_bytes_down']:>9,} | {row['equal']}")
    for row in fot["tasks"]:
        up, down = row["logged"]["gpse_bytes_up"], row["logged"]["gpse_bytes_down"]
        sent = ", ".join(f"{k} {v}" for k, v in row["bases_before"].items()) or "none yet"
        print(f"  FOT task {row['task']}: GPSE up {up:,} B = {fot['per_round']} clients × "
              f"{up // fot['per_round'] // 8:,} float64 values; down {down:,} B = {fot['per_round']} clients × the "
              f"bases (columns: {sent})")
    for row_f, row_a in zip(fot["tasks"], avg["tasks"], strict=True):
        lf, la = row_f["logged"], row_a["logged"]
        print(f"  task {row_f['task']}: FOT / FedAvg bytes up {lf['task_bytes_up'] / la['task_bytes_up']:.3f}, "
              f"down {lf['task_bytes_down'] / la['task_bytes_down']:.3f} (this tiny run: {avg['rounds']} rounds)")
    # the paper's full PMNIST setting, from the comm helpers (float32 as the code)
    paper_shapes = {"hidden.0": (784, 784), "hidden.1": (400, 400), "hidden.2": (400, 400), "head": (400, 400)}
    per_task = round_traffic(4 * PAPER_THETA, PAPER_PER_ROUND) * PAPER_ROUNDS
    gpse = gpse_traffic(paper_shapes, PAPER_PER_ROUND, bytes_per_float=4)
    print(f"  paper's PMNIST per task (C = {PAPER_PER_ROUND}, {PAPER_ROUNDS} rounds, float32): FedAvg up "
          f"{per_task.up / 1e6:,.1f} MB; FOT adds {gpse.up / 1e6:,.1f} MB of sketches = "
          f"{100 * gpse.up / per_task.up:.2f} % (fot.md §3: 0.9 %), plus the bases down (≤ "
          f"{PAPER_PER_ROUND * sum(d * d for d, _ in paper_shapes.values()) * 4 / 1e6:,.1f} MB when full); "
          f"clbench sends the sketches in float64: 2× that")
    exact = (fot["theta"] == PAPER_THETA and fot["sketch_floats"] == PAPER_SKETCH
             and all(r["equal"] for run in runs.values() for r in run["tasks"]))
    print(f"  target: exact equality with fot.md §3's arithmetic: {'met' if exact else 'MISSED'}")
    return {"runs": runs, "paper_per_task": {"fedavg_up": per_task.up, "fedavg_down": per_task.down,
                                            "fot_gpse_up": gpse.up}, "exact": exact}


# ------------------------------------------------------------------------------------------ main


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks of the GPSE sweep (default: %(default)s)")
    parser.add_argument("--round-repeats", type=int, default=ROUND_REPEATS,
                        help="interleaved repeats of (a), rounds of a fraction of a second (default: %(default)s)")
    parser.add_argument("--flower-clients", type=lambda v: [int(k) for k in v.split(",") if k],
                        default=list(CLIENTS_D), help="K of (d), comma-separated; '' skips (d) (default: 2,5,10,20,50)")
    parser.add_argument("--flower-rounds", type=int, default=3, help="rounds of each run of (d) (default: 3)")


def main() -> dict[str, Any]:
    """Run the three parts, print their tables, return (and optionally write) the JSON payload."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "federated benchmark", setup=_setup, repeats=3)
    warnings.filterwarnings("ignore", category=UserWarning)
    start = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        a = rounds_per_second(args)
        d = flower_vs_inprocess(args) if args.flower_clients else None
        with torch.no_grad():
            b = gpse_server(args)
        c = bytes_per_task(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, device {args.device}, torch threads {torch.get_num_threads()}")
    payload = {"benchmark": "federated", "rounds": a, "flower": d, "gpse_server": b, "bytes": c,
               "device": args.device}
    return finish(args, payload)


if __name__ == "__main__":
    main()
