"""O3: continual LLM unlearning with an orthogonal unlearning LoRA and OOD-gated soft loading (Gao et al.,
"Practical Unlearning for Large Language Models", arXiv 2407.10223; ICLR 2025 as "On Large Language Model
Continual Unlearning"; the method reconstructed from the official code, ../shared/methods/o3.md).

Requests U_1 … U_T arrive as experiences ``unlearn_from``, ``unlearn_from + 1``, …; request t brings only its forget
set D_t. Earlier experiences (a stand-in's "learn" experience) train the whole model plainly on the NLL
(``model.adapter_from`` must equal ``unlearn_from``: the unlearning LoRA starts with the first request).

**1. The unlearning LoRA** (o3.md §1). Request t trains the LoRA on

    L_t = L_unl(D_t) + λ_o · (1/N_L) · Σ_layers Σ_modules Σ_{i<t} ‖Â_i A_curᵀ‖_F²,

with Â_i the frozen snapshot of ``lora_A`` (r × d_in) taken after request i, A_cur the trained one, N_L the number
of decoder layers holding LoRA modules (the sum runs over every wrapped module; the penalty is squared, averaged
over layers, with no L2 term). L_unl is the NLL of D_t relabelled: every answer replaced by a refusal
(``relabel=refusal``: TOFU's ``CL_FT``; the stream's refusal answer by default) or by a label drawn uniformly
from ``labels`` (``random_label``: ScienceQA's random relabelling over A–E; the code's loss also covers the prompt,
here it covers the answer only, as everywhere in clbench). ``adapters=single`` (the code): one adapter trained
through all requests, so at request t > 1 it starts at A_cur = Â_{t−1} and the penalty starts positive;
``per_request`` (O-LoRA's form, o3.md's variant): a fresh adapter per request, the earlier ones frozen and summed.

**2. A detector per request** (o3.md §2–§4; :class:`clbench.ood.RequestDetector`): after request t's LoRA is
trained, an encoder LoRA is trained on D_t's prompts with the contrastive entropy loss through the engine's stage
(``ctx.trainer.stage``), then the local-global layer score, the One-Class SVM and the soft weight map are fitted
on D_t's splits. Only D_t is seen (o3.md's property 5, the strict setting: no checkpoint selection on retained
data, see "Not done").

**3. Soft loading** (o3.md §4–§5). Each test input x gets w(x) = max_i w_i(x) over the detectors of every request
so far (an input of request 1 still loads the LoRA at request T) and every wrapped layer computes
W₀x + w(x)·(α/r)·BAx (:meth:`clbench.models.adapters.LoraAdapters.gated`, fed through :meth:`O3.scored_source`).
``gate=soft`` (the code): w = quantiser(w̃) (``quantiser``: ``scienceqa``, ``tofu`` or a table of rows);
``hard``: w = 1 where w̃ > ``hard_threshold`` for some detector, else 0; ``always``: w ≡ 1, no detector (the LoRA
alone: what the gate protects, o3.md's "forcing w ≡ 1").

**Ablations** (the issue's list): no orthogonality penalty ``lambda_o=0``; no contrastive entropy loss
``detector.epochs=0`` (the pretrained encoder's features; with ``detector.mlm=off``, the default, CEL is the
detector's only loss); hard vs soft gate ``gate=hard``; local-only ``detector.global_score=false``; global-only
``detector.local_score=false``.

**Checkpoint selection** of each detector on retained-distribution data (the code's) is ``select_on``, off by
default: the paper claims no retained data, and with it off the detector sees D_t alone.

**Not done:** MLM with a pretrained head (the offline MiniLM ships none; ``detector.mlm=
train_head`` trains a new one), the loss on the prompt for random relabelling.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clbench.config import ConfigError, check
from clbench.context import hash_seed
from clbench.models.adapters import GATE, LoraAdapters
from clbench.ood import QUANTISERS, DetectorConfig, DetectorEncoder, Quantiser, RequestDetector, max_over_detectors
from clbench.ood.detector import encoder_folder
from clbench.subspace import LayerOverlap
from strategies import register
from strategies.unlearning import Unlearning, UnlearningConfig

if TYPE_CHECKING:
    from clbench.context import Context
    from clbench.streams import BatchSource

ADAPTER_MODES = ("single", "per_request")
RELABELS = ("refusal", "random_label")
GATES = ("soft", "hard", "always")
_FIXED_DETECTOR_KEYS = ("quantiser", "seed")  # set by the strategy's own keys and the run's seed
_DETECTOR_KEY, _LABEL_KEY = 31, 32  # randomness of the detectors and of the random labels


def detector_keys() -> list[str]:
    """The keys ``strategy.detector`` may set (:class:`clbench.ood.DetectorConfig`'s fields but the quantiser,
    which is ``strategy.quantiser``, and the seed, which comes from the run's)."""
    return [f.name for f in fields(DetectorConfig) if f.name not in _FIXED_DETECTOR_KEYS]


def quantiser_of(value: Any) -> Quantiser:
    """``strategy.quantiser``: a published table's name (``scienceqa``, ``tofu``) or a list of rows
    (:meth:`clbench.ood.Quantiser.from_rows`).

    Raises:
        ConfigError: an unknown name or a table the quantiser refuses (naming ``strategy.quantiser``).
    """
    if isinstance(value, str):
        check(value in QUANTISERS, "strategy.quantiser", f"'{value}' is not one of {sorted(QUANTISERS)} (or give a "
              "list of rows {low, high, scale[, power, low_closed, high_closed]})")
        return QUANTISERS[value]
    try:
        return Quantiser.from_rows(list(value or []))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value for 'strategy.quantiser': {e}") from None


def layer_count(names: list[str]) -> int:
    """N_L: the number of distinct layers among wrapped-module names, a layer being a name's prefix up to its
    first numeric component (``…layers.3.self_attn.q_proj`` → ``…layers.3``; a T5's encoder and decoder blocks
    are distinct layers). Names without a numeric component count as one layer."""
    prefixes = set()
    for name in names:
        match = re.match(r"^(.*?\.\d+)(\.|$)", name)
        prefixes.add(match.group(1) if match else "")
    return max(len(prefixes), 1)


@dataclass
class O3Config(UnlearningConfig):
    """O3's keys (o3.md "Hyper-parameters": λ_o 0.1; the detector at ScienceQA's code settings).

    Attributes:
        lambda_o: λ_o, the weight of the orthogonality penalty (0: the no-penalty ablation).
        adapters: ``single`` (one LoRA through every request, the code) or ``per_request`` (summed adapters).
        relabel: L_unl's targets: ``refusal`` (TOFU) or ``random_label`` (ScienceQA).
        refusal: the refusal answer (null: the stream's).
        labels: the answers ``random_label`` draws from, uniformly (ScienceQA: A–E).
        gate: ``soft`` (quantised detector weights), ``hard`` (0/1 at ``hard_threshold``) or ``always`` (w ≡ 1).
        hard_threshold: w̃ above which ``gate=hard`` loads the LoRA, in (σ(−2), σ(8)) ≈ (0.119, 0.9997).
        quantiser: ``scienceqa`` (the code's default), ``tofu``, or a list of rows.
        detector: :class:`clbench.ood.DetectorConfig` keys over the code's ScienceQA settings (``encoder``,
            ``max_length``, ``epochs``, ``lr``, ``nu``, ``local_score``, ``global_score``, …).
        select_on: a reference set of the stream (``Stream.references``, e.g. ``fictitious_facts``' ``retain``)
            whose prompts serve as the OOD validation data of the detectors' checkpoint selection (the code's,
            on retained-distribution data); null (default): no selection, the detector sees D_t only (the
            paper's no-retained-data claim, o3.md property 5). Logged as ``o3_detector_selected_epoch/<t>``.
    """

    lambda_o: float = 0.1
    adapters: str = "single"
    relabel: str = "refusal"
    refusal: str | None = None
    labels: list[str] = field(default_factory=lambda: ["A", "B", "C", "D", "E"])
    gate: str = "soft"
    hard_threshold: float = 0.5
    quantiser: Any = "scienceqa"
    detector: dict[str, Any] = field(default_factory=dict)
    select_on: str | None = None

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.lambda_o, int | float) and math.isfinite(self.lambda_o) and self.lambda_o >= 0,
              "strategy.lambda_o", f"{self.lambda_o}; must be >= 0 (0: no orthogonality penalty)")
        check(self.adapters in ADAPTER_MODES, "strategy.adapters", f"'{self.adapters}' is not one of "
              f"{list(ADAPTER_MODES)}")
        check(self.relabel in RELABELS, "strategy.relabel", f"'{self.relabel}' is not one of {list(RELABELS)}")
        check(self.refusal is None or bool(self.refusal.strip()), "strategy.refusal",
              "empty; give a refusal sentence, or null (the stream's refusal answer)")
        check(self.relabel != "random_label" or (len(self.labels) >= 2 and all(str(a).strip() for a in self.labels)),
              "strategy.labels", f"{self.labels}; random_label needs >= 2 non-empty answers")
        check(self.gate in GATES, "strategy.gate", f"'{self.gate}' is not one of {list(GATES)}")
        check(1 / (1 + math.exp(2)) < self.hard_threshold < 1 / (1 + math.exp(-8)), "strategy.hard_threshold",
              f"{self.hard_threshold}; must be in (0.119, 0.9997), the range of the soft weight w̃")
        self.detector_config()

    def detector_config(self) -> DetectorConfig:
        """The detector's settings: ``detector`` over :class:`DetectorConfig`'s defaults, with ``quantiser``.

        Raises:
            ConfigError: an unknown key (listing the valid ones) or a value out of range, naming
                ``strategy.detector.<key>``; a bad ``quantiser``.
        """
        values = dict(self.detector or {})
        unknown = sorted(set(values) - set(detector_keys()))
        check(not unknown, f"strategy.detector.{unknown[0] if unknown else ''}",
              f"unknown key; valid keys: {detector_keys()}")
        cfg = DetectorConfig(**values, quantiser=quantiser_of(self.quantiser))
        try:
            cfg.validate()
        except ValueError as e:  # "detector <key>=<value>: must be …"
            key = str(e).split("=", 1)[0].removeprefix("detector ")
            raise ConfigError(f"bad value for 'strategy.detector.{key}': {e}") from None
        return cfg


