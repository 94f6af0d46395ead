"""The three distributions a generator samples from, shared by the engines and the vLLM policy/reference pair.

``policy`` is π_θ (the pushed weights), ``ref`` π_ref (the initial weights), ``mixture`` Nash-MD's geometric mixture
π_θ^{1−β}·π_ref^{β}, normalised at every token.
"""

from __future__ import annotations

SOURCES = ("policy", "ref", "mixture")


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown sample source {source!r}; expected one of {SOURCES}")
