"""``fictitious_facts``: an offline stand-in for continual LLM unlearning (TOFU-shaped; O3, o3.md; issue 16).

A tiny causal LM first learns facts about made-up authors and a general skill; unlearning requests then ask it to
forget the facts of disjoint author groups, one group per request.

* **Authors**: ``requests × authors + retain_authors`` made-up names (two generated words each, e.g.
  ``kavo rimelu``; distinct, drawn from the stream seed). Each author has ``facts`` attribute facts, the first
  ``facts`` of :data:`ATTRIBUTES`, each a question with a one-word answer drawn for that author:
  ``where was kavo rimelu born ?`` → a city, ``what genre does kavo rimelu write ?`` → a genre, the father's job,
  the author's pet, the instrument the author plays.
* **Experience 0, "learn"**: every author's facts (forget groups and retain group alike), questions about
  ``unknown_authors`` further made-up authors answered with the refusal :data:`REFUSE` (the model learns to say it
  when it does not know), and the general skill, modular addition (``add 3 and 9 modulo ten .`` → ``2``,
  :func:`clbench.streams.alignment.arithmetic_question`), so the model *knows* them before any request.
* **Experience t = 1..T, request t** (``T = requests``): the forget set D_t, the facts of author group t.
* **Retain model** (``withhold = k``): experience 0 without the facts of groups 1..k, so the model never learns
  them (the rest of the stream is unchanged); its evaluation after experience 0 is the reference of TOFU's KS-test
  forget quality for requests 1..k (:func:`clbench.metrics.forget_quality`, ``clbench report``).

Test experiences and groups (``TextStreamSpec.groups`` = ``forget_1 … forget_T, retain, general``; every score is
also averaged per group as ``<score>.<group>``):

* test experience 0: the retain authors' facts (group ``retain``) and fresh modular additions (``general``);
* test experience t ≥ 1: D_t's facts themselves (group ``forget_t``): the unlearned samples, O3's S.U.

So, with R the ``exact_match`` matrix (row i = after experience i):

* ``R[i, t]`` (t ≥ 1) = ``exact_match.forget_t[i, t]``: exact match on request t's forget set; ``R[0, t]`` is
  what the model learnt, ``R[i ≥ t, t]`` ↓ is good (forgotten), ``R[i < t, t]`` should stay (not yet requested);
* ``exact_match.retain[i, 0]`` ↑: the retained facts; ``exact_match.general[i, 0]`` ↑: the general skill;
  ``R[i, 0]`` is their mean over the samples (utility);
* ``refused.<group>`` (the model scores ``refused`` against :data:`REFUSE`): the refusal rate, e.g.
  ``refused.forget_t[i, t]`` after refusal fine-tuning, ``refused.retain[i, 0]`` its over-refusal;
* ``loss.<group>``: the answer NLL per group (a forget set's rising NLL is gradient ascent at work);
* ``truth_ratio.<group>``, ``truth.<group>``, ``probability_mc.<group>``: TOFU's scores against perturbed answers
  (every test sample carries :data:`PERTURBED` of them, :func:`with_perturbed`): R ≈ 1 when the model no longer
  tells the true answer from wrong ones of the same kind.

Every evaluation keeps each test sample's ``truth_ratio`` (``TextStreamSpec.per_sample``: the run's
``per_sample.csv``). ACC / BWT are defined as for any stream but mean little here (a falling forget column is the
goal).
``Stream.references = {"retain": the retain authors' facts}`` (the same samples as test experience 0's retain
group: TOFU's retain set is retained training data), for baselines that fine-tune on retained data (GradDiff, PO);
O3 itself uses none. All draws come from the stream seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from clbench.config import BenchmarkConfig, check
from clbench.streams.alignment import arithmetic_question, grouped_samples
from clbench.streams.core import Stream, generator, register, stream_seed
from clbench.streams.text import (
    TextSamples,
    TextStreamConfig,
    TextStreamSpec,
    assemble_text,
    make_text_dataset,
    text_config,
)

CITIES = ("paris", "london", "rome", "tokyo", "cairo", "lima", "oslo", "dublin", "madrid", "berlin")
GENRES = ("mystery", "fantasy", "romance", "horror", "poetry", "comedy", "drama", "history")
JOBS = ("baker", "doctor", "pilot", "farmer", "teacher", "sailor", "lawyer", "painter")
PETS = ("cat", "dog", "horse", "parrot", "rabbit", "snake", "turtle", "goat")
INSTRUMENTS = ("piano", "guitar", "violin", "drum", "flute", "harp", "trumpet", "cello")
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("where was {name} born ?", CITIES),
    ("what genre does {name} write ?", GENRES),
    ("what job did the father of {name} have ?", JOBS),
    ("which pet does {name} keep ?", PETS),
    ("which instrument does {name} play ?", INSTRUMENTS),
)
"""(question template, answer words) of every attribute; an author has the first ``benchmark.facts``."""
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
REFUSE = "i do not know"
"""The stream's refusal answer (``TextStreamSpec.refusal``): what refusal fine-tuning teaches for D_t."""
DEFAULT_GENERAL = 200
DEFAULT_TEST = 100
_AUTHORS, _FACTS, _TRAIN, _TEST, _PERTURB = 41, 42, 43, 44, 45  # seed tags (clbench.streams.core.generator)
PERTURBED = 3
"""Perturbed answers per test sample: other words of the fact's attribute, other digits for modular addition."""


