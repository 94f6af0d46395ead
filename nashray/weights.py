"""Pushing the learner's weights to the generators: one format, one interface, two transports.

Format: the full HF-named state dict, CPU and contiguous. Tensors that are the same tensor under two names
(SmolLM2's ``lm_head.weight`` is ``model.embed_tokens.weight``) are stored once and the dropped names listed, so a
receiver gets them back as aliases and a strict ``load_state_dict`` sees every key. Two containers: a
:class:`TensorPayload` (each tensor's raw bytes as a numpy array, what the object store keeps without copying) for
pushes, and safetensors bytes (the dropped names in the file's metadata) for inline payloads and files.

Interface: a :class:`WeightTransport` publishes a state dict as a :class:`WeightPush` on the learner (rank 0) and
turns a push back into weights on each generator.

- :class:`ObjectStoreTransport` (CPU clusters, the default): the learner ``ray.put``\\ s a :class:`TensorPayload`
  once — the only copy, no encoding — and every generator ``ray.get``\\ s the same ObjectRef, which hands back
  read-only views of the shared-memory object (no copy, no decoding) that the engine's reload copies from.
- :class:`NcclBroadcastTransport` (GPU clusters): the learner and the generators form their own process group (not
  torch's default group, which DeepSpeed and vLLM already own) and the learner broadcasts the tensors in buckets;
  the push then carries only a :class:`BroadcastManifest`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, Union

from nashray.models import torch_dtype

if TYPE_CHECKING:
    import torch

TIES_METADATA_KEY = "nashray.tied"
"""safetensors metadata key: JSON ``{dropped name: kept name}`` of the tied tensors stored once."""


# ------------------------------------------------------------------------------------------------ format

def _resolve_dtype(dtype: "str | torch.dtype | None"):
    if dtype is None or not isinstance(dtype, str):
        return dtype
    return torch_dtype(dtype)


def _dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def _same_tensor(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def find_tied(state_dict: "dict[str, torch.Tensor]") -> dict[str, str]:
    """``{dropped name: kept name}`` for every tensor that is the very same tensor (storage, offset, shape, strides)
    as an earlier entry of the state dict; the first name in state-dict order is the one kept."""
    kept_by_storage: dict[tuple, list[str]] = {}
    tied: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        earlier = kept_by_storage.setdefault(key, [])
        twin = next((k for k in earlier if _same_tensor(state_dict[k], tensor)), None)
        if twin is None:
            earlier.append(name)
        else:
            tied[name] = twin
    return tied


def _stored_tensors(state_dict: "dict[str, torch.Tensor]", dtype: "str | torch.dtype | None"
                    ) -> "tuple[dict[str, torch.Tensor], dict[str, str]]":
    """The tensors to store — CPU, contiguous, one per storage, floating point cast to ``dtype`` when given (integer
    buffers keep theirs) — and the tied names left out, ``{dropped: kept}``."""
    import torch

    if not state_dict:
        raise ValueError("cannot encode an empty state dict")
    bad = [name for name, t in state_dict.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict entries {bad[:5]} are not tensors")
    target = _resolve_dtype(dtype)
    tied = find_tied(state_dict)
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if name in tied:
            continue
        t = tensor.detach()
        if target is not None and t.is_floating_point():
            t = t.to(target)
        t = t.to("cpu").contiguous()
        # Distinct views of one storage (a slice of a fused weight) survive the tie check: give them their own.
        storage = t.untyped_storage().data_ptr()
        if storage in seen_storages and t.numel() > 0:
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        seen_storages.add(storage)
        out[name] = t
    return out, tied


def encode_state_dict(state_dict: "dict[str, torch.Tensor]", dtype: "str | torch.dtype | None" = None) -> bytes:
    """Safetensors bytes of ``state_dict`` (see :func:`_stored_tensors`), the tied names in the metadata."""
    from safetensors.torch import save
    out, tied = _stored_tensors(state_dict, dtype)
    return save(out, metadata={TIES_METADATA_KEY: json.dumps(tied)})


def read_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the header is 8 little-endian bytes of length, then JSON)."""
    if len(payload) < 8:
        raise ValueError(f"weights payload of {len(payload)} bytes is not safetensors")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > len(payload) - 8:
        raise ValueError(f"weights payload header claims {header_len} bytes, only {len(payload) - 8} follow")
    return json.loads(payload[8: 8 + header_len]).get("__metadata__") or {}


def decode_state_dict(payload: bytes, restore_ties: bool = True) -> "dict[str, torch.Tensor]":
    """The state dict of :func:`encode_state_dict` bytes; with ``restore_ties`` the dropped tied names come back as
    aliases of the tensor they were tied to (so a strict ``load_state_dict`` sees every key)."""
    from safetensors.torch import load

    tensors = load(bytes(payload))
    if restore_ties:
        for dropped, kept in json.loads(read_metadata(payload).get(TIES_METADATA_KEY, "{}")).items():
            tensors[dropped] = tensors[kept]
    return tensors


