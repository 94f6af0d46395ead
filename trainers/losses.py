"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Every function returns the PER-EXAMPLE loss, shape [B], unreduced: the caller averages (or weights) it. Naming:
``logp_*`` = log π_θ(y|x) (the parameters being trained, with grad), ``t_*`` = log π_t(y|x) (the policy that generated
the round), ``ref_*`` = log π_ref(y|x), ``label`` = probability that the first response (w / a) is preferred
(1.0 for a hard label; soft labels in [0, 1] are allowed). Scalars or [B] tensors are accepted for ``label``,
``win_rate`` and ``preference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _logistic_loss(logit: torch.Tensor, label) -> torch.Tensor:
    """−label·log σ(z) − (1 − label)·log σ(−z) = label·softplus(−z) + (1 − label)·softplus(z), stable for any z."""
    label = _as_tensor(label, logit)
    return label * F.softplus(-logit) + (1 - label) * F.softplus(logit)


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta: float, label=1.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with soft labels:

        Δ = (logp_w − ref_w) − (logp_l − ref_l)
        loss = −label·log σ(βΔ) − (1 − label)·log σ(−βΔ)

    Online DPO passes ref = π_ref; DNO's practical Algorithm 2 passes ref = π_t (a KL step from the round's policy).
    For pairs labelled σ(r(w) − r(l)) the population minimiser is π ∝ ref·exp(r/β)."""
    delta = (logp_w - ref_w) - (logp_l - ref_l)
    return _logistic_loss(beta * delta, label)


def ipo_loss(logp_w, logp_l, ref_w, ref_l, beta: float, label=1.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036):

        Δ = (logp_w − ref_w) − (logp_l − ref_l)
        loss = (Δ − (label − ½)/β)²

    For a hard label 1 this is IPO's (Δ − 1/(2β))²; a soft label moves the regression target linearly, so with pairs
    from π_t labelled P(w ≻ l) the minimiser is β·log(π/π_ref) = P(y ≻ π_t) + const (on the support of π_t)."""
    delta = (logp_w - ref_w) - (logp_l - ref_l)
    return (delta - (_as_tensor(label, delta) - 0.5) / beta) ** 2


