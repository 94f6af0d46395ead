"""Which responses of a prompt to compare, and what the verdicts say about each response.

Shared by every algorithm and by the driver: ``plan_comparisons`` picks the pairs a judge is asked about; the rest
turns the judged probabilities ``judged[(i, j)] = P(y_i ≻ y_j)`` into win rates, Bradley-Terry scores, labels and
best-vs-worst pairs. Indices are positions in one prompt's list of responses.
"""

from __future__ import annotations

import math

import numpy as np

STRATEGIES = ("all_pairs", "round_robin", "score")

Judged = dict[tuple[int, int], float]


def plan_comparisons(k: int, strategy: str, budget: int | None = None, rng: np.random.Generator | None = None,
                     neighbours: int | None = None) -> list[tuple[int, int]]:
    """Pairs (i, j), i ≠ j, of ``k`` responses to judge.

    - ``all_pairs``: every i < j (k(k−1)/2 pairs); over ``budget`` a uniformly random subset (``rng``) is kept.
    - ``round_robin``: each response against its next m responses cyclically, m = ``neighbours`` or, by default,
      ⌈budget/k⌉ (2 without a budget): m = 1 is a single cycle (connected), m = 2 gives 2k pairs. Pairs come
      ordered by offset, so a budget ≥ k keeps the cycle.
    - ``score``: no pairs; each response is scored on its own by an oracle that scores.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown comparison strategy {strategy!r}; expected one of {STRATEGIES}")
    if k < 0:
        raise ValueError(f"number of responses must be >= 0, got {k}")
    if budget is not None and budget < 0:
        raise ValueError(f"comparison budget must be >= 0, got {budget}")
    if strategy == "score":
        return []
    if strategy == "all_pairs":
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        if budget is not None and budget < len(pairs):
            rng = rng if rng is not None else np.random.default_rng(0)
            keep = np.sort(rng.choice(len(pairs), size=budget, replace=False))
            pairs = [pairs[n] for n in keep]
        return pairs
    if neighbours is None:
        neighbours = 2 if budget is None else max(1, math.ceil(budget / max(k, 1)))
    if neighbours < 1:
        raise ValueError(f"round_robin needs at least 1 neighbour, got {neighbours}")
    pairs, seen = [], set()
    for offset in range(1, min(neighbours, k - 1) + 1):
        for i in range(k):
            j = (i + offset) % k
            if (min(i, j), max(i, j)) not in seen:
                seen.add((min(i, j), max(i, j)))
                pairs.append((i, j))
    return pairs[:budget] if budget is not None else pairs


def _check_judged(k: int, judged: Judged) -> None:
    for (i, j), p in judged.items():
        if not (0 <= i < k and 0 <= j < k) or i == j:
            raise ValueError(f"judged pair ({i}, {j}) is not a pair of distinct responses among {k}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"judged probability for pair ({i}, {j}) is {p!r}, outside [0, 1]")


def win_rates(k: int, judged: Judged) -> np.ndarray:
    """Leave-one-out win rates r̂(y_i) = mean over judged j ≠ i of P(y_i ≻ y_j), reading P(y_j ≻ y_i) = 1 − P(y_i ≻
    y_j). With y_j ~ π_t this estimates P(y_i ≻ π_t) without bias. NaN for a response with no judged comparison (the
    caller drops it)."""
    _check_judged(k, judged)
    total, count = np.zeros(k), np.zeros(k)
    for (i, j), p in judged.items():
        total[i] += p
        total[j] += 1.0 - p
        count[i] += 1
        count[j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def scores_to_probs(scores) -> np.ndarray:
    """Bradley-Terry probabilities σ(s_i − s_j) from per-response scores, [k, k]."""
    s = np.asarray(scores, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))


def best_vs_worst(rates, margin: float = 0.0) -> tuple[int, int] | None:
    """(argmax, argmin) of ``rates`` ignoring NaN, or None when max − min ≤ ``margin`` (no informative pair)."""
    r = np.asarray(rates, dtype=np.float64)
    if np.all(np.isnan(r)):
        return None
    best, worst = int(np.nanargmax(r)), int(np.nanargmin(r))
    if r[best] - r[worst] <= margin:
        return None
    return best, worst


def hard_label(p: float) -> float | None:
    """1.0 when a is preferred (p > ½), 0.0 when b is (p < ½), None for a tie (dropped)."""
    if p > 0.5:
        return 1.0
    if p < 0.5:
        return 0.0
    return None


def fit_bradley_terry(k: int, judged: Judged, l2: float = 1e-3, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry scores by maximum likelihood (soft probabilities allowed) with a tiny L2 penalty so that the
    optimum is finite even when a response wins every comparison:

        minimise −Σ_{(i,j)} [p_ij·log σ(s_i − s_j) + (1 − p_ij)·log σ(s_j − s_i)] + (l2/2)·‖s‖²

    by Newton's method (the objective is strictly convex). Responses with no judged comparison get NaN."""
    if l2 <= 0:
        raise ValueError(f"fit_bradley_terry needs l2 > 0 (scores are only defined up to a shift), got {l2}")
    _check_judged(k, judged)
    if not judged:
        return np.full(k, np.nan)
    pairs = np.array(list(judged.keys()), dtype=np.int64)
    p = np.array(list(judged.values()), dtype=np.float64)
    i, j = pairs[:, 0], pairs[:, 1]

    def objective(s):
        z = s[i] - s[j]
        return float(np.sum(p * np.logaddexp(0, -z) + (1 - p) * np.logaddexp(0, z)) + 0.5 * l2 * s @ s)

    s = np.zeros(k)
    value = objective(s)
    for _ in range(200):
        q = 1.0 / (1.0 + np.exp(-(s[i] - s[j])))
        residual = q - p
        grad = l2 * s
        np.add.at(grad, i, residual)
        np.add.at(grad, j, -residual)
        w = q * (1 - q)
        hess = l2 * np.eye(k)
        np.add.at(hess, (i, i), w)
        np.add.at(hess, (j, j), w)
        np.add.at(hess, (i, j), -w)
        np.add.at(hess, (j, i), -w)
        step = np.linalg.solve(hess, grad)
        if np.abs(step).max() < tol:
            break
        # when a response wins (or loses) everything the Hessian there is ~l2 and the raw Newton step is huge:
        # cap it, then backtrack so every step decreases the objective
        scale = min(1.0, 2.0 / np.abs(step).max())
        while scale > 1e-12 and objective(s - scale * step) >= value:
            scale /= 2
        if scale <= 1e-12:  # no strict decrease left within float precision: at the optimum
            break
        s = s - scale * step
        value = objective(s)
    seen = np.zeros(k, dtype=bool)
    seen[i] = seen[j] = True
    return np.where(seen, s, np.nan)


