"""The private internals nashray touches (nashray/internals.py), checked against the installed Ray: each private name
is there, the patch has its effect, and a missing or changed name fails loudly. Then the former patches, now done
through public APIs: the learner's process-group backend (a public Ray Train ``Backend``) and DeepSpeed's checkpoint
reads forced weights-only (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``). No Ray cluster is started."""

from __future__ import annotations

import ast
import importlib.metadata
import ipaddress
import os
from pathlib import Path

import psutil
import pytest

from nashray import internals
from nashray.internals import InternalsChanged


def listening_ports() -> dict[int, str]:
    """port → address of every TCP socket this process listens on (an IPv4-mapped IPv6 address as its IPv4)."""
    def plain(ip: str) -> str:
        address = ipaddress.ip_address(ip.split("%")[0])
        return str(getattr(address, "ipv4_mapped", None) or address)
    return {c.laddr.port: plain(c.laddr.ip) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_the_installed_versions_are_the_ones_internals_was_written_for():
    assert {name: importlib.metadata.version(name) for name in internals.PINNED} == internals.PINNED


# ------------------------------------------------------------------------------------------------ Ray core

def test_ray_cluster_mode_sets_the_constant_ray_reads_at_import(monkeypatch):
    import ray._private.ray_constants as ray_constants
    from ray._private import services
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # restored after the test
    monkeypatch.setattr("ray._private.worker._global_node", None)
    internals.ray_cluster_mode(False)
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    # what the constant decides: with no node up, Ray's address for this node is loopback, not an interface's
    assert services.get_node_ip_address() in ("127.0.0.1", "::1")
    internals.ray_cluster_mode(True)
    assert ray_constants.ENABLE_RAY_CLUSTER is True


def test_ray_cluster_mode_fails_loudly_when_the_constant_is_gone(monkeypatch):
    import ray._private.ray_constants as ray_constants
    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(InternalsChanged, match=r"ray\._private\.ray_constants\.ENABLE_RAY_CLUSTER is missing .*"
                                               r"written for ray 2\.60\.0, installed: 2\.60\.0"):
        internals.ray_cluster_mode(False)


def test_autoscaler_cluster_config_reads_rays_published_node_groups(monkeypatch):
    """The private reader exists, takes no argument and returns Ray's ClusterConfig proto (its effect needs a
    cluster with an autoscaler: the KubeRay manifests' test); a missing one fails loudly."""
    import inspect

    from ray._private import state as ray_state
    from ray.core.generated import autoscaler_pb2
    assert list(inspect.signature(ray_state.state.get_cluster_config).parameters) == []
    assert inspect.signature(ray_state.GlobalState.get_cluster_config).return_annotation in (
        autoscaler_pb2.ClusterConfig, "autoscaler_pb2.ClusterConfig")
    published = autoscaler_pb2.ClusterConfig()
    monkeypatch.setattr(ray_state.state, "get_cluster_config", lambda: published)
    assert internals.ray_autoscaler_cluster_config() is published
    monkeypatch.delattr(ray_state.GlobalState, "get_cluster_config")
    monkeypatch.delattr(ray_state.state, "get_cluster_config")
    with pytest.raises(InternalsChanged, match=r"ray\._private\.state\.state\.get_cluster_config is missing"):
        internals.ray_autoscaler_cluster_config()


# ------------------------------------------------------------------------------------------------ Ray Serve

@pytest.fixture
def replica_module(monkeypatch):
    """ray.serve._private.replica with its binding restored after the test; the node's Ray address is 127.0.0.1."""
    import ray
    from ray.serve._private import replica
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    return replica


def test_serve_replica_grpc_server_binds_the_node_address_not_every_interface(replica_module):
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    assert internals._REPLICA_BIND in inspect.getsource(replica_module)  # what Serve 2.60's replica does
    assert internals.bind_serve_replica_grpc_on_node_address() == "127.0.0.1"
    wrapper = replica_module.add_port_to_grpc_server
    assert internals.bind_serve_replica_grpc_on_node_address() == "127.0.0.1"
    assert replica_module.add_port_to_grpc_server is wrapper  # idempotent: wrapped once per host
    server = grpc.server(ThreadPoolExecutor(1))
    port = replica_module.add_port_to_grpc_server(server, "[::]:0")  # Serve's own call
    server.start()
    try:
        assert port > 0 and listening_ports().get(port) == "127.0.0.1"
    finally:
        server.stop(None)


def test_serve_replica_rebinding_brackets_an_ipv6_node_address(replica_module, monkeypatch):
    import ray
    seen = []
    monkeypatch.setattr(replica_module, "add_port_to_grpc_server", lambda server, address: seen.append(address) or 1)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "fd00::7")
    internals.bind_serve_replica_grpc_on_node_address()
    replica_module.add_port_to_grpc_server(None, "[::]:0")
    assert seen == ["[fd00::7]:0"]