@dataclass(frozen=True)
class TensorPayload:
    """A state dict as each stored tensor's raw bytes (1-D uint8 numpy arrays: Ray's serialiser keeps numpy buffers
    out of band, so ``ray.put`` copies them once into shared memory and ``ray.get`` returns views of it) with its
    dtype and shape; tied names stored once, listed in ``tied`` as ``{dropped: kept}``."""
    arrays: dict
    specs: dict  # name -> (dtype name, shape)
    tied: dict

    @classmethod
    def from_state_dict(cls, state_dict: "dict[str, torch.Tensor]", dtype: "str | torch.dtype | None" = None
                        ) -> "TensorPayload":
        import torch
        out, tied = _stored_tensors(state_dict, dtype)
        return cls({name: t.reshape(-1).view(torch.uint8).numpy() for name, t in out.items()},
                   {name: (_dtype_name(t.dtype), tuple(t.shape)) for name, t in out.items()}, tied)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def state_dict(self, restore_ties: bool = True) -> "dict[str, torch.Tensor]":
        """The tensors, sharing memory with the arrays (read-only when they came from the object store: the engines
        copy out of them)."""
        import warnings

        import torch
        tensors = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, array in self.arrays.items():
                dtype, shape = self.specs[name]
                tensors[name] = torch.from_numpy(array).view(getattr(torch, dtype)).reshape(shape)
        if restore_ties:
            for dropped, kept in self.tied.items():
                tensors[dropped] = tensors[kept]
        return tensors


@dataclass(frozen=True)
class AdapterPayload:
    """A LoRA policy's adapters as peft saves them: the files of an adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``) by name. The push of ``learner.lora.push: adapter``: a generator's engine applies
    them over the base weights it already holds."""
    files: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())


# ---------------------------------------------------------------------------------------------- the push

@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class BroadcastManifest:
    """What a receiver must allocate for a bucketed broadcast: the tensors in send order, grouped in buckets (each
    bucket one flat tensor of one dtype), plus the tied names to alias afterwards."""
    buckets: tuple[tuple[TensorSpec, ...], ...]
    tied: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightPush:
    """One policy version on its way to the generators. ``payload``: safetensors bytes inline, an ObjectRef of a
    :class:`TensorPayload` (object-store transport) or of an :class:`AdapterPayload` (a LoRA policy's adapters), or
    a :class:`BroadcastManifest` (broadcast transport)."""
    version: int
    payload: Union[bytes, "ray.ObjectRef", BroadcastManifest]  # noqa: F821
    n_params: int
    nbytes: int
    dtype: str


def _summary(tensors: "dict[str, torch.Tensor]", tied: dict[str, str]) -> tuple[int, int, str]:
    kept = [t for name, t in tensors.items() if name not in tied]
    dtypes = sorted({_dtype_name(t.dtype) for t in kept if t.is_floating_point()}) or ["none"]
    return sum(t.numel() for t in kept), sum(t.numel() * t.element_size() for t in kept), ",".join(dtypes)


class WeightTransport(Protocol):
    """Learner side: ``publish`` makes the push of a state dict and ``deliver`` completes its delivery (a no-op for
    the object store; the collective broadcast itself for NCCL, which must run while every generator sits in
    ``receive``). Generator side: ``receive`` turns a push into a state dict (tied names as aliases)."""

    def publish(self, state_dict: "dict[str, torch.Tensor]", version: int) -> WeightPush: ...

    def deliver(self) -> None: ...

    def receive(self, push: WeightPush) -> "dict[str, torch.Tensor]": ...


class ObjectStoreTransport:
    """A :class:`TensorPayload` put once into the Ray object store; every generator gets the same ref."""

    def __init__(self, dtype: "str | torch.dtype | None" = None):
        self.dtype = dtype

    def publish(self, state_dict: "dict[str, torch.Tensor]", version: int) -> WeightPush:
        import ray
        payload = TensorPayload.from_state_dict(state_dict, self.dtype)
        n_params, _, dtype = _summary(state_dict, payload.tied)
        if self.dtype is not None:
            dtype = _dtype_name(_resolve_dtype(self.dtype))
        return WeightPush(version=version, payload=ray.put(payload), n_params=n_params, nbytes=payload.nbytes,
                          dtype=dtype)

    def deliver(self) -> None:
        """Nothing left to do: the tensors are in the object store once ``publish`` returns."""

    def receive(self, push: WeightPush) -> "dict[str, torch.Tensor]":
        return push_state_dict(push)


def fetch_payload(push: WeightPush):
    """The push's payload, got from the object store when the push holds its reference."""
    import ray
    return ray.get(push.payload) if isinstance(push.payload, ray.ObjectRef) else push.payload


def push_state_dict(push: WeightPush, restore_ties: bool = True) -> "dict[str, torch.Tensor]":
    """The state dict of an inline (safetensors bytes) or object-store push."""
    return payload_state_dict(fetch_payload(push), push.version, restore_ties)


