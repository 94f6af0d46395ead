"""A Bradley-Terry reward model as an oracle: each (prompt, response) is scored alone by an
``AutoModelForSequenceClassification`` (``num_labels=1``) and P(a ≻ b) = σ(r(x, a) − r(x, b)). Transitive by
construction; ``.score`` gives r.

Inputs longer than ``max_length`` tokens are cut from the left, keeping the end of the response that the head reads.
"""

from __future__ import annotations

import math

from nashray.models import load_tokenizer, resolve_model_path, torch_dtype
from nashray.oracles.base import Comparison, PreferenceOracle, Verdict


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class ScalarHead:
    """A sequence classifier with one output: the scalar logit for each text, in batches."""

    def __init__(self, model: str, dtype: str = "float32", batch_size: int = 8, max_length: int = 2048,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification
        path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.truncation_side = "left"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"model {model!r} has num_labels={self.model.config.num_labels}; a reward or pairwise "
                             "preference model needs a single scalar output (num_labels=1)")
        if self.model.config.pad_token_id is None:
            # the head reads the last non-pad token, which it can only find knowing the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def logits(self, texts: list[str]) -> list[float]:
        import torch
        from nashray.oracles.hf import left_padded, length_sorted_batches  # lazy: oracles.hf imports torch
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True,
                                 max_length=self.max_length)["input_ids"]
        out = [0.0] * len(texts)
        with torch.inference_mode():
            for batch in length_sorted_batches(encoded, self.batch_size):
                inputs = left_padded([encoded[i] for i in batch], self.model.config.pad_token_id)
                logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits[:, 0].float()
                for row, i in enumerate(batch):
                    out[i] = logits[row].item()
        return out


class RewardModelOracle(PreferenceOracle):
    """P(a ≻ b) = σ(r(x, a) − r(x, b)); the text scored is the chat-templated (user prompt, assistant response)
    conversation when the tokenizer has a chat template, else ``prompt\\nresponse``."""

    def __init__(self, model: str, dtype: str = "float32", batch_size: int = 8, max_length: int = 2048,
                 trust_remote_code: bool = False):
        self.head = ScalarHead(model, dtype, batch_size, max_length, trust_remote_code)
        self.oracle_id = f"reward_model:{model}"

    def _text(self, prompt: str, response: str) -> str:
        from nashray.oracles.hf import chat_text  # lazy: oracles.hf imports torch
        tokenizer = self.head.tokenizer
        if tokenizer.chat_template:
            return chat_text(tokenizer, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}], add_generation_prompt=False)
        return f"{prompt}\n{response}"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"score needs one prompt per response: {len(prompts)} prompts, {len(responses)} "
                             "responses")
        return self.head.logits([self._text(p, r) for p, r in zip(prompts, responses)])

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        unique = list(dict.fromkeys([(c.prompt, c.a) for c in comparisons] + [(c.prompt, c.b) for c in comparisons]))
        rewards = dict(zip(unique, self.score([p for p, _ in unique], [r for _, r in unique])))
        margins = [rewards[(c.prompt, c.a)] - rewards[(c.prompt, c.b)] for c in comparisons]
        return [Verdict(sigmoid(m)) if math.isfinite(m) else Verdict(None, f"reward margin {m} is not finite")
                for m in margins]

    def __repr__(self) -> str:
        return f"RewardModelOracle({self.oracle_id!r})"