def test_serve_replica_rebinding_fails_loudly_when_serve_changed(replica_module, monkeypatch):
    monkeypatch.setattr(internals, "_REPLICA_BIND", 'add_port_to_grpc_server(self._server, "0.0.0.0:0")')
    with pytest.raises(InternalsChanged, match=r"ray\.serve\._private\.replica no longer calls "
                                               r"add_port_to_grpc_server\(self\._server, \"0\.0\.0\.0:0\"\).*ray 2\.60\.0"):
        internals.bind_serve_replica_grpc_on_node_address()
    monkeypatch.delattr(replica_module, "add_port_to_grpc_server")
    with pytest.raises(InternalsChanged, match=r"ray\.serve\._private\.replica\.add_port_to_grpc_server is missing"):
        internals.bind_serve_replica_grpc_on_node_address()


# ------------------------------------------------------------- Ray Train: a public Backend, no private patch

class LocalWorkerGroup:
    """Ray Train's worker-group interface, run in this process: one worker."""

    def __len__(self):
        return 1

    def execute(self, fn, *args, **kwargs):
        return [fn(*args, **kwargs)]

    def execute_async(self, fn, *args, **kwargs):
        return [fn(*args, **kwargs)]

    def execute_single(self, rank, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    execute_single_async = execute_single


class OneWorkerContext:
    def get_local_rank(self): return 0
    def get_local_world_size(self): return 1
    def get_node_rank(self): return 0
    def get_world_rank(self): return 0
    def get_world_size(self): return 1


def test_learner_backend_is_a_public_ray_train_backend_whose_store_listens_on_the_node_address(monkeypatch):
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train.backend import Backend

    from nashray.trainers.process_group import NodeAddressTorchConfig

    backend_cls = NodeAddressTorchConfig().backend_cls
    assert issubclass(backend_cls, Backend)
    assert [c.__name__ for c in backend_cls.__mro__ if c.__module__.startswith("ray")] == ["Backend"]
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_TORCH_DEVICE",
                "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    monkeypatch.setattr(ray.train, "get_context", lambda: OneWorkerContext())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    backend, group = backend_cls(), LocalWorkerGroup()
    assert not dist.is_initialized()
    backend.on_start(group, NodeAddressTorchConfig(backend="gloo", timeout_s=30))
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_TORCH_DEVICE")} == \
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "ACCELERATE_TORCH_DEVICE": "cpu"}
        from nashray.trainers.process_group import _STORE
        store_port = _STORE["listener"].getsockname()[1]
        assert listening_ports().get(store_port) == "127.0.0.1"
    finally:
        backend.on_shutdown(group, NodeAddressTorchConfig())
        if dist.is_initialized():  # one worker: Ray's backend leaves the group up too; not this test's process
            dist.destroy_process_group()


# ------------------------------------------------- DeepSpeed's checkpoint reads: torch's public weights-only switch

class Payload:
    """Creates ``marker`` if ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class FakeEngine:
    """A DeepSpeed engine's load_checkpoint: each state file through DeepSpeed's own TorchCheckpointEngine.load."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
        self.reader, self.loaded = TorchCheckpointEngine(), {}

    def load_checkpoint(self, load_dir, tag):
        for path in sorted((Path(load_dir) / tag).glob("*.pt")):
            self.loaded[path.name] = self.reader.load(str(path), map_location="cpu")
        return str(Path(load_dir) / tag), {}


def _state_folder(tmp_path: Path) -> Path:
    from nashray.layout import DEEPSPEED_DIR, DEEPSPEED_TAG
    folder = tmp_path / "round-0000" / DEEPSPEED_DIR / DEEPSPEED_TAG
    folder.mkdir(parents=True)
    return folder


def test_deepspeeds_weights_only_false_load_is_forced_weights_only(tmp_path):
    """DeepSpeed 0.19.8 asks torch.load for weights_only=False; inside the checkpoint reader's context it gets the
    weights-only unpickler anyway: a planted object is refused, DeepSpeed's own state types come back."""
    import inspect
    import pickle

    import torch
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from nashray.trainers.checkpoints import FORCE_WEIGHTS_ONLY, _weights_only_loads

    assert "weights_only=False" in inspect.getsource(TorchCheckpointEngine.load)  # why the switch is needed
    marker = tmp_path / "payload-ran"
    torch.save({"planted": Payload(marker)}, tmp_path / "planted.pt")
    torch.save({"scaler": LossScaler(8.0), "w": torch.ones(2)}, tmp_path / "state.pt")
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    with _weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            TorchCheckpointEngine().load(str(tmp_path / "planted.pt"))
        state = TorchCheckpointEngine().load(str(tmp_path / "state.pt"))
    assert not marker.exists()
    assert state["scaler"].cur_scale == 8.0 and torch.equal(state["w"], torch.ones(2))
    assert os.environ.get(FORCE_WEIGHTS_ONLY) == before  # the switch is off again


def test_load_deepspeed_state_names_a_planted_file_before_deepspeed_reads_it(tmp_path):
    import torch

    from nashray.trainers.checkpoints import CheckpointError, load_deepspeed_state

    folder = _state_folder(tmp_path)
    torch.save({"module": {"w": torch.zeros(3)}}, folder / "mp_rank_00_model_states.pt")
    engine = FakeEngine()
    load_deepspeed_state(engine, tmp_path / "round-0000")
    assert torch.equal(engine.loaded["mp_rank_00_model_states.pt"]["module"]["w"], torch.zeros(3))
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer": Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    engine = FakeEngine()
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt pickles (builtins|io)\.open, "
                                              r"which is not a tensor.*refused without running it"):
        load_deepspeed_state(engine, tmp_path / "round-0000")
    assert not marker.exists() and not engine.loaded


