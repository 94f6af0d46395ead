"""Tabular preference games, the matrix oracle that judges them, and the project's own reference solvers.

A game gives, per prompt, a preference matrix P[i, j] = P(action i ≻ action j) with P + Pᵀ = 1, and a reference
policy π_ref. Responses are actions, written as ``str(action)``. The solvers are the ground truth the tabular runs are
checked against: the unregularised Nash equilibrium (a linear program), the τ-regularised Nash equilibrium
π* ∝ π_ref·exp(Pπ*/τ), and the (regularised) exploitability of a policy.

Every solver takes one prompt (P [A, A], policies [A]) or a batch of prompts (P [n, A, A], policies [n, A]); the
batched scalar measures are the mean over prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linprog
from scipy.special import expit, logsumexp

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict

_SKEW_TOLERANCE = 1e-9


@dataclass
class Game:
    """``P[p, i, j]`` = P(i ≻ j | prompt p); ``pi_ref[p]`` = the reference policy of prompt p."""
    prompts: list[str]
    P: np.ndarray
    pi_ref: np.ndarray

    def __post_init__(self):
        self.P = np.asarray(self.P, dtype=np.float64)
        self.pi_ref = np.asarray(self.pi_ref, dtype=np.float64)
        self.prompts = list(self.prompts)
        validate_game(self.prompts, self.P, self.pi_ref)

    @property
    def n_actions(self) -> int:
        return self.P.shape[-1]

    def index(self, prompt: str) -> int:
        return self.prompts.index(prompt)


def validate_game(prompts: list[str], P: np.ndarray, pi_ref: np.ndarray, source: str = "game") -> None:
    """Raise ValueError naming the prompt, field and entry that make this not a preference game."""
    if len(prompts) == 0:
        raise ValueError(f"{source}: no prompts")
    if len(set(prompts)) != len(prompts):
        raise ValueError(f"{source}: duplicate prompt names {sorted({p for p in prompts if prompts.count(p) > 1})}")
    if P.ndim != 3 or P.shape[0] != len(prompts) or P.shape[1] != P.shape[2] or P.shape[1] < 2:
        raise ValueError(f"{source}: P must have shape [n_prompts={len(prompts)}, A, A] with A >= 2, got {P.shape}")
    if pi_ref.shape != P.shape[:2]:
        raise ValueError(f"{source}: pi_ref must have shape {P.shape[:2]}, got {pi_ref.shape}")
    for p, name in enumerate(prompts):
        where = f"{source}: prompt {name!r}"
        if not np.all(np.isfinite(P[p])):
            i, j = np.argwhere(~np.isfinite(P[p]))[0]
            raise ValueError(f"{where}: P[{i}][{j}] = {P[p, i, j]} is not finite")
        if np.any((P[p] < 0) | (P[p] > 1)):
            i, j = np.argwhere((P[p] < 0) | (P[p] > 1))[0]
            raise ValueError(f"{where}: P[{i}][{j}] = {P[p, i, j]} is outside [0, 1]")
        skew = np.abs(P[p] + P[p].T - 1)
        if skew.max() > _SKEW_TOLERANCE:
            i, j = np.unravel_index(np.argmax(skew), skew.shape)
            raise ValueError(f"{where}: P[{i}][{j}] + P[{j}][{i}] = {float(P[p, i, j] + P[p, j, i])!r}, must be 1 "
                             f"(P(i ≻ j) + P(j ≻ i) = 1)")
        if not np.all(np.isfinite(pi_ref[p])) or np.any(pi_ref[p] <= 0):
            raise ValueError(f"{where}: pi_ref must be positive and finite, got {pi_ref[p].tolist()}")
        if abs(pi_ref[p].sum() - 1) > 1e-6:
            raise ValueError(f"{where}: pi_ref sums to {float(pi_ref[p].sum())!r}, must sum to 1")


# ---------------------------------------------------------------------------------------------- builtins

def _rps_game() -> Game:
    """Rock-paper-scissors: the winner of a non-tie pair wins with probability 0.9. π_ref favours rock."""
    win = 0.9
    P = np.full((3, 3), 0.5)
    for winner, loser in ((0, 2), (2, 1), (1, 0)):  # rock ≻ scissors, scissors ≻ paper, paper ≻ rock
        P[winner, loser], P[loser, winner] = win, 1 - win
    return Game(["rps"], P[None], np.array([[0.5, 0.3, 0.2]]))


def _random10_game() -> Game:
    """A random skew-symmetric 10-action game (seed 10): off-diagonal P(i ≻ j) − ½ uniform in ±0.4. INPO's exact step
    (η = 1, τ = 0.1) contracts at π* with linearised factor max|1 − ητ + iηω| ≈ 0.91, so 40 rounds suffice."""
    rng = np.random.default_rng(10)
    n = 10
    upper = np.triu(rng.uniform(-0.4, 0.4, size=(n, n)), 1)
    P = 0.5 + upper - upper.T
    pi_ref = rng.dirichlet(np.full(n, 2.0))
    return Game(["random10"], P[None], pi_ref[None])


def _bt_game() -> Game:
    """A Bradley-Terry game P(i ≻ j) = σ(r_i − r_j), r = (0, 0.5, 1, 1.5, 2): transitive, the Nash is action 4.
    π_ref puts the least mass on the best action."""
    r = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    P = expit(r[:, None] - r[None, :])
    return Game(["bt"], P[None], np.array([[0.3, 0.25, 0.2, 0.15, 0.1]]))


BUILTIN_GAMES = {"rps": _rps_game, "random10": _random10_game, "bt": _bt_game}


def load_game(spec: str) -> Game:
    """``builtin:rps`` | ``builtin:random10`` | ``builtin:bt`` or a JSON file
    ``{"prompts": {"name": {"P": [[...]], "pi_ref": [...]}, ...}}``."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_GAMES:
            raise ValueError(f"unknown builtin game {name!r}; expected one of {sorted(BUILTIN_GAMES)}")
        return BUILTIN_GAMES[name]()
    path = Path(spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"game file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"game file {path} is not valid JSON: {err}") from None
    return game_from_json(data, source=f"game file {path}")


def game_from_json(data, source: str = "game JSON") -> Game:
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), dict) or not data["prompts"]:
        raise ValueError(f"{source}: expected an object with a non-empty 'prompts' mapping of name -> "
                         f"{{'P': [[...]], 'pi_ref': [...]}}")
    names, matrices, refs = [], [], []
    for name, entry in data["prompts"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: prompt {name!r} must be an object with fields 'P' and 'pi_ref'")
        for field in ("P", "pi_ref"):
            if field not in entry:
                raise ValueError(f"{source}: prompt {name!r} has no field {field!r}")
        unknown = sorted(set(entry) - {"P", "pi_ref"})
        if unknown:
            raise ValueError(f"{source}: prompt {name!r} has unknown fields {unknown}")
        try:
            P = np.array(entry["P"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: prompt {name!r} field 'P' must be a square matrix of numbers") from None
        try:
            pi_ref = np.array(entry["pi_ref"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: prompt {name!r} field 'pi_ref' must be a list of numbers") from None
        if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
            raise ValueError(f"{source}: prompt {name!r} field 'P' must be a square matrix with at least 2 actions, "
                             f"got shape {P.shape}")
        if pi_ref.shape != (P.shape[0],):
            raise ValueError(f"{source}: prompt {name!r} field 'pi_ref' must have {P.shape[0]} entries (one per "
                             f"action of P), got shape {pi_ref.shape}")
        if matrices and P.shape != matrices[0].shape:
            raise ValueError(f"{source}: prompt {name!r} field 'P' has {P.shape[0]} actions but prompt {names[0]!r} "
                             f"has {matrices[0].shape[0]}: every prompt needs the same number of actions")
        names.append(str(name))
        matrices.append(P)
        refs.append(pi_ref)
    P, pi_ref = np.stack(matrices), np.stack(refs)
    validate_game(names, P, pi_ref, source)
    return Game(names, P, pi_ref)


def game_to_json(game: Game) -> dict:
    return {"prompts": {name: {"P": game.P[p].tolist(), "pi_ref": game.pi_ref[p].tolist()}
                        for p, name in enumerate(game.prompts)}}


# ------------------------------------------------------------------------------------------------ oracle

class MatrixOracle(PreferenceOracle):
    """Judges tabular responses (``str(action)``) with the game's P: a Bernoulli(P(a ≻ b)) draw when ``sample`` (a
    noisy human), else P(a ≻ b) itself. Unknown prompts and bad actions become dropped verdicts."""

    def __init__(self, game: Game, sample: bool = True, seed: int = 0):
        self.game = game
        self.sample = sample
        self.rng = np.random.default_rng(seed)
        digest = hashlib.sha256(json.dumps(game_to_json(game), sort_keys=True).encode()).hexdigest()[:16]
        self.oracle_id = f"matrix:{'bernoulli' if sample else 'exact'}:{digest}"  # the same game, the same id
        self._prompt_index = {name: p for p, name in enumerate(game.prompts)}
        self._n_actions = game.n_actions

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _action(self, text: str) -> int | None:
        try:
            action = int(text)
        except (TypeError, ValueError):
            return None
        return action if 0 <= action < self._n_actions else None

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(comparisons)
        valid, rows = [], []
        for k, c in enumerate(comparisons):
            p = self._prompt_index.get(c.prompt)
            a, b = self._action(c.a), self._action(c.b)
            if p is None:
                verdicts[k] = Verdict(None, f"unknown prompt {c.prompt!r} (game prompts: {self.game.prompts[:5]})")
            elif a is None or b is None:
                bad = c.a if a is None else c.b
                verdicts[k] = Verdict(None, f"response {bad!r} is not an action in 0..{self.game.n_actions - 1}")
            else:
                valid.append(k)
                rows.append((p, a, b))
        if rows:
            p, a, b = np.array(rows).T
            for k, prob in zip(valid, self.judge(p, a, b).tolist()):
                verdicts[k] = Verdict(prob)
        return verdicts

    def judge(self, prompt_index: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The verdicts of valid index arrays at once (what :meth:`compare` returns, without the string round
        trip): Bernoulli(P[p, a, b]) draws in {0., 1.} when ``sample``, else P[p, a, b]."""
        probs = self.game.P[prompt_index, a, b]
        return (self.rng.random(probs.shape) < probs).astype(np.float64) if self.sample else probs


# ----------------------------------------------------------------------------------------------- solvers

def _batched(P: np.ndarray, *policies: np.ndarray):
    """(P [n, A, A], policies [n, A], was_batched)."""
    P = np.asarray(P, dtype=np.float64)
    batched = P.ndim == 3
    P = P if batched else P[None]
    out = [np.asarray(pi, dtype=np.float64).reshape(P.shape[0], P.shape[-1]) for pi in policies]
    return P, out, batched


def nash_equilibrium(P: np.ndarray) -> np.ndarray:
    """An unregularised (maximin) Nash equilibrium of the symmetric game P, by linear programming:

        maximise v  s.t.  (Pᵀπ)_j = P(π ≻ j) ≥ v for every action j,  Σπ = 1,  π ≥ 0.

    For P + Pᵀ = 1 the value is v = ½. Returns [A] (or [n, A] for a batch of prompts)."""
    P_, _, batched = _batched(P)
    out = []
    for M in P_:
        A = M.shape[0]
        cost = np.zeros(A + 1)
        cost[-1] = -1.0  # minimise −v
        A_ub = np.hstack([-M.T, np.ones((A, 1))])  # v − (Mᵀπ)_j ≤ 0
        A_eq = np.hstack([np.ones((1, A)), np.zeros((1, 1))])
        res = linprog(cost, A_ub=A_ub, b_ub=np.zeros(A), A_eq=A_eq, b_eq=[1.0],
                      bounds=[(0, None)] * A + [(None, None)], method="highs")
        if not res.success:
            raise RuntimeError(f"the Nash LP failed: {res.message}")
        pi = np.clip(res.x[:A], 0, None)
        out.append(pi / pi.sum())
    return np.stack(out) if batched else out[0]


def _fixed_point_residual(M, log_ref, log_pi, tau) -> tuple[np.ndarray, float]:
    target = log_ref + M @ np.exp(log_pi) / tau
    target -= logsumexp(target)
    return target, float(np.abs(np.exp(target) - np.exp(log_pi)).max())


def regularized_nash(P: np.ndarray, pi_ref: np.ndarray, tau: float, tol: float = 1e-12,
                     max_iterations: int = 200_000) -> np.ndarray:
    """The τ-regularised Nash equilibrium: the unique π* with π* ∝ π_ref·exp(Pπ*/τ), i.e. the symmetric equilibrium
    of max_π P(π ≻ π') − τ·KL(π‖π_ref).

    Damped log-space fixed point log π ← (1 − α)·log π + α·(log π_ref + Pπ/τ) (normalised). Only the skew part of P
    moves π (the ½·11ᵀ part is a constant shift), so the linearised map has eigenvalues 1 − α + iαω/τ with |ω| ≤
    ‖P − ½‖₂, and α = τ²/(τ² + ‖P − ½‖₂²) keeps them inside the unit circle. Newton steps on the same
    fixed point take over once the residual is below 1e-3; iterates until max|π − π_ref·exp(Pπ/τ)/Z| < ``tol``."""
    P_, (ref_,), batched = _batched(P, pi_ref)
    out = []
    for M, ref in zip(P_, ref_):
        A = M.shape[0]
        log_ref = np.log(ref)
        skew_norm = np.linalg.norm(M - 0.5, 2)
        alpha = tau ** 2 / (tau ** 2 + skew_norm ** 2)
        log_pi = log_ref.copy()
        for _ in range(max_iterations):
            target, residual = _fixed_point_residual(M, log_ref, log_pi, tau)
            if residual < 1e-3:
                break
            log_pi = (1 - alpha) * log_pi + alpha * target
            log_pi -= logsumexp(log_pi)
        for _ in range(100):
            target, residual = _fixed_point_residual(M, log_ref, log_pi, tau)
            if residual < tol:
                break
            # F(l) = l − log_softmax(log_ref + P·softmax(l)/τ); J = I − (I − 1·σᵀ)·P·(diag π − ππᵀ)/τ
            pi, sigma = np.exp(log_pi), np.exp(target)
            jac = np.eye(A) - (np.eye(A) - np.outer(np.ones(A), sigma)) @ M @ (np.diag(pi) - np.outer(pi, pi)) / tau
            log_pi = log_pi - np.linalg.lstsq(jac, log_pi - target, rcond=None)[0]
            log_pi -= logsumexp(log_pi)
        else:
            raise RuntimeError(f"regularized_nash did not converge: residual {residual:.3g} >= {tol:g}")
        out.append(np.exp(target))
    return np.stack(out) if batched else out[0]


def exploitability(P: np.ndarray, pi: np.ndarray) -> float:
    """max_j P(j ≻ π) − ½ = max_j (Pπ)_j − ½: how much a best response beats π. ≥ 0, and 0 exactly at a Nash
    equilibrium. Mean over prompts for a batch."""
    P_, (pi_,), _ = _batched(P, pi)
    return float(np.mean([(M @ x).max() - 0.5 for M, x in zip(P_, pi_)]))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def regularized_exploitability(P: np.ndarray, pi_ref: np.ndarray, pi: np.ndarray, tau: float) -> float:
    """max_π' [P(π' ≻ π) − τ·KL(π'‖π_ref)] − [P(π ≻ π) − τ·KL(π‖π_ref)]
    = τ·log Σ_y π_ref(y)·exp((Pπ)_y/τ) − ½ + τ·KL(π‖π_ref).

    The gain of a best response in the τ-regularised game, half its duality gap: ≥ 0, and 0 exactly at the
    regularised Nash π*. Mean over prompts for a batch."""
    P_, (ref_, pi_), _ = _batched(P, pi_ref, pi)
    values = [tau * logsumexp(M @ x / tau, b=ref) - 0.5 + tau * _kl(x, ref) for M, ref, x in zip(P_, ref_, pi_)]
    return float(np.mean(values))


def win_rate(P: np.ndarray, pi: np.ndarray, pi_other: np.ndarray) -> float:
    """P(π ≻ π') = πᵀPπ'. Mean over prompts for a batch."""
    P_, (a_, b_), _ = _batched(P, pi, pi_other)
    return float(np.mean([a @ M @ b for M, a, b in zip(P_, a_, b_)]))

