"""The noisy quadratic model (NQM) of Zhang, Lucas, Hinton, Ba 2019 (arXiv 1907.08610, §3.1 and
Proposition 2): closed forms for the iterates' variance and the expected loss of SGD and of
Lookahead on SGD, checked against a simulation that runs this project's `LookaheadSGD`.

    python examples/noisy_quadratic.py [--quick] [--plot PATH] [--json PATH]
                                       [--backend NAME] [--seed N]

The model.  L(x) = ½ Σ_i h_i (x_i − c_i)², with the optimum c drawn afresh at every step,
c_i ~ N(x*_i, σ_i²): the gradient h ⊙ (x − c) is the true gradient h ⊙ (x − x*) plus noise.
Every coordinate is independent, so everything below is per coordinate; drop the index i
and write γ for the learning rate and ρ = 1 − γh.

The loss reported is the expected excess loss over the true optimum,
E[½ Σ h (x − x*)²] = ½ Σ h ((E x − x*)² + Var x). Measured against the noisy optimum c, which
is independent of x, the loss is that plus the constant ½ Σ h σ², the same for every optimizer.

SGD, one step.  x' = x − γh(x − c) = ρ x + γh c, so with d = x − x*:

    E d' = ρ E d,        Var x' = ρ² Var x + γ²h²σ².

For |ρ| < 1 (0 < γh < 2) the fixed point is V_SGD = γ²h²σ² / (1 − ρ²) = γhσ² / (2 − γh).

Lookahead on SGD, one cycle (k SGD steps from x_0 = φ with independent c_0 … c_{k−1}, then the
sync φ' = φ + α(x_k − φ)):

    x_k − x* = ρ^k (φ − x*) + γh Σ_{j<k} ρ^{k−1−j} (c_j − x*)
    φ' − x* = b (φ − x*) + α γh Σ_{j<k} ρ^{k−1−j} (c_j − x*),    b = 1 − α(1 − ρ^k).

The slow weights are an AR(1) process across cycles: E d' = b E d and

    Var φ' = b² Var φ + α² q_k,    q_k = γ²h²σ² Σ_{i<k} ρ^{2i}  (the noise of k SGD steps),

so for |b| < 1 the fixed point is V_LA = α² q_k / (1 − b²). Where SGD is stable, q_k =
(1 − ρ^{2k}) V_SGD, and with u = ρ^k, 1 − b² = α(1 − u)(2 − α(1 − u)) = α²(1 − u²) + 2α(1 − α)(1 − u):

    V_LA / V_SGD = α²(1 − u²) / (α²(1 − u²) + 2α(1 − α)(1 − u)),

which is Proposition 2 as the paper writes it. The ratio is 1 at α = 1 (Lookahead with α = 1
is SGD observed every k steps) and below 1 for every α in (0, 1) when |u| < 1: the
denominator exceeds the numerator by 2α(1 − α)(1 − u) > 0. The form α² q_k / (1 − b²) also
holds where SGD alone diverges (|ρ| ≥ 1) but |b| < 1, so it is the one computed here.

Exact transient.  From a deterministic start d_0 the second moment about x* after n cycles
(or n steps of SGD, with b = ρ and α² q_k = γ²h²σ²) is

    E[(φ_n − x*)²] = b^{2n} d_0² + V (1 − b^{2n}),

so the closed form below gives the expected loss at any sync point, not only at the fixed
point; the simulation is compared with it at exactly the sync points it measures.

What is measured.  Proposition 2 is about the slow weights φ, so the simulation reads the
parameters at sync points (after the k-th step of a cycle, where the fast weights have just
been reset to φ). SGD (`torch.optim.SGD`, independent of this project) is read at the same
step counts. Each chain is one independent copy of the model: the parameter is one tensor of
shape [chains, dims], and the optimizers are elementwise.

The figure's setting: h_i = 1/i (condition number 1000) and σ_i² = 1/i (the variance of the
optimum c; the gradient noise then has variance h_i²σ_i²), i = 1 … 1000, x* = 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lookahead_fused import LookaheadSGD

# Burn-in: run until the closed form says the expected loss is within this fraction of its
# fixed point (the comparison itself uses the exact transient, so this only decides how close
# to stationarity the measured numbers are).
STATIONARY_RTOL = 1e-3


@dataclass(frozen=True)
class NQM:
    """A diagonal noisy quadratic: curvatures h, noise variances σ² of the optimum, optimum x*."""

    h: Tensor
    sigma2: Tensor
    x_star: Tensor

    @classmethod
    def paper(cls, dims: int = 1000) -> NQM:
        """h_i = σ_i² = 1/i, i = 1 … dims, x* = 0."""
        h = 1.0 / torch.arange(1, dims + 1, dtype=torch.float64)
        return cls(h=h, sigma2=h.clone(), x_star=torch.zeros(dims, dtype=torch.float64))

    @property
    def dims(self) -> int:
        return self.h.numel()


# ----------------------------------------------------------------------------- closed forms


def contraction(lr: float, h: Tensor, k: int, alpha: float | None) -> Tensor:
    """Per-cycle factor b by which E[φ − x*] shrinks: 1 − α(1 − ρ^k); ρ^k for SGD (α = None or 1)."""
    u = (1 - lr * h) ** k
    return u if alpha is None else 1 - alpha * (1 - u)


def cycle_noise(lr: float, h: Tensor, sigma2: Tensor, k: int) -> Tensor:
    """q_k = γ²h²σ² Σ_{i<k} ρ^{2i}: the variance k SGD steps add to a deterministic start."""
    r = (1 - lr * h) ** 2
    # Σ_{i<k} r^i, written so that r = 1 (γh = 0 or 2) is not a division by zero.
    geometric = torch.where(r == 1, torch.full_like(r, float(k)), (1 - r**k) / torch.where(r == 1, 2.0, 1 - r))
    return (lr * h) ** 2 * sigma2 * geometric


def stationary_variance(lr: float, h: Tensor, sigma2: Tensor, k: int, alpha: float | None) -> Tensor:
    """Fixed-point variance of the slow weights (α = None: of SGD's iterates), α² q_k / (1 − b²);
    inf where the recursion diverges (|b| ≥ 1)."""
    a = 1.0 if alpha is None else alpha
    b = contraction(lr, h, k, alpha)
    v = a**2 * cycle_noise(lr, h, sigma2, k) / (1 - b**2)
    return torch.where(b.abs() < 1, v, torch.full_like(v, math.inf))


def sgd_stationary_variance(lr: float, h: Tensor, sigma2: Tensor) -> Tensor:
    """V_SGD = γ²h²σ² / (1 − (1 − γh)²), the paper's expression (finite for 0 < γh < 2)."""
    return (lr * h) ** 2 * sigma2 / (1 - (1 - lr * h) ** 2)


def second_moment(lr: float, nqm: NQM, k: int, alpha: float | None, d0: Tensor, cycles: Tensor) -> Tensor:
    """Exact E[(φ_n − x*)²] per coordinate after n cycles from a deterministic offset d0:
    b^{2n} d0² + V (1 − b^{2n}). `cycles` has shape [n_points]; the result [n_points, dims]."""
    b2 = contraction(lr, nqm.h, k, alpha) ** 2
    v = stationary_variance(lr, nqm.h, nqm.sigma2, k, alpha)
    decay = b2.unsqueeze(0) ** cycles.to(b2.dtype).unsqueeze(1)
    return decay * d0**2 + v * (1 - decay)


def expected_loss(nqm: NQM, second_moments: Tensor) -> Tensor:
    """½ Σ_i h_i E[(x_i − x*_i)²], over the last dimension."""
    return 0.5 * (nqm.h * second_moments).sum(-1)


def burn_in_cycles(lr: float, nqm: NQM, k: int, alpha: float | None, max_cycles: int) -> int:
    """Fewest cycles from x = x* after which the expected loss is within STATIONARY_RTOL of its
    fixed point (capped at max_cycles: the comparison uses the exact transient either way)."""
    b2 = contraction(lr, nqm.h, k, alpha) ** 2
    weight = nqm.h * stationary_variance(lr, nqm.h, nqm.sigma2, k, alpha)
    deficit = lambda n: float((weight * b2**n).sum() / weight.sum())
    lo, hi = 0, 1
    while deficit(hi) > STATIONARY_RTOL and hi < max_cycles:
        lo, hi = hi, min(2 * hi, max_cycles)
    while hi - lo > 1:  # deficit(lo) > tol >= deficit(hi), unless capped
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if deficit(mid) > STATIONARY_RTOL else (lo, mid)
    return hi


# ------------------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class Simulated:
    """Second moments about x* averaged over the measured sync points and over chains."""

    second_moment: Tensor  # [dims]
    second_moment_se: Tensor  # [dims], standard error from the spread of per-chain averages
    loss: float
    loss_se: float


def simulate(
    nqm: NQM,
    lr: float,
    k: int,
    alpha: float | None,
    *,
    chains: int,
    burn_in: int,
    measure: int,
    d0: float = 0.0,
    backend: str = "auto",
    seed: int = 0,
) -> Simulated:
    """Run `chains` independent copies of the NQM from x = x* + d0 for burn_in + measure cycles of
    k steps, with `LookaheadSGD(lr, momentum=0, k, alpha)`, or `torch.optim.SGD(lr)` when alpha is
    None, and average (x − x*)² over the last `measure` cycles' sync points.

    Each chain's time average is one sample; chains are independent, so the standard errors are
    the spread of those samples over sqrt(chains), whatever the correlation in time."""
    x_star = nqm.x_star.float()
    sigma = nqm.sigma2.sqrt().float()
    h = nqm.h.float()
    x = (x_star + d0).expand(chains, -1).clone()
    if alpha is None:
        opt: torch.optim.Optimizer = torch.optim.SGD([x], lr=lr)
    else:
        opt = LookaheadSGD([x], lr=lr, momentum=0, k=k, alpha=alpha, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(chains, nqm.dims, dtype=torch.float64)
    for cycle in range(burn_in + measure):
        for _ in range(k):
            c = x_star + sigma * torch.randn(chains, nqm.dims, generator=gen)
            x.grad = h * (x - c)
            opt.step()
        if cycle >= burn_in:
            total += (x.detach().double() - nqm.x_star) ** 2
    per_chain = total / measure
    per_chain_loss = expected_loss(nqm, per_chain)
    root = math.sqrt(chains)
    return Simulated(
        second_moment=per_chain.mean(0),
        second_moment_se=per_chain.std(0) / root,
        loss=float(per_chain_loss.mean()),
        loss_se=float(per_chain_loss.std()) / root,
    )


# ----------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Settings:
    dims: int
    chains: int
    lrs: tuple[float, ...]
    configs: tuple[tuple[int, float], ...]  # Lookahead (k, α); SGD is always included
    measure_steps: int  # steps measured per run, after the burn-in (measure_steps // k sync points)
    max_burn_in: int  # cycles
    budget: int  # steps, for the fixed-budget panels (a multiple of every k)
    budget_chains: int  # chains of the fixed-budget runs (one sample each, so more of them)


FULL = Settings(
    dims=1000,
    chains=64,
    lrs=(0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.3, 1.6, 1.9),
    configs=((5, 0.5), (5, 0.8), (10, 0.5), (10, 0.8)),
    measure_steps=750,
    max_burn_in=4000,
    budget=200,
    budget_chains=128,
)
QUICK = Settings(
    dims=50,
    chains=32,
    lrs=(0.3, 1.0),
    configs=((5, 0.5),),
    measure_steps=100,
    max_burn_in=100,
    budget=20,
    budget_chains=32,
)


def _label(k: int | None, alpha: float | None) -> str:
    return "SGD" if alpha is None else f"LA k={k} a={alpha}"


def run_grid(settings: Settings, backend: str, seed: int) -> list[dict]:
    """One row per (method, learning rate): closed form vs simulation for the variance of the
    stiffest coordinate (h = 1), the stationary expected loss, and the expected loss after
    `budget` steps from x = x* + 1. SGD is read every 5 steps."""
    nqm = NQM.paper(settings.dims)
    methods: list[tuple[int, float | None]] = [(5, None), *settings.configs]
    rows = []
    for m, (k, alpha) in enumerate(methods):
        for j, lr in enumerate(settings.lrs):
            # Independent noise for every run, so that the rows' errors are independent too.
            run_seed = seed * 10_000 + 100 * m + 2 * j
            v_closed = stationary_variance(lr, nqm.h, nqm.sigma2, k, alpha)
            if not torch.isfinite(v_closed).all():
                continue  # diverges: nothing stationary to compare
            burn_in = burn_in_cycles(lr, nqm, k, alpha, settings.max_burn_in)
            measure = settings.measure_steps // k
            sim = simulate(
                nqm, lr, k, alpha, chains=settings.chains, burn_in=burn_in, measure=measure,
                backend=backend, seed=run_seed,
            )  # fmt: skip
            measured = torch.arange(burn_in + 1, burn_in + measure + 1)
            exact = second_moment(lr, nqm, k, alpha, torch.zeros(()), measured).mean(0)
            # Fixed budget from a unit offset: the trade-off of speed against noise.
            n_budget = settings.budget // k
            transient = simulate(
                nqm, lr, k, alpha, chains=settings.budget_chains, burn_in=n_budget - 1, measure=1, d0=1.0,
                backend=backend, seed=run_seed + 1,
            )  # fmt: skip
            exact_budget = expected_loss(
                nqm, second_moment(lr, nqm, k, alpha, torch.ones(()), torch.tensor([n_budget]))
            )
            rows.append(
                {
                    "method": _label(k, alpha),
                    "k": None if alpha is None else k,
                    "alpha": alpha,
                    "lr": lr,
                    "burn_in_cycles": burn_in,
                    "var1_closed": float(exact[0]),
                    "var1_fixed_point": float(v_closed[0]),
                    "var1_sim": float(sim.second_moment[0]),
                    "var1_se": float(sim.second_moment_se[0]),
                    "loss_closed": float(expected_loss(nqm, exact)),
                    "loss_fixed_point": float(expected_loss(nqm, v_closed)),
                    "loss_sim": sim.loss,
                    "loss_se": sim.loss_se,
                    "budget_loss_closed": float(exact_budget[0]),
                    "budget_loss_sim": transient.loss,
                    "budget_loss_se": transient.loss_se,
                }
            )
            for key in ("var1", "loss", "budget_loss"):
                row = rows[-1]
                row[f"{key}_rel_err"] = row[f"{key}_sim"] / row[f"{key}_closed"] - 1
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'method':<15}{'lr':>6} | {'Var x1 closed':>13}{'sim':>11}{'err':>8}{'z':>6} | "
        f"{'loss closed':>12}{'sim':>11}{'err':>8}{'z':>6} | {'loss@T closed':>13}{'sim':>11}{'err':>8}{'z':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        z1 = (r["var1_sim"] - r["var1_closed"]) / r["var1_se"]
        zl = (r["loss_sim"] - r["loss_closed"]) / r["loss_se"]
        zt = (r["budget_loss_sim"] - r["budget_loss_closed"]) / r["budget_loss_se"]
        lines.append(
            f"{r['method']:<15}{r['lr']:>6.2f} | {r['var1_closed']:>13.4e}{r['var1_sim']:>11.4e}"
            f"{r['var1_rel_err']:>+8.2%}{z1:>+6.1f} | {r['loss_closed']:>12.4e}{r['loss_sim']:>11.4e}"
            f"{r['loss_rel_err']:>+8.2%}{zl:>+6.1f} | {r['budget_loss_closed']:>13.4e}"
            f"{r['budget_loss_sim']:>11.4e}{r['budget_loss_rel_err']:>+8.2%}{zt:>+6.1f}"
        )
    return "\n".join(lines)


def _loss_curves(nqm: NQM, lrs: list[float], k: int, alpha: float | None, budget: int) -> tuple[Tensor, Tensor]:
    """Closed-form stationary expected loss and expected loss after `budget` steps from x* + 1,
    over a list of learning rates."""
    n = torch.tensor([budget // k])
    stationary = [expected_loss(nqm, stationary_variance(lr, nqm.h, nqm.sigma2, k, alpha)) for lr in lrs]
    after = [expected_loss(nqm, second_moment(lr, nqm, k, alpha, torch.ones(()), n))[0] for lr in lrs]
    return torch.stack(stationary), torch.stack(after)


def plot(rows: list[dict], settings: Settings, path: Path) -> None:
    """Three panels: (a) the stationary expected loss and (b) the expected loss after `budget`
    steps from x = x* + 1, against the learning rate, closed forms as lines and simulations as
    markers (error bars ±2 SE); (c) from the closed forms, each method's loss after `budget` steps
    divided by SGD's at the learning rate that gives SGD the same stationary loss: below 1, the
    method gets further in `budget` steps than SGD tuned to end at the same loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    nqm = NQM.paper(settings.dims)
    dense = torch.logspace(math.log10(min(settings.lrs)) - 0.1, math.log10(1.99), 120).tolist()
    # SGD's curves over a wider range, to interpolate at every other method's stationary loss;
    # dense near γ = 2 (SGD's limit for h = 1), where its loss changes fastest.
    reference = torch.cat([torch.logspace(-3, math.log10(1.5), 300), 2 - torch.logspace(math.log10(0.5), -4, 300)])
    sgd_stationary, sgd_after = _loss_curves(nqm, reference.tolist(), 5, None, settings.budget)
    methods: list[tuple[int, float | None]] = [(5, None), *settings.configs]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (k, alpha) in enumerate(methods):
        label, color = _label(k, alpha), f"C{i}"
        stationary, after = _loss_curves(nqm, dense, k, alpha, settings.budget)
        axes[0].plot(dense, stationary, color=color, label=label)
        axes[1].plot(dense, after, color=color)
        sgd_at_equal = np.exp(np.interp(stationary.log(), sgd_stationary.log(), sgd_after.log(), np.nan, np.nan))
        axes[2].plot(stationary, after.numpy() / sgd_at_equal, color=color)
        mine = [r for r in rows if r["method"] == label]
        style = {"fmt": "o", "ms": 4, "color": color, "mfc": "none"}
        for ax, key in ((axes[0], "loss"), (axes[1], "budget_loss")):
            sim, two_se = [r[f"{key}_sim"] for r in mine], [2 * r[f"{key}_se"] for r in mine]
            ax.errorbar([r["lr"] for r in mine], sim, yerr=two_se, **style)
    axes[0].set_title("(a) stationary expected loss of the slow weights")
    axes[1].set_title(f"(b) expected loss after {settings.budget} steps from x = x* + 1")
    axes[2].set_title("(c) (b) / SGD's (b) at equal stationary loss")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_xlabel("learning rate γ")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].set_ylabel("E[½ Σ h (x − x*)²]")
    axes[2].set_xlabel("stationary expected loss (closed form)")
    axes[2].set_xlim(right=20)
    axes[2].set_ylabel(f"loss after {settings.budget} steps, relative to SGD")
    axes[0].legend(title="lines: closed form, o: simulation", fontsize=8, title_fontsize=8)
    fig.suptitle(
        f"Noisy quadratic model, h_i = σ_i² = 1/i, {settings.dims} dims; LookaheadSGD vs torch.optim.SGD "
        f"({settings.chains} chains for (a), {settings.budget_chains} for (b))"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small problem and grid (seconds)")
    parser.add_argument("--plot", type=Path, default=None, help="write the figure (PNG) here")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--backend", default="auto", help="LookaheadSGD backend (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    rows = run_grid(settings, args.backend, args.seed)
    backend = LookaheadSGD([torch.zeros(1)], lr=0.1, backend=args.backend).backend  # what "auto" resolves to
    print(f"NQM h_i = sigma_i^2 = 1/i, {settings.dims} dims, {settings.chains} chains, backend {backend}")
    print("Var x1: variance of the h = 1 coordinate; loss: E[1/2 sum h (x - x*)^2] at sync points after burn-in;")
    print("closed: the exact expectation at the measured sync points (within 0.1 % of the fixed point);")
    print(f"loss@T: after T = {settings.budget} steps from x = x* + 1; z = (sim - closed) / standard error")
    print(format_table(rows))
    if args.plot is not None:
        plot(rows, settings, args.plot)
        print(f"wrote {args.plot}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"settings": settings.__dict__, "backend": backend, "seed": args.seed, "rows": rows}, indent=1)
            + "\n"
        )
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
