"""Per-round evaluation on held-out prompts: the judge's win rate of the current policy against the initial policy's
responses (with a 95% interval), and, for tabular games, the exact game-theoretic quantities of the pushed policy."""

from __future__ import annotations

import math

import numpy as np

from cluster.run_dir import atomic_write_json, read_table, write_table


def win_rate_interval(probs: list[float]) -> tuple[float, float, float]:
    """Mean judge probability and a normal-approximation 95% interval, clipped to [0, 1]."""
    p = np.asarray(probs, dtype=float)
    mean = float(p.mean())
    half = 1.96 * float(p.std(ddof=1)) / math.sqrt(len(p)) if len(p) > 1 else 0.5
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def ensure_baseline(campaign, roles) -> None:
    """The initial policy's answers to the held-out prompts, generated once before the first update."""
    from cluster.driver import generate
    path = campaign.run.eval_dir / "baseline.parquet"
    if path.exists() or campaign.tabular or not campaign.split.eval:
        return
    prompts = [p.as_dict() for p in campaign.split.eval[:campaign.cfg.evaluation.prompts]]
    write_table(path, generate(roles, prompts, 1, "policy", campaign.cfg.generators.timeout_s))


def evaluate_round(campaign, roles, push) -> dict:
    if campaign.tabular:
        return _evaluate_tabular(campaign, push)
    from cluster.driver import generate, judge
    path = campaign.run.eval_dir / "baseline.parquet"
    if not path.exists():
        return {}
    baseline = read_table(path)
    current = generate(roles, [{"prompt_id": b["prompt_id"], "prompt": b["prompt"]} for b in baseline], 1, "policy",
                       campaign.cfg.generators.timeout_s)
    by_id = {s["prompt_id"]: s for s in current}
    verdicts = judge(roles, [{"prompt": b["prompt"], "a": by_id[b["prompt_id"]]["response"], "b": b["response"]}
                             for b in baseline], campaign.cfg.judges.timeout_s)
    probs = [v["prob"] for v in verdicts if v["prob"] is not None]
    out = {"eval_mean_response_tokens": float(np.mean([len(s["response_ids"]) for s in current]))}
    if probs:
        mean, low, high = win_rate_interval(probs)
        out.update(win_rate_vs_initial=mean, win_rate_vs_initial_low=low, win_rate_vs_initial_high=high)
    return out


def _evaluate_tabular(campaign, push) -> dict:
    from oracles import games
    from trainers.weights import decode_state_dict, payload_bytes
    game = games.load_game(campaign.cfg.data.game)
    logits = decode_state_dict(payload_bytes(push))["logits"].double().numpy()
    pi = np.exp(logits - logits.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    tau = getattr(campaign.cfg.algorithm, "tau", 0.1)
    out = {
        "exploitability": float(np.mean([games.exploitability(P, p) for P, p in zip(game.P, pi)])),
        "regularized_exploitability": float(np.mean([games.regularized_exploitability(P, r, p, tau)
                                                     for P, r, p in zip(game.P, game.pi_ref, pi)])),
        "win_rate_vs_ref": float(np.mean([games.win_rate(P, p, r) for P, p, r in zip(game.P, pi, game.pi_ref)])),
        "tau": tau,
    }
    policy = {name: p.tolist() for name, p in zip(game.prompts, pi)}
    atomic_write_json(campaign.run.root / "policy.json", policy)
    return out
