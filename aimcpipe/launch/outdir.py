"""Output directories that are complete or absent, never half-written (docs/design.md §6).

Commands build their output in a hidden temporary sibling and move it into place only when
everything was written, so an error or an interrupt leaves no directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aimcpipe.errors import ConfigError, describe_exception

__all__ = ["check_out_dir", "check_writable", "staged_dir"]


# What aimcpipe commands write into an output directory. ``--force`` replaces a directory only
# when everything in it is one of these (or a hidden temporary of ours), so neither
# ``--out . --force`` nor a folder that also holds the user's own files is ever deleted.
# what another command could resume from, so --force of a different command keeps it
RESUMABLE = {"sweep.json": "an aimcpipe speedup sweep", "checkpoint.pt": "an aimcpipe train run"}
OUTPUT_FILES = frozenset(
    {
        "metrics.json", "results.json", "config.yaml", "checkpoint.pt", "history.jsonl",
        "partition.json", "trace.json", "model.pt", "curves.json", "curves.png",
        "timeline.txt", "speedup.png", "lsq_tau.png", "lsq_lr.png", "lsq_summary.png",
        "schedules", "sweep.json", "speedup.json", "utilization.png", "accuracy.png", "runs",
    }
)  # fmt: skip


def check_out_dir(
    out: str | Path | None, *, force: bool, resumable_by: str | None = None
) -> Path | None:
    """Validate ``--out`` before any work: it may be new or empty, or — with ``--force`` — an
    earlier aimcpipe output directory, which will be replaced. ``resumable_by``: the file
    whose presence makes the directory one ``--resume`` can continue (the error then says
    so)."""
    if out is None:
        return None
    if not str(out).strip():
        raise ConfigError("--out: give a directory name (an empty path is not one)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            hint = ""
            if resumable_by is not None and (path / resumable_by).is_file():
                hint = ", or --resume it"
            raise ConfigError(
                f"--out: {out} is not empty; choose a new directory or add --force{hint}"
            )
        cwd = Path.cwd().resolve()
        resolved = path.resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
            raise ConfigError(f"--out: refusing to replace {out} (it holds the current directory)")
        foreign = sorted(
            p.name for p in path.iterdir() if p.name not in OUTPUT_FILES and p.name[0] != "."
        )
        if foreign:
            raise ConfigError(
                f"--out: {out} holds {foreign[0]!r}, which aimcpipe did not write; --force "
                "replaces only aimcpipe output directories"
            )
        for name, what in RESUMABLE.items():  # another command's work that could go on
            if name != resumable_by and (path / name).exists():
                raise ConfigError(
                    f"--out: {out} holds {what} ({name}); --force replaces only output of "
                    "this command: choose a new directory, or delete that one yourself"
                )
    check_writable(path, "--out")
    return path


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a directory that could not be written: ``path`` and the
    folder holding it (a run writes into the one, a staged output is made in the other), or,
    for a new ``path``, the nearest existing folder above it. Tried by making and removing a
    temporary directory, which also catches a read-only file system and permissions that
    ``os.access`` does not judge."""
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop, a name the system refuses
        raise ConfigError(f"{flag}: cannot use {path} ({describe_exception(exc)})") from None
    if resolved.exists():
        places = [resolved, resolved.parent]
    else:
        nearest = resolved.parent
        while not nearest.exists() and nearest != nearest.parent:
            nearest = nearest.parent
        places = [nearest]
        _check_names(resolved, nearest, flag)
    for place in places:
        try:
            Path(tempfile.mkdtemp(prefix=".aimcpipe-probe-", dir=place)).rmdir()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"{flag}: cannot write in {place} ({reason.lower()})") from None


# staged_dir's sibling of DIR is ".DIR.tmp-XXXXXXXX": 14 bytes longer than DIR's own name
_STAGED_EXTRA = 14


def _check_names(path: Path, nearest: Path, flag: str) -> None:
    """A new directory's names must fit the file system, with room for the staged sibling,
    so that a long name is refused now rather than when the results are written."""
    try:
        name_max = os.pathconf(nearest, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    missing = path.relative_to(nearest).parts
    for i, part in enumerate(missing):
        room = name_max - (_STAGED_EXTRA if i == len(missing) - 1 else 0)
        if len(os.fsencode(part)) > room:
            raise ConfigError(
                f"{flag}: the name {part[:20]}... is {len(os.fsencode(part))} bytes long; "
                f"at most {room} fit here"
            )


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; on success it replaces ``out_dir``
    (whatever was there before, which ``check_out_dir`` allowed), on error it is removed."""
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "previous")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
