"""A campaign's round metrics as TensorBoard scalars, under RUN_DIR/tb/ (``tensorboard --logdir RUN_DIR/tb``).

metrics.jsonl (written by :meth:`cluster.run_dir.RunDir.record_metrics`) stays the record of truth; the event files
are a view of it for TensorBoard: one scalar per numeric metric, step = round, tagged ``GROUP/metric`` so that related
curves share a TensorBoard section.
"""

from __future__ import annotations

import math
from pathlib import Path

TB_SUBDIR = "tb"

# The section of each metric, by prefix or name; the first match wins, anything else goes to "other".
GROUPS = (
    ("time", ("generate_s", "judge_s", "logprob_s", "train_s", "push_s", "encode_s", "eval_s", "prepare_s",
              "train_phase_s", "overlap_wait_s", "round_s")),
    ("eval", ("win_rate", "lc_win_rate", "lc_length_coef", "eval_", "exploitability", "regularized_exploitability",
              "ranking_accuracy")),
    ("train", ("loss", "kl_to_ref", "rows", "steps", "train_", "mean_response_tokens", "tau")),
    ("judge", ("judge_",)),
    ("generate", ("generate", "generated_")),
    ("push", ("push_", "weights_")),
    ("roles", ("generators", "judges", "learner_workers", "generator_restarts")),
)
UNPLOTTED = ("round", "version")


def tag(name: str) -> str:
    """``GROUP/name`` for a metric name."""
    for group, prefixes in GROUPS:
        if any(name == p or name.startswith(p) for p in prefixes):
            return f"{group}/{name}"
    return f"other/{name}"


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numeric metrics of a round, by tag (booleans as 0/1; None, text and lists are not scalars)."""
    out = {}
    for name, value in metrics.items():
        if name in UNPLOTTED or isinstance(value, (str, list, dict)) or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[tag(name)] = value
    return out


def write_tensorboard(run_root: Path, metrics: dict) -> None:
    """Add a round's metrics (a metrics.jsonl line, with its ``round``) to RUN_DIR/tb/, in an event file of its own
    that starts by purging the steps ≥ this round: a round replayed after a crash replaces its first try."""
    from torch.utils.tensorboard import SummaryWriter
    if "round" not in metrics:
        raise ValueError(f"round metrics need a 'round' key (the TensorBoard step); got keys {sorted(metrics)}")
    step = int(metrics["round"])
    writer = SummaryWriter(str(Path(run_root) / TB_SUBDIR), purge_step=step)
    try:
        for name, value in scalars(metrics).items():
            writer.add_scalar(name, value, step)
    finally:
        writer.close()
