"""The tabular policy (one softmax per prompt over the game's actions) and the exact-check harness.

:class:`TabularPolicy` is the model the distributed pipeline trains when ``generators.engine`` is ``tabular``: a
plain ``nn.Module`` whose state dict is ``{"logits": [n_prompts, A]}``, with the same per-sequence log-prob interface
as a causal LM (``prompt_ids[i][0]`` = prompt index, ``response_ids[i][0]`` = action).

:func:`train_tabular` runs an algorithm in-process on a game with the SAME sample records, pair plans, training
records and losses as the LLM path (``nashray.trainers.algorithms``), judged by a Bernoulli :class:`MatrixOracle`, and
minimises each round's mean loss over the logits to convergence, so the result can be compared with the
population update and with the equilibria of ``nashray.oracles.games``.
"""

from __future__ import annotations

import gc
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from nashray.oracles.games import Game, MatrixOracle, exploitability, regularized_exploitability, win_rate
from nashray.trainers.algorithms import Algorithm, get_algorithm
from nashray.trainers.pairs import plan_comparisons


class TabularPolicy(torch.nn.Module):
    """π(a | prompt p) = softmax(logits[p])[a], float64. Initialised from ``probs`` [n_prompts, A] (e.g. π_ref)."""

    def __init__(self, probs):
        super().__init__()
        probs = torch.as_tensor(np.asarray(probs, dtype=np.float64))
        if probs.ndim != 2 or probs.shape[1] < 2:
            raise ValueError(f"TabularPolicy needs probabilities of shape [n_prompts, A >= 2], "
                             f"got {tuple(probs.shape)}")
        if not torch.all(probs > 0):
            raise ValueError("TabularPolicy needs strictly positive initial probabilities (log of 0 is -inf)")
        self.logits = torch.nn.Parameter(torch.log(probs / probs.sum(-1, keepdim=True)))

    @classmethod
    def from_game(cls, game: Game) -> "TabularPolicy":
        return cls(game.pi_ref)

    @property
    def n_prompts(self) -> int:
        return self.logits.shape[0]

    @property
    def n_actions(self) -> int:
        return self.logits.shape[1]

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, -1)

    def logprobs_at(self, prompt_index: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log π(action | prompt) for index tensors of equal shape."""
        return self.log_probs()[prompt_index, action]

    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """log π(y | x) per row, [B]: the causal-LM interface, one token = one action."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            if len(p) != 1 or not 0 <= p[0] < self.n_prompts:
                raise ValueError(f"row {row}: prompt_ids {list(p)} must be [prompt index in 0..{self.n_prompts - 1}]")
            if len(r) != 1 or not 0 <= r[0] < self.n_actions:
                raise ValueError(f"row {row}: response_ids {list(r)} must be [action in 0..{self.n_actions - 1}]")
        device = self.logits.device
        return self.logprobs_at(torch.tensor([p[0] for p in prompt_ids], device=device),
                                torch.tensor([r[0] for r in response_ids], device=device))

    @torch.no_grad()
    def sample(self, prompt_index: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n actions drawn i.i.d. from π(· | prompt), [n] long."""
        return torch.multinomial(self.probs()[prompt_index], n, replacement=True, generator=generator)

    @torch.no_grad()
    def mixture_probs(self, pi_ref, beta: float) -> torch.Tensor:
        """The geometric mixture π^{1−β}·π_ref^{β}/Z per prompt (Nash-MD's opponent), [n_prompts, A]."""
        log_ref = torch.log(torch.as_tensor(np.asarray(pi_ref), dtype=self.logits.dtype, device=self.logits.device))
        return torch.softmax((1 - beta) * self.log_probs() + beta * log_ref, -1)


# ------------------------------------------------------------------------------------------------ harness

@dataclass
class TabularHistory:
    """Per iteration t = 1..T: the last iterate π_t, the running average (π_1 + ... + π_t)/t, and their measures
    (``tau`` is the regularisation of ``regularized_exploitability``). ``records[t]``: training records of round t."""
    game: Game
    tau: float
    policies: list[np.ndarray] = field(default_factory=list)
    averages: list[np.ndarray] = field(default_factory=list)
    exploitability: list[float] = field(default_factory=list)
    average_exploitability: list[float] = field(default_factory=list)
    regularized_exploitability: list[float] = field(default_factory=list)
    win_rate_vs_ref: list[float] = field(default_factory=list)
    records: list[int] = field(default_factory=list)

    def append(self, pi: np.ndarray, n_records: int) -> None:
        P, ref = self.game.P, self.game.pi_ref
        average = pi if not self.averages else self.averages[-1] + (pi - self.averages[-1]) / (len(self.averages) + 1)
        self.policies.append(pi)
        self.averages.append(average)
        self.exploitability.append(exploitability(P, pi))
        self.average_exploitability.append(exploitability(P, average))
        self.regularized_exploitability.append(regularized_exploitability(P, ref, pi, self.tau))
        self.win_rate_vs_ref.append(win_rate(P, pi, ref))
        self.records.append(n_records)


def _samples(game: Game, p: int, actions: list[int], log_probs: list[float], version: int, source: str,
             indices: list[int]) -> list[dict]:
    name = game.prompts[p]
    return [{"prompt_id": name, "prompt": name, "prompt_ids": [p], "response": str(a), "response_ids": [a],
             "logprob": lp, "version": version, "source": source, "sample_index": i}
            for a, lp, i in zip(actions, log_probs, indices)]


def _round_records(algorithm: Algorithm, cfg, game: Game, policy: TabularPolicy, oracle: MatrixOracle,
                   generator: torch.Generator, rng: np.random.Generator, version: int, groups: int, k: int,
                   strategy: str) -> list[dict]:
    """One round as the distributed driver runs it: per prompt, ``groups`` independent sets of K samples from π_t
    (plus π_ref / mixture samples), the algorithm's comparisons judged in one oracle call, records per set."""
    with torch.no_grad():
        log_pi = policy.log_probs()
        log_ref = torch.log(torch.as_tensor(game.pi_ref))
        log_mix = (torch.log(policy.mixture_probs(game.pi_ref, cfg.beta)) if algorithm.mixture_samples else None)
    sets, judge_rows = [], []
    for p in range(game.P.shape[0]):
        actions = policy.sample(p, groups * k, generator).view(groups, k)
        if algorithm.ref_samples:
            ref_actions = torch.multinomial(log_ref[p].exp(), groups * algorithm.ref_samples, replacement=True,
                                            generator=generator).view(groups, -1)
        if algorithm.mixture_samples:
            mix_actions = torch.multinomial(log_mix[p].exp(), groups * k * algorithm.mixture_samples,
                                            replacement=True, generator=generator).view(groups, k, -1)
        for g in range(groups):
            a = actions[g].tolist()
            samples = _samples(game, p, a, log_pi[p, a].tolist(), version, "policy", list(range(k)))
            if algorithm.ref_samples:
                x = ref_actions[g].tolist()
                samples += _samples(game, p, x, log_ref[p, x].tolist(), version, "ref", list(range(len(x))))
            if algorithm.mixture_samples:
                m = mix_actions[g].reshape(-1).tolist()
                owner = [i for i in range(k) for _ in range(algorithm.mixture_samples)]
                samples += _samples(game, p, m, log_mix[p, m].tolist(), version, "mixture", owner)
            plan = algorithm.plan(samples, strategy, None, rng)
            sets.append((samples, plan))
            judge_rows += [(p, samples[i]["response_ids"][0], samples[j]["response_ids"][0]) for i, j in plan]
    # the oracle's vectorised path: the same Bernoulli verdicts as compare(), without 10^4 Comparison objects
    verdicts = oracle.judge(*np.array(judge_rows, dtype=np.int64).reshape(-1, 3).T).tolist()
    records, start = [], 0
    for samples, plan in sets:
        judged = dict(zip(plan, verdicts[start:start + len(plan)]))
        start += len(plan)
        records += algorithm.build_records(samples, judged, cfg)
    return records


def _weighted_batch(records: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Records as tensors with identical rows merged into weights (the weighted mean equals the plain mean)."""
    counts = Counter((r["prompt_ids"][0], r["a_ids"][0], r["b_ids"][0] if r["b_ids"] else -1,
                      r["x_ids"][0] if r["x_ids"] else -1, r["target"], r["a_score"], r["b_score"]) for r in records)
    columns = torch.tensor(list(counts), dtype=torch.float64)
    batch = {"prompt": columns[:, 0].long(), "a": columns[:, 1].long(), "b": columns[:, 2].long(),
             "x": columns[:, 3].long(), "target": columns[:, 4], "a_score": columns[:, 5], "b_score": columns[:, 6]}
    return batch, torch.tensor(list(counts.values()), dtype=torch.float64)


@contextmanager
def _one_thread():
    """Tabular tensors have a few thousand entries: intra-op threads only add barriers, which stall for
    milliseconds per op when the machine's other cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _without_gc():
    """A round allocates ~10^5 small acyclic dicts and lists; the generational collector's passes over the ~10^5
    objects torch keeps alive would otherwise cost more than the round itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _log_probs(algorithm: Algorithm, batch, theta: torch.Tensor, log_t: torch.Tensor, log_ref: torch.Tensor):
    """The learner's log-prob dict for the sequences the algorithm trains on."""
    lp = {}
    for seq in algorithm.sequences:
        idx = (batch["prompt"], batch[seq])
        lp[f"theta_{seq}"] = theta[idx]
        if algorithm.needs_pi_t:
            lp[f"t_{seq}"] = log_t[idx]
        if algorithm.needs_ref:
            lp[f"ref_{seq}"] = log_ref[idx]
    return lp


def _minimise(algorithm: Algorithm, cfg, policy: TabularPolicy, batch, weights, log_ref, max_iter: int) -> None:
    """Minimise the round's mean loss over the logits from π_t (L-BFGS, strong Wolfe line search)."""
    log_t = policy.log_probs().detach()
    optimizer = torch.optim.LBFGS([policy.logits], lr=1.0, max_iter=max_iter, tolerance_grad=1e-11,
                                  tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        lp = _log_probs(algorithm, batch, policy.log_probs(), log_t, log_ref)
        loss = (algorithm.loss(lp, batch, cfg) * weights).sum() / weights.sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    if not torch.isfinite(policy.logits).all():
        raise RuntimeError(f"{algorithm.name}: the round's loss diverged (non-finite logits)")


@_one_thread()
def train_tabular(algorithm_cfg, game: Game, iterations: int, pairs_per_iteration: int = 10_000,
                  samples_per_group: int = 8, strategy: str = "all_pairs", seed: int = 0, tau: float | None = None,
                  nash_md_lr: float = 1.0, lbfgs_max_iter: int = 500) -> TabularHistory:
    """Run ``algorithm_cfg`` (a ``nashray.cluster.config`` algorithm) on ``game`` for ``iterations`` rounds from π_ref.

    Each round draws per prompt ⌈pairs_per_iteration / pairs per set⌉ sets of ``samples_per_group`` samples from π_t
    (an LLM round's many prompts, each with K samples), so about ``pairs_per_iteration`` comparisons are judged
    (Bernoulli draws of P); the algorithm plans, builds records and its loss is minimised over the logits from π_t
    to convergence. Nash-MD is a policy gradient: each round is one SGD step (``nash_md_lr``) on its surrogate with
    ``pairs_per_iteration`` fresh policy samples against fresh samples of the recomputed mixture.

    ``tau`` (default: the config's τ, else 0.1) is the regularisation of the recorded regularised exploitability."""
    algorithm = get_algorithm(algorithm_cfg.name)
    if algorithm.name == "xpo" and algorithm_cfg.alpha > 0:
        raise ValueError("xpo: α·log π(x) is unbounded below over free tabular logits (π(x) → 0), so a round has no "
                         "minimiser to converge to; XPO's analysis assumes a policy class with bounded log-ratios")
    tau = tau if tau is not None else getattr(algorithm_cfg, "tau", 0.1)
    policy = TabularPolicy.from_game(game)
    oracle = MatrixOracle(game, sample=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    log_ref = torch.log(torch.as_tensor(game.pi_ref))
    if algorithm.mixture_samples:
        groups, k = 1, pairs_per_iteration
        optimizer = torch.optim.SGD([policy.logits], lr=nash_md_lr)
    else:
        per_group = len(plan_comparisons(samples_per_group, strategy))
        if per_group == 0:
            raise ValueError(f"strategy {strategy!r} plans no comparisons among {samples_per_group} samples")
        groups, k = math.ceil(pairs_per_iteration / per_group), samples_per_group
    history = TabularHistory(game, tau)
    for version in range(iterations):
        with _without_gc():
            records = _round_records(algorithm, algorithm_cfg, game, policy, oracle, generator, rng, version, groups,
                                     k, strategy)
            batch, weights = _weighted_batch(records) if records else (None, None)
        if records:
            if algorithm.mixture_samples:
                optimizer.zero_grad()
                log_pi = policy.log_probs()
                lp = _log_probs(algorithm, batch, log_pi, log_pi.detach(), log_ref)
                ((algorithm.loss(lp, batch, algorithm_cfg) * weights).sum() / weights.sum()).backward()
                optimizer.step()
            else:
                _minimise(algorithm, algorithm_cfg, policy, batch, weights, log_ref, lbfgs_max_iter)
        history.append(policy.probs().detach().numpy().copy(), len(records))
    return history
