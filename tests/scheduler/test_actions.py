"""The schedule IR: actions, their string form and the derived messages."""

import pickle

import pytest

from aimcpipe.errors import ScheduleError
from aimcpipe.scheduler import (
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
from aimcpipe.scheduler.actions import format_microbatches, parse_microbatches


@pytest.mark.parametrize(
    ("action", "text"),
    [
        (forward(2, 0), "2F0"),
        (backward(1, 3), "1B3"),
        (update(0, [4, 5, 6, 7]), "0U4-7"),
        (update(0, [9]), "0U9"),
        (update(3, [1, 3, 8, 9, 10]), "3U1+3+8-10"),
        (update(12, [0, 1, 5]), "12U0-1+5"),
    ],
)
def test_string_form_round_trips(action: Action, text: str) -> None:
    assert str(action) == text
    assert parse_action(text) == action
    assert Action.parse(text) == action


def test_fields_and_n() -> None:
    a = forward(2, 7)
    assert (a.kind, a.stage, a.microbatches, a.n) == ("F", 2, (7,), 7)
    u = update(1, [3, 2])
    assert u.microbatches == (2, 3)  # sorted
    with pytest.raises(AttributeError):
        _ = u.n


def test_actions_are_immutable_hashable_and_picklable() -> None:
    a = backward(1, 3)
    with pytest.raises(AttributeError):
        a.stage = 2  # type: ignore[misc]
    assert len({a, backward(1, 3), forward(1, 3)}) == 2
    assert pickle.loads(pickle.dumps(a)) == a


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("X", 0, (1,)), "kind"),
        (("F", -1, (1,)), "stage"),
        (("F", 0, ()), "at least one"),
        (("F", 0, (1, 2)), "exactly one"),
        (("U", 0, (3, 2)), "increasing"),
        (("B", 0, (-1,)), "micro-batch"),
    ],
)
def test_constructor_rejects_bad_fields(args: tuple, fragment: str) -> None:
    with pytest.raises(ScheduleError, match=fragment):
        Action(*args)


def test_parse_with_row_stage() -> None:
    assert parse_action("F3", stage=2) == forward(2, 3)
    assert parse_action(" 2B3 ", stage=2) == backward(2, 3)
    with pytest.raises(ScheduleError, match="stage 1"):
        parse_action("2B3", stage=1)
    with pytest.raises(ScheduleError, match="no stage prefix"):
        parse_action("F3")
    for bad in ["2X3", "2F", "F-1", "2U3-1", "2F1,2", ""]:
        with pytest.raises(ScheduleError):
            parse_action(bad, stage=2)


def test_microbatch_ranges() -> None:
    assert parse_microbatches("0-3+7+9-10") == (0, 1, 2, 3, 7, 9, 10)
    assert format_microbatches((0, 1, 2, 3, 7, 9, 10)) == "0-3+7+9-10"


def test_derived_dependencies_and_messages() -> None:
    # S = 3: activations flow 0 -> 1 -> 2 after F, gradients 2 -> 1 -> 0 after B
    assert dependency(forward(0, 4), 3) is None
    assert dependency(forward(1, 4), 3) == forward(0, 4)
    assert dependency(backward(1, 4), 3) == backward(2, 4)
    assert dependency(backward(2, 4), 3) is None  # the last stage computes the loss
    assert dependency(update(1, [4]), 3) is None
    assert received_message(forward(1, 4), 3) == Message("activation", 4, 0, 1)
    assert sent_message(forward(1, 4), 3) == Message("activation", 4, 1, 2)
    assert sent_message(forward(2, 4), 3) is None
    assert received_message(backward(0, 4), 3) == Message("gradient", 4, 1, 0)
    assert sent_message(backward(1, 4), 3) == Message("gradient", 4, 1, 0)
    assert sent_message(backward(0, 4), 3) is None
    assert received_message(update(0, [1, 2]), 3) is None


def test_schedule_shape_checks() -> None:
    stages = ((forward(0, 0), backward(0, 0), update(0, [0])),)
    s = Schedule("custom", stages, 1)
    assert (s.num_stages, s.num_microbatches, s.num_actions) == (1, 1, 3)
    assert s.to_strings() == [["0F0", "0B0", "0U0"]]
    with pytest.raises(ScheduleError, match="microbatches_per_minibatch"):
        Schedule("custom", stages, 0)
    with pytest.raises(ScheduleError, match="at least one stage"):
        Schedule("custom", (), 1)
