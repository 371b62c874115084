"""Error types, one per area, so callers can catch what they can act on.

Every message is a single line that names the offending key or value and what is allowed;
the CLI prints it as is and exits with status 2.
"""

__all__ = ["AimcpipeError", "ConfigError", "ScheduleError", "StageFailure"]


class AimcpipeError(Exception):
    """Base class of every error aimcpipe raises on purpose."""


class ConfigError(AimcpipeError, ValueError):
    """A configuration value, CLI flag, partition or input file is not acceptable."""


class ScheduleError(AimcpipeError, ValueError):
    """A schedule is malformed or can never finish (deadlock, missing forward, ...)."""


class StageFailure(AimcpipeError, RuntimeError):
    """A pipeline stage died, hung or raised; the message names the stage."""
