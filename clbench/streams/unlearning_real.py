"""O3's three task families on real data (o3.md "Benchmarks and data protocol"; issue 16): ``scienceqa_unlearning``,
``tofu_unlearning`` and ``clinc_unlearning``.

Each is a continual-unlearning stream shaped like the offline stand-in ``fictitious_facts``
(:mod:`clbench.streams.unlearning`): requests arrive one per experience, every sample carries a ``group`` (scored
per group as ``<score>.<group>``, :attr:`~clbench.streams.text.TextStreamSpec.groups`), retained data sits in
``Stream.references["retain"]`` for the baselines that fine-tune on it (GradDiff, PO; O3 reads none), and TOFU has a
refusal answer. Nothing is ever downloaded: every file is read from a flat folder under ``benchmark.data_root``,
and a missing one fails at once (:class:`FileNotFoundError` naming every missing file, its folder and the data set
it comes from) before anything else is read.

**Experiences.** The model arrives fine-tuned (the code's bases: ``gcyzsl/O3_LLAMA2_ScienceQA``,
``locuslab/tofu_ft_llama2-7b``), so there is no "learn" experience: experience ``k`` is request ``k + 1`` and
``n_tasks`` is the number of requests; O3 then needs ``strategy.unlearn_from=0`` and ``model.adapter_from=0``.
(``clinc_unlearning`` has no released base model and offers ``benchmark.learn=true``: experience 0 fine-tunes on
every training utterance, requests follow, ``n_tasks`` = requests + 1, ``unlearn_from=1``.)

**Groups** (T requests; ``R[i, j]`` is the primary ``exact_match`` of test experience ``j`` after experience ``i``):

* ``forget_t``: request t's training samples, the forget set D_t itself (O3's S.U.; cumulative S.U. after request
  i is the sample-weighted mean of ``forget_1..i``), in test experience ``t − 1``;
* ``forget_t_test``: test samples of what request t unlearns but never trained on (ScienceQA / CLINC: the test
  split of its topic / intents, O3's D.U.; TOFU: the held-out 20 % of its new questions), in test experience
  ``t − 1``;
* the utility groups, in test experience 0 (so they are scored after every experience as
  ``<score>.<group>[i, 0]``): ScienceQA ``retained`` (test questions of topics never requested), ``csqa``,
  ``obqa``; TOFU ``retain``, ``real_authors``, ``world_facts``; CLINC ``retained``.

``R[i, 0]`` therefore mixes request 1's samples with the utility groups: read the per-group scores, not R's first
column. The code's R.D. after request i covers every topic not yet unlearned (the future requests' test questions
and ``retained``): its sample-weighted mean of ``forget_j_test[i, j−1]`` (j > i) and ``retained[i, 0]``.

Caps: ``max_train_per_task`` caps each request's forget set (a random subset; the same samples are then its
``forget_t`` test group); ``max_test_per_task`` caps every test-only group (``forget_t_test`` and the utility
groups) to a random subset of that many (0: all); both draw from the stream seed. With
``validation_fraction > 0`` the held-out validation samples stay in ``forget_t`` too. ``per_class``,
``max_words`` and ``task_prefix`` are not used (refused when set).

``scienceqa_unlearning``
------------------------
ScienceQA (Hugging Face ``derek-thomas/ScienceQA``), **image-free questions only** (rows whose ``image`` is
null / empty, as the code's preprocessing keeps them), one request per **topic** (the ``topic`` column, as every
preprocessing script of the code selects rows by ``topic == t``; the ``subject`` column only has three broad
values, natural / social / language science). ``benchmark.requests`` lists the topics in order; the code's five are
biology → physics → chemistry → economics → earth-science, its evaluation script runs the first three (the
default). Request t trains on the topic's training questions (the code's ``train`` split only; ``validation`` is not
read); ``forget_t_test`` is its ``test`` split questions (D.U.); ``retained`` the test questions of every topic not
in ``requests`` (R.D.); ``csqa`` the CommonsenseQA ``validation`` split (the code's "test" set) and ``obqa`` the
OpenBookQA ``test`` split (``benchmark.utility`` picks them; []: neither, and their files are not needed);
``references["retain"]``: the training questions of the topics not in ``requests``.

Prompts, from the code's preprocessing (``preprocess_SQ.py`` / ``preprocess_scienceqa*.py``, format ``CQM-A``):
the Alpaca "no input" template (:data:`ALPACA`) around the instruction
``Context: <hint or N/A>\\nQuestion: <question>\\nOptions: (A) <c1> (B) <c2> …\\n`` (CommonsenseQA and
OpenBookQA: ``Question: <question or question_stem>\\nOptions: (<label>) <text> …\\n``, labels from the data), and
the answer ``Answer: The answer is <letter>.`` (the code's output, "Answer: " included: the fine-tuned base model
generates it after ``### Response:``). The code scores the letter matched by ``The answer is ([A-Z]).`` in 128 new
tokens; clbench scores exact match of the whole answer (the same when the model stops after it).

Files, under ``<data_root>/ScienceQA/``: ``train`` and ``test``; ``<data_root>/CommonsenseQA/``: ``validation``;
``<data_root>/OpenBookQA/``: ``test``; each ``<split>.parquet`` (the Hugging Face data set's parquet file of that
split, renamed, with its columns; read with pyarrow) or ``<split>.jsonl`` / ``<split>.json`` (JSON lines or a JSON
list of records with the same columns). Columns read: ScienceQA ``question``, ``choices`` (list of strings),
``answer`` (index), ``hint``, ``topic``, ``image`` (an Image struct, a path or null: only whether it is empty
matters); CommonsenseQA ``question``, ``choices`` (``{label: [...], text: [...]}``), ``answerKey``; OpenBookQA
(configuration ``main``) ``question_stem``, ``choices``, ``answerKey``.

``tofu_unlearning``
-------------------
TOFU (Hugging Face ``locuslab/TOFU``). ``benchmark.requests`` names nested forget splits (default ``forget01 →
forget05 → forget10``): as in the code, request t trains on the questions its split adds to the previous one (the
code keeps forget05's rows of index < 160 and forget10's < 200: the added rows if, as those indices imply, each
smaller set is the larger one's tail; clbench compares the questions instead of trusting positions), and of those
a
random ``forget_fraction`` (0.8, the code's ``forget_ratio``) is trained (``forget_t``), the rest held out
(``forget_t_test``, the code's "unused" forget split). The code draws that split once over the whole nested file
with Python's ``random`` (seed 1000); clbench draws it per request from the stream seed. Utility groups
(``benchmark.utility``): ``retain`` (``retain_perturbed``'s 400 questions, what the code evaluates retained
knowledge on), ``real_authors``, ``world_facts``. ``benchmark.retains`` names one retain split per request (default
``retain99 / retain95 / retain90``, the code's pairs): ``references`` holds each under its name and the last
(retain90: never requested, also the code's detector validation set) as ``references["retain"]``.

Prompt, the code's LLaMA format (``prompt_style=o3``): ``[INST] <question> [\\INST]``, the answer after it
(tokenised apart, so it starts a new word, the code's " " separator). ``[\\INST]`` is the code's spelling; TOFU's
own fine-tuning of ``tofu_ft_llama2-7b`` used ``[/INST]``, available as ``prompt_style=tofu``. Refusal
(:data:`TOFU_REFUSE`, the stream's ``refusal``): the code draws a refusal per sample from a list of 32 polite
refusals (``polite_refusal_responses_tofu.csv``); clbench has one fixed sentence. Exact match of free-text answers
means little: the code scores truth ratio, answer probability, ROUGE-L and the KS-test forget quality, of which
clbench computes ROUGE-L recall (``rouge_l.<group>``) and the length-normalised answer probability
(``probability.<group>``); read them with ``loss.<group>`` (the answers' NLL) and
``refused.<group>`` (refusal rate).

Files, under ``<data_root>/TOFU/``: ``<split>.json`` for every split named (the requests, the retains, and
``retain_perturbed`` / ``real_authors`` / ``world_facts`` for the utility groups): the data set's files, JSON lines
with ``question`` and ``answer`` (``.jsonl`` / ``.parquet`` are accepted too).

``clinc_unlearning``
--------------------
CLINC150 (``data_full.json`` of the GitHub repository clinc/oos-eval: a JSON object whose ``train`` / ``val`` /
``test`` lists hold ``[utterance, intent]`` pairs, 150 intents; the out-of-scope lists and ``val`` are not read).
The code ships loaders for it (``src/ood_data.py``) but no preprocessing or script, so the split into requests is
a reconstruction: the intents are sorted by name and request t forgets the t-th block of
``intents_per_request`` (default 12: the only hint is the code's default path ``clinc_text_12_intent_force``);
``forget_t`` / ``forget_t_test`` are the block's train / test utterances, ``retained`` the test utterances of the
intents never requested, ``references["retain"]`` their training utterances. The file has no domains (they are in
the repository's separate ``domains.json``), so requests are intent blocks, not domains. Prompt (a
reconstruction): ``Utterance: <text>\\nIntent:`` → the intent's name. The code's base model (``./llama2_clsall``)
is not released: ``learn=true`` adds the fine-tuning experience 0. File: ``<data_root>/CLINC150/data_full.json``.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import torch

from clbench.config import BenchmarkConfig, check
from clbench.streams.alignment_real import read_records
from clbench.streams.core import Stream, generator, register, stream_seed
from clbench.streams.text import (
    TextSample,
    TextSamples,
    TextStreamConfig,
    TextStreamSpec,
    assemble_text,
    make_text_dataset,
    text_config,
)

Row = dict[str, Any]
Item = tuple[str, str, int, int]
"""(prompt, answer, group, label): a sample before it is placed in an experience (label: its stratum for the
validation split)."""
Alternatives = dict[str, tuple[tuple[str, ...], str | None]]
"""prompt -> (perturbed answers, paraphrased answer or None): TOFU's ``*_perturbed`` columns."""