def payload_state_dict(payload, version: int, restore_ties: bool = True) -> "dict[str, torch.Tensor]":
    """The state dict of a fetched push payload (safetensors bytes or a :class:`TensorPayload`) of ``version``."""
    if isinstance(payload, TensorPayload):
        return payload.state_dict(restore_ties)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return decode_state_dict(payload, restore_ties)
    raise TypeError(f"weight push v{version} carries a {type(payload).__name__}, not safetensors bytes or an "
                    f"ObjectRef of a TensorPayload")


class NcclBroadcastTransport:
    """Bucketed ``broadcast`` from the learner (group rank 0) to every generator (group ranks 1..N).

    The group is built from its own ``TCPStore`` rendezvous (``host:port``, served by rank 0), outside torch's
    default process group. ``backend="nccl"`` for GPU tensors (``device`` = that process's CUDA device);
    ``backend="gloo"`` runs the same code on CPU tensors. Each bucket is one flat tensor of one dtype of at most
    ``bucket_bytes`` (one oversized tensor makes its own bucket); a peer missing for ``timeout_s`` fails the
    collective instead of hanging the campaign.

    The learner calls ``publish`` (builds the buckets, returns the manifest push at once), hands the push to every
    generator's ``apply_weights``, then calls ``deliver`` (the broadcast); receivers allocate from the manifest.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl",
                 device: "str | torch.device | None" = None, bucket_bytes: int = 256 * 2**20,
                 timeout_s: float = 600.0, dtype: "str | torch.dtype | None" = None):
        import torch
        import torch.distributed as dist

        if world_size < 2:
            raise ValueError(f"a weight broadcast needs the learner and at least one generator, "
                             f"world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"broadcast rank {rank} is outside [0, {world_size})")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"broadcast backend {backend!r}: expected 'nccl' or 'gloo'")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        self.bucket_bytes, self.dtype = bucket_bytes, dtype
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("nashray-weights", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            self._group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self._store = store  # rank 0 serves the rendezvous: the store must live as long as the group
        self._pending: tuple[BroadcastManifest, dict] | None = None

    def _broadcast(self, tensor: "torch.Tensor") -> None:
        import torch.distributed as dist
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._group.broadcast([tensor], options).wait()

    def publish(self, state_dict: "dict[str, torch.Tensor]", version: int) -> WeightPush:
        """Plan the buckets and return the manifest push; the tensors stay where they are until ``deliver``."""
        if self.rank != 0:
            raise RuntimeError(f"only the learner (broadcast rank 0) publishes; this is rank {self.rank}")
        tied = find_tied(state_dict)
        target = _resolve_dtype(self.dtype)
        buckets: list[list[TensorSpec]] = [[]]
        bucket_dtype, size = None, 0
        for name, tensor in state_dict.items():
            if name in tied:
                continue
            dtype = target if target is not None and tensor.is_floating_point() else tensor.dtype
            nbytes = tensor.numel() * dtype.itemsize
            if buckets[-1] and (dtype != bucket_dtype or size + nbytes > self.bucket_bytes):
                buckets.append([])
                size = 0
            buckets[-1].append(TensorSpec(name, tuple(tensor.shape), _dtype_name(dtype)))
            bucket_dtype, size = dtype, size + nbytes
        manifest = BroadcastManifest(buckets=tuple(tuple(b) for b in buckets), tied=tied)
        self._pending = (manifest, state_dict)
        n_params, nbytes, dtype = _summary(state_dict, tied)
        if target is not None:
            dtype = _dtype_name(target)
        return WeightPush(version=version, payload=manifest, n_params=n_params, nbytes=nbytes, dtype=dtype)

    def deliver(self) -> None:
        """Broadcast the published tensors, one flat bucket at a time (one bucket of extra memory at most)."""
        import torch
        if self._pending is None:
            raise RuntimeError("deliver() without a publish(): nothing to broadcast")
        (manifest, state_dict), self._pending = self._pending, None
        for bucket in manifest.buckets:
            dtype = getattr(torch, bucket[0].dtype)
            flat = torch.cat([state_dict[spec.name].detach().reshape(-1).to(self.device, dtype) for spec in bucket])
            self._broadcast(flat)

    def receive(self, push: WeightPush) -> "dict[str, torch.Tensor]":
        import torch
        if self.rank == 0:
            raise RuntimeError("the learner (broadcast rank 0) sends; it does not receive")
        manifest = push.payload
        if not isinstance(manifest, BroadcastManifest):
            raise TypeError(f"weight push v{push.version} carries a {type(manifest).__name__}, not a "
                            f"BroadcastManifest: it was not published by a broadcast transport")
        tensors: dict[str, torch.Tensor] = {}
        for bucket in manifest.buckets:
            dtype = getattr(torch, bucket[0].dtype)
            numels = [_numel(spec.shape) for spec in bucket]
            flat = torch.empty(sum(numels), dtype=dtype, device=self.device)
            self._broadcast(flat)
            for spec, piece in zip(bucket, flat.split(numels)):
                tensors[spec.name] = piece.view(spec.shape)
        for dropped, kept in manifest.tied.items():
            tensors[dropped] = tensors[kept]
        return tensors

    def close(self) -> None:
        self._pending = None
        self._group = None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

