"""The step as one `torch.library` custom op, so that `torch.compile(optimizer.step)` traces it
whole (`fullgraph=True`) and does not recompile from step to step.

Why an op: the eager step keys its caches by tensor addresses (`Bucket.moved`, `grads`),
builds pointer tables and calls pybind11 functions with raw addresses. Dynamo cannot trace
any of that (`data_ptr()` and an opaque C++ call each break the graph). Wrapped in a custom
op, the same code is one node of the graph: the compiler sees which tensors it reads and
which it writes (`mutates_args`), and its real implementation runs eagerly with real
tensors, where addresses, `.item()` on CPU counters and the caches are all fine.

How a compiled step runs (`_LookaheadOptimizer.step` under `torch.compiler.is_compiling()`):

1. At trace time only, Dynamo calls the optimizer's `_init_group()` concretely (its hook for
   an optimizer's lazy state, the one torch.optim uses), which builds the buckets
   (`_LookaheadOptimizer._buckets`) and returns `plan(optimizer)`: a JSON string naming the
   backend, the inner optimizer, every group's hyperparameters and the layout of the op's
   tensor lists. The string is a constant of the graph. Dynamo guards the groups'
   hyperparameters it read, so a change of any of them retraces and makes a new plan.
2. The traced code (`traced_step`) gathers the bucket tensors: every parameter, its
   gradient (None allowed), every flat state buffer including the counters, each group's
   lr (a float constant, or a 0-dim tensor read at run time) and GradScaler's tensors, and
   calls `lookahead_fused::step` once for the whole optimizer.
3. The op's implementation (`step` below) checks every bucket and gradient first, exactly as the
   eager step does, then hands each group to the backend's `step`. The sync decision comes
   from the counter tensors inside the backend, never from a Python int of the trace (the
   Triton backend is switched to its device path, whose decision a CUDA graph can replay).

What recompiles: Dynamo guards what the trace read. A float lr and every other
hyperparameter are constants of the graph (changing one retraces: use a 0-dim tensor lr
for schedulers and update it in place), so are which gradients are None, whether GradScaler
passes its tensors, and the buckets themselves (new parameters, `load_state_dict`). New
gradient tensors every step (`zero_grad(set_to_none=True)`) and new values in any tensor do
not retrace.

The op finds the optimizer's real `Bucket` (with its tables and host-side counter) through a
weak registry, and uses it when the tensors it was given are that bucket's tensors (same
addresses). When they are not, for instance copies made by a compiler backend that could
not update the inputs in place, or the inputs `torch.library.opcheck` makes, it wraps the
given tensors in a fresh bucket: the step is then just as right, only slower (its tables
are rebuilt). This module registers the op when it is imported (lookahead_fused imports it
through the optimizers).
"""

import json
import weakref
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from . import backends
from ._buckets import COUNTER_KEYS, Bucket, default_dtypes, pack

# Buckets that a plan names, by `id`. Weak: a dropped optimizer leaves no bucket behind, and
# an id reused by a new bucket is harmless (the op compares addresses before using one).
_BUCKETS: "weakref.WeakValueDictionary[int, Bucket]" = weakref.WeakValueDictionary()

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


# ---------------------------------------------------------------------------------------
# Trace time.
# ---------------------------------------------------------------------------------------


def _setting(value: Any) -> Any:
    """A group setting as JSON (tuples become lists, dtypes `{"dtype": name}`), or
    NotImplemented for values the backends never read (anything a user added to a group)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value)}
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float)) for v in value):
        return list(value)
    return NotImplemented


def plan(optimizer: Any) -> str:
    """Build the buckets of every non-empty group and describe the op's arguments (see the
    module docstring). Runs at trace time, eagerly, through `_init_group`."""
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        if not group["params"]:
            continue
        buckets = optimizer._buckets(index)
        if any(b.owners is not None for b in buckets):
            raise RuntimeError(
                f"torch.compile of {type(optimizer).__name__}.step() does not support sharded (DTensor) "
                "or complex parameters: step it eagerly"
            )
        settings = {}
        for key, value in group.items():
            if key not in ("params", "lr") and (encoded := _setting(value)) is not NotImplemented:
                settings[key] = encoded
        if optimizer.backend == "triton":
            # The Triton host path decides on the host whether a step syncs; a CUDA graph
            # (torch.compile(mode="reduce-overhead")) would replay that decision forever. The
            # device path decides on the device, from the counters, every step.
            settings["capturable"] = True
        entries = []
        for b in buckets:
            _BUCKETS[id(b)] = b
            entries.append({"id": id(b), "params": len(b.params), "state": list(b.flat)})
        groups.append({"settings": settings, "buckets": entries})
    spec = {
        "backend": optimizer.backend,
        "kind": optimizer._kind,
        "who": type(optimizer).__name__,
        "groups": groups,
    }
    return json.dumps(spec, sort_keys=True)


def traced_step(optimizer: Any, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The body of a compiled `step()`: gather the tensors in the order `plan` describes and
    call the op once. Only traced by Dynamo; never run eagerly."""
    spec = optimizer._init_group()
    params: list[Tensor] = []
    grads: list[Tensor | None] = []
    state: list[Tensor] = []
    lr_tensors: list[Tensor | None] = []
    lr_values: list[float] = []
    for index, group in enumerate(optimizer.param_groups):
        if not group["params"]:
            continue
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr_tensors.append(lr)
            lr_values.append(0.0)
        else:
            lr_tensors.append(None)
            lr_values.append(float(lr))
        for b in optimizer._group_buckets[index]:
            params.extend(b.params)
            grads.extend([p.grad for p in b.params])
            state.extend(b.flat.values())
    torch.ops.lookahead_fused.step(spec, params, grads, state, lr_tensors, lr_values, grad_scale, found_inf)


