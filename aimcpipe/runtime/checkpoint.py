"""Checkpoints written atomically: a crash mid-write leaves the previous checkpoint intact.

A checkpoint holds every stage's full state (block state_dicts with tile weights,
device-to-device parameters, Tiki-Taka arrays and tile generators; the stage's own random
state and weight version), the epoch reached, the run's metric accumulators and history, and
the resolved settings. ``torch.save`` writes it to a temporary file in the same directory,
which is then renamed over the old one (``os.replace`` is atomic on POSIX). Before a pipeline
loads one, :func:`checkpoint_stages` checks that it was written for the same partition and
blocks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aimcpipe.errors import ConfigError

__all__ = ["CHECKPOINT_NAME", "checkpoint_stages", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).
    ``path``: the file or the run directory holding it."""
    if not isinstance(path, str | Path):
        raise ConfigError(f"checkpoint: expected a file or run directory path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(
            f"checkpoint: no checkpoint at {path} (runs save one with checkpoint_every)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (and pages of text) for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unpickl" in first:
            first = "it holds objects other than tensors and plain data"
        raise ConfigError(
            f"checkpoint: {path} is not a readable aimcpipe checkpoint ({first[:120]})"
        ) from None
    if not isinstance(state, dict) or "stages" not in state or "epoch" not in state:
        raise ConfigError(f"checkpoint: {path} is not an aimcpipe checkpoint")
    return state


def checkpoint_stages(
    state: dict[str, Any],
    bounds: Sequence[int],
    stage_blocks: Sequence[Sequence[tuple[str, nn.Module]]],
) -> list[Any]:
    """The stage states of checkpoint ``state``, refused (before anything changes) unless it
    was written for a partition with these ``bounds`` and, stage by stage, the blocks
    ``stage_blocks`` (``(name, module)`` pairs), tensors of their shapes."""
    if not isinstance(state.get("stages"), list | tuple) or "bounds" not in state:
        raise ConfigError("checkpoint: not an aimcpipe checkpoint (no stages and bounds)")
    if list(state["bounds"]) != list(bounds):
        raise ConfigError(
            f"checkpoint: the checkpoint's partition {state['bounds']} differs from this "
            f"run's {list(bounds)}"
        )
    stages = list(state["stages"])
    if len(stages) != len(stage_blocks):
        raise ConfigError(
            f"checkpoint: the checkpoint holds {len(stages)} stages, this run has "
            f"{len(stage_blocks)}"
        )
    for s, st in enumerate(stages):
        blocks = st.get("blocks") if isinstance(st, dict) else None
        mine = dict(stage_blocks[s])
        if not isinstance(blocks, dict) or list(blocks) != list(mine):
            got = list(blocks) if isinstance(blocks, dict) else None
            raise ConfigError(
                f"checkpoint: the checkpoint's stage {s} holds blocks {got}, this model's "
                f"stage {s} holds {list(mine)}: it was written for another model"
            )
        for name, module in mine.items():
            want = {
                k: tuple(v.shape) if isinstance(v, torch.Tensor) else None
                for k, v in module.state_dict().items()
            }
            have = {
                k: tuple(v.shape) if isinstance(v, torch.Tensor) else None
                for k, v in blocks[name].items()
            }
            if want != have:
                key = next(k for k in {*want, *have} if want.get(k) != have.get(k))
                raise ConfigError(
                    f"checkpoint: the checkpoint's {name}.{key} has shape "
                    f"{have.get(key, 'none')}, this model's {want.get(key, 'none')}: it "
                    "was written for another model"
                )
    return stages
