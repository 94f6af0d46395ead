"""The judge actor: labels comparisons with the campaign's preference oracle (made remote by the driver with
``ray.remote(JudgeActor)``).

Every comparison comes back with a verdict: a probability, or None with the reason it was dropped after ``retries``
further attempts — never an exception in the middle of a round, never a silent default. Deterministic oracles are
cached on disk (``cache_dir``, normally ``RUN_DIR/judge-cache``), shared by every judge actor of the campaign and by
a resumed campaign; ``calls()`` counts only the comparisons (and scored responses) actually sent to the oracle, each
retry included. ``score`` serves the ``score`` strategy with oracles that score single responses (reward models).
"""

from __future__ import annotations

import logging
import os

from nashray.oracles import build_oracle, is_deterministic
from nashray.oracles.base import Comparison, Verdict
from nashray.oracles.cache import VerdictCache
from nashray.oracles.config import OracleConfig, parse_oracle_config

log = logging.getLogger(__name__)


def _comparisons(items: list[dict]) -> list[Comparison]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"comparison {i} is a {type(item).__name__}, expected a dict with prompt, a, b")
        missing = [k for k in ("prompt", "a", "b") if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(f"comparison {i} lacks string field(s) {missing}")
        out.append(Comparison(item["prompt"], item["a"], item["b"]))
    return out


class JudgeActor:
    """``oracle``: the validated oracle config (``cfg.judges.oracle``, a model of
    :data:`nashray.oracles.config.OracleConfig`; it pickles through Ray as it is); ``cache_dir``: the verdict cache
    of deterministic oracles (None: no cache); ``game_spec``: a matrix oracle's game when its own is omitted
    (``data.game``); ``seed``: the oracle's draws."""

    def __init__(self, oracle: OracleConfig, cache_dir: str | None, retries: int = 2, game_spec: str | None = None,
                 seed: int = 0):
        if retries < 0:
            raise ValueError(f"judge retries must be ≥ 0, got {retries}")
        cfg = parse_oracle_config(oracle)  # a model comes back as it is; a dict would be validated once, here
        self.oracle = build_oracle(cfg, game_spec=game_spec, seed=seed)
        self.cache = None
        if cache_dir is not None and is_deterministic(cfg):
            self.cache = VerdictCache(cache_dir, self.oracle.oracle_id)
        self.retries = retries
        self._calls = 0

    def ready(self) -> dict:
        import ray
        return {"oracle": self.oracle.oracle_id, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}

    def calls(self) -> int:
        return self._calls

    def _ask(self, comparisons: list[Comparison]) -> list[Verdict]:
        self._calls += len(comparisons)
        try:
            verdicts = self.oracle.compare(comparisons)
        except Exception as err:  # a crashing oracle drops this attempt's comparisons, it does not end the round
            log.warning("oracle %s raised on %d comparisons: %r", self.oracle.oracle_id, len(comparisons), err)
            return [Verdict(None, f"oracle raised {type(err).__name__}: {err}")] * len(comparisons)
        if len(verdicts) != len(comparisons):
            return [Verdict(None, f"oracle returned {len(verdicts)} verdicts for {len(comparisons)} comparisons")
                    ] * len(comparisons)
        return verdicts

    def judge(self, comparisons: list[dict], seed: int | None = None) -> list[dict]:
        """One ``{prob, reason, cached}`` per comparison ``{prompt, a, b}``, in order. ``seed`` restarts a
        stochastic oracle's draws first, so the same chunk gets the same verdicts whichever judge takes it, and again
        after a restart; None continues the oracle's own stream."""
        if seed is not None:
            self.oracle.reseed(seed)
        asked = _comparisons(comparisons)
        cached = self.cache.get(asked) if self.cache is not None else [None] * len(asked)
        verdicts: list[Verdict | None] = [Verdict(p) if p is not None else None for p in cached]
        pending = [i for i, v in enumerate(verdicts) if v is None]
        for _ in range(self.retries + 1):
            if not pending:
                break
            fresh = self._ask([asked[i] for i in pending])
            if self.cache is not None:
                self.cache.put([asked[i] for i in pending], fresh)
            for i, verdict in zip(pending, fresh):
                verdicts[i] = verdict
            pending = [i for i in pending if verdicts[i].prob is None]
        # A cached verdict keeps its probability only: panel votes are reported for fresh verdicts.
        return [{"prob": v.prob, "reason": v.reason, "cached": p is not None,
                 "votes": list(v.votes) if v.votes is not None else None} for v, p in zip(verdicts, cached)]

    def score(self, items: list[dict]) -> list[dict]:
        """One ``{score, reason}`` per ``{prompt, response}`` from an oracle that scores single responses (a reward
        model; the ``score`` strategy). Not cached; each response counts as one call. An oracle that only compares
        pairs, or one that fails ``retries + 1`` times, gives None scores with the reason."""
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("prompt", "response")):
                raise ValueError(f"item {i} to score must be a dict with string prompt and response")
        reason = "no attempt"
        for _ in range(self.retries + 1):
            self._calls += len(items)
            try:
                scores = self.oracle.score([it["prompt"] for it in items], [it["response"] for it in items])
                return [{"score": float(s), "reason": None} for s in scores]
            except NotImplementedError as err:
                return [{"score": None, "reason": str(err)} for _ in items]
            except Exception as err:  # as in judge(): a failed attempt is reported, it does not end the round
                reason = f"oracle raised {type(err).__name__}: {err}"
                log.warning("oracle %s failed to score %d responses: %r", self.oracle.oracle_id, len(items), err)
        return [{"score": None, "reason": reason} for _ in items]
