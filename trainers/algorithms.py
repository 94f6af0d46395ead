"""The eight algorithms as data: what each samples, which pairs it judges, the records it trains on, its loss.

One :class:`Algorithm` per name, shared by the LLM learner and the tabular harness, so both train on the same
records with the same losses. The functions take one prompt's samples (sample records, see the project contracts),
``judged[(i, j)] = P(samples[i] ≻ samples[j])`` (indices into that list; a missing pair was not judged or was
dropped) and the pydantic algorithm config (``nashray.cluster.config``). Only ``source == "policy"`` samples (from π_t) are
compared with each other; ``ref`` samples are XPO's exploration sequences, ``mixture`` samples Nash-MD's opponents.

Records (one row of a round's training data): ``prompt_id, prompt_ids, a_ids, b_ids ([] for single-response
records), x_ids ([] unless XPO), target, a_score, b_score, a_version, b_version (-1 without b), a_policy_logprob,
b_policy_logprob`` (the generating policy's log-probs of a and b when the generator scored its samples, NaN else).
``target`` is P(a ≻ b) for pair records (hard: 0/1 with ties dropped, soft: the judged probability; best-vs-worst
pairs: 1), SPPO's win rate P̂(a ≻ π_t), Nash-MD's P(a ≻ its mixture sample); ``a_score``/``b_score`` carry the per-response statistic
the pair was built from (leave-one-out win rates for SPPO and DNO, Bradley-Terry scores for iterative DPO, 0 else).
Win rates and BT fits always use the judged probabilities; ``label`` applies to pair targets and Nash-MD's target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from nashray.trainers import losses
from nashray.trainers.pairs import Judged, best_vs_worst, fit_bradley_terry, hard_label, plan_comparisons, win_rates

Sample = dict[str, Any]
Record = dict[str, Any]
LogProbs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    """What an algorithm needs from a round and how it turns judged samples into a loss.

    - ``ref_samples``: responses per prompt sampled from π_ref (XPO's x); ``mixture_samples``: per policy sample,
      responses from the geometric mixture π_θ^{1−β}·π_ref^{β} (Nash-MD's opponent, ``sample_index`` equal to its
      policy sample's). Policy samples (K per prompt from π_t) are always drawn.
    - ``needs_pi_t`` / ``needs_ref``: the learner computes ``t_*`` (π_t, before the round's first update) /
      ``ref_*`` log-probs for the record sequences named in ``sequences`` (among "a", "b", "x").
    - ``plan(samples, strategy, budget, rng)``: pairs (i, j) of indices into ``samples`` for the judge.
    - ``build_records(samples, judged, cfg)``: training records of one prompt.
    - ``loss(lp, batch, cfg)``: per-record loss [B] from log-probs ``lp`` (``theta_a`` ... ``ref_x``) and the batch's
      ``target``, ``a_score``, ``b_score`` tensors.
    """
    name: str
    ref_samples: int
    mixture_samples: int
    needs_pi_t: bool
    needs_ref: bool
    sequences: tuple[str, ...]
    plan: Callable[..., list[tuple[int, int]]]
    build_records: Callable[[list[Sample], Judged, Any], list[Record]]
    loss: Callable[[LogProbs, dict[str, torch.Tensor], Any], torch.Tensor]
    policy_samples: bool = True


# ------------------------------------------------------------------------------------------------ helpers

def _check_samples(samples: list[Sample]) -> None:
    prompt_ids = {s["prompt_id"] for s in samples}
    if len(prompt_ids) > 1:
        raise ValueError(f"records are built per prompt, got samples of prompts {sorted(prompt_ids)}")


def _check_cfg(cfg, *names: str) -> None:
    if getattr(cfg, "name", None) not in names:
        raise ValueError(f"records of {' / '.join(names)} got the config of "
                         f"{getattr(cfg, 'name', type(cfg).__name__)!r}")


def _positions(samples: list[Sample], source: str) -> list[int]:
    return [n for n, s in enumerate(samples) if s["source"] == source]


def _local_judged(positions: list[int], judged: Judged) -> Judged:
    """``judged`` restricted to pairs among ``positions``, re-indexed 0..len(positions)−1."""
    local = {pos: n for n, pos in enumerate(positions)}
    return {(local[i], local[j]): p for (i, j), p in judged.items() if i in local and j in local}


def _record(a: Sample, b: Sample | None, target: float, a_score: float = 0.0, b_score: float = 0.0,
            x: Sample | None = None) -> Record:
    return {"prompt_id": a["prompt_id"], "prompt_ids": list(a["prompt_ids"]), "a_ids": list(a["response_ids"]),
            "b_ids": list(b["response_ids"]) if b is not None else [],
            "x_ids": list(x["response_ids"]) if x is not None else [],
            "target": float(target), "a_score": float(a_score), "b_score": float(b_score),
            "a_version": int(a["version"]), "b_version": int(b["version"]) if b is not None else -1,
            "a_policy_logprob": float(a.get("policy_logprob", math.nan)),
            "b_policy_logprob": float(b.get("policy_logprob", math.nan)) if b is not None else math.nan}


def _label(p: float, cfg) -> float | None:
    return hard_label(p) if cfg.label == "hard" else p


def _plan_policy_pairs(samples: list[Sample], strategy: str, budget: int | None = None,
                       rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    positions = _positions(samples, "policy")
    return [(positions[i], positions[j]) for i, j in plan_comparisons(len(positions), strategy, budget, rng)]


def _plan_mixture_pairs(samples: list[Sample], strategy: str, budget: int | None = None,
                        rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """Each policy sample against the mixture sample with its ``sample_index`` (the strategy does not apply)."""
    mixture = {samples[n]["sample_index"]: n for n in _positions(samples, "mixture")}
    pairs = []
    for n in _positions(samples, "policy"):
        index = samples[n]["sample_index"]
        if index not in mixture:
            raise ValueError(f"nash_md: policy sample {index} of prompt {samples[n]['prompt_id']!r} has no mixture "
                             f"sample with the same sample_index")
        pairs.append((n, mixture[index]))
    return pairs[:budget] if budget is not None else pairs


def _judged_prob(judged: Judged, i: int, j: int) -> float | None:
    if (i, j) in judged:
        return judged[(i, j)]
    if (j, i) in judged:
        return 1.0 - judged[(j, i)]
    return None


# ------------------------------------------------------------------------------------------ record builders

def _pair_records(samples: list[Sample], judged: Judged, cfg) -> list[Record]:
    """Online DPO / IPO / INPO (and XPO's pairs): every judged pair of policy samples, labelled."""
    _check_cfg(cfg, "online_dpo", "online_ipo", "inpo", "xpo")
    _check_samples(samples)
    positions = _positions(samples, "policy")
    records = []
    for (i, j), p in _local_judged(positions, judged).items():
        target = _label(p, cfg)
        if target is not None:
            records.append(_record(samples[positions[i]], samples[positions[j]], target))
    return records


def _xpo_records(samples: list[Sample], judged: Judged, cfg) -> list[Record]:
    """Online DPO's pairs, each with x = a π_ref sample of the prompt (cycling when there are several)."""
    _check_cfg(cfg, "xpo")
    refs = [samples[n] for n in _positions(samples, "ref")]
    records = _pair_records(samples, judged, cfg)
    if records and not refs:
        raise ValueError(f"xpo needs a π_ref sample (source 'ref') for prompt {samples[0]['prompt_id']!r}")
    for n, record in enumerate(records):
        record["x_ids"] = list(refs[n % len(refs)]["response_ids"])
    return records


def _iterative_dpo_records(samples: list[Sample], judged: Judged, cfg) -> list[Record]:
    """Bradley-Terry scores fitted on the prompt's judged pairs; the best-vs-worst pair by score, target 1."""
    _check_cfg(cfg, "iterative_dpo")
    _check_samples(samples)
    positions = _positions(samples, "policy")
    scores = fit_bradley_terry(len(positions), _local_judged(positions, judged))
    pair = best_vs_worst(scores)
    if pair is None:
        return []
    i, j = pair
    return [_record(samples[positions[i]], samples[positions[j]], 1.0, scores[i], scores[j])]


def _dno_records(samples: list[Sample], judged: Judged, cfg) -> list[Record]:
    """practical (Algorithm 2): the max-vs-min leave-one-out win-rate pair when its margin exceeds ``cfg.margin``,
    target 1. regression (Algorithm 1): every judged pair, a_score/b_score = win rates r_t, target σ(r_a − r_b)."""
    _check_cfg(cfg, "dno")
    _check_samples(samples)
    positions = _positions(samples, "policy")
    local = _local_judged(positions, judged)
    rates = win_rates(len(positions), local)
    if cfg.variant == "practical":
        pair = best_vs_worst(rates, cfg.margin)
        if pair is None:
            return []
        i, j = pair
        return [_record(samples[positions[i]], samples[positions[j]], 1.0, rates[i], rates[j])]
    return [_record(samples[positions[i]], samples[positions[j]], 1.0 / (1.0 + np.exp(rates[j] - rates[i])),
                    rates[i], rates[j]) for i, j in local]


def _sppo_records(samples: list[Sample], judged: Judged, cfg) -> list[Record]:
    """One single-response record per judged policy sample, target = its leave-one-out win rate P̂(y ≻ π_t)."""
    _check_cfg(cfg, "sppo")
    _check_samples(samples)
    positions = _positions(samples, "policy")
    rates = win_rates(len(positions), _local_judged(positions, judged))
    return [_record(samples[pos], None, rates[n], rates[n]) for n, pos in enumerate(positions)
            if not np.isnan(rates[n])]


def _nash_md_records(samples: list[Sample], judged: Judged, cfg) -> list[Record]:
    """One single-response record per policy sample y, target = P(y ≻ y') against its mixture sample y'."""
    _check_cfg(cfg, "nash_md")
    _check_samples(samples)
    records = []
    for i, j in _plan_mixture_pairs(samples, "all_pairs"):
        p = _judged_prob(judged, i, j)
        target = None if p is None else _label(p, cfg)
        if target is not None:
            records.append(_record(samples[i], None, target))
    return records


# ------------------------------------------------------------------------------------------------- losses

def _dpo(lp, batch, cfg):
    return losses.dpo_loss(lp["theta_a"], lp["theta_b"], lp["ref_a"], lp["ref_b"], cfg.beta, batch["target"])


def _ipo(lp, batch, cfg):
    return losses.ipo_loss(lp["theta_a"], lp["theta_b"], lp["ref_a"], lp["ref_b"], cfg.beta, batch["target"])


def _dno(lp, batch, cfg):
    if cfg.variant == "practical":  # DPO with π_t as the reference: a KL step from the round's policy
        return losses.dpo_loss(lp["theta_a"], lp["theta_b"], lp["t_a"], lp["t_b"], cfg.beta, batch["target"])
    return losses.dno_regression_loss(lp["theta_a"], lp["theta_b"], lp["t_a"], lp["t_b"],
                                      batch["a_score"], batch["b_score"], beta=cfg.beta)


def _sppo(lp, batch, cfg):
    return losses.sppo_loss(lp["theta_a"], lp["t_a"], batch["target"], cfg.eta)


def _inpo(lp, batch, cfg):
    return losses.inpo_loss(lp["theta_a"], lp["theta_b"], lp["t_a"], lp["t_b"], lp["ref_a"], lp["ref_b"],
                            cfg.eta, cfg.tau, batch["target"])


def _xpo(lp, batch, cfg):
    return losses.xpo_loss(lp["theta_a"], lp["theta_b"], lp["ref_a"], lp["ref_b"], lp["theta_x"], cfg.beta,
                           cfg.alpha, batch["target"])


def _nash_md(lp, batch, cfg):
    if cfg.clip_ratio is None:  # the on-policy surrogate: the config allows it one optimizer step per round only
        return losses.nash_md_loss(lp["theta_a"], lp["ref_a"], batch["target"], cfg.tau)
    return losses.nash_md_clipped_loss(lp["theta_a"], lp["t_a"], lp["ref_a"], batch["target"], tau=cfg.tau,
                                       beta=cfg.beta, clip_ratio=cfg.clip_ratio)


_PAIR = ("a", "b")

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("online_dpo", 0, 0, False, True, _PAIR, _plan_policy_pairs, _pair_records, _dpo),
    Algorithm("online_ipo", 0, 0, False, True, _PAIR, _plan_policy_pairs, _pair_records, _ipo),
    Algorithm("iterative_dpo", 0, 0, False, True, _PAIR, _plan_policy_pairs, _iterative_dpo_records, _dpo),
    Algorithm("sppo", 0, 0, True, False, ("a",), _plan_policy_pairs, _sppo_records, _sppo),
    Algorithm("dno", 0, 0, True, False, _PAIR, _plan_policy_pairs, _dno_records, _dno),
    Algorithm("inpo", 0, 0, True, True, _PAIR, _plan_policy_pairs, _pair_records, _inpo),
    Algorithm("xpo", 1, 0, False, True, ("a", "b", "x"), _plan_policy_pairs, _xpo_records, _xpo),
    # π_t for Nash-MD: the sampling policy of its importance ratio (the generators' log-probs in asynchronous rounds)
    Algorithm("nash_md", 0, 1, True, True, ("a",), _plan_mixture_pairs, _nash_md_records, _nash_md),
)}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}") from None
