"""Proposition 2 of Zhang et al. 2019 (§3.1 and the appendix): on the noisy quadratic model
Lookahead's slow weights settle with a smaller variance than SGD's iterates, by a factor the
paper gives in closed form. Simulated here through LookaheadSGD on every backend.

The model, one coordinate: L(x) = ½ a (x − c)² with c ~ N(0, σ²) drawn afresh at every step,
so the gradient is a (x − c). Write γ for the learning rate and ρ = 1 − γa.

SGD.  x' = x − γa(x − c) = ρ x + γa c. The mean goes to 0 and the variance V obeys
V' = ρ² V + γ²a²σ², so for |ρ| < 1 the stationary variance is

    V_SGD = γ²a²σ² / (1 − ρ²) = γ²a²σ² / (1 − (1 − γa)²).

Lookahead.  A cycle starts with x_0 = φ. After k SGD steps with independent c_0 … c_{k−1}:

    x_k = ρ^k φ + γa Σ_{j<k} ρ^{k−1−j} c_j,

and the sync gives φ' = (1 − α) φ + α x_k, an AR(1) process over cycles:

    φ' = b φ + α γa Σ_{j<k} ρ^{k−1−j} c_j,    b = 1 − α(1 − ρ^k),

with innovation variance α² γ²a²σ² Σ_{i<k} ρ^{2i} = α² γ²a²σ² (1 − ρ^{2k}) / (1 − ρ²)
= α² (1 − ρ^{2k}) V_SGD. Its stationary variance is innovation / (1 − b²), and
1 − b² = (1 − b)(1 + b) = α(1 − ρ^k)(2 − α(1 − ρ^k)) = 2α(1 − ρ^k) − α²(1 − ρ^k)². So

    V_LA = α² (1 − ρ^{2k}) / [2α(1 − ρ^k) − α²(1 − ρ^k)²] · V_SGD.

The paper writes the denominator as α²(1 − ρ^{2k}) + 2α(1 − α)(1 − ρ^k); with u = ρ^k,
α²(1 − u²) + 2α(1 − u) − 2α²(1 − u) = 2α(1 − u) + α²(1 − u)(1 + u − 2) = 2α(1 − u) − α²(1 − u)²:
the same. V_LA < V_SGD ⇔ α²(1 − u²) < 2α(1 − u) − α²(1 − u)² ⇔ 2α²(1 − u) < 2α(1 − u)
⇔ α < 1 (|u| < 1): the paper's claim, for every α in (0, 1).

Statistics.  Each test measures the sample variance over N independent coordinates; for a
normal sample its relative standard error is sqrt(2/(N − 1)), 0.32 % at N = 200 000. The
estimate averaged over several sync points has a standard error no larger than that (the
points are positively correlated, so averaging helps less than 1/sqrt(M), never hurts).
The burn-in makes the bias from the zero start, b^{2n} relative, below 1e-4. The tolerance
is 5 standard errors, 1.6 %: a wrong formula or a wrong step (for example α applied twice,
or a sync that misses the reset θ ← φ) moves the variance by far more.
"""

from __future__ import annotations

import math

import pytest
import torch

from lookahead_fused import LookaheadSGD

N = 200_000
SIGMA = 1.0
REL_TOL = 5 * math.sqrt(2 / (N - 1))
MEASURED_SYNCS = 3

# (γ, a, k, α): ρ = 0.5; ρ = 0.8 with a long cycle; ρ = −0.35 (γa > 1, SGD oscillates, k odd).
GRID = [(0.5, 1.0, 5, 0.5), (0.1, 2.0, 10, 0.8), (0.9, 1.5, 3, 0.3)]


def v_sgd(gamma: float, a: float) -> float:
    return gamma**2 * a**2 * SIGMA**2 / (1 - (1 - gamma * a) ** 2)


def v_lookahead(gamma: float, a: float, k: int, alpha: float) -> float:
    """Proposition 2 as the paper writes it (derived in the module docstring)."""
    u = (1 - gamma * a) ** k
    shrink = alpha**2 * (1 - u**2)
    return shrink / (shrink + 2 * alpha * (1 - alpha) * (1 - u)) * v_sgd(gamma, a)


def slow_weight_variance(backend: str, gamma: float, a: float, k: int, alpha: float) -> float:
    """Run LookaheadSGD on N independent noisy quadratics (one tensor, one coordinate each),
    from x = 0, and return the variance across coordinates of the slow weights at sync points
    (where θ = φ), averaged over MEASURED_SYNCS cycles after the burn-in. α = 1 is plain SGD
    observed every k steps."""
    b = 1 - alpha * (1 - (1 - gamma * a) ** k)  # the AR(1) coefficient over cycles
    burn_in = math.ceil(math.log(1e-4) / (2 * math.log(abs(b)))) if b != 0 else 1
    x = torch.zeros(N, requires_grad=True)
    opt = LookaheadSGD([x], lr=gamma, k=k, alpha=alpha, backend=backend)
    gen = torch.Generator().manual_seed(1234)
    variances = []
    for cycle in range(burn_in + MEASURED_SYNCS):
        for _ in range(k):
            c = torch.randn(N, generator=gen) * SIGMA
            x.grad = a * (x.detach() - c)
            opt.step()
        if cycle >= burn_in:
            assert torch.equal(x.detach(), opt.state[x]["slow_weights"])  # a sync point
            variances.append(x.detach().double().var().item())
    return sum(variances) / len(variances)


@pytest.mark.parametrize("gamma,a,k,alpha", GRID)
def test_proposition_2_stationary_variance(backend: str, gamma: float, a: float, k: int, alpha: float) -> None:
    want_sgd, want_la = v_sgd(gamma, a), v_lookahead(gamma, a, k, alpha)
    got_sgd = slow_weight_variance(backend, gamma, a, k, alpha=1.0)
    got_la = slow_weight_variance(backend, gamma, a, k, alpha)
    assert got_sgd == pytest.approx(want_sgd, rel=REL_TOL)
    assert got_la == pytest.approx(want_la, rel=REL_TOL)
    # The paper's claim, in the formula and in the simulation (the gap is many tolerances wide).
    assert want_la < want_sgd
    assert got_la * (1 + 2 * REL_TOL) < got_sgd * (1 - 2 * REL_TOL)


def test_variance_reduction_holds_for_every_alpha_below_one() -> None:
    # The closed form alone: V_LA / V_SGD < 1 for α < 1 and = 1 at α = 1, over a grid that
    # includes oscillating SGD (γa > 1) and both parities of k.
    for gamma_a in (0.05, 0.5, 1.0, 1.5, 1.95):
        for k in (1, 2, 5, 10):
            assert v_lookahead(gamma_a, 1.0, k, 1.0) == pytest.approx(v_sgd(gamma_a, 1.0), rel=1e-12)
            for alpha in (0.1, 0.5, 0.9):
                assert v_lookahead(gamma_a, 1.0, k, alpha) < v_sgd(gamma_a, 1.0)
