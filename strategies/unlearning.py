"""What the unlearning methods share (``grad_ascent``, ``grad_diff``, ``npo``, ``refusal_ft``, ``o3``): the
language-model check, ``unlearn_from``, the retain term and relabelled forget sets.

**Before the first request** (experiences ``< unlearn_from``, e.g. ``fictitious_facts``' "learn" experience 0,
where the model learns what it will be asked to forget) a baseline trains plainly: L = NLL.

**Retain term** (the baselines with a ``retain_weight``): w_r · NLL(B_r) with B_r a batch of
``retain_batch_size`` samples drawn from the stream's reference set ``retain_set`` (``Stream.references``), one
batch per training batch, from a generator seeded by (seed, experience, epoch), so a resumed run draws the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clbench.config import ConfigError, StrategyConfig, check
from clbench.models.lm import LanguageModel
from clbench.streams.text import TextSample, TextSamples, make_text_dataset
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams import BatchSource
    from clbench.streams.batches import Batch

LossFn = Callable[["Batch"], torch.Tensor]
_RETAIN_KEY = 21  # randomness of the retain batches, per (experience, epoch)


@dataclass
class UnlearningConfig(StrategyConfig):
    """Keys every unlearning baseline has.

    Attributes:
        unlearn_from: the first experience that is an unlearning request; earlier ones train plainly on the NLL
            (an offline stand-in's "learn" experience 0). 0: every experience unlearns.
    """

    unlearn_from: int = 1

    def validate(self) -> None:
        check(isinstance(self.unlearn_from, int) and self.unlearn_from >= 0, "strategy.unlearn_from",
              f"{self.unlearn_from}; must be an experience index >= 0")


@dataclass
class RetainedConfig(UnlearningConfig):
    """An unlearning baseline with a retain term w_r · NLL(B_r) (module docstring).

    Attributes:
        retain_set: the stream's reference set of retained data (``Stream.references``; ``fictitious_facts``:
            ``retain``); read only when ``retain_weight > 0``.
        retain_weight: w_r (0: no retain term, no retain data read).
        retain_batch_size: retain samples per training batch (null: the training batch size).
    """

    retain_set: str = "retain"
    retain_weight: float = 1.0
    retain_batch_size: int | None = None

    def validate(self) -> None:
        super().validate()
        check(self.retain_weight >= 0, "strategy.retain_weight", f"{self.retain_weight}; must be >= 0")
        check(self.retain_batch_size is None or (isinstance(self.retain_batch_size, int) and
                                                 self.retain_batch_size >= 1),
              "strategy.retain_batch_size", f"{self.retain_batch_size}; must be >= 1 or null (the training batch "
              "size)")


class Unlearning(Strategy):
    """What the unlearning baselines share: a language model only, plain NLL before ``unlearn_from``, and the
    optional retain term. Subclasses define :meth:`objective` for the requests."""

    config_class = UnlearningConfig

    def __init__(self, cfg: UnlearningConfig) -> None:
        super().__init__(cfg)
        self.cfg: UnlearningConfig = cfg
        self.retain: BatchSource | None = None
        self._draws: tuple[tuple[int, int], torch.Generator] | None = None
        self._relabelled: tuple[int, BatchSource] | None = None

    def setup(self, ctx: Context) -> None:
        """Refuse a model that is not a language model, and a stream without the retain set when one is read.

        Raises:
            ConfigError: naming ``model.name`` or ``strategy.retain_set``.
        """
        if not isinstance(ctx.module, LanguageModel):
            raise ConfigError(f"bad value for 'model.name': strategy '{self.name}' unlearns the answers of a language "
                              f"model; {type(ctx.module).__name__} is not one (use model=causal_lm or seq2seq_lm and "
                              "a text stream, e.g. benchmark=fictitious_facts)")
        cfg = self.cfg
        if isinstance(cfg, RetainedConfig) and cfg.retain_weight > 0:
            available = getattr(ctx.stream, "references", {})
            check(cfg.retain_set in available, "strategy.retain_set",
                  f"'{cfg.retain_set}' is not a reference set of benchmark '{ctx.stream.spec.name}' (it has "
                  f"{sorted(available) or 'none'}); use a stream with retained data (benchmark=fictitious_facts) or "
                  "set strategy.retain_weight=0")
            self.retain = ctx.sources(available[cfg.retain_set])
            check(len(self.retain) > 0, "strategy.retain_set", f"reference set '{cfg.retain_set}' is empty")

    def unlearning(self, ctx: Context) -> bool:
        """Whether the current experience is an unlearning request (``>= unlearn_from``)."""
        return ctx.experience >= self.cfg.unlearn_from

    def relabelled(self, ctx: Context, answer: Callable[[int], str]) -> BatchSource:
        """The current experience's training samples with sample k's answer replaced by ``answer(k)`` (a refusal,
        a random label), collated by the model once per experience; a validation split keeps its answers."""
        if self._relabelled is None or self._relabelled[0] != ctx.experience:
            samples = list(ctx.stream.benchmark.train_stream[ctx.experience].dataset)
            relabelled = TextSamples([TextSample(s.prompt, answer(k), s.task, s.group) for k, s in enumerate(samples)],
                                     torch.zeros(len(samples), dtype=torch.int64))
            self._relabelled = (ctx.experience, ctx.sources(make_text_dataset(relabelled, ctx.experience)))
        return self._relabelled[1]

    def retain_batch(self, ctx: Context) -> Batch:
        """``retain_batch_size`` distinct retain samples (all, if the set holds fewer), from a generator seeded by
        (seed, experience, epoch)."""
        assert self.retain is not None and isinstance(self.cfg, RetainedConfig)
        key = (ctx.experience, ctx.epoch)
        if self._draws is None or self._draws[0] != key:
            self._draws = (key, ctx.generator(_RETAIN_KEY, ctx.epoch))
        return self.retain.take(self.cfg.retain_batch_size or ctx.batch_size, generator=self._draws[1])

    def retained(self, ctx: Context, loss: LossFn) -> torch.Tensor | None:
        """w_r · NLL(B_r) on a retain batch (None without a retain term)."""
        if self.retain is None:
            return None
        assert isinstance(self.cfg, RetainedConfig)
        return self.cfg.retain_weight * loss(self.retain_batch(ctx))

    def attach(self, ctx: Context) -> None:
        self._draws = None
