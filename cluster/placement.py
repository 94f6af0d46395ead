"""Where each role runs: Ray resource requests built from the config, and a check that the cluster can hold them.

Generators, judges and learner workers all live for the whole campaign, so a config that asks for more than the
cluster can hold would otherwise hang on a pending actor after the model loads. ``check_placeable`` refuses it before
any work starts. It only applies conditions every placement must meet, so it never refuses a config that Ray could
place on the nodes it counts. On an autoscaling cluster (KubeRay) it first asks the autoscaler for the campaign's
actors and waits for the nodes to come up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from nashray.cluster.config import CampaignConfig, LearnerConfig, Resources
from nashray.internals import ray_autoscaler_cluster_config

# Ray takes these through num_cpus / num_gpus / memory, never through ``resources``.
RESERVED = ("CPU", "GPU", "memory", "object_store_memory")
_EPS = 1e-9


def _custom(res: Resources, where: str) -> dict[str, float]:
    for key in res.custom:
        if key in RESERVED:
            raise ValueError(f"{where}.custom names {key!r}, which Ray reserves: set it with "
                             f"{where}.num_cpus / num_gpus instead")
    return dict(res.custom)


def actor_options(res: Resources) -> dict:
    """Keyword arguments of ``ray.remote(Cls).options(**...)`` for one actor of a role. ``threads`` goes in as the
    actor process's OMP_NUM_THREADS, which Ray otherwise sets to its num_cpus (and torch reads at import)."""
    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "resources": _custom(res, "resources")}
    if res.threads is not None:
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(res.threads)}}
    return options


def learner_scaling(learner_cfg: LearnerConfig) -> dict:
    """Keyword arguments of Ray Train's ``ScalingConfig``: ``learner.workers`` workers, each holding
    ``learner.resources`` (custom resources included), packed onto as few nodes as possible."""
    res = learner_cfg.resources
    per_worker = {"CPU": res.num_cpus, **_custom(res, "learner.resources")}
    if res.num_gpus > 0:
        per_worker["GPU"] = res.num_gpus
    return {"num_workers": learner_cfg.workers, "use_gpu": res.num_gpus > 0,
            "resources_per_worker": per_worker, "placement_strategy": "PACK"}


def _bundle(res: Resources, where: str) -> dict[str, float]:
    """One actor's demand as Ray counts it, zero entries left out."""
    bundle = {"CPU": res.num_cpus, "GPU": res.num_gpus, **_custom(res, where)}
    return {k: v for k, v in bundle.items() if v > 0}


@dataclass(frozen=True)
class NodeShape:
    """``count`` nodes that each offer ``resources``; ``count`` None: the autoscaler may add any number."""
    resources: dict[str, float]
    count: int | None = 1


def _fits_per_node(bundle: dict[str, float], node: dict[str, float]) -> int | float:
    """How many actors asking for ``bundle`` one node can hold."""
    return min((math.floor(node.get(k, 0.0) / v + _EPS) for k, v in bundle.items()), default=math.inf)


def _capacity(bundle: dict[str, float], shapes: list[NodeShape]) -> int | float:
    total = 0
    for shape in shapes:
        per_node = _fits_per_node(bundle, shape.resources)
        if per_node > 0:
            total += math.inf if shape.count is None else per_node * shape.count
    return total


def _total(key: str, shapes: list[NodeShape]) -> float:
    total = 0.0
    for shape in shapes:
        amount = shape.resources.get(key, 0.0)
        if amount > 0:
            total += math.inf if shape.count is None else amount * shape.count
    return total


def _fmt(x: float) -> str:
    return "unbounded" if x == math.inf else f"{x:g}"


def _fmt_bundle(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k!r}: {v:g}" for k, v in bundle.items()) + "}"


def cluster_shapes() -> list[NodeShape]:
    """The nodes of the connected Ray cluster: every alive node, plus, where an autoscaler has published the
    cluster's node groups (KubeRay), each group at its maximum size."""
    import ray

    shapes = [NodeShape({k: float(v) for k, v in n["Resources"].items()}) for n in ray.nodes() if n["Alive"]]
    config = ray_autoscaler_cluster_config()
    for group in (config.node_group_configs if config is not None else ()):
        if group.max_count != 0 and group.resources:
            shapes.append(NodeShape({k: float(v) for k, v in group.resources.items()},
                                    None if group.max_count < 0 else int(group.max_count)))
    return shapes


