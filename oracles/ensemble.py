"""Several oracles voting on each comparison: the mean of their probabilities, or their majority verdict."""

from __future__ import annotations

from oracles.base import Comparison, PreferenceOracle, Verdict


class EnsembleOracle(PreferenceOracle):
    """``mean``: the average P(a ≻ b) of the members that answered. ``majority``: each answering member votes for
    a (p > ½), for b (p < ½) or abstains (p = ½); the result is 1, 0 or ½ on a tied vote. A comparison is dropped
    only when every member dropped it; its reason lists theirs."""

    def __init__(self, members: list[PreferenceOracle], combine: str = "mean"):
        if not members:
            raise ValueError("an ensemble needs at least one member oracle")
        if combine not in ("mean", "majority"):
            raise ValueError(f"ensemble combine must be 'mean' or 'majority', got {combine!r}")
        self.members, self.combine = list(members), combine
        self.oracle_id = f"ensemble:{combine}:[{','.join(m.oracle_id for m in self.members)}]"

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        per_member = [member.compare(comparisons) for member in self.members]
        return [self._combine([votes[i] for votes in per_member]) for i in range(len(comparisons))]

    def _combine(self, verdicts: list[Verdict]) -> Verdict:
        probs = [v.prob for v in verdicts if v.prob is not None]
        if not probs:
            return Verdict(None, "every ensemble member dropped it: "
                           + "; ".join(f"{m.oracle_id}: {v.reason}" for m, v in zip(self.members, verdicts)))
        if self.combine == "mean":
            return Verdict(sum(probs) / len(probs))
        margin = sum(p > 0.5 for p in probs) - sum(p < 0.5 for p in probs)
        return Verdict(0.5 if margin == 0 else float(margin > 0))

    def __repr__(self) -> str:
        return f"EnsembleOracle({self.combine!r}, {self.members!r})"
