"""Placeholder: backend "foreach" (being written). Delegates to eager for now."""
from .eager import step, unavailable  # noqa: F401