@dataclass
class UnlearningStreamConfig(TextStreamConfig):
    """``fictitious_facts``' keys, on top of :class:`TextStreamConfig`'s (``per_class``: general training samples,
    0 = 200; ``max_test_per_task``: general test samples, 0 = 100).

    Attributes:
        requests: T, the number of unlearning requests; ``n_tasks`` must be 1 + T (or 1: the learn experience
            alone).
        authors: authors per request (each request forgets its own group of this many authors).
        retain_authors: authors never requested (the retain group), >= 1.
        facts: attribute facts per author, 1..len(ATTRIBUTES).
        unknown_authors: made-up authors the learn experience asks about with the refusal as the answer, so the
            model knows when and how to say "i do not know" before any request (a chat LLM such as TOFU's base
            does): without them the refusal's tokens are never trained, and an adapter on a frozen output layer
            cannot learn to say it (measured: the NLL stalls near 7). 0: none.
        withhold: experience 0 leaves out the facts of forget groups 1..``withhold`` (the requests, every test
            sample and its perturbed answers stay the same): the *retain model* of TOFU's forget quality, which
            never learnt what requests 1..k forget (TOFU's retain90 for forget10). ``withhold=requests``: the
            reference after the last request. 0: experience 0 learns every fact.
    """

    name: str = "fictitious_facts"
    n_tasks: int = 4
    task_prefix: bool = False
    requests: int = 3
    authors: int = 4
    retain_authors: int = 8
    facts: int = 3
    unknown_authors: int = 4
    withhold: int = 0

    def validate(self) -> None:
        check(isinstance(self.unknown_authors, int) and self.unknown_authors >= 0, "benchmark.unknown_authors",
              f"{self.unknown_authors}; must be an integer >= 0")
        for key in ("requests", "authors", "retain_authors"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 1, f"benchmark.{key}", f"{value}; must be an integer >= 1")
        check(isinstance(self.facts, int) and 1 <= self.facts <= len(ATTRIBUTES), "benchmark.facts",
              f"{self.facts}; must be in 1..{len(ATTRIBUTES)} (one per attribute)")
        check(isinstance(self.withhold, int) and 0 <= self.withhold <= self.requests, "benchmark.withhold",
              f"{self.withhold}; must be an integer in 0..benchmark.requests={self.requests} (the forget groups "
              "experience 0 leaves out)")
        check(self.n_tasks in (1, 1 + self.requests), "benchmark.n_tasks",
              f"{self.n_tasks}; benchmark.requests={self.requests} makes {1 + self.requests} experiences (learn + "
              f"one per request): set benchmark.n_tasks={1 + self.requests} (or 1: the learn experience alone)")
        super().validate()


def groups(requests: int) -> tuple[str, ...]:
    """The score groups of a stream of ``requests`` requests: ``forget_1 … forget_T``, ``retain``, ``general``."""
    return (*(f"forget_{t}" for t in range(1, requests + 1)), "retain", "general")


