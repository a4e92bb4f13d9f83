"""Language models on the loop: clbench's LoRA training step and its batched greedy scoring against hand-written
peft + torch / ``generate`` code on the same model, the same tensors and the same batches.

Data: task 0 of ``keyword_topics`` (stream seed 0: 400 training prompts, 2 classes × 200, and 200 test prompts;
about 67 tokens a training sample, prompt + answer + end), tokenised once by the model's ``collate``.
Model (``--model``): ``tiny-llama`` (default; random init, hidden 64, 2 layers, BERT WordPiece vocabulary of
30,522), ``small-llama`` (~5M) or ``tiny-t5``; peft LoRA r 8, α 32, dropout 0.1 on the attention's q / v
projections (``LMConfig``'s defaults), fp32. Both sides hold identical weights (the hand-written model is
built from the same Hugging Face config and loads clbench's state dict).

**(1) LoRA training, one epoch at batch 8** (``engine=lm``: AdamW lr 1e-3, weight decay 0, clip 1.0):

* ``clbench``: :class:`~clbench.engine.Engine` ``fit`` with the naive strategy (``strategies.base.Strategy``)
  through a minimal :class:`~clbench.context.Context` over a :class:`~clbench.streams.batches.TensorBatchSource`
  of the collated experience, the model set up by Fabric (``32-true``, so the engine calls the module directly);
* ``hand``: a peft model and a torch loop over the same collated tensors in the same batch order (the engine's
  shuffle generator): ``index_select`` of the three tensors it needs, padding columns trimmed, forward, the
  loss computed as :meth:`~clbench.models.lm.LanguageModel.loss` does (causal: the output layer only at the
  positions that predict an answer token, applied to the last hidden state gathered there, then cross-entropy;
  seq2seq: the model's own ``labels`` loss, which is the same computation), backward, ``clip_grad_norm_``, AdamW step,
  ``zero_grad``. A fresh AdamW per epoch on both sides, as the engine builds one per experience.

Reported: samples/s, ms per optimizer step, minor page faults per step and the ratio clbench / hand (target
≥ 0.95), as the ratio of medians and the median of per-round ratios. The losses of the two sides on the first
batch (eval mode, no dropout) are checked to be equal before timing, so the work is the same.

Page faults: glibc's malloc moves its mmap and trim thresholds as large blocks come and go, so a step's ~10 MB
logits buffers are now and then mapped afresh and every first touch of a page faults; this system time varies
with the order of allocations and frees, not with the arithmetic (on the 2-core test machine: 25-30 % of a
tiny-llama step on both sides; from run to run either side may fault up to twice as often as the other).
``--fixed-malloc`` pins both thresholds (:func:`fix_malloc`) before anything is built, which removes the faults
and leaves the loops' own costs to compare.

**(2) Scoring by batched greedy decoding** (the 200 test prompts in batches of 64, ``engine=lm``'s
``eval_batch_size``), at ``max_new_tokens`` 50 (``LMConfig``'s default: a random-init model never emits the
end token, so every prompt decodes all 50 tokens) and at 3 (a trained model's answer: a label word and the end
token, where the per-batch overheads weigh most):

* ``clbench``: :func:`clbench.metrics.evaluate` over the Fabric-wrapped model's ``score`` (marked as a forward
  method, as ``clbench.experiment`` does): per-sample exact match of the greedy answer, which decodes with
  :func:`~clbench.models.generation.greedy_generate`, plus the teacher-forced answer NLL (its second score);
* ``predict`` and ``nll`` (no target; they split clbench's time): :meth:`~clbench.models.lm.LanguageModel.predict`
  alone (generation and decoding, no references, no Fabric) and the teacher-forced answer NLL alone
  (:meth:`~clbench.models.lm.LanguageModel.loss` under ``no_grad``, the forward ``score`` runs for its loss);
* ``hand``: ``model.generate(do_sample=False, max_new_tokens=...)`` on the same left-padded prompt batches (their
  all-padding columns trimmed, as clbench trims them), ``tokenizer.batch_decode`` of the new tokens and a
  comparison with the reference answers.

The answers of ``hand`` and ``predict`` are checked to be identical before timing. Reported: prompts/s,
generated tokens/s and the ratio clbench / hand (target ≥ 0.9).

Every contestant is called once untimed, then they run round-robin in one process, the order reversed every other
round (:func:`alternating_rounds`), medians of ``--repeats`` calls (default 7); torch threads 1 by default.
``--profile`` prints a cProfile of one clbench training epoch and of one clbench scoring pass per row.

Run: ``python -m benchmarks.lm [--model tiny-llama|small-llama|tiny-t5] [--json PATH] [--repeats N]
[--device cpu|cuda] [--fixed-malloc] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import pstats
import resource
import statistics
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from benchmarks._common import finish, paired_ratio, parse_args, timeit_rounds, train_one_experience

MODELS: dict[str, str] = {"tiny-llama": "causal_lm", "small-llama": "causal_lm", "tiny-t5": "seq2seq_lm"}
LORA_TARGETS: dict[str, list[str]] = {"causal_lm": ["q_proj", "v_proj"], "seq2seq_lm": ["q", "v"]}
BATCH_SIZE = 8
EVAL_BATCH_SIZE = 64
LR = 1e-3
CLIP = 1.0
NEW_TOKENS = (50, 3)
SEED = 0
SHUFFLE_KEY = 1  # clbench.engine's stream of randomness for the batch order
IGNORE = -100
TARGETS = {"train": 0.95, "score": 0.9}


# ------------------------------------------------------------------------------------------------- timing


def alternating_rounds(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """:func:`~benchmarks._common.timeit_rounds` with the order of the calls reversed every other round, so that
    each contestant runs first in half of the rounds and a bias of the position in a round (caches, the load of
    other work drifting within a round on a shared machine) cancels; entry ``i`` of every list is still from
    round ``i`` (for :func:`~benchmarks._common.paired_ratio`)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name, ts in timeit_rounds({k: fns[k] for k in order}, repeats=1, warmup=0).items():
            times[name] += ts
    return times


