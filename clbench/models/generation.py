"""Batched greedy decoding and exact-match scoring (olora.md "Metric": greedy, at most 50 new tokens, exact match
after lower-casing, removing ``string.punctuation`` and collapsing whitespace; articles are kept), and the ROUGE-L
recall of free-text answers (TOFU's answer score, Maini et al. 2024)."""

from __future__ import annotations

import copy
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """``text`` lower-cased, without ``string.punctuation``, its whitespace runs collapsed to one space and
    stripped. Articles stay (unlike SQuAD's normalisation)."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """Per sample, 100 where the normalised prediction equals the normalised reference, else 0 (float64, (n,))."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]
    return torch.tensor(hits, dtype=torch.float64) * 100.0


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """Per sample, ROUGE-L recall in % (float64, (n,)): LCS(prediction, reference) / |reference| over the words of
    the normalised texts (:func:`normalize_answer`; Lin 2004's recall, the score TOFU reports on forget, retain,
    real-author and world-fact answers; no stemming). An empty reference scores 100 for an empty prediction, else
    0.

    Raises:
        ValueError: different numbers of predictions and references.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = []
    for p, r in zip(predictions, references, strict=True):
        pred, ref = normalize_answer(p).split(), normalize_answer(r).split()
        if not ref:
            out.append(100.0 if not pred else 0.0)
            continue
        row = [0] * (len(pred) + 1)  # LCS by dynamic programming, one row at a time
        for word in ref:
            diagonal = 0
            for j, other in enumerate(pred, 1):
                diagonal, row[j] = row[j], diagonal + 1 if word == other else max(row[j], row[j - 1])
        out.append(100.0 * row[-1] / len(ref))
    return torch.tensor(out, dtype=torch.float64)


def greedy_generate(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, stop_ids: Sequence[int], pad_id: int) -> torch.Tensor:
    """The greedily decoded new tokens of a batch, ``(n, m)`` with ``m <= max_new_tokens``.

    ``input_ids`` are the prompts, left-padded for a decoder-only model (so every row's next token follows its
    last prompt token) and padded on either side for an encoder-decoder. Each row stops at its first token in
    ``stop_ids`` (kept in the output); rows that stopped earlier than the longest are padded with ``pad_id``.
    Sampling settings of the model's own generation config (temperature, top-p, ...) are switched off.
    """
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, max_length=None, min_length=0,
                  min_new_tokens=None, eos_token_id=list(stop_ids), pad_token_id=pad_id, temperature=None,
                  top_p=None, top_k=None, repetition_penalty=None, use_cache=True)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    # decoder-only models return prompt + new tokens; encoder-decoders return decoder start + new tokens
    start = 1 if model.config.is_encoder_decoder else input_ids.shape[1]
    return out[:, start:]


def decode_answers(tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, stop_ids: Sequence[int]) -> list[str]:
    """The text of each row of ``tokens`` up to (not including) its first token in ``stop_ids``; special tokens
    and entries < 0 (label padding) are dropped."""
    stops = set(stop_ids)
    texts = []
    for row in tokens.tolist():
        end = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        texts.append(tokenizer.decode([tok for tok in row[:end] if tok >= 0], skip_special_tokens=True))
    return texts
