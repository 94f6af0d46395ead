"""Starting and joining Ray: loopback by default, bounded object store, never a stale cluster file."""

from __future__ import annotations

import os
import tempfile

from nashray.internals import ray_cluster_mode

LOOPBACK = "127.0.0.1"

# What a local cluster keeps for observability that nobody reads (it runs without a dashboard), and that grows with
# every round of a long campaign (bench/soak.py): Ray's metrics keep a series per Ray Data dataset, ~1 MiB a round in
# Ray Data's stats actor and 0.7 MiB in the metrics agent (ray-project/ray#43924), and the GCS keeps the events of up
# to 100 000 tasks (Ray Data's tasks of every round), ~0.1 MiB a round.
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False, "task_events_max_num_task_in_gcs": 1000,
                       "preallocate_plasma_memory": True}


def init_local_ray(num_cpus: int | None = None, object_store_gib: float = 1.0, temp_dir: str | None = None,
                   address: str | None = None, bind_host: str = LOOPBACK, runtime_env: dict | None = None,
                   log_to_driver: bool = True):
    """Join ``address`` if given, else start a local cluster that listens on ``bind_host`` only. ``log_to_driver``
    False leaves the actors' output in Ray's session logs instead of echoing it here.

    Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray listens on the machine's interface address even when told
    127.0.0.1; a private temp dir keeps a killed cluster's current-cluster file from hanging the next ``ray.init``."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    # Ray reads the variable once, at import: when something imported ray before us, set what it derived.
    ray_cluster_mode(os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false"))
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit` for the job's driver
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        return ray
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="nashray-ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus, object_store_memory=int(object_store_gib * 2**30), _temp_dir=temp_dir,
             _node_ip_address=bind_host, include_dashboard=False, runtime_env=runtime_env,
             configure_logging=True, log_to_driver=log_to_driver, _system_config=LOCAL_SYSTEM_CONFIG)
    return ray
