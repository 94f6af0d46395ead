"""Pair planning, win rates, Bradley-Terry fits, and each algorithm's plan / records / loss wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nashray.cluster.config import DNO, INPO, SPPO, XPO, IterativeDPO, NashMD, OnlineDPO, OnlineIPO
from nashray.trainers import losses
from nashray.trainers.algorithms import ALGORITHMS, get_algorithm
from nashray.trainers.pairs import (best_vs_worst, fit_bradley_terry, hard_label, plan_comparisons, scores_to_probs,
                            win_rates)


def _connected(k, pairs):
    seen, frontier = {0}, [0]
    while frontier:
        node = frontier.pop()
        for i, j in pairs:
            for a, b in ((i, j), (j, i)):
                if a == node and b not in seen:
                    seen.add(b)
                    frontier.append(b)
    return len(seen) == k


# ------------------------------------------------------------------------------------------------- plans

def test_all_pairs_plans_every_unordered_pair_once():
    pairs = plan_comparisons(6, "all_pairs")
    assert len(pairs) == 15 and all(i < j for i, j in pairs) and len(set(pairs)) == 15


def test_all_pairs_budget_keeps_a_random_distinct_subset():
    pairs = plan_comparisons(10, "all_pairs", budget=7, rng=np.random.default_rng(3))
    assert len(pairs) == 7 and len(set(pairs)) == 7
    assert set(pairs) <= set(plan_comparisons(10, "all_pairs"))
    other = plan_comparisons(10, "all_pairs", budget=7, rng=np.random.default_rng(4))
    assert set(other) != set(pairs)  # a random subset, not the first pairs of sample 0


@pytest.mark.parametrize("k", [3, 5, 8, 11])
def test_round_robin_is_connected_with_2k_pairs_for_two_neighbours(k):
    pairs = plan_comparisons(k, "round_robin", neighbours=2)
    unordered = {(min(p), max(p)) for p in pairs}
    assert len(unordered) == len(pairs) == min(2 * k, k * (k - 1) // 2)
    assert _connected(k, pairs)


def test_round_robin_budget_keeps_the_cycle_first():
    pairs = plan_comparisons(8, "round_robin", budget=9)
    assert len(pairs) == 9 and pairs[:8] == [(i, (i + 1) % 8) for i in range(8)]
    assert _connected(8, pairs[:8])
    assert plan_comparisons(8, "round_robin", budget=8, neighbours=None) == [(i, (i + 1) % 8) for i in range(8)]


def test_round_robin_with_two_samples_is_one_pair():
    assert plan_comparisons(2, "round_robin") == [(0, 1)]


def test_score_strategy_plans_no_pairs_and_unknown_strategy_is_named():
    assert plan_comparisons(5, "score") == []
    with pytest.raises(ValueError, match="unknown comparison strategy 'swiss'"):
        plan_comparisons(5, "swiss")


# ------------------------------------------------------------------------------------ win rates and BT

def test_win_rates_are_leave_one_out_means_and_nan_without_comparisons():
    judged = {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 0.25}
    rates = win_rates(4, judged)
    np.testing.assert_allclose(rates[:3], [(1.0 + 0.5) / 2, (0.0 + 0.25) / 2, (0.5 + 0.75) / 2])
    assert math.isnan(rates[3])


def test_win_rates_estimate_preference_against_the_other_samples():
    rng = np.random.default_rng(0)
    P = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]])
    pi = np.array([0.5, 0.3, 0.2])
    k = 400
    actions = rng.choice(3, size=k, p=pi)
    judged = {(i, j): float(rng.random() < P[actions[i], actions[j]]) for i, j in plan_comparisons(k, "all_pairs")}
    rates = win_rates(k, judged)
    pairwise = P[actions[:, None], actions[None, :]]
    expected = (pairwise.sum(1) - 0.5) / (k - 1)  # mean over j ≠ i of P(y_i ≻ y_j): the diagonal is ½
    for a in range(3):
        assert abs(rates[actions == a].mean() - expected[actions == a].mean()) < 0.01


def test_win_rates_reject_bad_pairs():
    with pytest.raises(ValueError, match=r"judged pair \(1, 1\)"):
        win_rates(3, {(1, 1): 0.5})
    with pytest.raises(ValueError, match="outside"):
        win_rates(3, {(0, 1): 1.5})


def test_scores_to_probs_is_bradley_terry():
    probs = scores_to_probs([0.0, 1.0, -2.0])
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs + probs.T, 1.0)
    np.testing.assert_allclose(probs[1, 0], 1 / (1 + np.exp(-1.0)))


def test_fit_bradley_terry_recovers_scores_and_stays_finite_when_one_wins_everything():
    s = np.array([0.3, -1.0, 1.2, 0.0, -0.4])
    P = scores_to_probs(s)
    judged = {(i, j): P[i, j] for i, j in plan_comparisons(5, "all_pairs")}
    fitted = fit_bradley_terry(5, judged, l2=1e-9)
    np.testing.assert_allclose(fitted - fitted.mean(), s - s.mean(), atol=1e-6)

    dominant = fit_bradley_terry(4, {(0, 1): 1.0, (0, 2): 1.0, (1, 2): 1.0})
    assert np.all(np.isfinite(dominant[:3])) and math.isnan(dominant[3])
    assert dominant[0] > dominant[1] > dominant[2]


def test_best_vs_worst_and_hard_label():
    assert best_vs_worst([0.2, np.nan, 0.9, 0.5]) == (2, 0)
    assert best_vs_worst([0.2, 0.9], margin=0.7) is None
    assert best_vs_worst([0.5, 0.5]) is None
    assert best_vs_worst([np.nan, np.nan]) is None
    assert hard_label(0.7) == 1.0 and hard_label(0.2) == 0.0 and hard_label(0.5) is None


# ---------------------------------------------------------------------------------------------- algorithms

def _sample(index, action, source="policy", version=3, prompt="p0"):
    return {"prompt_id": prompt, "prompt": prompt, "prompt_ids": [0], "response": str(action),
            "response_ids": [action], "logprob": -1.0, "version": version, "source": source, "sample_index": index}


def _policy_samples(actions, version=3):
    return [_sample(i, a, version=version) for i, a in enumerate(actions)]


def test_every_algorithm_is_registered_with_consistent_needs():
    assert sorted(ALGORITHMS) == sorted(["online_dpo", "online_ipo", "iterative_dpo", "sppo", "dno", "inpo", "xpo",
                                        "nash_md"])
    assert get_algorithm("xpo").ref_samples == 1 and "x" in get_algorithm("xpo").sequences
    assert get_algorithm("nash_md").mixture_samples == 1 and get_algorithm("nash_md").sequences == ("a",)
    assert get_algorithm("inpo").needs_pi_t and get_algorithm("inpo").needs_ref
    assert get_algorithm("dno").needs_pi_t and not get_algorithm("dno").needs_ref
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        get_algorithm("ppo")


def test_pair_algorithms_plan_among_policy_samples_only():
    samples = _policy_samples([0, 1, 2]) + [_sample(0, 2, source="ref")]
    plan = get_algorithm("xpo").plan(samples, "all_pairs", None, np.random.default_rng(0))
    assert plan == [(0, 1), (0, 2), (1, 2)]


def test_nash_md_plans_each_policy_sample_against_its_mixture_sample():
    samples = [_sample(1, 0, "mixture"), _sample(0, 2), _sample(1, 1), _sample(0, 0, "mixture")]
    assert get_algorithm("nash_md").plan(samples, "all_pairs", None, None) == [(1, 3), (2, 0)]
    with pytest.raises(ValueError, match="no mixture sample"):
        get_algorithm("nash_md").plan(samples[1:3], "all_pairs", None, None)


def test_online_dpo_records_hard_labels_drop_ties_and_carry_versions():
    samples = _policy_samples([0, 1, 2], version=7)
    judged = {(0, 1): 0.9, (0, 2): 0.5, (1, 2): 0.0}
    records = get_algorithm("online_dpo").build_records(samples, judged, OnlineDPO(name="online_dpo"))
    assert [(r["a_ids"], r["b_ids"], r["target"]) for r in records] == [([0], [1], 1.0), ([1], [2], 0.0)]
    assert all(r["a_version"] == r["b_version"] == 7 and r["x_ids"] == [] and r["prompt_ids"] == [0]
               for r in records)
    soft = get_algorithm("online_ipo").build_records(samples, judged, OnlineIPO(name="online_ipo", label="soft"))
    assert [r["target"] for r in soft] == [0.9, 0.5, 0.0]


def test_xpo_records_attach_a_reference_sample():
    samples = _policy_samples([0, 1]) + [_sample(0, 4, source="ref", version=0)]
    records = get_algorithm("xpo").build_records(samples, {(0, 1): 1.0}, XPO(name="xpo"))
    assert records[0]["x_ids"] == [4] and records[0]["target"] == 1.0
    with pytest.raises(ValueError, match="needs a π_ref sample"):
        get_algorithm("xpo").build_records(samples[:2], {(0, 1): 1.0}, XPO(name="xpo"))


def test_iterative_dpo_takes_best_vs_worst_by_fitted_bradley_terry_score():
    samples = _policy_samples([0, 1, 2, 3])
    judged = {(0, 1): 0.2, (0, 2): 0.6, (1, 2): 0.9, (2, 3): 0.7, (1, 3): 0.95, (0, 3): 0.6}
    (record,) = get_algorithm("iterative_dpo").build_records(samples, judged, IterativeDPO(name="iterative_dpo"))
    assert (record["a_ids"], record["b_ids"], record["target"]) == ([1], [3], 1.0)
    assert record["a_score"] > record["b_score"]


def test_dno_practical_takes_the_win_rate_extremes_above_the_margin():
    samples = _policy_samples([0, 1, 2])
    judged = {(0, 1): 1.0, (0, 2): 1.0, (1, 2): 1.0}  # rates 1, 0.5, 0
    (record,) = get_algorithm("dno").build_records(samples, judged, DNO(name="dno"))
    assert (record["a_ids"], record["b_ids"], record["target"]) == ([0], [2], 1.0)
    assert (record["a_score"], record["b_score"]) == (1.0, 0.0)
    assert get_algorithm("dno").build_records(
        samples, {(0, 1): 0.6, (0, 2): 0.6, (1, 2): 0.5}, DNO(name="dno", margin=0.2)) == []


def test_dno_regression_records_every_pair_with_win_rate_scores():
    samples = _policy_samples([0, 1, 2])
    judged = {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 0.0}
    records = get_algorithm("dno").build_records(samples, judged, DNO(name="dno", variant="regression"))
    rates = win_rates(3, judged)
    assert len(records) == 3
    for r, (i, j) in zip(records, judged):
        assert (r["a_score"], r["b_score"]) == (rates[i], rates[j])
        assert r["target"] == pytest.approx(1 / (1 + np.exp(rates[j] - rates[i])))


def test_sppo_records_single_responses_with_win_rates_and_drops_unjudged():
    samples = _policy_samples([0, 1, 2])
    records = get_algorithm("sppo").build_records(samples, {(0, 1): 0.25}, SPPO(name="sppo"))
    assert [(r["a_ids"], r["b_ids"], r["target"]) for r in records] == [([0], [], 0.25), ([1], [], 0.75)]
    assert all(r["b_version"] == -1 for r in records)


def test_nash_md_records_preference_against_the_mixture_in_either_orientation():
    samples = [_sample(0, 2), _sample(1, 1), _sample(0, 0, "mixture"), _sample(1, 1, "mixture")]
    records = get_algorithm("nash_md").build_records(samples, {(0, 2): 1.0, (3, 1): 1.0}, NashMD(name="nash_md"))
    assert [(r["a_ids"], r["b_ids"], r["target"]) for r in records] == [([2], [], 1.0), ([1], [], 0.0)]


def test_records_refuse_mixed_prompts_and_foreign_configs():
    samples = [_sample(0, 0), _sample(1, 1, prompt="p1")]
    with pytest.raises(ValueError, match="per prompt"):
        get_algorithm("online_dpo").build_records(samples, {(0, 1): 1.0}, OnlineDPO(name="online_dpo"))
    with pytest.raises(ValueError, match="got the config of 'inpo'"):
        get_algorithm("sppo").build_records(_policy_samples([0, 1]), {(0, 1): 1.0}, INPO(name="inpo"))


def test_algorithm_losses_use_the_right_reference():
    """DNO (both variants) and SPPO step from π_t; DPO/IPO/XPO from π_ref; INPO and Nash-MD (its importance ratio
    to π_t, unless clip_ratio is null) use both."""
    g = torch.Generator().manual_seed(0)
    lp = {f"{kind}_{seq}": -torch.rand(4, generator=g, dtype=torch.float64) * 3
          for kind in ("theta", "t", "ref") for seq in ("a", "b", "x")}
    batch = {"target": torch.tensor([1.0, 0.0, 0.7, 0.3], dtype=torch.float64),
             "a_score": torch.rand(4, generator=g, dtype=torch.float64),
             "b_score": torch.rand(4, generator=g, dtype=torch.float64)}
    th, t, ref = (lambda s: lp[f"theta_{s}"]), (lambda s: lp[f"t_{s}"]), (lambda s: lp[f"ref_{s}"])
    y = batch["target"]
    cases = [
        ("online_dpo", OnlineDPO(name="online_dpo"), losses.dpo_loss(th("a"), th("b"), ref("a"), ref("b"), 0.1, y)),
        ("iterative_dpo", IterativeDPO(name="iterative_dpo"),
         losses.dpo_loss(th("a"), th("b"), ref("a"), ref("b"), 0.1, y)),
        ("online_ipo", OnlineIPO(name="online_ipo"), losses.ipo_loss(th("a"), th("b"), ref("a"), ref("b"), 0.1, y)),
        ("dno", DNO(name="dno"), losses.dpo_loss(th("a"), th("b"), t("a"), t("b"), 0.1, y)),
        ("dno", DNO(name="dno", variant="regression", beta=0.5),
         losses.dno_regression_loss(th("a"), th("b"), t("a"), t("b"), batch["a_score"], batch["b_score"], 0.5)),
        ("sppo", SPPO(name="sppo"), losses.sppo_loss(th("a"), t("a"), y, 1.0)),
        ("inpo", INPO(name="inpo"), losses.inpo_loss(th("a"), th("b"), t("a"), t("b"), ref("a"), ref("b"), 1.0,
                                                     0.1, y)),
        ("xpo", XPO(name="xpo", alpha=0.5), losses.xpo_loss(th("a"), th("b"), ref("a"), ref("b"), th("x"), 0.1,
                                                            0.5, y)),
        ("nash_md", NashMD(name="nash_md"), losses.nash_md_clipped_loss(th("a"), t("a"), ref("a"), y, 0.1, 0.125,
                                                                         0.2)),
        ("nash_md", NashMD(name="nash_md", clip_ratio=None), losses.nash_md_loss(th("a"), ref("a"), y, 0.1)),
    ]
    for name, cfg, expected in cases:
        algorithm = get_algorithm(name)
        needed = {f"theta_{s}" for s in algorithm.sequences}
        needed |= {f"t_{s}" for s in algorithm.sequences} if algorithm.needs_pi_t else set()
        needed |= {f"ref_{s}" for s in algorithm.sequences} if algorithm.needs_ref else set()
        got = algorithm.loss({k: v for k, v in lp.items() if k in needed}, batch, cfg)
        torch.testing.assert_close(got, expected, msg=f"{name} ({cfg})")
