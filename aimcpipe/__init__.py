"""aimcpipe: pipeline-parallel training on simulated analog in-memory computing accelerators."""

from aimcpipe.errors import AimcpipeError, ConfigError, ScheduleError, StageFailure

__all__ = ["AimcpipeError", "ConfigError", "ScheduleError", "StageFailure", "__version__"]
__version__ = "0.1.0"
