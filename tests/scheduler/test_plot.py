"""The speedup/utilization plot: written with matplotlib, skipped with a warning without."""

import logging
import sys
from pathlib import Path

import pytest

from aimcpipe.scheduler import sweep
from aimcpipe.scheduler.plot import plot_speedup


def rows() -> list[dict]:
    return [row for _, row in sweep(["wop", "async"], [1, 2, 4], 4)]


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot_speedup(rows(), tmp_path / "speedup.png", title="t")
    assert out is not None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING):
        assert plot_speedup(rows(), tmp_path / "speedup.png") is None
    assert not (tmp_path / "speedup.png").exists()
    assert "matplotlib is not installed" in caplog.text
