"""The learner's torch.distributed process group with its rendezvous store listening on the node's address only.

torch's TCPStore server listens on every interface whatever host it is given (it has no bind-address option), and
Ray Train starts one on the first worker. This backend binds the store's listening socket itself, on the first
worker's Ray node address (127.0.0.1 on a local cluster), and hands it to the store (``master_listen_fd``).

It is a Ray Train ``Backend`` (``ray.train.backend.Backend``, the DeveloperAPI a ``BackendConfig.backend_cls`` names),
not a subclass of Ray's private ``_TorchBackend``: it sets the torch.distributed environment variables from the public
``ray.train.get_context()`` and tears the group down itself, as ``_TorchBackend`` does."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.torch import TorchConfig

logger = logging.getLogger(__name__)

_STORE: dict = {}  # the first worker's store server and its socket, alive as long as the worker process


def _set_torch_distributed_env_vars() -> None:
    """torchrun's variables (LOCAL_RANK, RANK, WORLD_SIZE, …) from this worker's Ray Train context, and the device
    Hugging Face Accelerate should use."""
    from ray.train.torch import get_device
    context = ray.train.get_context()
    os.environ.update(LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
                      NODE_RANK=str(context.get_node_rank()), RANK=str(context.get_world_rank()),
                      WORLD_SIZE=str(context.get_world_size()), ACCELERATE_TORCH_DEVICE=str(get_device()))


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


def _leave(destroy: bool) -> None:
    import torch
    import torch.distributed as dist
    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _NodeAddressBackend(Backend):
    share_cuda_visible_devices = True  # as Ray's torch backend: NCCL needs to see the node's other GPUs

    def on_start(self, worker_group, backend_config: TorchConfig):
        world = len(worker_group)
        worker_group.execute(_set_torch_distributed_env_vars)
        host, port = worker_group.execute_single(0, _serve_store, world, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, _join, host, port, rank, world, backend_config.backend,
                                                   backend_config.timeout_s) for rank in range(world)])

    def on_shutdown(self, worker_group, backend_config: TorchConfig):
        timeout_s = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(worker_group.execute_async(_leave, len(worker_group) > 1), timeout=timeout_s)
        except GetTimeoutError:  # a hung collective: Ray stops the workers next
            logger.warning("the learner's process group did not shut down within %s s", timeout_s)


class NodeAddressTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _NodeAddressBackend
