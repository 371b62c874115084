"""What the torch and Ray backends share: the scheduler's side of stages that live elsewhere.

The scheduler holds one :class:`Handle` per stage (a torch rank, a Ray actor, or the stage
beside it on torch rank 0), submits the same command to every stage at once, and gathers the
answers (:meth:`RemoteBackend._call_all`) — a handful of calls per epoch, never one per action.

Failures end the run within about ``runtime.timeout_s`` and are reported as one line naming
where they started, not the timeouts they caused (torchgpipe's habit): a stage whose process
died beats a stage that raised, which beats the stages that timed out waiting for them; a
stage that others waited for and that reported nothing itself made no progress. Each stage's
last published progress says which action it was at. Then every stage is stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from aimcpipe.errors import ConfigError, StageFailure
from aimcpipe.runtime.backends.base import Backend, Progress
from aimcpipe.runtime.clock import estimate_offset, same_clock
from aimcpipe.runtime.faults import fault_from_env
from aimcpipe.runtime.host import HostSettings, process_info
from aimcpipe.runtime.plan import EpochPlan, EvalPlan, EvalResult, StageReport, StageSpec
from aimcpipe.runtime.rendezvous import Store
from aimcpipe.runtime.worker import data_for_stage
from aimcpipe.scheduler import BACKWARD

__all__ = ["Call", "Handle", "RemoteBackend", "decide_dist_backend", "diagnose"]

log = logging.getLogger(__name__)

Answer = tuple[str, Any]  # ("ok", value) or ("error", info)


class Call(Protocol):
    #: whether :meth:`wait` blocks until the command finishes (else it cannot, and the
    #: scheduler polls with naps)
    blocks: bool

    def poll(self) -> tuple[bool, Answer | None]:
        """``(True, answer)`` once the command has finished, else ``(False, None)``."""
        ...

    def wait(self, timeout_s: float) -> None:
        """Return once the command has finished or ``timeout_s`` has passed (at once where
        the call cannot block)."""
        ...


class Handle(ABC):
    """The scheduler's view of one stage host."""

    stage: int
    info: dict[str, Any]

    @abstractmethod
    def submit(self, method: str, *args: Any) -> Call: ...

    @abstractmethod
    def progress(self) -> dict[str, Any] | None:
        """The host's last published progress (see :meth:`StageHost.progress`)."""

    def death(self) -> str | None:
        """How the host's process ended (``"was killed by SIGKILL"``), if it did."""
        return None

    def request_stop(self) -> None:  # noqa: B027 - most hosts have nothing to ask
        """Ask the host to leave (without waiting)."""

    @abstractmethod
    def kill(self, deadline: float = 0.0) -> None:
        """Stop the host, by force after ``deadline`` (``time.monotonic``; idempotent)."""


def store_progress(store: Store, key: str) -> dict[str, Any] | None:
    try:
        if not store.check([key]):
            return None
        return dict(json.loads(store.get(key)))
    except Exception:
        return None


def _where(progress: dict[str, Any] | None) -> str:
    """Where a stage was last seen (progress is published ten times a second)."""
    if not progress:
        return ""
    if not progress.get("at"):
        if progress.get("total") and progress.get("epoch") is not None:
            return f"; it was last seen done with epoch {progress['epoch'] + 1}"
        return ""
    at = str(progress["at"])
    if at.startswith("evaluation"):
        return f"; it was last seen at {at} of {progress.get('total')} of an evaluation"
    text = f"; it was last seen at its action {at}"
    if progress.get("total"):
        text += f" ({progress['done'] + 1} of {progress['total']}"
        if progress.get("epoch") is not None:
            text += f" in epoch {progress['epoch'] + 1}"
        text += ")"
    return text


def _stage_failure(message: str, failures: Iterable[dict[str, Any]]) -> StageFailure:
    """The error to raise, carrying (for ``--debug``) the traceback a failed stage sent."""
    error = StageFailure(message)
    first = sorted(failures, key=lambda f: f.get("at", 0.0))  # where the failure started
    tracebacks = [f["traceback"] for f in first if f.get("traceback")]
    if tracebacks:
        error.details = tracebacks[0]
    return error


