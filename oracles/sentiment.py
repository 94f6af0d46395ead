"""A lexicon sentiment model as a judge: VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for
Sentiment Analysis of Social Media Text", ICWSM), through the ``vaderSentiment`` package (MIT), offline.

VADER gives each text a compound score s ∈ [−1, 1]. The judge prefers the more positive response (``prefer:
positive``) or the more negative one (``negative``), with a Bradley-Terry link:

    P(a ≻ b) = σ(sharpness · (s_a − s_b))

so on its own it is transitive; it becomes one voice of a panel (``kind: ensemble``) whose other members disagree
with it. :func:`sentiment_class` is VADER's own three-way reading of the score (negative ≤ −0.05 < neutral < 0.05 ≤
positive), the discrete feature the ``cyclic`` rule can play a game on.
"""

from __future__ import annotations

import math

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict

# VADER's documented thresholds on the compound score.
NEGATIVE_BELOW, POSITIVE_FROM = -0.05, 0.05


def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:  # a panel member that cannot load must say which package is missing
        raise ValueError("the sentiment oracle needs the vaderSentiment package (pip install vaderSentiment)"
                         ) from err
    return SentimentIntensityAnalyzer()


class Sentiment:
    """VADER compound scores, the analyzer built once per process."""

    _shared = None

    @classmethod
    def compound(cls, text: str) -> float:
        if cls._shared is None:
            cls._shared = _analyzer()
        return float(cls._shared.polarity_scores(text)["compound"])


def sentiment_class(text: str) -> int:
    """0 negative, 1 neutral, 2 positive (VADER's thresholds)."""
    s = Sentiment.compound(text)
    return 0 if s <= NEGATIVE_BELOW else 2 if s >= POSITIVE_FROM else 1


class SentimentOracle(PreferenceOracle):
    def __init__(self, prefer: str = "positive", sharpness: float = 4.0):
        if prefer not in ("positive", "negative"):
            raise ValueError(f"sentiment oracle: prefer must be 'positive' or 'negative', got {prefer!r}")
        if not sharpness > 0:
            raise ValueError(f"sentiment oracle: sharpness must be > 0, got {sharpness!r}")
        _analyzer()  # fail at build, not at the first comparison
        self.sign = 1.0 if prefer == "positive" else -1.0
        self.sharpness = float(sharpness)
        self.oracle_id = f"sentiment:vader:{prefer}:{sharpness:g}"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.sign * Sentiment.compound(r) for r in responses]

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        verdicts = []
        for c in comparisons:
            gap = self.sign * (Sentiment.compound(c.a) - Sentiment.compound(c.b))
            verdicts.append(Verdict(1.0 / (1.0 + math.exp(-self.sharpness * gap))))
        return verdicts

    def __repr__(self) -> str:
        return f"SentimentOracle({self.oracle_id!r})"