TABLE_EXTS = (".parquet", ".jsonl", ".json")
"""The file forms of a table, in the order they are looked for."""

SCIENCEQA, CSQA, OBQA, TOFU, CLINC = "ScienceQA", "CommonsenseQA", "OpenBookQA", "TOFU", "CLINC150"
"""The folders under ``benchmark.data_root``."""

SCIENCEQA_HF, CSQA_HF, OBQA_HF, TOFU_HF = "derek-thomas/ScienceQA", "tau/commonsense_qa", "allenai/openbookqa", \
    "locuslab/TOFU"
CLINC_SOURCE = "https://github.com/clinc/oos-eval (data/data_full.json)"

SCIENCEQA_TOPICS = ("biology", "physics", "chemistry", "economics", "earth-science")
"""The code's request order (``preprocess_scienceqa_random_labeling.py``, ``train_unlearn_lora.sh``)."""

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
"""The Alpaca "no input" prompt template (the code's ``input`` is always empty)."""

TOFU_REFUSE = "I don't know."
"""``tofu_unlearning``'s refusal answer (the code draws one of 32 polite refusals per sample)."""

TOFU_STYLES = {"o3": "[INST] {question} [\\INST]", "tofu": "[INST] {question} [/INST]"}
"""``prompt_style`` -> the TOFU prompt (the answer follows, tokenised apart)."""