def diagnose(
    failures: dict[int, dict[str, Any]],
    progress: dict[int, dict[str, Any] | None],
    timeout_s: float,
    working: set[int] | frozenset[int] = frozenset(),
) -> str:
    """One line naming where a failure started (see the module docstring). ``working``:
    stages whose progress changed within the last ``timeout_s`` (a stage others waited for
    that was still working did not hang: the wait was longer than the timeout allows)."""
    by_kind: dict[str, list[int]] = {}
    for s in sorted(failures, key=lambda s: (failures[s].get("at", 0.0), s)):
        by_kind.setdefault(failures[s]["kind"], []).append(s)
    if "died" in by_kind:
        s = by_kind["died"][0]
        return f"stage {s} {failures[s]['message']}{_where(progress.get(s))}"
    if "error" in by_kind:
        return str(failures[by_kind["error"][0]]["message"])
    for kind, says in (("lost", "was lost (its process died or its connection broke)"),
                       ("timeout", f"made no progress for {timeout_s:g} s")):  # fmt: skip
        for s in by_kind.get(kind, []):
            peer = failures[s].get("peer")
            if peer is not None and failures.get(peer, {}).get("kind") not in ("lost", "timeout"):
                if kind == "timeout" and peer in working:
                    return (
                        f"stage {s} waited {timeout_s:g} s for stage {peer}, which was still "
                        f"working{_where(progress.get(peer))}; raise runtime.timeout_s if one "
                        "wait can last that long"
                    )
                return f"stage {peer} {says}{_where(progress.get(peer))}"
    if "stalled" in by_kind:
        s = by_kind["stalled"][0]
        return f"stage {s} made no progress for {timeout_s:g} s{_where(progress.get(s))}"
    first = min(failures, key=lambda s: failures[s].get("at", 0.0))
    return str(failures[first]["message"])


def decide_dist_backend(option: str, device: str, infos: list[dict[str, Any]]) -> str:
    """gloo or nccl for every channel: nccl only when every stage has a GPU of its own."""
    own_gpu = device != "cpu" and all(
        i["cuda"] > 0 and i["local_world_size"] <= i["cuda"] for i in infos
    )
    if option == "nccl" and not own_gpu:
        raise ConfigError(
            "runtime.dist_backend: nccl needs a GPU of its own for every stage "
            f"(GPUs per stage process: {[i['cuda'] for i in infos]}); use gloo or auto"
        )
    if option == "auto":
        return "nccl" if own_gpu else "gloo"
    return option


