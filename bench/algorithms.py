"""Every algorithm side by side on a real language model under a general-preference (panel) judge, then a tournament.

Each entry — online DPO, online IPO, iterative DPO, SPPO, DNO (practical and regression), INPO, XPO, Nash-MD — trains
SmolLM2-135M-Instruct with the vLLM generator through the real pipeline (``nashray run`` in a child process: Ray,
generator, judge and DeepSpeed learner actors), under the same panel judge, prompts (``builtin:instructions``), seed,
rounds and sample budget. Every campaign evaluates on the same held-out prompts; its last round's answers are its
final policy's, and for SPPO and DNO, which converge on average rather than in the last iterate, the uniform mixture
of their round policies enters too: per prompt one round is drawn and that round policy's answer taken.

The tournament judges every pair of entrants (the initial policy included) on every held-out prompt with the same
panel, and reports the pairwise win-rate matrix with 95 % Wilson intervals, each entrant's win rate against the
initial policy, its exploitability inside the population (the best win rate any other entrant reaches against it),
its KL to π_ref and its response length, and how intransitive the judge was (cyclic triads among each prompt's
answers, and each panel member's agreement with the panel).

    .venv/bin/python bench/algorithms.py                  # all entries, then the tournament (about an hour here)
    .venv/bin/python bench/algorithms.py --only inpo,xpo  # some entries (finished ones are reused)

Writes ``bench/results/algorithms.json`` and ``bench/results/algorithms-heatmap.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, Run, setup_environment, summary_row  # noqa: E402
from nashray.layout import RunDir  # noqa: E402

ENTRIES = {
    "online_dpo": {"name": "online_dpo"},
    "online_ipo": {"name": "online_ipo"},
    "iterative_dpo": {"name": "iterative_dpo"},
    "sppo": {"name": "sppo"},
    "dno": {"name": "dno", "variant": "practical"},
    "dno_regression": {"name": "dno", "variant": "regression"},
    "inpo": {"name": "inpo"},
    "xpo": {"name": "xpo"},
    "nash_md": {"name": "nash_md"},
}
AVERAGED = ("sppo", "dno", "dno_regression")  # converge on average: their round-policy mixture enters too

# The panel: three real, cheap judges that order responses by different things — VADER's sentiment, brevity, and
# Flesch reading ease — voting by majority, so they cycle wherever their orderings disagree (Condorcet). The demo's
# SmolLM2 LLM judge is left out here: on the AVX2-only machines this ran on it judges ~0.9 comparisons/s (fp32, both
# orders), which makes the tournament's 4 992 comparisons alone ~95 minutes (docs/benchmarks.md).
PANEL = {"kind": "ensemble", "combine": "majority", "members": [
    {"kind": "sentiment", "prefer": "positive"},
    {"kind": "rule", "rule": "concise_answer"},
    {"kind": "rule", "rule": "readable"},
]}


def campaign_config(algorithm: dict, args, run_dir: Path, oracle: dict, every_rounds: int) -> dict:
    """The shared campaign: only the algorithm (and how often it is evaluated) differs between entries."""
    return {
        "seed": args.seed,
        "model": {"path": "smollm2-135m-instruct", "dtype": "auto", "max_prompt_tokens": 96},
        "algorithm": algorithm,
        "generators": {"engine": args.engine, "sampling": {"temperature": 1.0, "top_p": 1.0,
                                                           "max_new_tokens": args.max_new_tokens},
                       "kv_cache_gib": 1, "resources": {"num_cpus": 1, "threads": 2}},
        "judges": {"oracle": oracle, "strategy": "all_pairs", "resources": {"num_cpus": 1, "threads": 2}},
        "learner": {"workers": 1, "precision": "auto", "optimizer": {"name": "adamw", "lr": args.lr},
                    "micro_batch_size": 8, "threads_per_worker": 2},
        "data": {"prompts": "builtin:instructions", "eval_fraction": args.eval_fraction, "shuffle_seed": 0},
        "schedule": {"rounds": args.rounds, "prompts_per_round": args.prompts_per_round,
                     "samples_per_prompt": args.k},
        "storage": {"run_dir": str(run_dir), "keep_checkpoints": 1},
        "evaluation": {"every_rounds": every_rounds, "prompts": args.eval_prompts},
    }


def run_entry(name: str, config: dict, work: Path) -> tuple[Path, float | None]:
    """Train one entry with ``nashray run`` in a child process (resumed where an earlier run stopped); its run dir
    and the seconds it trained, None for an entry finished earlier (its time is its first run's)."""
    entry_dir = work / name
    entry_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(config["storage"]["run_dir"])
    state = run_dir / "state.json"
    if state.exists() and json.loads(state.read_text()).get("rounds_completed") == config["schedule"]["rounds"]:
        print(f"[{name}] done earlier: {run_dir}", flush=True)
        return run_dir, None
    config_path = entry_dir / "campaign.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    nashray = str(Path(sys.executable).parent / "nashray")
    command = [nashray, "run", "--resume", str(run_dir)] if state.exists() else [nashray, "run", str(config_path)]
    start = time.perf_counter()
    with open(entry_dir / "console.log", "a") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"[{name}] {' '.join(command)} failed ({proc.returncode}); see {entry_dir / 'console.log'}")
    seconds = time.perf_counter() - start
    print(f"[{name}] trained in {seconds:.0f} s: {run_dir}", flush=True)
    return run_dir, seconds


