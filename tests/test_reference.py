"""The math of Lookahead, checked against torch.optim and against Algorithm 1 written out by hand.

Tests that go through the optimizer classes take the `backend` fixture, so they run on the
reference ("eager") and on every other usable backend. On "eager" the reference repeats
torch.optim's single-tensor updates operation for operation, so comparisons with torch.optim
are bit for bit there; other backends only need to agree within `testing.TOLERANCES`.

The hand-written side (`HandLookahead`) is a plain torch.optim optimizer plus explicit φ
bookkeeping; it never calls lookahead_fused.reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, reference
from lookahead_fused.testing import TOLERANCES

TORCH_OPTIM = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
LOOKAHEAD = {"sgd": LookaheadSGD, "adam": LookaheadAdam, "adamw": LookaheadAdamW}
MOMENTUM_KEY = {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg"}

# One configuration per inner optimizer with its interesting flags on, used where the test is
# about the Lookahead part rather than about the inner flags.
INNER = {
    "sgd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "adam": dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.05),
    "adamw": dict(lr=0.01, weight_decay=0.1),
}


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def make_params(seed: int, dtype: torch.dtype = torch.float32, shapes=((4, 3), (5,), ())) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params: Sequence[Tensor], step: int, *, none: Sequence[int] = (), seed: int = 0) -> None:
    """g = 0.5 θ + ξ with ξ fixed by (seed, step): the gradient depends on θ, so two
    trajectories that ever differ keep differing, and two copies of the same parameters
    get the same gradients. Parameters listed in `none` get `.grad = None`."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.grad = None if i in none else 0.5 * p.detach() + noise


def assert_matches(backend: str, got: Tensor, want: Tensor, what: str = "") -> None:
    """Bit for bit on "eager" (the reference repeats torch.optim operation for operation),
    within TOLERANCES on any other backend."""
    if backend == "eager":
        assert got.dtype == want.dtype and torch.equal(got, want), (
            f"{what}: not bit-identical, max abs diff {(got.double() - want.double()).abs().max().item():.3g}"
        )
    else:
        torch.testing.assert_close(got, want, **TOLERANCES[want.dtype], msg=lambda m: f"{what}: {m}")


