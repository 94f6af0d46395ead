"""The learner's torch.distributed process group with its rendezvous store listening on the node's address only.

torch's TCPStore server listens on every interface whatever host it is given (it has no bind-address option), and
Ray Train starts one on the first worker. This backend binds the store's listening socket itself, on the first
worker's Ray node address (127.0.0.1 on a local cluster), and hands it to the store (``master_listen_fd``)."""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_STORE: dict = {}  # the first worker's store server and its socket, alive as long as the worker process


def _serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    import torch.distributed as dist
    host = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, 0))
    listener.listen(world_size + 16)
    port = listener.getsockname()[1]
    store = dist.TCPStore(host, port, world_size, True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=listener.fileno())
    _STORE.update(store=store, listener=listener)
    return host, port


def _join(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    import os

    import psutil
    import torch.distributed as dist
    timeout = timedelta(seconds=timeout_s)
    # gloo listens on the address the hostname resolves to unless told an interface: the one holding this node's
    # Ray address (lo on a local cluster).
    node = ray.util.get_node_ip_address()
    interface = next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == node for a in addrs)),
                     None)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    store = _STORE["store"] if rank == 0 else dist.TCPStore(host, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _NodeAddressBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        world = len(worker_group)
        worker_group.execute(_set_torch_distributed_env_vars)
        host, port = worker_group.execute_single(0, _serve_store, world, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, _join, host, port, rank, world, backend_config.backend,
                                                   backend_config.timeout_s) for rank in range(world)])


class NodeAddressTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _NodeAddressBackend
