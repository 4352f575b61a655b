"""Data parallel training on two gloo processes (CPU): DDP and FSDP2 (`fully_shard`).

Lookahead is elementwise, so under DDP every rank steps the same averaged gradients and the
ranks stay bit-identical, and under FSDP2 each rank steps its own shards with no
communication. One `torch.distributed.run` launch (tests/distributed_worker.py) trains
every backend usable here with LookaheadSGD and LookaheadAdam; this module checks:

- DDP: the two ranks end with bit-identical parameters and optimizer state, equal (within
  the fp32 tolerance: the all-reduce sums in another order) to one process stepping the
  same optimizer on the combined batch, with the same backend and with the reference
  (backend "eager", lookahead_fused.reference);
- FSDP2: the optimizer state is sharded like the parameters (DTensors), the gathered
  parameters equal the single-process runs (same backend, reference), `slow_weights()`
  reaches the sharded storage that FSDP2 gathers from, and a round trip through
  torch.distributed.checkpoint in the middle of a Lookahead cycle resumes bit for bit;
- FSDP2 with adaptive_alpha=True is refused on every rank, at every way in, before anything
  changes (α̂ needs dot products over whole groups, and each rank holds only its shards).
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lookahead_fused.testing import TOLERANCES

from .conftest import usable_backends
from .distributed_worker import KINDS, STEPS, batch, make_model, make_optimizer

WORLD = 2
TOL = TOLERANCES[torch.float32]
BACKENDS = usable_backends()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the two ranks once for the whole module; their files land in the returned folder."""
    out = tmp_path_factory.mktemp("distributed")
    worker = Path(__file__).with_name("distributed_worker.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), str(out), *BACKENDS,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"the ranks failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return out


@functools.cache
def _single_process(kind: str, backend: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """The same training in one process on the whole batch (cached: the DDP and FSDP2 tests
    of every backend compare with the reference's run)."""
    model = make_model(seed=0)
    opt = make_optimizer(kind, model.parameters(), backend)
    for step in range(STEPS):
        x, y = batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()], opt


def _load(results: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(results / f"{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_bitwise(a: Any, b: Any) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _assert_state_close(got: dict[int, dict[str, torch.Tensor]], opt: torch.optim.Optimizer) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(got) == list(range(len(params)))
    for i, p in enumerate(params):
        want = opt.state[p]
        assert set(got[i]) == set(want)
        for key, value in want.items():
            where = f"vs {opt.backend}: param {i} state {key}"
            torch.testing.assert_close(got[i][key], value, **TOL, msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_ranks_identical_and_equal_to_one_process(results: Path, backend: str, kind: str) -> None:
    ranks = _load(results, f"ddp-{backend}-{kind}")
    _assert_bitwise(ranks[0], ranks[1])
    for single in dict.fromkeys((backend, "eager")):  # the same backend, and the reference
        params, opt = _single_process(kind, single)
        torch.testing.assert_close(ranks[0]["params"], params, **TOL, msg=lambda m, single=single: f"vs {single}: {m}")
        _assert_state_close(ranks[0]["state"], opt)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_shards_equal_one_process(results: Path, backend: str, kind: str) -> None:
    ranks = _load(results, f"fsdp-{backend}-{kind}")
    _assert_bitwise(ranks[0]["params"], ranks[1]["params"])  # gathered: the same on every rank
    reference_params, reference_opt = _single_process(kind, "eager")
    torch.testing.assert_close(ranks[0]["params"], reference_params, **TOL, msg=lambda m: f"vs eager: {m}")
    _assert_state_close(ranks[0]["state"], reference_opt)
    params, opt = _single_process(kind, backend)
    torch.testing.assert_close(ranks[0]["params"], params, **TOL)
    _assert_state_close(ranks[0]["state"], opt)
    # slow_weights() put φ where FSDP2 gathers from, and the fast weights back afterwards.
    slow = [opt.state[p]["slow_weights"] for p in opt.param_groups[0]["params"]]
    torch.testing.assert_close(ranks[0]["slow"], slow, **TOL)
    _assert_bitwise(ranks[0]["after_swap"], ranks[0]["params"])
    assert not all(torch.equal(a, b) for a, b in zip(slow, params)), "mid-cycle φ and θ should differ"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_distributed_checkpoint_resumes_mid_cycle(results: Path, backend: str, kind: str) -> None:
    for rank in _load(results, f"fsdp-{backend}-{kind}"):
        _assert_bitwise(rank["resumed"], rank["params"])
        _assert_bitwise(rank["resumed_state"], rank["state"])


# What every refusal of adaptive α with sharded parameters must say.
_ADAPTIVE_REFUSAL = [r"adaptive_alpha=True", r"sharded \(DTensor\) parameters", r"adaptive_alpha=False"]


def test_fsdp2_adaptive_alpha_refused_before_any_change(results: Path) -> None:
    """Adaptive α reduces over whole groups, which no rank holds under FSDP2: refused on every
    rank, in the constructor, add_param_group (the group is not added), and in step() when
    switched on in param_groups, before the first step or a sync, with nothing changed. The
    worker tries it with the first backend only: the refusal comes before any backend runs."""
    for rank, record in enumerate(_load(results, "adaptive")):
        for way in ("constructor", "add_param_group", "first_step", "sync_step"):
            message = record[way]
            assert message is not None, f"rank {rank}: {way} accepted adaptive_alpha with sharded parameters"
            for pattern in _ADAPTIVE_REFUSAL:
                assert re.search(pattern, message), f"rank {rank}: {way}: {message!r} lacks {pattern!r}"
        assert record["groups_after_add"] == 1, "the refused group stayed in param_groups"
        assert record["first_step_after"]["state"] == {}, "the refused first step built optimizer state"
        for way in ("first_step", "sync_step"):
            _assert_bitwise(record[f"{way}_after"], record[f"{way}_before"])
