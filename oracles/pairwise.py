"""A pairwise preference model: a sequence classifier reading (prompt, a, b) jointly and outputting
P(a ≻ b) = σ(f(x, a, b)) directly. Unlike a reward model it can express cycles (a ≻ b ≻ c ≻ a)."""

from __future__ import annotations

import hashlib
import math

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.judging import DEFAULT_TEMPLATE, check_template, order_questions, verdicts_from_orders
from nashray.oracles.reward_model import ScalarHead, sigmoid


class PairwisePreferenceModel(PreferenceOracle):
    """P(a ≻ b) = σ(f(x, a, b)) from a sequence classifier on the joint text (the judging template, plain text).
    ``both_orders`` averages f's answer with the complement of its answer on the swapped pair, so that
    p(a ≻ b) + p(b ≻ a) = 1 even for a model that never learnt to be antisymmetric."""

    def __init__(self, model: str, template: str | None = None, dtype: str = "float32", both_orders: bool = True,
                 batch_size: int = 8, max_length: int = 2048, trust_remote_code: bool = False):
        self.head = ScalarHead(model, dtype, batch_size, max_length, trust_remote_code)
        self.template = check_template(template or DEFAULT_TEMPLATE)
        self.both_orders = both_orders
        template_hash = hashlib.sha256(self.template.encode()).hexdigest()[:12]
        self.oracle_id = f"pairwise_model:{model}:{template_hash}:{'both' if both_orders else 'first'}"

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        questions = order_questions(comparisons, self.both_orders)
        logits = self.head.logits([self.template.format_map({"prompt": p, "a": a, "b": b}) for p, a, b in questions])
        answers = [sigmoid(z) if math.isfinite(z) else f"model output {z} is not finite" for z in logits]
        return verdicts_from_orders(answers, self.both_orders)

    def __repr__(self) -> str:
        return f"PairwisePreferenceModel({self.oracle_id!r})"
