"""Evaluation statistics (win-rate intervals, length-controlled win rate, ranking accuracy) against known truths, and
`nashray eval` head to head on two real tiny models."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from nashray.cluster.evaluation import (LC_PRIOR_PRECISION, compare_answers, fit_logistic, length_controlled_win_rate,
                                length_features, win_rate_interval)
from nashray.trainers.ranking import ranking_accuracy, ranking_counts


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def synthetic_judgements(n, intercept, slope, scale, seed=0, mean_diff=40.0):
    """Verdicts whose true model is logit P(a ≻ b) = intercept + slope·tanh((len_a − len_b)/scale); a's answers are
    longer on average, so the raw win rate is inflated by the length effect."""
    rng = np.random.default_rng(seed)
    len_b = rng.integers(20, 200, n).astype(float)
    len_a = np.maximum(1.0, len_b + rng.normal(mean_diff, 60.0, n))
    p = sigmoid(intercept + slope * np.tanh((len_a - len_b) / scale))
    return p, (rng.random(n) < p).astype(float), len_a, len_b


def test_lc_win_rate_recovers_a_known_length_effect_from_hard_verdicts():
    intercept, slope, scale = -0.3, 2.0, 60.0
    p, hard, len_a, len_b = synthetic_judgements(20000, intercept, slope, scale)
    lc = length_controlled_win_rate(hard, len_a, len_b, scale=scale)
    truth = float(sigmoid(intercept))  # 0.426: a is worse than b at equal length
    assert lc["lc_win_rate"] == pytest.approx(truth, abs=0.015)
    assert lc["lc_win_rate_low"] < truth < lc["lc_win_rate_high"]
    assert lc["lc_win_rate_high"] - lc["lc_win_rate_low"] < 0.05
    assert lc["lc_length_coef"] == pytest.approx(slope, abs=0.15)
    # the raw win rate says a is better: the length effect, which LC removes
    assert hard.mean() > 0.55


def test_lc_win_rate_on_soft_verdicts_is_the_exact_intercept():
    intercept, slope, scale = 0.7, -1.2, 50.0
    p, _, len_a, len_b = synthetic_judgements(5000, intercept, slope, scale, seed=1)
    lc = length_controlled_win_rate(p, len_a, len_b, scale=scale)
    # the model is exact for soft targets: only the weak priors move the optimum, by O(λ / n)
    assert lc["lc_win_rate"] == pytest.approx(sigmoid(intercept), abs=2e-4)
    assert lc["lc_length_coef"] == pytest.approx(slope, abs=2e-3)


def test_lc_win_rate_default_scale_and_symmetry():
    _, hard, len_a, len_b = synthetic_judgements(3000, 0.4, 1.5, 60.0, seed=2)
    ab = length_controlled_win_rate(hard, len_a, len_b)
    ba = length_controlled_win_rate(1 - hard, len_b, len_a)
    assert ab["lc_win_rate"] == pytest.approx(1 - ba["lc_win_rate"], abs=1e-9)
    assert ab["lc_length_coef"] == pytest.approx(ba["lc_length_coef"], abs=1e-9)  # "longer wins" either way
    diff = len_a - len_b
    assert np.allclose(length_features(len_a, len_b), np.tanh(diff / diff.std()))


def test_lc_win_rate_without_length_differences_is_the_raw_win_rate():
    rng = np.random.default_rng(3)
    verdicts = (rng.random(4000) < 0.7).astype(float)
    lengths = rng.integers(5, 50, 4000)
    lc = length_controlled_win_rate(verdicts, lengths, lengths)
    assert lc["lc_win_rate"] == pytest.approx(verdicts.mean(), abs=1e-3)
    assert lc["lc_length_coef"] == 0.0


def test_lc_fit_is_finite_and_stationary_on_separated_verdicts():
    """A length-only judge (shorter always wins) separates the data perfectly: the priors keep the fit finite, and
    the Newton iterations end at the penalised optimum (zero gradient)."""
    len_a = np.array([10, 50, 12, 80, 30, 31, 9, 200], dtype=float)
    len_b = np.array([20, 40, 30, 20, 31, 30, 10, 100], dtype=float)
    verdicts = (len_a < len_b).astype(float)
    x = length_features(len_a, len_b)
    X = np.stack([np.ones_like(x), x], 1)
    w, covariance = fit_logistic(X, verdicts, LC_PRIOR_PRECISION)
    gradient = X.T @ (verdicts - sigmoid(X @ w)) - np.asarray(LC_PRIOR_PRECISION) * w
    assert np.abs(gradient).max() < 1e-8
    assert np.isfinite(covariance).all() and w[1] < -3  # longer loses, strongly
    lc = length_controlled_win_rate(verdicts, len_a, len_b)
    assert 0.0 < lc["lc_win_rate_low"] < lc["lc_win_rate"] < lc["lc_win_rate_high"] < 1.0


def test_win_rate_interval_is_wilson():
    mean, low, high = win_rate_interval([1.0] * 8)
    z = 1.959963984540054
    assert (mean, high) == (1.0, 1.0) and low == pytest.approx(8 / (8 + z * z))
    mean, low, high = win_rate_interval([1.0] * 50 + [0.0] * 50)
    assert mean == 0.5 and low == pytest.approx(0.40383, abs=1e-4) and high == pytest.approx(0.59617, abs=1e-4)
    with pytest.raises(ValueError, match="non-empty"):
        win_rate_interval([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate_interval([0.5, 1.2])


def test_win_rate_interval_covers_the_truth_at_the_nominal_rate():
    rng = np.random.default_rng(4)
    hits = 0
    for _ in range(2000):
        _, low, high = win_rate_interval((rng.random(30) < 0.8).astype(float))
        hits += low <= 0.8 <= high
    assert 0.93 < hits / 2000 < 0.975


def test_ranking_accuracy_counts_decided_pairs_by_log_ratio():
    import torch
    # log-ratios a: [1, -1, 0.5, 0, 2], b: [0, 0, 0.5, 0, 1] → margins [1, -1, 0, 0, 1]
    logp_a = torch.tensor([-3.0, -5.0, -2.5, -4.0, -1.0])
    ref_a = torch.tensor([-4.0, -4.0, -3.0, -4.0, -3.0])
    logp_b = [-2.0, -6.0, -1.5, -1.0, -2.0]
    ref_b = [-2.0, -6.0, -2.0, -1.0, -3.0]
    target = [1.0, 0.0, 1.0, 0.5, 0.3]  # pair 3 is a tie (not decided); pair 4 prefers b
    # right: pair 0 (a preferred, margin > 0), pair 1 (b preferred, margin < 0); half: pair 2 (tie in log-ratio);
    # wrong: pair 4 (b preferred, margin > 0)
    assert ranking_counts(logp_a, logp_b, ref_a, ref_b, target) == (2.5, 4)
    assert ranking_accuracy(logp_a, logp_b, ref_a, ref_b, target) == 2.5 / 4
    assert ranking_accuracy([0.0], [0.0], [0.0], [0.0], [0.5]) is None
    with pytest.raises(ValueError, match="lengths differ"):
        ranking_counts([0.0], [0.0, 1.0], [0.0], [0.0], [1.0])


def test_ranking_accuracy_of_the_reference_itself_is_a_coin_flip():
    rng = np.random.default_rng(5)
    ref_a, ref_b = rng.normal(-20, 5, 50), rng.normal(-20, 5, 50)
    assert ranking_accuracy(ref_a, ref_b, ref_a, ref_b, rng.integers(0, 2, 50).astype(float)) == 0.5


def test_compare_answers_leaves_dropped_verdicts_out():
    out = compare_answers([1.0, None, 0.0, 1.0], ["a", "bb", "ccc", "dddd"], ["xx", "y", "zz", "w"], "a_vs_b")
    mean, low, high = win_rate_interval([1.0, 0.0, 1.0])
    assert (out["win_rate_a_vs_b"], out["win_rate_a_vs_b_low"], out["win_rate_a_vs_b_high"]) == (mean, low, high)
    lc = length_controlled_win_rate([1.0, 0.0, 1.0], [1, 3, 4], [2, 2, 1])
    assert out["lc_win_rate_a_vs_b"] == lc["lc_win_rate"]
    assert compare_answers([None], ["a"], ["b"], "x") == {}


# ------------------------------------------------------------------------------------------ nashray eval

@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A copy of the tiny model with every weight moved by noise: a different policy with the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    target = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(tiny_model_dir, target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5 * (p.std() if p.numel() > 1 else 1.0))
    model.save_pretrained(target)
    return str(target)


def run_eval(*argv) -> int:
    from nashray.cluster.cli import main
    return main(["eval", *argv])


def test_eval_cli_a_model_against_itself_ties(tiny_model_dir, tmp_path):
    out = tmp_path / "self.json"
    assert run_eval(tiny_model_dir, tiny_model_dir, "--oracle", "rule:concise_answer", "--limit", "4",
                    "--max-new-tokens", "12", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 4 and result["dropped"] == 0
    # same weights, same seed: the same answers, which the rule judge ties
    assert all(r["response_a"] == r["response_b"] and r["prob"] == 0.5 for r in result["rows"])
    assert result["win_rate_a_vs_b"] == 0.5 and result["lc_win_rate_a_vs_b"] == pytest.approx(0.5, abs=1e-12)


def test_eval_cli_checkpoint_against_perturbed_copy(tiny_model_dir, perturbed_model_dir, tmp_path, capsys):
    from nashray.oracles.rules import build_rule
    out = tmp_path / "h2h.json"
    assert run_eval(tiny_model_dir, perturbed_model_dir, "--oracle", "rule:concise_answer", "--limit", "6",
                    "--max-new-tokens", "16", "--engine", "hf", "--out", str(out)) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == {k: v for k, v in result.items() if k != "rows"}
    rows = result["rows"]
    assert len(rows) == 6 and any(r["response_a"] != r["response_b"] for r in rows)
    # the verdicts are the rule's on exactly these answers, and the statistics are those of the verdicts
    rule = build_rule("concise_answer")
    assert [r["prob"] for r in rows] == [rule.prefer(r["prompt"], r["response_a"], r["response_b"]) for r in rows]
    expected = compare_answers([r["prob"] for r in rows], [r["response_a"] for r in rows],
                               [r["response_b"] for r in rows], "a_vs_b")
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert 0 <= result["win_rate_a_vs_b_low"] <= result["win_rate_a_vs_b"] <= result["win_rate_a_vs_b_high"] <= 1
    assert not math.isnan(result["lc_win_rate_a_vs_b"])
