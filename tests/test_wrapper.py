"""Lookahead(optimizer, k, alpha, inner_state): the generic wrapper around any torch.optim
optimizer, checked against the eager reference (through LookaheadSGD/Adam/AdamW with
backend="eager"), against plain inner optimizers, and with the torch.optim machinery users
plug into it (schedulers, GradScaler, add_param_group, checkpoints, hooks)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lookahead_fused import Lookahead
from lookahead_fused.testing import CLASSES, TOLERANCES, Variant, make_params, variants

TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
STEPS = 7
K = 3
ALPHA = 0.5


def _grads(params: list[Tensor], gen: torch.Generator, step: int) -> list[Tensor | None]:
    """Random gradients; the (33,) parameter has one only on every third step: with k = 3 it
    has none at the syncs (no inner update there, still synced)."""
    out: list[Tensor | None] = []
    for i, p in enumerate(params):
        if i == 1 and step % 3 != 0:
            out.append(None)
        else:
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            out.append(g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g)
    return out


def _set_grads(params: list[Tensor], grads: list[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def _clone(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _split(params: list[Tensor], variant: Variant) -> list[dict] | list[Tensor]:
    """The param groups run_against_reference uses: with 2 groups, the second has its own
    k and alpha."""
    if variant.groups == 1:
        return params
    split = len(params) // 2
    return [{"params": params[:split]}, {"params": params[split:], "k": K + 1, "alpha": ALPHA + 0.25}]


def _assert_state_dicts_match(got: dict, want: dict, where: str) -> None:
    """Every state entry the wrapper has equals, bit for bit, the entry of that name in `want`."""
    for index, entry in got["state"].items():
        for key, value in entry.items():
            if not isinstance(value, Tensor) or key not in want["state"].get(index, {}):
                continue
            assert torch.equal(value, want["state"][index][key].to(value.dtype)), f"{where}: param {index} {key}"


WRAPPABLE = [v for v in variants() if not v.kwargs.get("adaptive_alpha", False)]


@pytest.mark.parametrize("variant", WRAPPABLE, ids=lambda v: v.name)
def test_matches_eager_reference(variant: Variant) -> None:
    """Lookahead(torch.optim.X(...)) == LookaheadX(..., backend="eager"): parameters and
    every shared state entry after every step, for every inner flag and inner_state policy
    (per-group k/alpha set in the inner optimizer's own groups). On fp32 both run torch's
    single-tensor operations in the same order, so the agreement is exact, not merely
    within TOLERANCES (the "reset" inner state is absent in the wrapper, zeros in the
    reference: only the entries both have are compared)."""
    options = variant.kwargs
    inner_state = options.pop("inner_state", "maintain")
    params = make_params(torch.float32, "cpu")
    ref_params = _clone(params)
    inner = TORCH_CLASSES[variant.kind](_split(params, variant), **options)
    opt = Lookahead(inner, k=K, alpha=ALPHA, inner_state=inner_state)
    ref = CLASSES[variant.kind](
        _split(ref_params, variant), k=K, alpha=ALPHA, inner_state=inner_state, backend="eager", **options
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        grads = _grads(params, gen, step)
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
            assert torch.equal(p, q), f"step {step + 1} param {i}"
        _assert_state_dicts_match(opt.state_dict(), ref.state_dict(), f"step {step + 1}")
    counts = [g["lookahead_step"] for g in opt.param_groups]
    assert counts == [STEPS] * len(opt.param_groups)


INNER_FACTORIES = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.01),
}


def _run_plain(make_inner, params: list[Tensor], grads_per_step: list[list[Tensor | None]]) -> list[Tensor]:
    inner = make_inner(params)
    for grads in grads_per_step:
        _set_grads(params, grads)
        inner.step()
    return params


@pytest.mark.parametrize("name", sorted(INNER_FACTORIES))
def test_alpha_one_follows_inner_optimizer(name: str) -> None:
    """With alpha = 1 the sync puts θ back where it is: the trajectory is the inner one, bit for bit."""
    params = make_params(torch.float32, "cpu")
    plain = _clone(params)
    gen = torch.Generator().manual_seed(2)
    all_grads = [_grads(params, gen, step) for step in range(STEPS)]
    opt = Lookahead(INNER_FACTORIES[name](params), k=2, alpha=1.0)
    inner = INNER_FACTORIES[name](plain)
    for grads in all_grads:
        _set_grads(params, grads)
        _set_grads(plain, grads)
        opt.step()
        inner.step()
        for p, q in zip(params, plain, strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["radam", "adagrad"])
@pytest.mark.parametrize("inner_state", ["maintain", "reset"])
def test_first_cycle_against_plain_run(name: str, inner_state: str) -> None:
    """Wrapped RAdam/Adagrad: the k - 1 first steps are the inner ones, and after exactly k
    steps θ = φ = θ0 + α (θ_k − θ0), with θ_k a plain run from the same start."""
    alpha = 0.3
    params = make_params(torch.float32, "cpu")
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(3)
    all_grads = [_grads(params, gen, step) for step in range(K)]
    plain = _run_plain(INNER_FACTORIES[name], _clone(params), all_grads)
    opt = Lookahead(INNER_FACTORIES[name](params), k=K, alpha=alpha, inner_state=inner_state)
    for step, grads in enumerate(all_grads):
        _set_grads(params, grads)
        opt.step()
        if step == K - 2:
            partial = _run_plain(INNER_FACTORIES[name], _clone(start), all_grads[: K - 1])
            assert all(torch.equal(p, q) for p, q in zip(params, partial, strict=True))
    slow = opt.state_dict()["state"]
    for i, (p, p0, pk) in enumerate(zip(params, start, plain, strict=True)):
        want = p0 + alpha * (pk.detach() - p0)
        torch.testing.assert_close(p.detach(), want, **TOLERANCES[torch.float32])
        assert torch.equal(p, slow[i]["slow_weights"])
        # "reset" drops the inner state, so the inner optimizer starts afresh next step.
        assert (p in opt.state and len(opt.state[p]) > 0) == (inner_state == "maintain")


def test_reset_restarts_inner_state_like_a_new_optimizer() -> None:
    """After a "reset" sync the next k steps are those of a fresh inner optimizer started
    from the synced weights."""
    params = make_params(torch.float32, "cpu")
    gen = torch.Generator().manual_seed(4)
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=2, alpha=0.5, inner_state="reset")
    for step in range(2):
        _set_grads(params, _grads(params, gen, step))
        opt.step()
    fresh = _clone(params)
    later = [_grads(params, gen, 2)]
    _run_plain(INNER_FACTORIES["adam"], fresh, later)
    _set_grads(params, later[0])
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, fresh, strict=True))


def test_per_group_k_and_alpha_via_add_param_group() -> None:
    """Groups added with their own k/alpha sync on their own schedule; a group added
    without them takes the constructor's; each group counts from its own start, with slow
    weights taken from its parameters at its first step."""
    a, b, c = (torch.randn(6, requires_grad=True) for _ in range(3))
    opt = Lookahead(torch.optim.SGD([a], lr=0.1), k=2, alpha=0.5)
    opt.add_param_group({"params": [b], "k": 3, "alpha": 0.25})
    gen = torch.Generator().manual_seed(5)
    history = []
    for step in range(6):
        if step == 2:
            c.data.mul_(2)  # changed after add_param_group, before its first step: φ starts here
            opt.add_param_group({"params": [c]})
        for p in (a, b, c):
            p.grad = torch.randn(6, generator=gen)
        before = [p.detach().clone() for p in (a, b, c)]
        opt.step()
        history.append(before)
    assert [g["k"] for g in opt.param_groups] == [2, 3, 2]
    assert [g["alpha"] for g in opt.param_groups] == [0.5, 0.25, 0.5]
    assert [g["lookahead_step"] for g in opt.param_groups] == [6, 6, 4]
    slow = opt.state_dict()["state"]
    # The last sync of each group happened at step 6 (k=2: 2,4,6; k=3: 3,6; c: its 2nd, 4th).
    for i, p in enumerate((a, b, c)):
        assert torch.equal(p, slow[i]["slow_weights"])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_add_param_group_mid_training_matches_reference(kind: str) -> None:
    options = {"sgd": dict(lr=0.05, momentum=0.9), "adam": dict(lr=0.01)}[kind]
    params = make_params(torch.float32, "cpu")
    ref_params = _clone(params)
    opt = Lookahead(TORCH_CLASSES[kind](params[:2], **options), k=K, alpha=ALPHA, inner_state="pullback")
    ref = CLASSES[kind](ref_params[:2], k=K, alpha=ALPHA, inner_state="pullback", backend="eager", **options)
    gen = torch.Generator().manual_seed(6)
    for step in range(STEPS):
        if step == 2:
            opt.add_param_group({"params": params[2:], "alpha": 0.75})
            ref.add_param_group({"params": ref_params[2:], "alpha": 0.75})
        grads = _grads(params, gen, step)
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(params, ref_params, strict=True)), f"step {step + 1}"


@pytest.mark.parametrize("scheduler", ["steplr", "onecycle"])
def test_lr_scheduler_drives_the_inner_optimizer(scheduler: str) -> None:
    """A scheduler built on the wrapper changes the groups the inner optimizer reads
    (OneCycleLR also cycles Adam's beta1): the run equals the reference under the same
    scheduler."""
    params = make_params(torch.float32, "cpu")
    ref_params = _clone(params)
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=K, alpha=ALPHA)
    ref = CLASSES["adam"](ref_params, lr=0.01, k=K, alpha=ALPHA, backend="eager")

    def make(o):
        if scheduler == "steplr":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS)

    sched, ref_sched = make(opt), make(ref)
    gen = torch.Generator().manual_seed(7)
    lrs = []
    for step in range(STEPS):
        grads = _grads(params, gen, step)
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
        assert all(torch.equal(p, q) for p, q in zip(params, ref_params, strict=True)), f"step {step + 1}"
    assert len(set(lrs)) > 2  # the learning rate did change
    assert opt.optimizer.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


def test_grad_scaler_skipped_step_does_not_count() -> None:
    """A real GradScaler("cpu") loop with an inf injected in one step: the scaler skips
    step(), so that step changes nothing (counter included) and the run equals an unscaled
    run without that step."""
    params = make_params(torch.float32, "cpu")
    plain_params = _clone(params)
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=K, alpha=ALPHA)
    plain = Lookahead(torch.optim.Adam(plain_params, lr=0.01), k=K, alpha=ALPHA)
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(8)
    inf_step = 2
    for step in range(STEPS):
        grads = _grads(params, gen, step)
        opt.zero_grad()
        # loss = Σ <p, g>, so the scaled backward leaves scale * g in p.grad (powers of two: exact).
        loss = sum((p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None)
        scaler.scale(loss).backward()
        if step == inf_step:
            params[0].grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in params]
        count = opt.param_groups[0]["lookahead_step"]
        scaler.step(opt)
        scaler.update()
        if step == inf_step:
            assert opt.param_groups[0]["lookahead_step"] == count
            assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
            continue
        _set_grads(plain_params, grads)
        plain.step()
        assert all(torch.equal(p, q) for p, q in zip(params, plain_params, strict=True)), f"step {step + 1}"
    assert scaler.get_scale() < 2.0**16  # the inf was seen
    assert opt.param_groups[0]["lookahead_step"] == STEPS - 1


@pytest.mark.parametrize("inner_state", ["maintain", "reset", "pullback"])
def test_state_dict_round_trip_resumes_mid_cycle(inner_state: str) -> None:
    """Save after 4 steps (k = 3: one step into the second cycle) through torch.save /
    torch.load(weights_only=True), load into a new wrapper over copies of the parameters,
    and both continue bit for bit alike."""
    params = make_params(torch.float32, "cpu")
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=K, alpha=ALPHA, inner_state=inner_state)
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        _set_grads(params, _grads(params, gen, step))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert "lookahead_step" not in loaded["param_groups"][0]  # per parameter, as in the fused classes
    assert all(entry["lookahead_step"] == 4 and "slow_weights" in entry for entry in loaded["state"].values())
    assert ("cached_exp_avg" in loaded["state"][0]) == (inner_state == "pullback")

    resumed_params = _clone(params)
    resumed = Lookahead(torch.optim.Adam(resumed_params, lr=0.5), k=K, alpha=ALPHA, inner_state=inner_state)
    resumed.load_state_dict(loaded)
    assert resumed.param_groups is resumed.optimizer.param_groups  # still shared after the load
    assert resumed.param_groups[0]["lr"] == 0.01
    for p in resumed_params:  # the inner state holds no lookahead entries
        assert "slow_weights" not in resumed.state.get(p, {})
    _step_side_by_side(opt, params, resumed, resumed_params, gen, range(4, 10))
    _assert_state_dicts_match(resumed.state_dict(), opt.state_dict(), "after resume")


def _step_side_by_side(first, first_params, second, second_params, gen, steps) -> None:
    """Step two optimizers on the same gradients; their parameters must stay bit-identical."""
    for step in steps:
        grads = _grads(first_params, gen, step)
        _set_grads(first_params, grads)
        _set_grads(second_params, grads)
        first.step()
        second.step()
        assert all(torch.equal(p, q) for p, q in zip(first_params, second_params, strict=True)), f"step {step + 1}"


@pytest.mark.parametrize("inner_state", ["maintain", "pullback"])
def test_fused_checkpoint_resumes_in_wrapper(inner_state: str) -> None:
    """The layouts are the same: a mid-cycle LookaheadAdam checkpoint resumes in
    Lookahead(torch.optim.Adam) bit for bit."""
    params = make_params(torch.float32, "cpu")
    fused_params = _clone(params)
    fused = CLASSES["adam"](fused_params, lr=0.01, k=K, alpha=ALPHA, inner_state=inner_state, backend="eager")
    gen = torch.Generator().manual_seed(13)
    for step in range(4):
        _set_grads(fused_params, _grads(fused_params, gen, step))
        fused.step()
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        for p, q in zip(params, fused_params, strict=True):
            p.copy_(q)
    wrapper = Lookahead(torch.optim.Adam(params, lr=0.5), k=K, alpha=ALPHA, inner_state=inner_state)
    wrapper.load_state_dict(torch.load(buffer, weights_only=True))
    assert wrapper.param_groups[0]["lookahead_step"] == 4
    _step_side_by_side(wrapper, params, fused, fused_params, gen, range(4, 10))
    _assert_state_dicts_match(wrapper.state_dict(), fused.state_dict(), "after the move")


def test_fused_bf16_checkpoint_pullback_cache_takes_inner_dtype() -> None:
    """LookaheadAdam keeps fp32 state for bf16 parameters, torch.optim.Adam bf16 state: the
    loaded fp32 pullback cache follows the inner momentum's dtype at the next sync."""
    params = make_params(torch.bfloat16, "cpu")
    fused = CLASSES["adam"](_clone(params), lr=0.01, k=2, inner_state="pullback", backend="eager")
    gen = torch.Generator().manual_seed(14)
    for step in range(3):
        _set_grads(fused.param_groups[0]["params"], _grads(params, gen, step))
        fused.step()
    wrapper = Lookahead(torch.optim.Adam(params, lr=0.01), k=2, inner_state="pullback")
    wrapper.load_state_dict(copy.deepcopy(fused.state_dict()))
    assert wrapper.state_dict()["state"][0]["cached_exp_avg"].dtype == torch.float32
    _set_grads(params, _grads(params, gen, 3))
    wrapper.step()  # the count reaches 4: a sync
    saved = wrapper.state_dict()["state"]
    assert saved[0]["cached_exp_avg"].dtype == torch.bfloat16 == saved[0]["exp_avg"].dtype
    assert torch.equal(saved[0]["cached_exp_avg"], saved[0]["exp_avg"])
    assert saved[0]["slow_weights"].dtype == torch.float32


def test_load_inner_checkpoint_starts_slow_weights_from_parameters() -> None:
    """A checkpoint of the inner optimizer alone loads; φ then starts from θ at the next
    step (the inner Adam state is used, not re-initialised)."""
    params = make_params(torch.float32, "cpu")
    inner = torch.optim.Adam(params, lr=0.01)
    gen = torch.Generator().manual_seed(10)
    _set_grads(params, _grads(params, gen, 0))
    inner.step()
    opt = Lookahead(torch.optim.Adam(_clone(params), lr=0.01), k=1, alpha=0.5)
    opt.load_state_dict(copy.deepcopy(inner.state_dict()))  # a live state dict shares its tensors
    wrapped = opt.param_groups[0]["params"]
    assert opt.param_groups[0]["lookahead_step"] == 0
    grads = _grads(params, gen, 1)
    start = [p.detach().clone() for p in wrapped]
    _set_grads(params, grads)
    _set_grads(wrapped, grads)
    inner.step()
    opt.step()  # k = 1: θ = φ = θ0 + α (θ1 − θ0), θ1 the inner step with the loaded moments
    for p, p0, p1 in zip(wrapped, start, params, strict=True):
        torch.testing.assert_close(p.detach(), torch.lerp(p0, p1.detach(), 0.5), rtol=0, atol=0)


def test_slow_weights_swaps_and_restores_exactly() -> None:
    params = make_params(torch.float32, "cpu")
    opt = Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9), k=K, alpha=ALPHA)
    gen = torch.Generator().manual_seed(11)
    with opt.slow_weights():  # before the first step φ = θ: nothing to swap
        pass
    for step in range(K + 1):  # one step past a sync: θ and φ differ
        _set_grads(params, _grads(params, gen, step))
        opt.step()
    fast = [p.detach().clone() for p in params]
    slow = [opt.state_dict()["state"][i]["slow_weights"].clone() for i in range(len(params))]
    assert any(not torch.equal(f, s) for f, s in zip(fast, slow, strict=True))
    with opt.slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(params, slow, strict=True))
        with pytest.raises(RuntimeError, match="inside"):
            opt.step()
        with pytest.raises(RuntimeError, match="already active"):
            with opt.slow_weights():
                pass
    assert all(torch.equal(p, f) and p.stride() == f.stride() for p, f in zip(params, fast, strict=True))
    with pytest.raises(KeyError), opt.slow_weights():
        raise KeyError("the body fails")
    assert all(torch.equal(p, f) for p, f in zip(params, fast, strict=True))
    opt.step()  # usable again


