"""``ogpsa_alignment`` (clbench/streams/alignment_real.py) on tiny fake files in the official code's layout, and the
OGPSA experiment configs at the code's settings (clbench/conf/experiment/ogpsa_*.yaml)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fails_fast_without_data_and_model, run_config

from clbench.config import ConfigError
from clbench.streams.alignment_real import FOLDER, OGPSA_REPO, PROMPT_END, REFERENCES, SAFETY
from clbench.streams.text import PreferenceSample, TextSample

FILES = {"saferlhf2_sft": "saferlhf2_processed_sft_10k.json", "saferlhf2_dpo": "saferlhf2_processed_rl_10k.json",
         "ultrafeedback_sft_200": "ultrafeedback_porecessed_200.json", "halueval_sft_200": "halueval_sft_200.json",
         "ultrafeedback_dpo": "ultrafeedback_porecessed_rl_10k.json"}
"""The code's data sets and their files (data/dataset_info.json of SunGL001/OGPSA), written out here on purpose:
the module's tables must match them."""

EXPERIMENTS = ("ogpsa_qwen_sft", "ogpsa_qwen_dpo", "ogpsa_qwen_sft_dpo", "ogpsa_llama_sft_dpo")


def _sft(name: str, n: int, answer: str = "chosen") -> list[dict[str, str]]:
    return [{"prompt": f"{name} question {i} ?", answer: f"{name} answer {i}"} for i in range(n)]


