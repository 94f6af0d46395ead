"""Asynchronous rounds: round time one-step-off against the longer of its two overlapped halves.

With ``schedule.async_rounds``, round t+1 is generated and judged by π_t while the learner trains round t; the weight
push waits for both. A round then costs about max(generate + judge, train) + push instead of their sum. Measured
here: the end-to-end benchmark's nashray campaign (online DPO, vLLM generator, rule judge, DeepSpeed learner, bf16,
evaluation off), once synchronous and once one-step-off, in child processes one after the other. The two cores are
split between the halves so that they can overlap at all: the vLLM generator's threads are bound to core 0
(``VLLM_CPU_OMP_THREADS_BIND``), the learner runs one thread; both runs use the same split.

Per one-step-off round t (not the first, which has nothing to overlap, nor the last): ``bound`` =
max(prepare_s of round t+1 — its generate, judge and dataset, run while round t trained —, train_phase_s of round
t), and the ratio round_s / bound, whose target is ≤ 1.15. The synchronous run gives the same rounds' time for
comparison.

    .venv/bin/python bench/async_rounds.py [--model smollm2] [--rounds 5] [--prompts 8] [--max-new-tokens 48]

Writes ``bench/results/async_rounds.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Run, median, setup_environment, summary_row  # noqa: E402
from bench.end_to_end import in_child, resolve_model  # noqa: E402

TARGET = 1.15


def overlap_rows(rounds: list[dict]) -> list[dict]:
    """Per overlapped round: its wall time and the longer of the two halves that ran at the same time."""
    rows = []
    for t in range(1, len(rounds) - 1):
        bound = max(rounds[t + 1]["prepare_s"], rounds[t]["train_phase_s"])
        rows.append({"round": t, "round_s": rounds[t]["wall_s"], "next_prepare_s": rounds[t + 1]["prepare_s"],
                     "train_phase_s": rounds[t]["train_phase_s"], "push_s": rounds[t].get("push_s"),
                     "bound_s": bound, "ratio": rounds[t]["wall_s"] / bound})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny")
    parser.add_argument("--rounds", type=int, default=5, help="at least 3: the first and last overlap nothing")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    setup_environment()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # inherited by the children's Ray workers
    run = Run("async_rounds", vars(args))
    folder = resolve_model(args.model, Path(tempfile.mkdtemp(prefix="nashray-bench-async-")))
    shared = {"steps": args.rounds, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "threads": 1}
    sides = {}  # threads 1: one CPU for the generator actor, one thread for the learner worker
    for name, overrides in (("sync", {}), ("one_step_off", {"schedule.async_rounds": True})):
        sides[name] = in_child("nashray", folder, shared, overrides)
        run.result[name] = sides[name]
        run.write(args.out)
    summary = []
    if not any("error" in side for side in sides.values()):
        rows = overlap_rows(sides["one_step_off"]["steps"])
        ratio = median([r["ratio"] for r in rows])
        sync_s = median([r["wall_s"] for r in sides["sync"]["steps"][1:-1]])
        async_s = median([r["round_s"] for r in rows])
        run.result["overlap"] = rows
        summary.append(summary_row(
            f"one-step-off round time / max(generate + judge, train), {args.model}", async_s,
            median([r["bound_s"] for r in rows]), "s", f"≤ {TARGET}×", ratio <= TARGET,
            "max(next round's prepare, this round's train)",
            f"median of per-round ratios {ratio:.2f}; push and its check follow both halves"))
        summary.append(summary_row(f"round time, one-step-off vs synchronous, {args.model}", async_s, sync_s, "s",
                                   baseline_name="synchronous rounds"))
    run.result["summary"] = summary
    run.write(args.out)
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
