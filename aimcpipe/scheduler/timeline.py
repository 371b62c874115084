"""ASCII pictures of schedules, like the schedule figures of the pipeline papers.

:func:`render_timeline` draws a simulated run: one row per stage, one column per time unit
(the largest unit that divides every cost and latency, so F=B=1 gives one column per
cycle). A cell shows the action that *starts* there (``F3``, ``B3``, ``U0-3``), ``==`` marks
the further columns of a longer action, ``.`` an idle stage. Runs wider than ``width``
characters keep their head and tail (fill and drain, where the bubbles are) around a
``...`` gap. Zero-cost actions (e.g. U with U=0) take no column and are not drawn.

:func:`format_grid` prints the action lists themselves (step = position in the list), with
stuck actions of a deadlock marked, as torch.distributed.pipelining's formatter does.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

from aimcpipe.scheduler.actions import Action, Schedule, format_microbatches
from aimcpipe.scheduler.simulate import SimResult

__all__ = ["format_grid", "render_timeline", "time_unit"]

_MAX_COLUMNS = 10**7


def time_unit(values: Iterable[float]) -> Fraction:
    """Largest unit dividing every positive value (rational gcd; floats are approximated
    by fractions with denominators up to 10^6, so 1/3 cycles works)."""
    num = 0
    den = 1
    for v in values:
        if v <= 0:
            continue
        f = Fraction(v).limit_denominator(10**6)
        # gcd(a/b, c/d) = gcd(a*d, c*b) / (b*d), kept reduced
        num, den = math.gcd(num * f.denominator, f.numerator * den), den * f.denominator
        g = math.gcd(num, den)
        num, den = num // g, den // g
    return Fraction(num, den) if num else Fraction(1)


def _label(action: Action) -> str:
    return action[0] + format_microbatches(action[2])


def render_timeline(result: SimResult, width: int = 120) -> str:
    """Stage rows x time columns of ``result``; see the module docstring."""
    sched = result.schedule
    durations = {
        e - s
        for st, en in zip(result.starts, result.ends, strict=True)
        for s, e in zip(st, en, strict=True)
    }
    unit = time_unit([*durations, result.costs.latency])
    total = math.ceil(Fraction(result.makespan).limit_denominator(10**6) / unit)
    if total > _MAX_COLUMNS:  # pathological unit: fall back to the smallest duration
        unit = Fraction(min(d for d in durations if d > 0)).limit_denominator(10**6)
        total = math.ceil(Fraction(result.makespan).limit_denominator(10**6) / unit)
    fb_labels = [len(_label(a)) for acts in sched.stages for a in acts if a[0] != "U"]
    cell = max([2, *fb_labels])
    head_w = len(f"stage {sched.num_stages - 1} |")
    fit = max((width - head_w) // (cell + 1), 4)
    if total <= fit:
        shown = list(range(total))
        gap_at = None
    else:
        head = (fit - 1) // 2
        tail = fit - 1 - head
        shown = [*range(head), *range(total - tail, total)]
        gap_at = head
    # character offset of every shown column; the gap marker takes one cell
    offsets: dict[int, int] = {}
    pos = head_w + 1
    for i, c in enumerate(shown):
        if i == gap_at:
            pos += cell + 1
        offsets[c] = pos
        pos += cell + 1
    line_w = pos

    unit_f = float(unit)
    windows = [(0, shown[gap_at - 1] + 1 if gap_at else total)]
    if gap_at is not None:
        windows.append((shown[gap_at], total))
    rows = []
    for s, acts in enumerate(sched.stages):
        chars = list(f"stage {s} |".rjust(head_w).ljust(line_w))
        for off in offsets.values():
            chars[off] = "."
        starts, ends = result.starts[s], result.ends[s]
        for lo_col, hi_col in windows:
            # actions are in time order per stage: visit only those overlapping the window
            i = bisect.bisect_right(ends, lo_col * unit_f + 1e-9 * unit_f)
            while i < len(acts) and starts[i] < hi_col * unit_f - 1e-9 * unit_f:
                c0 = round(starts[i] / unit_f)
                c1 = round(ends[i] / unit_f)
                a, b = max(c0, lo_col), min(c1, hi_col)
                if b > a:
                    left = offsets[a]
                    span = offsets[b - 1] + cell - left
                    if a != c0:
                        text = "=" * span
                    else:
                        label = _label(acts[i])
                        if len(label) > span:
                            text = label[: span - 1] + "*"
                        else:
                            text = label.ljust(span, "=" if b - a > 1 else " ")
                    chars[left : left + span] = text
                i += 1
        if gap_at is not None:
            g = offsets[shown[gap_at]] - cell - 1
            chars[g : g + 2] = "//"
        rows.append("".join(chars).rstrip())

    # cycle axis: a label at the column where it starts, skipped if it would overlap
    axis = list("cycle".rjust(head_w).ljust(line_w + 8))
    free_from = 0
    for c, off in offsets.items():
        t = c * unit
        txt = str(int(t)) if t.denominator == 1 else f"{float(t):.3g}"
        if off >= free_from and off + len(txt) <= max(line_w - 1, width):
            axis[off : off + len(txt)] = txt
            free_from = off + len(txt) + 1
    title = (
        f"{sched.policy}  S={sched.num_stages} Bm={sched.microbatches_per_minibatch} "
        f"K={sched.minibatches}{' weight-stashing' if sched.weight_stashing else ''}  "
        f"makespan={result.makespan:g} cycles  "
        f"1 column = {_fmt_unit(unit)} cycle(s)"
        + (f"  ({total - len(shown)} columns hidden at '//')" if gap_at is not None else "")
    )
    legend = (
        "F<n>/B<n>/U<ns>: forward/backward/update of micro-batch(es) n; "
        "'=' continues the action to its left; '.' idle"
    )
    return "\n".join([title, "".join(axis).rstrip(), *rows, legend])


def _fmt_unit(unit: Fraction) -> str:
    return str(unit.numerator) if unit.denominator == 1 else f"{unit} (={float(unit):.4g})"


def format_grid(
    schedule: Schedule, stuck: Mapping[int, Action] | None = None, max_steps: int = 16
) -> str:
    """The per-stage action lists, step = list position; stuck actions shown as ``>2F0<``.

    Long lists show ``max_steps`` steps, centred on the stuck action if there is one.
    """
    stuck = stuck or {}
    cell = max((len(str(a)) for acts in schedule.stages for a in acts), default=3) + 2
    longest = max(len(acts) for acts in schedule.stages)
    first = 0
    if stuck:
        pos = min(schedule.stages[s].index(a) for s, a in stuck.items())
        first = max(0, min(pos - max_steps // 2, longest - max_steps))
    last = min(longest, first + max_steps)
    lines = ["step    " + " ".join(str(i).center(cell) for i in range(first, last))]
    for s, acts in enumerate(schedule.stages):
        cells = []
        for a in acts[first:last]:
            text = f">{a}<" if stuck.get(s) == a else str(a)
            cells.append(text.center(cell))
        more = " ..." if len(acts) > last else ""
        lines.append(f"stage {s} " + " ".join(cells) + more)
    return "\n".join(line.rstrip() for line in lines)