def _demands(cfg: CampaignConfig) -> list[tuple[str, str, int, dict[str, float]]]:
    """(role, what the config says, how many actors, one actor's bundle) for every long-lived actor of a campaign,
    the evaluation's own judge included (one actor shaped like the judges, when evaluation.oracle is set)."""
    demands = [
        ("generators", f"generators.count={cfg.generators.count}", cfg.generators.count,
         _bundle(cfg.generators.resources, "generators.resources")),
        ("judges", f"judges.count={cfg.judges.count}", cfg.judges.count,
         _bundle(cfg.judges.resources, "judges.resources")),
        ("learner", f"learner.workers={cfg.learner.workers}", cfg.learner.workers,
         _bundle(cfg.learner.resources, "learner.resources")),
    ]
    if cfg.evaluation.oracle is not None and cfg.evaluation.every_rounds:
        demands.append(("eval judge", "evaluation.oracle (one judge actor)", 1,
                        _bundle(cfg.judges.resources, "judges.resources")))
    return demands


def check_placeable(cfg: CampaignConfig, shapes: list[NodeShape] | None = None,
                    autoscaler_wait_s: float = 0.0) -> None:
    """Raise ``ValueError`` naming the role and the missing resource when the campaign's actors cannot all be placed
    on ``shapes`` (default: the connected cluster, see ``cluster_shapes``).

    With ``autoscaler_wait_s`` > 0 (a connected cluster only), the autoscaler is first asked for one bundle per actor
    (``ray.autoscaler.sdk.request_resources``) and the check is repeated until it passes or the time is up; the
    request is withdrawn afterwards, the nodes stay while the actors use them."""
    _demands(cfg)  # a malformed resources section fails at once, never after a wait
    if shapes is not None or autoscaler_wait_s <= 0:
        return _check(cfg, cluster_shapes() if shapes is None else shapes)
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[bundle for _, _, count, bundle in _demands(cfg) for _ in range(count) if bundle])
    deadline = time.monotonic() + autoscaler_wait_s
    try:
        while True:
            try:
                return _check(cfg, cluster_shapes())
            except ValueError as err:
                if time.monotonic() >= deadline:
                    raise ValueError(f"{err} (after waiting {autoscaler_wait_s:g} s for the autoscaler)") from None
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])


def _check(cfg: CampaignConfig, shapes: list[NodeShape]) -> None:
    """Conditions every placement meets: each role fits on its own (an actor never spans nodes), and all roles
    together fit within each resource's total. With an autoscaler both the nodes up now and the groups at full size
    are counted, so a node may be counted twice: this may pass a config the cluster cannot hold, never the other way
    round."""
    demands = _demands(cfg)
    for _, what, count, bundle in demands:
        if _capacity(bundle, shapes) >= count:
            continue
        what = f"{what} × {_fmt_bundle(bundle)}"
        short = {k: _total(k, shapes) for k, v in bundle.items() if _total(k, shapes) + _EPS < count * v}
        if short:
            has = ", ".join(f"{k}={_fmt(total)}" for k, total in short.items())
            raise ValueError(f"{what} cannot be placed: the cluster has {has}")
        raise ValueError(f"{what} cannot be placed: each needs all of it on one node, and the nodes hold at most "
                         f"{_fmt(_capacity(bundle, shapes))} of them")
    need: dict[str, float] = {}
    for _, _, count, bundle in demands:
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + count * v
    for key, amount in need.items():
        if amount > _total(key, shapes) + _EPS:
            parts = ", ".join(f"{role} {key}={_fmt(count * b[key])}" for role, _, count, b in demands if key in b)
            raise ValueError(f"generators, judges and learner together need {key}={_fmt(amount)} ({parts}): "
                             f"the cluster has {key}={_fmt(_total(key, shapes))}")