def test_bf16_parameters_get_fp32_slow_weights() -> None:
    """φ is fp32 for bf16 parameters: after k steps φ = lerp(θ0, θ_k) in fp32 and θ is φ
    rounded once; slow_weights() puts φ in (rounded) and restores θ exactly."""
    params = make_params(torch.bfloat16, "cpu")
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(12)
    all_grads = [_grads(params, gen, step) for step in range(K)]
    plain = _run_plain(INNER_FACTORIES["sgd_momentum"], _clone(params), all_grads)
    opt = Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=K, alpha=ALPHA)
    for grads in all_grads:
        _set_grads(params, grads)
        opt.step()
    state = opt.state_dict()["state"]
    for i, (p, p0, pk) in enumerate(zip(params, start, plain, strict=True)):
        slow = state[i]["slow_weights"]
        assert slow.dtype == torch.float32 and p.dtype == torch.bfloat16
        assert torch.equal(slow, torch.lerp(p0.float(), pk.detach().float(), ALPHA))
        assert torch.equal(p, slow.to(torch.bfloat16))
    _set_grads(params, _grads(params, gen, K))
    opt.step()
    fast = [p.detach().clone() for p in params]
    with opt.slow_weights():
        assert all(torch.equal(p, state[i]["slow_weights"].to(torch.bfloat16)) for i, p in enumerate(params))
    assert all(torch.equal(p, f) for p, f in zip(params, fast, strict=True))