@register("o3")
class O3(Unlearning):
    """One unlearning LoRA kept orthogonal to its earlier snapshots, a detector per request, gated inference."""

    config_class = O3Config

    def __init__(self, cfg: O3Config) -> None:
        super().__init__(cfg)
        self.cfg: O3Config = cfg
        self.detector_cfg = cfg.detector_config()
        self.refusal = ""
        self.adapters: list[str] = ["default"]
        self.snapshots: list[dict[str, torch.Tensor]] = []  # Â_i per request, by wrapped layer
        self.detectors: list[RequestDetector] = []
        self.encoder: DetectorEncoder | None = None
        self.n_layers = 1
        self._overlap = LayerOverlap(())
        self._weights: dict[tuple[str, int], np.ndarray] = {}  # (detector, test experience) → w (or w̃ for hard)
        self._scores: dict[str, float] = {}
        self._saved: dict[str, Any] | None = None
        self.select_texts: list[str] | None = None

    # ---------------------------------------------------------------------------------------------- checks
    def _model(self, ctx: Context) -> LoraAdapters:
        module = ctx.module
        assert isinstance(module, LoraAdapters)
        return module

    def setup(self, ctx: Context) -> None:
        """Refuse what would fail later: a model without LoRA or whose LoRA does not start with the first request,
        a stream without a refusal (``relabel=refusal``), a forget set too small for a detector's split.

        Raises:
            ConfigError: naming ``model.adapter``, ``model.adapter_from``, ``strategy.refusal``,
                ``strategy.detector.encoder`` (no model in that folder) or ``strategy.detector.train_fraction``.
        """
        super().setup(ctx)
        module = ctx.module
        check(getattr(module, "lora_config", None) is not None, "model.adapter",
              "none; O3 unlearns with a LoRA adapter: set model.adapter=lora")
        start = self.cfg.unlearn_from
        check(getattr(module, "adapter_from", 0) == start, "model.adapter_from",
              f"{getattr(module, 'adapter_from', 0)}; O3's unlearning LoRA starts with the first request: set "
              f"model.adapter_from={start} (= strategy.unlearn_from)")
        if self.cfg.relabel == "refusal":
            refusal = self.cfg.refusal or getattr(ctx.stream.spec, "refusal", None)
            check(refusal is not None, "strategy.refusal", f"null, and benchmark '{ctx.stream.spec.name}' has no "
                  "refusal answer; give one, e.g. strategy.refusal='i do not know', or use relabel=random_label")
            assert refusal is not None
            self.refusal = refusal
        if self.cfg.gate != "always":
            try:  # the encoder loads after the first request has trained: a missing one must fail now
                encoder_folder(self.detector_cfg.encoder)
            except FileNotFoundError as err:
                raise ConfigError(f"bad value for 'strategy.detector.encoder': {err}") from None
            probe = RequestDetector(self._encoder(ctx), self.detector_cfg, "probe")  # loads nothing
            for e in range(start, ctx.n_experiences):
                try:
                    probe.split_texts(len(ctx.stream.benchmark.train_stream[e].dataset))
                except ValueError as err:
                    raise ConfigError(f"bad value for 'strategy.detector.train_fraction': request {e - start + 1} "
                                      f"(experience {e}): {err}") from None
        if self.cfg.select_on is not None:
            available = getattr(ctx.stream, "references", {})
            check(self.cfg.select_on in available, "strategy.select_on",
                  f"'{self.cfg.select_on}' is not a reference set of benchmark '{ctx.stream.spec.name}' (it has "
                  f"{sorted(available) or 'none'}); name one, or null (no checkpoint selection)")
            self.select_texts = [s.prompt for s in available[self.cfg.select_on]]
            check(len(self.select_texts) > 0, "strategy.select_on", f"reference set '{self.cfg.select_on}' is empty")
        names = list(self._model(ctx).lora_factors("default"))
        self.n_layers = layer_count(names)

    def _encoder(self, ctx: Context) -> DetectorEncoder:
        if self.encoder is None:
            self.encoder = DetectorEncoder(self.detector_cfg.encoder, self.detector_cfg.mlm == "train_head",
                                           ctx.device)
        return self.encoder

    def request(self, ctx: Context) -> int:
        """The current request's index, 0 for the first (``ctx.experience − unlearn_from``)."""
        return ctx.experience - self.cfg.unlearn_from

    # ---------------------------------------------------------------------------------------------- training
    def before_experience(self, ctx: Context) -> None:
        """``per_request``: from the second request on, a fresh adapter beside the frozen earlier ones."""
        r = self.request(ctx)
        if r >= 1 and self.cfg.adapters == "per_request":
            model = self._model(ctx)
            model.add_adapter(f"request{r + 1}")
            self.adapters.append(f"request{r + 1}")
            model.use_adapters(self.adapters, trainable=self.adapters[-1:])

    def attach(self, ctx: Context) -> None:
        """The penalty's operands: per wrapped layer the stacked snapshots [Â_1; …; Â_{t−1}] and the trained A."""
        if not self.unlearning(ctx):
            return
        current = self._model(ctx).lora_factors(self.adapters[-1])
        self._overlap = LayerOverlap((torch.cat([s[layer] for s in self.snapshots], 0).to(A.device), A)
                                     for layer, (A, _) in current.items() if self.snapshots)

    def train_source(self, ctx: Context) -> BatchSource:
        """On a request, D_t relabelled (a refusal, or a label drawn per sample from a generator seeded by the
        experience); before ``unlearn_from``, the experience's own source."""
        if not self.unlearning(ctx):
            return super().train_source(ctx)
        if self.cfg.relabel == "refusal":
            return self.relabelled(ctx, lambda k: self.refusal)
        n = len(ctx.stream.benchmark.train_stream[ctx.experience].dataset)
        draws = torch.randint(len(self.cfg.labels), (n,), generator=ctx.generator(_LABEL_KEY)).tolist()
        return self.relabelled(ctx, lambda k: str(self.cfg.labels[draws[k]]))

    def orthogonality(self) -> torch.Tensor:
        """(1/N_L) · Σ_layers Σ_modules Σ_{i<t} ‖Â_i A_curᵀ‖_F² (o3.md §1; 0 at the first request)."""
        return self._overlap("squared") / self.n_layers

    def penalty(self, ctx: Context, batch: Any) -> torch.Tensor | None:
        if not self.unlearning(ctx) or not self.snapshots or self.cfg.lambda_o == 0:
            return None
        return self.cfg.lambda_o * self.orthogonality()

    def after_experience(self, ctx: Context) -> None:
        """After request t: the penalty's value, the snapshot Â_t of the trained A's, and request t's detector
        (``gate`` soft or hard) fitted on D_t's prompts through the engine's stage."""
        if not self.unlearning(ctx):
            return
        r = self.request(ctx)
        with torch.no_grad():
            self._scores[f"o3_orth/{r + 1}"] = float(self.orthogonality()) if self.snapshots else 0.0
        self.snapshots.append({layer: A.detach().cpu().clone()
                               for layer, (A, _) in self._model(ctx).lora_factors(self.adapters[-1]).items()})
        if self.cfg.gate != "always":
            texts = [s.prompt for s in ctx.stream.benchmark.train_stream[ctx.experience].dataset]
            cfg = DetectorConfig(**{f.name: getattr(self.detector_cfg, f.name) for f in fields(DetectorConfig)
                                    if f.name != "seed"}, seed=hash_seed(ctx.seed, _DETECTOR_KEY, r))
            detector = RequestDetector(self._encoder(ctx), cfg, f"request{r + 1}")
            losses = detector.fit(texts, ctx.trainer.stage, ctx, key=_DETECTOR_KEY, select_on=self.select_texts)
            self.detectors.append(detector)
            self._scores |= {f"o3_detector_loss/{r + 1}": losses[-1]} if losses else {}
            if detector.selected_epoch is not None:
                self._scores[f"o3_detector_selected_epoch/{r + 1}"] = float(detector.selected_epoch)
                self._scores[f"o3_detector_selection_acc/{r + 1}"] = max(detector.selection)

    # ---------------------------------------------------------------------------------------------- inference
    def gate_weights(self, ctx: Context, task: int) -> np.ndarray:
        """w(x) of every sample of test experience ``task``: the max over the detectors so far of their weights
        (soft: quantised; hard: 1 where w̃ > ``hard_threshold``); all ones for ``gate=always`` once a request was
        trained, all zeros before (the LoRA is still B = 0 then: the same model)."""
        samples = list(ctx.stream.benchmark.test_stream[task].dataset)
        if self.cfg.gate == "always":
            return np.full(len(samples), 1.0 if self.snapshots else 0.0)
        prompts = [s.prompt for s in samples]
        per_detector = []
        for det in self.detectors:
            key = (det.name, task)
            if key not in self._weights:  # a fitted detector never changes: its weights on a test set neither
                self._weights[key] = (det.weights(prompts) if self.cfg.gate == "soft"
                                      else (det.soft_weights(prompts) > self.cfg.hard_threshold).astype(np.float64))
            per_detector.append(self._weights[key])
        return max_over_detectors(per_detector, len(prompts))

    def scored_source(self, ctx: Context, task: int, source: BatchSource) -> BatchSource:
        """``source`` with each sample's w(x) (:meth:`gate_weights`) as :data:`~clbench.models.adapters.GATE`."""
        w = self.gate_weights(ctx, task)
        self._scores[f"o3_gate_mean/{task}"] = float(w.mean()) if w.size else 0.0
        self._scores[f"o3_gate_loaded/{task}"] = float((w > 0).mean() * 100) if w.size else 0.0
        with_fields = getattr(source, "with_fields", None)
        if with_fields is None:
            raise ConfigError(f"strategy 'o3' gates a language model's text batches; benchmark "
                              f"'{ctx.stream.spec.name}' gives {type(source).__name__}")
        return with_fields(**{GATE: torch.as_tensor(w, dtype=torch.float32, device=ctx.device)})

    def diagnostics(self) -> dict[str, float]:
        return dict(self._scores)

    # ---------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters), "snapshots": self.snapshots, "scores": dict(self._scores),
                "detectors": [d.state_dict() for d in self.detectors],
                "detector_configs": [d.cfg for d in self.detectors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state
        self.snapshots = [dict(s) for s in state["snapshots"]]
        self._scores = dict(state["scores"])

    def rebuild(self, ctx: Context) -> None:
        """Re-create the per-request adapters (their weights load next) and the fitted detectors."""
        assert self._saved is not None
        model = self._model(ctx)
        self.adapters = model.restore_adapters(["default"], self._saved["adapters"])
        if len(self.adapters) > 1:
            model.use_adapters(self.adapters, trainable=self.adapters[-1:])
        self.detectors = [RequestDetector.from_state(self._encoder(ctx), cfg, det)
                          for cfg, det in zip(self._saved["detector_configs"], self._saved["detectors"], strict=True)]