def read_metrics(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).metrics()


def entrant_answers(run_dirs: dict[str, Path], rounds: int, seed: int) -> tuple[dict, list[dict]]:
    """{entrant: {prompt_id: (response, tokens)}} and the held-out prompts, from the runs' eval files: ``initial``
    (the initial policy's answers), each entry's final policy (its last round), ``<entry>_avg`` for the averaged
    ones (per prompt, the answer of a uniformly drawn round policy)."""
    import pyarrow.parquet as pq
    first = next(iter(run_dirs.values()))
    baseline = pq.read_table(RunDir(first).eval_dir / "baseline.parquet").to_pylist()
    prompts = [{"prompt_id": b["prompt_id"], "prompt": b["prompt"]} for b in baseline]
    answers = {"initial": {b["prompt_id"]: (b["response"], len(b["response_ids"])) for b in baseline}}
    rng = np.random.default_rng(seed)
    for name, run_dir in run_dirs.items():
        per_round = {}
        for t in range(rounds):
            path = RunDir(run_dir).round_dir(t) / "eval.parquet"
            if path.exists():
                per_round[t] = {r["prompt_id"]: (r["response"], r["response_tokens"])
                                for r in pq.read_table(path).to_pylist()}
        answers[name] = per_round[rounds - 1]
        if name in AVERAGED:
            if len(per_round) < rounds:
                raise RuntimeError(f"{name}: the average iterate needs every round's eval answers, found rounds "
                                   f"{sorted(per_round)}")
            drawn = rng.integers(0, rounds, len(prompts))
            answers[f"{name}_avg"] = {p["prompt_id"]: per_round[int(t)][p["prompt_id"]] for p, t in zip(prompts, drawn)}
    return answers, prompts


