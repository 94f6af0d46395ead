"""The campaign's roles as the driver holds them — generator and judge actor pools and the learner — and the calls a
round makes on them: sample, judge, score, push weights. The driver and the evaluation both go through these, so a
round's work is spread over the actors in one way only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from nashray.cluster.actor_pool import ActorPool
from nashray.trainers.learner import Learner, Probe
from nashray.weights import WeightPush


@dataclass
class Roles:
    """The campaign's actor pools and the learner; ``current_push`` is the newest weight push, which a replacement
    generator is brought to. ``learner`` and the judges are None where a caller needs the generators only (the
    benchmarks)."""
    generators: ActorPool
    judges: ActorPool | None = None
    learner: Learner | None = None
    judge_batch: int = 64
    current_push: WeightPush | None = None
    eval_judges: ActorPool | None = None  # started by the first evaluation when evaluation.oracle is set

    def shutdown(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()
        for pool in (self.generators, self.judges, self.eval_judges):
            if pool is not None:
                pool.shutdown()


def round_seed(cfg, t: int, stream: str) -> int:
    """Round t's seed for one random stream of a campaign (``cfg``, a ``CampaignConfig``): its samples of each source,
    the judges' draws, an evaluation's answers."""
    return int(np.random.SeedSequence([cfg.seed, t, *stream.encode()]).generate_state(1)[0])


def chunk_seed(seed: int | None, chunk: int) -> int | None:
    """The seed of one chunk of a seeded call: a function of the campaign seed, round, stream and chunk alone, so a
    resumed round, or a chunk retried on a replaced actor, draws exactly what the first attempt would have."""
    return None if seed is None else int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def generate(roles: Roles, prompts: list[dict], k: int, source: str, score: bool = False, *,
             seed: int | None) -> list[dict]:
    """K samples per prompt from the generators, prompts spread round-robin over them (``score``: see
    :meth:`nashray.actors.generator.GeneratorActor.generate`; ``seed``: see :func:`chunk_seed`; None continues each
    generator's own stream, seeded by campaign seed and rank)."""
    n = len(roles.generators)
    chunks = [(prompts[i::n], k, source, chunk_seed(seed, i), score) for i in range(n) if prompts[i::n]]
    return [s for part in roles.generators.map("generate", chunks, f"{source} samples") for s in part]


def judge(judges: ActorPool, comparisons: list[dict], *, batch_size: int, seed: int | None = None,
          what: str = "judgements") -> list[dict]:
    """Verdicts for ``comparisons`` (dicts of prompt, a, b), spread over ``judges`` in contiguous chunks of at most
    ``batch_size`` (``seed``: see :func:`chunk_seed`)."""
    if not comparisons:
        return []
    size = min(math.ceil(len(comparisons) / len(judges)), batch_size)
    chunks = [(comparisons[i:i + size], chunk_seed(seed, n)) for n, i in enumerate(range(0, len(comparisons), size))]
    return [v for part in judges.map("judge", chunks, what) for v in part]


def score_comparisons(roles: Roles, by_prompt: dict[str, list[dict]], planned: list[tuple]) -> list[dict]:
    """The ``score`` strategy: one oracle score per response, each planned pair's verdict σ(s_a − s_b)."""
    items = [(p, i) for p, samples in by_prompt.items() for i in range(len(samples))]
    size = min(math.ceil(len(items) / len(roles.judges)), roles.judge_batch)
    chunks = [([{"prompt": by_prompt[p][i]["prompt"], "response": by_prompt[p][i]["response"]}
                for p, i in items[n:n + size]],) for n in range(0, len(items), size)]
    scored = dict(zip(items, (s for part in roles.judges.map("score", chunks, "scores") for s in part)))
    verdicts = []
    for p, i, j in planned:
        a, b = scored[(p, i)], scored[(p, j)]
        if a["score"] is None or b["score"] is None:
            verdicts.append({"prob": None, "reason": a["reason"] or b["reason"], "cached": False})
        else:
            verdicts.append({"prob": float(1 / (1 + math.exp(b["score"] - a["score"]))), "reason": None,
                             "cached": False})
    return verdicts


def push_weights(roles: Roles, push: WeightPush, version: int) -> float:
    """Every generator applies the same push (one object-store reference) in place; returns the seconds it took.
    A generator replaced during the push gets the push too (the pool's ``prepare`` hook)."""
    start = time.perf_counter()
    roles.current_push = push
    versions = roles.generators.broadcast("apply_weights", push, version, what="weight push")
    if any(v != version for v in versions):
        raise RuntimeError(f"weight push: generators report versions {versions}, expected {version}")
    return time.perf_counter() - start


def verify_push(roles: Roles, probe: Probe) -> float:
    """Largest |log π_generator − log π_learner| over the learner's probe sequences, across all generators."""
    got = roles.generators.broadcast("sequence_logprobs", probe.prompt_ids, probe.response_ids,
                                     what="push check")
    return float(max(abs(a - b) for values in got for a, b in zip(values, probe.logprobs)))
