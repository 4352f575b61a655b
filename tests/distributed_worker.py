"""One rank of tests/test_distributed.py, started by `torch.distributed.run` (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT BACKEND...

For every backend and inner optimizer it trains a small model (`make_model`, `batch`,
`make_optimizer`, `STEPS`, shared with the test) on this rank's half of each batch, wrapped
in DDP and, separately, with FSDP2's `fully_shard`, and saves what the test compares:

- `ddp-<backend>-<kind>-rank<r>.pt`: the parameters and the optimizer state of this rank;
- `fsdp-<backend>-<kind>-rank<r>.pt`: the full (all-gathered) parameters and the full
  optimizer state after STEPS steps, straight through, and the same after a round trip
  through torch.distributed.checkpoint at step RESUME_AT into a freshly built model and
  optimizer (initialised from another seed, so only the checkpoint can make them agree);
- `adaptive-rank<r>.pt` (with the first backend only): what adaptive α with FSDP2 (refused: each rank would pick
  its own α̂ from its shards) raised at each way in (`run_fsdp_adaptive`), with this rank's
  local shards and optimizer state before and after the refused step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD

KINDS = ("sgd", "adam")
STEPS = 8  # k = 3: syncs after steps 3 and 6, and two steps into the third cycle
RESUME_AT = 4  # mid-cycle
BATCH = 8  # split between the two ranks


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (every rank builds it and takes its part)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def make_optimizer(kind: str, params: Any, backend: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return LookaheadSGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, k=3, alpha=0.5, backend=backend)
    return LookaheadAdam(params, lr=0.01, weight_decay=1e-3, k=3, alpha=0.5, backend=backend)


def full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    share = x.shape[0] // world
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int) -> None:
    for step in steps:
        x, y = local_batch(step, rank, world)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def state_of(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """The optimizer state by parameter index, full tensors."""
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {index[id(p)]: {k: full(v).clone() for k, v in s.items()} for p, s in opt.state.items()}


def run_ddp(out: Path, backend: str, kind: str, rank: int, world: int) -> None:
    model = make_model(seed=0)
    ddp = DistributedDataParallel(model)
    opt = make_optimizer(kind, model.parameters(), backend)
    train(ddp, opt, range(STEPS), rank, world)
    params = [p.detach().clone() for p in model.parameters()]
    torch.save({"params": params, "state": state_of(opt)}, out / f"ddp-{backend}-{kind}-rank{rank}.pt")


def sharded_model(seed: int) -> torch.nn.Module:
    model = make_model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def run_fsdp(out: Path, backend: str, kind: str, rank: int, world: int) -> None:
    model = sharded_model(seed=0)
    opt = make_optimizer(kind, model.parameters(), backend)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    train(model, opt, range(RESUME_AT), rank, world)
    checkpoint = out / f"dcp-{backend}-{kind}"
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(checkpoint))
    train(model, opt, range(RESUME_AT, STEPS), rank, world)
    straight = [full(p).detach().clone() for p in model.parameters()]
    straight_state = state_of(opt)
    with opt.slow_weights():  # φ, gathered: the slow weights must reach the sharded storage
        slow = [full(p).detach().clone() for p in model.parameters()]
    after_swap = [full(p).detach().clone() for p in model.parameters()]

    fresh = sharded_model(seed=1)
    fresh_opt = make_optimizer(kind, fresh.parameters(), backend)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(checkpoint))
    set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(fresh, fresh_opt, range(RESUME_AT, STEPS), rank, world)
    resumed = [full(p).detach().clone() for p in fresh.parameters()]
    record = {
        "params": straight,
        "state": straight_state,
        "slow": slow,
        "after_swap": after_swap,
        "resumed": resumed,
        "resumed_state": state_of(fresh_opt),
    }
    torch.save(record, out / f"fsdp-{backend}-{kind}-rank{rank}.pt")


def refusal(make: Any) -> str | None:
    """The message of the ValueError or RuntimeError that make() raises; None if it raises none."""
    try:
        make()
    except (ValueError, RuntimeError) as err:
        return str(err)
    return None


def local_snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the parameters and of the optimizer state (no communication)."""
    mine = lambda t: (t.to_local() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {
        "params": [mine(p) for p in model.parameters()],
        "state": {index[id(p)]: {k: mine(v) for k, v in s.items()} for p, s in opt.state.items()},
    }


def run_fsdp_adaptive(out: Path, backend: str, rank: int, world: int) -> None:
    """Adaptive α with sharded parameters, every way in: the constructor, add_param_group,
    and adaptive_alpha switched on in param_groups before the first step and before a sync."""
    model = sharded_model(seed=0)
    first, second = [list(layer.parameters()) for layer in (model[0], model[2])]
    record: dict[str, Any] = {}
    record["constructor"] = refusal(lambda: LookaheadAdam(model.parameters(), adaptive_alpha=True, backend=backend))
    opt = LookaheadAdamW(first, lr=0.01, k=3, backend=backend)
    record["add_param_group"] = refusal(lambda: opt.add_param_group({"params": second, "adaptive_alpha": True}))
    record["groups_after_add"] = len(opt.param_groups)
    for when, steps in (("first_step", 0), ("sync_step", 2)):
        opt = make_optimizer("adam", model.parameters(), backend)  # k = 3: the third step syncs
        train(model, opt, range(steps), rank, world)
        x, y = local_batch(steps, rank, world)
        torch.nn.functional.mse_loss(model(x), y).backward()
        record[f"{when}_before"] = local_snapshot(model, opt)
        opt.param_groups[0]["adaptive_alpha"] = True
        record[when] = refusal(opt.step)
        record[f"{when}_after"] = local_snapshot(model, opt)
        opt.zero_grad(set_to_none=True)
    torch.save(record, out / f"adaptive-rank{rank}.pt")


def main() -> None:
    out, backends = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for backend in backends:
            for kind in KINDS:
                run_ddp(out, backend, kind, rank, world)
                run_fsdp(out, backend, kind, rank, world)
        # The refusal comes before any backend is called: one backend shows it.
        run_fsdp_adaptive(out, backends[0], rank, world)
    finally:
        dist.barrier()  # without it gloo sometimes aborts in destroy_process_group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
