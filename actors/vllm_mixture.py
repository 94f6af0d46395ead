"""π_θ and π_ref as one vLLM model, so that one engine samples from either or from Nash-MD's geometric mixture.

:class:`PolicyReferencePair` holds two copies of the campaign's model — ``policy`` (π_θ, what pushes update) and
``reference`` (π_ref, the initial weights, never pushed) — under distinct module prefixes, so vLLM registers two sets
of attention layers and gives each its own KV cache in the same blocks (one block table, twice the layers: the KV
cache holds half the tokens it would for one model). Its ``source`` attribute, set between ``generate`` calls through
``collective_rpc`` (the engine is in-process, ``uni`` executor), says which stacks run at every step:

- ``policy``: π_θ alone; ``compute_logits`` returns its logits.
- ``ref``: π_ref alone; its logits.
- ``mixture``: both; ``compute_logits`` returns (1−β)·log_softmax(logits_θ) + β·log_softmax(logits_ref), whose
  softmax is the normalised geometric mixture π_θ^{1−β}·π_ref^{β} at that token (Munos et al. 2024, Nash-MD). vLLM's
  temperature, top-p and ``processed_logprobs`` then apply on top, exactly as the HF engine tempers and filters the
  same combination (:func:`nashray.actors.engines.sampling_logprobs`).

A stack that does not run writes no KV, so blocks cached under one source hold no valid KV for a stack that did not
run: the engine resets vLLM's prefix cache whenever it changes the source.

The pair is a vLLM architecture of its own (:data:`ARCHITECTURE`, registered with ``ModelRegistry``); the engine
selects it with ``hf_overrides=pair_config`` on the unchanged model folder, which also records the wrapped
architecture and β in the HF config the pair is built from.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from nashray.actors.sources import SOURCES

ARCHITECTURE = "NashrayPolicyReferencePair"


def pair_config(hf_config, beta: float | None):
    """``hf_overrides`` for vLLM: the model folder's config with the pair as its architecture, the folder's own
    architecture in ``nashray_wraps`` and Nash-MD's β in ``nashray_beta`` (None: no mixture). Idempotent (vLLM may read
    the config more than once)."""
    if hf_config.architectures != [ARCHITECTURE]:
        if not hf_config.architectures:
            raise ValueError("the model's config.json names no architecture: vLLM could not build π_θ and π_ref")
        hf_config.nashray_wraps = list(hf_config.architectures)
        hf_config.architectures = [ARCHITECTURE]
    hf_config.nashray_beta = beta
    return hf_config


def register() -> None:
    """Make :data:`ARCHITECTURE` known to vLLM in this process (the in-process engine's worker shares it)."""
    from vllm import ModelRegistry
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, PolicyReferencePair)


class PolicyReferencePair(nn.Module):
    """Two instances of the wrapped vLLM model class; see the module docstring."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.utils import maybe_prefix
        hf_config = vllm_config.model_config.hf_config
        wrapped, _ = ModelRegistry.resolve_model_cls(hf_config.nashray_wraps, vllm_config.model_config)
        self.vllm_config = vllm_config
        self.beta = hf_config.nashray_beta
        self.policy = wrapped(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "policy"))
        self.reference = wrapped(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "reference"))
        self.source = "policy"

    def set_source(self, source: str) -> None:
        if source not in SOURCES or (source == "mixture" and self.beta is None):
            raise ValueError(f"source {source!r}: expected one of {SOURCES}, 'mixture' only with β")
        self.source = source

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Only for prompt embeddings and multimodal inputs, which a pair cannot take: each half embeds on its own.
        raise NotImplementedError("the policy/reference pair embeds its inputs in each half; pass token ids")

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("the policy/reference pair takes token ids, not input embeddings")
        if self.source == "policy":
            return self.policy(input_ids, positions, intermediate_tensors)
        if self.source == "ref":
            return self.reference(input_ids, positions, intermediate_tensors)
        # Both hidden states side by side: vLLM selects the rows to sample (dim 0) before compute_logits.
        return torch.cat([self.policy(input_ids, positions, intermediate_tensors),
                          self.reference(input_ids, positions, intermediate_tensors)], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.source == "policy":
            return self.policy.compute_logits(hidden_states)
        if self.source == "ref":
            return self.reference.compute_logits(hidden_states)
        policy_hidden, reference_hidden = (h.contiguous() for h in hidden_states.chunk(2, dim=-1))
        log_policy = torch.log_softmax(self.policy.compute_logits(policy_hidden).float(), -1)
        log_reference = torch.log_softmax(self.reference.compute_logits(reference_hidden).float(), -1)
        return (1.0 - self.beta) * log_policy + self.beta * log_reference

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """``weights`` (the checkpoint's names) into the policy; the reference reads the model folder itself, so it
        holds the initial weights whatever the policy is given. Pushes reload :attr:`policy` alone."""
        from vllm.model_executor.model_loader import get_model_loader
        loader = get_model_loader(self.vllm_config.load_config)
        if not hasattr(loader, "get_all_weights"):
            raise NotImplementedError(f"the policy/reference pair reads π_ref from the model folder, which load "
                                      f"format {self.vllm_config.load_config.load_format!r} cannot")
        loaded = {f"policy.{name}" for name in self.policy.load_weights(weights)}
        initial = loader.get_all_weights(self.vllm_config.model_config, self.reference)
        return loaded | {f"reference.{name}" for name in self.reference.load_weights(initial)}
