"""Live progress of a campaign on the terminal: one line per phase with counts and timing, an ETA, and a one-line
summary per round."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class _Phase:
    def __init__(self):
        self.note = ""

    def done(self, note: str) -> None:
        self.note = note


class Progress:
    def __init__(self, rounds: int | None = None, stream=None, quiet: bool = False):
        self.rounds = rounds
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.round_seconds: list[float] = []

    def _print(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)

    def note(self, line: str) -> None:
        self._print(line)

    @contextmanager
    def phase(self, name: str, t: int):
        self._print(f"[round {t}] {name} …")
        ph, start = _Phase(), time.perf_counter()
        yield ph
        self._print(f"[round {t}] {name} done in {time.perf_counter() - start:.1f}s"
                    + (f": {ph.note}" if ph.note else ""))

    def round_summary(self, m: dict) -> None:
        elapsed = m["round_s"]
        self.round_seconds.append(elapsed)
        eta = ""
        if self.rounds:
            left = self.rounds - (m["round"] + 1)
            eta = f", ETA {left * sum(self.round_seconds) / len(self.round_seconds):.0f}s" if left > 0 else ""
        fields = [f"round {m['round']} ({elapsed:.0f}s{eta})", f"loss {m.get('loss', float('nan')):.4f}"]
        for key, label, fmt in (("win_rate_vs_initial", "win vs initial", ".3f"),
                                ("lc_win_rate_vs_initial", "LC win", ".3f"), ("kl_to_ref", "KL", ".3f"),
                                ("ranking_accuracy", "rank acc", ".3f"),
                                ("mean_response_tokens", "len", ".1f"),
                                ("regularized_exploitability", "reg.expl", ".2e"),
                                ("judge_comparisons", "judged", "d")):
            if m.get(key) is not None:
                fields.append(f"{label} {m[key]:{fmt}}")
        self._print(" | ".join(fields))
