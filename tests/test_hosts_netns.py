"""Ray across hosts: a campaign submitted with `ray job submit` to a cluster whose nodes are separate network hosts,
and one host lost mid-round.

Four hosts, each a Linux network namespace with its own address (tests/netns_hosts.py): the Ray head (GCS,
dashboard and job server, the job's driver) on 198.18.0.1, and worker nodes ``inference`` (198.18.0.2),
``training`` (198.18.0.3) and ``judge`` (198.18.0.4), each offering a custom resource of its name that the campaign
asks for (generators.resources.custom, learner.resources.custom, judges.resources.custom), as KubeRay worker groups
would. Nothing but loopback and the namespaces' own veths exists in a host, so every call between roles, every
object fetch (the weight push: learner → object store → generator) and the job submission cross a host boundary as
they would between machines; the filesystem is shared and stands for the run directory's shared volume.

Mid-round 1 every process of the inference host is killed with SIGKILL (its raylet, agents and the generator's
worker: a machine lost). With ``generators.on_failure: retry`` a fresh node is started in that host and the
campaign, replacing the generator there, finishes every round once; with ``abort`` the job fails naming the role.
Skipped where network namespaces cannot be created (not root, no iproute2, no veth/bridge support).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.netns_hosts import HostCluster, SubmittedJob, netns_unavailable
from tests.ray_jobs import ROOT, assert_job_succeeded
from tests.run_watch import rounds_completed
from tests.test_faults import assert_complete_and_exact

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HOSTS = {  # host → (logical CPUs, custom resources); the head first
    "head": (1, {}),
    "inference": (1, {"inference": 1}),
    "training": (1, {"training": 1}),
    "judge": (1, {"judge": 1}),
}
ROUNDS, PROMPTS, K = 3, 8, 4


@pytest.fixture(scope="module")
def hosts():
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces cannot be created here: {reason}")
    cluster = HostCluster(HOSTS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def campaign_config(tmp_path: Path, model_dir: str, on_failure: str) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 0,
        "model": {"path": model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        "algorithm": {"name": "online_dpo"},
        # The hf engine samples token by token: round 1's generation lasts long enough to be hit.
        "generators": {"count": 1, "engine": "hf", "sampling": {"max_new_tokens": 40}, "timeout_s": 120,
                       "on_failure": on_failure, "resources": {"num_cpus": 1, "custom": {"inference": 1}}},
        "judges": {"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer"}, "timeout_s": 60,
                   "resources": {"num_cpus": 1, "custom": {"judge": 1}}},
        "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 8, "optimizer": {"lr": 1e-4},
                    "threads_per_worker": 1, "resources": {"num_cpus": 1, "custom": {"training": 1}}},
        "schedule": {"rounds": ROUNDS, "prompts_per_round": PROMPTS, "samples_per_prompt": K},
        "storage": {"run_dir": str(tmp_path / "run")},
        "evaluation": {"every_rounds": 0},
    }))
    return path


def wait_for_round(run: Path, t: int, job: SubmittedJob, timeout_s: float = 600) -> None:
    """Until round ``t`` has started (t rounds completed); fails at once if the job ended first."""
    deadline = time.monotonic() + timeout_s
    while rounds_completed(run) < t:
        if not job.running():
            done = job.wait(0)
            raise AssertionError(f"the job ended before round {t} started:\n{done.stdout[-6000:]}")
        assert time.monotonic() < deadline, f"round {t} did not start in {timeout_s} s"
        time.sleep(0.05)


def test_inference_host_lost_mid_round_generator_replaced_on_a_fresh_node(hosts, tmp_path, tiny_model_dir):
    if not hosts.alive("inference"):
        hosts.start_worker("inference")
    lost_nodes = set(hosts.hosts["inference"].node_ids)
    run = tmp_path / "run"
    job = hosts.submit(campaign_config(tmp_path, tiny_model_dir, "retry"), tmp_path / "submit.log", ROOT)
    wait_for_round(run, 1, job)
    killed = hosts.kill_host("inference")  # round 1's generation is in flight
    placed = json.loads((run / "roles.json").read_text())
    assert placed["generators"][0]["pid"] in killed
    hosts.start_worker("inference")  # a new machine at the lost one's address: a new node id
    done = job.wait(600)
    assert_job_succeeded(done)

    metrics = assert_complete_and_exact(run, ROUNDS, PROMPTS, K)
    assert all(m["push_logprob_max_abs_diff"] < 1e-4 for m in metrics)  # the replacement got the current weights
    assert sum(m["judge_restarts"] for m in metrics) == 0
    driver_log = (run / "logs" / "driver.log").read_text()
    assert re.search(r"generators 0 died: .*: replaced \(restart 1 of 3\)", driver_log)
    # Until the GCS notices the loss (missed health checks, seconds), it may place a replacement on the lost node:
    # that one dies while being brought to the current weights and uses one more restart.
    lost_replacements = driver_log.count("generators 0's replacement died")
    restarts = sum(m["generator_restarts"] for m in metrics)
    assert restarts == 1 + lost_replacements <= 3, driver_log[-4000:]

    # Each role ran on its host: the first generator on the lost inference node, the last on the fresh one.
    nodes = hosts.nodes()
    first = placed["generators"][0]["node_id"]
    assert first in lost_nodes and nodes[first]["state"] == "DEAD"
    assert hosts.host_of_node(first, nodes) == "inference"
    assert [hosts.host_of_node(w["node_id"], nodes) for w in placed["learner"]] == ["training"]
    assert [hosts.host_of_node(j["node_id"], nodes) for j in placed["judges"]] == ["judge"]
    generators = hosts.actors("GeneratorActor", job_id=hosts.job_id(done))
    assert len(generators) == 1 + restarts
    fresh = [a["node_id"] for a in generators if a["node_id"] and a["node_id"] not in lost_nodes]
    assert len(fresh) == 1 and hosts.host_of_node(fresh[0], nodes) == "inference", generators
    assert nodes[fresh[0]]["state"] == "ALIVE"


def test_inference_host_lost_mid_round_aborts_the_job_naming_the_role(hosts, tmp_path, tiny_model_dir):
    if not hosts.alive("inference"):
        hosts.start_worker("inference")
    run = tmp_path / "run"
    job = hosts.submit(campaign_config(tmp_path, tiny_model_dir, "abort"), tmp_path / "submit.log", ROOT)
    wait_for_round(run, 1, job)
    hosts.kill_host("inference")
    done = job.wait(600)
    output = done.stdout
    assert done.returncode == 1 and re.search(r"Job '\S+' failed", output), output[-6000:]
    assert re.search(r"RoleFailure: generators 0 died: .*generators\.on_failure is 'abort'", output, re.S), \
        output[-6000:]
    assert rounds_completed(run) == 1  # what was done is kept: `nashray run --resume` continues at round 1
    assert [m["round"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0]