class HandLookahead:
    """Algorithm 1 around a plain torch.optim optimizer, independent of reference.py:

        φ ← θ;  every step: inner.step(); t ← t + 1;
        if t mod k == 0: φ ← φ + α(θ − φ); θ ← φ; then the inner-state policy.

    `alpha_fn`, when given, returns the α of each sync (adaptive α); it is called before φ moves.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        kind: str,
        *,
        k: int,
        alpha: float,
        inner_state: str = "maintain",
        alpha_fn: Callable[[HandLookahead], float] | None = None,
    ) -> None:
        self.inner, self.kind, self.k, self.alpha = inner, kind, k, alpha
        self.inner_state, self.alpha_fn = inner_state, alpha_fn
        self.params = [p for g in inner.param_groups for p in g["params"]]
        self.slow = [p.detach().clone() for p in self.params]
        self.cached: dict[int, Tensor] = {}
        self.t = 0
        self.alphas: list[float] = []

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.t += 1
        if self.t % self.k != 0:
            return
        alpha = self.alpha if self.alpha_fn is None else self.alpha_fn(self)
        self.alphas.append(alpha)
        for i, (p, slow) in enumerate(zip(self.params, self.slow, strict=True)):
            # φ ← φ + α(θ − φ). torch.lerp is torch's own spelling of this formula; it fixes
            # the fp32 rounding, which a bit-for-bit comparison needs to be well defined.
            slow.lerp_(p, alpha)
            p.copy_(slow)  # θ ← φ
            if self.inner_state == "reset":
                # torch.optim initialises the state of a parameter it has no state for: the
                # inner optimizer restarts exactly as a new one would.
                self.inner.state.pop(p, None)
            elif self.inner_state == "pullback":
                m = self.inner.state[p].get(MOMENTUM_KEY[self.kind])
                if m is not None:
                    cached = self.cached.get(i, torch.zeros_like(m))
                    m.mul_(alpha).add_(cached, alpha=1 - alpha)  # m ← α m + (1 − α) m_cached
                    self.cached[i] = m.clone()  # m_cached ← m


def torch_inner(kind: str, params: Sequence[Tensor], **options: Any) -> torch.optim.Optimizer:
    # foreach=False: the single-tensor path, the one the reference repeats.
    return TORCH_OPTIM[kind](params, foreach=False, **options)


# ---------------------------------------------------------------------------------------
# α = 1: a Lookahead optimizer is its inner optimizer.
# ---------------------------------------------------------------------------------------

ALPHA_ONE_CASES = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True)),
    ("sgd", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True)),
    ("adam", dict(lr=0.01, weight_decay=0.01, maximize=True)),
    ("adamw", dict(lr=0.01)),
    ("adamw", dict(lr=0.01, betas=(0.7, 0.9), weight_decay=0.1, amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize(
    "kind,options", ALPHA_ONE_CASES, ids=lambda x: x if isinstance(x, str) else ",".join(map(str, x.items()))
)
@pytest.mark.parametrize("k", [1, 4])
def test_alpha_one_follows_torch_optim(backend: str, kind: str, options: dict[str, Any], k: int) -> None:
    # φ + 1·(θ − φ) is θ (torch.lerp with weight 1 returns the end point exactly), so every
    # sync leaves θ where the inner step put it and the state is maintained.
    params = make_params(seed=1)
    mirror = clone_params(params)
    opt = LOOKAHEAD[kind](params, k=k, alpha=1.0, backend=backend, **options)
    inner = torch_inner(kind, mirror, **options)
    for step in range(15):
        set_grads(params, step)
        set_grads(mirror, step)
        opt.step()
        inner.step()
        for i, (p, q) in enumerate(zip(params, mirror, strict=True)):
            assert_matches(backend, p.detach(), q.detach(), f"step {step + 1} param {i}")
    for i, (p, q) in enumerate(zip(params, mirror, strict=True)):
        for key, want in inner.state[q].items():
            if isinstance(want, Tensor):
                assert_matches(backend, opt.state[p][key], want, f"param {i} state {key}")


# ---------------------------------------------------------------------------------------
# Algorithm 1 written out by hand.
# ---------------------------------------------------------------------------------------


def run_side_by_side(
    backend: str,
    kind: str,
    options: dict[str, Any],
    *,
    k: int,
    alpha: float,
    inner_state: str,
    steps: int,
    none_at: Callable[[int], Sequence[int]] = lambda step: (),
) -> None:
    """Step LookaheadX(backend) and HandLookahead(torch.optim) on the same gradients,
    comparing θ and φ after every step."""
    params = make_params(seed=2)
    mirror = clone_params(params)
    opt = LOOKAHEAD[kind](params, k=k, alpha=alpha, inner_state=inner_state, backend=backend, **options)
    hand = HandLookahead(torch_inner(kind, mirror, **options), kind, k=k, alpha=alpha, inner_state=inner_state)
    for step in range(steps):
        set_grads(params, step, none=none_at(step))
        set_grads(mirror, step, none=none_at(step))
        opt.step()
        hand.step()
        for i, (p, q, slow) in enumerate(zip(params, mirror, hand.slow, strict=True)):
            assert_matches(backend, p.detach(), q.detach(), f"step {step + 1} param {i}")
            assert_matches(backend, opt.state[p]["slow_weights"], slow, f"step {step + 1} slow weights {i}")


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_algorithm_1_by_hand(backend: str, kind: str, alpha: float) -> None:
    # Four full cycles of k = 4 and two steps into the fifth.
    run_side_by_side(backend, kind, INNER[kind], k=4, alpha=alpha, inner_state="maintain", steps=18)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("inner_state", ["reset", "pullback"])
def test_inner_state_policies_by_hand(backend: str, kind: str, inner_state: str) -> None:
    # "reset": the hand side drops torch.optim's state at each sync, so after every sync the
    # trajectory is that of a fresh torch.optim optimizer started from θ = φ.
    # "pullback": the hand side interpolates torch.optim's momentum / exp_avg in place.
    # The second parameter misses its gradient now and then (no inner step, still synced).
    run_side_by_side(
        backend, kind, INNER[kind], k=3, alpha=0.6, inner_state=inner_state, steps=14,
        none_at=lambda step: (1,) if step % 4 == 1 else (),
    )  # fmt: skip


def test_k1_is_sgd_with_scaled_lr(backend: str) -> None:
    # k = 1: θ' = θ + α((θ − l·g) − θ) = θ − α·l·g, plain SGD with lr α·l. The two sides round
    # differently (lerp vs one multiply), hence the fp32 tolerance even on "eager".
    alpha, lr = 0.3, 0.2
    params = make_params(seed=3)
    mirror = clone_params(params)
    opt = LookaheadSGD(params, lr=lr, k=1, alpha=alpha, backend=backend)
    sgd = torch.optim.SGD(mirror, lr=alpha * lr, foreach=False)
    for step in range(12):
        set_grads(params, step)
        set_grads(mirror, step)
        opt.step()
        sgd.step()
        for p, q in zip(params, mirror, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_sync_moves_alpha_of_the_way(backend: str, kind: str) -> None:
    k, alpha = 3, 0.35
    params = make_params(seed=4)
    theta0 = [p.detach().clone() for p in params]
    mirror = clone_params(params)
    opt = LOOKAHEAD[kind](params, k=k, alpha=alpha, backend=backend, **INNER[kind])
    inner = torch_inner(kind, mirror, **INNER[kind])
    for step in range(3 * k):
        set_grads(params, step)
        slow_before = [opt.state[p]["slow_weights"].clone() for p in params] if step else theta0
        opt.step()
        if step < k:  # the first cycle: the inner optimizer alone gives θ_k^inner
            set_grads(mirror, step)
            inner.step()
        for i, (p, before) in enumerate(zip(params, slow_before, strict=True)):
            slow = opt.state[p]["slow_weights"]
            if (step + 1) % k == 0:
                # After a sync θ and φ are the same values, bit for bit, in the same dtype.
                assert slow.dtype == p.dtype and torch.equal(p.detach(), slow)
            else:
                assert torch.equal(slow, before), f"step {step + 1}: a plain step moved φ of param {i}"
        if step == k - 1:
            for p, p0, q in zip(params, theta0, mirror, strict=True):
                want = p0.double() + alpha * (q.detach().double() - p0.double())  # θ0 + α(θ_k − θ0)
                torch.testing.assert_close(p.detach().double(), want, **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------
# Closed forms under a constant gradient.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum,inner_state", [(0.0, "maintain"), (0.9, "maintain"), (0.9, "reset")])
def test_constant_gradient_closed_form(backend: str, momentum: float, inner_state: str) -> None:
    # SGD (dampening 0) on a constant gradient g. torch.optim's buffer starts at b_1 = g and
    # b_j = β b_{j−1} + g, so b_j = g (1 − β^j)/(1 − β) (β = 0: b_j = g, plain SGD), and the
    # step j moves θ by −lr·b_j. A cycle starting at φ ends at θ_k = φ − lr Σ_j b_j and the sync
    # gives φ' = φ + α(θ_k − φ) = φ − α·lr Σ_j b_j, so after n cycles θ = φ_n is
    #   θ0 − α·lr·Σ_{j over the n·k steps} b_j.
    # "maintain" keeps the buffer (and its step count) across syncs, so j runs 1..nk:
    #   Σ b_j = g/(1 − β)·[nk − β(1 − β^{nk})/(1 − β)]        (β = 0: nk·g, i.e. θ0 − n·α·k·lr·g).
    # "reset" restarts the buffer each cycle, so j runs 1..k n times:
    #   Σ b_j = n·g/(1 − β)·[k − β(1 − β^k)/(1 − β)].
    # fp64 so that the only difference is rounding of a few dozen operations.
    k, alpha, lr, beta = 4, 0.6, 0.05, momentum
    params = make_params(seed=5, dtype=torch.float64)
    theta0 = [p.detach().clone() for p in params]
    g = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i), dtype=torch.float64)
        for i, p in enumerate(params)
    ]
    opt = LookaheadSGD(params, lr=lr, momentum=momentum, k=k, alpha=alpha, inner_state=inner_state, backend=backend)

    def geometric(m: int) -> float:  # Σ_{j=1..m} β^j
        return beta * (1 - beta**m) / (1 - beta)

    for n in range(1, 6):
        for _ in range(k):
            for p, gi in zip(params, g, strict=True):
                p.grad = gi.clone()
            opt.step()
        if inner_state == "maintain":
            total = (n * k - geometric(n * k)) / (1 - beta)
        else:
            total = n * (k - geometric(k)) / (1 - beta)
        for p, p0, gi in zip(params, theta0, g, strict=True):
            torch.testing.assert_close(p.detach(), p0 - alpha * lr * total * gi, **TOLERANCES[torch.float64])


# ---------------------------------------------------------------------------------------
# Inner-state policies, state by state.
# ---------------------------------------------------------------------------------------


def test_reset_adam_state_is_fresh_after_sync(backend: str) -> None:
    k = 3
    params = make_params(seed=6)
    opt = LookaheadAdam(params, lr=0.01, amsgrad=True, k=k, alpha=0.5, inner_state="reset", backend=backend)
    for step in range(k):
        set_grads(params, step)
        opt.step()
    for p in params:
        state = opt.state[p]
        assert state["step"].item() == 0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.count_nonzero(state[key]) == 0, key
    # From here the trajectory is that of a fresh torch.optim.Adam started from θ = φ.
    mirror = clone_params(params)
    fresh = torch_inner("adam", mirror, lr=0.01, amsgrad=True)
    for step in range(k, 2 * k - 1):
        set_grads(params, step)
        set_grads(mirror, step)
        opt.step()
        fresh.step()
        for p, q in zip(params, mirror, strict=True):
            assert_matches(backend, p.detach(), q.detach(), f"step {step + 1}")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                assert_matches(backend, opt.state[p][key], fresh.state[q][key], f"step {step + 1} {key}")


def test_reset_sgd_momentum_restarts_from_the_gradient(backend: str) -> None:
    # torch.optim.SGD's first buffer is the gradient itself, not β·0 + (1 − dampening)·g:
    # dampening ≠ 0 tells the two apart.
    k = 2
    params = make_params(seed=7)
    opt = LookaheadSGD(
        params, lr=0.05, momentum=0.9, dampening=0.4, k=k, alpha=0.5, inner_state="reset", backend=backend
    )
    for step in range(2 * k + 1):
        set_grads(params, step)
        grads = [p.grad.clone() for p in params]
        opt.step()
        if step % k == 0:  # the first step of a cycle (and of the run)
            for p, g in zip(params, grads, strict=True):
                assert torch.equal(opt.state[p]["momentum_buffer"], g)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_pullback_two_syncs_by_hand(backend: str, kind: str) -> None:
    # Gradients that do not depend on θ make the momentum sequence computable by hand:
    #   SGD (dampening 0): b ← β b + g (the first b is g);   Adam: m ← β1 m + (1 − β1) g.
    # k = 2, four steps, m_cached = 0 at the start:
    #   sync 1: m ← α m_2,                 m_cached ← α m_2
    #   sync 2: m ← α m_4 + (1 − α) α m_2   where m_3, m_4 continue from the pulled-back m.
    # Adam's exp_avg_sq is maintained: v ← β2 v + (1 − β2) g² over all four steps.
    k, alpha, beta, beta2 = 2, 0.4, 0.7, 0.95
    params = make_params(seed=8, dtype=torch.float64, shapes=((6,), (2, 3)))
    if kind == "sgd":
        opt = LookaheadSGD(params, lr=0.1, momentum=beta, k=k, alpha=alpha, inner_state="pullback", backend=backend)
    else:
        opt = LookaheadAdam(
            params, lr=0.1, betas=(beta, beta2), k=k, alpha=alpha, inner_state="pullback", backend=backend
        )
    key = MOMENTUM_KEY[kind]
    gen = torch.Generator().manual_seed(80)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(2 * k)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    cached = [torch.zeros_like(p) for p in params]
    tol = TOLERANCES[torch.float64]
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(gs):
            if kind == "sgd":
                m[i] = g.clone() if step == 0 else beta * m[i] + g
            else:
                m[i] = beta * m[i] + (1 - beta) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
            if (step + 1) % k == 0:
                m[i] = alpha * m[i] + (1 - alpha) * cached[i]
                cached[i] = m[i].clone()
            state = opt.state[params[i]]
            torch.testing.assert_close(state[key], m[i], **tol)
            torch.testing.assert_close(state["cached_" + key], cached[i], **tol)
            if kind == "adam":
                torch.testing.assert_close(state["exp_avg_sq"], v[i], **tol)


# ---------------------------------------------------------------------------------------
# Parameters without a gradient; per-group k and alpha.
# ---------------------------------------------------------------------------------------


def test_param_without_grad_is_synced_but_not_updated(backend: str) -> None:
    k, alpha = 2, 0.5
    params = make_params(seed=9)
    a, b = params[0], params[1]
    opt = LookaheadAdam(params, lr=0.05, k=k, alpha=alpha, backend=backend)
    set_grads(params, 0)
    opt.step()  # step 1: every parameter has a gradient

    def snapshot(p: Tensor) -> dict[str, Tensor]:
        return {key: value.clone() for key, value in opt.state[p].items()}

    # Step 2 is a sync; b has no gradient.
    before, theta_b = snapshot(b), b.detach().clone()
    set_grads(params, 1, none=(1,))
    opt.step()
    after = opt.state[b]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(after[key], before[key]), f"{key} moved without a gradient"
    want_slow = before["slow_weights"].double() + alpha * (theta_b.double() - before["slow_weights"].double())
    torch.testing.assert_close(after["slow_weights"].double(), want_slow, **TOLERANCES[torch.float32])
    assert not torch.equal(after["slow_weights"], before["slow_weights"])  # φ did move toward θ
    assert torch.equal(b.detach(), after["slow_weights"])  # θ ← φ
    assert torch.equal(after["lookahead_step"], opt.state[a]["lookahead_step"])  # one counter per group

    # Step 3 is a plain step; b has no gradient: nothing of b moves but the group's counter.
    before, theta_b = snapshot(b), b.detach().clone()
    set_grads(params, 2, none=(1,))
    opt.step()
    assert torch.equal(b.detach(), theta_b)
    for key, value in opt.state[b].items():
        if key != "lookahead_step":
            assert torch.equal(value, before[key]), key
    assert opt.state[b]["lookahead_step"].item() == before["lookahead_step"].item() + 1


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_per_group_k_and_alpha(backend: str, kind: str) -> None:
    options = INNER[kind]
    params = make_params(seed=10)
    first, second = clone_params(params[:2]), clone_params(params[2:])
    settings = [dict(k=2, alpha=0.3), dict(k=5, alpha=0.8)]
    opt = LOOKAHEAD[kind](
        [{"params": params[:2], **settings[0]}, {"params": params[2:], **settings[1]}],
        backend=backend, **options,
    )  # fmt: skip
    alone = [
        LOOKAHEAD[kind](ps, backend=backend, **options, **s) for ps, s in zip((first, second), settings, strict=True)
    ]
    for step in range(12):
        set_grads(params, step)
        set_grads(first + second, step)
        opt.step()
        for o in alone:
            o.step()
        for i, (p, q) in enumerate(zip(params, first + second, strict=True)):
            assert_matches(backend, p.detach(), q.detach(), f"step {step + 1} param {i}")


# ---------------------------------------------------------------------------------------
# Adaptive α (paper §2.1).
# ---------------------------------------------------------------------------------------


def direct_alpha_hat(theta0: Tensor, thetak: Tensor, grad: Tensor, curvature: Tensor, *, alpha_low: float) -> float:
    """The paper's formula as written, in float64, with Â = diag(curvature):
    α̂ = clip(((θ0 − (θk − Â⁻¹g))ᵀ Â (θ0 − θk)) / ((θ0 − θk)ᵀ Â (θ0 − θk)), α_low, 1)."""
    a_mat = torch.diag(curvature.double())
    d = (theta0 - thetak).double()
    newton = thetak.double() - torch.linalg.solve(a_mat, grad.double())
    ratio = ((theta0.double() - newton) @ a_mat @ d) / (d @ a_mat @ d)
    return min(max(ratio.item(), alpha_low), 1.0)


def adam_curvature(v: Tensor, step: float, *, lr: float, beta2: float, eps: float) -> Tensor:
    """Â = (√v̂ + ε)/lr, v̂ = v/(1 − β2^step): the curvature Adam's step assumes, as documented."""
    return ((v.double() / (1 - beta2**step)).sqrt() + eps) / lr


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("target,expected", [(0.45, "inside"), (1.7, "one"), (-2.0, "low")])
def test_adaptive_alpha_matches_the_paper_formula(amsgrad: bool, target: float, expected: str) -> None:
    # Three parameters with their own step counts (per-parameter bias correction); the third
    # has no gradient and must not enter the sums. g is built so that 1 + gᵀd/(dᵀÂd) = target
    # (ξ ⟂ d carries the rest), which puts α̂ inside, at 1, or at alpha_low.
    lr, beta2, eps, alpha_low = 0.01, 0.99, 1e-8, 0.2
    gen = torch.Generator().manual_seed(11)
    shapes, steps = ((5,), (2, 3), (4,)), (3.0, 7.0, 2.0)
    rand = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    params, states, grads, pieces = [], [], [], []
    for i, (shape, step) in enumerate(zip(shapes, steps, strict=True)):
        thetak, theta0 = rand(shape), rand(shape)
        v, v_max = rand(shape).square(), rand(shape).square()
        v_max = torch.maximum(v, v_max)
        state = {"slow_weights": theta0, "exp_avg_sq": v, "max_exp_avg_sq": v_max, "step": torch.tensor(step)}
        curvature = adam_curvature(v_max if amsgrad else v, step, lr=lr, beta2=beta2, eps=eps)
        d = theta0 - thetak
        xi = rand(shape)
        xi -= (xi.flatten() @ d.flatten()) / (d.flatten() @ d.flatten()) * d
        g = (target - 1) * curvature * d + xi
        params.append(thetak)
        states.append(state)
        grads.append(None if i == 2 else g)
        if i != 2:
            pieces.append((theta0.flatten(), thetak.flatten(), g.flatten(), curvature.flatten()))
    want = direct_alpha_hat(*(torch.cat(x) for x in zip(*pieces, strict=True)), alpha_low=alpha_low)
    got = reference.adaptive_alpha(
        params, states, grads, lr=lr, beta2=beta2, eps=eps, amsgrad=amsgrad, alpha=0.5, alpha_low=alpha_low
    )
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    # The construction landed where intended: the test covers each clipping branch.
    assert want == pytest.approx({"inside": target, "one": 1.0, "low": alpha_low}[expected], rel=1e-9)


