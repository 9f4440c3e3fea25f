"""Pipeline schedules as data: the ordered actions each stage takes for one step's micro-batches.

As in torch.distributed.pipelining, a schedule is apart from the stage that carries it out: a stage knows
how to run a forward or backward on a micro-batch and how to send or receive one (pac.runtime.side_pipeline,
pac.runtime.pipeline); the schedule only says in which order, per stage. Printed, one line per stage:

    >>> print(format_schedule(one_f_one_b(stages=2, micro_batches=3)))
    stage 0: F0 SEND_F0 F1 SEND_F1 RECV_B0 B0 F2 SEND_F2 RECV_B1 B1 RECV_B2 B2
    stage 1: RECV_F0 F0 B0 SEND_B0 RECV_F1 F1 B1 SEND_B1 RECV_F2 F2 B2 SEND_B2

A send goes to the next stage (SEND_F) or the previous one (SEND_B), a receive comes from there. `simulate`
plays every stage's actions against each other and fails on a receive that can never be matched.

* GPipe: all forwards, then all backwards in reverse; every micro-batch's activations are alive at once.
* 1F1B: after a warm-up of (stages - 1 - stage) forwards each forward is followed by the oldest backward, so a
  stage holds at most (stages - stage) micro-batches' activations. It needs sends that do not wait for their
  receiver (`simulate(..., buffered_sends=False)` deadlocks); pac's stages send from a queue.
* forward-only: phase 1 (the frozen backbone's forward) and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pac.errors import PacError

FORWARD, BACKWARD = "F", "B"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
OPS = (FORWARD, BACKWARD, SEND_F, RECV_F, SEND_B, RECV_B)


class ScheduleError(PacError):
    pass


@dataclass(frozen=True)
class Action:
    """One thing one stage does to one micro-batch."""

    stage: int
    op: str
    micro: int

    def __str__(self) -> str:
        return f"{self.op}{self.micro}"

    @property
    def peer(self) -> int | None:
        """The stage a send goes to or a receive comes from."""
        return {SEND_F: self.stage + 1, RECV_F: self.stage - 1, SEND_B: self.stage - 1, RECV_B: self.stage + 1}.get(
            self.op
        )


Schedule = list[list[Action]]  # per stage, in order


def _forward(stage: int, stages: int, m: int) -> list[Action]:
    recv = [Action(stage, RECV_F, m)] if stage > 0 else []
    send = [Action(stage, SEND_F, m)] if stage < stages - 1 else []
    return [*recv, Action(stage, FORWARD, m), *send]


def _backward(stage: int, stages: int, m: int) -> list[Action]:
    recv = [Action(stage, RECV_B, m)] if stage < stages - 1 else []
    send = [Action(stage, SEND_B, m)] if stage > 0 else []
    return [*recv, Action(stage, BACKWARD, m), *send]


def _check(stages: int, micro_batches: int) -> None:
    if stages < 1 or micro_batches < 1:
        raise ScheduleError(
            f"a schedule needs at least one stage and one micro-batch, not {stages} and {micro_batches}"
        )


def forward_only(stages: int, micro_batches: int) -> Schedule:
    _check(stages, micro_batches)
    return [[a for m in range(micro_batches) for a in _forward(s, stages, m)] for s in range(stages)]


def gpipe(stages: int, micro_batches: int) -> Schedule:
    _check(stages, micro_batches)
    return [
        [a for m in range(micro_batches) for a in _forward(s, stages, m)]
        + [a for m in reversed(range(micro_batches)) for a in _backward(s, stages, m)]
        for s in range(stages)
    ]


def one_f_one_b(stages: int, micro_batches: int) -> Schedule:
    _check(stages, micro_batches)
    schedule = []
    for s in range(stages):
        warmup = min(stages - 1 - s, micro_batches)
        actions = [a for m in range(warmup) for a in _forward(s, stages, m)]
        for m in range(warmup, micro_batches):  # steady state: one forward, then the oldest backward
            actions += _forward(s, stages, m) + _backward(s, stages, m - warmup)
        for m in range(micro_batches - warmup, micro_batches):  # cool-down
            actions += _backward(s, stages, m)
        schedule.append(actions)
    return schedule


TRAINING_SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def training_schedule(name: str, stages: int, micro_batches: int) -> Schedule:
    if name not in TRAINING_SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}: use one of {', '.join(TRAINING_SCHEDULES)}")
    return TRAINING_SCHEDULES[name](stages, micro_batches)


def format_schedule(schedule: Schedule) -> str:
    return "\n".join(f"stage {s}: " + " ".join(map(str, actions)) for s, actions in enumerate(schedule))


def simulate(schedule: Schedule, *, buffered_sends: bool = True) -> list[Action]:
    """Play the stages against each other; return one order in which every action can run.

    A receive waits for its matching send; with `buffered_sends=False` a send also waits until its receive is
    posted (torch.distributed's gloo send). Raises ScheduleError on a deadlock, on a send nobody receives, or on
    a stage that runs a micro-batch's backward before its forward."""
    for s, actions in enumerate(schedule):
        seen: set[tuple[str, int]] = set()
        for a in actions:
            if a.stage != s or a.op not in OPS:
                raise ScheduleError(f"stage {s}'s list holds {a!r}")
            if a.op == BACKWARD and (FORWARD, a.micro) not in seen:
                raise ScheduleError(f"stage {s} runs B{a.micro} before F{a.micro}")
            if (a.op, a.micro) in seen:
                raise ScheduleError(f"stage {s} runs {a} twice")
            seen.add((a.op, a.micro))
    position = [0] * len(schedule)
    sent: set[tuple[int, str, int]] = set()  # (to stage, op it is received by, micro)
    received: set[tuple[int, str, int]] = set()
    order: list[Action] = []
    matching = {SEND_F: RECV_F, SEND_B: RECV_B}

    def ready(a: Action) -> bool:
        if a.op in (RECV_F, RECV_B):
            return (a.stage, a.op, a.micro) in sent
        if a.op in matching and not buffered_sends:
            peer_actions = schedule[a.peer]
            return position[a.peer] < len(peer_actions) and peer_actions[position[a.peer]] == Action(
                a.peer, matching[a.op], a.micro
            )
        return True

    while any(p < len(actions) for p, actions in zip(position, schedule, strict=True)):
        progressed = False
        for s, actions in enumerate(schedule):
            while position[s] < len(actions) and ready(actions[position[s]]):
                a = actions[position[s]]
                if a.op in matching:
                    if not 0 <= a.peer < len(schedule):
                        raise ScheduleError(f"stage {s}'s {a} goes to stage {a.peer}, which does not exist")
                    sent.add((a.peer, matching[a.op], a.micro))
                    if not buffered_sends:  # the rendezvous completes the peer's receive too
                        peer = schedule[a.peer][position[a.peer]]
                        received.add((a.peer, peer.op, peer.micro))
                        order.append(peer)
                        position[a.peer] += 1
                elif a.op in (RECV_F, RECV_B):
                    received.add((s, a.op, a.micro))
                order.append(a)
                position[s] += 1
                progressed = True
        if not progressed:
            waiting = ", ".join(
                f"stage {s} at {actions[position[s]]}"
                for s, actions in enumerate(schedule)
                if position[s] < len(actions)
            )
            raise ScheduleError(f"the schedule deadlocks: {waiting}")
    if sent != received:
        raise ScheduleError(f"sends nobody receives: {sorted(sent - received)}")
    return order


def in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose forward has run and backward not yet: the activations a stage holds."""
    alive = peak = 0
    for a in actions:
        alive += (a.op == FORWARD) - (a.op == BACKWARD)
        peak = max(peak, alive)
    return peak


def split_batch(indices: Sequence[int], count: int) -> list[Sequence[int]]:
    """A batch's micro-batches: `count` near-equal contiguous parts (fewer when the batch is smaller)."""
    count = max(1, min(count, len(indices)))
    size, extra = divmod(len(indices), count)
    parts, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        parts.append(indices[start:end])
        start = end
    return parts


class ForwardStage(Protocol):
    """What a forward-only schedule drives: one pipeline stage's compute and communication, by micro-batch."""

    def forward(self, micro: int) -> None: ...
    def send_forward(self, micro: int) -> None: ...
    def recv_forward(self, micro: int) -> None: ...


class Stage(ForwardStage, Protocol):
    """What a training schedule drives: a ForwardStage that also runs and exchanges backwards."""

    def backward(self, micro: int) -> None: ...
    def send_backward(self, micro: int) -> None: ...
    def recv_backward(self, micro: int) -> None: ...


HANDLERS = {
    FORWARD: "forward",
    BACKWARD: "backward",
    SEND_F: "send_forward",
    RECV_F: "recv_forward",
    SEND_B: "send_backward",
    RECV_B: "recv_backward",
}


def run(actions: list[Action], stage: ForwardStage | Stage) -> None:
    """Carry out one stage's actions in order."""
    for a in actions:
        getattr(stage, HANDLERS[a.op])(a.micro)
