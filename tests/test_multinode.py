"""Placement on a real multi-node Ray cluster: custom resources put generators and learner workers on their own nodes.

The cluster has three nodes on 127.0.0.1, each a separate raylet with its own object store, as KubeRay worker groups
would be: a head, an ``inference`` node and a ``training`` node. They are started with Ray's ``cluster_utils.Cluster``
rather than ``ray start``: a worker node's ``ray start --address`` refuses to run while
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and without that variable Ray swaps 127.0.0.1 for the machine's interface
address and every raylet listens on all interfaces. ``Cluster`` starts the same processes and keeps them on
loopback; the fixture stops exactly the processes it started. The head serves the dashboard (and with it the job
server) on 127.0.0.1, for ``ray job submit``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from nashray.cluster.config import ConfigError, Resources, parse_config
from nashray.cluster.placement import NodeShape, actor_options, check_placeable, cluster_shapes, learner_scaling
from tests.ray_jobs import assert_job_succeeded, free_port, submit_campaign, wait_for_job_server

NODE_RESOURCES = {"inference": {"inference": 2}, "training": {"training": 1}}
OBJECT_STORE_BYTES = 80 * 2**20


@dataclass(frozen=True)
class MultinodeCluster:
    address: str                # the GCS address, for ray.init(address=...) or cluster.address in a campaign config
    head_node_id: str
    node_ids: dict[str, str]    # custom resource name → id of the one node that offers it
    temp_dir: str
    dashboard_url: str          # the head's dashboard and job server, for `ray job submit --address`
    cluster: Any                # the ray.cluster_utils.Cluster, to add or remove nodes (keep add_node's env)


@pytest.fixture(scope="module")
def multinode_cluster():
    """A head (1 CPU) plus one worker node per entry of NODE_RESOURCES (2 CPUs each), all on 127.0.0.1.

    Ray writes a "current cluster" file under RAY_TMPDIR and serves its dashboard, dashboard agent and metrics on
    fixed default ports; all of them are made private here so that other clusters on the same machine neither find
    this one nor collide with it. Token auth is off for the whole session (tests/conftest.py)."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="nr-mn-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setenv("RAY_TMPDIR", temp_dir)
        env.setenv("AUTOSCALER_METRIC_PORT", str(free_port()))
        env.setenv("DASHBOARD_METRIC_PORT", str(free_port()))
        try:
            common = dict(node_ip_address="127.0.0.1", object_store_memory=OBJECT_STORE_BYTES)
            cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
                num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
                dashboard_agent_listen_port=free_port(), metrics_export_port=free_port(),
                temp_dir=os.path.join(temp_dir, "ray"), **common))
            node_ids = {name: cluster.add_node(num_cpus=2, resources=res, **common).node_id
                        for name, res in NODE_RESOURCES.items()}
            cluster.wait_for_nodes()
            yield MultinodeCluster(cluster.address, cluster.head_node.node_id, node_ids, temp_dir,
                                   f"http://{cluster.webui_url}", cluster)
        finally:
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def multinode_driver(multinode_cluster):
    """This process connected as a driver to ``multinode_cluster``."""
    import ray
    if ray.is_initialized():  # a session-wide local cluster of another module
        ray.shutdown()
    ray.init(address=multinode_cluster.address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _where_am_i():
    """A plain actor class reporting its node, made here so that Ray ships it by value (workers cannot import
    test modules)."""
    class WhereAmI:
        def node_id(self) -> str:
            import ray
            return ray.get_runtime_context().get_node_id()
    return WhereAmI


# ------------------------------------------------------------------------- pure logic: no cluster needed

def test_actor_options_and_learner_scaling_build_what_ray_accepts():
    from ray.train import ScalingConfig
    res = Resources(num_cpus=2, num_gpus=0.5, custom={"inference": 1})
    assert actor_options(res) == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"inference": 1}}
    assert actor_options(Resources(num_cpus=1, threads=2))["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    with pytest.raises(ConfigError, match="learner.resources.threads: .* learner.threads_per_worker"):
        parse_config({"learner": {"resources": {"threads": 2}}})

    cfg = parse_config({"learner": {"workers": 3, "resources": {"num_cpus": 4, "num_gpus": 1,
                                                                "custom": {"training": 1}}}})
    kwargs = learner_scaling(cfg.learner)
    assert kwargs == {"num_workers": 3, "use_gpu": True, "placement_strategy": "PACK",
                      "resources_per_worker": {"CPU": 4, "GPU": 1, "training": 1}}
    scaling = ScalingConfig(**kwargs)
    assert scaling.num_workers == 3 and scaling.placement_strategy == "PACK"
    assert scaling._resources_per_worker_not_none == {"CPU": 4, "GPU": 1, "training": 1}

    cpu_only = learner_scaling(parse_config({}).learner)
    assert cpu_only["use_gpu"] is False and "GPU" not in cpu_only["resources_per_worker"]


def test_custom_resources_may_not_name_what_ray_reserves():
    with pytest.raises(ValueError, match=r"resources.custom names 'GPU'.*num_gpus"):
        actor_options(Resources(custom={"GPU": 1}))
    cfg = parse_config({"learner": {"resources": {"custom": {"CPU": 2}}}})
    with pytest.raises(ValueError, match=r"learner.resources.custom names 'CPU'"):
        check_placeable(cfg, [NodeShape({"CPU": 8})])


KUBERAY_LIKE = [NodeShape({"CPU": 4}), NodeShape({"CPU": 8, "GPU": 1, "inference": 1}, 4),
                NodeShape({"CPU": 16, "GPU": 8, "training": 8}, 1), NodeShape({"CPU": 2, "judge": 1}, None)]


def _campaign(generators=1, learner=1, judges=1, **learner_res):
    return parse_config({
        "generators": {"count": generators, "resources": {"num_gpus": 1, "custom": {"inference": 1}}},
        "judges": {"count": judges, "resources": {"custom": {"judge": 1}}},
        "learner": {"workers": learner, "resources": {"num_gpus": 1, "custom": {"training": 1}, **learner_res}}})


def test_check_placeable_accepts_what_fits():
    check_placeable(_campaign(generators=4, learner=8, judges=50), KUBERAY_LIKE)  # judges: group without bound


@pytest.mark.parametrize(("campaign", "shapes", "message"), [
    (_campaign(learner=9), KUBERAY_LIKE,
     "learner.workers=9 × {'CPU': 1, 'GPU': 1, 'training': 1} cannot be placed: the cluster has training=8"),
    (_campaign(generators=5), KUBERAY_LIKE,
     "generators.count=5 × {'CPU': 1, 'GPU': 1, 'inference': 1} cannot be placed: the cluster has inference=4"),
    # the training nodes have 8 CPUs in all, but a worker cannot span nodes: a node of 4 CPUs holds one of 3
    (_campaign(learner=3, num_cpus=3),
     [*KUBERAY_LIKE[:2], NodeShape({"CPU": 4, "GPU": 2, "training": 2}, 2), KUBERAY_LIKE[3]],
     "learner.workers=3 × {'CPU': 3, 'GPU': 1, 'training': 1} cannot be placed: each needs all of it on one node, "
     "and the nodes hold at most 2 of them"),
])
def test_check_placeable_names_the_role_and_the_missing_resource(campaign, shapes, message):
    with pytest.raises(ValueError) as err:
        check_placeable(campaign, shapes)
    assert str(err.value) == message


def test_check_placeable_counts_all_roles_together():
    shared = [NodeShape({"CPU": 8, "GPU": 3, "inference": 2, "training": 2, "judge": 1})]
    with pytest.raises(ValueError, match=r"together need GPU=4 \(generators GPU=2, learner GPU=2\): "
                                         r"the cluster has GPU=3"):
        check_placeable(_campaign(generators=2, learner=2, judges=1), shared)


# --------------------------------------------------------------------------------- real multi-node cluster

@pytest.mark.ray
def test_nodes_advertise_their_custom_resources(multinode_cluster, multinode_driver):
    ray = multinode_driver
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert set(alive) == {multinode_cluster.head_node_id, *multinode_cluster.node_ids.values()}
    for name, node_id in multinode_cluster.node_ids.items():
        assert alive[node_id]["Resources"][name] == NODE_RESOURCES[name][name]
        assert alive[node_id]["NodeManagerAddress"] == "127.0.0.1"
    shapes = cluster_shapes()
    assert sorted(s.resources.get("CPU") for s in shapes) == [1, 2, 2]


@pytest.mark.ray
def test_generator_actors_land_on_the_inference_node_only(multinode_cluster, multinode_driver):
    ray = multinode_driver
    options = actor_options(Resources(num_cpus=1, custom={"inference": 1}))
    actors = [ray.remote(_where_am_i()).options(**options).remote() for _ in range(2)]
    try:
        where = ray.get([a.node_id.remote() for a in actors], timeout=60)
    finally:
        for a in actors:
            ray.kill(a)
    assert where == [multinode_cluster.node_ids["inference"]] * 2


@pytest.mark.ray
def test_learner_workers_land_on_the_training_node(multinode_cluster, multinode_driver):
    """Ray Train reserves one bundle of ``resources_per_worker`` per worker in a placement group with the
    ScalingConfig's strategy, then starts each worker in its bundle; the same is done here with the ScalingConfig
    built from learner_scaling (a full TorchTrainer start costs over a minute on 2 cores)."""
    from ray.train import ScalingConfig
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = multinode_driver
    cfg = parse_config({"learner": {"workers": 2, "resources": {"num_cpus": 1, "custom": {"training": 0.5}}}})
    scaling = ScalingConfig(**learner_scaling(cfg.learner))
    group = placement_group([scaling._resources_per_worker_not_none] * scaling.num_workers,
                            strategy=scaling.placement_strategy)
    ray.get(group.ready(), timeout=60)
    workers = [ray.remote(_where_am_i()).options(
        num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
    ).remote() for i in range(scaling.num_workers)]
    try:
        where = ray.get([w.node_id.remote() for w in workers], timeout=60)
    finally:
        for w in workers:
            ray.kill(w)
        remove_placement_group(group)
    assert where == [multinode_cluster.node_ids["training"]] * 2


@pytest.mark.ray
def test_check_placeable_reads_the_live_cluster(multinode_cluster, multinode_driver):
    fits = parse_config({"generators": {"count": 2, "resources": {"custom": {"inference": 1}}},
                         "judges": {"resources": {"num_cpus": 0}},
                         "learner": {"resources": {"custom": {"training": 1}}}})
    check_placeable(fits)
    too_many = fits.model_copy(update={"learner": fits.learner.model_copy(update={"workers": 2})})
    with pytest.raises(ValueError, match=r"^learner.workers=2 × \{'CPU': 1, 'training': 1\} cannot be placed: "
                                         r"the cluster has training=1$"):
        check_placeable(too_many)


@pytest.mark.ray
def test_check_placeable_waits_for_the_nodes_it_asked_for(multinode_cluster, multinode_driver):
    """With autoscaler_wait_s the check asks for the campaign's bundles and passes once the nodes are up; here a
    node is added by hand while it waits, as KubeRay's autoscaler would add a learner pod."""
    cfg = parse_config({"judges": {"resources": {"num_cpus": 0}},
                        "learner": {"workers": 2, "resources": {"custom": {"training": 1}}}})
    with pytest.raises(ValueError, match=r"the cluster has training=1 \(after waiting 0.5 s for the autoscaler\)$"):
        check_placeable(cfg, autoscaler_wait_s=0.5)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(_raised(check_placeable, cfg, autoscaler_wait_s=90)))
    waiter.start()
    time.sleep(1.0)  # the check is polling; Ray starts nodes from the main thread only (signal handlers)
    node = multinode_cluster.cluster.add_node(num_cpus=1, resources={"training": 1}, node_ip_address="127.0.0.1",
                                              object_store_memory=OBJECT_STORE_BYTES)
    try:
        waiter.join(timeout=90)
        assert outcome == [None]
    finally:
        multinode_cluster.cluster.remove_node(node)


