"""The weight-push format (safetensors bytes, ties stored once) and its transports with real Ray generator actors."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load

from nashray.weights import (TIES_METADATA_KEY, NcclBroadcastTransport, ObjectStoreTransport, decode_state_dict,
                              encode_state_dict, find_tied, read_metadata)


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_round_trip_stores_tied_weights_once_and_restores_them():
    model = tied_llama()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()

    payload = encode_state_dict(state)
    stored = load(payload)
    assert "lm_head.weight" not in stored and set(stored) == set(state) - {"lm_head.weight"}
    assert json.loads(read_metadata(payload)[TIES_METADATA_KEY]) == {"lm_head.weight": "model.embed_tokens.weight"}

    decoded = decode_state_dict(payload)
    assert set(decoded) == set(state)
    assert decoded["lm_head.weight"] is decoded["model.embed_tokens.weight"]
    assert all(torch.equal(decoded[k], v) for k, v in state.items())
    fresh = tied_llama()
    with torch.no_grad():
        fresh.model.embed_tokens.weight.zero_()
    fresh.load_state_dict(decoded, strict=True)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert set(decode_state_dict(payload, restore_ties=False)) == set(stored)


def test_ties_are_found_by_storage_not_by_name_and_cast_spares_integers():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"first": base, "same": base, "rows": base[:2], "copy": base.clone(), "steps": torch.tensor([7, 8])}
    assert find_tied(state) == {"same": "first"}  # a partial view or an equal copy is not a tie

    decoded = decode_state_dict(encode_state_dict(state, dtype="bfloat16"))
    assert set(decoded) == set(state) and decoded["same"] is decoded["first"]
    assert decoded["rows"].dtype == torch.bfloat16 and torch.equal(decoded["rows"], base[:2].bfloat16())
    assert decoded["steps"].dtype == torch.int64 and decoded["steps"].tolist() == [7, 8]
    noncontiguous = {"t": base.t()}
    assert torch.equal(decode_state_dict(encode_state_dict(noncontiguous))["t"], base.t())


def test_bad_payloads_and_state_dicts_are_named():
    with pytest.raises(ValueError, match="empty state dict"):
        encode_state_dict({})
    with pytest.raises(TypeError, match=r"\['w'\] are not tensors"):
        encode_state_dict({"w": [1.0, 2.0]})
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        encode_state_dict({"w": torch.ones(2)}, dtype="fp8")
    with pytest.raises(ValueError, match="is not safetensors"):
        read_metadata(b"abc")
    with pytest.raises(ValueError, match="header claims"):
        read_metadata(encode_state_dict({"w": torch.ones(2)})[:20])


# ------------------------------------------------------------------------------------------ transports

def _config(model_dir: str):
    from nashray.cluster.config import CampaignConfig
    return CampaignConfig.model_validate({
        "model": {"path": model_dir, "dtype": "float32"}, "generators": {"engine": "hf"}})


def _pushed_model(model_dir: str, seed: int):
    from nashray.models import load_causal_lm
    model = load_causal_lm(model_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _expected(model, prompt_ids, response_ids) -> np.ndarray:
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs
    with torch.no_grad():
        return causal_lm_sequence_logprobs(model, prompt_ids, response_ids, pad_id=0).numpy()


PROMPT_IDS, RESPONSE_IDS = [[1, 268, 259, 201], [1, 67, 302]], [[297, 9, 2], [306, 67, 114, 130]]


@pytest.fixture(scope="module")
def generators(ray_cluster, tiny_model_dir):
    """Two real generator actors (hf engine) on the local Ray cluster."""
    from nashray.actors.generator import GeneratorActor
    Generator = ray_cluster.remote(GeneratorActor).options(num_cpus=1)
    actors = [Generator.remote(_config(tiny_model_dir), rank) for rank in range(2)]
    ray_cluster.get([g.ready.remote() for g in actors])
    yield actors
    for g in actors:
        ray_cluster.kill(g)


@pytest.mark.ray
def test_tensor_payload_comes_back_from_the_object_store_as_views_bit_for_bit(ray_cluster):
    """bf16, int and tied tensors survive put/get exactly; what ``ray.get`` returns are read-only views of the
    shared-memory object, not copies."""
    from nashray.weights import TensorPayload
    embed = torch.randn(300, 64, dtype=torch.bfloat16)
    state = {"embed.weight": embed, "head.weight": embed, "norm.weight": torch.randn(64),
             "positions": torch.arange(10), "scalar": torch.tensor(3.5)}
    got = ray_cluster.get(ray_cluster.put(TensorPayload.from_state_dict(state)))
    assert got.tied == {"head.weight": "embed.weight"}
    assert not got.arrays["embed.weight"].flags.writeable  # a view of the object store
    restored = got.state_dict()
    assert set(restored) == set(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    assert restored["head.weight"] is restored["embed.weight"]


@pytest.mark.ray
def test_object_store_push_is_put_once_and_applied_by_two_generators(ray_cluster, generators, tiny_model_dir,
                                                                    monkeypatch):
    ray = ray_cluster
    version = ray.get(generators[0].version.remote()) + 1
    before = ray.get(generators[0].sequence_logprobs.remote(PROMPT_IDS, RESPONSE_IDS))

    model = _pushed_model(tiny_model_dir, seed=1)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    push = ObjectStoreTransport().publish(model.state_dict(), version=version)
    monkeypatch.undo()
    assert len(puts) == 1 and puts[0].nbytes == push.nbytes
    # The put payload's arrays share memory with the state dict: publishing copies nothing before the put.
    state = model.state_dict()
    assert all(np.shares_memory(puts[0].arrays[name], state[name].numpy()) for name in puts[0].arrays)
    assert isinstance(push.payload, ray.ObjectRef)
    assert push.n_params == sum(p.numel() for p in model.parameters()) and push.dtype == "float32"

    assert ray.get([g.apply_weights.remote(push, version) for g in generators]) == [version, version]
    expected = _expected(model, PROMPT_IDS, RESPONSE_IDS)
    for g in generators:
        got = ray.get(g.sequence_logprobs.remote(PROMPT_IDS, RESPONSE_IDS))
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert ray.get(g.version.remote()) == version
    assert np.abs(np.array(before) - expected).max() > 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_bucketed_broadcast_reaches_a_generator_over_gloo(ray_cluster, generators, tiny_model_dir):
    """The broadcast transport's own code (rendezvous, bucket plan, per-bucket broadcast, unflattening) on the
    gloo backend; the NCCL backend is the same calls on CUDA tensors and needs GPUs to test."""
    ray = ray_cluster
    generator = generators[1]
    version = ray.get(generator.version.remote()) + 1
    port = _free_port()
    joined = generator.join_weight_broadcast.remote("127.0.0.1", port, 1, 2, backend="gloo", timeout_s=120)
    sender = NcclBroadcastTransport("127.0.0.1", port, 0, 2, backend="gloo", timeout_s=120, bucket_bytes=64 * 1024)
    ray.get(joined)

    model = _pushed_model(tiny_model_dir, seed=2)
    expected = _expected(model, PROMPT_IDS, RESPONSE_IDS)
    before = ray.get(generator.sequence_logprobs.remote(PROMPT_IDS, RESPONSE_IDS))
    assert np.abs(np.array(before) - expected).max() > 0.1
    push = sender.publish(model.state_dict(), version=version)
    assert len(push.payload.buckets) > 3  # several buckets: the plan splits at bucket_bytes
    applied = generator.apply_weights.remote(push, version)
    sender.deliver()
    assert ray.get(applied) == version
    np.testing.assert_allclose(ray.get(generator.sequence_logprobs.remote(PROMPT_IDS, RESPONSE_IDS)), expected,
                               atol=1e-4)
    sender.close()
