"""Placeholder: the generic Lookahead wrapper (being written)."""
from torch.optim import Optimizer


class Lookahead(Optimizer):  # pragma: no cover - replaced shortly
    def __init__(self, *a, **k):
        raise NotImplementedError