def test_adaptive_alpha_without_movement_falls_back_to_alpha() -> None:
    # d = 0: the quadratic model is flat along the (empty) segment; the group's α is used.
    p = torch.randn(4, dtype=torch.float64)
    state = {"slow_weights": p.clone(), "exp_avg_sq": torch.ones(4, dtype=torch.float64), "step": torch.tensor(1.0)}
    got = reference.adaptive_alpha(
        [p], [state], [torch.ones(4, dtype=torch.float64)],
        lr=0.1, beta2=0.9, eps=1e-8, amsgrad=False, alpha=0.37, alpha_low=0.1,
    )  # fmt: skip
    assert got == 0.37


@pytest.mark.parametrize("s,expected", [(0.4, 0.4), (1.6, 1.0), (0.05, 0.2)])
def test_adaptive_alpha_is_the_line_minimiser_of_a_quadratic(s: float, expected: float) -> None:
    # On L(θ) = ½(θ − c)ᵀH(θ − c) with Â = H and g = ∇L(θk) = H(θk − c), the formula is the
    # exact minimiser of L along θ0 + α(θk − θ0): with u = θk − θ0 = −d,
    #   α* = −(θ0 − c)ᵀHu / uᵀHu,  and  1 + gᵀd/(dᵀHd) = 1 − (θ0 + u − c)ᵀHu / uᵀHu = α*.
    # Put the minimum at c = θ0 + s·u (+ an H-orthogonal offset, which does not move α*):
    # s inside (alpha_low, 1) gives α̂ = s; s > 1 (θk stopped short of the minimum) gives 1;
    # s < alpha_low (θk overshot far past a minimum near θ0) gives alpha_low.
    lr, beta2, eps, alpha_low, step = 0.05, 0.9, 1e-8, 0.2, 4.0
    gen = torch.Generator().manual_seed(12)
    n = 8
    h = torch.rand(n, generator=gen, dtype=torch.float64) * 4 + 0.5
    theta0, thetak = (
        torch.randn(n, generator=gen, dtype=torch.float64),
        torch.randn(n, generator=gen, dtype=torch.float64),
    )
    u = thetak - theta0
    offset = torch.randn(n, generator=gen, dtype=torch.float64)
    offset -= (offset @ (h * u)) / (u @ (h * u)) * u  # H-orthogonal to u
    c = theta0 + s * u + offset
    # Adam's Â = (√(v/(1 − β2^step)) + ε)/lr equals H for this v:
    v = (lr * h - eps).square() * (1 - beta2**step)
    state = {"slow_weights": theta0, "exp_avg_sq": v, "step": torch.tensor(step)}
    got = reference.adaptive_alpha(
        [thetak], [state], [h * (thetak - c)],
        lr=lr, beta2=beta2, eps=eps, amsgrad=False, alpha=0.5, alpha_low=alpha_low,
    )  # fmt: skip
    assert got == pytest.approx(expected, rel=1e-9)


