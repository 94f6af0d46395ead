"""On-disk cache of judgements, so a resumed campaign never pays for the same judgement twice.

Layout: ``RUN_DIR/judge-cache/<writer>.jsonl``, one append-only file per writer (each judge actor), one JSON object
per line: ``{"key": sha256 of [oracle_id, prompt, a, b], "prob": P(a ≻ b)}``. Writers never share a file, so
concurrent actors cannot interleave lines; readers read every file and pick up what other writers appended since
their last look, ignoring a torn last line (a writer killed mid-write) until it is completed. Texts are not stored,
only their hash. Dropped verdicts are not cached: a resumed campaign asks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict


def judgement_key(oracle_id: str, comparison: Comparison) -> str:
    payload = json.dumps([oracle_id, comparison.prompt, comparison.a, comparison.b], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    def __init__(self, directory: str | Path, oracle_id: str, writer: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.oracle_id = oracle_id
        writer = writer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = self.directory / f"{writer}.jsonl"
        self._probs: dict[str, float] = {}
        self._read_upto: dict[Path, int] = {}
        self.refresh()

    def __len__(self) -> int:
        return len(self._probs)

    def refresh(self) -> None:
        """Read what every writer appended since the last refresh (complete lines only)."""
        for path in sorted(self.directory.glob("*.jsonl")):
            start = self._read_upto.get(path, 0)
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read()
            complete = chunk.rfind(b"\n") + 1
            for line in chunk[:complete].splitlines():
                try:
                    entry = json.loads(line)
                    prob = float(entry["prob"])
                    key = entry["key"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash and later followed by newer lines: unusable, skipped
                if 0.0 <= prob <= 1.0:
                    self._probs[key] = prob
            self._read_upto[path] = start + complete

    def get(self, comparisons: list[Comparison]) -> list[float | None]:
        self.refresh()
        return [self._probs.get(judgement_key(self.oracle_id, c)) for c in comparisons]

    def put(self, comparisons: list[Comparison], verdicts: list[Verdict]) -> None:
        lines = []
        for comparison, verdict in zip(comparisons, verdicts, strict=True):
            if verdict.prob is None:
                continue
            key = judgement_key(self.oracle_id, comparison)
            self._probs[key] = verdict.prob
            lines.append(json.dumps({"key": key, "prob": verdict.prob}) + "\n")
        if lines:
            # One unbuffered O_APPEND write per batch: a crash tears at most the batch's last line.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode("utf-8"))
            finally:
                os.close(fd)


class CachedOracle(PreferenceOracle):
    """``oracle`` behind a :class:`VerdictCache`: only the comparisons never judged before reach ``oracle``."""

    def __init__(self, oracle: PreferenceOracle, directory: str | Path, writer: str | None = None):
        self.oracle = oracle
        self.oracle_id = oracle.oracle_id
        self.cache = VerdictCache(directory, oracle.oracle_id, writer)

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        cached = self.cache.get(comparisons)
        missing = [i for i, prob in enumerate(cached) if prob is None]
        fresh = self.oracle.compare([comparisons[i] for i in missing]) if missing else []
        self.cache.put([comparisons[i] for i in missing], fresh)
        verdicts = [Verdict(prob) if prob is not None else None for prob in cached]
        for i, verdict in zip(missing, fresh, strict=True):
            verdicts[i] = verdict
        return verdicts

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.oracle.score(prompts, responses)

    def __repr__(self) -> str:
        return f"CachedOracle({self.oracle!r}, {str(self.cache.directory)!r})"
