"""General (non-Bradley-Terry) preferences from real parts: the sentiment judge, panels and their votes, cyclic
triads, feature games and their exact exploitability — in unit tests and in real campaigns."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from nashray.oracles import build_oracle
from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.config import EnsembleOracleConfig, SentimentOracleConfig, parse_oracle_config
from nashray.trainers.pairs import cyclic_triads

PANEL = {"kind": "ensemble", "combine": "majority", "members": [
    {"kind": "sentiment", "prefer": "positive"},
    {"kind": "rule", "rule": "concise_answer"},
    {"kind": "rule", "rule": "cyclic", "options": {"feature": "words", "bins": [3, 6]}},
]}


# --------------------------------------------------------------------------------------------- oracles

def test_sentiment_oracle_prefers_the_more_positive_answer_with_a_logistic_link():
    from nashray.oracles.sentiment import Sentiment
    oracle = build_oracle(SentimentOracleConfig(kind="sentiment", sharpness=2.0))
    a, b = "What a wonderful, happy day!", "This is a terrible, sad day."
    [v] = oracle.compare([Comparison("x", a, b)])
    gap = Sentiment.compound(a) - Sentiment.compound(b)
    assert gap > 1.0
    assert v.prob == pytest.approx(1 / (1 + np.exp(-2.0 * gap)))
    negative = build_oracle(SentimentOracleConfig(kind="sentiment", prefer="negative", sharpness=2.0))
    [w] = negative.compare([Comparison("x", a, b)])
    assert w.prob == pytest.approx(1 - v.prob)
    assert oracle.score(["x", "x"], [a, b])[0] > 0 > oracle.score(["x", "x"], [a, b])[1]


class _Ranking(PreferenceOracle):
    """A transitive member ranking answers by a fixed order (a unit-test stand-in for a judge's ranking)."""

    def __init__(self, order: str):
        self.order, self.oracle_id = order, f"ranking:{order}"

    def compare(self, comparisons):
        return [Verdict(float(self.order.index(c.a) < self.order.index(c.b))) for c in comparisons]


def test_panel_of_transitive_members_in_rotated_orders_has_a_majority_cycle():
    """Condorcet: members ranking a ≻ b ≻ c, b ≻ c ≻ a and c ≻ a ≻ b each alone have no cyclic triad; their
    majority has one, and every verdict carries the three votes behind it."""
    from nashray.oracles.ensemble import EnsembleOracle
    panel = EnsembleOracle([_Ranking("abc"), _Ranking("bca"), _Ranking("cab")], combine="majority")
    pairs = list(itertools.combinations(range(3), 2))
    verdicts = panel.compare([Comparison("x", "abc"[i], "abc"[j]) for i, j in pairs])
    for m in range(3):
        assert cyclic_triads(3, {pair: v.votes[m] for pair, v in zip(pairs, verdicts)}) == (0, 1)
    assert cyclic_triads(3, {pair: v.prob for pair, v in zip(pairs, verdicts)}) == (1, 1)
    mean = EnsembleOracle([_Ranking("abc"), _Ranking("bca"), _Ranking("cab")], combine="mean")
    assert [v.prob for v in mean.compare([Comparison("x", "a", "b")])] == [pytest.approx(2 / 3)]


def test_panel_weights_decide_a_split_vote_and_are_validated():
    from nashray.cluster.config import ConfigError, parse_config
    a, b = "Great, wonderful, lovely!", "ok"
    members = [{"kind": "sentiment"}, {"kind": "rule", "rule": "concise_answer", "options": {"min_chars": 1}}]
    even = build_oracle(EnsembleOracleConfig(kind="ensemble", combine="majority", members=members))
    heavy = build_oracle(EnsembleOracleConfig(kind="ensemble", combine="majority", members=members, weights=[2.0, 1.0]))
    assert even.compare([Comparison("x", a, b)])[0].prob == 0.5
    assert heavy.compare([Comparison("x", a, b)])[0].prob == 1.0
    assert even.oracle_id != heavy.oracle_id  # the cache never mixes their verdicts
    with pytest.raises(ConfigError, match="judges.oracle.ensemble: .*weights must be 2 positive numbers"):
        parse_config({"judges": {"oracle": {"kind": "ensemble", "members": members, "weights": [1.0]}}})


def test_readable_rule_prefers_the_easier_text_whatever_its_length():
    from nashray.oracles.rules import build_rule
    rule = build_rule("readable")
    plain = "The cat sat. It was warm. We all had tea and cake."
    dense = "Institutional considerations necessitate comprehensive organizational reevaluation."
    assert [v.prob for v in rule.compare([Comparison("x", plain, dense), Comparison("x", dense, plain),
                                          Comparison("x", plain, plain), Comparison("x", "", plain)])
            ] == [1.0, 0.0, 0.5, 0.5]
    assert build_rule("readable", {"margin": 1000.0}).prefer("x", plain, dense) == 0.5
    with pytest.raises(ValueError, match="margin must be a number ≥ 0"):
        build_rule("readable", {"margin": -1})
    # words no pronouncing dictionary holds (a sampled answer had "relativist" and "eman") are scored, not raised on
    made_up = rule.compare([Comparison("x", "The relativist eman sat.", "Zyzzyvas quarbled flimpishly.")])
    assert made_up[0].prob in (0.0, 1.0) and made_up[0].reason is None


def test_sentiment_brevity_and_readability_vote_a_condorcet_cycle():
    """The benchmark's panel (bench/algorithms.py): three transitive members, a cyclic majority."""
    panel = build_oracle(parse_oracle_config({"kind": "ensemble", "combine": "majority", "members": [
        {"kind": "sentiment", "prefer": "positive"}, {"kind": "rule", "rule": "concise_answer"},
        {"kind": "rule", "rule": "readable"}]}))
    short_dense = "Regrettably, comprehensive documentation remains unavailable."            # short, hard, negative
    long_plain_neutral = "You can do it. Go to the shop. Get some milk. Then go back home and rest a bit."
    mid_happy_hard = "Wonderful, extraordinarily magnificent organizational methodologies."  # positive, hardest
    answers = [short_dense, long_plain_neutral, mid_happy_hard]
    judged = {(i, j): panel.compare([Comparison("x", answers[i], answers[j])])[0].prob
              for i, j in itertools.combinations(range(3), 2)}
    assert cyclic_triads(3, judged) == (1, 1), judged


def test_a_panel_member_that_fails_to_load_is_named():
    with pytest.raises(ValueError, match=r"ensemble member 1 \(llm_judge\) could not be built"):
        build_oracle(parse_oracle_config({"kind": "ensemble", "members": [
            {"kind": "sentiment"}, {"kind": "llm_judge", "model": "/nonexistent/judge-model"}]}))


def test_cyclic_rule_features_and_their_game():
    from nashray.oracles.rules import build_rule
    words = build_rule("cyclic", {"feature": "words", "bins": [3, 6]})
    assert [words.feature(" ".join(["w"] * n)) for n in (0, 2, 3, 5, 6, 40)] == [0, 0, 1, 1, 2, 2]
    M = words.feature_game()
    assert M.shape == (3, 3) and np.allclose(M + M.T, 1.0)
    assert M[0, 1] == M[1, 2] == M[2, 0] == 1.0  # short ≻ medium ≻ long ≻ short
    for a, b in itertools.product(["a", "a b c d", "a b c d e f g h"], repeat=2):
        assert words.prefer("x", a, b) == M[words.feature(a), words.feature(b)]
    sentiment = build_rule("cyclic", {"feature": "sentiment", "strength": 0.5})
    assert sentiment.feature("I hate it") == 0 and sentiment.feature("It is.") == 1
    assert sentiment.feature("Lovely!") == 2 and sentiment.feature_game()[0, 1] == 0.75
    with pytest.raises(ValueError, match="gives 3 classes, but classes = 5"):
        build_rule("cyclic", {"feature": "words", "bins": [3, 6], "classes": 5})
    with pytest.raises(ValueError, match="bins must be increasing"):
        build_rule("cyclic", {"feature": "words", "bins": [6, 3]})
    with pytest.raises(ValueError, match="bins .* go with feature 'words'"):
        build_rule("cyclic", {"bins": [3]})


def test_cyclic_triads_count_cycles_and_skip_ties_and_missing_pairs():
    cycle = {(0, 1): 0.9, (1, 2): 0.8, (0, 2): 0.3}
    assert cyclic_triads(3, cycle) == (1, 1)
    assert cyclic_triads(3, {(0, 1): 0.9, (1, 2): 0.8, (0, 2): 0.7}) == (0, 1)
    assert cyclic_triads(3, {(0, 1): 0.9, (1, 2): 0.5, (0, 2): 0.3}) == (0, 0)  # a tie decides nothing
    assert cyclic_triads(3, {(0, 1): 0.9, (1, 2): 0.8}) == (0, 0)
    # a Bradley-Terry judge is never cyclic
    rng = np.random.default_rng(0)
    scores = rng.normal(size=7)
    bt = {(i, j): 1 / (1 + np.exp(scores[j] - scores[i])) for i, j in itertools.combinations(range(7), 2)}
    assert cyclic_triads(7, bt) == (0, 35)


def test_feature_game_metrics_match_the_closed_form():
    from scipy.special import logsumexp

    from nashray.cluster.evaluation import feature_game_metrics
    from nashray.oracles.games import regularized_exploitability, regularized_nash
    from nashray.oracles.rules import build_rule
    M = build_rule("cyclic", {"feature": "words", "bins": [3, 6]}).feature_game()
    policy = [0] * 30 + [1] * 20 + [2] * 14
    ref = [0] * 40 + [1] * 16 + [2] * 8
    kl = np.linspace(0.0, 0.4, 64)
    out = feature_game_metrics(M, policy, ref, kl, tau=0.1, bootstrap=300)
    q, r = np.array([30, 20, 14]) / 64, np.array([40, 16, 8]) / 64
    assert out["feature_exploitability"] == pytest.approx((M @ q).max() - 0.5)
    expected = 0.1 * logsumexp(M @ q / 0.1, b=r) + 0.1 * kl.mean() - 0.5
    assert out["feature_regularized_exploitability"] == pytest.approx(expected)
    assert out["feature_exploitability_low"] <= out["feature_exploitability"] <= out["feature_exploitability_high"]
    # With the class-level KL in place of the sequence KL the formula is the tabular one (a sanity anchor).
    class_kl = float(np.sum(q * np.log(q / r)))
    out_tab = feature_game_metrics(M, policy, ref, np.full(64, class_kl), tau=0.1, bootstrap=10)
    assert out_tab["feature_regularized_exploitability"] == pytest.approx(
        regularized_exploitability(M, r, q, 0.1), abs=1e-9)
    nash = regularized_nash(M, (np.array([40, 16, 8]) + 0.5) / 65.5, 0.1)
    assert out["feature_regularized_nash"] == pytest.approx(nash.tolist())
    assert feature_game_metrics(M, policy, ref, None, 0.1, bootstrap=10).keys().isdisjoint(
        {"feature_regularized_exploitability"})


def test_judge_statistics_of_a_round():
    from nashray.cluster.driver import judge_statistics
    samples = [{"source": "policy"}] * 3
    judged = {"p": {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 0.0}}
    rows = [{"prob": 1.0, "votes": [1.0, 0.0]}, {"prob": 1.0, "votes": [0.9, 0.5]}, {"prob": 0.0, "votes": [0.2, 0.4]},
            {"prob": 0.5, "votes": [1.0, 0.0]}, {"prob": 1.0, "votes": None}]
    out = judge_statistics(rows, judged, {"p": samples}, ["0:a", "1:b"])
    assert out["judge_cyclic_triads"] == 1.0 and out["judge_decided_triads"] == 1
    assert out["judge_agreement/0:a"] == 1.0 and out["judge_agreement/1:b"] == 0.5


# -------------------------------------------------------------------------------------------- campaigns

@pytest.mark.ray
def test_tiny_llm_campaign_under_a_panel_judge_records_votes_cycles_and_agreement(ray_cluster, tmp_path,
                                                                                  tiny_model_dir):
    """A real campaign (vLLM generator, judge actor, DeepSpeed learner) judged by a panel: every fresh verdict keeps
    the members' votes in judgements.parquet, and the round's cyclic-triad share and member agreement are what the
    persisted verdicts say."""
    from nashray.cluster.driver import run_campaign
    from nashray.layout import read_table
    from tests.test_campaign import llm_config

    run = run_campaign(llm_config(tmp_path, tiny_model_dir, {"name": "inpo"}, rounds=2,
                                  judges={"count": 1, "oracle": PANEL},
                                  schedule={"rounds": 2, "prompts_per_round": 4, "samples_per_prompt": 4}))
    metrics = run.metrics()
    assert [m["round"] for m in metrics] == [0, 1]
    oracle = build_oracle(parse_oracle_config(PANEL))
    for t, m in enumerate(metrics):
        samples = {s["prompt_id"]: s for s in read_table(run.round_dir(t) / "samples.parquet")}
        rows = read_table(run.round_dir(t) / "judgements.parquet")
        assert len(rows) == 4 * 6
        by_prompt: dict = {}
        for s in read_table(run.round_dir(t) / "samples.parquet"):
            by_prompt.setdefault(s["prompt_id"], {})[s["sample_index"]] = s
        cyclic = decided = 0
        agree = {0: [], 1: [], 2: []}
        for prompt_id, group in by_prompt.items():
            judged = {}
            for r in (r for r in rows if r["prompt_id"] == prompt_id):
                a, b = group[r["i"]], group[r["j"]]
                again = oracle.compare([Comparison(a["prompt"], a["response"], b["response"])])[0]
                assert r["prob"] == again.prob and r["votes"] == pytest.approx(list(again.votes))
                judged[(r["i"], r["j"])] = r["prob"]
                for k in agree:
                    if r["prob"] != 0.5 and r["votes"][k] != 0.5:
                        agree[k].append((r["votes"][k] > 0.5) == (r["prob"] > 0.5))
            c, d = cyclic_triads(4, judged)
            cyclic, decided = cyclic + c, decided + d
        assert m["judge_decided_triads"] == decided
        assert m["judge_cyclic_triads"] == (cyclic / decided if decided else None)
        for k, name in enumerate(["0:sentiment", "1:concise_answer", "2:cyclic"]):
            assert m[f"judge_agreement/{name}"] == (pytest.approx(np.mean(agree[k])) if agree[k] else None)
        assert samples  # the round generated


@pytest.mark.ray
def test_tiny_llm_feature_game_exploitability_is_reported_and_recomputable(ray_cluster, tmp_path, tiny_model_dir):
    """Under the cyclic word-count-bins rule the evaluation reports the policy's exact exploitability in the induced
    3-class game, and it is what the persisted held-out answers say."""
    from nashray.cluster.driver import run_campaign
    from nashray.layout import read_table
    from nashray.oracles.rules import build_rule
    from tests.test_campaign import llm_config

    rule = {"kind": "rule", "rule": "cyclic", "options": {"feature": "words", "bins": [3, 6]}}
    run = run_campaign(llm_config(tmp_path, tiny_model_dir, {"name": "inpo"}, rounds=1,
                                  judges={"count": 1, "oracle": rule},
                                  generators={"count": 1, "engine": "vllm", "kv_cache_gib": 0.25,
                                              "sampling": {"max_new_tokens": 10}},
                                  evaluation={"every_rounds": 1, "prompts": 5}))
    [m] = run.metrics()
    cyclic = build_rule("cyclic", rule["options"])
    answers = read_table(run.round_dir(0) / "eval.parquet")
    q = np.bincount([cyclic.feature(a["response"]) for a in answers], minlength=3) / len(answers)
    r = np.bincount([cyclic.feature(a["initial_response"]) for a in answers], minlength=3) / len(answers)
    assert m["feature_class_distribution"] == pytest.approx(q.tolist())
    assert m["feature_ref_class_distribution"] == pytest.approx(r.tolist())
    assert m["feature_exploitability"] == pytest.approx(float((cyclic.feature_game() @ q).max() - 0.5))
    assert m["feature_exploitability_low"] <= m["feature_exploitability"] <= m["feature_exploitability_high"]
    assert "feature_regularized_exploitability" in m and m["feature_tau"] == 0.1
    assert json.loads((run.root / "metrics.jsonl").read_text().splitlines()[0])["feature_exploitability"] == \
        m["feature_exploitability"]
