"""O3's real-data streams (clbench/streams/unlearning_real.py: ``scienceqa_unlearning``, ``tofu_unlearning``,
``clinc_unlearning``) on tiny fake files in their documented layouts, and the O3 experiment configs at the official
code's settings (clbench/conf/experiment/o3_*.yaml)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import fails_fast_without_data_and_model, run_config

from clbench.config import ConfigError
from clbench.streams.unlearning_real import ALPACA, TOFU_REFUSE

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
"""Hugging Face's Image feature as stored in parquet."""


def _q(topic: str, k: int, image: dict | None = None, hint: str = "") -> dict:
    return {"question": f"{topic} question {k}?", "choices": [f"{topic} yes {k}", f"{topic} no {k}", "maybe"],
            "answer": k % 3, "hint": hint, "topic": topic, "subject": "natural science", "image": image}


PNG = {"bytes": b"\x89PNG", "path": "x.png"}
SQA_TRAIN = [_q("biology", 0, hint="Cells divide."), _q("biology", 1, image=PNG), _q("biology", 2),
             _q("physics", 0), _q("physics", 1, image={"bytes": None, "path": None}), _q("chemistry", 0),
             _q("chemistry", 1), _q("geography", 0), _q("geography", 1, image=PNG)]
"""Image-free: biology 0, 2; physics 0, 1 (an Image struct of empty fields holds no image); chemistry 0, 1;
geography 0 (never requested)."""
SQA_TEST = [_q("biology", 5), _q("physics", 5), _q("chemistry", 5), _q("geography", 5),
            _q("geography", 6, image="a.png"), _q("economics", 5)]
"""JSON lines: geography 6 has an image (a path); economics and geography are never requested."""


