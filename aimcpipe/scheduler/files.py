"""Save and load schedules as JSON or CSV, so users can study their own policies.

Both formats hold one action list per stage in the compact string form of
:mod:`aimcpipe.scheduler.actions` (``2F0``, ``1B3``, ``0U4-7``, ``0U1+3``); the stage prefix
may be left out in a file (``F0`` in the row of stage 2 means ``2F0``) but must match the
row when present.

JSON (``.json``)::

    {"format": "aimcpipe-schedule", "version": 1, "policy": "my-policy",
     "microbatches_per_minibatch": 4, "minibatches": 1, "weight_stashing": false,
     "stages": [["0F0", "0F1", ...], ["1F0", "1B0", ...]]}

Only ``stages`` is required (a bare list of lists is accepted too).

CSV (``.csv``): one row per stage, one action per cell, ragged rows allowed, blank cells
ignored. Optional leading ``# key: value`` lines carry the same metadata keys::

    # aimcpipe-schedule v1
    # policy: my-policy
    # microbatches_per_minibatch: 4
    0F0,0F1,0B0,0B1,0U0-1
    1F0,1B0,1F1,1B1,1U0-1

Missing metadata defaults to policy ``custom``, one mini-batch of all micro-batches
(Bm = number of distinct micro-batches), no weight stashing. A loaded schedule is validated
like a built-in one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aimcpipe.errors import ConfigError, ScheduleError
from aimcpipe.scheduler.actions import Schedule, parse_action
from aimcpipe.scheduler.validate import DeadlockError, validate

__all__ = [
    "FORMAT",
    "load_schedule",
    "save_schedule",
    "schedule_from_dict",
    "schedule_to_csv",
    "schedule_to_dict",
]

FORMAT = "aimcpipe-schedule"
VERSION = 1
_META_KEYS = ("policy", "microbatches_per_minibatch", "minibatches", "weight_stashing")


def schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    """Plain-data (JSON) form of ``schedule``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "policy": schedule.policy,
        "microbatches_per_minibatch": schedule.microbatches_per_minibatch,
        "minibatches": schedule.minibatches,
        "weight_stashing": schedule.weight_stashing,
        "stages": schedule.to_strings(),
    }


def schedule_to_csv(schedule: Schedule) -> str:
    """CSV text of ``schedule`` (metadata as leading ``#`` lines)."""
    buf = io.StringIO()
    buf.write(f"# {FORMAT} v{VERSION}\n")
    for key in _META_KEYS:
        value = getattr(schedule, key)
        buf.write(f"# {key}: {str(value).lower() if isinstance(value, bool) else value}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(schedule.to_strings())
    return buf.getvalue()


def schedule_from_dict(data: Any, source: str = "schedule") -> Schedule:
    """Inverse of :func:`schedule_to_dict`; ``source`` prefixes error messages."""
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict):
        raise ScheduleError(f"{source}: expected an object with 'stages' or a list of lists")
    allowed = {"format", "version", "stages", *_META_KEYS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ScheduleError(
            f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    if data.get("format", FORMAT) != FORMAT:
        raise ScheduleError(f"{source}: format {data['format']!r} is not {FORMAT!r}")
    if data.get("version", VERSION) != VERSION:
        raise ScheduleError(f"{source}: version {data['version']!r} is not supported (use 1)")
    rows = data.get("stages")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ScheduleError(f"{source}: 'stages' must be a non-empty list of lists of actions")
    return _build(rows, {k: data[k] for k in _META_KEYS if k in data}, source)


def _build(rows: Sequence[Sequence[Any]], meta: dict[str, Any], source: str) -> Schedule:
    stages = []
    for s, row in enumerate(rows):
        acts = []
        for cell in row:
            if not isinstance(cell, str):
                raise ScheduleError(f"{source}: stage {s}: action {cell!r} is not a string")
            if not cell.strip():
                continue
            try:
                acts.append(parse_action(cell, s))
            except ScheduleError as exc:
                raise ScheduleError(f"{source}: stage {s}: {exc}") from None
        stages.append(tuple(acts))
    distinct = {a[2][0] for a in stages[0] if a[0] == "F"}
    policy = meta.get("policy", "custom")
    if not isinstance(policy, str) or not policy:
        raise ScheduleError(f"{source}: policy must be a non-empty string, got {policy!r}")
    bm = meta.get("microbatches_per_minibatch", max(len(distinct), 1))
    k = meta.get("minibatches", 1)
    stash = meta.get("weight_stashing", False)
    if not isinstance(stash, bool):
        raise ScheduleError(f"{source}: weight_stashing must be true or false, got {stash!r}")
    try:
        schedule = Schedule(policy, tuple(stages), bm, k, weight_stashing=stash)
    except ScheduleError as exc:
        raise ScheduleError(f"{source}: {exc}") from None
    if distinct and len(distinct) != schedule.num_microbatches:
        raise ScheduleError(
            f"{source}: stage 0 forwards {len(distinct)} micro-batches but the metadata says "
            f"{bm} x {k} = {schedule.num_microbatches}"
        )
    return schedule


def _parse_csv(text: str, source: str) -> Schedule:
    meta: dict[str, Any] = {}
    body: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            key, colon, value = stripped[1:].partition(":")
            key, value = key.strip(), value.strip()
            if not colon:
                continue  # a free comment such as the format banner
            if key not in _META_KEYS:
                raise ScheduleError(
                    f"{source}:{lineno}: unknown metadata key {key!r}; "
                    f"allowed: {', '.join(_META_KEYS)}"
                )
            if key == "policy":
                meta[key] = value
            elif key == "weight_stashing":
                if value.lower() not in ("true", "false"):
                    raise ScheduleError(f"{source}:{lineno}: weight_stashing must be true/false")
                meta[key] = value.lower() == "true"
            else:
                try:
                    meta[key] = int(value)
                except ValueError:
                    raise ScheduleError(
                        f"{source}:{lineno}: {key} must be an integer, got {value!r}"
                    ) from None
        elif stripped:
            body.append(line)
    rows = list(csv.reader(body))
    if not rows:
        raise ScheduleError(f"{source}: no stage rows (one CSV row per stage)")
    return _build(rows, meta, source)


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt not in ("json", "csv"):
        raise ConfigError(f"{path}: schedule files must end in .json or .csv, got {path.name!r}")
    return fmt


def save_schedule(schedule: Schedule, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``schedule`` to ``path`` as JSON or CSV (by suffix unless ``fmt`` is given)."""
    path = Path(path)
    if _format_of(path, fmt) == "json":
        path.write_text(json.dumps(schedule_to_dict(schedule), indent=1) + "\n")
    else:
        path.write_text(schedule_to_csv(schedule))
    return path


def load_schedule(path: str | Path, fmt: str | None = None, *, check: bool = True) -> Schedule:
    """Read a schedule file (JSON or CSV) and, with ``check``, validate it."""
    path = Path(path)
    kind = _format_of(path, fmt)
    if path.is_dir():
        raise ConfigError(f"schedule file {path} is a directory; give a .json or .csv file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"schedule file {path} is not a text file (JSON or CSV)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read schedule file {path}: {exc.strerror}") from None
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScheduleError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        schedule = schedule_from_dict(data, str(path))
    else:
        schedule = _parse_csv(text, str(path))
    if check:
        try:
            validate(schedule)
        except DeadlockError as exc:
            raise DeadlockError(f"{path}: {exc}", exc.stuck) from None
        except ScheduleError as exc:
            raise ScheduleError(f"{path}: {exc}") from None
    return schedule
