"""The generator: samples responses from the current policy π_t and takes the learner's weight pushes in place.

A plain class; the driver makes it an actor with ``ray.remote(GeneratorActor)``. It owns one engine
(``generators.engine``: vllm, hf or tabular, see :mod:`nashray.actors.engines`) for the whole campaign: a push replaces the
weights inside the running engine and bumps :meth:`version`, which every sample record carries.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from nashray.actors.engines import build_engine
from nashray.actors.sources import SOURCES
from nashray.cluster.config import CampaignConfig
from nashray.weights import (AdapterPayload, BroadcastManifest, NcclBroadcastTransport, WeightPush, fetch_payload,
                             payload_state_dict)

PROMPT_KEYS = ("prompt_id", "prompt")


class GeneratorActor:
    """``cfg``: the validated campaign config (it pickles through Ray as it is); ``rank``: this generator's index
    (seeds differ)."""

    def __init__(self, cfg: CampaignConfig, rank: int = 0):
        if not isinstance(cfg, CampaignConfig):
            raise TypeError(f"GeneratorActor takes a validated CampaignConfig, got {type(cfg).__name__} (a plain "
                            f"dict: CampaignConfig.model_validate it first)")
        self.cfg, self.rank = cfg, rank
        self.engine = build_engine(cfg, rank)
        self._version = 0
        self._transport = None
        self._tokens = 0
        self._samples = 0
        self._busy_s = 0.0
        self._pushes = 0
        self._push_s = 0.0

    def ready(self) -> dict[str, Any]:
        import ray
        return {"rank": self.rank, "engine": self.engine.name, "version": self._version,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def version(self) -> int:
        return self._version

    def generate(self, prompts: list[dict], n: int, source: str = "policy", seed: int | None = None,
                 score: bool = False) -> list[dict]:
        """n sample records per prompt (``{"prompt_id", "prompt"}`` dicts), in prompt order, from ``source``:
        ``policy`` (π_t), ``ref`` (π_ref) or ``mixture`` (Nash-MD's π_t^{1−β}·π_ref^{β}). ``seed`` makes the draw
        reproducible; None continues this generator's own stream (seeded by campaign seed and rank). A chat prompt
        also has ``messages`` (the JSON of its ``{"role", "content"}`` list): those are encoded instead of ``prompt``,
        and its records keep them.

        ``logprob`` is the sampling distribution's (after temperature and top-p). With ``score``, each record also
        gets ``policy_logprob``: log π(response | prompt) under the loaded weights at temperature 1 — what the losses
        need as π_t when the learner has moved on by the time it trains on these samples (asynchronous rounds)."""
        if source not in SOURCES:
            raise ValueError(f"unknown sample source {source!r}; expected one of {SOURCES}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (samples per prompt), got {n!r}")
        for i, p in enumerate(prompts):
            missing = [k for k in PROMPT_KEYS if not isinstance(p, dict) or k not in p]
            if missing:
                raise ValueError(f"prompts[{i}] lacks {missing}: each prompt is a dict with {list(PROMPT_KEYS)}")
        if not prompts:
            return []
        start = time.perf_counter()
        # A chat prompt's messages (JSON, see nashray.cluster.prompts.Prompt) go to the chat template; its text to the records.
        prompt_ids = [self.engine.encode_prompt(p["prompt_id"], json.loads(p["messages"]) if p.get("messages")
                                                else p["prompt"]) for p in prompts]
        drawn = self.engine.sample(prompt_ids, n, source, seed)
        records = []
        for p, ids, samples in zip(prompts, prompt_ids, drawn):
            for index, sample in enumerate(samples):
                records.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "prompt_ids": ids,
                                "response": self.engine.decode_response(sample.ids), "response_ids": sample.ids,
                                "logprob": sample.logprob, "version": self._version, "source": source,
                                "sample_index": index, **({"messages": p["messages"]} if "messages" in p else {})})
                self._tokens += len(sample.ids)
        if score:
            scored = [i for i, r in enumerate(records) if r["response_ids"]]  # an empty response's log-prob is 0
            logprobs = self.engine.sequence_logprobs([records[i]["prompt_ids"] for i in scored],
                                                     [records[i]["response_ids"] for i in scored]) if scored else []
            of = dict(zip(scored, logprobs))
            for i, r in enumerate(records):
                r["policy_logprob"] = float(of.get(i, 0.0))
        self._samples += len(records)
        self._busy_s += time.perf_counter() - start
        return records

    def apply_weights(self, push, version: int) -> int:
        """Load the weights of a :class:`nashray.weights.WeightPush` (safetensors bytes, an ObjectRef of a tensor
        payload or of a LoRA policy's adapters, or a broadcast manifest) into the running engine; returns the new
        version."""
        if not isinstance(push, WeightPush):
            raise TypeError(f"apply_weights takes a nashray.weights.WeightPush, got {type(push).__name__}")
        if push.version != version:
            raise ValueError(f"weight push carries version {push.version} but apply_weights was told {version}")
        if version < self._version:
            raise ValueError(f"weight push version {version} is older than the loaded version {self._version}")
        start = time.perf_counter()
        if isinstance(push.payload, BroadcastManifest):
            if self._transport is None:
                raise RuntimeError("a broadcast push reached a generator that never joined the weight broadcast "
                                   "(call join_weight_broadcast first)")
            weights = self._transport.receive(push)
            self.engine.load_weights(weights)
        elif isinstance(payload := fetch_payload(push), AdapterPayload):
            self.engine.load_adapter(payload, version)
        else:
            self.engine.load_weights(payload_state_dict(payload, version))
        self._version = version
        self._pushes += 1
        self._push_s += time.perf_counter() - start
        return self._version

    def join_weight_broadcast(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl",
                              timeout_s: float = 600.0) -> None:
        """Join the learner's broadcast group as ``rank`` (≥ 1) of ``world_size``; later broadcast pushes are
        received here, on this process's accelerator (the in-process vLLM worker shares it)."""
        self._transport = NcclBroadcastTransport(host, port, rank, world_size, backend=backend, timeout_s=timeout_s)

    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """log π_θ(response | prompt) of fixed token sequences under the loaded weights (no temperature, no top-p)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        return self.engine.sequence_logprobs(prompt_ids, response_ids)

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "engine": self.engine.name, "version": self._version, "samples": self._samples,
                "tokens_generated": self._tokens, "busy_s": self._busy_s, "pushes": self._pushes,
                "push_s": self._push_s}
