"""Several oracles voting on each comparison — a panel: the weighted mean of their probabilities, or their weighted
majority verdict.

A panel of transitive members is itself intransitive wherever they disagree (Condorcet): three judges each ranking
a ≻ b ≻ c, b ≻ c ≻ a and c ≻ a ≻ b give a majority cycle. That is how a general, non-Bradley-Terry preference is
built from real parts; :func:`nashray.trainers.pairs.cyclic_triad_share` measures how far from Bradley-Terry it is.
"""

from __future__ import annotations

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict


class EnsembleOracle(PreferenceOracle):
    """``mean``: Σ w_m p_m / Σ w_m over the members that answered. ``majority``: each answering member votes for
    a (p > ½), for b (p < ½) or abstains (p = ½) with its weight w_m; the result is 1, 0 or ½ on a tied vote. A
    comparison is dropped only when every member dropped it; its reason lists theirs. Every verdict carries the
    members' probabilities (``votes``), so how often each agrees with the panel can be measured."""

    def __init__(self, members: list[PreferenceOracle], combine: str = "mean", weights: list[float] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member oracle")
        if combine not in ("mean", "majority"):
            raise ValueError(f"ensemble combine must be 'mean' or 'majority', got {combine!r}")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or any(w <= 0 for w in weights):
            raise ValueError(f"ensemble weights must be {len(members)} positive numbers, got {weights}")
        self.members, self.combine, self.weights = list(members), combine, weights
        weighted = "" if len(set(weights)) == 1 else f":w={','.join(f'{w:g}' for w in weights)}"
        self.oracle_id = f"ensemble:{combine}{weighted}:[{','.join(m.oracle_id for m in self.members)}]"

    def reseed(self, seed: int) -> None:
        for i, member in enumerate(self.members):  # as build_oracle seeds them: member i from seed + i
            member.reseed(seed + i)

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        per_member = [member.compare(comparisons) for member in self.members]
        return [self._combine([votes[i] for votes in per_member]) for i in range(len(comparisons))]

    def _combine(self, verdicts: list[Verdict]) -> Verdict:
        votes = tuple(v.prob for v in verdicts)
        answered = [(w, p) for w, p in zip(self.weights, votes) if p is not None]
        if not answered:
            return Verdict(None, "every ensemble member dropped it: "
                           + "; ".join(f"{m.oracle_id}: {v.reason}" for m, v in zip(self.members, verdicts)))
        if self.combine == "mean":
            return Verdict(sum(w * p for w, p in answered) / sum(w for w, _ in answered), votes=votes)
        margin = sum(w for w, p in answered if p > 0.5) - sum(w for w, p in answered if p < 0.5)
        return Verdict(0.5 if margin == 0 else float(margin > 0), votes=votes)

    def __repr__(self) -> str:
        return f"EnsembleOracle({self.combine!r}, {self.members!r})"
