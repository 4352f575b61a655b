"""Mutation fuzz: the legal changes a training script makes between steps, on every backend,
each run compared with `lookahead_fused.reference` after every step.

An example is a seeded random schedule of steps with mutations between them. Every example
makes every mutation of MUTATIONS at least once (in a random order, some twice), so each
backend's CI examples cover all of them:

    memory_format    a 4-d weight to channels_last or back (`model.to(memory_format=...)`)
    relayout_data    `.data` replaced by the same values in another memory order (transposed)
    new_storage      `.data` replaced by a copy in new memory (weights loaded, `.to()` copies)
    load_values      `p.copy_(...)`: new values in the same memory (a checkpoint loaded into it)
    to_dtype         a parameter to bf16/fp16 and back to fp32 later (`.half()`, `.bfloat16()`)
    add_param_group  a new group with its own lr, k and alpha
    resume_elsewhere `state_dict()` through torch.save / torch.load(weights_only=True) into a
                     fresh optimizer of another backend
    grads_none       `zero_grad(set_to_none=True)`: a step with no gradient at all
    grads_zero       `zero_grad(set_to_none=False)`: a step with zero gradients
    no_grad_on_sync  one parameter without a gradient exactly on its group's sync step

The reference runs on its own copy of the parameters with the same mutations applied (it is
indifferent to memory order; its state keeps the dtype it was created in, which is what the
optimizers keep too: fp32 for bf16/fp16 parameters). α is not 0.5, and the schedule makes
sure each example syncs.

    python -m pytest tests/test_mutation_fuzz.py                           # CI: 3 examples a backend
    LOOKAHEAD_FUSED_FUZZ=long python -m pytest tests/test_mutation_fuzz.py  # 200 a backend
"""

from __future__ import annotations

import io
import os
import random
from collections import Counter

import pytest
import torch
from torch import Tensor

from lookahead_fused import reference
from lookahead_fused.testing import CLASSES, Report, compare_step, reference_states

from .conftest import usable_backends

MUTATIONS = (
    "memory_format",
    "relayout_data",
    "new_storage",
    "load_values",
    "to_dtype",
    "add_param_group",
    "resume_elsewhere",
    "grads_none",
    "grads_zero",
    "no_grad_on_sync",
)
EXAMPLES = {"ci": 3, "long": 200}[os.environ.get("LOOKAHEAD_FUSED_FUZZ", "ci")]
KINDS = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": dict(lr=0.01, weight_decay=0.01),
    "adamw": dict(lr=0.01, weight_decay=0.05, amsgrad=True),
}
# A conv weight (memory formats), a matrix (transposed layouts), a bias, an odd-sized vector.
SHAPES = ((4, 3, 3, 3), (6, 5), (6,), (33,))
LOW = (torch.bfloat16, torch.float16)


