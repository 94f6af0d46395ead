"""Faults on a real local Ray cluster: role processes killed with SIGKILL or frozen with SIGSTOP mid-campaign."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.run_watch import rounds_completed

pytestmark = pytest.mark.ray


def campaign_config(tmp_path: Path, model_dir: str, **override) -> str:
    sections = {
        "seed": 0,
        "model": {"path": model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        "algorithm": {"name": "online_dpo"},
        # The hf engine samples token by token: a round's generation lasts long enough to be hit.
        "generators": {"count": 2, "engine": "hf", "sampling": {"max_new_tokens": 40}, "timeout_s": 120,
                       "resources": {"num_cpus": 0.5}},
        "judges": {"count": 2, "oracle": {"kind": "rule", "rule": "concise_answer"}, "timeout_s": 60,
                   "resources": {"num_cpus": 0.5}},
        "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 8, "epochs_per_round": 2,
                    "optimizer": {"lr": 1e-4}, "threads_per_worker": 1},
        "schedule": {"rounds": 3, "prompts_per_round": 8, "samples_per_prompt": 4},
        "storage": {"run_dir": str(tmp_path / "run")},
        "evaluation": {"every_rounds": 0},
    }
    for key, value in override.items():
        sections[key] = {**sections.get(key, {}), **value}
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


class Background:
    """run_campaign in a thread of this process (the test's Ray cluster), its outcome kept for the test."""

    def __init__(self, config: str):
        from nashray.cluster.driver import run_campaign
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(run_campaign, config), daemon=True)
        self.thread.start()

    def _run(self, run_campaign, config):
        try:
            run_campaign(config)
        except BaseException as err:  # reported by the test
            self.error = err

    def join(self, timeout_s: float = 900):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "campaign did not finish"


def wait_for(condition, timeout_s: float = 600, campaign: Background | None = None):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if campaign is not None and not campaign.thread.is_alive():
            raise AssertionError(f"campaign ended before the fault point: {campaign.error!r}")
        assert time.monotonic() < deadline, "fault point not reached"
        time.sleep(0.05)


def roles(run: Path) -> dict:
    return json.loads((run / "roles.json").read_text())


def assert_complete_and_exact(run: Path, rounds: int, prompts: int = 8, k: int = 4) -> list[dict]:
    """Every round once; each round's samples: every prompt, K samples each, no sample twice."""
    from nashray.layout import read_table
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(rounds))
    for t in range(rounds):
        samples = read_table(run / f"rounds/{t:04d}/samples.parquet")
        keys = [(s["prompt_id"], s["sample_index"]) for s in samples]
        assert len(keys) == len(set(keys)) == prompts * k
        assert len({s["prompt_id"] for s in samples}) == prompts
    return metrics


def test_generator_killed_mid_round_is_replaced_and_brought_to_the_current_version(ray_cluster, tmp_path,
                                                                                   tiny_model_dir):
    run = tmp_path / "run"
    campaign = Background(campaign_config(tmp_path, tiny_model_dir))
    wait_for(lambda: rounds_completed(run) == 1, campaign=campaign)  # round 1's generation starts now
    os.kill(roles(run)["generators"][0]["pid"], signal.SIGKILL)
    campaign.join()
    assert campaign.error is None, campaign.error
    metrics = assert_complete_and_exact(run, 3)
    assert sum(m["generator_restarts"] for m in metrics) == 1
    # The replacement was given the current weights: after the next push both generators match the learner.
    assert all(m["push_logprob_max_abs_diff"] < 1e-4 for m in metrics)


def test_judge_killed_mid_round_is_replaced_and_no_comparison_is_lost(ray_cluster, tmp_path, tiny_model_dir):
    from nashray.layout import read_table
    run = tmp_path / "run"
    campaign = Background(campaign_config(
        tmp_path, tiny_model_dir,
        judges={"oracle": {"kind": "llm_judge", "model": tiny_model_dir, "engine": "hf", "batch_size": 2}}))
    wait_for(lambda: (run / "rounds/0001/samples.parquet").exists(), campaign=campaign)  # judging starts now
    os.kill(roles(run)["judges"][0]["pid"], signal.SIGKILL)
    campaign.join()
    assert campaign.error is None, campaign.error
    metrics = assert_complete_and_exact(run, 3)
    assert sum(m["judge_restarts"] for m in metrics) == 1
    judged = read_table(run / "rounds/0001/judgements.parquet")
    pairs = [(j["prompt_id"], j["i"], j["j"]) for j in judged]
    assert len(pairs) == len(set(pairs)) == 8 * 6  # all pairs of 4, each judged once


@pytest.mark.parametrize("role", ["generators", "judges"])
def test_hung_role_fails_after_its_timeout_naming_the_role(ray_cluster, tmp_path, tiny_model_dir, role):
    """A generator's hang also stands for a hung weight push: the push is a call on every generator, under the same
    timeout."""
    from nashray.cluster.actor_pool import RoleFailure
    run = tmp_path / "run"
    campaign = Background(campaign_config(tmp_path, tiny_model_dir, **{role: {"timeout_s": 15, "on_failure": "abort"}}))
    wait_for(lambda: rounds_completed(run) == 1, campaign=campaign)
    pid = roles(run)[role][1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # a hang: the process is alive and silent
    try:
        campaign.join(300)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert isinstance(campaign.error, RoleFailure)
    assert f"{role} 1 did not answer" in str(campaign.error) and "within 15s" in str(campaign.error)
    assert rounds_completed(run) == 1  # what was done is kept: resume continues at round 1


def test_learner_worker_killed_mid_training_restarts_from_the_last_checkpoint(ray_cluster, tmp_path,
                                                                              tiny_model_dir):
    run = tmp_path / "run"
    campaign = Background(campaign_config(tmp_path, tiny_model_dir, learner={"epochs_per_round": 6}))
    wait_for(lambda: rounds_completed(run) == 1 and (run / "rounds/0001/train/_SUCCESS").exists(),
             campaign=campaign)
    os.kill(roles(run)["learner"][0]["pid"], signal.SIGKILL)
    campaign.join()
    assert campaign.error is None, campaign.error
    metrics = assert_complete_and_exact(run, 3)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["round-0001", "round-0002"]  # keep_checkpoints=2; no torn .tmp left behind
    assert all(m["push_logprob_max_abs_diff"] < 1e-4 for m in metrics)