def _dpo(name: str, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{name} request {i} ?", "chosen": f"no {i}", "rejected": f"sure {i}"} for i in range(n)]


def write_files(root: Path, n: int = 10, skip: tuple[str, ...] = ()) -> Path:
    """Fake files of ``n`` records each under ``root/OGPSA`` in the code's layout (one of them as JSON lines, the
    others JSON lists), but those of the data sets in ``skip``."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"saferlhf2_sft": _sft("safe", n), "saferlhf2_dpo": _dpo("pair", n),
            "ultrafeedback_sft_200": _sft("uf", n), "halueval_sft_200": _sft("halu", n, "right_answer"),
            "ultrafeedback_dpo": _dpo("ufpair", n)}
    rows["saferlhf2_sft"][0]["instruction"] = "Be careful."  # the alpaca instruction column, when a file has one
    for name, data in rows.items():
        if name in skip:
            continue
        path = folder / FILES[name]
        if name == "halueval_sft_200":
            path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        else:
            path.write_text(json.dumps(data), encoding="utf-8")
    return folder


def _stream(tmp_path: Path, *overrides: str):
    from clbench.streams import build_stream

    cfg = run_config(tmp_path, "benchmark=ogpsa_alignment", "model=causal_lm", "engine=lm",
                     f"benchmark.data_root={tmp_path}", *overrides)
    return build_stream(cfg.benchmark, 0)


def test_the_files_are_the_codes():
    assert {d.name: d.file for d in (*SAFETY.values(), *(r for refs in REFERENCES.values() for r in refs))} == FILES
    assert [d.name for d in REFERENCES["sft"]] == ["ultrafeedback_sft_200", "halueval_sft_200"]


def test_one_experience_per_stage_with_a_held_out_test_slice(tmp_path):
    write_files(tmp_path, n=10)
    stream = _stream(tmp_path, "benchmark.stages=[sft,dpo]", "benchmark.n_tasks=2", "benchmark.max_test_per_task=3")
    assert stream.spec.task_names == ("saferlhf2_sft", "saferlhf2_dpo") and stream.spec.n_tasks == 2
    assert stream.spec.primary_score == "exact_match" and stream.spec.refusal is None
    sft, dpo = (list(e.dataset) for e in stream.benchmark.train_stream)
    test_sft, test_dpo = (list(e.dataset) for e in stream.benchmark.test_stream)
    # training: the file's records but the last 3, in file order; tests: the last 3
    assert [s.prompt for s in sft] == ["Be careful.\nsafe question 0 ?" + PROMPT_END,
                                       *(f"safe question {i} ?{PROMPT_END}" for i in range(1, 7))]
    assert all(type(s) is TextSample and s.task == 0 for s in sft)
    assert [s.answer for s in sft] == [f"safe answer {i}" for i in range(7)]
    assert [(s.prompt, s.answer) for s in test_sft] == [(f"safe question {i} ?{PROMPT_END}", f"safe answer {i}")
                                                         for i in range(7, 10)]
    assert all(type(s) is PreferenceSample and s.task == 1 for s in dpo)
    assert [(s.chosen, s.rejected) for s in dpo] == [(f"no {i}", f"sure {i}") for i in range(7)]
    # the DPO stage's test samples: prompt -> the chosen (safe) answer, plain samples
    assert all(type(s) is TextSample and s.task == 1 for s in test_dpo)
    assert [s.answer for s in test_dpo] == ["no 7", "no 8", "no 9"]
    for train, test in ((sft, test_sft), (dpo, test_dpo)):
        assert not {s.prompt for s in train} & {s.prompt for s in test}


def test_the_default_test_slice_is_200_records(tmp_path):
    write_files(tmp_path, n=205)
    stream = _stream(tmp_path)
    assert [len(e.dataset) for e in stream.benchmark.train_stream] == [5]
    assert [len(e.dataset) for e in stream.benchmark.test_stream] == [200]


def test_reference_sets_of_the_stages(tmp_path):
    write_files(tmp_path, n=10)
    both = _stream(tmp_path, "benchmark.stages=[sft,dpo]", "benchmark.n_tasks=2", "benchmark.max_test_per_task=2",
                   "benchmark.reference_samples=4")
    assert sorted(both.references) == ["halueval_sft_200", "ultrafeedback_dpo", "ultrafeedback_sft_200"]
    uf, halu, pairs = (list(both.references[k]) for k in ("ultrafeedback_sft_200", "halueval_sft_200",
                                                          "ultrafeedback_dpo"))
    assert [(s.prompt, s.answer) for s in uf] == [(f"uf question {i} ?{PROMPT_END}", f"uf answer {i}")
                                                  for i in range(4)]  # the first reference_samples records
    assert [s.answer for s in halu] == [f"halu answer {i}" for i in range(4)]  # right_answer, from JSON lines
    assert all(type(s) is TextSample for s in uf + halu)
    assert all(type(s) is PreferenceSample for s in pairs) and [s.rejected for s in pairs] == [
        f"sure {i}" for i in range(4)]
    sft_only = _stream(tmp_path, "benchmark.max_test_per_task=2")
    assert sorted(sft_only.references) == ["halueval_sft_200", "ultrafeedback_sft_200"]
    dpo_only = _stream(tmp_path, "benchmark.stages=[dpo]", "benchmark.max_test_per_task=2")
    assert sorted(dpo_only.references) == ["ultrafeedback_dpo"] and len(dpo_only.references["ultrafeedback_dpo"]) == 10


def test_missing_files_give_one_error_naming_every_one(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        _stream(tmp_path, "benchmark.stages=[sft,dpo]", "benchmark.n_tasks=2")
    message = str(info.value)
    assert all(str(tmp_path / FOLDER / f) in message for f in FILES.values())
    assert OGPSA_REPO in message and "dataset_info.json" in message and "missing (5)" in message
    assert time.perf_counter() - start < 10
    write_files(tmp_path, skip=("halueval_sft_200", "saferlhf2_dpo"))
    with pytest.raises(FileNotFoundError) as info:
        _stream(tmp_path, "benchmark.stages=[sft,dpo]", "benchmark.n_tasks=2")
    message = str(info.value)
    assert "missing (2)" in message and FILES["halueval_sft_200"] in message and FILES["saferlhf2_dpo"] in message
    assert FILES["saferlhf2_sft"] not in message
    with pytest.raises(FileNotFoundError, match="missing \\(1\\)"):  # [sft] alone needs halueval, not the DPO files
        _stream(tmp_path, "benchmark.max_test_per_task=2")


def test_bad_records_are_named(tmp_path):
    folder = write_files(tmp_path, n=10)
    rows = _dpo("pair", 10)
    rows[4]["rejected"] = ["not", "a", "string"]
    (folder / FILES["saferlhf2_dpo"]).write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"saferlhf2_processed_rl_10k\.json: record 4 has 'rejected'"):
        _stream(tmp_path, "benchmark.stages=[dpo]", "benchmark.max_test_per_task=2")
    (folder / FILES["saferlhf2_sft"]).write_text(json.dumps([{"chosen": "x"}] * 5), encoding="utf-8")
    with pytest.raises(ValueError, match="record 0 has no prompt"):
        _stream(tmp_path, "benchmark.max_test_per_task=2")
    (folder / FILES["saferlhf2_sft"]).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="neither a JSON list"):
        _stream(tmp_path, "benchmark.max_test_per_task=2")


@pytest.mark.parametrize(("overrides", "key"), [
    (["benchmark.max_test_per_task=10"], "benchmark.max_test_per_task"),  # the file has 10: none left to train on
    (["benchmark.stages=[sft,dpo]"], "benchmark.n_tasks"),  # 2 stages, n_tasks 1
    (["benchmark.stages=[rlhf]"], "benchmark.stages"),
    (["benchmark.per_class=5"], "benchmark.per_class"),
    (["benchmark.task_prefix=true"], "benchmark.task_prefix"),
    (["benchmark.reference_samples=0"], "benchmark.reference_samples"),
])
def test_bad_keys_are_named(tmp_path, overrides, key):
    write_files(tmp_path, n=10)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _stream(tmp_path, *overrides)


def test_a_tiny_sft_then_dpo_run_projects_off_the_reference_sets(tmp_path, monkeypatch):
    """The whole loop on the fake files: tiny-llama, SFT then DPO, OGPSA with the references of both stages."""
    from clbench.experiment import run
    from strategies.ogpsa import OGPSA

    built: list[tuple[int, list[str]]] = []
    original = OGPSA.build

    def build(self, ctx):
        built.append((ctx.experience, sorted(self.refs)))
        original(self, ctx)

    monkeypatch.setattr(OGPSA, "build", build)
    write_files(tmp_path, n=12)
    cfg = run_config(tmp_path, "benchmark=ogpsa_alignment", "model=causal_lm", "engine=lm", "strategy=ogpsa",
                     f"benchmark.data_root={tmp_path}", "benchmark.stages=[sft,dpo]", "benchmark.n_tasks=2",
                     "benchmark.max_test_per_task=4", "benchmark.reference_samples=4", "model.adapter=none",
                     "model.max_new_tokens=4", "model.dpo_beta=0.2", "engine.batch_size=4",
                     "strategy.ref_sets=[ultrafeedback_sft_200,halueval_sft_200,ultrafeedback_dpo]",
                     "strategy.ref_samples=4", "strategy.refresh_every=[2,1]")
    result = run(cfg)
    assert result.R.shape == (2, 2) and np.isfinite(result.others["loss"]).all()
    # 8 training records a stage, batch 4: 2 steps; K = 2 in the SFT stage (a build at step 0), 1 in DPO (0 and 1)
    refs = ["halueval_sft_200", "ultrafeedback_dpo", "ultrafeedback_sft_200"]
    assert built == [(0, refs), (1, refs), (1, refs)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_codes_settings_compose(tmp_path, name):
    cfg = run_config(tmp_path, f"experiment={name}")
    e, m, s, b = cfg.engine, cfg.model, cfg.strategy, cfg.benchmark
    assert b.name == "ogpsa_alignment" and m.name == "causal_lm" and m.adapter == "none" and s.name == "ogpsa"
    assert m.pretrained == ("meta-llama/Llama-3.1-8B-Instruct" if "llama" in name else "Qwen/Qwen2.5-7B-Instruct")
    assert (m.max_length, m.dpo_beta, e.lr, e.optimizer, e.weight_decay, e.clip_norm, e.warmup_steps) == (
        2048, 0.2, 1e-6, "adamw", 0.0, 1.0, 0)
    assert (e.schedule, e.warmup_epochs, e.precision, s.mode, s.granularity, s.ref_samples) == (
        "cosine", 0, "bf16-mixed", "orthogonal", "per_tensor", 200)
    stage = name.split("_", 2)[2]
    expected = {"sft": (["sft"], 3, 4, 4, ["ultrafeedback_sft_200", "halueval_sft_200"], 30),
                "dpo": (["dpo"], 1, 2, 16, ["ultrafeedback_dpo"], 5),
                "sft_dpo": (["sft", "dpo"], 1, 4, 4, [["ultrafeedback_sft_200", "halueval_sft_200"],
                                                      ["ultrafeedback_dpo"]], [30, 5])}[stage]
    assert (b.stages, e.epochs, e.batch_size, e.accumulate, s.ref_sets, s.refresh_every) == expected
    assert b.n_tasks == len(b.stages)


@pytest.mark.parametrize("name", ["ogpsa_qwen_sft", "ogpsa_llama_sft_dpo"])
def test_the_codes_settings_without_data_or_model_name_both_at_once(tmp_path, monkeypatch, name):
    """One error naming the missing data files and the model, before anything is loaded or logged."""
    fails_fast_without_data_and_model(tmp_path, monkeypatch, name, f"{FOLDER}/{FILES['saferlhf2_sft']}")