class FaultCounter:
    """Wraps functions to count the minor page faults of each call (``getrusage``, a few µs a call)."""

    def __init__(self) -> None:
        self.faults: dict[str, list[int]] = {}

    def wrap(self, fns: Mapping[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
        """``fns`` with each call's minor faults appended to ``self.faults[name]``."""
        def counted(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                out = fn()
                self.faults.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
                return out
            return run
        return {name: counted(name, fn) for name, fn in fns.items()}

    def median(self, name: str) -> float:
        """Median minor faults of a call of ``name`` (warm-up calls included)."""
        return statistics.median(self.faults[name])


MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses an M_MMAP_THRESHOLD above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)


def fix_malloc() -> bool:
    """Pin glibc malloc's thresholds: blocks up to 32 MiB from the heap (not ``mmap``), and the heap's top never
    given back to the system (trim threshold 1 GiB). glibc otherwise moves both thresholds as blocks come and go,
    so a training step's ~10 MB logits buffers are mapped and unmapped afresh now and then, and every first touch
    of their pages is a page fault (system time) in a pattern that changes with the order of frees. Returns
    whether glibc accepted both settings (False on another C library)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


# ------------------------------------------------------------------------------------------------- set-up


def keyword_task() -> tuple[list[Any], list[Any]]:
    """Training and test samples (:class:`~clbench.streams.text.TextSample`) of ``keyword_topics`` task 0."""
    from clbench.streams import build_stream
    from clbench.streams.text import TextStreamConfig

    stream = build_stream(TextStreamConfig(name="keyword_topics", n_tasks=1), SEED)
    train, test = stream.benchmark.train_stream[0].dataset, stream.benchmark.test_stream[0].dataset
    return [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]


def clbench_model(name: str) -> Any:
    """clbench's language model ``name`` with its default LoRA adapter (r 8 on q / v), seeded."""
    from clbench.models.lm import LMConfig, build_lm

    torch.manual_seed(SEED)
    return build_lm(LMConfig(name=MODELS[name], pretrained=name))


def hand_model(lm: Any, family: str, device: torch.device) -> torch.nn.Module:
    """A peft LoRA model built by hand from the Hugging Face config of clbench's ``lm`` (same r, α, dropout and
    q / v targets), holding the same weights."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base = lm.base_model()
    auto = AutoModelForCausalLM if family == "causal_lm" else AutoModelForSeq2SeqLM
    model = auto.from_config(base.config, dtype=torch.float32)
    task = TaskType.CAUSAL_LM if family == "causal_lm" else TaskType.SEQ_2_SEQ_LM
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=LORA_TARGETS[family], task_type=task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, config)
    model.load_state_dict(lm.lm.state_dict())
    return model.to(device)


def _columns(mask: torch.Tensor) -> int:
    """The columns a padded batch needs: its longest row."""
    return int(mask.sum(1).max())


def hand_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], family: str) -> torch.Tensor:
    """The mean cross-entropy over the answer tokens of ``batch`` (``input_ids``, ``attention_mask``,
    ``labels``), padding columns trimmed. Causal: only the positions that predict an answer token go through the
    output layer. Seq2seq: the model's ``labels`` loss (decoder input: the labels shifted right)."""
    width = _columns(batch["attention_mask"])
    ids, mask = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
    if family == "seq2seq_lm":
        labels = batch["labels"][:, :_columns(batch["labels"] != IGNORE)]
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    targets = batch["labels"][:, 1:width]
    valid = targets != IGNORE
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1][valid]
    return F.cross_entropy(model.get_output_embeddings()(hidden), targets[valid])


# ---------------------------------------------------------------------------------------------- training


def clbench_train(lm: Any, tensors: Mapping[str, torch.Tensor], device: torch.device) -> Callable[[], None]:
    """clbench's loop set up once (Fabric, a minimal Context, the naive strategy, the Engine); the function
    trains one experience of one epoch (fresh optimizer and schedule, as the run does per experience)."""
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig, StrategyConfig
    from clbench.context import Context
    from clbench.engine import Engine
    from clbench.streams.batches import TensorBatchSource
    from strategies.base import Strategy

    cfg = EngineConfig(epochs=1, optimizer="adamw", lr=LR, weight_decay=0.0, batch_size=BATCH_SIZE, clip_norm=CLIP,
                       accelerator=device.type, devices=1, progress="none", checkpoint_every_epoch=False)
    fabric = Fabric(accelerator=device.type, devices=1, precision="32-true")
    model = fabric.setup_module(lm)
    model.mark_forward_method("loss")
    source = TensorBatchSource(**{k: v.to(device) for k, v in tensors.items()})
    ctx = Context(model=model, module=lm, fabric=fabric, stream=None, seed=SEED,  # type: ignore[arg-type]
                  batch_size=BATCH_SIZE, sources=None, train_source=source)
    strategy = Strategy(StrategyConfig())
    strategy.setup(ctx)
    engine = Engine(cfg, fabric)
    losses: list[float] = []

    return train_one_experience(ctx, strategy, engine, losses)


def hand_train(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], family: str,
               device: torch.device) -> Callable[[], None]:
    """A hand-written peft + torch loop over the same tensors in the engine's batch order (its shuffle seed for
    experience 0, epoch 0): one epoch per call, a fresh AdamW."""
    from clbench.context import hash_seed

    data = {k: tensors[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    n = data["input_ids"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def run() -> None:
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_seed(SEED, 0, SHUFFLE_KEY, 0)))
        for idx in order.to(device).split(BATCH_SIZE):
            batch = {k: v.index_select(0, idx) for k, v in data.items()}
            loss = hand_loss(model, batch, family)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def check_same_loss(lm: Any, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], family: str,
                    device: torch.device) -> float:
    """The loss of both sides on the first 8 samples (eval mode: no dropout); raises if they differ."""
    batch = {k: v[:BATCH_SIZE].to(device) for k, v in tensors.items()}
    lm.eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = float(lm.loss(batch)), float(hand_loss(model, batch, family))
    lm.train()
    model.train()
    if abs(ours - theirs) > 1e-4 * max(1.0, abs(ours)):
        raise AssertionError(f"losses differ: clbench {ours} vs hand {theirs}; the two sides do different work")
    return ours


