"""Evaluation: how good the policy is, measured on held-out prompts after every push, and head to head between any
two models (``nashray eval``).

Per round (LLM campaigns), on the first ``evaluation.prompts`` prompts of the held-out split (``Campaign.split.eval``,
never trained on), the current policy π_θ answers once per prompt and the evaluation judge (``evaluation.oracle``,
else the judges' oracle) compares each answer (``a``) with the initial policy's answer (``b``, generated once before
the first update, ``eval/baseline.parquet``):

- ``win_rate_vs_initial`` (+ ``_low``/``_high``): the mean judge probability P(π_θ's answer ≻ the initial answer),
  with a 95% Wilson score interval (:func:`win_rate_interval`).
- ``lc_win_rate_vs_initial`` (+ ``_low``/``_high``, ``lc_length_coef``): the length-controlled win rate in the style
  of AlpacaEval 2.0: the predicted win rate at zero length difference of a logistic regression of the verdicts on
  the normalised length difference (:func:`length_controlled_win_rate`).
- ``win_rate_vs_ref`` and ``lc_win_rate_vs_ref`` (+ intervals): against π_ref, the learner's reference model. π_ref
  *is* the initial policy (both are ``model.path`` at the campaign's start), so these are the same judgements under
  a second name, not a second set of judge calls; they are left out when ``model.path`` no longer names the model the
  baseline was generated with (a resume that changed it), rather than reported for the wrong model.
- ``eval_kl_ref_to_policy``: KL(π_ref ‖ π_θ) ≈ mean over the baseline answers y ~ π_ref of log π_ref(y) − log π_θ(y)
  (log π_ref scored by the generators before the first push, log π_θ by the generators each round: the same engine
  and numerics both times, so π_θ = π_ref gives 0 up to float noise). It is reported only when the baseline was
  sampled from π_ref itself (temperature 1, top-p 1); with tempered sampling the same average is not a KL.
- ``eval_kl_policy_to_ref``: the forward KL(π_θ ‖ π_ref), the one the algorithms regularise, ≈ mean over the
  current policy's held-out answers y ~ π_θ of log π_θ(y) − log π_ref(y), both scored by the learner (it holds π_θ
  and π_ref; one engine and numerics for both). Also only with plain sampling. The learner's ``kl_to_ref`` is the
  same mean over the training pairs' first responses during the round's updates (biased where the pairs are
  selected, as iterative DPO's best-vs-worst are).
- ``eval_mean_response_tokens``, ``eval_initial_mean_response_tokens``, ``eval_comparisons``,
  ``eval_judge_dropped``, ``eval_s``.

Under a judge that declares a matrix game over a discrete feature of the response (the ``cyclic`` rule), the
policy's exact ``feature_exploitability`` and ``feature_regularized_exploitability`` in that game, with bootstrap
intervals, and its class distribution against the regularised Nash's (:func:`feature_game_metrics`).

Each round's eval answers and verdicts are kept in ``rounds/t/eval.parquet``. Tabular games are evaluated exactly
(``exploitability``, ``regularized_exploitability``, ``win_rate_vs_ref``: the initial tabular policy is π_ref), the
same for the average iterate (``avg_exploitability``, ``avg_regularized_exploitability``: the uniform average of the
round policies π_1..π_t, where SPPO and DNO converge while their last iterates cycle; see
:func:`running_average_policy`).

``ranking_accuracy`` (Chen et al. 2024, arXiv 2405.19534) is for the learner to compute from its pass over the
round's pairs before the first update (π_t and π_ref log-probs) with
:func:`nashray.trainers.ranking.ranking_counts`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import ray
from scipy.special import logsumexp

from nashray.actors.generator import GeneratorActor
from nashray.actors.judge import JudgeActor
from nashray.cluster.actor_pool import ActorPool
from nashray.cluster.config import CampaignConfig
from nashray.cluster.placement import actor_options
from nashray.cluster.roles import Roles, generate, judge, round_seed
from nashray.layout import RunDir, atomic_write_json, newest_checkpoint, read_table, write_table
from nashray.oracles import games
from nashray.oracles.config import parse_oracle_config
from nashray.oracles.rules import build_rule
from nashray.trainers.learner import SequenceLogprobs
from nashray.weights import push_state_dict

Z95 = 1.959963984540054
LC_PRIOR_PRECISION = (0.1, 0.1)
"""Precision of the Gaussian priors N(0, 1/λ) on the intercept and the length coefficient of the LC regression:
weak (sd ≈ 3.2 in logits), they keep the fit finite when every verdict goes one way or the verdicts are perfectly
separated by length (a length-only judge), and vanish against the data as the number of comparisons grows."""


# ------------------------------------------------------------------------------------------ pure statistics

def win_rate_interval(probs, z: float = Z95) -> tuple[float, float, float]:
    """Mean judge probability p̂ and its Wilson score interval, treating the n verdicts as Bernoulli draws: exact
    coverage asymptotics for hard verdicts, conservative for soft ones (a verdict in [0, 1] with mean p has variance
    at most p(1 − p)). Unlike the normal approximation it stays informative at p̂ = 0 or 1 and small n."""
    p = np.asarray(probs, dtype=float)
    if p.ndim != 1 or len(p) == 0:
        raise ValueError(f"win_rate_interval needs a non-empty 1-d list of probabilities, got shape {p.shape}")
    if ((p < 0) | (p > 1)).any() or not np.isfinite(p).all():
        raise ValueError("win_rate_interval: probabilities must lie in [0, 1]")
    n, mean = len(p), float(p.mean())
    denominator = 1 + z * z / n
    center = (mean + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return mean, max(0.0, center - half), min(1.0, center + half)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def fit_logistic(features: np.ndarray, targets: np.ndarray, prior_precision, iterations: int = 100,
                 tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """MAP logistic regression by Newton's method (IRLS): maximises Σ y log μ + (1 − y) log(1 − μ) − ½ Σ λ_j w_j²,
    μ = σ(X w), with soft targets y ∈ [0, 1] allowed. Returns the coefficients and their model-based covariance
    (X^T diag(μ(1 − μ)) X + diag(λ))^{-1}, which for soft targets overstates the variance (conservative)."""
    X = np.asarray(features, dtype=float)
    y = np.asarray(targets, dtype=float)
    penalty = np.diag(np.asarray(prior_precision, dtype=float))
    if X.ndim != 2 or len(X) != len(y) or penalty.shape != (X.shape[1],) * 2:
        raise ValueError(f"fit_logistic: features {X.shape}, targets {y.shape} and {len(penalty)} prior "
                         f"precisions do not line up")

    def objective(w):
        z = X @ w
        # log σ(z) = −log(1 + e^{−z}), stably
        return float(np.sum(-y * np.logaddexp(0, -z) - (1 - y) * np.logaddexp(0, z)) - 0.5 * w @ penalty @ w)

    w = np.zeros(X.shape[1])
    value = objective(w)
    for _ in range(iterations):
        mu = _sigmoid(X @ w)
        gradient = X.T @ (y - mu) - penalty @ w
        hessian = X.T @ (X * (mu * (1 - mu))[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while True:  # the objective is concave: halving the Newton step always ends in an increase
            candidate = w + scale * step
            new_value = objective(candidate)
            if new_value >= value - 1e-12 or scale < 1e-8:
                break
            scale /= 2
        w, improvement, value = candidate, new_value - value, new_value
        if abs(improvement) < tol and float(np.max(np.abs(scale * step))) < 1e-8:
            break
    mu = _sigmoid(X @ w)
    covariance = np.linalg.inv(X.T @ (X * (mu * (1 - mu))[:, None]) + penalty)
    return w, covariance


def length_features(len_a, len_b, scale: float | None = None) -> np.ndarray:
    """tanh((len_a − len_b) / scale), the normalised length difference; ``scale`` defaults to the standard deviation
    of the differences (1 when they are all equal)."""
    diff = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    if scale is None:
        scale = float(diff.std()) if len(diff) > 1 and diff.std() > 0 else 1.0
    if not scale > 0:
        raise ValueError(f"length scale must be positive, got {scale!r}")
    return np.tanh(diff / scale)


def length_controlled_win_rate(probs, len_a, len_b, scale: float | None = None, z: float = Z95) -> dict:
    """Length-controlled win rate (Dubois et al. 2024, arXiv 2404.04475, AlpacaEval 2.0): fit
    logit P(a ≻ b) = w₀ + w₁·tanh((len_a − len_b)/scale) to the judge's verdicts (soft probabilities allowed) and
    report σ(w₀), the predicted win rate of a over b had both answers been equally long, with the 95% interval
    σ(w₀ ± z·se(w₀)). ``lc_length_coef`` = w₁: how much the judge's preference follows length (> 0: longer wins).
    Lengths are in characters (what the judge reads, whatever the tokenizers)."""
    p = np.asarray(probs, dtype=float)
    x = length_features(len_a, len_b, scale)
    if len(p) == 0 or len(p) != len(x):
        raise ValueError(f"length_controlled_win_rate: {len(p)} verdicts for {len(x)} length pairs")
    w, covariance = fit_logistic(np.stack([np.ones_like(x), x], 1), p, LC_PRIOR_PRECISION)
    se = math.sqrt(covariance[0, 0])
    return {"lc_win_rate": float(_sigmoid(w[0])), "lc_win_rate_low": float(_sigmoid(w[0] - z * se)),
            "lc_win_rate_high": float(_sigmoid(w[0] + z * se)), "lc_length_coef": float(w[1])}


def compare_answers(probs: list[float | None], answers_a: list[str], answers_b: list[str], name: str) -> dict:
    """Win rate with interval and LC win rate of a over b from the verdicts (None = dropped, left out), under
    ``win_rate_{name}``, ``lc_win_rate_{name}`` (each with ``_low``/``_high``) and ``lc_length_coef``."""
    kept = [i for i, p in enumerate(probs) if p is not None]
    if not kept:
        return {}
    judged = [probs[i] for i in kept]
    mean, low, high = win_rate_interval(judged)
    lc = length_controlled_win_rate(judged, [len(answers_a[i]) for i in kept], [len(answers_b[i]) for i in kept])
    return {f"win_rate_{name}": mean, f"win_rate_{name}_low": low, f"win_rate_{name}_high": high,
            f"lc_win_rate_{name}": lc["lc_win_rate"], f"lc_win_rate_{name}_low": lc["lc_win_rate_low"],
            f"lc_win_rate_{name}_high": lc["lc_win_rate_high"], "lc_length_coef": lc["lc_length_coef"]}


def feature_game_metrics(M: np.ndarray, policy_classes, ref_classes, kl_terms, tau: float,
                         bootstrap: int = 1000, seed: int = 0) -> dict:
    """Exact exploitability of an LLM policy under a judge whose preference depends only on a discrete feature of
    the response (classes 0..C−1, ``M[c, c'] = P(class c ≻ class c')``).

    With q the policy's class distribution (from ``policy_classes``, one per held-out answer) and r π_ref's (from
    ``ref_classes``, the initial policy's answers), a best response against π picks the best class:

        exploitability              = max_c (Mq)_c − ½
        regularized_exploitability  = τ·log Σ_c r_c·exp((Mq)_c/τ) + τ·KL(π‖π_ref) − ½

    (the best response of the τ-regularised game is π_ref reweighted by class), with KL(π‖π_ref) the mean of
    ``kl_terms`` = log π(y) − log π_ref(y) over the same answers (None: the regularised figure is left out). Also
    q, r, and the class distribution q* of the regularised Nash of M (r smoothed by ½ a count per class, so that
    log r is finite). 95% intervals: percentile bootstrap over the answers (policy answers with their KL terms, and
    the initial answers, resampled independently)."""
    classes = M.shape[0]
    policy_classes, ref_classes = np.asarray(policy_classes), np.asarray(ref_classes)
    kl_terms = None if kl_terms is None else np.asarray(kl_terms, dtype=float)

    def dist(c):
        return np.bincount(c, minlength=classes) / max(len(c), 1)

    def figures(pi_idx, ref_idx):
        q, r = dist(policy_classes[pi_idx]), dist(ref_classes[ref_idx])
        out = {"feature_exploitability": float((M @ q).max() - 0.5)}
        if kl_terms is not None:
            out["feature_regularized_exploitability"] = float(
                tau * logsumexp((M @ q) / tau, b=r) + tau * kl_terms[pi_idx].mean() - 0.5)
        return out

    n, m = len(policy_classes), len(ref_classes)
    point = figures(np.arange(n), np.arange(m))
    rng = np.random.default_rng(seed)
    draws = [figures(rng.integers(0, n, n), rng.integers(0, m, m)) for _ in range(bootstrap)]
    for key in list(point):
        values = [d[key] for d in draws]
        point[f"{key}_low"], point[f"{key}_high"] = (float(np.percentile(values, 2.5)),
                                                     float(np.percentile(values, 97.5)))
    smoothed = (np.bincount(ref_classes, minlength=classes) + 0.5) / (m + 0.5 * classes)
    point.update(feature_class_distribution=dist(policy_classes).tolist(),
                 feature_ref_class_distribution=dist(ref_classes).tolist(),
                 feature_regularized_nash=games.regularized_nash(M, smoothed, tau).tolist(), feature_tau=tau)
    return point


def declared_feature_game(oracle_cfg):
    """The rule oracle of ``oracle_cfg`` when it declares a matrix game over a discrete feature of the response
    (``feature`` and ``feature_game``), else None."""
    if oracle_cfg is None or oracle_cfg.kind != "rule":
        return None
    rule = build_rule(oracle_cfg.rule, oracle_cfg.options)
    return rule if hasattr(rule, "feature_game") else None


# ------------------------------------------------------------------------------------------ campaign rounds

def _plain_sampling(cfg) -> bool:
    sampling = cfg.generators.sampling
    return sampling.temperature == 1.0 and sampling.top_p == 1.0


def ensure_baseline(cfg: CampaignConfig, run: RunDir, eval_prompts: list, roles: Roles) -> None:
    """The initial policy's answers to the held-out prompts, generated once before the first update, with their
    log π_ref scored by the learner (whose forward keeps only the response positions' logits; vLLM's prompt
    log-probs compute the LM head at every prompt token, minutes for 64 answers on 2 cores)."""
    path, info_path = run.baseline_path, run.baseline_info_path
    if path.exists() or cfg.generators.engine == "tabular" or not eval_prompts or not cfg.evaluation.prompts:
        return
    prompts = [p.as_dict() for p in eval_prompts[:cfg.evaluation.prompts]]
    baseline = generate(roles, prompts, 1, "policy", seed=round_seed(cfg, 0, "baseline"))
    scored = [s for s in baseline if s["response_ids"]]
    ref = dict(zip(((s["prompt_id"]) for s in scored), _learner_logprobs(roles, scored).reference))
    for sample in baseline:
        sample["ref_logprob"] = ref.get(sample["prompt_id"])
    atomic_write_json(info_path, {"model_path": cfg.model.path, "plain_sampling": _plain_sampling(cfg),
                                  "sampling": cfg.generators.sampling.model_dump(), "prompts": len(baseline)})
    write_table(path, baseline)


def _learner_logprobs(roles: Roles, samples: list[dict]) -> SequenceLogprobs:
    """log π_θ(y | x) and log π_ref(y | x) of each sample (``.policy``, ``.reference``), from the learner, which holds
    both with the same numerics."""
    if not samples:
        return SequenceLogprobs(policy=[], reference=[])
    return roles.learner.sequence_logprobs([s["prompt_ids"] for s in samples], [s["response_ids"] for s in samples])


def _eval_judges(cfg: CampaignConfig, run: RunDir, roles: Roles) -> ActorPool:
    """The judges of the evaluation: the campaign's own, or, when ``evaluation.oracle`` is set, one judge actor of
    that oracle, started on first use and kept on ``roles`` (as ``eval_judges``) for the campaign."""
    if cfg.evaluation.oracle is None:
        return roles.judges
    pool = roles.eval_judges
    if pool is None:
        judge_cls = ray.remote(JudgeActor).options(**actor_options(cfg.judges.resources))
        pool = ActorPool("eval judge", lambda rank: judge_cls.remote(cfg.evaluation.oracle, str(run.judge_cache),
                                                                     cfg.judges.retries, cfg.data.game,
                                                                     seed=cfg.seed + 7919 + rank),
                         1, cfg.judges.on_failure, cfg.judges.max_restarts, cfg.judges.timeout_s)
        roles.eval_judges = pool
    return pool


def evaluate_round(cfg: CampaignConfig, run: RunDir, roles: Roles, push) -> dict:
    """The policy of ``push`` (version t + 1, trained by round t) against the initial policy's baseline answers."""
    if cfg.generators.engine == "tabular":
        return _evaluate_tabular(cfg, run, push)
    path, info_path = run.baseline_path, run.baseline_info_path
    if not path.exists():
        return {}
    start = time.perf_counter()
    baseline = read_table(path)
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    current = generate(roles, [{k: b[k] for k in ("prompt_id", "prompt", "messages") if k in b} for b in baseline], 1,
                       "policy", seed=round_seed(cfg, push.version, "evaluation"))
    by_id = {s["prompt_id"]: s for s in current}
    answers = [by_id[b["prompt_id"]] for b in baseline]
    comparisons = [{"prompt": b["prompt"], "a": s["response"], "b": b["response"]} for b, s in zip(baseline, answers)]
    verdicts = judge(_eval_judges(cfg, run, roles), comparisons, batch_size=cfg.judges.batch_size,
                     what="eval judgements")
    probs = [v["prob"] for v in verdicts]

    out = {"eval_comparisons": len(verdicts), "eval_judge_dropped": sum(p is None for p in probs),
           "eval_mean_response_tokens": float(np.mean([len(s["response_ids"]) for s in answers])),
           "eval_initial_mean_response_tokens": float(np.mean([len(b["response_ids"]) for b in baseline]))}
    out.update(compare_answers(probs, [s["response"] for s in answers], [b["response"] for b in baseline],
                               "vs_initial"))
    if info.get("model_path") == cfg.model.path and "win_rate_vs_initial" in out:
        out.update({key.replace("vs_initial", "vs_ref"): value for key, value in out.items()
                    if "win_rate_vs_initial" in key})

    scored = [b for b in baseline if b.get("ref_logprob") is not None]
    # One learner call scores π_θ's fresh answers (both log-probs) and π_ref's baseline answers (π_θ's log-prob).
    kl_answers = answers if info.get("plain_sampling") else []
    both = _learner_logprobs(roles, kl_answers + scored)
    policy_logprobs = both.policy[len(kl_answers):]
    if scored and info.get("plain_sampling"):
        out["eval_kl_ref_to_policy"] = float(np.mean([b["ref_logprob"] - lp
                                                      for b, lp in zip(scored, policy_logprobs)]))
    kl_terms = None
    if kl_answers:
        # KL(π_θ ‖ π_ref), the divergence the algorithms regularise, over π_θ's own fresh answers.
        kl_terms = np.subtract(both.policy[:len(kl_answers)], both.reference[:len(kl_answers)])
        out["eval_kl_policy_to_ref"] = float(np.mean(kl_terms))
    feature_rule = declared_feature_game(cfg.evaluation.oracle or cfg.judges.oracle)
    if feature_rule is not None:
        classes = [feature_rule.feature(s["response"]) for s in answers]
        ref_classes = [feature_rule.feature(b["response"]) for b in baseline]
        out.update(feature_game_metrics(feature_rule.feature_game(), classes, ref_classes, kl_terms,
                                        getattr(cfg.algorithm, "tau", 0.1), seed=cfg.seed))
    policy_of = {b["prompt_id"]: lp for b, lp in zip(scored, policy_logprobs)}
    rows = [{"prompt_id": b["prompt_id"], "prompt": b["prompt"], "prompt_ids": s["prompt_ids"],
             "response": s["response"], "response_ids": s["response_ids"],
             "response_tokens": len(s["response_ids"]), "initial_response": b["response"],
             "initial_response_tokens": len(b["response_ids"]), "prob": v["prob"], "reason": v["reason"],
             "initial_ref_logprob": b.get("ref_logprob"), "initial_policy_logprob": policy_of.get(b["prompt_id"])}
            for b, s, v in zip(baseline, answers, verdicts)]
    # the push of round t carries version t + 1 (one version per round, from 0)
    write_table(run.eval_path(push.version - 1), rows)
    out["eval_s"] = time.perf_counter() - start
    return out


def _evaluate_tabular(cfg: CampaignConfig, run: RunDir, push) -> dict:
    game = games.load_game(cfg.data.game)
    logits = push_state_dict(push)["logits"].double().numpy()
    pi = np.exp(logits - logits.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    tau = getattr(cfg.algorithm, "tau", 0.1)
    out = {
        "exploitability": games.exploitability(game.P, pi),
        "regularized_exploitability": games.regularized_exploitability(game.P, game.pi_ref, pi, tau),
        "win_rate_vs_ref": games.win_rate(game.P, pi, game.pi_ref),
        "tau": tau,
    }
    # the push of round t carries version t + 1 (one version per round, from 0)
    average = running_average_policy(run, push.version - 1, game.prompts, pi)
    if average is not None:
        out["avg_exploitability"] = games.exploitability(game.P, average)
        out["avg_regularized_exploitability"] = games.regularized_exploitability(game.P, game.pi_ref, average, tau)
    policy = {name: p.tolist() for name, p in zip(game.prompts, pi)}
    atomic_write_json(run.policy_path, policy)
    return out


def running_average_policy(run: RunDir, t: int, prompts: list[str], pi: np.ndarray) -> np.ndarray | None:
    """(π_1 + … + π_{t+1}) / (t + 1) per prompt, with ``pi`` = π_{t+1}, the policy round t trained. Kept in
    ``rounds/t/average_policy.json`` and continued from round t−1's file, so a resumed campaign (whose earlier
    round directories persist) carries it on, and a replayed round rewrites its own. None, and nothing written,
    when round t−1 has no such file: its evaluation was skipped (``evaluation.every_rounds`` > 1), and the average
    would leave out a round."""
    if t == 0:
        average = pi
    else:
        previous = run.average_policy_path(t - 1)
        if not previous.is_file():
            return None
        saved = json.loads(previous.read_text())
        before = np.array([saved["policy"][name] for name in prompts], dtype=np.float64)
        average = before + (pi - before) / (t + 1)
    atomic_write_json(run.average_policy_path(t),
                      {"rounds": t + 1, "policy": {name: p.tolist() for name, p in zip(prompts, average)}})
    return average


# ------------------------------------------------------------------------------------------ head to head

def checkpoint_or_model(path: str) -> str:
    """A model for ``nashray eval``: a run directory stands for its newest checkpoint (state.json's); anything else
    (a checkpoint folder, an HF folder or id, ``smollm2-135m-instruct``) is passed through."""
    folder = Path(path).expanduser()
    if RunDir(folder).state_path.is_file():
        checkpoint = newest_checkpoint(RunDir(folder).checkpoints_root)
        if checkpoint is None:
            raise ValueError(f"run directory {folder} has no checkpoint yet (no round checkpointed)")
        return str(checkpoint)
    return path


def _generate_with(config: CampaignConfig, prompts: list[dict], seed: int) -> list[dict]:
    """One answer per prompt from the model of ``config``, generated in this process."""
    return GeneratorActor(config).generate(prompts, 1, "policy", seed=seed)


def head_to_head(model_a: str, model_b: str, prompts: list[dict], oracle: dict, engine: str = "hf",
                 sampling: dict | None = None, dtype: str = "float32", max_prompt_tokens: int = 256,
                 seed: int = 0, judge_retries: int = 2) -> dict:
    """Each model answers every prompt once (same sampling settings and seed), the oracle judges P(a ≻ b) for each
    prompt, and the result is model A's win rate over model B with its interval and the length-controlled win rate
    (:func:`compare_answers`), plus every answer and verdict under ``rows``."""
    if engine not in ("hf", "vllm"):
        raise ValueError(f"engine must be 'hf' or 'vllm', got {engine!r}")
    if not prompts:
        raise ValueError("head_to_head needs at least one prompt")
    answers, weights = {}, {}
    for side, path in (("a", model_a), ("b", model_b)):
        weights[side] = checkpoint_or_model(path)
        config = CampaignConfig.model_validate({
            "seed": seed, "model": {"path": weights[side], "dtype": dtype, "max_prompt_tokens": max_prompt_tokens},
            "generators": {"engine": engine, "sampling": sampling or {}}})
        if engine == "hf":
            answers[side] = _generate_with(config, prompts, seed)
        else:  # a vLLM engine does not give its memory back inside a process: one child process per model
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                answers[side] = pool.submit(_generate_with, config, prompts, seed).result()
    judge_actor = JudgeActor(parse_oracle_config(oracle), None, judge_retries)
    verdicts = judge_actor.judge([{"prompt": p["prompt"], "a": a["response"], "b": b["response"]}
                            for p, a, b in zip(prompts, answers["a"], answers["b"])])
    probs = [v["prob"] for v in verdicts]
    texts_a, texts_b = [s["response"] for s in answers["a"]], [s["response"] for s in answers["b"]]
    result = {"model_a": model_a, "model_b": model_b, "weights_a": weights["a"], "weights_b": weights["b"],
              "oracle": judge_actor.oracle.oracle_id, "engine": engine,
              "sampling": config.generators.sampling.model_dump(),
              "dtype": dtype, "seed": seed, "prompts": len(prompts),
              "dropped": sum(p is None for p in probs),
              "mean_response_tokens_a": float(np.mean([len(s["response_ids"]) for s in answers["a"]])),
              "mean_response_tokens_b": float(np.mean([len(s["response_ids"]) for s in answers["b"]])),
              **compare_answers(probs, texts_a, texts_b, "a_vs_b")}
    result["rows"] = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "response_a": a, "response_b": b,
                       "prob": v["prob"], "reason": v["reason"]}
                      for p, a, b, v in zip(prompts, texts_a, texts_b, verdicts)]
    return result
