"""Losses by name, so a stage in another process gets its loss as a name, not a pickled
function (a bound method would drag its owner along)."""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F

from aimcpipe.errors import ConfigError
from aimcpipe.stages.randomness import deterministic_loss
from aimcpipe.stages.stage import LossFn

__all__ = ["LOSSES", "check_loss", "resolve_loss"]


@deterministic_loss
def _half_mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """½·mean squared error, the least-squares objective of arXiv 2406.12774."""
    return 0.5 * F.mse_loss(y, t.to(y.dtype).reshape(y.shape))


LOSSES: dict[str, LossFn] = {"cross-entropy": F.cross_entropy, "mse": _half_mse}


def check_loss(loss: object, *, remote: bool) -> None:
    """A loss is a name from :data:`LOSSES`, a callable, or None (chosen by the task); a
    callable that must reach another process has to pickle."""
    if loss is None:
        return
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ConfigError(f"loss: {loss!r} is not a loss; allowed: {', '.join(LOSSES)}")
        return
    if not callable(loss):
        raise ConfigError(
            f"loss: must be one of {', '.join(LOSSES)} or a callable, got {type(loss).__name__}"
        )
    if remote:
        try:
            pickle.dumps(loss)
        except Exception as exc:
            raise ConfigError(
                f"loss: {loss!r} cannot be sent to a stage process ({type(exc).__name__}); "
                "give a loss name or a module-level function"
            ) from None


def resolve_loss(loss: str | LossFn) -> LossFn:
    return LOSSES[loss] if isinstance(loss, str) else loss
