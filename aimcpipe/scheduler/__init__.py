"""aimcpipe.scheduler: schedules as data, and a cycle simulator to time them.

Torch-free by design (docs/design.md §2): a schedule is a per-stage list of F/B/U actions that the
simulator here times and the runtime's single interpreter executes on any backend.

Typical use::

    from aimcpipe.scheduler import CostModel, build_schedule, simulate, validate
    sched = build_schedule("async", num_stages=4, microbatches=8, minibatches=2)
    validate(sched)
    result = simulate(sched, CostModel(forward=1, backward=2, update=0))
    print(result.makespan, result.utilization, result.order.staleness)
"""

from aimcpipe.scheduler.actions import (
    BACKWARD,
    FORWARD,
    KINDS,
    UPDATE,
    Action,
    Message,
    Schedule,
    backward,
    dependency,
    forward,
    parse_action,
    received_message,
    sent_message,
    update,
)
from aimcpipe.scheduler.costs import CostModel, HardwareModel, parse_cost_spec, parse_energy_spec
from aimcpipe.scheduler.metrics import OrderMetrics, order_metrics
from aimcpipe.scheduler.policies import POLICIES, build_schedule
from aimcpipe.scheduler.simulate import (
    SimResult,
    closed_form_speedup,
    longest_wait,
    simulate,
    sweep,
    wop_baseline,
)
from aimcpipe.scheduler.validate import DeadlockError, validate

__all__ = [
    "BACKWARD",
    "FORWARD",
    "KINDS",
    "POLICIES",
    "UPDATE",
    "Action",
    "CostModel",
    "DeadlockError",
    "HardwareModel",
    "Message",
    "OrderMetrics",
    "Schedule",
    "SimResult",
    "backward",
    "build_schedule",
    "closed_form_speedup",
    "dependency",
    "forward",
    "longest_wait",
    "order_metrics",
    "parse_action",
    "parse_cost_spec",
    "parse_energy_spec",
    "received_message",
    "sent_message",
    "simulate",
    "sweep",
    "update",
    "validate",
    "wop_baseline",
]
