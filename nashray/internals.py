"""Every place nashray touches a library's private internals, each one a small function here and nowhere else.

Each function names the private object it touches, why no public API does the job, and checks that the object is
still there and shaped as expected in the installed version before touching it: a changed library fails at that
check with :class:`InternalsChanged`, naming the object and the version this was written for (``PINNED``), instead of
silently doing nothing. ``tests/test_internals.py`` checks each one against the installed versions.

    ray_cluster_mode                           ray._private.ray_constants.ENABLE_RAY_CLUSTER
    bind_serve_replica_grpc_on_node_address    ray.serve._private.replica.add_port_to_grpc_server
    ray_autoscaler_cluster_config              ray._private.state.state.get_cluster_config

What used to be patched and is now done through public APIs: the learner's process group is a Ray Train
``Backend`` subclass (``ray.train.backend.Backend``, a DeveloperAPI; trainers/process_group.py), and DeepSpeed's
checkpoint files are read weights-only through torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
(trainers/checkpoints.py).

A root module: it imports Ray only inside the functions, and nothing from nashray's subpackages.
"""

from __future__ import annotations

import inspect

PINNED = {"ray": "2.60.0", "deepspeed": "0.19.8"}


class InternalsChanged(RuntimeError):
    """A private name nashray relies on is missing or changed in the installed library."""


def _changed(library: str, what: str) -> InternalsChanged:
    import importlib.metadata
    try:
        installed = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    return InternalsChanged(f"{what} (nashray.internals was written for {library} {PINNED[library]}, installed: "
                            f"{installed}); update nashray.internals for this version, or install "
                            f"{library}=={PINNED[library]}")


# ------------------------------------------------------------------------------------------------ Ray core

def ray_cluster_mode(enabled: bool) -> None:
    """Set ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` to ``enabled`` in this process.

    Ray derives the constant from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported; while it
    is true, ``ray.util.get_node_ip_address()`` (which ``ray.init`` uses for the services it starts before the node is
    up) answers with the machine's interface address even when the cluster is told 127.0.0.1. Processes Ray spawns
    read the variable from their environment; a driver that imported ``ray`` before setting it keeps the constant it
    derived then. Ray has no public API to re-read it or to pass it to ``ray.init``."""
    import ray._private.ray_constants as ray_constants
    if not isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool):
        raise _changed("ray", "ray._private.ray_constants.ENABLE_RAY_CLUSTER is missing or not a bool: Ray no longer "
                              "reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into that constant")
    ray_constants.ENABLE_RAY_CLUSTER = bool(enabled)


# ------------------------------------------------------------------------------------------------ Ray Serve

_REPLICA_BIND = 'add_port_to_grpc_server(self._server, "[::]:0")'


def bind_serve_replica_grpc_on_node_address() -> str:
    """Make this Serve replica's inter-deployment gRPC server listen on the node's Ray address, not every interface;
    returns that address. Call it in the replica's process (its deployment's constructor), before Serve starts the
    server (which it does right after the constructor).

    Ray Serve 2.60 starts that server with ``add_port_to_grpc_server(server, "[::]:0")``, a name
    ``ray.serve._private.replica`` imports from ``ray._common.tls_utils``: every interface, and no option, environment
    variable or public API changes the address. This rebinds the module's name to a wrapper that puts the node's Ray
    address (where other replicas and proxies connect to it, and what Ray's own services listen on: 127.0.0.1 on a
    local cluster) in place of ``[::]``."""
    import ray
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if not callable(bind):
        raise _changed("ray", "ray.serve._private.replica.add_port_to_grpc_server is missing: Serve no longer binds "
                              "its replicas' gRPC server through that name")
    if _REPLICA_BIND not in inspect.getsource(replica):
        raise _changed("ray", f"ray.serve._private.replica no longer calls {_REPLICA_BIND}: the replica's gRPC "
                              f"server binds some other way, which the rebinding would miss")
    host = ray.util.get_node_ip_address()
    if getattr(bind, "nashray_host", None) == host:
        return host

    def bind_on_node_address(server, address: str):
        return bind(server, address.replace("[::]", f"[{host}]" if ":" in host else host, 1))

    bind_on_node_address.nashray_host = host
    replica.add_port_to_grpc_server = bind_on_node_address
    return host


def ray_autoscaler_cluster_config():
    """The node groups an autoscaler (KubeRay's) has published for the connected cluster, as Ray's
    ``autoscaler_pb2.ClusterConfig``, or None where none has (a local or fixed cluster). Ray must be initialised.

    Read through ``ray._private.state.state.get_cluster_config()``, which is what Ray Data's own autoscaler uses:
    ``ray.nodes()`` and ``ray.cluster_resources()`` list only the nodes that are up, and no public API lists the
    groups a cluster may still scale up to."""
    from ray._private import state as ray_state

    get = getattr(getattr(ray_state, "state", None), "get_cluster_config", None)
    if not callable(get):
        raise _changed("ray", "ray._private.state.state.get_cluster_config is missing: Ray no longer publishes the "
                              "autoscaler's node groups through it")
    return get()