def test_lightning_style_attributes_and_hooks() -> None:
    """What trainer code touches on a real Optimizer: isinstance, defaults, param_groups,
    state, step(closure) returning the loss, zero_grad, step hooks, repr, deepcopy."""
    model = torch.nn.Linear(4, 2)
    inner = torch.optim.RAdam(model.parameters(), lr=0.01)
    opt = Lookahead(inner, k=2, alpha=0.5)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults["lr"] == 0.01 and opt.defaults["betas"] == inner.defaults["betas"]
    assert (opt.defaults["k"], opt.defaults["alpha"], opt.defaults["inner_state"]) == (2, 0.5, "maintain")
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    x = torch.randn(8, 4)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, Tensor) and loss.requires_grad
    assert calls == [("pre", opt), ("post", opt)]
    pre.remove()
    post.remove()
    assert set(opt.state[model.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    opt.zero_grad()
    assert model.weight.grad is None
    text = repr(opt)
    assert text.startswith("Lookahead (") and "RAdam (" in text and "k: 2" in text
    clone = copy.deepcopy(opt)
    clone.step(lambda: clone.param_groups[0]["params"][0].sum())  # grads are None: counts and syncs
    assert clone.param_groups[0]["lookahead_step"] == 2 and opt.param_groups[0]["lookahead_step"] == 1
    assert clone.param_groups is clone.optimizer.param_groups


def _register_state_dict_hooks(opt: torch.optim.Optimizer, log: list) -> None:
    """Two hooks of each of torch.optim's four state-dict kinds on `opt`, the second one
    registered with prepend=True; each logs when it runs, with what, and changes the state
    dict in one of the ways the API allows (in place, or by returning a new one)."""

    def post(o, state_dict):
        log.append(("post", o, "seen" in state_dict))
        return {**state_dict, "extra": 1}  # a new dict: the one state_dict() returns

    def post_first(o, state_dict):
        log.append(("post first", o, "slow_weights" in state_dict["state"][0]))
        state_dict["seen"] = 1  # in place

    def load_pre(o, state_dict):
        log.append(("load pre", o, "extra" in state_dict))
        return {**state_dict, "param_groups": [{**g, "lr": 0.125} for g in state_dict["param_groups"]]}

    def load_pre_first(o, state_dict):
        log.append(("load pre first", o, "slow_weights" in state_dict["state"][0]))
        del state_dict["extra"]  # in place, on load_state_dict's shallow copy: the caller's keeps it

    def load_post(o):
        log.append(("load post", o, o.param_groups[0]["lr"], o.param_groups[0].get("lookahead_step")))

    opt.register_state_dict_pre_hook(lambda o: log.append(("pre", o)))
    opt.register_state_dict_pre_hook(lambda o: log.append(("pre first", o)), prepend=True)
    opt.register_state_dict_post_hook(post)
    opt.register_state_dict_post_hook(post_first, prepend=True)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_pre_hook(load_pre_first, prepend=True)
    opt.register_load_state_dict_post_hook(load_post)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load post first", o)), prepend=True)


def test_state_dict_hooks_on_the_wrapper_run_as_in_torch_optim() -> None:
    """state_dict / load_state_dict pre and post hooks registered on the wrapper run as
    torch.optim runs them on a plain Adam (same order, prepend honoured, a returned dict
    replaces the state dict, the load hooks get a shallow copy), and they see the whole
    checkpoint, slow weights included: the post hook what state_dict() returns, the load pre
    hook what load_state_dict() is given, the load post hook the loaded counter. Hooks on the
    inner optimizer keep running, with the inner optimizer, around its own part."""
    torch.manual_seed(15)
    logs = {}
    for name in ("plain", "wrapper"):
        params = make_params(torch.float32, "cpu")
        copies = _clone(params)
        opt = torch.optim.Adam(params, lr=0.01)
        resumed = torch.optim.Adam(copies, lr=0.01)
        if name == "wrapper":
            opt, resumed = Lookahead(opt, k=K, alpha=ALPHA), Lookahead(resumed, k=K, alpha=ALPHA)
        log: list = []
        _register_state_dict_hooks(opt, log)
        _register_state_dict_hooks(resumed, log)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        state_dict = opt.state_dict()
        assert state_dict["extra"] == 1 and state_dict["seen"] == 1
        resumed.load_state_dict(state_dict)
        assert "extra" in state_dict  # the hook deleted it from a copy
        assert resumed.param_groups[0]["lr"] == 0.125  # the dict load_pre returned was loaded
        # The log with the optimizers named, and without what only a wrapper has.
        names = {id(opt): "saved", id(resumed): "resumed"}
        logs[name] = [(event[0], names[id(event[1])], *event[2:]) for event in log]
    wrapper_only = [("post first", "saved", True), ("load pre first", "resumed", True)]
    loaded = ("load post", "resumed", 0.125, 4)
    assert logs["wrapper"] == [
        ("pre first", "saved"),
        ("pre", "saved"),
        wrapper_only[0],
        ("post", "saved", True),
        wrapper_only[1],
        ("load pre", "resumed", False),
        ("load post first", "resumed"),
        loaded,
    ]
    plain = [(*e[:2], False) if e[:2] in {w[:2] for w in wrapper_only} else e for e in logs["wrapper"]]
    plain[-1] = (*loaded[:3], None)  # no lookahead_step in a plain Adam's groups
    assert logs["plain"] == plain

    # Hooks on the inner optimizer: inside the wrapper's, given the inner part only.
    params = make_params(torch.float32, "cpu")
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=K, alpha=ALPHA)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    log = []
    opt.register_state_dict_pre_hook(lambda o: log.append(("pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: log.append(("post", o)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load pre", o)))
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load post", o)))
    inner = opt.optimizer
    inner.register_state_dict_pre_hook(lambda o: log.append(("inner pre", o)))
    inner.register_state_dict_post_hook(lambda o, sd: log.append(("inner post", o, "slow_weights" in sd["state"][0])))
    inner.register_load_state_dict_pre_hook(
        lambda o, sd: log.append(("inner load pre", o, "slow_weights" in sd["state"][0]))
    )
    inner.register_load_state_dict_post_hook(lambda o: log.append(("inner load post", o)))
    opt.load_state_dict(opt.state_dict())
    assert log == [
        ("pre", opt),
        ("inner pre", inner),
        ("inner post", inner, False),
        ("post", opt),
        ("load pre", opt),
        ("inner load pre", inner, False),
        ("inner load post", inner),
        ("load post", opt),
    ]


def _log_step_hooks(opt: torch.optim.Optimizer, log: list, name: str) -> None:
    opt.register_step_pre_hook(lambda o, args, kwargs: log.append((f"{name} pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: log.append((f"{name} post", o)))


def test_global_step_hooks_fire_once_per_step_with_the_wrapper() -> None:
    """torch.optim runs, for each step() the user calls, the global pre hooks, the
    optimizer's own pre hooks, the step, its own post hooks and the global post hooks, each
    once, with the optimizer called. The wrapper's step is that call, the inner step a part
    of it: the global hooks run once, with the wrapper (not a second time for the inner
    optimizer); hooks registered on the inner optimizer run around its step with the inner
    optimizer, as an inner.step() would run them, and a closure one of them substitutes is
    the one evaluated."""
    torch.manual_seed(16)
    params = make_params(torch.float32, "cpu")
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=2, alpha=ALPHA)
    inner = opt.optimizer
    log: list = []
    _log_step_hooks(opt, log, "wrapper")
    _log_step_hooks(inner, log, "inner")
    substituted = torch.tensor(3.0)
    inner.register_step_pre_hook(lambda o, args, kwargs: ((args[0], lambda: substituted), kwargs))
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, kw: log.append(("global pre", o))),
        register_optimizer_step_post_hook(lambda o, a, kw: log.append(("global post", o))),
    ]
    try:
        for step in range(3):  # the second one syncs
            for p in params:
                p.grad = torch.randn_like(p)
            del log[:]
            loss = opt.step(lambda: torch.tensor(1.0))
            assert loss is substituted
            who = {id(opt): "wrapper", id(inner): "inner"}
            assert [(event, who[id(o)]) for event, o in log] == [
                ("global pre", "wrapper"),
                ("wrapper pre", "wrapper"),
                ("inner pre", "inner"),
                ("inner post", "inner"),
                ("wrapper post", "wrapper"),
                ("global post", "wrapper"),
            ], f"step {step + 1}"
        assert opt.param_groups[0]["lookahead_step"] == 3
        assert all(len(inner.state[p]) == 3 for p in params)  # the inner step ran, once a step
        assert inner.state[params[0]]["step"] == 3
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("built_on", ["wrapper", "inner"])
def test_lr_scheduler_sees_the_step_without_warning(built_on: str) -> None:
    """LRScheduler wraps `optimizer.step` to note that it ran, and warns ("Detected call of
    `lr_scheduler.step()` before `optimizer.step()`") when it did not: built on the wrapper
    or on the inner optimizer, a scheduler sees every wrapper step, warns nothing and sets
    the learning rate the inner optimizer uses; the global hooks still run once a step."""
    torch.manual_seed(17)
    params = make_params(torch.float32, "cpu")
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2, alpha=ALPHA)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, a, kw: calls.append(o))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sched = torch.optim.lr_scheduler.StepLR(opt if built_on == "wrapper" else opt.optimizer, 1, gamma=0.5)
            lrs = []
            for _ in range(3):
                for p in params:
                    p.grad = torch.ones_like(p)
                before = params[0].detach().clone()
                opt.step()
                lrs.append(opt.optimizer.param_groups[0]["lr"])
                if opt.param_groups[0]["lookahead_step"] % 2:  # no sync: θ moved by lr * grad
                    torch.testing.assert_close(params[0].detach(), before - lrs[-1])
                sched.step()
    finally:
        handle.remove()
    assert lrs == [0.1, 0.05, 0.025]
    assert [o is opt for o in calls] == [True] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=0), "Invalid k: 0"),
        (dict(k=2.0), "Invalid k: 2.0"),
        (dict(k=True), "Invalid k: True"),
        (dict(alpha=0.0), "Invalid alpha: 0.0"),
        (dict(alpha=1.5), "Invalid alpha: 1.5"),
        (dict(inner_state="bogus"), "Invalid inner_state: 'bogus'"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, message: str) -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        Lookahead(torch.optim.SGD([p], lr=0.1), **kwargs)
    opt = Lookahead(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1  # the bad group was not added


def test_invalid_inner_optimizer_and_pullback_without_momentum() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Lookahead([p])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid inner_state: 'pullback'.*Adagrad"):
        Lookahead(torch.optim.Adagrad([p]), inner_state="pullback")
    opt = Lookahead(torch.optim.Adagrad([p]))
    with pytest.raises(ValueError, match="Invalid inner_state: 'pullback'"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "inner_state": "pullback"})
    with pytest.raises(ValueError, match="Invalid k"):  # a k set in the inner optimizer's own group
        Lookahead(torch.optim.SGD([{"params": [p], "k": -1}], lr=0.1))
