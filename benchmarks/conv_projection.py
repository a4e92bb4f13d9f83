"""GPM's projection overhead on AlexNet-5 at batch 64: a GPM training step against a naive one.

GPM's AlexNet-5 (multi-head, batch-statistics BN, no bias) on the offline stand-in ``split_digits_32``
(5 tasks × 2 classes, 3×32×32) gets a realistic memory: tasks 0 .. T−1 (``--memory-tasks``, default 4) are each
trained for one epoch by hand (SGD lr 0.01, batch 64, tasks ≥ 1 with GPM's projection), and after each the
memory of conv1, conv2, conv3, fc1, fc2 is extended by :func:`clbench.subspace.extend_basis` from the layer
inputs of ``GPM_SAMPLES`` = 24/100/100/125/125 training samples (``collect_layer_inputs``, eval mode) at
ε = 0.97, code rule — what ``strategies/gpm.py`` holds when task T starts. ``--random-bases`` uses random
orthonormal bases of k = d/2 columns instead (the worst case: the projection costs ∝ min(k, d − k)).

A step on task T's data (forward, backward, projection, SGD step, lr 0.01, batch 64, dropout on) is timed for:

* ``naive``: no projection;
* ``auto`` / ``gradient`` / ``input``: a :class:`~clbench.subspace.LayerProjector` per protected layer with
  that form (``input`` applies to fc1/fc2 only, the convolutions keep the gradient form), ``project_()``
  after backward, as ``strategies/gpm.py`` does;
* ``official``: the official code's P = M Mᵀ (d × d, float32) per layer and ``grad ← grad − grad·P``.

Each timed call runs ``--steps`` steps on fixed batches; the variants run round-robin in one process
(``timeit_rounds``), ``--repeats`` rounds. Reported: steps/s, the overhead (gpm − naive)/naive of each variant
as the median of per-round ratios (robust to load drifting between rounds on a shared machine) and as a ratio of
medians; target: ``auto`` ≤ 15 % of a naive step. As a less noisy cross-check, each layer's projection work is
also timed alone (gradient form: ``project_()`` on an out × d gradient; input form: x (I − M Mᵀ) on a 64 × d
batch; best of 5) and summed with each variant's forms as a share of the naive step. Also the largest
|Δ| / ‖g‖ between each form's projected gradients and the official ones (same batch, same dropout masks).

Run: ``python -m benchmarks.conv_projection [--json PATH] [--steps N] [--repeats N] [--memory-tasks T]
[--random-bases]``.
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
from benchmarks.projection import step_loop
from clbench.config import BenchmarkConfig
from clbench.models import build_model, model_config
from clbench.models.alexnet import GPM_SAMPLES
from clbench.models.base import ContinualModel
from clbench.streams import batch_source, build_stream
from clbench.streams.batches import BatchSource
from clbench.subspace import LayerProjector, collect_layer_inputs, extend_basis

BATCH = 64
THRESHOLD = 0.97
LR = 0.01
SEED = 0
MEMORY_TASKS = 4
TARGET_OVERHEAD = 0.15
FORMS: tuple[str, ...] = ("auto", "gradient", "input")

Batch = tuple[Tensor, Tensor, Tensor]


def build_data() -> tuple[ContinualModel, list[BatchSource]]:
    """``split_digits_32`` (5 tasks, task-incremental, seed 0): a fresh AlexNet-5 (seeded) and every task's
    training split as a tensor cache on the CPU."""
    stream = build_stream(BenchmarkConfig(name="split_digits_32", n_tasks=5, scenario="task"), SEED)
    torch.manual_seed(SEED)
    model = build_model(model_config("alexnet"), stream.spec)
    return model, [batch_source(e.dataset, "cpu") for e in stream.benchmark.train_stream]


def make_projectors(model: ContinualModel, bases: dict[str, Tensor], form: str) -> list[LayerProjector]:
    """One attached LayerProjector per protected layer with a non-empty basis; ``form="input"`` only where the
    layer is ``nn.Linear`` (the convolutions keep the gradient form)."""
    layers = model.protected_layers()
    projectors = []
    for name, M in bases.items():
        if M.shape[1] == 0:
            continue
        layer_form = "gradient" if form == "input" and not isinstance(layers[name], nn.Linear) else form
        projectors.append(LayerProjector(layers[name], M, form=layer_form, batch_size=BATCH))
    for p in projectors:
        p.attach()
    return projectors


def train_task(model: ContinualModel, source: BatchSource, bases: dict[str, Tensor], task: int) -> None:
    """One epoch of SGD (lr 0.01, batch 64) on ``source``, projected on the current memory (GPM)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    projectors = make_projectors(model, bases, "auto")
    model.train()
    try:
        for batch in source.batches(BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED + task)):
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            for p in projectors:
                p.project_()
            optimizer.step()
    finally:
        for p in projectors:
            p.detach()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def extend_memory(model: ContinualModel, source: BatchSource, bases: dict[str, Tensor], task: int) -> None:
    """GPM's update after a task: R of GPM_SAMPLES samples per layer (eval mode), extend_basis at ε = 0.97."""
    layers = model.protected_layers()
    samples = dict(zip(layers, GPM_SAMPLES, strict=True))
    x, _, t = source.take(max(GPM_SAMPLES), torch.Generator().manual_seed(SEED + 100 + task))
    model.eval()
    reps = collect_layer_inputs(model, layers, lambda: model(x, t), samples=samples)
    model.train()
    for name, R in reps.items():
        bases[name] = extend_basis(bases.get(name), R.float(), THRESHOLD, rule="code")