def private_library_names(source: str) -> dict[int, str]:
    """line → the longest Ray or DeepSpeed name with an underscore-led part that the line imports or reads."""
    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        return parts[0] in ("ray", "deepspeed") and any(p.startswith("_") and not p.startswith("__") for p in parts)

    found: dict[int, str] = {}
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [ast.unparse(node)]
        for dotted in names:
            if private(dotted) and len(dotted) > len(found.get(node.lineno, "")):
                found[node.lineno] = dotted
    return found


def test_nothing_else_in_nashray_touches_private_library_names():
    """The private names live in nashray/internals.py only."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for folder in ("nashray", "cluster", "actors", "trainers", "oracles"):
        for path in sorted((root / folder).glob("*.py")):
            name = path.relative_to(root).as_posix()
            if name == "nashray/internals.py":
                continue
            found += [f"{name}:{line} {dotted}" for line, dotted in private_library_names(path.read_text()).items()]
    assert not found, "private library internals outside nashray/internals.py:\n" + "\n".join(found)


def test_the_private_name_checker_sees_imports_and_attributes_not_strings():
    source = ("import ray._private.ray_constants as c\nfrom ray.train.torch.config import _TorchBackend\n"
              "from ray.train.torch import TorchConfig\nx = ray._private.state.state\n"
              "doc = 'ray._private in a string'\nimport deepspeed\n")
    assert private_library_names(source) == {1: "ray._private.ray_constants", 2: "ray.train.torch.config._TorchBackend",
                                             4: "ray._private.state.state"}