# ------------------------------------------------------------------------------------------------ scoring


def score_batches(tensors: Mapping[str, torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The test tensors cut into consecutive batches of ``EVAL_BATCH_SIZE`` on ``device`` (as the test source's
    unshuffled batches: views of the experience-wide padding)."""
    from clbench.streams.batches import TensorBatchSource

    source = TensorBatchSource(**{k: v.to(device) for k, v in tensors.items()})
    return list(source.batches(EVAL_BATCH_SIZE, shuffle=False))


def hand_prompts(batches: list[dict[str, torch.Tensor]], family: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's prompt ids and mask as a hand-written scorer holds them: left-padded to the batch's longest
    prompt (causal), right-padded encoder inputs trimmed alike (seq2seq)."""
    out = []
    for b in batches:
        if family == "seq2seq_lm":
            width = _columns(b["attention_mask"])
            out.append((b["input_ids"][:, :width], b["attention_mask"][:, :width]))
        else:
            start = b["prompt_mask"].shape[1] - _columns(b["prompt_mask"])
            out.append((b["prompt_ids"][:, start:], b["prompt_mask"][:, start:]))
    return out


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad: int,
              family: str) -> torch.Tensor:
    """Plain greedy ``generate`` (the model's own end token), the new tokens only."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         pad_token_id=pad)
    return out[:, 1:] if family == "seq2seq_lm" else out[:, ids.shape[1]:]


def hand_score(model: torch.nn.Module, tokenizer: Any, prompts: list[tuple[torch.Tensor, torch.Tensor]],
               references: list[list[str]], new_tokens: int, family: str) -> Callable[[], list[str]]:
    """Plain ``generate`` (greedy, ``new_tokens`` at most, the model's own end token and the tokenizer's pad),
    ``batch_decode`` of the new tokens, exact match against the reference answers; returns the answers."""
    pad = tokenizer.pad_token_id

    def run() -> list[str]:
        answers: list[str] = []
        hits = 0  # the exact-match count, computed as a scorer does (the benchmark does not need it)
        with torch.no_grad():
            for (ids, mask), refs in zip(prompts, references, strict=True):
                texts = tokenizer.batch_decode(_generate(model, ids, mask, new_tokens, pad, family),
                                               skip_special_tokens=True)
                hits += sum(t.strip().lower() == r.lower() for t, r in zip(texts, refs, strict=True))
                answers += texts
        return answers

    return run


@torch.no_grad()
def generated_tokens(model: torch.nn.Module, prompts: list[tuple[torch.Tensor, torch.Tensor]], new_tokens: int,
                     stop_ids: list[int], pad: int, family: str) -> int:
    """How many tokens greedy decoding of ``prompts`` produces, each row up to and with its first end token."""
    total = 0
    for ids, mask in prompts:
        new = _generate(model, ids, mask, new_tokens, pad, family)
        stop = torch.isin(new, torch.tensor(stop_ids, device=new.device))
        first = torch.where(stop.any(1), stop.int().argmax(1) + 1, new.shape[1])
        total += int(first.sum())
    return total


def clbench_score(lm: Any, batches: list[dict[str, torch.Tensor]], device: torch.device) -> Callable[[], Any]:
    """:func:`clbench.metrics.evaluate` over the Fabric-wrapped model's ``score`` (marked forward method), in
    eval mode, as ``clbench.experiment`` evaluates a test experience."""
    from lightning.fabric import Fabric

    from clbench import metrics

    fabric = Fabric(accelerator=device.type, devices=1, precision="32-true")
    model = fabric.setup_module(lm)
    model.mark_forward_method("score")
    model.eval()
    return lambda: metrics.evaluate(model.score, batches, fabric.device)


def clbench_nll(lm: Any, batches: list[dict[str, torch.Tensor]]) -> Callable[[], list[torch.Tensor]]:
    """The answer NLL part of ``score`` alone: :meth:`~clbench.models.lm.LanguageModel.loss` of every batch
    (teacher-forced, no gradient), the same forward ``score`` runs besides decoding."""
    lm.eval()

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            return [lm.loss(b) for b in batches]

    return run


def clbench_predict(lm: Any, batches: list[dict[str, torch.Tensor]]) -> Callable[[], list[str]]:
    """:meth:`~clbench.models.lm.LanguageModel.predict` of every batch (greedy answers as text)."""
    lm.eval()
    return lambda: [a for b in batches for a in lm.predict(b)]


# ------------------------------------------------------------------------------------------------- output


def profile(fn: Callable[[], Any], top: int = 25) -> str:
    """cProfile of one call of ``fn``, the ``top`` entries by total time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=tuple(MODELS), default="tiny-llama", help="model (default: %(default)s)")
    parser.add_argument("--fixed-malloc", action="store_true",
                        help="pin glibc malloc's mmap / trim thresholds first (fix_malloc): no page-fault noise")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of one clbench training epoch and one scoring pass")


