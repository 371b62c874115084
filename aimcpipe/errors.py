"""Error types, one per area, so callers can catch what they can act on.

Every message is a single line that names the offending key or value and what is allowed;
the CLI prints it as is and exits with status 2. Where the error began in user code (a model
factory, a user module, a partitioner, a loss) the original exception is kept as
``__cause__`` and, when it happened in another process, its traceback as ``details``:
``aimcpipe --debug`` (or ``AIMCPIPE_DEBUG=1``) prints them.
"""

from __future__ import annotations

__all__ = [
    "AimcpipeError",
    "ConfigError",
    "ScheduleError",
    "StageFailure",
    "UserCodeError",
    "describe_exception",
    "user_code_error",
]


class AimcpipeError(Exception):
    """Base class of every error aimcpipe raises on purpose."""

    details: str | None = None
    """A longer account for ``--debug``: the traceback of an exception raised in a stage
    process or actor, which the one-line message summarises."""


class ConfigError(AimcpipeError, ValueError):
    """A configuration value, CLI flag, partition or input file is not acceptable."""


class UserCodeError(ConfigError):
    """User code raised: the message names the callable and the exception, ``__cause__`` is
    the exception itself."""


class ScheduleError(AimcpipeError, ValueError):
    """A schedule is malformed or can never finish (deadlock, missing forward, ...)."""


class StageFailure(AimcpipeError, RuntimeError):
    """A pipeline stage died, hung or raised; the message names the stage."""


def describe_exception(exc: BaseException) -> str:
    """``RuntimeError: broken factory`` on one line (newlines and runs of spaces folded)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())


def user_code_error(key: str, what: str, exc: BaseException) -> UserCodeError:
    """``key: what raised RuntimeError: ...`` with ``exc`` as its cause; raise it
    ``from exc``."""
    return UserCodeError(f"{key}: {what} raised {describe_exception(exc)}")
