"""The layout keys the front-end compares at every step (lookahead_fused/_buckets.py).

Two implementations: the C++ one (lookahead_fused._tensor_keys, csrc/tensor_keys.cpp, built
against this torch) and the Python one it falls back to. Whatever key is used, a step re-runs
the checks exactly when an address, shape, strides or dtype changed, or a gradient came or
went; so both must tell exactly the same pairs of tensor lists apart.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from lookahead_fused import LookaheadAdam, _buckets, _extension
from lookahead_fused._buckets import python_layout_key

native = _extension.TENSOR_KEYS


def test_the_cpp_keys_are_built_with_the_extension() -> None:
    """Where _C is built (CI, run.sh), _tensor_keys must be too: run.sh builds it against the
    torch it installs (LOOKAHEAD_FUSED_TENSOR_KEYS=ON). A build that lost it would fall back to
    the Python keys silently, at several times the host time per step."""
    assert _extension.ERROR is None, _extension.ERROR
    assert native is not None, f"lookahead_fused._tensor_keys is missing: {_extension.TENSOR_KEYS_ERROR}"
    assert native.torch_version == torch.__version__
    assert _buckets.layout_key is native.layout_key  # the front-end uses it


def _pool(rng: random.Random) -> list[torch.Tensor | None]:
    """Tensors that share storages and differ in one field at a time: offset (address),
    shape, strides, dtype; and None."""
    base = torch.arange(48, dtype=torch.float32)
    other = torch.arange(48, dtype=torch.float32)
    image = torch.randn(2, 3, 2, 2)
    pool: list[torch.Tensor | None] = [
        None,
        base,
        base.view(6, 8),
        base.view(8, 6),
        base.view(6, 8).t(),  # same address, other strides
        base.view(48, 1),
        base.view(1, 48),
        base[1:],  # another address
        base[:47],  # same address, other size
        base.view(torch.int32),  # same address and layout, other dtype
        base.as_strided((6, 8), (8, 1)),  # a new tensor object equal to base.view(6, 8)
        other.view(6, 8),  # same layout, other storage
        image,
        image.contiguous(memory_format=torch.channels_last),
        image.view(2, 3, 4),
        torch.empty(0),
        torch.empty(0, 5),
        torch.tensor(3.0),  # zero dimensions
        base.view(6, 8)[:, ::2],  # not dense
        base.to(torch.bfloat16),
    ]
    rng.shuffle(pool)
    return pool


def _lists(seed: int, count: int) -> list[list[torch.Tensor | None]]:
    rng = random.Random(seed)
    pool = _pool(rng)
    lists = [[t] for t in pool]  # every single tensor
    for _ in range(count):
        lists.append([rng.choice(pool) for _ in range(rng.randint(0, 4))])
    lists += [[pool[0], pool[1]], [pool[1], pool[0]], [pool[0], pool[1], pool[0]]]  # order and repeats
    return lists


@pytest.mark.skipif(native is None, reason="checked by test_the_cpp_keys_are_built_with_the_extension")
@pytest.mark.parametrize("seed", range(3))
def test_cpp_and_python_keys_tell_the_same_lists_apart(seed: int) -> None:
    lists = _lists(seed, 60)
    python = [python_layout_key(ts) for ts in lists]
    cpp = [native.layout_key(ts) for ts in lists]
    mismatches = []
    for i in range(len(lists)):
        for j in range(len(lists)):
            if (python[i] == python[j]) != (cpp[i] == cpp[j]):
                mismatches.append((i, j))
    assert not mismatches, f"{len(mismatches)} pairs judged differently, e.g. {lists[mismatches[0][0]]!r}"
    # and the property is not vacuous: both see equal lists and different ones
    assert any(python[i] == python[j] for i in range(len(lists)) for j in range(i))
    assert len(set(cpp)) > len(lists) // 2


@pytest.mark.parametrize("key", ["cpp", "python"])
def test_each_field_of_a_tensor_changes_the_key(key: str) -> None:
    layout_key = python_layout_key if key == "python" else native.layout_key
    if layout_key is None:
        pytest.fail(f"no C++ keys: {_extension.TENSOR_KEYS_ERROR}")
    base = torch.zeros(50)[:48].view(6, 8)
    same = layout_key([base.as_strided((6, 8), (8, 1)), None])
    assert layout_key([base, None]) == same
    changed = {
        "address": [base.as_strided((6, 8), (8, 1), 1), None],
        "shape": [base.view(8, 6), None],
        "strides": [base.as_strided((6, 8), (1, 6)), None],
        "dtype": [base.view(torch.int32), None],
        "a gradient came": [base, base],
        "a gradient went": [None, None],
        "length": [base],
    }
    for what, ts in changed.items():
        assert layout_key(ts) != same, what


@pytest.mark.parametrize("key", ["cpp", "python"])
def test_keys_refuse_what_has_no_strided_storage(key: str) -> None:
    layout_key = python_layout_key if key == "python" else native.layout_key
    if layout_key is None:
        pytest.fail(f"no C++ keys: {_extension.TENSOR_KEYS_ERROR}")
    with pytest.raises(RuntimeError):
        layout_key([torch.zeros(3), torch.eye(3).to_sparse()])
    with pytest.raises(TypeError):
        layout_key([torch.zeros(3), 3])  # type: ignore[list-item]


def test_steps_with_either_key_match_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run (a relayout, a gradient going to None and back, new gradient tensors every
    step) with each key: the same values, and the checks re-run at the same steps."""
    if native is None:
        pytest.fail(f"no C++ keys: {_extension.TENSOR_KEYS_ERROR}")
    runs = []
    for layout_key in (native.layout_key, python_layout_key):
        monkeypatch.setattr(_buckets, "layout_key", layout_key)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(2, 3, 2, 2)), torch.nn.Parameter(torch.randn(5))]
        opt = LookaheadAdam(params, lr=0.1, k=2, backend="cpu")
        versions = []
        for step in range(7):
            params[0].grad = None if step == 2 else torch.randn_like(params[0])
            if step != 5:  # step 5 keeps the gradient of step 4: same address, no new checks
                params[1].grad = torch.randn(5)
            if step == 3:
                params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
            opt.step()
            (bucket,) = opt._buckets(0)
            versions.append((bucket.param_version, bucket.grad_version))
        runs.append(([p.detach().clone() for p in params], versions))
    (values_cpp, versions_cpp), (values_python, versions_python) = runs
    assert versions_cpp == versions_python
    assert versions_cpp[-1][0] == 2  # the relayout was seen
    for a, b in zip(values_cpp, values_python):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_module_built_for_another_torch_is_refused() -> None:
    """_tensor_keys reads torch's C++ structures, so it must not load into another torch: its
    init compares torch.__version__ with the version it was built for. The front-end then
    keeps the Python keys and every step still runs."""
    if native is None:
        pytest.fail(f"no C++ keys: {_extension.TENSOR_KEYS_ERROR}")
    code = (
        "import torch; real = torch.__version__; torch.__version__ = '0.0.0+other'\n"
        "import lookahead_fused as lf\n"
        "from lookahead_fused import _buckets, _extension\n"
        "assert _extension.TENSOR_KEYS is None, 'loaded'\n"
        "assert 'built for torch ' + real in _extension.TENSOR_KEYS_ERROR, _extension.TENSOR_KEYS_ERROR\n"
        "assert _buckets.layout_key is _buckets.python_layout_key\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "opt = lf.LookaheadSGD([p], lr=0.5, backend='cpu'); opt.step()\n"
        "assert p.tolist() == [0.5, 0.5, 0.5], p\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_cpp_grads_are_the_objects_the_getter_returns() -> None:
    """`grads()` hands back what `p.grad` returns, object for object: None, a gradient set from
    Python, one autograd accumulated, and the `grad` a Tensor subclass overrides."""
    if native is None:
        pytest.fail(f"no C++ keys: {_extension.TENSOR_KEYS_ERROR}")

    class Overriding(torch.Tensor):
        @property
        def grad(self):  # type: ignore[override]
            return marker

    marker = torch.full((2,), 7.0)
    leaf = torch.nn.Parameter(torch.randn(3))
    (leaf * 2).sum().backward()  # a gradient made in C++, not yet seen from Python
    plain = torch.zeros(3, requires_grad=True)
    plain.grad = torch.ones(3)
    tensors = [torch.nn.Parameter(torch.zeros(2)), leaf, plain, torch.zeros(2).as_subclass(Overriding)]
    expected = [t.grad for t in tensors]
    got = native.grads(tensors)
    assert [g is e for g, e in zip(got, expected)] == [True] * 4
    assert got[0] is None and got[3] is marker
    assert native.grads([leaf]) == [leaf.grad] and native.grads([leaf])[0] is leaf.grad
    with pytest.raises(TypeError):
        native.grads(3)  # type: ignore[arg-type]
