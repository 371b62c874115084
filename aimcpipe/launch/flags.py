"""Parsers for command-line values shared by the commands: each returns the value or raises
a one-line ``ConfigError`` naming the flag and what is allowed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aimcpipe.errors import ConfigError
from aimcpipe.scheduler import POLICIES

__all__ = ["check_size", "int_flag", "number", "path_arg", "policy_list", "stage_list"]

MAX_SECONDS = 24 * 3600  # a command estimated to run longer than this is refused


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 1 << 40


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


def _duration(s: float) -> str:
    if s < 3600:
        return f"{s / 60:.3g} min"
    if s < 86400 * 2:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


def check_size(flags: str, what: str, need_bytes: float, seconds: float) -> None:
    """Refuse, before any work, a job sized by the user that would not fit in this machine's
    memory (more than 80 % of it) or would run for more than a day. ``seconds`` should be a
    lower bound (per-unit costs measured on a fast machine), so nothing that would finish is
    refused; ``what`` says what the estimate counts."""
    memory = _memory_bytes()
    if need_bytes > 0.8 * memory:
        raise ConfigError(
            f"{flags}: {what} would need about {_bytes(need_bytes)} of memory; this machine "
            f"has {_bytes(memory)}"
        )
    if seconds > MAX_SECONDS:
        raise ConfigError(
            f"{flags}: {what} would run for at least {_duration(seconds)}; the limit is "
            f"{_duration(MAX_SECONDS)}"
        )


def path_arg(text: str) -> Path:
    """argparse ``type`` for a file or directory flag: an empty string is refused (``Path("")``
    would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give a path (an empty one names nothing)")
    return Path(text)


def int_flag(flag: str, text: str | None, minimum: int, default: int | None = None) -> int:
    if text is None:
        if default is None:
            raise ConfigError(f"{flag} is required (an integer >= {minimum})")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(
            f"{flag}: {text!r} is not an integer (use an integer >= {minimum})"
        ) from None
    if value < minimum:
        raise ConfigError(f"{flag}: {value} is not allowed; use an integer >= {minimum}")
    return value


def number(flag: str, text: str, *, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a number") from None
    if not value == value or value in (float("inf"), float("-inf")):  # NaN / inf
        raise ConfigError(f"{flag}: {text!r} is not a finite number")
    if value < 0 or (positive and value == 0):
        raise ConfigError(
            f"{flag}: {text} is not allowed; use a number {'>' if positive else '>='} 0"
        )
    return int(value) if value.is_integer() else value


def stage_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    out: list[int] = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(
                f"--stages: {item.strip()!r} is not allowed; use positive integers, e.g. 1,2,4,8"
            )
        if value not in out:
            out.append(value)
    return out


def policy_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    out = []
    for item in text.split(","):
        name = item.strip()
        if name not in POLICIES:
            raise ConfigError(
                f"--policies: unknown policy {name!r}; allowed: {', '.join(POLICIES)}"
            )
        if name not in out:
            out.append(name)
    return out