def random_bases(model: ContinualModel) -> dict[str, Tensor]:
    """Random orthonormal bases of d/2 columns per protected layer (QR of a seeded Gaussian matrix)."""
    g = torch.Generator().manual_seed(SEED)
    out: dict[str, Tensor] = {}
    for name, layer in model.protected_layers().items():
        d = layer.weight[0].numel()
        q, _ = torch.linalg.qr(torch.randn(d, d // 2, generator=g, dtype=torch.float64))
        out[name] = q.float().contiguous()
    return out


def official_matrices(bases: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official code's projection matrices: P = M Mᵀ per layer, d × d, float32."""
    return {name: (M @ M.T).float().contiguous() for name, M in bases.items() if M.shape[1] > 0}


def official_project(layers: dict[str, nn.Module], P: dict[str, Tensor]) -> None:
    """After backward: ``grad ← grad − grad·P`` on each layer's flattened weight gradient (official form)."""
    for name, matrix in P.items():
        w = layers[name].weight
        assert w.grad is not None
        flat = w.grad.view(w.shape[0], -1)
        w.grad = (flat - flat @ matrix).view(w.shape)


def projected_gradients(
    model: ContinualModel, batch: Batch, bases: dict[str, Tensor], P: dict[str, Tensor], form: str | None
) -> dict[str, Tensor]:
    """The protected layers' weight gradients after one seeded forward/backward on a copy of ``model`` and the
    projection of ``form`` (None: the official P = M Mᵀ)."""
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    projectors = make_projectors(net, bases, form) if form is not None else []
    try:
        torch.manual_seed(SEED)  # the same dropout masks for every form
        net.loss(batch).backward()
        for p in projectors:
            p.project_()
    finally:
        for p in projectors:
            p.detach()
    if form is None:
        official_project(net.protected_layers(), P)
    out = {}
    for name, layer in net.protected_layers().items():
        assert layer.weight.grad is not None
        out[name] = layer.weight.grad.clone()
    return out


def _best_us(fn: Callable[[], Any], calls: int = 10, repeats: int = 5) -> float:
    """Best-of-``repeats`` mean microseconds of ``fn()`` over ``calls`` calls (load only adds time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def isolated_projection_us(model: ContinualModel, bases: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per layer, the microseconds of the projection work of each form, timed alone (less noisy than a step):
    ``gradient``: ``project_()`` on a random weight gradient (out × d); ``input`` (Linear only): the product
    x (I − M Mᵀ) of a random batch x (64 × d), which the input form adds to backward (its Python overhead,
    ~70 µs, is not included)."""
    out: dict[str, dict[str, float]] = {}
    g = torch.Generator().manual_seed(SEED)
    for name, layer in model.protected_layers().items():
        M = bases.get(name)
        if M is None or M.shape[1] == 0:
            out[name] = {"gradient": 0.0, "input": 0.0}
            continue
        module = copy.deepcopy(layer)
        module.weight.grad = torch.randn(module.weight.shape, generator=g)
        p = LayerProjector(module, M, form="gradient")
        out[name] = {"gradient": _best_us(p.project_)}
        if isinstance(layer, nn.Linear):
            x = torch.randn(BATCH, M.shape[0], generator=g)
            out[name]["input"] = _best_us(lambda p=p, x=x: p.project(x))
    return out


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed call")
    parser.add_argument("--memory-tasks", type=int, default=MEMORY_TASKS,
                        help="tasks whose representations build the memory (1..4; default %(default)s)")
    parser.add_argument("--random-bases", action="store_true",
                        help="random orthonormal bases of d/2 columns per layer instead of GPM's")


def main() -> dict[str, Any]:
    """Run the benchmark, print a table, return (and optionally write) the JSON payload."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "conv projection benchmark", setup=_setup,
                      repeats=7)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not 1 <= args.memory_tasks <= 4:
        raise SystemExit("--memory-tasks must be in 1..4 (split_digits_32 has 5 tasks; the last is timed)")
    with threadpool_limits(limits=args.threads):
        start = time.perf_counter()
        model, sources = build_data()
        T = args.memory_tasks
        bases: dict[str, Tensor] = {}
        if args.random_bases:
            bases, origin = random_bases(model), "random orthonormal, k = d/2"
        else:
            for task in range(T):
                train_task(model, sources[task], bases, task)
                extend_memory(model, sources[task], bases, task)
            origin = (f"GPM after tasks 0..{T - 1} of split_digits_32 (1 epoch each, GPM_SAMPLES {GPM_SAMPLES}, "
                      f"ε={THRESHOLD}, code rule)")
        P = official_matrices(bases)
        dims = {name: {"k": int(M.shape[1]), "d": int(M.shape[0])} for name, M in bases.items()}
        print(f"bases: {origin}; " + ", ".join(f"{n} k={v['k']}/{v['d']}" for n, v in dims.items())
              + f"  (set-up {time.perf_counter() - start:.1f}s)")
        gen = torch.Generator().manual_seed(SEED + 1)
        batches: list[Batch] = []
        while len(batches) < args.steps:  # full batches only, over as many epochs of task T as needed
            batches += [b for b in sources[T].batches(BATCH, shuffle=True, generator=gen) if b[1].shape[0] == BATCH]
        batches = batches[: args.steps]
        reference = projected_gradients(model, batches[0], bases, P, None)
        grad_diff: dict[str, float] = {}
        for form in FORMS:
            ours = projected_gradients(model, batches[0], bases, P, form)
            grad_diff[form] = max(float((ours[n] - reference[n]).abs().max() / reference[n].norm().clamp_min(1e-30))
                                  for n in reference)
        fns: dict[str, Callable[[], None]] = {"naive": step_loop(copy.deepcopy(model), batches, None)}
        forms: dict[str, dict[str, str]] = {}
        attached: list[LayerProjector] = []
        for form in FORMS:
            net = copy.deepcopy(model)
            projectors = make_projectors(net, bases, form)
            attached += projectors
            forms[form] = {name: p.form for name, p in zip([n for n, M in bases.items() if M.shape[1] > 0],
                                                             projectors, strict=True)}

            def project(projectors: list[LayerProjector] = projectors) -> None:
                for p in projectors:
                    p.project_()

            fns[form] = step_loop(net, batches, project)
        official = copy.deepcopy(model)
        official_layers = official.protected_layers()
        fns["official"] = step_loop(official, batches, lambda: official_project(official_layers, P))
        print(f"AlexNet-5 at batch {BATCH}, CPU, torch threads={torch.get_num_threads()}, {len(batches)} steps per "
              f"call, {args.repeats} interleaved repeats (median)")
        rounds = timeit_rounds(fns, repeats=args.repeats, warmup=1)
        for p in attached:
            p.detach()
        steps = len(batches)
        rate = {name: steps / statistics.median(ts) for name, ts in rounds.items()}
        ms = {name: statistics.median(ts) / steps * 1e3 for name, ts in rounds.items()}
        overhead = {name: paired_ratio(rounds[name], rounds["naive"]) - 1.0 for name in fns if name != "naive"}
        overhead_medians = {name: rate["naive"] / rate[name] - 1.0 for name in fns if name != "naive"}
        header = f"{'variant':>9} {'steps/s':>8} {'ms/step':>8} | {'overhead':>8} {'(medians)':>9} | forms"
        print(header)
        print("-" * len(header))
        for name in fns:
            cells = (f"{overhead[name]:>+7.1%} {overhead_medians[name]:>+9.1%}" if name != "naive"
                     else f"{'':>8} {'':>9}")
            layout = " ".join(f"{n}:{f}" for n, f in forms.get(name, {}).items())
            print(f"{name:>9} {rate[name]:>8.2f} {ms[name]:>8.1f} | {cells} | {layout}", flush=True)
        isolated = isolated_projection_us(model, bases)
        modelled = {form: sum(isolated[n][f] for n, f in layout.items()) / 1e3 / ms["naive"]
                    for form, layout in forms.items()}
        print("projection work timed alone per layer, µs (gradient form / input form): "
              + ", ".join(f"{n} {v['gradient']:.0f}" + (f" / {v['input']:.0f}" if "input" in v else "")
                          for n, v in isolated.items()))
        print("  summed over the layers with each variant's forms, as a share of a naive step: "
              + ", ".join(f"{form} {v:.1%}" for form, v in modelled.items()))
        max_diff = max(grad_diff.values())
        print("projected gradients vs official P = M Mᵀ, max |Δ| / ‖g‖: "
              + ", ".join(f"{f} {v:.1e}" for f, v in grad_diff.items())
              + f"  -> {'ok' if max_diff <= 1e-5 else 'ABOVE'} 1e-5")
        met = overhead["auto"] <= TARGET_OVERHEAD
        print(f"target: auto overhead ≤ {TARGET_OVERHEAD:.0%} of a naive step: {'met' if met else 'MISSED'} "
              f"({overhead['auto']:+.1%} per-round median)")
    payload: dict[str, Any] = {
        "benchmark": "conv_projection",
        "overhead": overhead,
        "overhead_ratio_of_medians": overhead_medians,
        "steps_per_s": rate,
        "ms_per_step": ms,
        "isolated_projection_us": isolated,
        "isolated_overhead": modelled,

        "forms": forms,
        "basis_dims": dims,
        "bases": "random" if args.random_bases else f"gpm_{T}_tasks",
        "grad_diff": grad_diff,
        "target_met": met,
        "batch": BATCH,
        "steps": steps,
    }
    return finish(args, payload)


if __name__ == "__main__":
    main()
