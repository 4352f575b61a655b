"""State: state_dict names and round trips, mid-cycle resume, loading across backends and
from torch.optim, the slow_weights() context, copy and pickle.

Resuming within one backend must be bit for bit (the same kernels see the same numbers);
across backends the comparison uses `lookahead_fused.testing.TOLERANCES`.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadSGD, reference
from lookahead_fused.testing import TOLERANCES, make_params

K = 3  # checkpoints are taken after 4 steps: mid-cycle, one step past a sync

# kind -> (class, torch.optim counterpart, hyperparameters both accept)
KINDS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "sgd": (LookaheadSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adam": (LookaheadAdam, torch.optim.Adam, dict(lr=0.01)),
}


# ---------------------------------------------------------------------------------------
# Helpers shared with test_validation.py and test_amp.py.
# ---------------------------------------------------------------------------------------


def set_grads(params: Sequence[Tensor], step: int) -> None:
    """Gradients that depend on the step number only, so that interrupted and uninterrupted
    runs see the same ones. The second parameter has none on every third step."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if (i == 1 and step % 3 == 1) else g


def train(opt: torch.optim.Optimizer, params: Sequence[Tensor], steps: Iterable[int]) -> None:
    for step in steps:
        set_grads(params, step)
        opt.step()


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of the parameters and of every state entry, by position (comparable across
    optimizers over different tensors)."""
    sd = opt.state_dict()
    return {
        "params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
        "state": {
            i: {key: v.clone() if isinstance(v, Tensor) else v for key, v in s.items()} for i, s in sd["state"].items()
        },
    }


def _pairs(got: dict[str, Any], want: dict[str, Any]) -> Iterable[tuple[str, Tensor, Tensor]]:
    assert len(got["params"]) == len(want["params"])
    for i, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
        yield f"param {i}", a, b
    assert got["state"].keys() == want["state"].keys()
    for i in want["state"]:
        assert got["state"][i].keys() == want["state"][i].keys(), f"state keys of param {i}"
        for key, b in want["state"][i].items():
            yield f"param {i} {key}", got["state"][i][key], b


def assert_bitwise_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    for what, a, b in _pairs(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{what} differs: max abs {(a.double() - b.double()).abs().max().item():.3g}"


def assert_close(got: dict[str, Any], want: dict[str, Any], dtype: torch.dtype) -> None:
    """Within TOLERANCES of the parameters' dtype."""
    for what, a, b in _pairs(got, want):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m, what=what: f"{what}: {m}")


def _make(kind: str, params: Sequence[Tensor], backend: str, **options: Any) -> torch.optim.Optimizer:
    cls, _, hyper = KINDS[kind]
    return cls(params, k=K, backend=backend, **{**hyper, **options})


