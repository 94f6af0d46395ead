"""Preference oracles: P(a ≻ b | x) from a game matrix, a rule, a model, a sentiment lexicon, an HTTP endpoint or a
panel (ensemble) of them.

:func:`build_oracle` turns a ``judges.oracle`` config section into a :class:`~nashray.oracles.base.PreferenceOracle`.
Model-backed oracles import torch/transformers/vLLM only when built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.cache import CachedOracle
from nashray.oracles.config import OracleConfig, parse_oracle_config
from nashray.oracles.ensemble import EnsembleOracle
from nashray.oracles.http_judge import HTTPJudge
from nashray.oracles.llm_judge import LLMJudge
from nashray.oracles.pairwise import PairwisePreferenceModel
from nashray.oracles.reward_model import RewardModelOracle
from nashray.oracles.rules import build_rule
from nashray.oracles.sentiment import SentimentOracle

CACHE_SUBDIR = "judge-cache"

__all__ = ["CACHE_SUBDIR", "Comparison", "OracleConfig", "PreferenceOracle", "Verdict", "build_oracle",
           "is_deterministic", "parse_oracle_config"]


def is_deterministic(cfg: OracleConfig | dict[str, Any]) -> bool:
    """Whether asking twice gives the same verdict, so that a verdict may be cached: not for a matrix oracle that
    draws Bernoulli verdicts (nor an ensemble containing one). ``cfg``: an oracle config model (a plain dict is
    validated first, with :func:`~nashray.oracles.config.parse_oracle_config`)."""
    cfg = parse_oracle_config(cfg)
    if cfg.kind == "matrix":
        return not cfg.sample
    if cfg.kind == "ensemble":
        return all(is_deterministic(member) for member in cfg.members)
    return True


def build_oracle(cfg: OracleConfig | dict[str, Any], run_dir: str | Path | None = None, game_spec: str | None = None,
                 seed: int = 0) -> PreferenceOracle:
    """The oracle described by ``cfg``: an oracle config model (a plain dict is validated first, with
    :func:`~nashray.oracles.config.parse_oracle_config`).

    ``game_spec``: the game of a matrix oracle whose ``game`` is omitted (the campaign's ``data.game``).
    ``run_dir``: when given, a deterministic oracle is wrapped in a cache under ``RUN_DIR/judge-cache``.
    ``seed``: seeds the matrix oracle's draws and the vLLM engine."""
    cfg = parse_oracle_config(cfg)
    oracle = _build(cfg, game_spec, seed)
    if run_dir is not None and is_deterministic(cfg):
        return CachedOracle(oracle, Path(run_dir) / CACHE_SUBDIR)
    return oracle


def _build(cfg: OracleConfig, game_spec: str | None, seed: int) -> PreferenceOracle:
    if cfg.kind == "matrix":
        from nashray.oracles.games import MatrixOracle, load_game  # lazy: scipy's start-up, for matrix oracles only
        spec = cfg.game or game_spec
        if spec is None:
            raise ValueError("a matrix oracle needs a game: set judges.oracle.game, or data.game (passed as "
                             "game_spec)")
        return MatrixOracle(load_game(spec), sample=cfg.sample, seed=seed)
    if cfg.kind == "rule":
        return build_rule(cfg.rule, cfg.options)
    if cfg.kind == "llm_judge":
        return LLMJudge(cfg.model, engine=cfg.engine, template=cfg.template, dtype=cfg.dtype,
                        both_orders=cfg.both_orders, batch_size=cfg.batch_size, max_length=cfg.max_length,
                        kv_cache_gib=cfg.kv_cache_gib, gpu_memory_utilization=cfg.gpu_memory_utilization, seed=seed,
                        trust_remote_code=cfg.trust_remote_code)
    if cfg.kind == "reward_model":
        return RewardModelOracle(cfg.model, dtype=cfg.dtype, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                 trust_remote_code=cfg.trust_remote_code)
    if cfg.kind == "pairwise_model":
        return PairwisePreferenceModel(cfg.model, template=cfg.template, dtype=cfg.dtype,
                                       both_orders=cfg.both_orders, batch_size=cfg.batch_size,
                                       max_length=cfg.max_length, trust_remote_code=cfg.trust_remote_code)
    if cfg.kind == "http":
        return HTTPJudge(cfg.url, model=cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                         retries=cfg.retries, concurrency=cfg.concurrency, template=cfg.template,
                         both_orders=cfg.both_orders, backoff_s=cfg.backoff_s, top_logprobs=cfg.top_logprobs)
    if cfg.kind == "sentiment":
        return SentimentOracle(cfg.prefer, cfg.sharpness)
    if cfg.kind == "ensemble":
        members = []
        for i, member in enumerate(cfg.members):
            try:
                members.append(_build(member, game_spec, seed + i))
            except Exception as err:  # name the member that failed: a panel's error is otherwise anonymous
                raise ValueError(f"ensemble member {i} ({member.kind}) could not be built: {err}") from err
        return EnsembleOracle(members, combine=cfg.combine, weights=cfg.weights)
    raise ValueError(f"unknown oracle kind {cfg.kind!r}")