def write_scienceqa(root: Path, skip: tuple[str, ...] = ()) -> None:
    """Fake ScienceQA (train as parquet with an Image struct column, test as JSON lines), CommonsenseQA validation
    (parquet) and OpenBookQA test (JSON lines), but the files named in ``skip``."""
    for folder in ("ScienceQA", "CommonsenseQA", "OpenBookQA"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if "ScienceQA/train" not in skip:
        columns = {k: [r[k] for r in SQA_TRAIN] for k in SQA_TRAIN[0] if k != "image"}
        table = pa.table({**columns, "image": pa.array([r["image"] for r in SQA_TRAIN], type=IMAGE)})
        pq.write_table(table, root / "ScienceQA" / "train.parquet")
    if "ScienceQA/test" not in skip:
        (root / "ScienceQA" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SQA_TEST))
    if "CommonsenseQA/validation" not in skip:
        rows = [{"id": str(k), "question": f"common {k}?", "question_concept": "x",
                 "choices": {"label": list("ABCDE"), "text": [f"c{k}{j}" for j in range(5)]}, "answerKey": "ABCDE"[k]}
                for k in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), root / "CommonsenseQA" / "validation.parquet")
    if "OpenBookQA/test" not in skip:
        rows = [{"id": str(k), "question_stem": f"book {k}", "choices": {"text": ["t0", "t1", "t2", "t3"],
                                                                        "label": list("ABCD")}, "answerKey": "D"}
                for k in range(2)]
        (root / "OpenBookQA" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tofu(root: Path, skip: tuple[str, ...] = (), perturbed: bool = False) -> None:
    """Fake TOFU files (JSON lines, the data set's names): 6 authors of 5 questions, forget10 = the last 20,
    forget05 = the last 10, forget01 = the last 5 (nested as the real ones), retains their complements; with
    ``perturbed``, the ``*_perturbed`` splits too (paraphrased answers for forget and retain, 3 perturbed answers,
    2 for real authors and world facts)."""
    folder = root / "TOFU"
    folder.mkdir(parents=True, exist_ok=True)
    full = [{"question": f"q{a}.{k}", "answer": f"a{a}.{k}"} for a in range(6) for k in range(5)]
    splits = {"forget01": full[-5:], "forget05": full[-10:], "forget10": full[-20:], "retain99": full[:-5],
              "retain95": full[:-10], "retain90": full[:-20], "retain_perturbed": full[:4],
              "real_authors": [{"question": "who wrote x?", "answer": "y", "option1": "z"}],
              "world_facts": [{"question": "capital of f?", "answer": "p"}, {"question": "2+2?", "answer": "4"}]}
    if perturbed:
        for name in ("forget01", "forget05", "forget10", "retain_perturbed", "real_authors", "world_facts"):
            factual = name in ("real_authors", "world_facts")
            key = name if name.endswith("_perturbed") else f"{name}_perturbed"
            splits[key] = [{**r, "perturbed_answer": [f"wrong{k} {r['answer']}" for k in range(2 if factual else 3)],
                            **({} if factual else {"paraphrased_answer": f"so {r['answer']}"})}
                           for r in splits[name]]
    for name, rows in splits.items():
        if name not in skip:
            (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


INTENTS = ["alarm", "balance", "book_flight", "calculator", "weather"]


def write_clinc(root: Path) -> None:
    """A fake data_full.json: 5 intents, 3 training and 2 test utterances each, and out-of-scope lists."""
    data = {"train": [[f"{i} train {k}", i] for i in reversed(INTENTS) for k in range(3)],
            "val": [["v", "alarm"]], "test": [[f"{i} test {k}", i] for i in INTENTS for k in range(2)],
            "oos_train": [["oos", "oos"]], "oos_val": [], "oos_test": []}
    (root / "CLINC150").mkdir(parents=True, exist_ok=True)
    (root / "CLINC150" / "data_full.json").write_text(json.dumps(data))


def _stream(tmp_path: Path, bench: str, *overrides: str):
    from clbench.streams import build_stream

    cfg = run_config(tmp_path, f"benchmark={bench}", "model=causal_lm", "engine=lm", f"benchmark.data_root={tmp_path}",
                     *overrides)
    return build_stream(cfg.benchmark, 0)


def _by_group(stream, split: str = "test") -> list[dict[str, list]]:
    """Per experience of ``split``: group name -> its samples."""
    names = stream.spec.groups
    out = []
    for e in getattr(stream.benchmark, f"{split}_stream"):
        groups: dict[str, list] = {}
        for s in e.dataset:
            groups.setdefault(names[s.group] if s.group >= 0 else "", []).append(s)
        out.append(groups)
    return out


def _questions(samples) -> list[str]:
    return [s.prompt.split("Question: ")[1].split("\n")[0] for s in samples]


# ------------------------------------------------------------------------------------------------ ScienceQA


def test_scienceqa_one_request_per_topic_image_free_questions_only(tmp_path):
    write_scienceqa(tmp_path)
    stream = _stream(tmp_path, "scienceqa_unlearning")
    spec = stream.spec
    assert spec.n_tasks == 3 and spec.task_names == ("biology", "physics", "chemistry") and spec.refusal is None
    assert spec.groups == ("forget_1", "forget_2", "forget_3", "forget_1_test", "forget_2_test", "forget_3_test",
                           "retained", "csqa", "obqa")
    train = [list(e.dataset) for e in stream.benchmark.train_stream]
    assert [_questions(t) for t in train] == [["biology question 0?", "biology question 2?"],
                                              ["physics question 0?", "physics question 1?"],
                                              ["chemistry question 0?", "chemistry question 1?"]]
    assert all(s.task == k and s.group == k for k, t in enumerate(train) for s in t)
    first = train[0][0]
    assert first.prompt == ALPACA.format(instruction="Context: Cells divide.\nQuestion: biology question 0?\nOptions: "
                                         "(A) biology yes 0 (B) biology no 0 (C) maybe\n")
    assert first.prompt.endswith("### Response:\n") and first.answer == "Answer: The answer is A."
    assert "Context: N/A\n" in train[0][1].prompt and train[0][1].answer == "Answer: The answer is C."
    tests = _by_group(stream)
    # test experience k: request k+1's trained questions (S.U.) and its topic's test questions (D.U.)
    for k, topic in enumerate(("biology", "physics", "chemistry")):
        assert tests[k][f"forget_{k + 1}"] == train[k]
        assert _questions(tests[k][f"forget_{k + 1}_test"]) == [f"{topic} question 5?"]
    assert set(tests[1]) == {"forget_2", "forget_2_test"} and set(tests[2]) == {"forget_3", "forget_3_test"}
    # the utility groups in test experience 0: never-requested topics' image-free test questions, CSQA, OBQA
    assert _questions(tests[0]["retained"]) == ["geography question 5?", "economics question 5?"]
    csqa, obqa = tests[0]["csqa"], tests[0]["obqa"]
    assert csqa[1].prompt == ALPACA.format(instruction="Question: common 1?\nOptions: (A) c10 (B) c11 (C) c12 (D) c13 "
                                           "(E) c14\n")
    assert [s.answer for s in csqa] == [f"Answer: The answer is {x}." for x in "ABC"]
    assert "Question: book 0\nOptions: (A) t0 (B) t1 (C) t2 (D) t3\n" in obqa[0].prompt
    assert {s.answer for s in obqa} == {"Answer: The answer is D."}
    assert _questions(stream.references["retain"]) == ["geography question 0?"]


def test_scienceqa_requests_utility_and_caps(tmp_path):
    write_scienceqa(tmp_path)
    stream = _stream(tmp_path, "scienceqa_unlearning", "benchmark.requests=[physics,geography]", "benchmark.n_tasks=2",
                     "benchmark.utility=[obqa]", "benchmark.max_test_per_task=1", "benchmark.max_train_per_task=1")
    tests = _by_group(stream)
    assert stream.spec.groups[-2:] == ("retained", "obqa") and set(tests[0]) == {"forget_1", "forget_1_test",
                                                                                 "retained", "obqa"}
    assert len(tests[0]["retained"]) == 1 and len(tests[0]["obqa"]) == 1  # capped test-only groups
    train = [list(e.dataset) for e in stream.benchmark.train_stream]
    assert [len(t) for t in train] == [1, 1] and tests[0]["forget_1"] == train[0]  # S.U. = the trained samples
    assert len(stream.references["retain"]) == 4  # biology 0, 2 and chemistry 0, 1


def test_scienceqa_missing_files_give_one_error_naming_every_one(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        _stream(tmp_path, "scienceqa_unlearning")
    message = str(info.value)
    for folder, split in (("ScienceQA", "train"), ("ScienceQA", "test"), ("CommonsenseQA", "validation"),
                          ("OpenBookQA", "test")):
        assert str(tmp_path / folder / f"{split}.parquet") in message
    assert "missing (4)" in message
    assert all(hf in message for hf in ("derek-thomas/ScienceQA", "tau/commonsense_qa", "allenai/openbookqa"))
    assert time.perf_counter() - start < 10
    write_scienceqa(tmp_path, skip=("ScienceQA/test", "OpenBookQA/test"))
    with pytest.raises(FileNotFoundError, match=r"missing \(2\)") as info:
        _stream(tmp_path, "scienceqa_unlearning")
    assert "train.parquet" not in str(info.value) and "validation" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"missing \(1\)"):  # utility [] reads neither utility file
        _stream(tmp_path, "scienceqa_unlearning", "benchmark.utility=[]")


def test_scienceqa_bad_data_is_named(tmp_path):
    write_scienceqa(tmp_path)
    with pytest.raises(ConfigError, match=r"benchmark\.requests.*'economics' has no image-free training question"):
        _stream(tmp_path, "scienceqa_unlearning", "benchmark.requests=[biology,economics]", "benchmark.n_tasks=2")
    bad = [dict(_q("biology", 0), answer=7)]
    (tmp_path / "ScienceQA" / "test.jsonl").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"test\.jsonl: record 0 has 'answer' = 7"):
        _stream(tmp_path, "scienceqa_unlearning")
    (tmp_path / "ScienceQA" / "test.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 has no \['choices'"):
        _stream(tmp_path, "scienceqa_unlearning")


# ------------------------------------------------------------------------------------------------ TOFU


def test_tofu_nested_requests_forget_what_each_split_adds(tmp_path):
    write_tofu(tmp_path)
    stream = _stream(tmp_path, "tofu_unlearning")
    spec = stream.spec
    assert spec.task_names == ("forget01", "forget05", "forget10") and spec.refusal == TOFU_REFUSE
    assert spec.groups == ("forget_1", "forget_2", "forget_3", "forget_1_test", "forget_2_test", "forget_3_test",
                           "retain", "real_authors", "world_facts")
    tests = _by_group(stream)
    answers = [sorted(s.answer for s in tests[k][f"forget_{k + 1}"] + tests[k][f"forget_{k + 1}_test"])
               for k in range(3)]
    assert answers == [sorted(f"a5.{k}" for k in range(5)), sorted(f"a4.{k}" for k in range(5)),
                       sorted(f"a{a}.{k}" for a in (2, 3) for k in range(5))]
    # 80 % of each request's new questions trained (round(0.8 n)), the rest held out
    train = [list(e.dataset) for e in stream.benchmark.train_stream]
    assert [len(t) for t in train] == [4, 4, 8]
    assert [len(tests[k][f"forget_{k + 1}_test"]) for k in range(3)] == [1, 1, 2]
    assert all(tests[k][f"forget_{k + 1}"] == train[k] for k in range(3))
    assert train[0][0].prompt == f"[INST] {train[0][0].answer.replace('a', 'q', 1)} [\\INST]"
    assert [s.answer for s in tests[0]["retain"]] == ["a0.0", "a0.1", "a0.2", "a0.3"]  # retain_perturbed
    assert [s.prompt for s in tests[0]["real_authors"]] == ["[INST] who wrote x? [\\INST]"]
    assert len(tests[0]["world_facts"]) == 2 and set(tests[1]) == {"forget_2", "forget_2_test"}
    refs = stream.references
    assert sorted(refs) == ["retain", "retain90", "retain95", "retain99"] and refs["retain"] is refs["retain90"]
    assert [len(refs[n]) for n in ("retain99", "retain95", "retain90")] == [25, 20, 10]


def test_tofu_truth_ratio_reads_the_perturbed_splits_into_the_test_samples(tmp_path):
    write_tofu(tmp_path, perturbed=True)
    stream = _stream(tmp_path, "tofu_unlearning", "benchmark.truth_ratio=true")
    tests = _by_group(stream)
    for group in ("forget_1", "forget_1_test", "retain"):
        assert all(s.paraphrase == f"so {s.answer}" and s.perturbed == tuple(f"wrong{k} {s.answer}" for k in range(3))
                   for s in tests[0][group]), group
    assert all(s.paraphrase is None and len(s.perturbed) == 2 for g in ("real_authors", "world_facts")
               for s in tests[0][g])
    assert all(s.perturbed == () for e in stream.benchmark.train_stream for s in e.dataset)
    (tmp_path / "TOFU" / "forget05_perturbed.json").unlink()
    with pytest.raises(FileNotFoundError, match="forget05_perturbed"):
        _stream(tmp_path, "tofu_unlearning", "benchmark.truth_ratio=true")


def test_tofu_prompt_style_fraction_and_utility(tmp_path):
    write_tofu(tmp_path, skip=("world_facts", "real_authors"))
    stream = _stream(tmp_path, "tofu_unlearning", "benchmark.prompt_style=tofu", "benchmark.forget_fraction=1",
                     "benchmark.utility=[retain]", "benchmark.requests=[forget05,forget10]",
                     "benchmark.retains=[retain95,retain90]", "benchmark.n_tasks=2")
    tests = _by_group(stream)
    assert [len(e.dataset) for e in stream.benchmark.train_stream] == [10, 10]
    assert "forget_1_test" not in tests[0] and set(tests[0]) == {"forget_1", "retain"}
    assert tests[0]["retain"][0].prompt == "[INST] q0.0 [/INST]"
    with pytest.raises(ConfigError, match=r"benchmark\.requests.*'forget01' adds no question"):
        _stream(tmp_path, "tofu_unlearning", "benchmark.requests=[forget05,forget01]",
                "benchmark.retains=[retain95,retain99]", "benchmark.n_tasks=2", "benchmark.utility=[retain]")


def test_tofu_missing_files_give_one_error_naming_every_one(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        _stream(tmp_path, "tofu_unlearning")
    message = str(info.value)
    names = ("forget01", "forget05", "forget10", "retain99", "retain95", "retain90", "retain_perturbed",
             "real_authors", "world_facts")
    assert all(str(tmp_path / "TOFU" / f"{n}.json") in message for n in names)
    assert "missing (9)" in message and "locuslab/TOFU" in message
    write_tofu(tmp_path, skip=("forget05",))
    with pytest.raises(FileNotFoundError, match=r"missing \(1\).*forget05\.json"):
        _stream(tmp_path, "tofu_unlearning")


# ------------------------------------------------------------------------------------------------ CLINC150


def test_clinc_requests_are_blocks_of_sorted_intents(tmp_path):
    write_clinc(tmp_path)
    stream = _stream(tmp_path, "clinc_unlearning", "benchmark.requests=2", "benchmark.intents_per_request=2",
                     "benchmark.n_tasks=2")
    assert stream.spec.groups == ("forget_1", "forget_2", "forget_1_test", "forget_2_test", "retained")
    train = [list(e.dataset) for e in stream.benchmark.train_stream]
    assert [sorted({s.answer for s in t}) for t in train] == [["alarm", "balance"], ["book_flight", "calculator"]]
    assert [len(t) for t in train] == [6, 6] and train[0][0].prompt.startswith("Utterance: ")
    assert train[1][0].prompt == "Utterance: calculator train 0\nIntent:" and train[1][0].answer == "calculator"
    tests = _by_group(stream)
    assert tests[0]["forget_1"] == train[0] and len(tests[0]["forget_1_test"]) == 4
    assert {s.answer for s in tests[0]["retained"]} == {"weather"} and set(tests[1]) == {"forget_2", "forget_2_test"}
    assert {s.answer for s in stream.references["retain"]} == {"weather"} and len(stream.references["retain"]) == 3
    learn = _stream(tmp_path, "clinc_unlearning", "benchmark.requests=2", "benchmark.intents_per_request=2",
                    "benchmark.learn=true", "benchmark.n_tasks=3")
    assert learn.spec.task_names == ("learn", "request_1", "request_2")
    assert len(learn.benchmark.train_stream[0].dataset) == 15
    learn_tests = _by_group(learn)
    assert set(learn_tests[0]) == {"retained"} and set(learn_tests[1]) == {"forget_1", "forget_1_test"}


def test_clinc_missing_file_and_too_many_intents(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing \(1\).*CLINC150/data_full\.json.*clinc/oos-eval"):
        _stream(tmp_path, "clinc_unlearning")
    write_clinc(tmp_path)
    with pytest.raises(ConfigError, match=r"benchmark\.intents_per_request.*valid: 1\.\.1"):
        _stream(tmp_path, "clinc_unlearning", "benchmark.intents_per_request=2")  # 3 × 2 > 5 - 1
    (tmp_path / "CLINC150" / "data_full.json").write_text(json.dumps({"train": [["x", 3]], "test": []}))
    with pytest.raises(ValueError, match=r"train\[0\]"):
        _stream(tmp_path, "clinc_unlearning", "benchmark.intents_per_request=1")


# ------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(("bench", "overrides", "key"), [
    ("scienceqa_unlearning", ["benchmark.requests=[biology,physics]"], "benchmark.n_tasks"),
    ("scienceqa_unlearning", ["benchmark.requests=[]"], "benchmark.requests"),
    ("scienceqa_unlearning", ["benchmark.requests=[biology,biology,physics]"], "benchmark.requests"),
    ("scienceqa_unlearning", ["benchmark.utility=[mmlu]"], "benchmark.utility"),
    ("scienceqa_unlearning", ["benchmark.per_class=5"], "benchmark.per_class"),
    ("scienceqa_unlearning", ["benchmark.task_prefix=true"], "benchmark.task_prefix"),
    ("tofu_unlearning", ["benchmark.retains=[retain90]"], "benchmark.retains"),
    ("tofu_unlearning", ["benchmark.forget_fraction=0"], "benchmark.forget_fraction"),
    ("tofu_unlearning", ["benchmark.prompt_style=chat"], "benchmark.prompt_style"),
    ("tofu_unlearning", ["benchmark.utility=[holdout]"], "benchmark.utility"),
    ("tofu_unlearning", ["benchmark.max_words=3"], "benchmark.max_words"),
    ("clinc_unlearning", ["benchmark.requests=0"], "benchmark.requests"),
    ("clinc_unlearning", ["benchmark.intents_per_request=0"], "benchmark.intents_per_request"),
    ("clinc_unlearning", ["benchmark.learn=true"], "benchmark.n_tasks"),
])
def test_bad_keys_are_named(tmp_path, bench, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _stream(tmp_path, bench, *overrides)


# ------------------------------------------------------------------------------------------------ experiments


def test_o3_scienceqa_composes_at_the_codes_settings(tmp_path):
    cfg = run_config(tmp_path, "experiment=o3_scienceqa")
    b, m, e, s = cfg.benchmark, cfg.model, cfg.engine, cfg.strategy
    assert (b.name, b.requests, b.n_tasks, list(b.utility)) == ("scienceqa_unlearning",
                                                               ["biology", "physics", "chemistry"], 3, ["csqa", "obqa"])
    assert (m.name, m.pretrained, m.adapter, m.adapter_from, m.lora_r, m.lora_alpha, m.lora_dropout) == (
        "causal_lm", "gcyzsl/O3_LLAMA2_ScienceQA", "lora", 0, 8, 16, 0.05)
    assert m.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (m.max_length, m.max_new_tokens) == (256, 128)
    assert (e.epochs, e.batch_size, e.accumulate, e.lr, e.optimizer, e.warmup_steps, e.weight_decay) == (
        15, 8, 16, 3e-4, "adamw", 100, 0.0)
    assert (s.name, s.unlearn_from, s.lambda_o, s.adapters, s.relabel, s.quantiser, s.gate) == (
        "o3", 0, 0.1, "single", "random_label", "scienceqa", "soft")
    assert s.labels == [f"Answer: The answer is {x}." for x in "ABCDE"]
    d = s.detector_config()
    assert (d.max_length, d.epochs, d.lr, d.batch_size, d.nu, d.svm_score, d.lora_r, d.lora_alpha) == (
        512, 2, 1e-5, 8, 0.1, "score_samples", 8, 32)


def test_o3_tofu_composes_at_the_codes_settings(tmp_path):
    cfg = run_config(tmp_path, "experiment=o3_tofu")
    b, m, e, s = cfg.benchmark, cfg.model, cfg.engine, cfg.strategy
    assert (b.name, b.requests, b.retains, b.n_tasks, b.forget_fraction) == (
        "tofu_unlearning", ["forget01", "forget05", "forget10"], ["retain99", "retain95", "retain90"], 3, 0.8)
    assert (m.pretrained, m.adapter_from, m.lora_r, m.lora_alpha, m.lora_dropout, len(m.lora_targets)) == (
        "locuslab/tofu_ft_llama2-7b", 0, 8, 32, 0.05, 7)
    assert (e.epochs, e.batch_size, e.accumulate, e.lr, e.weight_decay, e.optimizer) == (10, 1, 4, 2e-4, 0.1, "adamw")
    assert (s.unlearn_from, s.relabel, s.refusal, s.quantiser) == (0, "refusal", None, "tofu")
    d = s.detector_config()
    assert (d.nu, d.svm_score, d.lr, d.epochs, d.max_length) == (0.01, "decision_function", 1e-4, 1, 256)


@pytest.mark.parametrize(("name", "first"), [("o3_scienceqa", "ScienceQA/train.parquet"),
                                             ("o3_tofu", "TOFU/forget01.json")])
def test_the_codes_settings_without_data_or_model_name_both_at_once(tmp_path, monkeypatch, name, first):
    """One error naming the missing data files and the model, before anything is loaded or logged."""
    fails_fast_without_data_and_model(tmp_path, monkeypatch, name, first)


def test_a_tiny_o3_run_unlearns_from_experience_0(tmp_path):
    """The stream's shape with O3 at unlearn_from 0: tiny-llama, two ScienceQA requests relabelled at random, the
    LoRA from the first experience, w ≡ 1 (no detector: fast)."""
    pytest.importorskip("peft")
    from clbench.experiment import run

    write_scienceqa(tmp_path)
    cfg = run_config(tmp_path, "benchmark=scienceqa_unlearning", f"benchmark.data_root={tmp_path}",
                     "benchmark.requests=[biology,physics]", "benchmark.n_tasks=2", "benchmark.utility=[csqa]",
                     "model=causal_lm", "model.adapter_from=0", "model.max_new_tokens=3", "engine=lm",
                     "engine.epochs=1", "engine.batch_size=2", "strategy=o3", "strategy.unlearn_from=0",
                     "strategy.relabel=random_label", "strategy.gate=always", "engine.checkpoint_every_epoch=false")
    result = run(cfg)
    assert result.R.shape == (2, 2)
    assert {"exact_match.forget_1", "exact_match.retained", "exact_match.csqa", "loss.forget_2_test"} <= set(
        result.others)