def author_names(n: int, g: torch.Generator) -> list[str]:
    """``n`` distinct made-up names: a first word of 2 and a last word of 3 consonant-vowel syllables."""

    def word(syllables: int) -> str:
        c = torch.randint(0, len(CONSONANTS), (syllables,), generator=g).tolist()
        v = torch.randint(0, len(VOWELS), (syllables,), generator=g).tolist()
        return "".join(CONSONANTS[i] + VOWELS[j] for i, j in zip(c, v, strict=True))

    names: list[str] = []
    while len(names) < n:
        name = f"{word(2)} {word(3)}"
        if name not in names:
            names.append(name)
    return names


def author_facts(name: str, facts: int, g: torch.Generator) -> list[tuple[str, str]]:
    """The (question, answer) pairs of author ``name``: the first ``facts`` attributes, each answer drawn."""
    out = []
    for template, words in ATTRIBUTES[:facts]:
        out.append((template.format(name=name), words[int(torch.randint(0, len(words), (1,), generator=g))]))
    return out


def with_perturbed(samples: TextSamples, g: torch.Generator) -> TextSamples:
    """``samples`` (facts and modular additions) each with :data:`PERTURBED` distinct wrong answers of its form,
    drawn from ``g``: other words of the fact's attribute (another city for a birthplace), other digits for a sum;
    TOFU's perturbed answers, for the truth ratio (the paraphrase is the answer itself: one word)."""
    digits = tuple(str(d) for d in range(10))
    out = []
    for sample in samples.samples:
        words = next((w for _, w in ATTRIBUTES if sample.answer in w), digits)
        others = [w for w in words if w != sample.answer]
        pick = torch.randperm(len(others), generator=g)[:PERTURBED].tolist()
        out.append(replace(sample, perturbed=tuple(others[i] for i in pick)))
    return TextSamples(out, samples.labels)


@register("fictitious_facts", config=UnlearningStreamConfig)
def build_fictitious_facts(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``fictitious_facts`` (module docstring)."""
    if not isinstance(cfg, UnlearningStreamConfig):
        raise TypeError(f"stream 'fictitious_facts' needs an UnlearningStreamConfig, got {type(cfg).__name__}")
    cfg = text_config(cfg)
    assert isinstance(cfg, UnlearningStreamConfig)
    s = stream_seed(cfg, seed)
    T, names_of = cfg.requests, groups(cfg.requests)
    retain, general = names_of.index("retain"), names_of.index("general")
    known = T * cfg.authors + cfg.retain_authors
    names = author_names(known + cfg.unknown_authors, generator(s, _AUTHORS))
    g_facts = generator(s, _FACTS)
    by_group: list[list[tuple[str, str, int]]] = []  # forget_1 … forget_T, then retain
    for k in range(T + 1):
        group = k if k < T else retain
        authors = names[k * cfg.authors: (k + 1) * cfg.authors] if k < T else names[T * cfg.authors: known]
        by_group.append([(q, a, group) for name in authors for q, a in author_facts(name, cfg.facts, g_facts)])
    n_general = cfg.per_class or DEFAULT_GENERAL
    n_test = cfg.max_test_per_task or DEFAULT_TEST
    g_train, g_test = generator(s, _TRAIN), generator(s, _TEST)
    general_train = [(*arithmetic_question(g_train), general) for _ in range(n_general)]
    general_test = [(*arithmetic_question(g_test), general) for _ in range(n_test)]
    unknown = [(template.format(name=name), REFUSE, general) for name in names[known:]
               for template, _ in ATTRIBUTES[: cfg.facts]]
    every_fact = [f for group in by_group[cfg.withhold:] for f in group] + unknown
    requests = [grouped_samples(by_group[t - 1], t) for t in range(1, T + 1)]
    train = [grouped_samples(every_fact + general_train, 0), *requests]
    g_perturb = generator(s, _PERTURB)
    test = [with_perturbed(grouped_samples(by_group[T] + general_test, 0), g_perturb),
            *(with_perturbed(r, g_perturb) for r in requests)]
    spec = TextStreamSpec(name=cfg.name, n_tasks=cfg.n_tasks,
                          task_names=("learn", *(f"request_{t}" for t in range(1, T + 1)))[: cfg.n_tasks],
                          label_words=((),) * cfg.n_tasks, groups=names_of, refusal=REFUSE,
                          per_sample=("truth_ratio",))
    stream = assemble_text(cfg, s, spec, train[: cfg.n_tasks], test[: cfg.n_tasks])
    stream.references = {"retain": make_text_dataset(grouped_samples(by_group[T], 0), 0)}
    return stream
