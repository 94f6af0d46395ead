"""Ranking accuracy (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings",
arXiv 2405.19534): how often the policy's implicit DPO reward ranks a judged pair the way the judge did. The learner
computes it from its pass over the round's pairs before the first update."""

from __future__ import annotations

import numpy as np


def ranking_counts(logp_a, logp_b, ref_a, ref_b, target) -> tuple[float, int]:
    """Ranking accuracy's numerator and denominator (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn
    Preference Rankings", arXiv 2405.19534): over the pairs with a preferred response (target ≠ ½; target = P(a ≻ b),
    a is preferred when target > ½), how many the policy ranks right, i.e. whose preferred response has the larger
    log-ratio log π_θ(y) − log π_ref(y) — the implicit DPO reward's ranking. A tie in log-ratio counts ½ (a coin
    flip), so π_θ = π_ref, whose log-ratios are all 0, scores ½ rather than 0. Inputs are per-pair sequence log-probs
    (numpy arrays, lists or CPU tensors)."""
    arrays = [np.asarray(v, dtype=float).reshape(-1) for v in (logp_a, logp_b, ref_a, ref_b, target)]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"ranking_counts: lengths differ {[len(a) for a in arrays]}")
    logp_a, logp_b, ref_a, ref_b, target = arrays
    margin = (logp_a - ref_a) - (logp_b - ref_b)
    decided = target != 0.5
    preferred_margin = np.where(target > 0.5, margin, -margin)[decided]
    return float((preferred_margin > 0).sum() + 0.5 * (preferred_margin == 0).sum()), int(decided.sum())


def ranking_accuracy(logp_a, logp_b, ref_a, ref_b, target) -> float | None:
    """Fraction of decided pairs ranked right (see :func:`ranking_counts`); None when no pair is decided."""
    right, decided = ranking_counts(logp_a, logp_b, ref_a, ref_b, target)
    return right / decided if decided else None
