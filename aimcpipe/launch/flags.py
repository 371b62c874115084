"""Parsers for command-line values shared by the commands: each returns the value or raises
a one-line ``ConfigError`` naming the flag and what is allowed."""

from __future__ import annotations

from aimcpipe.errors import ConfigError
from aimcpipe.scheduler import POLICIES

__all__ = ["int_flag", "number", "policy_list", "stage_list"]


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