def main() -> dict[str, Any]:
    """Run both measurements, print the tables, return (and optionally write) the JSON payload."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "lm benchmark", setup=_setup, repeats=7)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    name, family = args.model, MODELS[args.model]
    malloc_fixed = fix_malloc() if args.fixed_malloc else False
    if args.fixed_malloc and not malloc_fixed:
        print("--fixed-malloc: glibc's mallopt is not available or refused the settings; malloc left as it is")
    profiles: dict[str, str] = {}
    with threadpool_limits(limits=args.threads):
        train_samples, test_samples = keyword_task()

        # ---- (1) training
        lm = clbench_model(name).to(device)
        hand = hand_model(lm, family, device)
        tensors = lm.collate(train_samples)
        n = len(train_samples)
        steps = -(-n // BATCH_SIZE)
        tokens = float(tensors["attention_mask"].sum(1).float().mean())  # seq2seq: the encoder's, + the decoder's
        tokens += float((tensors["labels"] != IGNORE).sum(1).float().mean()) if family == "seq2seq_lm" else 0.0
        first_loss = check_same_loss(lm, hand, tensors, family, device)
        trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        total = sum(p.numel() for p in lm.parameters())
        print(f"keyword_topics task 0: {n} training / {len(test_samples)} test prompts, {name} ({total:,} parameters, "
              f"LoRA r 8 on {'/'.join(LORA_TARGETS[family])}: {trainable:,} trainable), {device.type}, torch "
              f"threads={torch.get_num_threads()}, {args.repeats} interleaved repeats (median)"
              + (", glibc malloc thresholds pinned (--fixed-malloc)" if malloc_fixed else ""))
        print(f"(1) LoRA training, 1 epoch at batch {BATCH_SIZE} ({steps} steps, {tokens:.1f} tokens a sample on "
              f"average), AdamW lr {LR:g}, clip {CLIP:g}; first-batch loss {first_loss:.4f} on both sides")
        fns = {"clbench": clbench_train(lm, tensors, device), "hand": hand_train(hand, tensors, family, device)}
        faults = FaultCounter()
        rounds = alternating_rounds(faults.wrap(fns), repeats=args.repeats, warmup=1)
        seconds = {k: statistics.median(v) for k, v in rounds.items()}
        train_faults = {k: faults.median(k) / steps for k in fns}
        train_rate = {k: n / s for k, s in seconds.items()}
        train_ms = {k: s / steps * 1e3 for k, s in seconds.items()}
        train_ratio = train_rate["clbench"] / train_rate["hand"]
        train_paired = paired_ratio(rounds["hand"], rounds["clbench"])
        header = f"{'':>10} {'samples/s':>10} {'ms/step':>8} {'page faults/step':>16}"
        print(header)
        print("-" * len(header))
        for k in fns:
            print(f"{k:>10} {train_rate[k]:>10.1f} {train_ms[k]:>8.2f} {train_faults[k]:>16.0f}")
        print(f"clbench/hand: {train_ratio:.3f} (ratio of medians), {train_paired:.3f} (median per-round ratio); "
              f"clbench's extra time per step {train_ms['clbench'] - train_ms['hand']:+.2f} ms", flush=True)
        if args.profile:
            profiles["training epoch"] = profile(fns["clbench"])
        del fns, hand, lm

        # ---- (2) scoring
        lm = clbench_model(name).to(device)
        hand = hand_model(lm, family, device)
        hand.eval()
        batches = score_batches(lm.collate(test_samples), device)
        prompts = hand_prompts(batches, family)
        references = [[s.answer for s in test_samples[i:i + EVAL_BATCH_SIZE]]
                      for i in range(0, len(test_samples), EVAL_BATCH_SIZE)]
        m = len(test_samples)
        print(f"\n(2) scoring {m} test prompts in batches of {EVAL_BATCH_SIZE} by greedy decoding; the same answers "
              "on both sides (checked)")
        header = (f"{'new tokens':>10} {'clbench':>8} {'predict':>8} {'nll':>8} {'hand':>8} | {'clbench':>8} "
                  f"{'hand':>8} | {'cl/hand':>7} {'paired':>6} {'pred/hand':>9}")
        print(f"{'':>10} {'prompts/s':^35} | {'tokens/s':^17} |")
        print(header)
        print("-" * len(header))
        score_rate: dict[str, dict[str, float]] = {}
        token_rate: dict[str, dict[str, float]] = {}
        score_ratio: dict[str, float] = {}
        score_paired: dict[str, float] = {}
        predict_ratio: dict[str, float] = {}
        new_per_prompt: dict[str, float] = {}
        score_faults: dict[str, dict[str, float]] = {}
        for new_tokens in NEW_TOKENS:
            lm.max_new_tokens = new_tokens
            fns = {"clbench": clbench_score(lm, batches, device), "predict": clbench_predict(lm, batches),
                   "nll": clbench_nll(lm, batches),
                   "hand": hand_score(hand, lm.tokenizer, prompts, references, new_tokens, family)}
            if fns["predict"]() != fns["hand"]():
                raise AssertionError(f"clbench's and the hand-written greedy answers differ at {new_tokens} tokens")
            generated = generated_tokens(hand, prompts, new_tokens, lm.stop_ids, lm.tokenizer.pad_token_id, family)
            faults = FaultCounter()
            rounds = alternating_rounds(faults.wrap(fns), repeats=args.repeats, warmup=1)
            seconds = {k: statistics.median(v) for k, v in rounds.items()}
            key = f"new{new_tokens}"
            score_faults[key] = {k: faults.median(k) for k in fns}
            score_rate[key] = {k: m / s for k, s in seconds.items()}
            token_rate[key] = {k: generated / s for k, s in seconds.items()}
            new_per_prompt[key] = generated / m
            score_ratio[key] = score_rate[key]["clbench"] / score_rate[key]["hand"]
            score_paired[key] = paired_ratio(rounds["hand"], rounds["clbench"])
            predict_ratio[key] = score_rate[key]["predict"] / score_rate[key]["hand"]
            r, t = score_rate[key], token_rate[key]
            print(f"{new_tokens:>10} {r['clbench']:>8.1f} {r['predict']:>8.1f} {r['nll']:>8.1f} {r['hand']:>8.1f} | "
                  f"{t['clbench']:>8.0f} {t['hand']:>8.0f} | {score_ratio[key]:>7.3f} {score_paired[key]:>6.3f} "
                  f"{predict_ratio[key]:>9.3f}", flush=True)
            if args.profile:
                profiles[f"scoring pass, max_new_tokens {new_tokens}"] = profile(fns["clbench"])
        print("generated tokens per prompt (end token included): "
              + ", ".join(f"{v:.1f} at max_new_tokens {k[3:]}" for k, v in new_per_prompt.items()))
        met = {"train": train_ratio >= TARGETS["train"]} | {
            f"score_{k}": v >= TARGETS["score"] for k, v in score_ratio.items()}
        print(f"targets (training clbench/hand ≥ {TARGETS['train']:g}, scoring clbench/hand ≥ {TARGETS['score']:g}): "
              + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in met.items()))
        for what, text in profiles.items():
            print(f"\n== cProfile of one clbench {what} (by total time)\n{text}")
    payload: dict[str, Any] = {
        "benchmark": "lm",
        "model": name,
        "device": device.type,
        "fixed_malloc": malloc_fixed,
        "train": {"samples": n, "batch_size": BATCH_SIZE, "steps": steps, "mean_tokens": tokens,
                  "samples_per_s": train_rate, "ms_per_step": train_ms, "page_faults_per_step": train_faults,
                  "ratio": train_ratio, "paired_ratio": train_paired},
        "score": {"prompts": m, "batch_size": EVAL_BATCH_SIZE, "prompts_per_s": score_rate,
                  "tokens_per_s": token_rate, "new_tokens_per_prompt": new_per_prompt, "ratio": score_ratio,
                  "paired_ratio": score_paired, "predict_ratio": predict_ratio, "page_faults_per_pass": score_faults},
        "targets": TARGETS,
        "targets_met": met,
    }
    return finish(args, payload)


if __name__ == "__main__":
    main()