def _raised(fn, *args, **kwargs) -> Exception | None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # handed to the test's thread
        return err
    return None


@pytest.mark.ray
def test_campaign_places_roles_and_resumes_with_more_generators(multinode_cluster, multinode_driver, tmp_path):
    """A real campaign on the 3-node cluster: generators only on the inference node, the learner worker only on the
    training node; resumed with two generators, it runs with both and the same learner."""
    import json

    import yaml

    from nashray.cluster.driver import run_campaign

    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": {"name": "inpo"},
        "generators": {"count": 1, "engine": "tabular", "resources": {"num_cpus": 0.5, "custom": {"inference": 1}}},
        "judges": {"count": 1, "oracle": {"kind": "matrix"}, "resources": {"num_cpus": 0.25}},
        "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 64, "threads_per_worker": 1,
                    "optimizer": {"name": "adam", "lr": 0.05},
                    "resources": {"num_cpus": 1, "custom": {"training": 1}}},
        "data": {"game": "builtin:rps"},
        "schedule": {"rounds": 2, "prompts_per_round": 1, "samples_per_prompt": 16},
        "storage": {"run_dir": str(tmp_path / "run")},
        "cluster": {"address": multinode_cluster.address},
    }))
    inference, training = multinode_cluster.node_ids["inference"], multinode_cluster.node_ids["training"]

    run = run_campaign(str(config))
    roles = json.loads((run.root / "roles.json").read_text())
    assert [g["node_id"] for g in roles["generators"]] == [inference]
    assert [w["node_id"] for w in roles["learner"]] == [training]

    run_campaign(resume=str(run.root), overrides={"generators.count": 2, "schedule.rounds": 3})
    roles = json.loads((run.root / "roles.json").read_text())
    assert [g["node_id"] for g in roles["generators"]] == [inference, inference]
    assert [w["node_id"] for w in roles["learner"]] == [training]
    metrics = run.metrics()
    assert [(m["round"], m["generators"], m["learner_workers"]) for m in metrics] == [(0, 1, 1), (1, 1, 1), (2, 2, 1)]