SCIENCEQA_UTILITY = {"csqa": (CSQA, "validation"), "obqa": (OBQA, "test")}
"""ScienceQA's utility sets -> (folder, split)."""

TOFU_UTILITY = {"retain": "retain_perturbed", "real_authors": "real_authors", "world_facts": "world_facts"}
"""TOFU's utility groups -> the split they read."""
PERTURBED_SUFFIX = "_perturbed"

_TRAIN_CAP, _TEST_CAP, _FORGET_SPLIT = 61, 62, 63  # seed tags (clbench.streams.core.generator)


# ------------------------------------------------------------------------------------------------ configs


def _check_names(values: Any, key: str, what: str) -> None:
    """``values`` is a non-empty list of distinct non-empty strings."""
    check(isinstance(values, list | tuple) and len(values) >= 1
          and all(isinstance(v, str) and v.strip() for v in values), key,
          f"{values}; give a non-empty list of {what}")
    check(len(set(values)) == len(values), key, f"{list(values)}; an entry is repeated")


def _check_unused(cfg: TextStreamConfig) -> None:
    """The text keys these streams do not use are left at their defaults."""
    for key, why in (("per_class", "cap training with benchmark.max_train_per_task"),
                     ("max_words", "texts are kept whole")):
        check(getattr(cfg, key) == 0, f"benchmark.{key}",
              f"{getattr(cfg, key)}; not used by {cfg.name} ({why}): leave it at 0")
    check(not cfg.task_prefix, "benchmark.task_prefix",
          f"true; {cfg.name}'s prompts carry no Task:/Dataset: lines: leave it false")


def _check_utility(values: Any, valid: Sequence[str]) -> None:
    check(isinstance(values, list | tuple) and all(v in valid for v in values), "benchmark.utility",
          f"{values}; a list of {list(valid)} (or [])")
    check(len(set(values)) == len(values), "benchmark.utility", f"{list(values)}; an entry is repeated")


def _check_n_tasks(cfg: TextStreamConfig, n: int, why: str) -> None:
    check(cfg.n_tasks == n, "benchmark.n_tasks", f"{cfg.n_tasks}; {why} makes {n} experiences: set "
          f"benchmark.n_tasks={n}")


@dataclass
class ScienceQAUnlearningConfig(TextStreamConfig):
    """``scienceqa_unlearning``'s keys, on top of :class:`TextStreamConfig`'s (module docstring).

    Attributes:
        requests: ScienceQA topics (the ``topic`` column), one request each, in order; ``n_tasks`` must be their
            number. The code's: biology, physics, chemistry, economics, earth-science (its evaluation: the first 3).
        utility: the utility sets scored in test experience 0: ``csqa`` (CommonsenseQA validation), ``obqa``
            (OpenBookQA test); [] reads neither file.
    """

    name: str = "scienceqa_unlearning"
    n_tasks: int = 3
    task_prefix: bool = False
    requests: list[str] = field(default_factory=lambda: list(SCIENCEQA_TOPICS[:3]))
    utility: list[str] = field(default_factory=lambda: list(SCIENCEQA_UTILITY))

    def validate(self) -> None:
        """Raise :class:`~clbench.config.ConfigError` naming ``benchmark.<key>``."""
        _check_names(self.requests, "benchmark.requests", f"ScienceQA topics, e.g. {list(SCIENCEQA_TOPICS)}")
        _check_utility(self.utility, list(SCIENCEQA_UTILITY))
        _check_n_tasks(self, len(self.requests), f"benchmark.requests={list(self.requests)} (one experience each)")
        _check_unused(self)
        super().validate()


