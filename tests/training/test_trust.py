"""The verdict: its rule, its fitting, and the shipped model's card against what onnxruntime measures now.

The shipped-model tests load models/mnist-cnn.onnx, draw the held-out OOD suite and the test digits, and check
both the targets and that the card's figures are exactly what this machine measures.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from training import trust  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trust import DIGIT, NOT_A_DIGIT, UNSURE, Outputs, Verdict, auroc, fit_verdict  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "models"
ONNX, CARD = MODELS / "mnist-cnn.onnx", MODELS / "mnist-cnn.json"
INT8, INT8_CARD = MODELS / "mnist-cnn-int8.onnx", MODELS / "mnist-cnn-int8.json"


def test_verdict_rule_is_the_contract() -> None:
    """not_a_digit when ood_score ≥ threshold; else unsure when the top probability < threshold; else digit."""
    v = Verdict("ood_score", 1.5, 0.9)
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.5, 0.5], [0.89, 0.11], [0.9, 0.1]])
    ood = np.array([-3.0, 1.5, -3.0, 2.0, 1.4999])
    assert v.apply(probs, ood).tolist() == [DIGIT, NOT_A_DIGIT, UNSURE, NOT_A_DIGIT, DIGIT]
    assert Verdict(None, None, 0.9).apply(probs, ood).tolist() == [DIGIT, DIGIT, UNSURE, UNSURE, DIGIT]
    assert v.to_card() == {"ood_output": "ood_score", "not_a_digit_at_or_above": 1.5, "unsure_below_confidence": 0.9}


def test_auroc_matches_counting_pairs() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300).round(1), rng.normal(1, 1, 200).round(1)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs)
    assert auroc(np.zeros(5), np.ones(5)) == 1.0 and auroc(np.ones(5), np.ones(5)) == 0.5


def _outputs(rng: np.random.Generator, n: int, conf: tuple[float, float], ood: tuple[float, float]) -> Outputs:
    c = rng.uniform(*conf, n)
    probs = np.stack([c, 1 - c], axis=1).astype(np.float32)
    return Outputs(probs, rng.normal(*ood, n).astype(np.float32))


def test_fitting_keeps_within_its_limits_and_catches_the_outliers() -> None:
    rng = np.random.default_rng(1)
    val = _outputs(rng, 5000, (0.9, 1.0), (-8, 1))
    y_val = np.zeros(5000, int)
    y_val[np.argsort(val.probs[:, 0])[:10]] = 1  # the ten least confident are wrong
    drawn = _outputs(rng, 1000, (0.9, 1.0), (-7, 1))
    fit = _outputs(rng, 2000, (0.5, 1.0), (2, 2))
    family = np.repeat([0, 1], 1000)
    verdict, info = fit_verdict(val, y_val, drawn, fit, family)
    assert info["feasible"]
    assert info["validation_digits_rejected"] <= trust.FIT_MAX_DIGITS_REJECTED
    assert info["validation_wrong_among_accepted"] <= trust.FIT_MAX_WRONG_AMONG_ACCEPTED
    assert info["fit_min_family_rejected"] > 0.8
    assert verdict.ood_output == "ood_score" and verdict.not_a_digit_at_or_above is not None


def test_when_validation_errors_cannot_all_be_held_back_the_fit_spends_the_budget() -> None:
    """Confident errors no threshold within the budget can catch: the fit lets as few through as it can and spends
    the rest of the budget on the least confident digits, rather than rejecting fewer digits so that the same
    errors make a smaller share (a ratio rises as digits are held back, a count does not)."""
    rng = np.random.default_rng(3)
    n = 5000
    val = _outputs(rng, n, (0.5, 1.0), (-8, 1))
    y_val = np.zeros(n, int)
    y_val[np.argsort(val.probs[:, 0])[-10:]] = 1  # the ten most confident are wrong: no threshold catches them
    drawn = _outputs(rng, 1000, (0.5, 1.0), (-7, 1))
    fit = _outputs(rng, 2000, (0.5, 1.0), (4, 1))
    verdict, info = fit_verdict(val, y_val, drawn, fit, np.repeat([0, 1], 1000))
    assert not info["feasible"] and info["fit_min_family_rejected"] >= trust.TARGET_FAMILY_REJECTED
    assert info["validation_digits_rejected"] >= 0.9 * trust.FIT_MAX_DIGITS_REJECTED, info
    assert info["validation_digits_rejected"] <= trust.FIT_MAX_DIGITS_REJECTED, info
    assert np.mean(val.probs.max(1) < verdict.unsure_below_confidence) >= trust.FIT_MAX_DIGITS_REJECTED / 2


def test_a_model_without_ood_output_gets_a_confidence_only_verdict() -> None:
    rng = np.random.default_rng(2)
    val = _outputs(rng, 2000, (0.9, 1.0), (0, 1))
    no = Outputs(val.probs, None)
    verdict, _ = fit_verdict(
        no, np.zeros(2000, int), Outputs(val.probs[:100], None), Outputs(val.probs[:50], None), np.zeros(50, int)
    )
    assert verdict.ood_output is None and verdict.not_a_digit_at_or_above is None


# ---------------------------------------------------------------------------------------------------------------
# The shipped model


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    return json.loads(CARD.read_text())


def test_card_trust_section_describes_the_shipped_file(card: dict[str, Any]) -> None:
    assert card["name"] == "mnist-cnn" and card["version"] != "1.0.0"
    assert card["onnx"]["sha256"] == hashlib.sha256(ONNX.read_bytes()).hexdigest()
    t = card["trust"]
    assert set(t) >= {"verdict", "calibration", "ood", "selective", "cost"}
    v = t["verdict"]
    assert v["ood_output"] == "ood_score" and isinstance(v["not_a_digit_at_or_above"], float)
    assert 0.0 < v["unsure_below_confidence"] < 1.0
    cal = t["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] > 0 and "validation" in cal["fitted_on"]
    assert cal["test_after"]["ece"] <= 0.01, "calibrated: ECE (15 bins) at most 1 % on the test digits"
    assert (
        cal["test_after"]["nll"] <= cal["test_before"]["nll"]
        and cal["test_after"]["brier"] <= cal["test_before"]["brier"]
    )
    assert cal["test_after"]["accuracy"] == cal["test_before"]["accuracy"] == card["metrics"]["test_accuracy"]
    for key in ("batch_1_ratio", "batch_256_ratio"):
        assert t["cost"][key] >= 0.9, "the trust outputs may cost at most 10 % of throughput"
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "ood_score"]
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_outputs()[1].shape == ["batch"]


def test_the_service_reads_the_verdict_the_card_names(card: dict[str, Any]) -> None:
    from service.model import ModelCard

    rule = ModelCard.from_file(CARD).verdict
    assert rule.ood_output == card["trust"]["verdict"]["ood_output"]
    assert rule.not_a_digit_at_or_above == card["trust"]["verdict"]["not_a_digit_at_or_above"]
    assert rule.unsure_below_confidence == card["trust"]["verdict"]["unsure_below_confidence"]


@pytest.fixture(scope="module")
def shipped(card: dict[str, Any]) -> tuple[trust.TrustData, trust.Evaluation]:
    data = trust.load_data(TrainConfig(**card["training"]["config"]), workers=1)
    v = card["trust"]["verdict"]
    verdict = Verdict(v["ood_output"], v["not_a_digit_at_or_above"], v["unsure_below_confidence"])
    return data, trust.evaluate_model("mnist-cnn", ONNX, data, verdict)


def test_the_shipped_model_meets_the_targets_on_the_held_out_suite(
    shipped: tuple[trust.TrustData, trust.Evaluation], card: dict[str, Any]
) -> None:
    data, ev = shipped
    assert data.held_out.digest() == card["trust"]["ood"]["suite"]["held_out_digest"], "the suite changed"
    fig = ev.figures
    for family in trust.FAMILIES:
        rate = fig["per_family"][family]["not_digit_rate"]
        assert rate >= trust.TARGET_FAMILY_REJECTED, f"{family}: only {rate:.1%} answered other than digit"
    sel = fig["selective"]
    assert sel["test_digits"] == 10_000
    assert sel["test_digits_rejected"] <= trust.TARGET_DIGITS_REJECTED
    assert fig["drawn_digits"]["kept_as_digit"] >= 0.9
    # Wrong answers among the digits answered "digit": the target is 0.1 %. The 1.2.0 model makes 28 errors in
    # 10,000 and its verdict, fitted on validation digits alone, catches 19 of them: 0.091 %.
    assert sel["wrong_among_accepted"] <= trust.TARGET_WRONG_AMONG_ACCEPTED, sel
    met = card["trust"]["targets_met"]
    assert met["wrong_among_accepted_at_most_0_1_percent"] == (sel["wrong_among_accepted"] <= 0.001)
    assert met["every_family_at_least_95_percent"] and met["test_digits_rejected_at_most_1_percent"]


def test_the_card_figures_are_what_onnxruntime_measures_here(
    shipped: tuple[trust.TrustData, trust.Evaluation], card: dict[str, Any]
) -> None:
    _, ev = shipped
    t = card["trust"]
    assert ev.figures["selective"] == t["selective"]
    for family, figures in t["ood"]["held_out"]["per_family"].items():
        for key in ("images", "not_digit_rate", "not_a_digit_rate", "unsure_rate"):
            assert ev.figures["per_family"][family][key] == figures[key], (family, key)
        assert ev.figures["per_family"][family]["auroc"] == pytest.approx(figures["auroc"], abs=1e-4)
    assert ev.figures["drawn_digits"]["kept_as_digit"] == t["drawn_digits"]["kept_as_digit"]


@pytest.mark.parametrize("name", ["mnist-cnn", "mnist-cnn-int8"])
def test_each_cards_verdict_is_what_the_fitting_rule_gives_and_meets_the_targets(
    shipped: tuple[trust.TrustData, trust.Evaluation], name: str
) -> None:
    """Fit the verdict again from validation data and the suite's fit split (never the test set), with the rule in
    training/trust.py, and measure it with onnxruntime: the card's thresholds and held-out figures are exactly
    what comes out, and they meet every target. For int8 this is the check that its card's "targets met" is not a
    hand-edited claim: its thresholds come from the rule alone."""
    onnx_path, card_path = MODELS / f"{name}.onnx", MODELS / f"{name}.json"
    if not onnx_path.exists():
        pytest.skip(f"no {name} shipped")
    data, _ = shipped
    t = json.loads(card_path.read_text())["trust"]
    ev = trust.evaluate_model(name, onnx_path, data)
    assert ev.verdict.to_card() == t["verdict"]
    assert ev.figures["selective"] == t["selective"]
    assert ev.figures["drawn_digits"]["kept_as_digit"] == t["drawn_digits"]["kept_as_digit"]
    families = {f: ev.figures["per_family"][f]["not_digit_rate"] for f in trust.FAMILIES}
    assert families == {f: t["ood"]["held_out"]["per_family"][f]["not_digit_rate"] for f in trust.FAMILIES}
    assert min(families.values()) >= trust.TARGET_FAMILY_REJECTED, families
    assert ev.figures["selective"]["test_digits_rejected"] <= trust.TARGET_DIGITS_REJECTED
    assert ev.figures["selective"]["wrong_among_accepted"] <= trust.TARGET_WRONG_AMONG_ACCEPTED


def test_the_calibration_figures_are_those_of_the_shipped_probabilities(
    shipped: tuple[trust.TrustData, trust.Evaluation], card: dict[str, Any]
) -> None:
    from training.calibrate import calibration_metrics

    data, ev = shipped
    measured = calibration_metrics(ev.outputs["test"].probs, data.y_test)
    for key in ("ece", "nll", "brier", "accuracy"):
        assert measured[key] == pytest.approx(card["trust"]["calibration"]["test_after"][key], abs=2e-4), key
    np.testing.assert_allclose(ev.outputs["test"].probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_blank_pixel_array_is_not_a_digit(card: dict[str, Any]) -> None:
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    probs, ood = session.run(None, {"input": np.zeros((1, 28, 28, 1), np.float32)})
    v = card["trust"]["verdict"]
    assert (
        Verdict(v["ood_output"], v["not_a_digit_at_or_above"], v["unsure_below_confidence"]).apply(probs, ood)[0]
        == NOT_A_DIGIT
    )
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_without_trust_outputs_is_the_same_classifier() -> None:
    plain = trust.without_trust_outputs(ONNX)
    a = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(plain, providers=["CPUExecutionProvider"])
    assert [o.name for o in b.get_outputs()] == ["probabilities"]
    x = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    assert np.array_equal(a.run(["probabilities"], {"input": x})[0].argmax(1), b.run(None, {"input": x})[0].argmax(1))


@pytest.mark.skipif(not INT8.exists(), reason="no int8 model shipped")
def test_the_int8_model_is_held_to_the_same_targets(card: dict[str, Any]) -> None:
    """int8 is judged by its own thresholds on the same suite, against the same targets as the float model: every
    held-out family at least 95 % rejected (its calibration images include drawn digits and non-digits, so its
    ood_score keeps the separation the float one has), at most 1 % of test digits rejected, at most 0.1 % wrong
    among the digits it answers, and its card says every target is met."""
    int8 = json.loads(INT8_CARD.read_text())
    assert int8["quantization"]["from"]["sha256"] == card["onnx"]["sha256"]
    t = int8["trust"]
    assert t["verdict"]["ood_output"] == "ood_score" and t["calibration"]["from"] == "mnist-cnn"
    rates = {f: v["not_digit_rate"] for f, v in t["ood"]["held_out"]["per_family"].items() if f in trust.FAMILIES}
    assert set(rates) == set(trust.FAMILIES)
    assert min(rates.values()) >= trust.TARGET_FAMILY_REJECTED, rates
    assert t["selective"]["test_digits_rejected"] <= trust.TARGET_DIGITS_REJECTED
    assert t["selective"]["wrong_among_accepted"] <= trust.TARGET_WRONG_AMONG_ACCEPTED, t["selective"]
    assert all(t["targets_met"].values()), t["targets_met"]
