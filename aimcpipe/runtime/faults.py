"""Fault injection for the failure tests: make one stage die, hang or raise at one action.

``AIMCPIPE_FAULT="kill:stage=2:epoch=1:action=5"`` (read on the central scheduler and sent to
the stages with their start-up settings) makes stage 2 send itself SIGKILL just before
its 6th action of epoch 2 (0-based epoch 1, action 5); ``hang`` blocks it forever and
``raise`` raises an error. Nothing happens when the variable is not set.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from aimcpipe.errors import ConfigError

__all__ = ["ENV", "Fault", "fault_from_env"]

ENV = "AIMCPIPE_FAULT"
MODES = ("kill", "hang", "raise")


@dataclass(frozen=True)
class Fault:
    mode: str
    stage: int
    epoch: int
    action: int

    @classmethod
    def parse(cls, text: str) -> Fault:
        mode, *parts = text.split(":")
        fields = dict(p.split("=", 1) for p in parts if "=" in p)
        try:
            fault = cls(mode, int(fields["stage"]), int(fields["epoch"]), int(fields["action"]))
        except (KeyError, ValueError):
            raise ConfigError(
                f"{ENV}: cannot read {text!r}; write MODE:stage=S:epoch=E:action=A"
            ) from None
        if mode not in MODES:
            raise ConfigError(f"{ENV}: mode {mode!r} is not one of {', '.join(MODES)}")
        return fault

    def hook(self, stage: int, epoch: int) -> Callable[[int], None] | None:
        """What stage ``stage`` calls before each action of ``epoch`` (its index), if any."""
        if stage != self.stage or epoch != self.epoch:
            return None

        def before(index: int) -> None:
            if index != self.action:
                return
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "hang":
                threading.Event().wait()
            raise RuntimeError(f"injected fault at action {index}")

        return before


def fault_from_env() -> Fault | None:
    text = os.environ.get(ENV)
    return Fault.parse(text) if text else None