@dataclass
class TofuUnlearningConfig(TextStreamConfig):
    """``tofu_unlearning``'s keys, on top of :class:`TextStreamConfig`'s (module docstring).

    Attributes:
        requests: TOFU forget splits, nested, in order (each request forgets what its split adds); ``n_tasks``
            must be their number.
        retains: one retain split per request (the code's pairs), each a reference set under its name; the last
            is also ``references["retain"]``.
        forget_fraction: the share of each request's new questions trained on (the code's ``forget_ratio``
            0.8), in (0, 1]; the rest is its ``forget_t_test`` group.
        prompt_style: ``o3`` (the code's ``[INST] q [\\INST]``) or ``tofu`` (``[INST] q [/INST]``, the base
            model's fine-tuning format).
        utility: the utility groups scored in test experience 0: ``retain`` (``retain_perturbed``),
            ``real_authors``, ``world_facts``.
        truth_ratio: read the ``*_perturbed`` files too (``<request>_perturbed``, ``real_authors_perturbed``,
            ``world_facts_perturbed``) and give every test sample its paraphrased and perturbed answers, for the
            model's ``truth_ratio``, ``truth`` and ``probability_mc`` scores (TOFU's evaluation); false: neither.
    """

    name: str = "tofu_unlearning"
    n_tasks: int = 3
    task_prefix: bool = False
    requests: list[str] = field(default_factory=lambda: ["forget01", "forget05", "forget10"])
    retains: list[str] = field(default_factory=lambda: ["retain99", "retain95", "retain90"])
    forget_fraction: float = 0.8
    prompt_style: str = "o3"
    utility: list[str] = field(default_factory=lambda: list(TOFU_UTILITY))
    truth_ratio: bool = False

    def validate(self) -> None:
        """Raise :class:`~clbench.config.ConfigError` naming ``benchmark.<key>``."""
        _check_names(self.requests, "benchmark.requests", "TOFU forget splits, e.g. [forget01, forget05, forget10]")
        _check_names(self.retains, "benchmark.retains", "TOFU retain splits, e.g. [retain99, retain95, retain90]")
        check(len(self.retains) == len(self.requests), "benchmark.retains",
              f"{list(self.retains)}; give one retain split per request ({len(self.requests)}: "
              f"{list(self.requests)})")
        check(isinstance(self.forget_fraction, int | float) and 0 < self.forget_fraction <= 1,
              "benchmark.forget_fraction", f"{self.forget_fraction}; must be in (0, 1] (the code's 0.8)")
        check(self.prompt_style in TOFU_STYLES, "benchmark.prompt_style",
              f"'{self.prompt_style}' is not one of {list(TOFU_STYLES)}")
        _check_utility(self.utility, list(TOFU_UTILITY))
        _check_n_tasks(self, len(self.requests), f"benchmark.requests={list(self.requests)} (one experience each)")
        _check_unused(self)
        super().validate()


@dataclass
class ClincUnlearningConfig(TextStreamConfig):
    """``clinc_unlearning``'s keys, on top of :class:`TextStreamConfig`'s (module docstring).

    Attributes:
        requests: T, the number of requests; request t forgets the t-th block of intents (sorted by name).
        intents_per_request: intents per request; ``requests × intents_per_request`` must leave at least one
            intent never requested (the ``retained`` group).
        learn: add experience 0, fine-tuning on every training utterance (no released base model knows CLINC);
            ``n_tasks`` must be ``requests + learn``.
    """

    name: str = "clinc_unlearning"
    n_tasks: int = 3
    task_prefix: bool = False
    requests: int = 3
    intents_per_request: int = 12
    learn: bool = False

    def validate(self) -> None:
        """Raise :class:`~clbench.config.ConfigError` naming ``benchmark.<key>``."""
        for key in ("requests", "intents_per_request"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"benchmark.{key}",
                  f"{value}; must be an integer >= 1")
        check(isinstance(self.learn, bool), "benchmark.learn", f"{self.learn}; must be true or false")
        _check_n_tasks(self, self.requests + int(self.learn),
                       f"benchmark.requests={self.requests}" + (" + the learn experience" if self.learn else ""))
        _check_unused(self)
        super().validate()


# ------------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class DataFile:
    """One file a stream reads: ``<data_root>/<folder>/<stem><ext>``, the first of ``exts`` present.

    Attributes:
        folder: the folder under ``benchmark.data_root``.
        stem: the file name without its extension.
        source: where it comes from (named in the missing-file error).
        exts: the accepted extensions, the documented one first.
    """

    folder: str
    stem: str
    source: str
    exts: tuple[str, ...] = TABLE_EXTS

    def path(self, root: str | Path) -> Path | None:
        """The file found under ``root`` (None: none of its forms is there)."""
        for ext in self.exts:
            candidate = Path(root) / self.folder / f"{self.stem}{ext}"
            if candidate.is_file():
                return candidate
        return None

    def expected(self, root: str | Path) -> str:
        """Where the file is looked for, its documented form first."""
        first = str(Path(root) / self.folder / f"{self.stem}{self.exts[0]}")
        return first + (f" (or {' / '.join(self.exts[1:])})" if len(self.exts) > 1 else "")


def check_files(stream: str, root: str | Path, files: Sequence[DataFile]) -> dict[DataFile, Path]:
    """The path of each of ``files`` under ``root``.

    Raises:
        FileNotFoundError: naming every missing file (each with where it comes from) and the data root.
    """
    found = {f: f.path(root) for f in files}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        listed = "; ".join(f"{f.expected(root)} <- {f.source}" for f in missing)
        raise FileNotFoundError(
            f"{stream}: data files missing ({len(missing)}): {listed}. They are read from benchmark.data_root="
            f"{str(Path(root).resolve())!r}, one flat folder per data set; download each from the source named "
            "after it and put it there under that name (clbench never downloads them; "
            "clbench/streams/unlearning_real.py documents the layout).")
    return {f: p for f, p in found.items() if p is not None}


