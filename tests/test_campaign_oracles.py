"""Each model-backed oracle kind judging a real one-round campaign: the judge actor loads the oracle, its verdicts
are the ones written to judgements.parquet, and the learner trains on them."""

from __future__ import annotations

import json
import math

import pytest

import tests.test_campaign as campaign_tests

pytestmark = pytest.mark.ray


def oracle_config(kind: str, tiny_classifier_dir: str) -> dict:
    if kind == "reward_model":
        return {"kind": "reward_model", "model": tiny_classifier_dir}
    if kind == "pairwise_model":
        return {"kind": "pairwise_model", "model": tiny_classifier_dir}
    assert kind == "ensemble"
    return {"kind": "ensemble", "combine": "mean",
            "members": [{"kind": "rule", "rule": "concise_answer"},
                        {"kind": "reward_model", "model": tiny_classifier_dir}]}


# llm_judge judges campaigns in tests/test_faults.py and tests/test_resume.py; http in tests/test_security.py.
@pytest.mark.parametrize("kind", ["reward_model", "pairwise_model", "ensemble"])
def test_campaign_round_judged_by_each_oracle_kind(ray_cluster, tmp_path, tiny_model_dir, tiny_classifier_dir, kind):
    from nashray.cluster.driver import group_by_prompt, run_campaign
    from nashray.layout import read_table
    from nashray.oracles import build_oracle
    from nashray.oracles.config import parse_oracle_config
    from nashray.oracles.base import Comparison

    oracle = oracle_config(kind, tiny_classifier_dir)
    run = run_campaign(campaign_tests.llm_config(
        tmp_path, tiny_model_dir, {"name": "online_dpo"}, engine="hf",
        judges={"count": 1, "oracle": oracle, "resources": {"num_cpus": 0.5}},
        schedule={"rounds": 1, "prompts_per_round": 3, "samples_per_prompt": 3},
        evaluation={"every_rounds": 0}))

    roles = json.loads((run.root / "roles.json").read_text())
    assert [j["oracle"].split(":")[0] for j in roles["judges"]] == [kind]
    assert run.read_state().rounds_completed == 1
    [metrics] = run.metrics()
    assert metrics["judge_comparisons"] == 3 * 3 and metrics["judge_dropped"] == 0  # all pairs of 3 per prompt
    assert metrics["train_records"] > 0 and metrics["steps"] > 0 and math.isfinite(metrics["loss"])

    # The written verdicts are this oracle's: the same oracle built here gives the same probabilities.
    by_prompt = group_by_prompt(read_table(run.round_dir(0) / "samples.parquet"))
    rows = read_table(run.round_dir(0) / "judgements.parquet")
    asked = [Comparison(by_prompt[r["prompt_id"]][r["i"]]["prompt"], by_prompt[r["prompt_id"]][r["i"]]["response"],
                        by_prompt[r["prompt_id"]][r["j"]]["response"]) for r in rows]
    expected = [v.prob for v in build_oracle(parse_oracle_config(oracle)).compare(asked)]
    written = [r["prob"] for r in rows]
    assert all(0.0 <= p <= 1.0 for p in written)
    assert written == pytest.approx(expected, abs=1e-5)
    assert len(set(written)) > 1, "a model oracle should tell these responses apart"