class RemoteBackend(Backend):
    """A backend whose stages are :class:`Handle`\\ s; subclasses start them."""

    handles: list[Handle]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handles = []
        self.pids: list[int] = []  # the stage processes besides this one (diagnostics)
        self.offsets: list[float] = []
        self.offset_errors: list[float] = []
        self._broken: str | None = None

    # -- subclass duties ------------------------------------------------------------------
    @abstractmethod
    def _launch(self, num_stages: int) -> None:
        """Start ``num_stages`` stage hosts and set :attr:`handles` (in stage order)."""

    def _stop(self) -> None:
        """Release what :meth:`_launch` acquired besides the handles (stores, clusters)."""

    def _init_hosts(self, prefix: str, infos: list[dict[str, Any]]) -> None:
        """Decide for all stages (channel backend, settings) and build every stage host."""
        options = self.options
        backend = decide_dist_backend(options.dist_backend, options.device, infos)
        fault = fault_from_env()
        settings = [
            HostSettings(
                stage=s,
                num_stages=len(infos),
                prefix=prefix,
                dist_backend=backend,
                device=options.device,
                threads=options.threads,
                timeout_s=options.timeout_s,
                local_rank=info.get("local_rank", 0),
                fault=fault,
                unix_sockets=options.unix_sockets,
            )
            for s, info in enumerate(infos)
        ]
        self._call_all("init", [(st,) for st in settings])
        log.debug("%s backend: %d stages, channels over %s", self.name, len(infos), backend)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, specs: list[StageSpec]) -> None:
        if self._broken is not None:
            raise StageFailure(f"this {self.name} backend was stopped after: {self._broken}")
        if self.handles and len(self.handles) != len(specs):
            self.close()
        if not self.handles:
            self._launch(len(specs))
            self.num_stages = len(specs)
            pids = [int(h.info.get("pid", 0)) for h in self.handles]
            self.pids = [p for p in pids if p not in (0, os.getpid())]
            self._measure_offsets()
        self._call_all("setup", [(spec,) for spec in specs])

    def _measure_offsets(self) -> None:
        here = process_info()
        self.offsets, self.offset_errors = [], []
        for h in self.handles:
            if same_clock(h.info, here):
                offset, error = 0.0, 0.0
            else:
                offset, error = estimate_offset(lambda h=h: float(self._call_one(h, "clock")))
            self.offsets.append(offset)
            self.offset_errors.append(error)

    def clocks(self) -> dict[str, Any]:
        return {
            "method": "same machine: the shared monotonic clock (offset 0); else the "
            "offset of the fastest of 7 round trips, error at most half of it",
            "offset_s": list(self.offsets),
            "error_s": list(self.offset_errors),
        }

    def close(self) -> None:
        for h in self.handles:
            h.request_stop()
        deadline = time.monotonic() + 2.0  # one grace period for all, then by force
        for h in self.handles:
            h.kill(deadline)
        self.handles = []
        self._stop()

    def _abort(self, reason: str) -> None:
        self._broken = reason
        self.close()

    # -- commands -------------------------------------------------------------------------
    def put_data(self, key: str, x: Any, y: Any) -> None:
        n = len(self.handles)
        self._call_all("put_data", [(key, *data_for_stage(s, n, x, y)) for s in range(n)])

    def drop_data(self, key: str) -> None:
        self._call_all("drop_data", [(key,)] * len(self.handles))

    def run_epoch(self, plan: EpochPlan, progress: Progress | None = None) -> list[StageReport]:
        n = len(self.handles)
        watch = None
        if progress is not None:
            acts = plan.schedule().stages[0]
            finished = [i + 1 for i, a in enumerate(acts) if a.kind == BACKWARD]

            def watch(p: dict[str, Any]) -> None:
                if p.get("epoch") == plan.epoch:
                    progress(bisect_right(finished, int(p.get("done", 0))))

        reports = self._call_all(
            "run_epoch", [(plan.for_stage(s),) for s in range(n)], epoch=True, watch=watch
        )
        for report, offset in zip(reports, self.offsets, strict=True):
            report.shift(-offset)
        return list(reports)

    def evaluate(self, plan: EvalPlan) -> EvalResult:
        results = self._call_all("evaluate", [(plan,)] * len(self.handles), epoch=True)
        return results[-1]

    def state_dicts(self) -> list[dict[str, Any]]:
        return list(self._call_all("state_dict", [()] * len(self.handles)))

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        self._call_all("load_state_dict", [(st,) for st in states])

    def model_states(self) -> list[dict[str, Any]]:
        return list(self._call_all("model_state", [()] * len(self.handles)))

    def _call_one(self, handle: Handle, method: str, *args: Any) -> Any:
        call = handle.submit(method, *args)
        deadline = time.monotonic() + self.options.timeout_s
        while time.monotonic() < deadline:
            done, answer = call.poll()
            if done:
                assert answer is not None
                if answer[0] != "ok":
                    self._abort(answer[1]["message"])
                    raise _stage_failure(answer[1]["message"], [answer[1]])
                return answer[1]
            if call.blocks:
                call.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            else:
                time.sleep(0.0005)
        self._abort(f"stage {handle.stage} did not answer {method}")
        raise StageFailure(
            f"stage {handle.stage} did not answer {method} within {self.options.timeout_s:g} s"
        )

    def _call_all(
        self,
        method: str,
        args: Sequence[tuple[Any, ...]],
        *,
        epoch: bool = False,
        watch: Any = None,
    ) -> list[Any]:
        """Run ``method`` on every stage at once; their values in stage order. A failure
        anywhere stops every stage and raises one :class:`StageFailure` naming its origin.
        ``epoch`` commands may run long: they fail only when a stage stops making progress
        for ``timeout_s``; others must answer within ``timeout_s``."""
        if self._broken is not None:
            raise StageFailure(f"this {self.name} backend was stopped after: {self._broken}")
        try:
            return self._gather(method, args, epoch=epoch, watch=watch)
        except StageFailure as exc:
            self._abort(str(exc))
            raise
        except BaseException:  # Ctrl-C and the like: nothing may be left running
            self._abort(f"{method} was interrupted")
            raise

    def _gather(
        self, method: str, args: Sequence[tuple[Any, ...]], *, epoch: bool, watch: Any
    ) -> list[Any]:
        timeout = self.options.timeout_s
        grace = min(2.0, 0.25 * timeout)
        # the last stage first: a stage hosted in this process (torch rank 0's stage 0)
        # starts at once and then shares the GIL with this thread, which still has the
        # others' commands to pickle and send (measured on a 2-core VM: posting an epoch to
        # rank 1 took 0.4-0.5 ms before stage 0 started, 1-5 ms after it had)
        pairs = list(zip(self.handles, args, strict=True))
        calls = {h.stage: h.submit(method, *a) for h, a in reversed(pairs)}
        values: dict[int, Any] = {}
        failures: dict[int, dict[str, Any]] = {}
        seen: dict[int, tuple[Any, float]] = {}
        started = time.monotonic()
        first_failure = None
        next_look = 0.0
        nap = 0.0005
        while True:
            now = time.monotonic()
            for s, call in list(calls.items()):
                done, answer = call.poll()
                if not done:
                    continue
                del calls[s]
                assert answer is not None
                if answer[0] == "ok":
                    values[s] = answer[1]
                else:
                    failures[s] = {**answer[1], "at": now}
            if not calls and not failures:
                return [values[s] for s in range(len(self.handles))]
            if now >= next_look:  # deaths, progress and stalls: a few times a second
                next_look = now + 0.2
                for s in calls:
                    died = self.handles[s].death()
                    if died is not None and s not in failures:
                        failures[s] = {"kind": "died", "message": died, "peer": None, "at": now}
                for h in self.handles:
                    p = h.progress() if epoch else None
                    key = json.dumps(p, sort_keys=True)
                    if h.stage not in seen or seen[h.stage][0] != key:
                        seen[h.stage] = (key, now)
                        if watch is not None and h.stage == 0 and p:
                            watch(p)
                for s in calls:
                    quiet = now - (seen[s][1] if epoch else started)
                    if quiet > timeout + grace and s not in failures:
                        failures[s] = {"kind": "stalled", "message": "", "peer": None, "at": now}
            if failures:
                first_failure = first_failure or now
                waiting_on = [s for s in calls if s not in failures]
                if not waiting_on or now - first_failure > grace:
                    progress = {h.stage: h.progress() for h in self.handles}
                    working = {s for s, (_, t) in seen.items() if epoch and now - t < timeout}
                    message = diagnose(failures, progress, timeout, working)
                    raise _stage_failure(message, failures.values())
            # sleep until a call that can block finishes (the end of an epoch is seen at
            # once, not up to a nap later); poll the others with naps that grow, but start
            # short again after each blocking wait (the stages end close together)
            blocking = next((c for s, c in calls.items() if c.blocks and s not in failures), None)
            if blocking is not None:
                blocking.wait(min(0.05, max(0.0, next_look - time.monotonic())))
                nap = 0.0005
            else:
                time.sleep(nap)
                nap = min(nap * 1.5, 0.05 if epoch else 0.01)