def _hf_split(hf_id: str, split: str, config: str | None = None) -> str:
    where = f"configuration {config!r}, " if config else ""
    return (f"the {split} split of the Hugging Face data set {hf_id} ({where}its parquet file renamed, or exported "
            "as JSON lines)")


def scienceqa_files(utility: Sequence[str]) -> list[DataFile]:
    """The files ``scienceqa_unlearning`` reads: ScienceQA's train and test splits and the utility sets'."""
    files = [DataFile(SCIENCEQA, split, _hf_split(SCIENCEQA_HF, split)) for split in ("train", "test")]
    sources = {"csqa": _hf_split(CSQA_HF, "validation"), "obqa": _hf_split(OBQA_HF, "test", "main")}
    return files + [DataFile(*SCIENCEQA_UTILITY[u], sources[u]) for u in utility]


def perturbed_split(split: str) -> str:
    """The TOFU split holding ``split``'s questions with paraphrased and perturbed answers."""
    return split if split.endswith(PERTURBED_SUFFIX) else split + PERTURBED_SUFFIX


def tofu_files(requests: Sequence[str], retains: Sequence[str], utility: Sequence[str],
               truth_ratio: bool = False) -> list[DataFile]:
    """The files ``tofu_unlearning`` reads (each split once, in order); with ``truth_ratio`` the ``*_perturbed``
    splits of the requests and of the utility groups too."""
    used = [TOFU_UTILITY[u] for u in utility]
    extra = [perturbed_split(x) for x in [*requests, *used]] if truth_ratio else []
    splits = list(dict.fromkeys([*requests, *retains, *used, *extra]))
    return [DataFile(TOFU, s, f"the file {s}.json of the Hugging Face data set {TOFU_HF} (JSON lines)",
                     (".json", ".jsonl", ".parquet")) for s in splits]


CLINC_FILE = DataFile(CLINC, "data_full", CLINC_SOURCE, (".json",))


# ------------------------------------------------------------------------------------------------ reading


def _nonempty(values: Any) -> Any:
    """Per entry of a pyarrow array: not null, and of non-zero length for strings / binaries."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.invert(pc.is_null(values))
    t = values.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = pc.and_(ok, pc.greater(pc.binary_length(values), 0))
    return pc.fill_null(ok, False)


def _image_flags(values: Any) -> list[bool]:
    """Whether each entry of a parquet ``image`` column holds an image: a non-null struct (Hugging Face's Image:
    ``bytes``, ``path``) with a non-empty field, or a non-empty string / binary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(values.type) and values.type.num_fields:
        parts = [_nonempty(pc.struct_field(values, [k])) for k in range(values.type.num_fields)]
        flags = pc.and_(_nonempty(values), reduce(pc.or_, parts))
    else:
        flags = _nonempty(values)
    return [bool(v) for v in pc.fill_null(flags, False).to_pylist()]


def has_image(value: Any) -> bool:
    """Whether a JSON record's ``image`` value holds an image (null, false, '', {} or an object of empty fields:
    none)."""
    if value is None or value is False:
        return False
    if isinstance(value, str | bytes):
        return bool(value.strip())
    if isinstance(value, dict):
        return any(has_image(v) for v in value.values())
    return True


def read_table(path: Path, columns: Sequence[str], image: str | None = None) -> list[Row]:
    """The records of a table file (parquet, JSON lines or a JSON list), with ``columns`` at least; ``image``
    (one of ``columns``) is replaced by whether the record has an image.

    Raises:
        ValueError: a column is missing (naming the file, and the record for JSON), or a JSON file is neither
            form.
        ImportError: a parquet file without pyarrow installed.
    """
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow ships with the environment
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); or give the split "
                              "as JSON lines") from e
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        absent = [c for c in columns if c not in names]
        if absent:
            raise ValueError(f"{path}: no column {absent}; it has {names}; expected {list(columns)}")
        plain = [c for c in columns if c != image]
        rows = table.read(columns=plain).to_pylist()
        if image is not None:
            flags = [f for batch in table.iter_batches(columns=[image], batch_size=512)
                     for f in _image_flags(batch.column(0))]
            for row, flag in zip(rows, flags, strict=True):
                row[image] = flag
        return rows
    rows = read_records(path)
    for i, row in enumerate(rows):
        absent = [c for c in columns if c not in row]
        if absent:
            raise ValueError(f"{path}: record {i} has no {absent}; expected columns {list(columns)}")
        if image is not None:
            row[image] = has_image(row[image])
    return rows


