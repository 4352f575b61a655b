"""Lightning: evaluate and checkpoint the slow weights, and clip gradients under 16-mixed.

    from lookahead_fused.integrations.lightning import LookaheadEvalCallback, LookaheadMixedPrecision

    trainer = L.Trainer(
        callbacks=[LookaheadEvalCallback()],
        plugins=[LookaheadMixedPrecision("16-mixed", device="cuda")],  # instead of precision="16-mixed"
        gradient_clip_val=1.0,
    )

`LookaheadEvalCallback` runs validation, test and predict on the slow weights φ (swapped in
at the loop's start, out at its end or at an exception) and writes φ as the model weights of
every full checkpoint, with the fast weights θ kept beside them so that a resumed fit goes on
exactly where it stopped (the optimizer state, φ and the counter included, is the optimizer's
own `state_dict()`, untouched).

`LookaheadMixedPrecision` is Lightning's `MixedPrecision` that can clip. Lightning's plugin
raises "does not allow for gradient clipping because it performs unscaling of gradients
internally" for every optimizer with `_step_supports_amp_scaling` (torch's fused Adam, and
the fused classes here, which take GradScaler's scale and unscale inside their kernel): it
never calls `scaler.unscale_` for them, so the gradients it would clip are still scaled. This
plugin unscales them with the scaler, once, right before clipping; GradScaler then hands the
optimizer no scale and its inf check's result (torch's documented unscale_-then-step
pattern), so a step with an inf or NaN gradient is still skipped. Steps without clipping keep
the fused in-kernel unscaling.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:  # mypy reads the unified package; the standalone one is a runtime fallback
    import lightning.pytorch as pl
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType
else:
    try:
        import lightning.pytorch as pl
        from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType
    except ImportError:  # the standalone package
        import pytorch_lightning as pl
        from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling
        from pytorch_lightning.plugins.precision import MixedPrecision, Precision
        from pytorch_lightning.utilities import GradClipAlgorithmType

from . import lookahead_of, slow_weights

__all__ = ["LookaheadEvalCallback", "LookaheadMixedPrecision", "put_slow_weights", "FAST_WEIGHTS_KEY"]

# Where a checkpoint keeps the fast weights θ, by parameter name, when its "state_dict" holds φ.
FAST_WEIGHTS_KEY = "lookahead_fused_fast_weights"
# Set in a checkpoint whose "state_dict" holds the slow weights already.
_DONE_KEY = "lookahead_fused_slow_state_dict"


@torch.no_grad()
def put_slow_weights(
    checkpoint: dict[str, Any], module: nn.Module, optimizers: list[Any], *, keep_fast: bool = True
) -> None:
    """Replace the parameters in `checkpoint["state_dict"]` (the module's state_dict, as
    Lightning's checkpoint holds it) by copies of the slow weights of the Lookahead optimizers
    among `optimizers`; with `keep_fast`, keep the fast weights under `FAST_WEIGHTS_KEY`.
    Buffers (BatchNorm statistics) stay as they are. Does nothing twice to one checkpoint.

    For weights-only checkpoints (`ModelCheckpoint(save_weights_only=True)`), which Lightning
    does not show to callbacks, call it from the LightningModule's own hook:
    `def on_save_checkpoint(self, checkpoint): put_slow_weights(checkpoint, self, self.trainer.optimizers)`."""
    lookaheads = [la for la in map(lookahead_of, optimizers) if la is not None]
    state_dict = checkpoint.get("state_dict")
    if not lookaheads or state_dict is None or checkpoint.get(_DONE_KEY):
        return
    if any(la._in_slow_weights for la in lookaheads):
        keep_fast = False  # saved inside an evaluation: the parameters hold φ, θ is out of reach
    fast: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for la in lookaheads:
            stack.enter_context(slow_weights(la))
        for name, p in module.named_parameters(remove_duplicate=False):
            if name in state_dict:
                fast[name] = state_dict[name]  # θ: it shares the parameter's own storage
                state_dict[name] = p.detach().clone()  # φ, in the parameter's dtype
    # The fast weights' own tensors hold θ again now (a copy-swapped parameter was copied back).
    if keep_fast:
        checkpoint[FAST_WEIGHTS_KEY] = {name: t.detach().clone() for name, t in fast.items()}
    checkpoint[_DONE_KEY] = True


class LookaheadEvalCallback(pl.Callback):
    """Validation, test and predict on the slow weights φ; φ as the model weights of every
    full checkpoint (θ beside them, for an exact resume).

    Args:
        save_fast_weights: keep θ in each checkpoint (under `FAST_WEIGHTS_KEY`, as large as
            the model's parameters) and put it back into the parameters when a fit resumes
            from it. Without, a resumed fit restarts θ at φ (a sync's worth of change).
    """

    def __init__(self, save_fast_weights: bool = True) -> None:
        self.save_fast_weights = save_fast_weights
        self._swap: contextlib.ExitStack | None = None

    # -- evaluation loops on φ -----------------------------------------------------------

    def _swap_in(self, trainer: pl.Trainer) -> None:
        self._swap_out()
        stack = contextlib.ExitStack()
        try:
            for optimizer in trainer.optimizers:
                stack.enter_context(slow_weights(optimizer))
        except BaseException:
            stack.close()
            raise
        self._swap = stack

    def _swap_out(self) -> None:
        stack, self._swap = self._swap, None
        if stack is not None:
            stack.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()  # the fast weights come back even when a loop fails

    # -- checkpoints ---------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        put_slow_weights(checkpoint, pl_module, trainer.optimizers, keep_fast=self.save_fast_weights)

    @torch.no_grad()
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has loaded "state_dict" (φ) into the module; a fit goes on from θ. A test,
        # validate or predict from the checkpoint keeps φ.
        fast = checkpoint.get(FAST_WEIGHTS_KEY)
        if fast is None or trainer.state.fn != "fit":
            return
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            if name in fast:
                p.copy_(fast[name])


class LookaheadMixedPrecision(MixedPrecision):
    """Lightning's MixedPrecision ("16-mixed" or "bf16-mixed") that also clips the gradients
    of optimizers that unscale inside their step (see the module docstring). Pass it as
    `Trainer(plugins=[LookaheadMixedPrecision("16-mixed", device="cuda")])`, without
    `precision=`."""

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if clip_val > 0 and self.scaler is not None and _optimizer_handles_unscaling(optimizer):
            # Lightning did not unscale for this optimizer; the scaler records it, and its
            # step() then hands the optimizer grad_scale=None and the inf check's result.
            self.scaler.unscale_(optimizer)
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
