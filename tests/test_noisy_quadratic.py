"""examples/noisy_quadratic.py: its closed forms for the noisy quadratic model (paper §3.1,
Proposition 2) against independent expressions and against LookaheadSGD / torch.optim.SGD
simulated on many independent chains; and its command line.

Statistics.  The simulations start at the optimum x*, so E[x − x*] = 0 at every step and each
chain's (x_i − x*_i)² at sync point n has mean V_n and variance 2V_n², with V_n ≤ V* (the fixed
point). Across sync points the covariance is 2 Cov(x_n, x_m)² ≤ 2V*² b^{2|n−m|}, b the per-cycle
contraction, so the average over M sync points and C chains has a standard error of at most

    SE = V* sqrt(2/C · min(1, (1 + b²) / ((1 − b²) M))).

The tolerance is 4.5 SE per coordinate (a false alarm about once in 10⁵ comparisons); with
C = 4096 chains and M = 40 sync points it is 1.6 % to 3.3 % of the variance at the points
below. The transient test reads one sync point per chain, with a mean that has not decayed:
there a chain's (x − x*)² has variance 2V² + 4μ²V exactly, and 20 000 chains give at most
4.6 %. Each test asserts its tolerance is at most 5 %, so it keeps the power to catch a wrong
formula or a wrong step (α applied twice, a sync that misses θ ← φ, a lost step), each of
which moves the variance by tens of percent. The seeds are fixed, so a run is reproducible.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "examples" / "noisy_quadratic.py"
_SPEC = importlib.util.spec_from_file_location("noisy_quadratic", _PATH)
nq = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = nq  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(nq)

CHAINS = 4096
TRANSIENT_CHAINS = 20_000  # one sync point per chain, no averaging in time: more chains
MEASURE = 40
Z = 4.5
MAX_REL_TOL = 0.05

# The paper's spectrum cut to four coordinates, with an optimum away from the origin.
SMALL = nq.NQM(
    h=torch.tensor([1.0, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64),
    sigma2=torch.tensor([1.0, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64),
    x_star=torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64),
)

# (γ, k, α): smooth SGD (ρ = 1 − γh in [0.6, 0.9]); larger steps with a long cycle; SGD
# oscillating in the stiffest coordinate (ρ = −0.8) with an odd k.
POINTS = [(0.4, 5, 0.5), (1.0, 10, 0.8), (1.8, 3, 0.3)]
BACKENDS = ["cpu", "eager", "foreach", "cuda_emulated"]  # the Triton interpreter is too slow here


def paper_ratio(lr: float, h: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """V_LA / V_SGD as Proposition 2 writes it, typed from the paper, not from the module."""
    u = (1 - lr * h) ** k
    num = alpha**2 * (1 - u**2)
    return num / (num + 2 * alpha * (1 - alpha) * (1 - u))


def check_against_closed_form(lr: float, k: int, alpha: float | None, backend: str) -> None:
    burn_in = nq.burn_in_cycles(lr, SMALL, k, alpha, max_cycles=200)
    sim = nq.simulate(SMALL, lr, k, alpha, chains=CHAINS, burn_in=burn_in, measure=MEASURE, backend=backend, seed=7)
    measured = torch.arange(burn_in + 1, burn_in + MEASURE + 1)
    want = nq.second_moment(lr, SMALL, k, alpha, torch.zeros(()), measured).mean(0)
    v_star = nq.stationary_variance(lr, SMALL.h, SMALL.sigma2, k, alpha)
    b2 = nq.contraction(lr, SMALL.h, k, alpha) ** 2
    factor = torch.clamp((1 + b2) / ((1 - b2) * MEASURE), max=1.0)
    rel_tol = Z * v_star * torch.sqrt(2 / CHAINS * factor) / want
    assert float(rel_tol.max()) <= MAX_REL_TOL
    rel_err = sim.second_moment / want - 1
    assert (rel_err.abs() <= rel_tol).all(), f"relative errors {rel_err.tolist()}, tolerances {rel_tol.tolist()}"


@pytest.mark.parametrize("lr,k,alpha", POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lookahead_simulation_matches_proposition_2(backend: str, lr: float, k: int, alpha: float) -> None:
    check_against_closed_form(lr, k, alpha, backend)


@pytest.mark.parametrize("lr,k", [(lr, k) for lr, k, _ in POINTS])
def test_sgd_simulation_matches_fixed_point(lr: float, k: int) -> None:
    check_against_closed_form(lr, k, None, backend="auto")  # torch.optim.SGD: no backend


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_transient_from_an_offset(alpha: float | None) -> None:
    # One sync point, 3 cycles from x = x* + 1: the mean has not decayed, so this checks the
    # exact transient b^{2n} d0² + V(1 − b^{2n}). Per chain (x − x*)² has variance 2V² + 4μ²V.
    lr, k, n = 0.3, 5, 3
    sim = nq.simulate(
        SMALL, lr, k, alpha, chains=TRANSIENT_CHAINS, burn_in=n - 1, measure=1, d0=1.0, backend="cpu", seed=3
    )
    want = nq.second_moment(lr, SMALL, k, alpha, torch.ones(()), torch.tensor([n]))[0]
    b = nq.contraction(lr, SMALL.h, k, alpha)
    mu = b**n
    var = want - mu**2
    se = torch.sqrt((2 * var**2 + 4 * mu**2 * var) / TRANSIENT_CHAINS)
    assert float((Z * se / want).max()) <= MAX_REL_TOL
    assert ((sim.second_moment - want).abs() <= Z * se).all()


def test_closed_form_is_the_papers_and_reduces_to_sgd() -> None:
    h = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    sigma2 = torch.tensor([1.0, 2.0, 0.3, 0.05], dtype=torch.float64)
    for lr in (0.05, 0.5, 1.0, 1.5, 1.95):  # γh up to 1.95: SGD oscillating but stable
        v_sgd = (lr * h) ** 2 * sigma2 / (1 - (1 - lr * h) ** 2)
        torch.testing.assert_close(nq.sgd_stationary_variance(lr, h, sigma2), v_sgd, rtol=1e-12, atol=0)
        for k in (1, 2, 5, 10):
            torch.testing.assert_close(nq.stationary_variance(lr, h, sigma2, k, None), v_sgd, rtol=1e-10, atol=0)
            torch.testing.assert_close(nq.stationary_variance(lr, h, sigma2, k, 1.0), v_sgd, rtol=1e-10, atol=0)
            for alpha in (0.1, 0.5, 0.8, 0.99):
                v_la = nq.stationary_variance(lr, h, sigma2, k, alpha)
                torch.testing.assert_close(v_la, paper_ratio(lr, h, k, alpha) * v_sgd, rtol=1e-10, atol=0)
                assert (v_la < v_sgd).all()  # the paper's claim: less variance for every α < 1


def test_closed_form_fixed_point_solves_one_cycle_recursion() -> None:
    # Independent of the algebra: iterate the one-cycle recursion of the second moment
    # numerically, step by step through k SGD steps and the sync, until it stops moving.
    lr, k, alpha, h, s2 = 0.7, 5, 0.6, 1.0, 0.4
    rho = 1 - lr * h
    mean, var = 1.0, 0.0
    for _ in range(2000):
        m, v = mean, var
        for _ in range(k):
            m, v = rho * m, rho**2 * v + (lr * h) ** 2 * s2
        # φ' = (1 − α)φ + α x_k, with Cov(φ, x_k) = ρ^k Var φ (x_k = ρ^k φ + independent noise).
        var = (1 - alpha) ** 2 * var + alpha**2 * v + 2 * alpha * (1 - alpha) * rho**k * var
        mean = (1 - alpha) * mean + alpha * m
    as_tensor = lambda v: torch.tensor([v], dtype=torch.float64)
    got = nq.stationary_variance(lr, as_tensor(h), as_tensor(s2), k, alpha)
    assert float(got) == pytest.approx(var, rel=1e-12)
    assert abs(mean) < 1e-12


def test_diverging_runs_have_infinite_variance() -> None:
    h, s2 = torch.tensor([1.0]), torch.tensor([1.0])
    assert math.isinf(float(nq.stationary_variance(2.5, h, s2, 5, None)))
    # ρ = −1.1, k = 5, α = 0.5: SGD diverges, the slow weights do not (b = −0.31).
    assert math.isfinite(float(nq.stationary_variance(2.1, h, s2, 5, 0.5)))


def test_main_quick_writes_plot_and_json(tmp_path: Path) -> None:
    png, js = tmp_path / "nqm.png", tmp_path / "nqm.json"
    rows = nq.main(["--quick", "--plot", str(png), "--json", str(js), "--backend", "cpu", "--seed", "1"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert js.exists()
    assert {r["method"] for r in rows} == {"SGD", "LA k=5 a=0.5"}
    for r in rows:
        # Loose: the quick grid has few chains; the tight checks are the tests above.
        assert abs(r["loss_sim"] - r["loss_closed"]) < 6 * r["loss_se"]
        if r["method"] != "SGD":
            sgd = next(s for s in rows if s["method"] == "SGD" and s["lr"] == r["lr"])
            assert r["loss_fixed_point"] < sgd["loss_fixed_point"]