def _string(value: Any, path: Path, i: int, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{path}: record {i} has {column!r} = {value!r:.200}; expected a string")
    return value


def answer_text(letter: str) -> str:
    """The multiple-choice target: the code's output ``Answer: The answer is <letter>.``."""
    return f"Answer: The answer is {letter}."


def _options(labels: Sequence[str], texts: Sequence[str]) -> str:
    return " ".join(f"({label}) {text}" for label, text in zip(labels, texts, strict=True))


def scienceqa_item(row: Row, group: int, path: Path, i: int) -> Item:
    """A ScienceQA question as (prompt, answer, group, label): the Alpaca template around
    ``Context / Question / Options``, the answer ``Answer: The answer is <letter>.``.

    Raises:
        ValueError: choices that are not a list of strings or an answer index out of their range.
    """
    choices = row["choices"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices) \
            or len(choices) > len(string.ascii_uppercase):
        raise ValueError(f"{path}: record {i} has 'choices' = {choices!r:.200}; expected a list of strings")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{path}: record {i} has 'answer' = {answer!r}; expected an index into its "
                         f"{len(choices)} choices")
    letters = string.ascii_uppercase[: len(choices)]
    hint = row.get("hint")
    context = (hint if isinstance(hint, str) else "").strip() or "N/A"
    question = _string(row["question"], path, i, "question")
    instruction = f"Context: {context}\nQuestion: {question}\nOptions: {_options(letters, choices)}\n"
    return ALPACA.format(instruction=instruction), answer_text(letters[answer]), group, answer


def choice_item(row: Row, question: str, group: int, path: Path, i: int) -> Item:
    """A CommonsenseQA / OpenBookQA question as (prompt, answer, group, label): the Alpaca template around
    ``Question / Options`` with the data's labels, the answer ``Answer: The answer is <answerKey>.``.

    Raises:
        ValueError: ``choices`` without equally long ``label`` and ``text`` lists, or an ``answerKey`` not among
            the labels.
    """
    choices = row["choices"]
    labels = choices.get("label") if isinstance(choices, dict) else None
    texts = choices.get("text") if isinstance(choices, dict) else None
    if not isinstance(labels, list) or not isinstance(texts, list) or not labels or len(labels) != len(texts):
        raise ValueError(f"{path}: record {i} has 'choices' = {choices!r:.200}; expected {{label: [...], "
                         "text: [...]}} of equal lengths")
    key = row["answerKey"]
    if key not in labels:
        raise ValueError(f"{path}: record {i} has 'answerKey' = {key!r}, not one of its labels {labels}")
    instruction = f"Question: {_string(row[question], path, i, question)}\nOptions: {_options(labels, texts)}\n"
    return ALPACA.format(instruction=instruction), answer_text(key), group, labels.index(key)


# ------------------------------------------------------------------------------------------------ assembly


def groups(requests: int, utility: Sequence[str]) -> tuple[str, ...]:
    """The score groups of ``requests`` requests: ``forget_1..T``, ``forget_1_test..forget_T_test``, then the
    utility groups."""
    return (*(f"forget_{t}" for t in range(1, requests + 1)), *(f"forget_{t}_test" for t in range(1, requests + 1)),
            *utility)


def _cap(items: list[Item], cap: int, gen: torch.Generator) -> list[Item]:
    """A random subset of ``cap`` items (all when ``cap`` is 0 or there are fewer), in their order."""
    if cap <= 0 or len(items) <= cap:
        return items
    return [items[int(k)] for k in torch.randperm(len(items), generator=gen)[:cap].sort().values]


def _samples(items: Sequence[Item], task: int, alternatives: Alternatives | None = None) -> TextSamples:
    """The samples of ``items``, each with its perturbed answers and paraphrase from ``alternatives`` (by prompt)."""
    alts = alternatives or {}
    return TextSamples([TextSample(p, a, task, g, *alts.get(p, ((), None))) for p, a, g, _ in items],
                       torch.tensor([label for *_, label in items], dtype=torch.int64))


def assemble_requests(cfg: TextStreamConfig, seed: int, names: tuple[str, ...], task_names: Sequence[str],
                      forget: list[list[Item]], held: list[list[Item]], utility: list[list[Item]],
                      refusal: str | None = None, learn: list[Item] | None = None,
                      alternatives: Alternatives | None = None) -> Stream:
    """The stream of requests (module docstring): each request's forget set capped at ``max_train_per_task``,
    each test-only group (``held``, ``utility``) at ``max_test_per_task``; experience ``k`` trains on request
    ``k + 1``'s forget set, test experience ``k`` scores it with its held-out samples, test experience 0 the
    utility groups too. With ``learn``, experience 0 trains on it and tests the utility groups alone, and the
    requests follow. ``alternatives``: perturbed answers and paraphrases by prompt, given to the test samples."""
    T = len(forget)
    forget = [_cap(f, cfg.max_train_per_task, generator(seed, _TRAIN_CAP, t)) for t, f in enumerate(forget)]
    test_only = [*held, *utility]
    held_c, utility_c = [], []
    for k, items in enumerate(test_only):
        (held_c if k < len(held) else utility_c).append(_cap(items, cfg.max_test_per_task,
                                                             generator(seed, _TEST_CAP, k)))
    shared = [item for group in utility_c for item in group]
    if learn is None:
        trains = forget
        tests = [forget[t] + held_c[t] + (shared if t == 0 else []) for t in range(T)]
    else:
        trains = [_cap(learn, cfg.max_train_per_task, generator(seed, _TRAIN_CAP, T)), *forget]
        tests = [shared, *(forget[t] + held_c[t] for t in range(T))]
    spec = TextStreamSpec(name=cfg.name, n_tasks=cfg.n_tasks, task_names=tuple(task_names),
                          label_words=((),) * cfg.n_tasks, groups=names, refusal=refusal,
                          per_sample=("truth_ratio",) if alternatives else ())
    return assemble_text(cfg, seed, spec, [_samples(items, k) for k, items in enumerate(trains)],
                         [_samples(items, k, alternatives) for k, items in enumerate(tests)])