class Run:
    """One example: the optimizer under test and the reference, side by side."""

    def __init__(self, backend: str, kind: str, rng: random.Random, seed: int) -> None:
        self.kind, self.rng, self.backends = kind, rng, usable_backends()
        self.gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(s, generator=self.gen).requires_grad_() for s in SHAPES]
        self.ref = [p.detach().clone() for p in self.params]
        self.k = rng.choice((2, 3))
        self.hyper = dict(KINDS[kind], k=self.k, alpha=rng.choice((0.3, 0.7, 0.8)))
        self.hyper["inner_state"] = rng.choice(("maintain", "reset", "pullback"))
        self.backend = backend
        self.opt = CLASSES[kind](self.params, backend=backend, **self.hyper)
        self.groups = [(list(range(len(self.params))), self._hyper(0))]
        self.states = reference_states(kind, self.ref, self.groups[0][1])
        self.counts = [0]  # steps of each group, as the reference counts them
        self.syncs = 0
        self.report = Report()
        self.steps = 0

    def _hyper(self, index: int) -> dict:
        return {key: v for key, v in self.opt.param_groups[index].items() if key != "params"}

    # -- mutations ------------------------------------------------------------------------

    def memory_format(self) -> None:
        p = self.params[0]
        to_last = p.is_contiguous()  # channels_last, or back from it
        p.data = p.data.contiguous(memory_format=torch.channels_last if to_last else torch.contiguous_format)

    def relayout_data(self) -> None:
        p = self.params[1]
        p.data = p.data.t().contiguous().t() if p.is_contiguous() else p.data.contiguous()

    def new_storage(self) -> None:
        i = self.rng.randrange(len(self.params))
        self.params[i].data = self.params[i].data.clone()

    def load_values(self) -> None:
        i = self.rng.randrange(len(self.params))
        values = torch.randn(self.params[i].shape, generator=self.gen)
        with torch.no_grad():
            self.params[i].copy_(values)
            self.ref[i].copy_(values)

    def to_dtype(self) -> None:
        i = self.rng.choice((1, 2, 3))
        p = self.params[i]
        dtype = self.rng.choice(LOW) if p.dtype == torch.float32 else torch.float32
        p.data = p.data.to(dtype)
        self.ref[i].data = self.ref[i].data.to(dtype)
        if p.dtype != torch.float32:  # a model in low precision is not left so for good
            self.pending.append("to_dtype")

    def add_param_group(self) -> None:
        p = torch.randn(7, 3, generator=self.gen).requires_grad_()
        k = self.rng.choice((2, 3))
        self.opt.add_param_group({"params": [p], "lr": self.hyper["lr"] / 2, "k": k, "alpha": 0.6})
        self.params.append(p)
        self.ref.append(p.detach().clone())
        self.groups.append(([len(self.params) - 1], self._hyper(len(self.opt.param_groups) - 1)))
        self.states += reference_states(self.kind, self.ref[-1:], self.groups[-1][1])
        self.counts.append(0)

    def resume_elsewhere(self) -> None:
        buffer = io.BytesIO()
        torch.save(self.opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        others = [b for b in self.backends if b != self.backend] or [self.backend]
        self.backend = self.rng.choice(others)
        groups = [{"params": [self.params[i] for i in members]} for members, _ in self.groups]
        self.opt = CLASSES[self.kind](groups, backend=self.backend, **self.hyper)
        self.opt.load_state_dict(saved)

    # grads_none, grads_zero and no_grad_on_sync shape the next step's gradients (see step).

    # -- a step -------------------------------------------------------------------------

    def step(self, grads_mode: str | None = None) -> None:
        syncing = [(c + 1) % h["k"] == 0 for c, (_, h) in zip(self.counts, self.groups)]
        grads: list[Tensor | None] = []
        skip = None
        if grads_mode == "no_grad_on_sync":
            # A parameter of a group whose step this is a sync step (there is one: see run()).
            skip = self.rng.choice([i for g, (members, _) in enumerate(self.groups) if syncing[g] for i in members])
        for i, p in enumerate(self.params):
            if grads_mode == "grads_none" or i == skip:
                grads.append(None)
            elif grads_mode == "grads_zero":
                grads.append(torch.zeros(p.shape, dtype=p.dtype))
            else:
                grads.append((torch.randn(p.shape, generator=self.gen) * 0.1).to(p.dtype))
        if grads_mode == "grads_none":
            self.opt.zero_grad(set_to_none=True)
        elif grads_mode == "grads_zero":
            for p in self.params:
                p.grad = torch.ones_like(p)  # zero_grad zeroes what is there, in place
            self.opt.zero_grad(set_to_none=False)
        else:
            for p, g in zip(self.params, grads):
                p.grad = None if g is None else g.clone()
        self.opt.step()
        for g, (members, hyper) in enumerate(self.groups):
            reference.step_group(
                self.kind, [self.ref[i] for i in members], [grads[i] for i in members],
                [self.states[i] for i in members], hyper,
            )  # fmt: skip
            self.counts[g] += 1
        self.syncs += sum(syncing)
        self.steps += 1
        compare_step(self.report, self.steps, self.opt, self.params, self.ref, self.states)

    def run(self) -> Counter:
        """Every mutation once in a random order, a few again, with steps between them."""
        order = list(MUTATIONS) + self.rng.sample(MUTATIONS, 3)
        self.rng.shuffle(order)
        self.pending: list[str] = []
        done: Counter = Counter()
        self.step()
        while order or self.pending:
            mutation = self.pending.pop() if self.pending and (not order or self.rng.random() < 0.3) else order.pop()
            if mutation == "no_grad_on_sync":
                while not any((c + 1) % h["k"] == 0 for c, (_, h) in zip(self.counts, self.groups)):
                    self.step()  # up to the next sync step of some group
                self.step("no_grad_on_sync")
            elif mutation in ("grads_none", "grads_zero"):
                self.step(mutation)
            else:
                getattr(self, mutation)()
                for _ in range(self.rng.randint(1, 3)):
                    self.step()
            done[mutation] += 1
            if not self.report.ok:
                break
        return done


@pytest.mark.parametrize("example", range(EXAMPLES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mutations_between_steps(backend: str, kind: str, example: int) -> None:
    seed = 1000 * example + sorted(KINDS).index(kind)
    run = Run(backend, kind, random.Random(seed), seed)
    done = run.run()
    assert run.report.ok, f"seed {seed}, {run.steps} steps, backend now {run.backend}:\n" + "\n".join(
        run.report.failures[:10]
    )
    assert set(done) == set(MUTATIONS), done  # every change at least once
    assert run.syncs > 0
