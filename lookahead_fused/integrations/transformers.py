"""Hugging Face Trainer: evaluate, predict and save the slow weights.

    from transformers import Trainer
    from lookahead_fused import LookaheadAdamW
    from lookahead_fused.integrations.transformers import LookaheadTrainerMixin

    class LookaheadTrainer(LookaheadTrainerMixin, Trainer):
        pass

    trainer = LookaheadTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=val,
        optimizer_cls_and_kwargs=(LookaheadAdamW, {"lr": 3e-4, "k": 5, "alpha": 0.5}),
    )

`Trainer.evaluate()`, `predict()` and `save_model()` (which every checkpoint save goes through)
run with the slow weights φ in the parameters; training steps see the fast weights. A
`TrainerCallback` cannot do this: its `on_evaluate` and `on_save` events come after the
evaluation and the save, and a user's own `trainer.evaluate()` raises no event before it.

The optimizer is found through accelerate's `AcceleratedOptimizer` (`trainer.optimizer`
after preparation). While φ is swapped in, the fused classes' parameters are views of one
flat buffer per bucket; safetensors (>= 0.4) and `save_pretrained` save such disjoint views
as separate tensors (tested with safetensors 0.8, transformers 5.24). The checkpoint's
optimizer state (saved after the model, with the fast weights back) holds φ and the counter
as usual, but its model weights are φ: a fit resumed from it starts θ at φ, a jump that the
uninterrupted run does not make (the Lightning callback keeps θ beside φ for this; here the
checkpoint files are the Trainer's own).

Not covered: FSDP, DeepSpeed and XLA saving paths (they gather or shard the weights their
own way).
"""

from __future__ import annotations

from typing import Any

from . import slow_weights

__all__ = ["LookaheadTrainerMixin"]


class LookaheadTrainerMixin:
    """Put before `transformers.Trainer` in a subclass's bases: evaluate, predict and save_model
    then run on the slow weights of the Lookahead optimizer (LookaheadSGD/Adam/AdamW or
    `Lookahead`) the Trainer trains with. With any other optimizer nothing changes."""

    optimizer: Any

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with slow_weights(self.optimizer):
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with slow_weights(self.optimizer):
            return super().predict(*args, **kwargs)  # type: ignore[misc]

    def save_model(self, *args: Any, **kwargs: Any) -> Any:
        with slow_weights(self.optimizer):
            return super().save_model(*args, **kwargs)  # type: ignore[misc]