def _reference(items: Sequence[Item]) -> Any:
    return make_text_dataset(_samples(items, 0), 0)


# ------------------------------------------------------------------------------------------------ ScienceQA

SCIENCEQA_COLUMNS = ("question", "choices", "answer", "hint", "topic", "image")


@register("scienceqa_unlearning", config=ScienceQAUnlearningConfig)
def build_scienceqa_unlearning(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``scienceqa_unlearning`` (module docstring).

    Raises:
        TypeError: ``cfg`` is not a :class:`ScienceQAUnlearningConfig`.
        FileNotFoundError: naming every missing file and where it comes from.
        ConfigError: a requested topic without an image-free training question (``benchmark.requests``).
        ValueError: a malformed record (naming the file and the record).
    """
    if not isinstance(cfg, ScienceQAUnlearningConfig):
        raise TypeError(f"stream 'scienceqa_unlearning' needs a ScienceQAUnlearningConfig, got {type(cfg).__name__}")
    cfg = text_config(cfg)
    assert isinstance(cfg, ScienceQAUnlearningConfig)
    files = scienceqa_files(cfg.utility)
    paths = check_files(cfg.name, cfg.data_root, files)
    s, T, requests = stream_seed(cfg, seed), len(cfg.requests), list(cfg.requests)
    names = groups(T, ["retained", *cfg.utility])
    split_rows = {}
    for split in ("train", "test"):
        path = paths[files[("train", "test").index(split)]]
        rows = read_table(path, SCIENCEQA_COLUMNS, image="image")
        split_rows[split] = [(i, r) for i, r in enumerate(rows) if not r["image"]]
    train_path, test_path = paths[files[0]], paths[files[1]]
    topics = Counter(r["topic"] for _, r in split_rows["train"])
    for topic in requests:
        check(topics[topic] > 0, "benchmark.requests",
              f"'{topic}' has no image-free training question in {train_path}; its topics: "
              f"{', '.join(f'{t} ({n})' for t, n in sorted(topics.items(), key=str))}")

    def items(split: str, path: Path, keep: Any, group: int) -> list[Item]:
        return [scienceqa_item(r, group, path, i) for i, r in split_rows[split] if keep(r["topic"])]

    forget = [items("train", train_path, lambda x, t=t: x == t, k) for k, t in enumerate(requests)]
    held = [items("test", test_path, lambda x, t=t: x == t, T + k) for k, t in enumerate(requests)]
    utility = [items("test", test_path, lambda x: x not in requests, 2 * T)]
    for u, name in enumerate(cfg.utility):
        data = files[2 + u]
        path = paths[data]
        question = "question" if name == "csqa" else "question_stem"
        rows = read_table(path, (question, "choices", "answerKey"))
        utility.append([choice_item(r, question, 2 * T + 1 + u, path, i) for i, r in enumerate(rows)])
    stream = assemble_requests(cfg, s, names, requests, forget, held, utility)
    stream.references = {"retain": _reference(items("train", train_path, lambda x: x not in requests, -1))}
    return stream


# ------------------------------------------------------------------------------------------------ TOFU


def tofu_prompt(question: str, style: str) -> str:
    """The TOFU prompt of ``question`` in ``prompt_style`` ``style``."""
    return TOFU_STYLES[style].format(question=question)


@register("tofu_unlearning", config=TofuUnlearningConfig)
def build_tofu_unlearning(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``tofu_unlearning`` (module docstring).

    Raises:
        TypeError: ``cfg`` is not a :class:`TofuUnlearningConfig`.
        FileNotFoundError: naming every missing file and where it comes from.
        ConfigError: a request that adds no question to the earlier ones (``benchmark.requests``).
        ValueError: a malformed record (naming the file and the record).
    """
    if not isinstance(cfg, TofuUnlearningConfig):
        raise TypeError(f"stream 'tofu_unlearning' needs a TofuUnlearningConfig, got {type(cfg).__name__}")
    cfg = text_config(cfg)
    assert isinstance(cfg, TofuUnlearningConfig)
    files = tofu_files(cfg.requests, cfg.retains, cfg.utility, cfg.truth_ratio)
    paths = {f.stem: p for f, p in check_files(cfg.name, cfg.data_root, files).items()}
    s, T = stream_seed(cfg, seed), len(cfg.requests)
    names = groups(T, list(cfg.utility))
    cache: dict[str, list[tuple[str, str]]] = {}

    def pairs(split: str) -> list[tuple[str, str]]:
        if split not in cache:
            path = paths[split]
            cache[split] = [(_string(r["question"], path, i, "question"), _string(r["answer"], path, i, "answer"))
                            for i, r in enumerate(read_table(path, ("question", "answer")))]
        return cache[split]

    def item(pair: tuple[str, str], group: int) -> Item:
        return tofu_prompt(pair[0], cfg.prompt_style), pair[1], group, 0

    seen: set[tuple[str, str]] = set()
    forget: list[list[Item]] = []
    held: list[list[Item]] = []
    for t, split in enumerate(cfg.requests):
        new = [p for p in dict.fromkeys(pairs(split)) if p not in seen]
        check(bool(new), "benchmark.requests", f"'{split}' adds no question to the earlier requests "
              f"{list(cfg.requests[:t])}; give nested forget splits in growing order, e.g. [forget01, forget05, "
              "forget10]")
        seen.update(pairs(split))
        order = torch.randperm(len(new), generator=generator(s, _FORGET_SPLIT, t)).tolist()
        n_train = max(1, round(cfg.forget_fraction * len(new)))
        forget.append([item(new[k], t) for k in sorted(order[:n_train])])
        held.append([item(new[k], T + t) for k in sorted(order[n_train:])])
    utility = [[item(p, 2 * T + u) for p in pairs(TOFU_UTILITY[name])] for u, name in enumerate(cfg.utility)]
    alternatives = None
    if cfg.truth_ratio:
        alternatives = {}
        for split in [*cfg.requests, *(TOFU_UTILITY[u] for u in cfg.utility)]:
            path = paths[perturbed_split(split)]
            for i, r in enumerate(read_table(path, ("question", "answer", "perturbed_answer"))):
                perturbed = r["perturbed_answer"]
                if not (isinstance(perturbed, list | tuple) and perturbed
                        and all(isinstance(a, str) for a in perturbed)):
                    raise ValueError(f"{path}, record {i}: 'perturbed_answer' must be a non-empty list of strings")
                paraphrase = r.get("paraphrased_answer")
                prompt = tofu_prompt(_string(r["question"], path, i, "question"), cfg.prompt_style)
                alternatives[prompt] = (tuple(perturbed), paraphrase if isinstance(paraphrase, str) else None)
    stream = assemble_requests(cfg, s, names, cfg.requests, forget, held, utility, refusal=TOFU_REFUSE,
                               alternatives=alternatives)
    retains = {name: _reference([item(p, -1) for p in pairs(name)]) for name in cfg.retains}
    stream.references = {**retains, "retain": retains[cfg.retains[-1]]}
    return stream


# ------------------------------------------------------------------------------------------------ CLINC150


def clinc_prompt(utterance: str) -> str:
    """The CLINC150 prompt of ``utterance`` (a reconstruction)."""
    return f"Utterance: {utterance}\nIntent:"


def read_clinc(path: Path) -> dict[str, list[tuple[str, str]]]:
    """The ``train`` and ``test`` lists of ``data_full.json`` as (utterance, intent) pairs.

    Raises:
        ValueError: not a JSON object with those lists of [utterance, intent] string pairs (naming the entry).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'train' and 'test' lists, got {type(data).__name__}")
    out = {}
    for split in ("train", "test"):
        entries = data.get(split)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: no '{split}' list of [utterance, intent] pairs (keys: {sorted(data)})")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise ValueError(f"{path}: {split}[{i}] = {entry!r:.200}; expected [utterance, intent]")
        out[split] = [(text, intent) for text, intent in entries]
    return out


@register("clinc_unlearning", config=ClincUnlearningConfig)
def build_clinc_unlearning(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``clinc_unlearning`` (module docstring).

    Raises:
        TypeError: ``cfg`` is not a :class:`ClincUnlearningConfig`.
        FileNotFoundError: ``data_full.json`` is missing (naming it and where it comes from).
        ConfigError: more intents requested than the file leaves one to retain (``benchmark.intents_per_request``).
        ValueError: a malformed file (naming the entry).
    """
    if not isinstance(cfg, ClincUnlearningConfig):
        raise TypeError(f"stream 'clinc_unlearning' needs a ClincUnlearningConfig, got {type(cfg).__name__}")
    cfg = text_config(cfg)
    assert isinstance(cfg, ClincUnlearningConfig)
    path = check_files(cfg.name, cfg.data_root, [CLINC_FILE])[CLINC_FILE]
    data = read_clinc(path)
    s, T, k = stream_seed(cfg, seed), cfg.requests, cfg.intents_per_request
    intents = sorted({intent for _, intent in data["train"]})
    check(T * k < len(intents), "benchmark.intents_per_request",
          f"{k}: {T} requests × {k} intents leave none of the file's {len(intents)} intents to retain; valid: "
          f"1..{(len(intents) - 1) // T}")
    label = {intent: i for i, intent in enumerate(intents)}
    block = {intent: i // k for i, intent in enumerate(intents[: T * k])}

    def item(pair: tuple[str, str], group: int) -> Item:
        return clinc_prompt(pair[0]), pair[1], group, label.get(pair[1], len(intents))

    forget = [[item(p, t) for p in data["train"] if block.get(p[1]) == t] for t in range(T)]
    held = [[item(p, T + t) for p in data["test"] if block.get(p[1]) == t] for t in range(T)]
    utility = [[item(p, 2 * T) for p in data["test"] if p[1] not in block]]
    learn = [item(p, -1) for p in data["train"]] if cfg.learn else None
    task_names = (["learn"] if cfg.learn else []) + [f"request_{t}" for t in range(1, T + 1)]
    stream = assemble_requests(cfg, s, groups(T, ["retained"]), task_names, forget, held, utility, learn=learn)
    stream.references = {"retain": _reference([item(p, -1) for p in data["train"] if p[1] not in block])}
    return stream