def _through_bytes(obj: Any) -> Any:
    """torch.save then torch.load(weights_only=True): what a checkpoint file does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------
# state_dict.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, options, inner_keys",
    [
        (LookaheadSGD, dict(lr=0.1), set()),
        (LookaheadSGD, dict(lr=0.1, momentum=0.9), {"momentum_buffer"}),
        (LookaheadAdam, dict(), {"exp_avg", "exp_avg_sq"}),
        (LookaheadAdam, dict(amsgrad=True), {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ],
    ids=["sgd", "sgd-momentum", "adam", "adam-amsgrad"],
)
def test_state_dict_uses_torch_optim_names(backend: str, cls: type, options: dict, inner_keys: set[str]) -> None:
    params = make_params(torch.float32, "cpu")
    opt = cls(params, k=K, backend=backend, **options)
    train(opt, params, range(1))
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(params)))
    for i, s in sd["state"].items():
        assert set(s) == {"step", "slow_weights", "lookahead_step"} | inner_keys, f"param {i}"
        assert s["lookahead_step"].item() == 1
        assert s["slow_weights"].shape == params[i].shape
    assert sd["param_groups"][0]["k"] == K and sd["param_groups"][0]["alpha"] == 0.5


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["default", "bf16-state"])
def test_round_trip_through_torch_save(backend: str, state_dtype: torch.dtype | None) -> None:
    params = make_params(torch.float32, "cpu")
    opt = _make("adam", params, backend, state_dtype=state_dtype, amsgrad=True)
    train(opt, params, range(4))
    saved = snapshot(opt)
    loaded = _through_bytes(opt.state_dict())
    assert loaded["param_groups"][0]["state_dtype"] == state_dtype

    fresh = _make("adam", params, backend, amsgrad=True)  # no state_dtype: the checkpoint's groups win
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["state_dtype"] == state_dtype
    assert_bitwise_equal(snapshot(fresh), saved)
    train(fresh, params, range(4, 5))  # the buckets are rebuilt from the loaded state
    assert fresh.state[params[0]]["exp_avg"].dtype == (state_dtype or torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inner_state", ["maintain", "pullback"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_resume_mid_cycle_is_bit_for_bit(backend: str, kind: str, inner_state: str, dtype: torch.dtype) -> None:
    """A checkpoint after 4 steps (k=3: one step into a cycle), loaded with the model weights
    into a new optimizer over new tensors, continues exactly as the uninterrupted run."""
    params = make_params(dtype, "cpu")
    opt = _make(kind, params, backend, inner_state=inner_state)
    train(opt, params, range(8))
    want = snapshot(opt)

    params = make_params(dtype, "cpu")
    opt = _make(kind, params, backend, inner_state=inner_state)
    train(opt, params, range(4))
    ckpt = _through_bytes({"model": [p.detach() for p in params], "optim": opt.state_dict()})
    del opt, params

    params = make_params(dtype, "cpu", seed=1)  # other values: the weights come from the checkpoint
    with torch.no_grad():
        for p, w in zip(params, ckpt["model"], strict=True):
            p.copy_(w)
    opt = _make(kind, params, backend, inner_state=inner_state)
    opt.load_state_dict(ckpt["optim"])
    train(opt, params, range(4, 8))
    assert_bitwise_equal(snapshot(opt), want)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_load_across_backends(backend: str, kind: str) -> None:
    """A checkpoint of the eager backend resumes on `backend` within TOLERANCES."""
    params = make_params(torch.float32, "cpu")
    eager = _make(kind, params, "eager", inner_state="pullback")
    train(eager, params, range(4))
    ckpt = _through_bytes({"model": [p.detach() for p in params], "optim": eager.state_dict()})
    train(eager, params, range(4, 8))

    other = make_params(torch.float32, "cpu", seed=1)
    with torch.no_grad():
        for p, w in zip(other, ckpt["model"], strict=True):
            p.copy_(w)
    opt = _make(kind, other, backend, inner_state="pullback")
    opt.load_state_dict(ckpt["optim"])
    assert opt.backend == backend
    train(opt, other, range(4, 8))
    assert_close(snapshot(opt), snapshot(eager), torch.float32)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_load_torch_optim_state_dict(backend: str, kind: str) -> None:
    """A torch.optim.SGD / Adam checkpoint carries its moments over; the slow weights start
    from the current parameters and the lookahead counter from 0. The next steps (a sync
    included) equal the reference started from that state."""
    cls, torch_cls, hyper = KINDS[kind]
    params = make_params(torch.float32, "cpu")
    inner = torch_cls(params, **hyper)
    train(inner, params, range(3))
    torch_sd = copy.deepcopy(inner.state_dict())
    index = {i: p for i, p in enumerate(params)}

    opt = cls(params, k=K, backend=backend, **hyper)
    opt.load_state_dict(inner.state_dict())
    for i, s in torch_sd["state"].items():
        for key, value in s.items():
            assert torch.equal(opt.state[index[i]][key], value), f"param {i} {key} not carried over"

    ref_params = [p.detach().clone() for p in params]
    hyper_ref = {key: value for key, value in opt.param_groups[0].items() if key != "params"}
    ref_states = []
    for i, p in enumerate(ref_params):
        state = reference.init_state(p, optimizer=kind, momentum=hyper.get("momentum", 0.0))
        for key, value in torch_sd["state"].get(i, {}).items():
            state[key].copy_(value)
        if kind == "sgd" and "momentum_buffer" in torch_sd["state"].get(i, {}):
            state["step"].fill_(1)  # an existing torch.optim.SGD buffer is continued, not restarted
        ref_states.append(state)

    start = [p.detach().clone() for p in params]
    for step in range(3, 3 + K + 1):
        set_grads(params, step)
        opt.step()
        reference.step_group(kind, ref_params, [p.grad for p in params], ref_states, hyper_ref)
        if step == 3:  # first step after the load: a plain step, φ still the loaded weights
            for i, p in enumerate(params):
                assert torch.equal(opt.state[p]["slow_weights"], start[i]), f"param {i}"
                assert opt.state[p]["lookahead_step"].item() == 1
    want = {
        "params": ref_params,
        "state": {
            i: {key: s[key] for key in opt.state[p]} for i, (p, s) in enumerate(zip(params, ref_states, strict=True))
        },
    }
    assert_close(snapshot(opt), want, torch.float32)


def _mismatch_error(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(state_dict)
    return str(err.value)


@pytest.mark.parametrize("mismatch", ["group_count", "group_size"])
def test_load_mismatched_state_dict_raises(backend: str, mismatch: str) -> None:
    """The same ValueError as torch.optim, whose own message is the expected text."""
    a, b, c = (torch.randn(3, requires_grad=True) for _ in range(3))
    if mismatch == "group_count":
        source, target = [{"params": [a]}, {"params": [b]}], [{"params": [a, b]}]
    else:
        source, target = [{"params": [a, b]}], [{"params": [a, b, c]}]
    torch_message = _mismatch_error(torch.optim.SGD(target, lr=0.1), torch.optim.SGD(source, lr=0.1).state_dict())
    ours = LookaheadSGD(source, lr=0.1, backend=backend)
    train(ours, [a, b], range(1))
    message = _mismatch_error(LookaheadSGD(target, lr=0.1, backend=backend), ours.state_dict())
    assert message == torch_message


def test_low_precision_params_keep_fp32_state_through_load(backend: str) -> None:
    """torch.optim casts loaded state to the parameter's dtype; here the fp32 state of a bf16
    model must come back as it was saved."""
    params = make_params(torch.bfloat16, "cpu")
    opt = _make("adam", params, backend)
    train(opt, params, range(4))
    saved = snapshot(opt)
    fresh = _make("adam", params, backend)
    fresh.load_state_dict(_through_bytes(opt.state_dict()))
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "slow_weights"):
            assert fresh.state[p][key].dtype == torch.float32, key
    assert_bitwise_equal(snapshot(fresh), saved)


# ---------------------------------------------------------------------------------------
# slow_weights().
# ---------------------------------------------------------------------------------------


def _mid_cycle(dtype: torch.dtype, backend: str) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    params = make_params(dtype, "cpu")
    opt = _make("adam", params, backend)
    train(opt, params, range(4))
    assert any(not torch.equal(p, opt.state[p]["slow_weights"].to(dtype)) for p in params), "θ = φ: test is void"
    return opt, params


def test_slow_weights_swaps_by_reference(backend: str) -> None:
    opt, params = _mid_cycle(torch.float32, backend)
    fast = [(p.detach().clone(), p.data_ptr()) for p in params]
    slow = [opt.state[p]["slow_weights"] for p in params]
    with opt.slow_weights():
        for i, (p, phi) in enumerate(zip(params, slow, strict=True)):
            assert torch.equal(p, phi), f"param {i}"
            # By reference: the parameter's storage is φ's, no parameter-sized copy made.
            assert p.data_ptr() == phi.data_ptr(), f"param {i} was copied"
    for i, (p, (value, ptr)) in enumerate(zip(params, fast, strict=True)):
        assert torch.equal(p, value) and p.data_ptr() == ptr, f"param {i}"


def test_slow_weights_of_bf16_params_with_fp32_phi(backend: str) -> None:
    opt, params = _mid_cycle(torch.bfloat16, backend)
    fast = [p.detach().clone() for p in params]
    with opt.slow_weights():
        for i, p in enumerate(params):
            phi = opt.state[p]["slow_weights"]
            assert phi.dtype == torch.float32
            assert p.dtype == torch.bfloat16 and torch.equal(p, phi.to(torch.bfloat16)), f"param {i}"
    for i, (p, value) in enumerate(zip(params, fast, strict=True)):
        assert torch.equal(p, value), f"param {i}"


def test_slow_weights_forbids_step_and_nesting(backend: str) -> None:
    opt, params = _mid_cycle(torch.float32, backend)
    before = snapshot(opt)
    set_grads(params, 4)
    with opt.slow_weights():
        with pytest.raises(RuntimeError, match="slow_weights"):
            opt.step()
        with pytest.raises(RuntimeError, match="already active"):
            with opt.slow_weights():
                pass
    assert_bitwise_equal(snapshot(opt), before)
    opt.step()  # usable again after the context


def test_slow_weights_restores_after_an_exception(backend: str) -> None:
    opt, params = _mid_cycle(torch.float32, backend)
    before = snapshot(opt)
    with pytest.raises(KeyError):
        with opt.slow_weights():
            raise KeyError("evaluation failed")
    assert_bitwise_equal(snapshot(opt), before)


def test_slow_weights_before_any_step_is_a_no_op(backend: str) -> None:
    params = make_params(torch.float32, "cpu")
    opt = _make("adam", params, backend)
    before = [(p.detach().clone(), p.data_ptr()) for p in params]
    with opt.slow_weights():
        for p, (value, ptr) in zip(params, before, strict=True):
            assert torch.equal(p, value) and p.data_ptr() == ptr
    for p, (value, ptr) in zip(params, before, strict=True):
        assert torch.equal(p, value) and p.data_ptr() == ptr


# ---------------------------------------------------------------------------------------
# copy.deepcopy and pickle.
# ---------------------------------------------------------------------------------------


def _copy(opt: torch.optim.Optimizer, how: str) -> torch.optim.Optimizer:
    return copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_keeps_stepping(backend: str, how: str) -> None:
    """A copy (new parameter tensors, state rebuilt into new buckets) and the original both
    continue as the uninterrupted run."""
    params = make_params(torch.float32, "cpu")
    opt = _make("adam", params, backend, inner_state="pullback")
    train(opt, params, range(8))
    want = snapshot(opt)

    params = make_params(torch.float32, "cpu")
    opt = _make("adam", params, backend, inner_state="pullback")
    train(opt, params, range(4))
    clone = _copy(opt, how)
    assert clone.backend == backend
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(clone_params, params, strict=True))

    train(clone, clone_params, range(4, 8))
    assert_bitwise_equal(snapshot(clone), want)
    train(opt, params, range(4, 8))
    assert_bitwise_equal(snapshot(opt), want)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_still_takes_grad_scaler_arguments(backend: str, how: str) -> None:
    """Without the flag GradScaler would unscale `.grad` itself and pass no found_inf."""
    params = make_params(torch.float32, "cpu")
    opt = _make("adam", params, backend)
    train(opt, params, range(1))
    assert _copy(opt, how)._step_supports_amp_scaling is True
