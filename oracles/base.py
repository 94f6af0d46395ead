"""The preference-oracle interface every judge wraps: P(a ≻ b | x) for a batch of comparisons."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    """One question to a judge: is response ``a`` preferred to response ``b`` for ``prompt``?"""
    prompt: str
    a: str
    b: str


@dataclass(frozen=True)
class Verdict:
    """``prob`` = P(a ≻ b) in [0, 1], or None when the comparison was dropped; ``reason`` says why. ``votes``: a
    panel's member probabilities behind ``prob`` (None for a member that dropped it), kept to measure agreement."""
    prob: float | None
    reason: str | None = None
    votes: tuple[float | None, ...] | None = None

    def __post_init__(self):
        if self.prob is None and not self.reason:
            raise ValueError("a dropped verdict needs a reason")
        if self.prob is not None and not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"verdict probability {self.prob!r} is outside [0, 1]")


class PreferenceOracle(ABC):
    """P(a ≻ b | x). ``oracle_id`` names the oracle in caches and records (never a secret)."""

    oracle_id: str = "oracle"

    @abstractmethod
    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        """One verdict per comparison, in order. Bad replies become dropped verdicts, never exceptions."""

    def reseed(self, seed: int) -> None:
        """Restart the oracle's random draws from ``seed`` (a Bernoulli judge's). The driver reseeds each chunk of
        a round's comparisons, so a resumed round draws what the uninterrupted one would have; no-op without draws."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """A scalar per response, for oracles that score single responses (reward models)."""
        raise NotImplementedError(f"oracle {self.oracle_id!r} compares pairs; it does not score single responses")