def tournament(answers: dict, prompts: list[dict], oracle: dict) -> dict:
    """Every pair of entrants on every prompt, judged by ``oracle`` in this process."""
    from nashray.actors.judge import JudgeActor
    from nashray.cluster.driver import member_agreement, panel_member_names
    from nashray.cluster.evaluation import win_rate_interval
    from nashray.oracles.config import parse_oracle_config
    from nashray.trainers.pairs import cyclic_triads
    names = list(answers)
    oracle = parse_oracle_config(oracle)
    judge = JudgeActor(oracle, None)
    pairs = list(itertools.combinations(range(len(names)), 2))
    asked = [{"prompt": p["prompt"], "a": answers[names[i]][p["prompt_id"]][0],
              "b": answers[names[j]][p["prompt_id"]][0]} for p in prompts for i, j in pairs]
    start = time.perf_counter()
    verdicts = []
    for n in range(0, len(asked), 256):
        verdicts += judge.judge(asked[n:n + 256])
        print(f"tournament: {len(verdicts)}/{len(asked)} comparisons, {time.perf_counter() - start:.0f} s", flush=True)
    judge_s = time.perf_counter() - start
    probs = np.full((len(prompts), len(names), len(names)), np.nan)
    votes = []
    it = iter(verdicts)
    for k in range(len(prompts)):
        for i, j in pairs:
            v = next(it)
            if v["prob"] is not None:
                probs[k, i, j], probs[k, j, i] = v["prob"], 1 - v["prob"]
            votes.append(v)
    win = np.full((len(names), len(names)), 0.5)
    low, high = np.full_like(win, np.nan), np.full_like(win, np.nan)
    for i, j in itertools.permutations(range(len(names)), 2):
        col = probs[:, i, j]
        win[i, j], low[i, j], high[i, j] = win_rate_interval(col[~np.isnan(col)].tolist())
    cyclic = decided = 0
    for k in range(len(prompts)):
        judged = {(i, j): probs[k, i, j] for i, j in pairs if not np.isnan(probs[k, i, j])}
        c, d = cyclic_triads(len(names), judged)
        cyclic, decided = cyclic + c, decided + d
    policy_triads = cyclic_triads(len(names), {(i, j): win[i, j] for i, j in pairs})
    members = panel_member_names(oracle)
    agreement = {}
    for m, member in enumerate(members):
        decided_votes = sum(v["votes"] is not None and v["votes"][m] not in (None, 0.5) for v in votes)
        agreement[member] = {"agreement_with_panel": member_agreement(votes, m),
                             "decided_share": decided_votes / max(len(votes), 1)}
    llm_probs = [v["votes"][0] for v in votes if v["votes"] is not None and v["votes"][0] is not None]
    return {"entrants": names, "win_rate": win.tolist(), "win_rate_low": low.tolist(), "win_rate_high": high.tolist(),
            "comparisons": len(asked), "dropped": sum(v["prob"] is None for v in verdicts), "judge_s": judge_s,
            "judge_intransitivity": {"cyclic_triads_share": cyclic / decided if decided else None,
                                     "decided_triads": decided,
                                     "policy_level_cyclic_triads": policy_triads[0],
                                     "policy_level_decided_triads": policy_triads[1]},
            "panel_members": agreement,
            "llm_judge_probability_quantiles": (np.quantile(llm_probs, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()
                                                if llm_probs and members and "llm_judge" in members[0] else None)}


def entrant_table(result: dict, answers: dict, run_dirs: dict[str, Path]) -> list[dict]:
    names, win = result["entrants"], np.array(result["win_rate"])
    initial = names.index("initial")
    rows = []
    for i, name in enumerate(names):
        base = name.removesuffix("_avg")
        metrics = read_metrics(run_dirs[base]) if base in run_dirs else []
        kls = [m.get("eval_kl_policy_to_ref") for m in metrics if m.get("eval_kl_policy_to_ref") is not None]
        others = [win[j, i] for j in range(len(names)) if j != i]
        rows.append({
            "entrant": name,
            "win_rate_vs_initial": None if i == initial else float(win[i, initial]),
            "win_rate_vs_initial_low": None if i == initial else result["win_rate_low"][i][initial],
            "win_rate_vs_initial_high": None if i == initial else result["win_rate_high"][i][initial],
            "mean_win_rate": float(np.mean([win[i, j] for j in range(len(names)) if j != i])),
            # the best win rate any other entrant reaches against it
            "exploitability_in_population": float(max(others)),
            "best_response": names[int(np.argmax([win[j, i] if j != i else -1 for j in range(len(names))]))],
            # a mixture's KL to π_ref is at most the mean of its components' (convexity): that bound for _avg
            "kl_to_ref": (0.0 if name == "initial" else float(np.mean(kls)) if name.endswith("_avg") and kls
                          else float(kls[-1]) if kls else None),
            "kl_is_upper_bound": name.endswith("_avg"),
            "mean_response_tokens": float(np.mean([tokens for _, tokens in answers[name].values()])),
        })
    return rows


def heatmap(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, win = result["entrants"], np.array(result["win_rate"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(names), 0.8 + 0.55 * len(names)))
    image = ax.imshow(win, cmap="RdBu_r", vmin=0.2, vmax=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, j in itertools.product(range(len(names)), repeat=2):
        if i != j:
            ax.text(j, i, f"{win[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("opponent (column)")
    ax.set_ylabel("entrant (row): P(row ≻ column)")
    cyc = result["judge_intransitivity"]["cyclic_triads_share"]
    ax.set_title(f"SmolLM2-135M, panel judge — {len(names)} entrants; "
                 f"{cyc:.1%} of judged answer triads cyclic" if cyc is not None else "tournament", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv=None, description: str = __doc__):
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--only", help="comma-separated entries (default: all)")
    parser.add_argument("--work", default="runs/bench-algorithms", help="where the campaigns' run dirs live")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompts-per-round", type=int, default=6)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--eval-fraction", type=float, default=0.19)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    setup_environment()
    run = Run("algorithms", vars(args))
    work = Path(args.work).resolve()
    names = args.only.split(",") if args.only else list(ENTRIES)
    unknown = set(names) - set(ENTRIES)
    if unknown:
        sys.exit(f"unknown entries {sorted(unknown)}; known: {list(ENTRIES)}")
    run_dirs, train_s = {}, {}
    for name in names:
        every = 1 if name in AVERAGED else args.rounds  # the others are compared at their last round
        config = campaign_config(ENTRIES[name], args, work / name / "run", PANEL, every)
        run_dirs[name], train_s[name] = run_entry(name, config, work)
    answers, prompts = entrant_answers(run_dirs, args.rounds, args.seed)
    result = tournament(answers, prompts, PANEL)
    table = entrant_table(result, answers, run_dirs)
    per_round = {name: [{k: m.get(k) for k in ("round", "loss", "judge_cyclic_triads", "round_s", "train_s",
                                               "mean_response_tokens", "win_rate_vs_initial", "kl_to_ref")}
                        | {k: v for k, v in m.items() if k.startswith("judge_agreement/")}
                        for m in read_metrics(run_dir)] for name, run_dir in run_dirs.items()}
    training_cycles = [m["judge_cyclic_triads"] for rows in per_round.values() for m in rows
                       if m.get("judge_cyclic_triads") is not None]
    run.result.update(judge=PANEL, prompts=len(prompts), entries=names, train_wall_s=train_s,
                      run_dirs={k: str(v) for k, v in run_dirs.items()}, tournament=result, table=table,
                      per_round=per_round,
                      training_judge_cyclic_triads_mean=float(np.mean(training_cycles)) if training_cycles else None)
    best = max(table, key=lambda r: r["mean_win_rate"])
    run.result["summary"] = [
        summary_row(f"tournament: {row['entrant']} win rate vs the initial policy ({len(prompts)} held-out prompts, "
                    "panel judge)", row["win_rate_vs_initial"], 0.5, "", note=(
                        f"95% [{row['win_rate_vs_initial_low']:.2f}, {row['win_rate_vs_initial_high']:.2f}]; "
                        f"exploitability in population {row['exploitability_in_population']:.2f} "
                        f"(by {row['best_response']})"))
        for row in table if row["entrant"] != "initial"]
    run.result["best_by_mean_win_rate"] = best["entrant"]
    heatmap(result, RESULTS_DIR / "algorithms-heatmap.png")
    run.write(args.out)


if __name__ == "__main__":
    main()
