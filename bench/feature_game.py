"""An exactly solvable general-preference check on a real language model.

The judge prefers by a discrete feature of the response alone — the ``cyclic`` rule on coarse word-count classes
(short ≻ medium ≻ long ≻ short) — so it induces a 3×3 matrix game M over the classes, and a policy's exploitability
depends only on its class distribution q, estimated from its held-out answers:

    exploitability              = max_c (Mq)_c − ½
    regularized exploitability  = τ·log Σ_c r_c·exp((Mq)_c/τ) + τ·KL(π‖π_ref) − ½

with r the initial policy's class distribution and KL from the learner's log-probs (``nashray.cluster.evaluation.
feature_game_metrics``). The bins are chosen from SmolLM2's own answers so that the initial policy is far from the
regularised Nash of M. INPO, Nash-MD and iterative DPO each train SmolLM2-135M-Instruct through the real pipeline
(vLLM generator, DeepSpeed learner) and are evaluated every round on the same held-out prompts; the figures, with
bootstrap intervals, show how each moves relative to the regularised Nash.

    .venv/bin/python bench/feature_game.py

Writes ``bench/results/feature_game.json`` and ``bench/results/feature_game.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.algorithms import ENTRIES, campaign_config, parse_args, read_metrics, run_entry  # noqa: E402
from bench.common import RESULTS_DIR, Run, setup_environment, summary_row  # noqa: E402

BINS = [12, 24]  # words: < 12 short, 12–23 medium, ≥ 24 long
JUDGE = {"kind": "rule", "rule": "cyclic", "options": {"feature": "words", "bins": BINS}}
CONTENDERS = ("inpo", "nash_md", "iterative_dpo")
KEYS = ("feature_exploitability", "feature_exploitability_low", "feature_exploitability_high",
        "feature_regularized_exploitability", "feature_regularized_exploitability_low",
        "feature_regularized_exploitability_high", "feature_class_distribution", "feature_ref_class_distribution",
        "feature_regularized_nash", "eval_kl_policy_to_ref", "win_rate_vs_initial", "mean_response_tokens")


def initial_policy_figures(run_dir: Path) -> dict:
    """The same figures for the initial policy π_ref itself (its own held-out answers, KL 0)."""
    import numpy as np
    import pyarrow.parquet as pq

    from nashray.cluster.evaluation import feature_game_metrics
    from nashray.layout import RunDir
    from nashray.oracles.rules import build_rule
    rule = build_rule("cyclic", JUDGE["options"])
    baseline = pq.read_table(RunDir(run_dir).eval_dir / "baseline.parquet").to_pylist()
    classes = [rule.feature(b["response"]) for b in baseline]
    return feature_game_metrics(rule.feature_game(), classes, classes, np.zeros(len(classes)), 0.1)


def plot(per_round: dict, initial: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in per_round.items():
        rows = [{"round": -1, **initial}] + rows
        rounds = [r["round"] + 1 for r in rows]
        for ax, key in zip(axes, ("feature_regularized_exploitability", "feature_exploitability")):
            mid = [r[key] for r in rows]
            ax.plot(rounds, mid, marker="o", label=name)
            ax.fill_between(rounds, [r[f"{key}_low"] for r in rows], [r[f"{key}_high"] for r in rows], alpha=0.15)
            ax.set_title(key.replace("feature_", "").replace("_", " ") + " (95% bootstrap)")
            ax.set_xlabel("policy after round (0: initial)")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M under a cyclic word-count judge (bins {BINS}): the exact 3-class game", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    args = parse_args(description=__doc__)
    setup_environment()
    run = Run("feature_game", vars(args))
    work = Path(args.work).resolve().with_name("bench-feature-game")
    names = args.only.split(",") if args.only else list(CONTENDERS)
    per_round, train_s = {}, {}
    for name in names:
        config = campaign_config(ENTRIES[name], args, work / name / "run", JUDGE, every_rounds=1)
        start = time.perf_counter()
        run_dir = run_entry(name, config, work)
        train_s[name] = time.perf_counter() - start
        per_round[name] = [{"round": m["round"], **{k: m.get(k) for k in KEYS}} for m in read_metrics(run_dir)]
    initial = initial_policy_figures(work / names[0] / "run")
    run.result.update(judge=JUDGE, bins=BINS, train_wall_s=train_s, per_round=per_round, initial=initial)
    run.result["summary"] = [
        summary_row(f"feature game (cyclic word-count classes): {name} regularised exploitability after "
                    f"{len(rows)} rounds", rows[-1]["feature_regularized_exploitability"],
                    initial["feature_regularized_exploitability"], "", baseline_name="initial policy",
                    note=f"95% [{rows[-1]['feature_regularized_exploitability_low']:.3f}, "
                         f"{rows[-1]['feature_regularized_exploitability_high']:.3f}]; class distribution "
                         f"{[round(x, 2) for x in rows[-1]['feature_class_distribution']]} vs regularised Nash "
                         f"{[round(x, 2) for x in rows[-1]['feature_regularized_nash']]}")
        for name, rows in per_round.items()]
    plot(per_round, initial, RESULTS_DIR / "feature_game.png")
    run.write(args.out)


if __name__ == "__main__":
    main()
