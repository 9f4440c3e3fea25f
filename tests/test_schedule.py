"""Pipeline schedules as data (pac.plan.schedule): what each stage does, in which order, and that it completes."""

from __future__ import annotations

import pytest

from pac.plan.schedule import (
    BACKWARD,
    FORWARD,
    Action,
    ScheduleError,
    format_schedule,
    forward_only,
    gpipe,
    in_flight,
    one_f_one_b,
    run,
    simulate,
    training_schedule,
)

SHAPES = [(stages, micro) for stages in (1, 2, 3, 4) for micro in (1, 2, 3, 5, 8)]


def test_a_schedule_prints_one_line_per_stage():
    assert format_schedule(one_f_one_b(2, 3)) == (
        "stage 0: F0 SEND_F0 F1 SEND_F1 RECV_B0 B0 F2 SEND_F2 RECV_B1 B1 RECV_B2 B2\n"
        "stage 1: RECV_F0 F0 B0 SEND_B0 RECV_F1 F1 B1 SEND_B1 RECV_F2 F2 B2 SEND_B2"
    )
    assert format_schedule(gpipe(2, 2)) == (
        "stage 0: F0 SEND_F0 F1 SEND_F1 RECV_B1 B1 RECV_B0 B0\nstage 1: RECV_F0 F0 RECV_F1 F1 B1 SEND_B1 B0 SEND_B0"
    )
    assert format_schedule(forward_only(3, 2)) == (
        "stage 0: F0 SEND_F0 F1 SEND_F1\nstage 1: RECV_F0 F0 SEND_F0 RECV_F1 F1 SEND_F1\nstage 2: RECV_F0 F0 RECV_F1 F1"
    )


@pytest.mark.parametrize("stages, micro", SHAPES)
@pytest.mark.parametrize("make", [gpipe, one_f_one_b])
def test_training_schedules_run_every_micro_batch_forward_and_backward_once_and_complete(make, stages, micro):
    schedule = make(stages, micro)
    for actions in schedule:
        for op in (FORWARD, BACKWARD):
            assert sorted(a.micro for a in actions if a.op == op) == list(range(micro))
    order = simulate(schedule)
    assert len(order) == sum(len(actions) for actions in schedule)
    # The last stage computes the loss: micro-batch m's backward starts there after its forward everywhere.
    last_forward = {a.micro: i for i, a in enumerate(order) if a.op == FORWARD and a.stage == stages - 1}
    assert all(i > last_forward[a.micro] for i, a in enumerate(order) if a.op == BACKWARD)


@pytest.mark.parametrize("stages, micro", SHAPES)
def test_one_f_one_b_holds_fewer_micro_batches_than_gpipe(stages, micro):
    for s in range(stages):
        assert in_flight(gpipe(stages, micro)[s]) == micro
        assert in_flight(one_f_one_b(stages, micro)[s]) == min(stages - s, micro)


@pytest.mark.parametrize("stages, micro", SHAPES)
def test_forward_only_completes_and_keeps_micro_batch_order(stages, micro):
    schedule = forward_only(stages, micro)
    simulate(schedule, buffered_sends=False)
    for actions in schedule:
        assert [a.micro for a in actions if a.op == FORWARD] == list(range(micro))
        assert not any(a.op == BACKWARD for a in actions)


def test_one_f_one_b_needs_sends_that_do_not_wait_for_their_receiver():
    """Why pac's stages send from a queue (pac.net.dataplane.QueuedSends): with gloo's rendezvous sends,
    1F1B's stage 0 sends F1 while stage 1 sends B0's gradient, and both wait forever. GPipe does not."""
    simulate(gpipe(3, 4), buffered_sends=False)
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(one_f_one_b(2, 2), buffered_sends=False)


def test_broken_schedules_are_refused_with_the_reason():
    backward_first = gpipe(2, 1)
    backward_first[0] = list(reversed(backward_first[0]))
    with pytest.raises(ScheduleError, match="B0 before F0"):
        simulate(backward_first)
    waits_before_sending = gpipe(2, 1)
    waits_before_sending[0] = [Action(0, op, 0) for op in ("F", "RECV_B", "SEND_F", "B")]
    with pytest.raises(ScheduleError, match="deadlocks: stage 0 at RECV_B0, stage 1 at RECV_F0"):
        simulate(waits_before_sending)
    unanswered = gpipe(2, 1)
    unanswered[1] = [a for a in unanswered[1] if a.op != "RECV_F"]
    with pytest.raises(ScheduleError, match="nobody receives"):
        simulate(unanswered)
    with pytest.raises(ScheduleError, match="use one of gpipe, 1f1b"):
        training_schedule("interleaved", 2, 2)
    with pytest.raises(ScheduleError, match="at least one"):
        gpipe(2, 0)


def test_run_drives_a_stage_by_its_actions():
    class Recorder:
        def __init__(self):
            self.calls: list[str] = []

        def __getattr__(self, name):
            return lambda micro: self.calls.append(f"{name}({micro})")

    stage = Recorder()
    run(one_f_one_b(3, 2)[1], stage)
    assert stage.calls == [
        "recv_forward(0)",
        "forward(0)",
        "send_forward(0)",
        "recv_forward(1)",
        "forward(1)",
        "send_forward(1)",
        "recv_backward(0)",
        "backward(0)",
        "send_backward(0)",
        "recv_backward(1)",
        "backward(1)",
        "send_backward(1)",
    ]