def test_adaptive_alpha_through_the_optimizer(backend: str) -> None:
    # LookaheadAdam(adaptive_alpha=True) against HandLookahead around torch.optim.Adam whose α
    # at each sync is the paper's formula computed here from torch.optim's own state, with the
    # documented choices: Â = (√v̂ + ε)/lr per parameter, g = the gradient of the last inner
    # step, one α̂ for the group. A quadratic gives θ-dependent gradients. fp64: the two sides
    # compute α̂ in different orders, so even "eager" is compared within TOLERANCES.
    k, lr, betas, eps, alpha_low = 3, 0.3, (0.9, 0.99), 1e-8, 0.2
    params = make_params(seed=13, dtype=torch.float64)
    mirror = clone_params(params)
    gen = torch.Generator().manual_seed(130)
    curv = [torch.rand(p.shape, generator=gen, dtype=torch.float64) * 3 + 0.2 for p in params]

    def set_quadratic_grads(ps: Sequence[Tensor]) -> None:
        for p, h in zip(ps, curv, strict=True):
            p.grad = h * p.detach()

    def alpha_fn(hand: HandLookahead) -> float:
        pieces = []
        for p, slow in zip(hand.params, hand.slow, strict=True):
            state = hand.inner.state[p]
            a = adam_curvature(state["exp_avg_sq"], state["step"].item(), lr=lr, beta2=betas[1], eps=eps)
            pieces.append((slow.flatten(), p.detach().flatten(), p.grad.flatten(), a.flatten()))
        return direct_alpha_hat(*(torch.cat(x) for x in zip(*pieces, strict=True)), alpha_low=alpha_low)

    opt = LookaheadAdam(
        params, lr=lr, betas=betas, eps=eps, k=k, alpha=0.5, adaptive_alpha=True, alpha_low=alpha_low, backend=backend
    )
    hand = HandLookahead(
        torch_inner("adam", mirror, lr=lr, betas=betas, eps=eps), "adam", k=k, alpha=0.5, alpha_fn=alpha_fn
    )
    for _step in range(5 * k):
        set_quadratic_grads(params)
        set_quadratic_grads(mirror)
        opt.step()
        hand.step()
        for p, q, slow in zip(params, mirror, hand.slow, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float64])
            torch.testing.assert_close(opt.state[p]["slow_weights"], slow, **TOLERANCES[torch.float64])
    # The run exercised α̂ away from the group's α = 0.5 (else this would test nothing new)
    # and strictly inside (alpha_low, 1) at least once.
    assert any(alpha_low < a < 1 and abs(a - 0.5) > 1e-3 for a in hand.alphas), hand.alphas
