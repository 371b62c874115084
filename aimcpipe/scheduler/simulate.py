"""Event-driven cycle simulator of a schedule under a cost model (docs/design.md §4).

Each stage runs its list strictly in order. An action starts when its stage is free and its
dependency is met: F(n) at s>0 when F(n) at s-1 finished + latency; B(n) at s<S-1 when
B(n) at s+1 finished + latency; the last stage's B(n) needs its own F(n), which precedes it
in the list; U needs only its own stage's earlier Bs. Start times therefore depend only on
the previous action of the same stage and on one finished action of a neighbour, so the
simulation is a single pass over the actions in dependency order with one cursor per
stage: no global event heap is needed. Sweeps over the stages alternate direction (up for
forwards, down for backwards); a sweep in which no cursor moves proves a deadlock.

Costs that are integers give exact integer times (the closed-form tests rely on it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aimcpipe.scheduler.actions import BACKWARD, FORWARD, Action, Schedule, dependency
from aimcpipe.scheduler.costs import CostModel, HardwareModel
from aimcpipe.scheduler.metrics import OrderMetrics, order_metrics
from aimcpipe.scheduler.policies import build_schedule
from aimcpipe.scheduler.validate import check_structure, deadlock_error

__all__ = ["SimResult", "closed_form_speedup", "longest_wait", "simulate", "sweep", "wop_baseline"]

log = logging.getLogger(__name__)

Number = int | float


@dataclass(frozen=True)
class SimResult:
    """Timing and metrics of one simulated schedule.

    ``starts[s][i]`` / ``ends[s][i]`` are the cycle times of ``schedule.stages[s][i]``.
    ``utilization[s] = busy[s] / makespan``; ``bubble_fraction = 1 - mean utilization``
    (the idle share of all stage-cycles). Stash and staleness: see
    :mod:`aimcpipe.scheduler.metrics`. ``time_ns`` and ``energy_pj`` are set when a hardware
    model was given.
    """

    schedule: Schedule
    costs: CostModel
    makespan: Number
    starts: tuple[list[Number], ...] = field(repr=False)
    ends: tuple[list[Number], ...] = field(repr=False)
    busy: tuple[Number, ...]
    messages: int
    order: OrderMetrics = field(repr=False)
    hardware: HardwareModel | None = None
    energy_pj_per_stage: tuple[float, ...] | None = None

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def utilization(self) -> tuple[float, ...]:
        if not self.makespan:  # every action costs 0 cycles: no busy time to share
            return tuple(0.0 for _ in self.busy)
        return tuple(b / self.makespan for b in self.busy)

    @property
    def mean_utilization(self) -> float:
        u = self.utilization
        return sum(u) / len(u)

    @property
    def bubble_fraction(self) -> float:
        return 1.0 - self.mean_utilization

    @property
    def time_ns(self) -> float | None:
        return None if self.hardware is None else self.makespan * self.hardware.cycle_ns

    @property
    def energy_pj(self) -> float | None:
        return None if self.energy_pj_per_stage is None else sum(self.energy_pj_per_stage)

    def to_row(self, wop_makespan: Number | None = None) -> dict[str, Any]:
        """The ``simulate --json`` row (docs/design.md §6 keys plus extras)."""
        sched = self.schedule
        speedup = None
        if wop_makespan is not None and self.makespan:
            speedup = wop_makespan / self.makespan
        row: dict[str, Any] = {
            "policy": sched.policy,
            "stages": sched.num_stages,
            "microbatches": sched.microbatches_per_minibatch,
            "minibatches": sched.minibatches,
            "weight_stashing": sched.weight_stashing,
            "makespan": self.makespan,
            "utilization": self.mean_utilization,
            "utilization_per_stage": list(self.utilization),
            "bubble_fraction": self.bubble_fraction,
            "speedup_vs_wop": speedup,
            "wop_makespan": wop_makespan,
            "staleness": list(self.order.staleness),
            "update_delay": list(self.order.update_delay),
            "staleness_histogram": [
                {str(k): v for k, v in h.items()} for h in self.order.staleness_histogram
            ],
            "peak_stash": list(self.order.peak_stash),
            "peak_activations": list(self.order.peak_activations),
            "busy_per_stage": list(self.busy),
            "messages": self.messages,
            "actions": sched.num_actions,
            "costs": self.costs.to_dict(),
        }
        if self.hardware is not None:
            row["time_ns"] = self.time_ns
            row["energy_pj"] = self.energy_pj
            row["energy_pj_per_stage"] = list(self.energy_pj_per_stage or ())
        return row


def simulate(
    schedule: Schedule,
    costs: CostModel | None = None,
    hardware: HardwareModel | None = None,
    *,
    check: bool = True,
) -> SimResult:
    """Time ``schedule`` under ``costs`` (default: AIMC F=B=U=1, no latency).

    ``check`` runs the static part of :func:`~aimcpipe.scheduler.validate.validate` first
    (skip it only for a schedule already validated); a deadlock is always detected and
    raised as :class:`~aimcpipe.scheduler.validate.DeadlockError`.
    """
    costs = costs or CostModel()
    num_stages = schedule.num_stages
    f_cost, b_cost, u_cost = costs.per_stage(num_stages)
    if check:
        max_n = check_structure(schedule)
    else:
        max_n = max((a[2][-1] for acts in schedule.stages for a in acts), default=-1)
    starts, ends = _timeline(schedule, f_cost, b_cost, u_cost, costs.latency, max_n + 1)
    makespan = max((e[-1] for e in ends if e), default=0)
    busy = []
    n_f = []
    n_b = []
    n_u = []
    messages = 0
    for s, acts in enumerate(schedule.stages):
        nf = nb = nu = 0
        for kind, _, mbs in acts:
            if kind == FORWARD:
                nf += 1
            elif kind == BACKWARD:
                nb += 1
            else:
                nu += len(mbs)
        n_f.append(nf)
        n_b.append(nb)
        n_u.append(nu)
        busy.append(nf * f_cost[s] + nb * b_cost[s] + nu * u_cost[s])
        messages += (nf if s < num_stages - 1 else 0) + (nb if s > 0 else 0)
    energy = None
    if hardware is not None:
        # each message is charged to its sender
        energy = tuple(
            n_f[s] * hardware.forward_pj
            + n_b[s] * hardware.backward_pj
            + n_u[s] * hardware.update_pj
            + ((n_f[s] if s < num_stages - 1 else 0) + (n_b[s] if s > 0 else 0))
            * hardware.message_pj
            + (makespan - busy[s]) * hardware.idle_pj_per_cycle
            for s in range(num_stages)
        )
    return SimResult(
        schedule=schedule,
        costs=costs,
        makespan=makespan,
        starts=starts,
        ends=ends,
        busy=tuple(busy),
        messages=messages,
        order=order_metrics(schedule),
        hardware=hardware,
        energy_pj_per_stage=energy,
    )


def _timeline(
    schedule: Schedule,
    f_cost: Sequence[Number],
    b_cost: Sequence[Number],
    u_cost: Sequence[Number],
    latency: Number,
    size: int,
) -> tuple[tuple[list[Number], ...], tuple[list[Number], ...]]:
    """Start and end time of every action; the hot loop (see the module docstring)."""
    stages = schedule.stages
    num_stages = len(stages)
    fin_f: list[list[Number | None]] = [[None] * size for _ in range(num_stages)]
    fin_b: list[list[Number | None]] = [[None] * size for _ in range(num_stages)]
    starts: tuple[list[Number], ...] = tuple([] for _ in range(num_stages))
    ends: tuple[list[Number], ...] = tuple([] for _ in range(num_stages))
    pos = [0] * num_stages
    free: list[Number] = [0] * num_stages
    remaining = sum(len(a) for a in stages)
    up = list(range(num_stages))
    down = up[::-1]
    sweep = 0
    while remaining:
        progress = 0
        for s in up if sweep % 2 == 0 else down:
            acts = stages[s]
            i = first = pos[s]
            end = len(acts)
            if i == end:
                continue
            prev_f = fin_f[s - 1] if s > 0 else None
            next_b = fin_b[s + 1] if s < num_stages - 1 else None
            my_f = fin_f[s]
            my_b = fin_b[s]
            fc = f_cost[s]
            bc = b_cost[s]
            uc = u_cost[s]
            st_add = starts[s].append
            en_add = ends[s].append
            t = free[s]
            while i < end:
                kind, _, mbs = acts[i]
                if kind == FORWARD:
                    n = mbs[0]
                    if prev_f is not None:
                        d = prev_f[n]
                        if d is None:
                            break
                        d += latency
                        if d > t:
                            t = d
                    st_add(t)
                    t += fc
                    my_f[n] = t
                elif kind == BACKWARD:
                    n = mbs[0]
                    if next_b is not None:
                        d = next_b[n]
                        if d is None:
                            break
                        d += latency
                        if d > t:
                            t = d
                    st_add(t)
                    t += bc
                    my_b[n] = t
                else:
                    st_add(t)
                    t += uc * len(mbs)
                en_add(t)
                i += 1
            if i != first:
                pos[s] = i
                free[s] = t
                progress += i - first
        if not progress:
            raise deadlock_error(schedule, pos)
        remaining -= progress
        sweep += 1
    return starts, ends


def longest_wait(result: SimResult) -> tuple[Number, Action | None]:
    """The longest time (cycles) a stage sits waiting in ``result``'s timeline — idle before
    an action, or a message sent before the stage that needs it takes it — and the action
    waited for. A runtime whose waits time out must allow at least this."""
    sched = result.schedule
    ends = {
        (a.kind, s, a.microbatches): e
        for s, acts in enumerate(sched.stages)
        for a, e in zip(acts, result.ends[s], strict=True)
    }
    best: tuple[Number, Action | None] = (0, None)
    for s, acts in enumerate(sched.stages):
        for i, (a, start) in enumerate(zip(acts, result.starts[s], strict=True)):
            idle = start - (result.ends[s][i - 1] if i else 0)
            dep = dependency(a, sched.num_stages)
            queued = start - ends[dep.kind, dep.stage, dep.microbatches] if dep else 0
            if max(idle, queued) > best[0]:
                best = (max(idle, queued), a)
    return best


def wop_baseline(schedule: Schedule, costs: CostModel | None = None) -> SimResult:
    """The WOP schedule of the same shape (S, Bm, K) and costs, for ``speedup_vs_wop``."""
    wop = build_schedule(
        "wop", schedule.num_stages, schedule.microbatches_per_minibatch, schedule.minibatches
    )
    return simulate(wop, costs, check=False)


def closed_form_speedup(policy: str, stages: int, microbatches: int, minibatches: int) -> float:
    """Speedup over wop at S = 1 of a fixed model split evenly into ``stages`` stages, from the
    closed forms (docs/design.md §4: U = 0, no latency, per-stage costs 1/S of the model's):
    wop 1; sync-1f1b and gpipe S·Bm/(Bm+S−1); async K·Bm·S/(K·Bm+S−1) (one drain), which
    tends to S."""
    s, bm, k = stages, microbatches, minibatches
    if min(s, bm, k) < 1:
        raise ValueError(f"stages, microbatches and minibatches must be >= 1, got {s, bm, k}")
    if policy == "wop":
        return 1.0
    if policy in ("sync-1f1b", "gpipe"):
        return s * bm / (bm + s - 1)
    if policy == "async":
        return k * bm * s / (k * bm + s - 1)
    raise ValueError(f"no closed form for policy {policy!r}")


def sweep(
    policies: Iterable[str],
    stage_counts: Iterable[int],
    microbatches: int,
    minibatches: int = 1,
    costs: CostModel | None = None,
    *,
    fixed_model: bool = False,
    hardware: HardwareModel | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[tuple[SimResult, dict[str, Any]]]:
    """Simulate every policy at every stage count; returns ``(result, json_row)`` pairs.

    ``fixed_model``: ``costs`` (and the hardware energies) are the whole model's, split
    evenly over S stages (:meth:`CostModel.split`), which reproduces the speedup-vs-stages
    figure of arXiv 2410.15155. ``options`` maps a policy name to its build options.
    """
    costs = costs or CostModel()
    options = options or {}
    out: list[tuple[SimResult, dict[str, Any]]] = []
    policies = list(policies)
    for num_stages in stage_counts:
        stage_costs = costs.split(num_stages) if fixed_model else costs
        stage_hw = hardware.split(num_stages) if (fixed_model and hardware) else hardware
        if stage_costs.is_per_stage:
            stage_costs.per_stage(num_stages)  # raises a ConfigError naming the mismatch
        wop_makespan: Number | None = None
        for policy in policies:
            sched = build_schedule(
                policy, num_stages, microbatches, minibatches, **options.get(policy, {})
            )
            result = simulate(sched, stage_costs, stage_hw)
            if wop_makespan is None:
                wop_makespan = (
                    result.makespan
                    if policy == "wop"
                    else wop_baseline(sched, stage_costs).makespan
                )
            log.debug("simulated %s S=%d: makespan %s", policy, num_stages, result.makespan)
            out.append((result, result.to_row(wop_makespan)))
    return out
