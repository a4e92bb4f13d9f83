"""OGPSA: safety alignment as continual learning, with the training gradient projected off a general-capability
reference subspace (Sun et al., arXiv 2602.07892, 2026; method note ogpsa.md; the basis and projection maths in
:mod:`clbench.subspace.reference`).

Each optimizer step, after backward (and accumulation, and any all-reduce) and **before** clipping and the
optimizer, the gradient g of every trainable tensor is replaced by g̃ = (I − UᵀU) g, U an orthonormal basis of the
mean gradients of the reference losses L_1 … L_m at the current θ (ogpsa.md §2). The step is then the steepest
descent of the training loss that leaves every reference loss unchanged to first order (under plain SGD; Adam's
per-coordinate scaling breaks that guarantee, as ogpsa.md §10 notes). The reference data are never trained on.

**Reference sets** are named datasets of the stream (``Stream.references``): ``ref_sets`` names them, and the
first ``ref_samples`` samples of each (in their order, as the code takes them) give that set's mean gradient: the
mean over batches of the training batch size of each batch's mean loss (``model.likelihood_loss``: the
answer-token cross-entropy of a language model; of a preference set, over the chosen and the rejected answers,
the code's reference objective of its DPO stage), taken with ``torch.autograd.grad`` in train mode, so the
``.grad`` buffers, the parameters and the optimizer state are untouched, and with the random state forked, so a
build draws none of the training's random numbers.

**Refresh**: the bases are built at the start of each experience (step 0, at the experience's starting θ: a new
stage builds fresh bases, nothing carried over) and again after every ``refresh_every`` optimizer steps (at steps
K, 2K, …, at the θ those steps reached: the code's ``on_step_end`` rule), counted by this strategy per call of
:meth:`project` (one per optimizer step).

Logged per experience: ``ogpsa/cos_g_S`` (mean over steps of ‖UᵀUg‖/‖g‖, the cosine between g and the reference
subspace, before projection), ``ogpsa/removed`` (mean ‖g − g̃‖/‖g‖), ``ogpsa/ref_loss/<set>`` (the reference
losses at the last build), ``ogpsa/refreshes`` and ``ogpsa/refresh_s`` (mean seconds a build took),
``ogpsa/basis_floats`` (the floats the bases hold: m × the trainable size, per tensor).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from clbench.config import StrategyConfig, check
from clbench.streams.batches import Batch, batch_len, map_batch
from clbench.subspace.reference import MODES, ReferenceBasis, project_gradients, reference_basis
from strategies import register
from strategies.base import Strategy

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams import BatchSource

GRANULARITIES = ("per_tensor", "global")
BASES = ("mean", "svd")


@dataclass
class OGPSAConfig(StrategyConfig):
    """OGPSA's keys (the code's values, ogpsa.md §3, are the defaults of its SFT stage).

    Attributes:
        ref_sets: names of the stream's reference sets (``Stream.references``); the code uses 2 in its SFT stage
            and 1 in its DPO stage, and drops more silently; here any number spans the subspace (``threshold``
            mode takes exactly one). One list for every experience, or a list of lists, one per experience
            (SFT→DPO at the code's choice: ``[[ultrafeedback_sft_200, halueval_sft_200], [ultrafeedback_dpo]]``).
        ref_samples: the first samples of each set that its mean gradient is taken over (code: 200).
        refresh_every: K, optimizer steps between builds of the bases (code: 30 for SFT, 5 for DPO): one value for
            every experience, or one per experience (SFT→DPO at the code's values: ``[30, 5]``, or ``[30, 30, 5]``
            after a stand-in's pre-training); a list of another length than the stream is refused.
        mode: ``orthogonal`` (code: g − UᵀUg), ``plane`` (UᵀUg), ``threshold`` (one set: remove u only where
            ⟨g, u⟩ < 0, else scale g by ``scale``), ``none`` (no projection, no builds: the plain run).
        granularity: ``per_tensor`` (code: a basis per trainable tensor) or ``global`` (one of all of them).
        basis: ``mean`` (code: Gram–Schmidt of the sets' mean gradients, rank ≤ m) or ``svd`` (the top ``rank``
            singular directions of the per-batch reference gradients).
        rank: the ``svd`` basis's rank.
        scale: ``threshold`` mode's factor on a gradient that does not point against the reference.
        project_from: the first experience projected; earlier ones train plainly (an offline stand-in's general
            pre-training, e.g. ``safety_toy``'s experience 0: there is no capability to protect yet). 0: every
            stage, as in the paper.
    """

    ref_sets: Any = field(default_factory=list)
    ref_samples: int = 200
    refresh_every: Any = 30
    mode: str = "orthogonal"
    granularity: str = "per_tensor"
    basis: str = "mean"
    rank: int = 2
    scale: float = 1.0
    project_from: int = 0

    def validate(self) -> None:
        check(self.mode in (*MODES, "none"), "strategy.mode", f"'{self.mode}'; one of {[*MODES, 'none']}")
        for sets in _ref_schedule(self.ref_sets):
            check(self.mode == "none" or len(sets) >= 1, "strategy.ref_sets",
                  "[] names no reference set; name the stream's general-capability sets, e.g. [arithmetic, recall]")
            check(len(set(sets)) == len(sets), "strategy.ref_sets", f"{sets} repeats a set")
            check(self.mode != "threshold" or len(sets) == 1, "strategy.ref_sets",
                  f"{sets}; mode 'threshold' projects off one reference direction: name exactly one set")
        check(isinstance(self.ref_samples, int) and self.ref_samples >= 1, "strategy.ref_samples",
              f"{self.ref_samples}; must be an integer >= 1")
        _refresh_steps(self.refresh_every)
        check(self.granularity in GRANULARITIES, "strategy.granularity",
              f"'{self.granularity}'; one of {list(GRANULARITIES)}")
        check(self.basis in BASES, "strategy.basis", f"'{self.basis}'; one of {list(BASES)}")
        check(isinstance(self.rank, int) and self.rank >= 1, "strategy.rank", f"{self.rank}; must be >= 1")
        check(self.scale >= 0, "strategy.scale", f"{self.scale}; must be >= 0")
        check(isinstance(self.project_from, int) and self.project_from >= 0, "strategy.project_from",
              f"{self.project_from}; must be an experience index >= 0")


def _ref_schedule(value: Any) -> list[list[str]]:
    """``strategy.ref_sets`` as one list of names per entry: ``[a, b]`` → ``[[a, b]]`` (every experience), a
    list of lists as it is.

    Raises:
        ConfigError: neither a list of names nor a list of lists of names.
    """
    values = list(value) if isinstance(value, list | tuple) else None
    if values is not None and all(isinstance(v, str) for v in values):
        return [values]
    check(values is not None and len(values) >= 1 and all(isinstance(v, list | tuple) and
                                                         all(isinstance(n, str) for n in v) for v in values),
          "strategy.ref_sets", f"{value}; give a list of reference-set names, or one such list per experience")
    assert values is not None
    return [list(v) for v in values]


def _refresh_steps(value: Any) -> list[int]:
    """``strategy.refresh_every`` as a list (one value, or one per experience).

    Raises:
        ConfigError: a value that is not an integer >= 1, or an empty list.
    """
    values = list(value) if isinstance(value, list | tuple) else [value]
    check(len(values) >= 1 and all(type(v) is int and v >= 1 for v in values), "strategy.refresh_every",
          f"{value}; give an integer >= 1 (optimizer steps between builds of the bases), or one per experience")
    return values


def _first(source: BatchSource, n: int, batch_size: int) -> Iterator[Batch]:
    """The first ``n`` samples of ``source`` in its order, in batches of ``batch_size`` (the last partial)."""
    left = n
    for batch in source.batches(batch_size, shuffle=False):
        size = batch_len(batch)
        if size >= left:
            yield map_batch(batch, lambda v, k=left: v[:k]) if size > left else batch
            return
        yield batch
        left -= size


def _fresh_stats() -> dict[str, Any]:
    """An experience's statistics before its first step."""
    return {"cos": 0.0, "n": 0, "refreshes": 0, "refresh_s": 0.0, "ref_loss": {}}


@register("ogpsa")
class OGPSA(Strategy):
    """Gradient projection off the reference subspace, refreshed every ``refresh_every`` steps."""

    config_class = OGPSAConfig

    def __init__(self, cfg: OGPSAConfig) -> None:
        super().__init__(cfg)
        self.cfg: OGPSAConfig = cfg
        self.basis: ReferenceBasis = {}
        self.built_at = -1  # the step count at the last build (-1: none in this experience)
        self.steps = 0  # optimizer steps of this experience (calls of project)
        self.refs: dict[str, BatchSource] = {}
        self._stats: dict[str, Any] = _fresh_stats()
        self._device_sums: list[torch.Tensor] = []  # per step (‖g‖², ‖UᵀUg‖²), read once per experience
        self._params: dict[str, torch.nn.Parameter] = {}
        self._every: list[int] = []  # K of each experience
        self._sets: list[list[str]] = []  # the reference sets of each experience

    # -- set-up -------------------------------------------------------------------------------------------------

    def setup(self, ctx: Context) -> None:
        steps, T = _refresh_steps(self.cfg.refresh_every), ctx.n_experiences
        check(len(steps) in (1, T), "strategy.refresh_every",
              f"{len(steps)} values for {T} experiences; give one value, or one per experience")
        self._every = steps * T if len(steps) == 1 else steps
        sets = _ref_schedule(self.cfg.ref_sets)
        check(len(sets) in (1, T), "strategy.ref_sets",
              f"{len(sets)} lists for {T} experiences; give one list of names, or one per experience")
        self._sets = sets * T if len(sets) == 1 else sets
        if self.cfg.mode == "none":
            return
        available = getattr(ctx.stream, "references", {})
        for name in dict.fromkeys(n for names in self._sets for n in names):
            check(name in available, "strategy.ref_sets",
                  f"'{name}' is not a reference set of benchmark '{ctx.stream.spec.name}'; it has "
                  f"{sorted(available) or 'none'}")
            self.refs[name] = ctx.sources(available[name])
            check(len(self.refs[name]) > 0, "strategy.ref_sets", f"reference set '{name}' is empty")

    def before_experience(self, ctx: Context) -> None:
        self.built_at = -1  # a new stage builds fresh bases at its first step

    def attach(self, ctx: Context) -> None:
        """Count steps from ``ctx.step`` (0, or where a resumed experience stopped); fresh statistics."""
        self.steps = ctx.step
        self._stats, self._device_sums = _fresh_stats(), []
        self._params = self._trainable(ctx)  # fixed within an experience; walking the model each step costs

    # -- the step -----------------------------------------------------------------------------------------------

    def _trainable(self, ctx: Context) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in ctx.module.named_parameters() if p.requires_grad}

    def _active(self, ctx: Context) -> bool:
        return self.cfg.mode != "none" and ctx.experience >= self.cfg.project_from

    @torch.no_grad()
    def project(self, ctx: Context) -> None:
        if not self._active(ctx):
            return
        if self.steps % self._every[ctx.experience] == 0 and self.built_at != self.steps:
            with torch.enable_grad():
                self.build(ctx)
        grads = {n: p.grad for n, p in self._params.items() if p.grad is not None}
        total, inside = project_gradients(grads, self.basis, self.cfg.mode, self.cfg.scale)
        self._device_sums.append(torch.stack([total, inside]))
        self.steps += 1

    def build(self, ctx: Context) -> None:
        """The bases at the current θ from the reference sets' gradients (:attr:`basis`), leaving the parameters,
        their ``.grad``, the optimizer and the random state as they were."""
        start = time.perf_counter()
        params = self._trainable(ctx)
        names, tensors = list(params), list(params.values())
        per_set: list[dict[str, torch.Tensor]] = []
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for name in self._sets[ctx.experience]:
                batches = list(_first(self.refs[name], self.cfg.ref_samples, ctx.batch_size))
                mean = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
                loss_sum = 0.0
                for batch in batches:
                    loss = ctx.module.likelihood_loss(batch)
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    loss_sum += float(loss.detach())
                    row = {n: torch.zeros_like(mean[n]) if g is None else g.float()  # unused by the loss: 0
                           for n, g in zip(names, grads, strict=True)}
                    if self.cfg.basis == "svd":  # the svd variant's rows: one per batch
                        per_set.append(row)
                    for n in names:
                        mean[n] += row[n] / len(batches)
                if self.cfg.basis == "mean":
                    per_set.append(mean)
                self._stats["ref_loss"][name] = loss_sum / len(batches)
        self.basis = reference_basis(per_set, self.cfg.granularity, self.cfg.basis, self.cfg.rank)
        self.built_at = self.steps
        self._stats["refreshes"] += 1
        self._stats["refresh_s"] += time.perf_counter() - start

    # -- logging and state ----------------------------------------------------------------------------------------

    def diagnostics(self) -> dict[str, float]:
        if self.cfg.mode == "none" or not self._stats["refreshes"]:  # off, or an experience it did not project
            return {}
        if self._device_sums:
            sums = torch.stack(self._device_sums).double().cpu()  # one read per experience
            ratio = (sums[:, 1] / sums[:, 0].clamp_min(1e-30)).clamp(0, 1).sqrt()
            self._stats["cos"], self._stats["n"] = float(ratio.mean()), len(ratio)
            self._device_sums = []
        stats = self._stats
        out = {"ogpsa/cos_g_S": stats["cos"], "ogpsa/refreshes": float(stats["refreshes"]),
               "ogpsa/refresh_s": stats["refresh_s"] / max(stats["refreshes"], 1),
               "ogpsa/basis_floats": float(sum(U.numel() for U in self.basis.values()))}
        if self.cfg.mode == "orthogonal":
            out["ogpsa/removed"] = stats["cos"]  # ‖g − g̃‖ = ‖UᵀUg‖ for the orthogonal projection
        out |= {f"ogpsa/ref_loss/{k}": v for k, v in stats["ref_loss"].items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"basis": {k: v.cpu() for k, v in self.basis.items()}, "built_at": self.built_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.basis, self.built_at = dict(state["basis"]), state["built_at"]

