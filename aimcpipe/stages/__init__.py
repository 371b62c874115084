"""aimcpipe.stages: the model zoo (partitioners and Stage to come)."""

from aimcpipe.stages.zoo import MODELS, build_model, resolve_factory

__all__ = ["MODELS", "build_model", "resolve_factory"]