@pytest.mark.ray
def test_ray_job_submit_of_a_tiny_llm_campaign_to_the_three_nodes(multinode_cluster, tmp_path, tiny_model_dir,
                                                                   tiny_classifier_dir):
    """`ray job submit` to the head's job server, as to a KubeRay head: the job's driver runs a tiny-LLM round with
    its generator on the inference node and its learner worker on the training node. A reward model judges: the
    tiny model's 12 random tokens are all too short for the concise_answer rule to prefer one."""
    import json

    import tests.test_campaign as campaign_tests

    assert multinode_cluster.dashboard_url.startswith("http://127.0.0.1:")
    env = dict(os.environ)  # RAY_AUTH_MODE=disabled for the session (tests/conftest.py)
    env.pop("RAY_ADDRESS", None)
    wait_for_job_server(multinode_cluster.dashboard_url, env,
                        head_alive=multinode_cluster.cluster.head_node.remaining_processes_alive)
    run_dir = tmp_path / "run"
    config = campaign_tests.llm_config(
        tmp_path, tiny_model_dir, {"name": "online_dpo"},
        generators={"count": 1, "engine": "hf", "sampling": {"max_new_tokens": 12},
                    "resources": {"num_cpus": 1, "custom": {"inference": 1}}},
        judges={"count": 1, "oracle": {"kind": "reward_model", "model": tiny_classifier_dir},
                "resources": {"num_cpus": 0.25}},
        learner={"workers": 1, "precision": "fp32", "micro_batch_size": 4, "threads_per_worker": 1,
                 "optimizer": {"lr": 1e-4}, "resources": {"num_cpus": 1, "custom": {"training": 1}}},
        schedule={"rounds": 1, "prompts_per_round": 3, "samples_per_prompt": 3},
        evaluation={"every_rounds": 0})

    done = submit_campaign(multinode_cluster.dashboard_url, config, env)
    assert_job_succeeded(done)
    assert json.loads((run_dir / "state.json").read_text())["rounds_completed"] == 1
    roles = json.loads((run_dir / "roles.json").read_text())
    assert [g["node_id"] for g in roles["generators"]] == [multinode_cluster.node_ids["inference"]]
    assert [w["node_id"] for w in roles["learner"]] == [multinode_cluster.node_ids["training"]]