def cyclic_triads(k: int, judged: Judged) -> tuple[int, int]:
    """(cyclic, decided) triads among ``k`` responses: a triad {i, j, l} is decided when all three of its pairs were
    judged and none tied at ½, and cyclic when its decided preferences go round (i ≻ j ≻ l ≻ i or the reverse). A
    Bradley-Terry (or any transitive) judge has no cyclic triad; how many a judge has is how far from it it is."""
    _check_judged(k, judged)
    beats = {}
    for (i, j), p in judged.items():
        if p != 0.5:
            beats[(i, j)], beats[(j, i)] = bool(p > 0.5), bool(p < 0.5)  # numpy bools add as `or`
    # Only judged pairs can close a triad: walk the edges, not all k³ triples (tabular rounds have thousands).
    neighbours: dict[int, set[int]] = {}
    for i, j in beats:
        neighbours.setdefault(i, set()).add(j)
    cyclic = decided = 0
    for i, j in beats:
        if i >= j:
            continue
        for m in neighbours[i] & neighbours[j]:
            if m > j:
                decided += 1
                # transitive iff one response beats both others; in a cycle each beats exactly one
                wins = [beats[(i, j)] + beats[(i, m)], beats[(j, i)] + beats[(j, m)], beats[(m, i)] + beats[(m, j)]]
                cyclic += int(max(wins) == 1)
    return cyclic, decided