# ---------------------------------------------------------------------------------------
# Run time: the op.
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _parse(spec: str) -> dict[str, Any]:
    """The plan, decoded once per distinct string (a compiled step passes the same one)."""
    decoded = json.loads(spec)
    for group in decoded["groups"]:
        group["settings"] = {
            key: (_DTYPES[value["dtype"]] if isinstance(value, dict) else value)
            for key, value in group["settings"].items()
        }
    return decoded


def _bucket(entry: dict[str, Any], params: list[Tensor], flat: dict[str, Tensor], group: dict[str, Any]) -> Bucket:
    """The optimizer's own bucket when the op was given its tensors, else a bucket around
    the given ones (fresh tables, counter read from the tensors)."""
    own = _BUCKETS.get(entry["id"])
    if (
        own is not None
        and list(own.flat) == list(flat)
        and len(own.params) == len(params)
        and all(map(Tensor.is_set_to, own.flat.values(), flat.values()))
        and all(map(Tensor.is_set_to, own.params, params))
    ):
        return own
    device, dtype = flat["slow_weights"].device, (params[0].dtype if params else flat["slow_weights"].dtype)
    shaped = [t for key, t in flat.items() if key not in (*COUNTER_KEYS, "slow_weights")]
    state_dtype = shaped[0].dtype if shaped else default_dtypes(dtype, group)[0]
    offsets, total = pack(params, state_dtype, flat["slow_weights"].dtype)  # as build_buckets laid them out
    b = Bucket(params, offsets, total, device, dtype, state_dtype, flat["slow_weights"].dtype, flat, views=[])
    b.moved()  # records the layout: the backends key their tables by it
    return b


def _split(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, start = [], 0
    for n in sizes:
        out.append(items[start : start + n])
        start += n
    if start != len(items):
        raise RuntimeError(f"lookahead_fused::step got {len(items)} tensors where its plan describes {start}")
    return out


@torch.library.custom_op("lookahead_fused::step", mutates_args=("params", "state"))
def step(
    spec: str,
    params: list[Tensor],
    grads: list[Tensor | None],
    state: list[Tensor],
    lr_tensors: list[Tensor | None],
    lr_values: list[float],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One Lookahead step of a whole optimizer (module docstring). `spec` is `plan()`'s
    string; `params`, `grads` and `state` are every bucket's parameters, gradients and flat
    state buffers, in the plan's order; group i's lr is `lr_tensors[i]` when it is a tensor,
    else `lr_values[i]`; grad_scale / found_inf are GradScaler's."""
    decoded = _parse(spec)
    entries = [e for g in decoded["groups"] for e in g["buckets"]]
    param_lists = _split(params, [e["params"] for e in entries])
    grad_lists = _split(grads, [e["params"] for e in entries])
    state_lists = _split(state, [len(e["state"]) for e in entries])
    if not len(decoded["groups"]) == len(lr_tensors) == len(lr_values):
        raise RuntimeError("lookahead_fused::step needs one lr per group of its plan")

    # Every gradient of every group is checked before anything is updated, as in eager mode.
    work, position = [], 0
    for g, lr_tensor, lr_value in zip(decoded["groups"], lr_tensors, lr_values):
        group = {**g["settings"], "lr": lr_value if lr_tensor is None else lr_tensor}
        buckets, grads_of_buckets = [], []
        for entry in g["buckets"]:
            flat = dict(zip(entry["state"], state_lists[position]))
            b = _bucket(entry, param_lists[position], flat, group)
            if b.moved():
                raise RuntimeError(
                    f"{decoded['who']}: a parameter changed dtype or device inside a compiled step "
                    "(the compiled graph should have been retraced)"
                )
            b.check_grads(decoded["who"], grad_lists[position])
            buckets.append(b)
            grads_of_buckets.append(grad_lists[position])
            position += 1
        work.append((group, buckets, grads_of_buckets))
    step_group = backends.get(decoded["backend"]).step
    for group, buckets, grads_of_buckets in work:
        step_group(decoded["kind"], group, buckets, grads_of_buckets, grad_scale, found_inf)


@step.register_fake
def _(
    spec: str,
    params: list[Tensor],
    grads: list[Tensor | None],
    state: list[Tensor],
    lr_tensors: list[Tensor | None],
    lr_values: list[float],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """The op returns nothing: its effects are the in-place updates of params and state."""
    return None
