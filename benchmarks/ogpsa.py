"""OGPSA's cost on a language model: the projection between refreshes, and a refresh amortised over K steps.

* ``plain``: one training step of the tiny LM (loss on a ``safety_toy`` batch of 8, backward, clip 1.0, AdamW);
* ``ogpsa``: the same step with ``strategy.project`` in between (per-tensor projection off the rank-2 basis of two
  reference sets, built once before timing: the steps between refreshes);
* ``refresh``: one build of the bases (``ref_samples`` samples of each of the two sets, in batches of 8), whose
  cost per step is refresh / K.

Both fine-tuning layouts of the issue: ``--adapter lora`` (r 8 on q/v: only the adapters train and are projected)
and ``--adapter none`` (full fine-tuning: every tensor, the embedding included). One thread, calls interleaved
round by round, medians and paired ratios; the bases' memory (floats: m × the trainable size) is printed.
Targets (issue 17): ogpsa / plain ≤ 1.10 between refreshes; the amortised refresh reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
from types import SimpleNamespace
from typing import Any

import torch
from lightning.fabric import Fabric

from benchmarks._common import finish, paired_ratio, parse_args, timeit_rounds
from clbench.context import Context
from clbench.models.lm import LMConfig, build_lm
from clbench.streams import build_stream
from clbench.streams.alignment import AlignmentStreamConfig
from clbench.streams.batches import TensorBatchSource
from strategies.ogpsa import OGPSA, OGPSAConfig

REFS = ("arithmetic", "recall")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def setup(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--adapter", default="lora", choices=("lora", "none"))
        parser.add_argument("--ref-samples", type=int, default=200, help="samples per reference set (code: 200)")
        parser.add_argument("--refresh-every", type=int, default=30, help="K (code: 30 for SFT, 5 for DPO)")

    args = parse_args(__doc__.splitlines()[0], setup, argv, repeats=15)
    torch.manual_seed(0)
    model = build_lm(LMConfig(name="causal_lm", adapter=args.adapter, lora_dropout=0.0))
    stream = build_stream(AlignmentStreamConfig(stages=["sft"], n_tasks=2), 0)
    safety = stream.benchmark.train_stream[1].dataset
    batch = model.collate([safety[i] for i in range(8)])
    refs = {k: TensorBatchSource(**model.collate(list(stream.references[k]))) for k in REFS}
    ctx = Context(model=model, module=model, fabric=Fabric(accelerator="cpu", devices=1),  # type: ignore[arg-type]
                  stream=SimpleNamespace(references=refs, spec=stream.spec), seed=0,
                  batch_size=8, sources=lambda source: source)
    strategy = OGPSA(OGPSAConfig(name="ogpsa", ref_sets=list(REFS), ref_samples=args.ref_samples,
                                 refresh_every=args.refresh_every))
    strategy.setup(ctx)
    strategy.attach(ctx)
    strategy.build(ctx)
    strategy.steps, strategy.cfg.refresh_every = 1, 10**9  # no refresh inside the timed steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)  # small: the timed steps barely move θ

    def step(project: bool) -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        if project:
            strategy.project(ctx)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    fns = {"plain": lambda: step(False), "ogpsa": lambda: step(True), "refresh": lambda: strategy.build(ctx)}
    times = timeit_rounds(fns, repeats=args.repeats, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio, paired = med["ogpsa"] / med["plain"], paired_ratio(times["ogpsa"], times["plain"])
    amortised = med["refresh"] / args.refresh_every / med["plain"]
    floats = sum(U.numel() for U in strategy.basis.values())
    trainable = sum(p.numel() for p in params)
    print(f"tiny-llama, adapter {args.adapter}: {trainable:,} trainable floats; batch 8; bases {floats:,} floats "
          f"({floats / trainable:.2f} × trainable); torch threads={torch.get_num_threads()}, {args.repeats} "
          f"interleaved repeats (median), load average {os.getloadavg()[0]:.2f}")
    print(f"  plain step {1e3 * med['plain']:.2f} ms; OGPSA step {1e3 * med['ogpsa']:.2f} ms: ratio {ratio:.3f} "
          f"(paired {paired:.3f}); target ≤ 1.10: {'met' if ratio <= 1.10 else 'MISSED'}")
    print(f"  refresh ({len(REFS)} sets × {args.ref_samples} samples) {1e3 * med['refresh']:.1f} ms = "
          f"{med['refresh'] / med['plain']:.1f} plain steps; amortised over K = {args.refresh_every}: "
          f"+{100 * amortised:.0f} % a step")
    return finish(args, {"benchmark": "ogpsa", "adapter": args.adapter, "ms": {k: 1e3 * v for k, v in med.items()},
                         "ratio": ratio, "paired_ratio": paired, "refresh_amortised": amortised,
                         "basis_floats": floats, "trainable_floats": trainable,
                         "load_average": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