def sppo_loss(logp, t, win_rate, eta: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024, arXiv 2405.00675): loss = (logp − t − η(win_rate − ½))².

    ``win_rate`` estimates P(y ≻ π_t). Over free log-values the minimiser is log π_t + η(P(y ≻ π_t) − ½), the
    multiplicative-weights step whose normaliser SPPO approximates by the constant η/2."""
    return (logp - t - eta * (_as_tensor(win_rate, logp) - 0.5)) ** 2


def dno_regression_loss(logp_a, logp_b, t_a, t_b, r_a, r_b, beta: float) -> torch.Tensor:
    """DNO Algorithm 1 (Rosset et al. 2024, arXiv 2404.03715): soft-label logistic regression of the pair.

        q = σ(r_a − r_b)                              (target, r = r_t(y) = P(y ≻ π_t))
        z = β[(logp_a − t_a) − (logp_b − t_b)]       (model logit)
        loss = −q·log σ(z) − (1 − q)·log σ(−z)

    ``beta`` is DNO's ``algorithm.beta``, the paper's η (the KL coefficient against π_t). With pairs drawn from π_t
    the population minimiser is π_{t+1} ∝ π_t·exp(r_t/β)."""
    logit = beta * ((logp_a - t_a) - (logp_b - t_b))
    target = torch.sigmoid(_as_tensor(r_a, logit) - _as_tensor(r_b, logit))
    return _logistic_loss(logit, target)


def inpo_loss(logp_w, logp_l, t_w, t_l, ref_w, ref_l, eta: float, tau: float, label=1.0) -> torch.Tensor:
    """INPO (Zhang et al. 2024, arXiv 2407.00617): a squared loss whose minimiser is one online-mirror-descent step.

        h(y) = (logp(y) − t(y)) − ητ(ref(y) − t(y))
        loss = (h(w) − h(l) − η(label − ½))²

    Why: for y, y' ~ π_t and I ~ Bernoulli(P(y ≻ y')), E[(h(y) − h(y') − η(I − ½))²] is minimised (over functions h)
    by h = η·P(· ≻ π_t) + const on supp(π_t). Setting its derivative in h(z) to zero gives
    h(z) = E_{y'~π_t} h(y') + η(P(z ≻ π_t) − ½), because P(z ≻ y') − ½ is antisymmetric and
    E_{y'~π_t} P(y' ≻ π_t) = ½. Reading h back as log-probabilities, this is exactly the OMD step

        π_{t+1} ∝ π_t^{1−ητ} · π_ref^{ητ} · exp(η P(y ≻ π_t)),

    whose iterates converge in the last iterate to the τ-regularised Nash equilibrium."""
    h_w = (logp_w - t_w) - eta * tau * (ref_w - t_w)
    h_l = (logp_l - t_l) - eta * tau * (ref_l - t_l)
    return (h_w - h_l - eta * (_as_tensor(label, h_w) - 0.5)) ** 2


def xpo_loss(logp_w, logp_l, ref_w, ref_l, logp_x, beta: float, alpha: float, label=1.0) -> torch.Tensor:
    """XPO (Xie et al. 2024, arXiv 2405.21046): DPO plus an exploration bonus on a π_ref sample x.

        loss = dpo_loss(logp_w, logp_l, ref_w, ref_l, β, label) + α·logp_x,   x ~ π_ref

    Minimising α·log π_θ(x) lowers the probability of what π_ref already covers, pushing mass towards responses the
    reference rarely produces (optimism for exploration)."""
    return dpo_loss(logp_w, logp_l, ref_w, ref_l, beta, label) + alpha * logp_x


def nash_md_loss(logp_y, ref_y, preference, tau: float) -> torch.Tensor:
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886), policy-gradient surrogate.

    For y ~ π_θ, y' ~ π_mix = π_θ^{1−β}·π_ref^{β}/Z and preference = P(y ≻ y'):

        loss = −[(preference − ½) − τ·sg(logp_y − ref_y)]·logp_y          (sg = stop-gradient / detach)

    By the score-function identity ∇E_{y~π_θ}[f(y)] = E[f(y)∇log π_θ(y)] and E[∇log π_θ(y)] = 0, its expected gradient
    is −∇_θ[E_{y~π_θ} P(y ≻ π_mix) − τ·KL(π_θ‖π_ref)], with the mixture held fixed as the opponent: the ½ is a
    baseline (it changes the variance, not the mean), and E[log(π_θ/π_ref)(y)∇log π_θ(y)] = ∇KL(π_θ‖π_ref).
    The identity needs y ~ π_θ: the surrogate holds for one step at the sampling policy only (for more steps on the
    same samples, :func:`nash_md_clipped_loss`)."""
    advantage = (_as_tensor(preference, logp_y) - 0.5) - tau * (logp_y - ref_y).detach()
    return -advantage * logp_y


def nash_md_clipped_loss(logp_y, t_y, ref_y, preference, tau: float, beta: float, clip_ratio: float) -> torch.Tensor:
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886) for several optimizer steps on one round's samples: y was drawn
    from π_t (``t_y`` = log π_t(y), the policy that drew it), y' from the mixture π_mix = π_t^{1−β}·π_ref^{β}/Z
    (β = ``beta``, Nash-MD's ``algorithm.beta``), preference = P(y ≻ y'), with PPO's clipped importance ratio (Schulman et al. 2017,
    arXiv 1707.06347):

        r = exp(logp_y − t_y)
        A = (preference − ½) − τ·sg(logp_y − ref_y) − κ·sg(logp_y − t_y),        κ = (1 − β)·τ/β
        loss = −min(r·A, clip(r, 1 − ε, 1 + ε)·A)                                  (ε = ``clip_ratio``)

    Inside the clip range, since E_{y~π_t}[r·f(y)] = E_{y~π_θ}[f(y)] and ∇r = r·∇logp, the expected gradient is
    −∇_θ of F(θ) = P(π_θ ≻ π_mix) − τ·KL(π_θ‖π_ref) − κ·KL(π_θ‖π_t), the mixture held fixed. At θ = π_t (r = 1, the
    round's first step) the κ term has zero gradient and this is exactly :func:`nash_md_loss`'s gradient. Setting
    ∂F/∂π = const gives (τ + κ)·log π = P(· ≻ π_mix) + τ·log π_ref + κ·log π_t with τ + κ = τ/β, so F's maximiser is

        π_{t+1} ∝ π_t^{1−β} · π_ref^{β} · exp(η·P(y ≻ π_mix)),     η = β/τ,

    Nash-MD's mirror-descent step (its mixture coefficient is ητ = β), whose iterates converge in the last iterate.
    Without the κ term, many steps on one round's samples would climb to the τ-regularised best response to π_mix,
    and rounds of best responses cycle on intransitive games; the clip keeps each sample's ratio, and with it the
    importance-weighted estimate, within 1 ± ε of the sampling policy."""
    kappa = (1 - beta) * tau / beta
    ratio = torch.exp(logp_y - t_y)
    advantage = ((_as_tensor(preference, logp_y) - 0.5) - tau * (logp_y - ref_y).detach()
                 - kappa * (logp_y - t_y).detach())
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantage)
