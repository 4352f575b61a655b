"""lookahead_fused.integrations with the real libraries: timm, Lightning, transformers, accelerate.

Each test runs the library's own code (timm's optimizer factory and Lookahead, a Lightning
Trainer, a Hugging Face Trainer, an accelerate Accelerator) on a tiny model on the CPU. None
is skipped: a library missing here fails its test (requirements-dev.txt installs Lightning,
transformers and accelerate; timm goes in with `pip install --no-deps timm`, see there).

timm's package __init__ imports torchvision, which is absent (or built for another torch)
beside a CPU torch; `timm.optim` itself needs only `timm.models.group_parameters` (for
layer decay). The fixture `timm_optim` therefore imports the installed timm.optim package
under a bare `timm` package whose __init__ is not run, with that one function stubbed
(layer decay is not used here), and takes every `timm*` module out again afterwards.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lookahead_fused import Lookahead, LookaheadAdamW, backends
from lookahead_fused.integrations import lookahead_of, slow_weights, sync_lookahead

# -- helpers ------------------------------------------------------------------------------


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def _values(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], **tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


# -- timm ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_optim() -> Iterator[types.ModuleType]:
    """The installed `timm.optim` (see the module docstring)."""
    before = {name: mod for name, mod in sys.modules.items() if name == "timm" or name.startswith("timm.")}
    try:
        module = importlib.import_module("timm.optim")
    except Exception:  # noqa: BLE001  torchvision absent (ImportError) or for another torch (RuntimeError)
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("timm")
        assert spec is not None and spec.submodule_search_locations, "timm is not installed (requirements-dev.txt)"
        root = list(spec.submodule_search_locations)
        package = types.ModuleType("timm")
        package.__path__ = root
        package.__spec__ = importlib.machinery.ModuleSpec("timm", None, is_package=True)
        package.__spec__.submodule_search_locations = root
        models = types.ModuleType("timm.models")

        def group_parameters(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("timm.models is not imported in these tests (layer decay)")

        models.group_parameters = group_parameters  # type: ignore[attr-defined]
        sys.modules["timm"], sys.modules["timm.models"] = package, models
        module = importlib.import_module("timm.optim")
    try:
        yield module
    finally:
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        sys.modules.update(before)


def test_timm_factory_builds_the_fused_classes(timm_optim: types.ModuleType) -> None:
    from lookahead_fused import LookaheadAdam, LookaheadSGD
    from lookahead_fused.integrations import timm as lookahead_timm

    names = lookahead_timm.register()
    assert lookahead_timm.register() == names  # again: no change (and no timm warning)
    model = _model()
    expected = {
        "fusedlookaheadadamw": (LookaheadAdamW, None),
        "fusedlookaheadadam": (LookaheadAdam, None),
        "fusedlookaheadsgd": (LookaheadSGD, True),
        "fusedlookaheadmomentum": (LookaheadSGD, False),
    }
    assert sorted(names) == sorted(expected)
    for name, (cls, nesterov) in expected.items():
        opt = timm_optim.create_optimizer_v2(model, name, lr=1e-2, weight_decay=0.05)
        assert type(opt) is cls, name
        # timm's own parameter groups (no decay for biases and norms), timm's Lookahead defaults.
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
        assert all(g["k"] == 6 and g["alpha"] == 0.5 and g["lr"] == 1e-2 for g in opt.param_groups)
        if nesterov is not None:
            assert all(g["nesterov"] is nesterov and g["momentum"] == 0.9 for g in opt.param_groups)
    opt = timm_optim.create_optimizer_v2(model, "fusedlookaheadadamw", lr=1e-2, k=5, alpha=0.8)
    assert all(g["k"] == 5 and g["alpha"] == 0.8 for g in opt.param_groups)
    # Why the names have no underscore: timm looks up the last piece and wraps on "lookahead_".
    assert type(timm_optim.create_optimizer_v2(model, "fused_lookahead_adamw", lr=1e-2)) is torch.optim.AdamW
    assert type(timm_optim.create_optimizer_v2(model, "lookahead_adamw", lr=1e-2)) is timm_optim.Lookahead


def _timm_lookahead(timm_optim: types.ModuleType, model: nn.Module, *, k: int, alpha: float) -> Any:
    return timm_optim.Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01), alpha=alpha, k=k)


def test_sync_lookahead_does_what_timms_does(timm_optim: types.ModuleType) -> None:
    """timm's train.py calls sync_lookahead() after each epoch, then evaluates and saves: an
    out-of-schedule sync φ ← φ + α(θ − φ), θ ← φ with the counter left alone. timm's φ starts
    at the first sync; seeded with θ0 here, timm's run is Algorithm 1, as the fused class's."""
    batches = _batches(11)
    theirs_model, ours_model, wrapped_model = _model(), _model(), _model()
    theirs = _timm_lookahead(timm_optim, theirs_model, k=3, alpha=0.5)
    ours = LookaheadAdamW(ours_model.parameters(), lr=1e-2, weight_decay=0.01, k=3, alpha=0.5)
    wrapped = Lookahead(torch.optim.AdamW(wrapped_model.parameters(), lr=1e-2, weight_decay=0.01), k=3, alpha=0.5)
    assert not hasattr(wrapped, "sync_lookahead")  # the generic wrapper: through integrations.sync_lookahead
    theta0 = _values(theirs_model)
    for model, opt in ((theirs_model, theirs), (ours_model, ours), (wrapped_model, wrapped)):
        _train(model, opt, batches[:1])
    for p, value in zip(theirs_model.parameters(), theta0):  # after AdamW made its state: it starts empty
        theirs._base_optimizer.state[p]["lookahead_slow_buff"] = value  # φ0 = θ0, read at the first sync
    for start, stop in ((1, 4), (4, 8), (8, 11)):
        for model, opt in ((theirs_model, theirs), (ours_model, ours), (wrapped_model, wrapped)):
            _train(model, opt, batches[start:stop])
        before = _values(ours_model)
        theirs.sync_lookahead()
        ours.sync_lookahead()
        sync_lookahead(wrapped)
        assert _differs(before, _values(ours_model))  # mid-cycle: the sync moved θ
        _assert_close(_values(ours_model), _values(theirs_model), rtol=1e-5, atol=1e-6)
        _assert_close(_values(wrapped_model), _values(theirs_model), rtol=1e-5, atol=1e-6)
        # θ = φ now, and the counter still counts the steps taken
        for p in ours_model.parameters():
            assert torch.equal(p, ours.state[p]["slow_weights"])
            assert ours.state[p]["lookahead_step"].item() == stop
    with ours.slow_weights():
        with pytest.raises(RuntimeError, match="sync_lookahead"):
            ours.sync_lookahead()


_CPU = torch.device("cpu")
_CPU_BACKENDS = [b for b in ("eager", "foreach", "cpu", "triton") if backends.unavailable(b, _CPU) is None]
_SYNC_VARIANTS = [
    ("sgd", torch.float32, {"momentum": 0.9, "inner_state": "reset"}),
    ("adam", torch.float32, {"inner_state": "reset", "amsgrad": True}),
    ("adamw", torch.bfloat16, {"inner_state": "pullback"}),
]


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "dtype", "options"), _SYNC_VARIANTS, ids=[v[0] for v in _SYNC_VARIANTS])
def test_sync_lookahead_on_every_backend_is_the_reference_sync(
    backend: str, kind: str, dtype: torch.dtype, options: dict[str, Any]
) -> None:
    """sync_lookahead() between steps is `reference.lookahead_sync` on every parameter (with
    the inner-state policy: reset restarts the step count, which the backends' host-side
    copies must see) and leaves the schedule alone: k=3, syncs at 3 and 6, one out of
    schedule after step 4; every state entry is compared after every step."""
    from lookahead_fused import reference, testing

    params = testing.make_params(dtype, "cpu")
    ref_params = [p.detach().clone() for p in params]
    opt = testing.CLASSES[kind](params, lr=1e-2, k=3, alpha=0.7, backend=backend, **options)
    hyper = {key: value for key, value in opt.param_groups[0].items() if key != "params"}
    ref_states = testing.reference_states(kind, ref_params, hyper)
    gen = torch.Generator().manual_seed(1)
    report = testing.Report()
    for step in range(1, 8):
        grads = [testing._grad(p, gen, 1.0) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference.step_group(kind, ref_params, grads, ref_states, hyper)
        if step == 4:
            opt.sync_lookahead()
            for p, state in zip(ref_params, ref_states):
                reference.lookahead_sync(p, state, alpha=0.7, inner_state=hyper["inner_state"], optimizer=kind)
        testing.compare_step(report, step, opt, params, ref_params, ref_states)
    assert not report.failures, "\n".join(report.failures[:10])
    assert all(opt.state[p]["lookahead_step"].item() == 7 for p in params)


def test_timm_checkpoint_converts_with_slow_weights_and_counter(timm_optim: types.ModuleType, tmp_path: Path) -> None:
    """A timm Lookahead checkpoint taken mid-cycle (7 steps, k=3) goes on in the fused class
    and in the generic wrapper as it would in timm: same φ, counter, k and alpha."""
    from lookahead_fused.integrations.timm import from_timm_state_dict

    batches = _batches(13)
    timm_model = _model()
    theirs = _timm_lookahead(timm_optim, timm_model, k=3, alpha=0.7)
    _train(timm_model, theirs, batches[:7])
    torch.save({"model": timm_model.state_dict(), "optimizer": theirs.state_dict()}, tmp_path / "timm.pt")
    saved = torch.load(tmp_path / "timm.pt", weights_only=True)
    assert "lookahead_slow_buff" in saved["optimizer"]["state"][0]
    slow = [theirs._base_optimizer.state[p]["lookahead_slow_buff"].clone() for p in timm_model.parameters()]

    converted = from_timm_state_dict(saved["optimizer"])
    fused_model, wrapped_model = _model(5), _model(6)
    fused = LookaheadAdamW(fused_model.parameters(), lr=1e-2, weight_decay=0.01)  # k=5, alpha=0.5 until loaded
    wrapped = Lookahead(torch.optim.AdamW(wrapped_model.parameters(), lr=1e-2, weight_decay=0.01))
    for model, opt in ((fused_model, fused), (wrapped_model, wrapped)):
        model.load_state_dict(saved["model"])
        opt.load_state_dict(converted)
        assert all(g["k"] == 3 and g["alpha"] == 0.7 for g in opt.param_groups)
    for p, s in zip(fused_model.parameters(), slow):
        assert torch.equal(fused.state[p]["slow_weights"], s)
        assert fused.state[p]["lookahead_step"].item() == 7
    assert [g["lookahead_step"] for g in wrapped.param_groups] == [7]

    _train(timm_model, theirs, batches[7:])  # syncs at 9 and 12
    _train(fused_model, fused, batches[7:])
    _train(wrapped_model, wrapped, batches[7:])
    _assert_close(_values(fused_model), _values(timm_model), rtol=1e-5, atol=1e-6)
    _assert_close(_values(wrapped_model), _values(timm_model), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="not a timm Lookahead checkpoint"):
        from_timm_state_dict(fused.state_dict())
    legacy = {"state": {}, "slow_state": {140234: {"slow_buffer": torch.zeros(1)}}, "param_groups": []}
    with pytest.raises(ValueError, match="timm < 0.5"):
        from_timm_state_dict(legacy)


# -- Lightning ----------------------------------------------------------------------------


def _lightning() -> Any:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()
            self.seen: dict[str, list[torch.Tensor]] = {}
            self.fail_in_predict = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self(x).float(), y)

        def _record(self, stage: str) -> None:
            self.seen[stage] = _values(self.net)
            if self.trainer.optimizers:  # none in a test of its own
                state = self.trainer.optimizers[0].state
                self.seen[stage + "_phi"] = [state[p]["slow_weights"].clone() for p in self.net.parameters()]

        def validation_step(self, batch: Any, index: int) -> None:
            self._record("val")

        def test_step(self, batch: Any, index: int) -> None:
            self._record("test")

        def predict_step(self, batch: Any, index: int) -> None:
            self._record("predict")
            if self.fail_in_predict:
                raise RuntimeError("predict failed")  # Lightning calls on_exception, then raises it

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return LookaheadAdamW(self.parameters(), lr=1e-2, k=3)

    return pl, Module


def _loader() -> torch.utils.data.DataLoader:
    x, y = zip(*_batches(4))
    data = torch.utils.data.TensorDataset(torch.cat(x), torch.cat(y))
    return torch.utils.data.DataLoader(data, batch_size=8)  # 4 steps an epoch, in order


def _trainer(pl: Any, tmp_path: Path, max_steps: int, **kwargs: Any) -> Any:
    from lookahead_fused.integrations.lightning import LookaheadEvalCallback

    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, callbacks=[LookaheadEvalCallback()], **kwargs,
    )  # fmt: skip


def test_lightning_evaluates_checkpoints_and_resumes_on_slow_weights(tmp_path: Path) -> None:
    from lookahead_fused.integrations.lightning import FAST_WEIGHTS_KEY

    pl, Module = _lightning()
    torch.manual_seed(0)
    whole = Module()
    _trainer(pl, tmp_path, 8).fit(whole, _loader(), _loader())

    torch.manual_seed(0)
    first = Module()
    trainer = _trainer(pl, tmp_path, 4)
    trainer.fit(first, _loader(), _loader())  # 4 steps, k=3: mid-cycle, θ ≠ φ
    theta = _values(first.net)
    assert _differs(first.seen["val_phi"], theta)
    _assert_close(first.seen["val"], first.seen["val_phi"], rtol=0, atol=0)  # validation saw φ
    trainer.test(first, _loader())
    _assert_close(first.seen["test"], first.seen["val_phi"], rtol=0, atol=0)  # so did test
    _assert_close(_values(first.net), theta, rtol=0, atol=0)  # and θ is back after each
    first.fail_in_predict = True
    with pytest.raises(RuntimeError, match="predict failed"):
        trainer.predict(first, _loader())
    _assert_close(first.seen["predict"], first.seen["val_phi"], rtol=0, atol=0)  # predict saw φ
    _assert_close(_values(first.net), theta, rtol=0, atol=0)  # θ is back after the interruption

    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    names = [n for n, _ in first.named_parameters()]
    _assert_close([ckpt["state_dict"][n] for n in names], first.seen["val_phi"], rtol=0, atol=0)
    _assert_close([ckpt[FAST_WEIGHTS_KEY][n] for n in names], theta, rtol=0, atol=0)
    assert ckpt["optimizer_states"][0]["state"][0]["lookahead_step"].item() == 4
    _assert_close(_values(first.net), theta, rtol=0, atol=0)

    torch.manual_seed(1)
    resumed = Module()
    _trainer(pl, tmp_path, 8).fit(resumed, _loader(), _loader(), ckpt_path=tmp_path / "mid.ckpt")
    _assert_close(_values(resumed.net), _values(whole.net), rtol=0, atol=0)  # resumed exactly

    # A test from the checkpoint evaluates φ (the fast weights are for a resumed fit only).
    torch.manual_seed(2)
    tested = Module()
    _trainer(pl, tmp_path, 1).test(tested, _loader(), ckpt_path=tmp_path / "mid.ckpt", weights_only=False)
    _assert_close(tested.seen["test"], first.seen["val_phi"], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_mixed_precision_clips_fused_optimizers(tmp_path: Path, precision: str) -> None:
    """Lightning's MixedPrecision refuses gradient clipping for optimizers that unscale in
    their step (both precisions, a real Trainer on the CPU); LookaheadMixedPrecision clips,
    and its run is the manual GradScaler loop: scale, backward, unscale_, clip, step."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lookahead_fused.integrations.lightning import LookaheadMixedPrecision

    pl, Module = _lightning()
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _trainer(pl, tmp_path, 3, plugins=[MixedPrecision(precision, "cpu")], gradient_clip_val=0.05).fit(
            Module(), _loader()
        )
    torch.manual_seed(0)
    module = Module()
    plugin = LookaheadMixedPrecision(precision, "cpu")
    _trainer(pl, tmp_path, 3, plugins=[plugin], gradient_clip_val=0.05).fit(module, _loader())

    torch.manual_seed(0)
    manual = Module()
    opt = manual.configure_optimizers()
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    norms = []
    for x, y in _batches(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            loss = F.mse_loss(manual(x).float(), y)
        if scaler is None:
            loss.backward()
            norms.append(nn.utils.clip_grad_norm_(manual.parameters(), 0.05))
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norms.append(nn.utils.clip_grad_norm_(manual.parameters(), 0.05))
            scaler.step(opt)
            scaler.update()
    assert all(n > 0.05 for n in norms)  # every step was clipped
    _assert_close(_values(module.net), _values(manual.net), rtol=0, atol=0)


def test_lightning_16_mixed_clipping_still_skips_inf_steps(tmp_path: Path) -> None:
    """An overflowing scale: the gradients are inf, the unscale_ before clipping finds it, and
    GradScaler skips the fused step (parameters, state and counter untouched)."""
    from lookahead_fused.integrations.lightning import LookaheadMixedPrecision

    pl, Module = _lightning()
    torch.manual_seed(0)
    module = Module()
    start = _values(module.net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120, growth_interval=1000)
    plugin = LookaheadMixedPrecision("16-mixed", "cpu", scaler=scaler)
    _trainer(pl, tmp_path, 1, plugins=[plugin], gradient_clip_val=0.05).fit(module, _loader())
    _assert_close(_values(module.net), start, rtol=0, atol=0)
    assert scaler.get_scale() < 2.0**120  # the scaler saw the inf and backed off
    opt = lookahead_of(module.trainer.optimizers[0])
    assert all(opt.state.get(p, {}).get("lookahead_step", torch.zeros(())).item() == 0 for p in module.parameters())


# -- Hugging Face: transformers' Trainer, accelerate -----------------------------------------


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.net(x)
        return {"loss": None if labels is None else F.mse_loss(out, labels), "logits": out}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batches: list) -> None:
        self.rows = [{"x": x[i], "labels": y[i]} for x, y in batches for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def test_hf_trainer_evaluates_and_saves_slow_weights(tmp_path: Path) -> None:
    import safetensors.torch
    from transformers import Trainer, TrainingArguments

    from lookahead_fused.integrations.transformers import LookaheadTrainerMixin

    class LookaheadTrainer(LookaheadTrainerMixin, Trainer):
        pass

    torch.manual_seed(0)
    model = _Regression()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, lr_scheduler_type="constant", max_grad_norm=0.0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = LookaheadTrainer(
        model=model, args=args, train_dataset=_Rows(_batches(4)), eval_dataset=_Rows(_batches(2, seed=7)),
        optimizer_cls_and_kwargs=(LookaheadAdamW, {"lr": 1e-2, "k": 3}),
    )  # fmt: skip
    trainer.train()
    opt = lookahead_of(trainer.optimizer)
    assert isinstance(opt, LookaheadAdamW) and opt is not trainer.optimizer  # accelerate wraps it
    theta = _values(model)
    phi = [opt.state[p]["slow_weights"].clone() for p in model.parameters()]
    assert _differs(theta, phi)
    x, y = (torch.cat(t) for t in zip(*_batches(2, seed=7)))
    with opt.slow_weights():
        loss_phi = F.mse_loss(model.net(x), y).item()
    loss_theta = F.mse_loss(model.net(x), y).item()
    assert loss_phi != loss_theta

    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(loss_phi, rel=1e-6)
    with opt.slow_weights():
        expected = model.net(x).detach()
    predictions = trainer.predict(_Rows(_batches(2, seed=7))).predictions
    torch.testing.assert_close(torch.as_tensor(predictions), expected)
    trainer.save_model(str(tmp_path / "saved"))
    saved = safetensors.torch.load_file(str(tmp_path / "saved" / "model.safetensors"))
    _assert_close([saved[n] for n, _ in model.named_parameters()], phi, rtol=0, atol=0)
    _assert_close(_values(model), theta, rtol=0, atol=0)  # training goes on from θ


def test_accelerate_prepared_optimizer_reaches_slow_weights(tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _model()
    opt = LookaheadAdamW(model.parameters(), lr=1e-2, k=3)
    model, prepared = accelerator.prepare(model, opt)
    assert not hasattr(prepared, "slow_weights") and prepared.optimizer is opt
    for x, y in _batches(4):
        prepared.zero_grad()
        accelerator.backward(F.mse_loss(model(x), y))
        prepared.step()
    theta = _values(model)
    phi = [opt.state[p]["slow_weights"].clone() for p in model.parameters()]
    assert _differs(theta, phi)
    assert lookahead_of(prepared) is opt
    with slow_weights(prepared):
        _assert_close(_values(model), phi, rtol=0, atol=0)
        with slow_weights(prepared):  # nested (a save inside an evaluation): nothing more happens
            _assert_close(_values(model), phi, rtol=0, atol=0)
    _assert_close(_values(model), theta, rtol=0, atol=0)
    with prepared.optimizer.slow_weights():  # the recipe without the helper
        _assert_close(_values(model), phi, rtol=0, atol=0)
    _assert_close(_values(model), theta, rtol=0, atol=0)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lookahead_of(plain) is None
    with slow_weights(plain):  # any other optimizer: nothing happens
        _assert_close(_values(model), theta, rtol=0, atol=0)

    # accelerate's own checkpoint: θ as the model, φ and the counter in the optimizer's state
    accelerator.save_state(str(tmp_path / "state"))
    again = Accelerator(cpu=True)
    fresh_model = _model(3)
    fresh = LookaheadAdamW(fresh_model.parameters(), lr=1e-2, k=3)
    fresh_model, _ = again.prepare(fresh_model, fresh)
    again.load_state(str(tmp_path / "state"))
    _assert_close(_values(fresh_model), theta, rtol=0, atol=0)
    for q, value in zip(fresh_model.parameters(), phi):
        assert torch.equal(fresh.state[q]["slow_weights"], value)
        assert fresh.state[q]["lookahead_step"].item() == 4
