"""Cost growth: time per round as prompts per round, samples per prompt K and the generator count grow.

Each point is one nashray campaign on the tiny random Llama (the end-to-end benchmark's config: vLLM generator,
rule judge, DeepSpeed learner, online DPO, evaluation off), in its own child process, ``--rounds`` rounds, the
first a warm-up; the round wall time is the median of the others, with its phases. One axis moves at a time from
the base point (``--base-prompts`` prompts, K = 2, one generator). All pairs of the K samples are judged and
trained on (K·(K−1)/2 per prompt), in micro-batches of 8.

Along K the question is whether a round grows like the samples (K) or like the pairs (K·(K−1)/2, ~K²): besides the
line, a least-squares fit of log(time) against log(K) gives the exponent p of time ∝ K^p, for the round and for the
learner's part (π_t/π_ref log-probs + training).

    .venv/bin/python bench/scaling.py [--model tiny] [--prompts 4,16,48] [--k 2,4,8] [--generators 1,2] [--rounds 3]

Writes ``bench/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Run, median, setup_environment, summary_row  # noqa: E402
from bench.end_to_end import in_child, resolve_model  # noqa: E402

PHASES = ("generate_s", "judge_s", "logprob_s", "train_s", "encode_s", "push_s", "other_s")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = fixed + per_unit·x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"fixed_s": round(my - slope * mx, 3), "per_unit_s": round(slope, 4)}


def power_law(xs: list[float], ys: list[float]) -> float:
    """p of the least-squares fit y ∝ x^p (log y against log x)."""
    return round(fit_line([math.log(x) for x in xs], [math.log(y) for y in ys])["per_unit_s"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--prompts", default="4,16,48", help="at most the 48 demo prompts: more repeat prompts")
    parser.add_argument("--k", default="2,4,8")
    parser.add_argument("--generators", default="1,2")
    parser.add_argument("--base-prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_environment()
    run = Run("scaling", vars(args))
    folder = resolve_model(args.model, Path(tempfile.mkdtemp(prefix="nashray-bench-scaling-")))
    base = {"prompts": args.base_prompts, "k": 2, "generators": 1}
    points = [{**base, "prompts": p} for p in _ints(args.prompts)]
    points += [{**base, "k": k} for k in _ints(args.k)]
    points += [{**base, "generators": g} for g in _ints(args.generators)]
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    rows = []
    for point in unique:
        shared = {"steps": args.rounds, "prompts": point["prompts"], "max_new_tokens": args.max_new_tokens,
                  "threads": args.threads}
        overrides = {"schedule.samples_per_prompt": point["k"], "generators.count": point["generators"],
                     "learner.micro_batch_size": 8}
        if point["generators"] > 1:  # the cores are shared in time: each generator asks for one
            overrides["generators.resources"] = {"num_cpus": 1}
        result = in_child("nashray", folder, shared, overrides)
        if "error" in result:
            rows.append({**point, "error": result["error"]})
            run.result["points"] = rows
            continue
        measured = result["steps"][1:] or result["steps"]
        row = {**point, "pairs_per_round": median([r["pairs"] for r in measured]),
               "round_s": median([r["wall_s"] for r in measured]),
               "phases_s": {k: round(median([r.get(k, 0.0) for r in measured]), 3) for k in PHASES},
               "load_1m": [r["load_1m"] for r in measured], "startup_s": result["startup_s"],
               "peak_rss_mib": result["peak_rss_mib"], "rounds": result["steps"]}
        row["pairs_per_s"] = row["pairs_per_round"] / row["round_s"]
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("rounds", "peak_rss_mib")}, flush=True)
        run.result["points"] = rows
        run.write(args.out)
    ok = [r for r in rows if "error" not in r]

    def series(axis: str) -> list[dict]:
        others = {k: v for k, v in base.items() if k != axis}
        return sorted([r for r in ok if all(r[k] == v for k, v in others.items())], key=lambda r: r[axis])

    trends, summary = {}, []
    for axis, unit in (("prompts", "prompt"), ("k", "sample per prompt"), ("generators", "generator")):
        points_axis = series(axis)
        if len(points_axis) >= 2:
            trends[axis] = fit_line([r[axis] for r in points_axis], [r["round_s"] for r in points_axis])
            trends[axis]["per_pair_s"] = fit_line([r["pairs_per_round"] for r in points_axis],
                                                  [r["round_s"] for r in points_axis])["per_unit_s"]
            first, last = points_axis[0], points_axis[-1]
            note = f"≈ {trends[axis]['fixed_s']:.2f} s fixed + {trends[axis]['per_unit_s']:.3f} s per {unit}"
            if axis == "k":
                learner = [r["phases_s"]["logprob_s"] + r["phases_s"]["train_s"] for r in points_axis]
                trends[axis]["exponent"] = power_law([r["k"] for r in points_axis], [r["round_s"] for r in points_axis])
                trends[axis]["learner_exponent"] = power_law([r["k"] for r in points_axis], learner)
                note += (f"; round ∝ K^{trends[axis]['exponent']:.2f}, learner ∝ K^"
                         f"{trends[axis]['learner_exponent']:.2f} (pairs ∝ K(K−1)/2)")
            summary.append(summary_row(
                f"round time, {axis} {first[axis]} → {last[axis]} ({args.model} model)", last["round_s"],
                first["round_s"], "s", note=note, baseline_name=f"{axis} = {first[axis]}"))
    run.result.update(points=rows, trends=trends, summary=summary, base=base)
    run.write(args.out)
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
