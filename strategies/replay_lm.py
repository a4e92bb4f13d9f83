"""Experience replay for any :class:`~clbench.models.base.ContinualModel`, language models included: a fixed-size
memory of earlier experiences' training samples, replayed beside every training batch.

Avalanche's ``er`` (``strategies/avalanche_baselines.py``) trains with cross-entropy on a classifier's logits and
refuses language models; this one goes through the model's own ``loss(batch)`` only, so it runs on the LMs of
``model=causal_lm`` / ``seq2seq_lm`` (with LoRA or full fine-tuning) as on the classifiers, and never looks inside
a batch.

**Loss.** With B_t the training batch and B_M a batch drawn from the memory M (experience replay, Chaudhry et
al. 2019, "On tiny episodic memories in continual learning", Algorithm 1, whose step is on B_t ∪ B_M):

    L = L(B_t) + w · L(B_M)

a weighted sum of the model's two mean losses (``memory_weight`` = w), not one loss over the concatenated batch:
the batches of different experiences are padded to different widths (a text experience is tokenised and padded
as a whole, some fields on the left), and only the model knows how to pad them, so they are never concatenated.
With w = 1 and |B_M| = |B_t| the gradient is twice that of the mean loss over B_t ∪ B_M for a loss that is a
per-sample mean (for an LM, whose loss is a mean over answer tokens, each batch's tokens weigh within it). The
loss the run logs per epoch includes the memory term.

**Memory: per-task equal share** of ``memory_size`` samples (not a reservoir): after experience t (t + 1
experiences seen) experience j keeps the first ⌈(memory_size − j) / (t + 1)⌉ samples of a random permutation of its
training set (the counts sum to ``memory_size``; earlier experiences shrink, dropping their last rows, so what
stays is still a random subset; an experience with fewer samples keeps all it has). Why not a reservoir over the
stream: (1) it keeps every task in the memory whatever its size (O-LoRA's long benchmark mixes 250 CB samples
with 5,000 Amazon reviews: a reservoir would hold ~20 times more Amazon than CB); (2) each experience's samples
stay in their own collated tensors, the form the model built them in (token ids, masks, labels padded to that
experience's width), so no sample is ever re-padded; (3) the memory is written once at each experience end, from
the finished experience's training set, which is deterministic from the seed. A reservoir filled during training
(ER_Res) is Avalanche's ``er`` with ``storage=reservoir``, for classifiers; the same paper's ring buffer gives each
class an equal slice, as this gives each task one.

**Memory batch.** Each training batch gets one memory batch of ``batch_size_mem`` samples (null: the training
batch size), drawn without replacement from one group of memory rows that can be stacked: the experiences whose
tensors have the same shapes beyond the first dimension (every image experience; text experiences only when
padded to the same width). The group is drawn with probability proportional to its size, so every memory sample
is equally likely to be replayed; on text streams, where each experience is its own group, a step replays one
earlier task (chosen in proportion to its share), which costs one extra forward pass per step instead of one per
stored task. The draws come from a generator seeded by (seed, experience, epoch): a run resumed mid-experience
replays the same memory batches.

The memory lives on the training device and goes into the checkpoint (on the CPU) with the strategy's state, so
a resumed run has the same memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from clbench.config import StrategyConfig, check
from clbench.streams.batches import Batch, batch_len, map_batch
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context

_MEMORY_KEY = 11  # randomness of the samples an experience leaves in the memory
_REPLAY_KEY = 12  # randomness of the memory batches, per epoch


@dataclass
class ReplayLMConfig(StrategyConfig):
    """Experience replay through the model's loss.

    Attributes:
        memory_size: samples the memory holds in all, shared equally by the experiences seen so far.
        batch_size_mem: memory samples replayed with every training batch (null: the training batch size).
        memory_weight: w, the weight of the memory batch's loss beside the training batch's.
    """

    memory_size: int = 200
    batch_size_mem: int | None = None
    memory_weight: float = 1.0

    def validate(self) -> None:
        check(isinstance(self.memory_size, int) and self.memory_size >= 1, "strategy.memory_size",
              f"{self.memory_size}; must be an integer >= 1")
        check(self.batch_size_mem is None or (isinstance(self.batch_size_mem, int) and self.batch_size_mem >= 1),
              "strategy.batch_size_mem", f"{self.batch_size_mem}; must be >= 1 or null (the training batch size)")
        check(self.memory_weight >= 0, "strategy.memory_weight", f"{self.memory_weight}; must be >= 0")


def share(memory_size: int, n_tasks: int) -> list[int]:
    """Per-task equal share: how many of the ``memory_size`` slots experience j of ``n_tasks`` gets,
    ⌈(memory_size − j) / n_tasks⌉ (the first ``memory_size mod n_tasks`` experiences one more; the counts sum to
    ``memory_size`` and never grow as ``n_tasks`` does)."""
    return [(memory_size - j + n_tasks - 1) // n_tasks for j in range(n_tasks)]


def _cat(batches: list[Batch]) -> Batch:
    """Rows of same-structure batches stacked (their tensors agree beyond the first dimension)."""
    first = batches[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in first}  # type: ignore[index]
    return tuple(torch.cat([b[i] for b in batches]) for i in range(len(first)))


def _signature(batch: Batch) -> tuple[Any, ...]:
    """What must agree for two batches' rows to be stacked: structure, and each tensor's trailing shape and dtype."""
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
    return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in items)


@register("replay_lm")
class ReplayLM(Strategy):
    """Experience replay with a per-task equal-share memory, replayed through ``model.loss``."""

    config_class = ReplayLMConfig

    def __init__(self, cfg: ReplayLMConfig) -> None:
        super().__init__(cfg)
        self.cfg: ReplayLMConfig = cfg
        self.memory: list[Batch] = []  # one batch of stored samples per finished experience, in order
        self._groups: list[Batch] = []
        self._draws: tuple[tuple[int, int], torch.Generator] | None = None

    # -- the memory

    def counts(self) -> list[int]:
        """Samples each finished experience holds in the memory."""
        return [batch_len(b) for b in self.memory]

    def _regroup(self, device: torch.device) -> None:
        """Move the memory to ``device`` and stack the experiences whose rows can be stacked."""
        self.memory = [map_batch(b, lambda v: v.to(device)) for b in self.memory]
        groups: dict[tuple[Any, ...], list[Batch]] = {}
        for b in self.memory:
            groups.setdefault(_signature(b), []).append(b)
        self._groups = [_cat(g) if len(g) > 1 else g[0] for g in groups.values()]

    def setup(self, ctx: Context) -> None:
        check(self.cfg.memory_size >= ctx.n_experiences, "strategy.memory_size",
              f"{self.cfg.memory_size}; must be >= the {ctx.n_experiences} experiences of the stream (each keeps a "
              "share)")

    def attach(self, ctx: Context) -> None:
        self._regroup(ctx.device)
        self._draws = None

    @torch.no_grad()
    def after_experience(self, ctx: Context) -> None:
        """Store a random subset of the finished experience's training samples (its equal share) and shrink the
        earlier experiences' to theirs."""
        counts = share(self.cfg.memory_size, len(self.memory) + 1)
        self.memory = [map_batch(b, lambda v, c=c: v[:c]) for b, c in zip(self.memory, counts, strict=False)]
        source = ctx.train_source
        assert source is not None
        g = ctx.generator(_MEMORY_KEY)
        batch = source.take(min(counts[-1], len(source)), generator=g)
        order = torch.randperm(batch_len(batch), generator=g).to(source.device)  # also when take gave them in order
        self.memory.append(map_batch(batch, lambda v: v.index_select(0, order)))
        self._regroup(ctx.device)

    # -- the loss

    def memory_batch(self, ctx: Context, size: int) -> Batch:
        """``size`` distinct memory samples (fewer if the group holds fewer) from one stackable group, the group
        drawn in proportion to its size; from a generator seeded by (seed, experience, epoch)."""
        key = (ctx.experience, ctx.epoch)
        if self._draws is None or self._draws[0] != key:
            self._draws = (key, ctx.generator(_REPLAY_KEY, ctx.epoch))
        g = self._draws[1]
        sizes = torch.tensor([float(batch_len(b)) for b in self._groups])
        group = self._groups[int(torch.multinomial(sizes, 1, generator=g))] if len(self._groups) > 1 else \
            self._groups[0]
        n = batch_len(group)
        idx = torch.randperm(n, generator=g)[:size].to(ctx.device)
        return map_batch(group, lambda v: v.index_select(0, idx))

    def penalty(self, ctx: Context, batch: Batch) -> torch.Tensor | None:
        """w · L(B_M), the model's mean loss on a memory batch (None before any experience has finished)."""
        if not self._groups or self.cfg.memory_weight == 0:
            return None
        memory = self.memory_batch(ctx, self.cfg.batch_size_mem or ctx.batch_size)
        with ctx.fabric.autocast():
            return self.cfg.memory_weight * ctx.module.loss(memory)

    # -- logging and resume

    def diagnostics(self) -> dict[str, float]:
        return {"memory/samples": float(sum(self.counts()))}

    def state_dict(self) -> dict[str, Any]:
        """The memory, one batch of tensors per finished experience, on the CPU."""
        return {"memory": [map_batch(b, lambda v: v.detach().cpu().clone()) for b in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = list(state["memory"])
        self._groups, self._draws = [], None
