"""The pure losses: each against a direct float64 numpy evaluation of its formula, gradients against finite
differences, and — where a population update exists — minimising the loss over free tabular logits reproduces it,
both with exact pair weights π_t(y)π_t(y') (tolerance 1e-4) and with 2·10^4 sampled, Bernoulli-judged pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nashray.trainers import losses

B = 64
A = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add barriers (slow when the other cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _neg_log_sigmoid(z):
    return np.logaddexp(0.0, -z)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _logprobs(rng, n=B):
    return -rng.gamma(2.0, 2.0, size=n)  # log-probs of sequences: negative, spread over a few nats


# --------------------------------------------------------------------------------------------- formulas

def test_dpo_matches_formula_with_hard_and_soft_labels(rng):
    w, l, rw, rl = (_logprobs(rng) for _ in range(4))
    soft = rng.uniform(size=B)
    beta = 0.3
    delta = (w - rw) - (l - rl)
    for label in (1.0, 0.0, soft):
        expected = label * _neg_log_sigmoid(beta * delta) + (1 - label) * _neg_log_sigmoid(-beta * delta)
        got = losses.dpo_loss(_t(w), _t(l), _t(rw), _t(rl), beta, _t(label) if np.ndim(label) else label)
        assert got.shape == (B,)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)


def test_dpo_is_stable_for_large_margins():
    big = losses.dpo_loss(_t([400.0, -400.0]), _t([0.0, 0.0]), _t([0.0, 0.0]), _t([0.0, 0.0]), 1.0)
    assert torch.isfinite(big).all()
    np.testing.assert_allclose(big.numpy(), [0.0, 400.0], atol=1e-9)


def test_ipo_matches_formula_and_hard_label_is_azar(rng):
    w, l, rw, rl = (_logprobs(rng) for _ in range(4))
    soft = rng.uniform(size=B)
    beta = 0.2
    delta = (w - rw) - (l - rl)
    got = losses.ipo_loss(_t(w), _t(l), _t(rw), _t(rl), beta, _t(soft))
    np.testing.assert_allclose(got.numpy(), (delta - (soft - 0.5) / beta) ** 2, atol=1e-6, rtol=0)
    hard = losses.ipo_loss(_t(w), _t(l), _t(rw), _t(rl), beta)
    np.testing.assert_allclose(hard.numpy(), (delta - 1 / (2 * beta)) ** 2, atol=1e-6, rtol=0)


def test_sppo_matches_formula(rng):
    logp, t = _logprobs(rng), _logprobs(rng)
    rate = rng.uniform(size=B)
    got = losses.sppo_loss(_t(logp), _t(t), _t(rate), 2.0)
    np.testing.assert_allclose(got.numpy(), (logp - t - 2.0 * (rate - 0.5)) ** 2, atol=1e-6, rtol=0)


def test_dno_regression_matches_formula(rng):
    a, b, ta, tb = (_logprobs(rng) for _ in range(4))
    ra, rb = rng.uniform(size=B), rng.uniform(size=B)
    beta = 0.7
    q = _sigmoid(ra - rb)
    z = beta * ((a - ta) - (b - tb))
    expected = q * _neg_log_sigmoid(z) + (1 - q) * _neg_log_sigmoid(-z)
    got = losses.dno_regression_loss(_t(a), _t(b), _t(ta), _t(tb), _t(ra), _t(rb), beta=beta)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)


def test_inpo_matches_formula(rng):
    w, l, tw, tl, rw, rl = (_logprobs(rng) for _ in range(6))
    label = rng.uniform(size=B)
    eta, tau = 1.0, 0.1
    h_w = (w - tw) - eta * tau * (rw - tw)
    h_l = (l - tl) - eta * tau * (rl - tl)
    got = losses.inpo_loss(_t(w), _t(l), _t(tw), _t(tl), _t(rw), _t(rl), eta, tau, _t(label))
    np.testing.assert_allclose(got.numpy(), (h_w - h_l - eta * (label - 0.5)) ** 2, atol=1e-6, rtol=0)


def test_xpo_is_dpo_plus_alpha_logp_x(rng):
    w, l, rw, rl, x = (_logprobs(rng) for _ in range(5))
    label = rng.uniform(size=B)
    beta, alpha = 0.1, 0.05
    delta = (w - rw) - (l - rl)
    expected = (label * _neg_log_sigmoid(beta * delta) + (1 - label) * _neg_log_sigmoid(-beta * delta)
                + alpha * x)
    got = losses.xpo_loss(_t(w), _t(l), _t(rw), _t(rl), _t(x), beta, alpha, _t(label))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)


def test_nash_md_matches_formula_and_detaches_the_kl_weight(rng):
    y, ref = _logprobs(rng), _logprobs(rng)
    pref = rng.uniform(size=B)
    tau = 0.1
    logp = _t(y).requires_grad_()
    got = losses.nash_md_loss(logp, _t(ref), _t(pref), tau)
    advantage = (pref - 0.5) - tau * (y - ref)
    np.testing.assert_allclose(got.detach().numpy(), -advantage * y, atol=1e-6, rtol=0)
    got.sum().backward()
    np.testing.assert_allclose(logp.grad.numpy(), -advantage, atol=1e-12)  # d/dlogp with sg(logp − ref) fixed


def test_nash_md_clipped_matches_formula_and_its_gradient_stops_outside_the_clip(rng):
    t, ref = _logprobs(rng), _logprobs(rng)
    y = t + rng.uniform(-0.5, 0.5, size=B)  # ratios e^{±0.5}: inside and outside 1 ± ε on both sides
    pref = rng.uniform(size=B)
    tau, beta, eps = 0.1, 0.125, 0.2
    kappa = (1 - beta) * tau / beta
    ratio = np.exp(y - t)
    advantage = (pref - 0.5) - tau * (y - ref) - kappa * (y - t)
    expected = -np.minimum(ratio * advantage, np.clip(ratio, 1 - eps, 1 + eps) * advantage)
    logp = _t(y).requires_grad_()
    got = losses.nash_md_clipped_loss(logp, _t(t), _t(ref), _t(pref), tau=tau, beta=beta, clip_ratio=eps)
    np.testing.assert_allclose(got.detach().numpy(), expected, atol=1e-9, rtol=0)
    got.sum().backward()
    # d/dlogp with the advantage held fixed: −A·r, except where the clip bounds the objective (PPO's zero gradient:
    # a ratio past 1 + ε on a positive advantage, or below 1 − ε on a negative one)
    clipped = ((ratio > 1 + eps) & (advantage > 0)) | ((ratio < 1 - eps) & (advantage < 0))
    assert 0 < clipped.sum() < B
    np.testing.assert_allclose(logp.grad.numpy(), np.where(clipped, 0.0, -advantage * ratio), atol=1e-12)


def test_nash_md_clipped_first_step_is_the_on_policy_step(rng):
    """At θ = π_t (ratio 1) the κ·KL(π_θ‖π_t) term has zero gradient and the clip is inactive."""
    y, ref = _logprobs(rng), _logprobs(rng)
    pref = rng.uniform(size=B)
    grads = []
    for loss in (lambda lp: losses.nash_md_loss(lp, _t(ref), _t(pref), 0.1),
                 lambda lp: losses.nash_md_clipped_loss(lp, _t(y), _t(ref), _t(pref), 0.1, 0.125, 0.2)):
        logp = _t(y).requires_grad_()
        loss(logp).sum().backward()
        grads.append(logp.grad.numpy())
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-12)


# -------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", ["dpo", "ipo", "dno_regression", "inpo", "xpo"])
def test_gradients_match_finite_differences(rng, name):
    n = 6
    inputs = [_t(_logprobs(rng, n)).requires_grad_() for _ in range(6)]
    label = _t(rng.uniform(size=n))
    r_a, r_b = _t(rng.uniform(size=n)), _t(rng.uniform(size=n))
    fns = {
        "dpo": lambda a, b, c, d, e, f: losses.dpo_loss(a, b, c, d, 0.5, label),
        "ipo": lambda a, b, c, d, e, f: losses.ipo_loss(a, b, c, d, 0.5, label),
        "dno_regression": lambda a, b, c, d, e, f: losses.dno_regression_loss(a, b, c, d, r_a, r_b, 0.8),
        "inpo": lambda a, b, c, d, e, f: losses.inpo_loss(a, b, c, d, e, f, 1.0, 0.1, label),
        "xpo": lambda a, b, c, d, e, f: losses.xpo_loss(a, b, c, d, e, 0.5, 0.3, label),
    }
    assert torch.autograd.gradcheck(fns[name], inputs, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ population updates

def _random_problem(seed: int, n: int = A):
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.uniform(-0.4, 0.4, size=(n, n)), 1)
    P = 0.5 + upper - upper.T
    pi_t = rng.dirichlet(np.full(n, 2.0))
    pi_ref = rng.dirichlet(np.full(n, 2.0))
    return rng, P, pi_t, pi_ref


def _normalise_log(v):
    v = np.asarray(v, dtype=np.float64)
    return np.exp(v - v.max()) / np.exp(v - v.max()).sum()


def _minimise(objective, init: np.ndarray) -> np.ndarray:
    """argmin over free logits (float64 L-BFGS to convergence)."""
    logits = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=2000, tolerance_grad=1e-13, tolerance_change=1e-18,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(logits)
        value.backward()
        return value

    opt.step(closure)
    assert logits.grad.abs().max() < 1e-8, f"not converged: gradient {logits.grad}"
    return logits.detach().numpy()


def _all_pairs(n: int):
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return a.ravel(), b.ravel()


def _sampled_pairs(rng, pi_t, P, n_pairs: int):
    """y, y' ~ π_t i.i.d. and a Bernoulli(P(y ≻ y')) verdict, as a noisy judge gives them."""
    a = rng.choice(len(pi_t), size=n_pairs, p=pi_t)
    b = rng.choice(len(pi_t), size=n_pairs, p=pi_t)
    return a, b, (rng.random(n_pairs) < P[a, b]).astype(np.float64)


def _omd_step(P, pi_t, pi_ref, eta, tau):
    return _normalise_log((1 - eta * tau) * np.log(pi_t) + eta * tau * np.log(pi_ref) + eta * P @ pi_t)


def test_inpo_minimiser_is_the_omd_step():
    rng, P, pi_t, pi_ref = _random_problem(0)
    eta, tau = 1.0, 0.1
    expected = _omd_step(P, pi_t, pi_ref, eta, tau)
    lt, lr = torch.tensor(np.log(pi_t)), torch.tensor(np.log(pi_ref))
    a, b = _all_pairs(A)
    # E over I ~ Bernoulli(P(a ≻ b)): label-1 rows weighted P, label-0 rows weighted 1 − P
    a2, b2 = np.concatenate([a, a]), np.concatenate([b, b])
    label = torch.tensor(np.concatenate([np.ones(A * A), np.zeros(A * A)]))
    weight = torch.tensor(np.concatenate([pi_t[a] * pi_t[b] * P[a, b], pi_t[a] * pi_t[b] * (1 - P[a, b])]))

    def exact(logits):
        lp = torch.log_softmax(logits, -1)
        return (weight * losses.inpo_loss(lp[a2], lp[b2], lt[a2], lt[b2], lr[a2], lr[b2], eta, tau, label)).sum()

    got = _normalise_log(_minimise(exact, np.log(pi_t)))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected - pi_t).max() > 0.02  # the step actually moves

    sa, sb, verdict = _sampled_pairs(rng, pi_t, P, 20_000)
    sa_t, sb_t, v = torch.tensor(sa), torch.tensor(sb), torch.tensor(verdict)

    def sampled(logits):
        lp = torch.log_softmax(logits, -1)
        return losses.inpo_loss(lp[sa_t], lp[sb_t], lt[sa_t], lt[sb_t], lr[sa_t], lr[sb_t], eta, tau, v).mean()

    np.testing.assert_allclose(_normalise_log(_minimise(sampled, np.log(pi_t))), expected, atol=0.02)


def test_dno_regression_minimiser_is_pi_t_exp_r_over_beta():
    rng, P, pi_t, _ = _random_problem(1)
    beta = 0.5
    r = P @ pi_t  # r_t(y) = P(y ≻ π_t)
    expected = _normalise_log(np.log(pi_t) + r / beta)
    lt = torch.tensor(np.log(pi_t))
    a, b = _all_pairs(A)
    weight = torch.tensor(pi_t[a] * pi_t[b])
    ra, rb = torch.tensor(r[a]), torch.tensor(r[b])

    def exact(logits):
        lp = torch.log_softmax(logits, -1)
        return (weight * losses.dno_regression_loss(lp[a], lp[b], lt[a], lt[b], ra, rb, beta)).sum()

    np.testing.assert_allclose(_normalise_log(_minimise(exact, np.log(pi_t))), expected, atol=1e-4)

    # sampled pairs; r_t estimated per response from 50 Bernoulli comparisons against fresh π_t samples each
    sa, sb, _ = _sampled_pairs(rng, pi_t, P, 20_000)
    opponents = rng.choice(A, size=(2, 20_000, 50), p=pi_t)
    r_hat_a = (rng.random((20_000, 50)) < P[sa[:, None], opponents[0]]).mean(1)
    r_hat_b = (rng.random((20_000, 50)) < P[sb[:, None], opponents[1]]).mean(1)
    sa_t, sb_t = torch.tensor(sa), torch.tensor(sb)
    rha, rhb = torch.tensor(r_hat_a), torch.tensor(r_hat_b)

    def sampled(logits):
        lp = torch.log_softmax(logits, -1)
        return losses.dno_regression_loss(lp[sa_t], lp[sb_t], lt[sa_t], lt[sb_t], rha, rhb, beta).mean()

    np.testing.assert_allclose(_normalise_log(_minimise(sampled, np.log(pi_t))), expected, atol=0.03)


def test_sppo_minimiser_is_the_multiplicative_weights_regression_target():
    rng, P, pi_t, _ = _random_problem(2)
    eta = 1.0
    expected = np.log(pi_t) + eta * (P @ pi_t - 0.5)  # over free, unnormalised log-values
    lt = torch.tensor(np.log(pi_t))
    actions = torch.arange(A)
    rate, weight = torch.tensor(P @ pi_t), torch.tensor(pi_t)

    def exact(values):
        return (weight * losses.sppo_loss(values[actions], lt, rate, eta)).sum()

    np.testing.assert_allclose(_minimise(exact, np.zeros(A)), expected, atol=1e-4)

    # sampled: y ~ π_t with a win rate from 20 Bernoulli comparisons against fresh π_t samples
    y = rng.choice(A, size=20_000, p=pi_t)
    opponents = rng.choice(A, size=(20_000, 20), p=pi_t)
    win = torch.tensor((rng.random((20_000, 20)) < P[y[:, None], opponents]).mean(1))
    y_t = torch.tensor(y)

    def sampled(values):
        return losses.sppo_loss(values[y_t], lt[y_t], win, eta).mean()

    np.testing.assert_allclose(_minimise(sampled, np.zeros(A)), expected, atol=0.02)


def test_dpo_with_bradley_terry_soft_labels_recovers_pi_ref_exp_r_over_beta():
    rng, _, pi_t, pi_ref = _random_problem(3)
    beta = 0.5
    reward = rng.normal(size=A)
    expected = _normalise_log(np.log(pi_ref) + reward / beta)
    lr = torch.tensor(np.log(pi_ref))
    a, b = _all_pairs(A)
    weight = torch.tensor(pi_t[a] * pi_t[b])
    label = torch.tensor(_sigmoid(reward[a] - reward[b]))

    def exact(logits):
        lp = torch.log_softmax(logits, -1)
        return (weight * losses.dpo_loss(lp[a], lp[b], lr[a], lr[b], beta, label)).sum()

    np.testing.assert_allclose(_normalise_log(_minimise(exact, np.log(pi_ref))), expected, atol=1e-4)

    P = _sigmoid(reward[:, None] - reward[None, :])
    sa, sb, _ = _sampled_pairs(rng, pi_t, P, 20_000)
    sa_t, sb_t = torch.tensor(sa), torch.tensor(sb)
    soft = torch.tensor(P[sa, sb])

    def sampled(logits):
        lp = torch.log_softmax(logits, -1)
        return losses.dpo_loss(lp[sa_t], lp[sb_t], lr[sa_t], lr[sb_t], beta, soft).mean()

    np.testing.assert_allclose(_normalise_log(_minimise(sampled, np.log(pi_ref))), expected, atol=1e-2)


def test_ipo_minimiser_regresses_onto_the_preference_against_pi_t():
    _, P, pi_t, pi_ref = _random_problem(4)
    beta = 0.5
    expected = _normalise_log(np.log(pi_ref) + (P @ pi_t) / beta)  # β·log(π/π_ref) = P(y ≻ π_t) + const
    lr = torch.tensor(np.log(pi_ref))
    a, b = _all_pairs(A)
    weight, label = torch.tensor(pi_t[a] * pi_t[b]), torch.tensor(P[a, b])

    def exact(logits):
        lp = torch.log_softmax(logits, -1)
        return (weight * losses.ipo_loss(lp[a], lp[b], lr[a], lr[b], beta, label)).sum()

    np.testing.assert_allclose(_normalise_log(_minimise(exact, np.log(pi_ref))), expected, atol=1e-4)


def test_nash_md_expected_gradient_is_the_regularised_objective_gradient():
    """E_{y~π_θ, y'~π_mix}[∇ surrogate] = −∇[P(π_θ ≻ π_mix) − τ·KL(π_θ‖π_ref)] with the mixture held fixed."""
    _, P, pi, pi_ref = _random_problem(5)
    tau, beta = 0.1, 0.125
    logits = torch.tensor(np.log(pi) + 0.3, requires_grad=True)
    lr = torch.tensor(np.log(pi_ref))
    Pt = torch.tensor(P)

    lp = torch.log_softmax(logits, -1)
    mix = torch.softmax((1 - beta) * lp + beta * lr, -1).detach()
    actions = torch.arange(A)
    # the surrogate is linear in the preference, so averaging over y' is the preference P(y ≻ π_mix)
    surrogate = (lp.exp().detach() * losses.nash_md_loss(lp[actions], lr[actions], Pt @ mix, tau)).sum()
    (surrogate_grad,) = torch.autograd.grad(surrogate, logits)

    lp = torch.log_softmax(logits, -1)
    objective = lp.exp() @ Pt @ mix - tau * (lp.exp() * (lp - lr)).sum()
    (objective_grad,) = torch.autograd.grad(objective, logits)
    np.testing.assert_allclose(surrogate_grad.numpy(), -objective_grad.numpy(), atol=1e-12)
    assert objective_grad.abs().max() > 1e-3


def _nash_md_population_surrogate(logits, log_t, lr, P, tau, beta, clip_ratio):
    """E_{y~π_t, y'~π_mix}[nash_md_clipped_loss]: exact weights π_t(y), preference P(y ≻ π_mix) (the loss is linear
    in it), the mixture of π_t held fixed."""
    mix = torch.softmax((1 - beta) * log_t + beta * lr, -1)
    lp = torch.log_softmax(logits, -1)
    return (log_t.exp() * losses.nash_md_clipped_loss(lp, log_t, lr, P @ mix, tau, beta, clip_ratio)).sum()


def test_nash_md_clipped_expected_gradient_is_the_proximal_objective_gradient():
    """Inside the clip range: E_{y~π_t}[∇ loss] = −∇[P(π_θ ≻ π_mix) − τ·KL(π_θ‖π_ref) − κ·KL(π_θ‖π_t)] at θ ≠ π_t."""
    rng, P, pi_t, pi_ref = _random_problem(6)
    tau, beta = 0.1, 0.125
    kappa = (1 - beta) * tau / beta
    log_t, lr, Pt = torch.tensor(np.log(pi_t)), torch.tensor(np.log(pi_ref)), torch.tensor(P)
    logits = (log_t + torch.tensor(rng.uniform(-0.05, 0.05, size=A))).requires_grad_()
    (surrogate_grad,) = torch.autograd.grad(
        _nash_md_population_surrogate(logits, log_t, lr, Pt, tau, beta, 0.2), logits)

    mix = torch.softmax((1 - beta) * log_t + beta * lr, -1)
    lp = torch.log_softmax(logits, -1)
    objective = (lp.exp() @ Pt @ mix - tau * (lp.exp() * (lp - lr)).sum()
                 - kappa * (lp.exp() * (lp - log_t)).sum())
    (objective_grad,) = torch.autograd.grad(objective, logits)
    np.testing.assert_allclose(surrogate_grad.numpy(), -objective_grad.numpy(), atol=1e-12)
    assert objective_grad.abs().max() > 1e-3


def test_nash_md_clipped_many_steps_reach_the_mirror_descent_step():
    """Gradient steps on one round's (population) loss converge to Nash-MD's step π_t^{1−β}·π_ref^{β}·exp(η·P π_mix),
    η = β/τ, when it lies inside the clip range; without the κ term they would go on to the regularised best response
    π_ref·exp(P π_mix/τ), far outside it."""
    rng, P, pi_t, _ = _random_problem(7)
    tau, beta, clip_ratio = 0.1, 0.125, 0.2
    pi_ref = _normalise_log(np.log(pi_t) + rng.uniform(-0.5, 0.5, size=A))  # keeps the step within 1 ± ε of π_t
    log_t, lr, Pt = torch.tensor(np.log(pi_t)), torch.tensor(np.log(pi_ref)), torch.tensor(P)
    mix = _normalise_log((1 - beta) * np.log(pi_t) + beta * np.log(pi_ref))
    step = _normalise_log((1 - beta) * np.log(pi_t) + beta * np.log(pi_ref) + beta / tau * P @ mix)
    assert np.all(np.abs(step / pi_t - 1) < clip_ratio - 0.05)
    best_response = _normalise_log(np.log(pi_ref) + P @ mix / tau)
    assert np.abs(best_response / pi_t - 1).max() > 1

    logits = log_t.clone().requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=2.0)
    for _ in range(200):
        optimizer.zero_grad()
        _nash_md_population_surrogate(logits, log_t, lr, Pt, tau, beta, clip_ratio).backward()
        optimizer.step()
    np.testing.assert_allclose(torch.softmax(logits, -1).detach().numpy(), step, atol=1e-10)
