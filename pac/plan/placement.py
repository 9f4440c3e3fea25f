"""Placement as pure functions: stages (contiguous layer ranges) per peer and sample ownership.

A stage [start, end) runs layers start..end-1 and produces taps start+1..end (plus tap 0, the
embedding output, on the first stage). Consecutive ranks given the same range form that stage's
data-parallel group (a hybrid pipeline, as in Asteroid): in phase 1 its members take turns, micro-batch
by micro-batch (`stage_groups`, `Plan.processor`); only `shuffle` mode takes groups, since its phase 2 is
data-parallel over every rank anyway. Stages come from the planner (pac.plan.planner), from ``--stages``,
or in proportion to each peer's memory.

A rank whose share is 0 owns no samples: in shuffle mode it runs its layers in phase 1 and leaves, and phase 2
is data-parallel over the others (`Plan.trainers`). That is the role of a device that can run the backbone's
forward but not train (a phone: `pac peer --phase1-only`, deploy/android-termux.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pac.errors import PacError
from pac.plan.schedule import TRAINING_SCHEDULES

MODES = ("shuffle", "replicated", "side-pipeline")  # the modes of cached methods, which the planner chooses between
# The model itself pipelined over the peers' layer ranges, forward passes only: the mode of methods that train
# without backward (zeroth-order, pac.runtime.zo_pipeline). Each step splits into micro-batches, which overlap.
PIPELINE = "pipeline"
PIPELINED = ("shuffle", "side-pipeline", PIPELINE)  # the modes that give each peer a layer range
Stage = tuple[int, int]


class PlanError(PacError):
    pass


@dataclass(frozen=True)
class Inheritance:
    """Who owned each sample before a re-plan, and where those owners are now: a sample whose owner stayed keeps
    it (its taps are cached there), the peers that arrived take the samples the new plan's round-robin gives them,
    and the samples of the peers that left are dealt out by that round-robin too. Chained through earlier
    re-plans, so ownership is a pure function of the membership history, which the run's launch.json records."""

    world: int  # the earlier plan's ranks
    shares: tuple[int, ...] | None  # and their shares
    ranks_now: tuple[int | None, ...]  # each earlier rank's rank in the new plan; None: it left
    earlier: Inheritance | None = None  # the earlier plan's own inheritance
    newcomers: tuple[int, ...] = ()  # ranks of the new plan that were not in the earlier one

    def to_wire(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "shares": list(self.shares) if self.shares is not None else None,
            "ranks_now": list(self.ranks_now),
            "earlier": self.earlier.to_wire() if self.earlier is not None else None,
            "newcomers": list(self.newcomers),
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any] | None) -> Inheritance | None:
        if raw is None:
            return None
        return cls(
            int(raw["world"]),
            None if raw["shares"] is None else tuple(int(s) for s in raw["shares"]),
            tuple(None if r is None else int(r) for r in raw["ranks_now"]),
            cls.from_wire(raw["earlier"]),
            tuple(int(r) for r in raw["newcomers"]),
        )


@dataclass(frozen=True)
class Plan:
    mode: str
    stages: tuple[Stage, ...]  # per rank; in `replicated` mode every rank holds (0, L)
    # side-pipeline's phase 2: the pac.plan.schedule training schedule and micro-batches per batch
    schedule: str = "gpipe"
    micro_batches: int = 2
    # Samples each rank owns, as whole-number weights per rank (3, 2, 1: of every 6 samples, 3 to rank 0);
    # None: equal shares. Ownership decides who caches and trains a sample in shuffle and replicated modes.
    shares: tuple[int, ...] | None = None
    # Phase 1's samples per forward, as planned; None (a mode given by hand): the run's batch size in a
    # pipeline, pac.plan.costs.CACHE_MICRO_BATCH where each peer runs the whole model.
    phase1_micro_batch: int | None = None
    inherited: Inheritance | None = None  # ownership before a re-plan (shuffle and replicated)

    def owner(self, position: int) -> int:
        """The rank that trains the sample at `position` of its split."""
        return owner(position, self.world, self.shares, self.inherited)

    def owned_positions(self, num_samples: int, rank: int) -> list[int]:
        return owned_positions(num_samples, rank, self.world, self.shares, self.inherited)

    @property
    def world(self) -> int:
        return len(self.stages)

    @property
    def trainers(self) -> tuple[int, ...]:
        """The ranks that train in phase 2: all but those whose share is 0 (phase-1-only)."""
        return tuple(r for r in range(self.world) if self.shares is None or self.shares[r] > 0)

    def describe(self) -> str:
        return ", ".join(f"rank {r}: layers {a}-{b - 1}" for r, (a, b) in enumerate(self.stages))

    @functools.cached_property
    def groups(self) -> list[tuple[Stage, tuple[int, ...]]]:
        """The pipeline's stages with the ranks that run each (`stage_groups`), worked out once per plan."""
        return stage_groups(self.stages)

    def processor(self, group: int, micro: int) -> int:
        """The rank of stage group `group` that runs phase 1's micro-batch `micro` (its members take turns)."""
        ranks = self.groups[group][1]
        return ranks[micro % len(ranks)]


def stage_groups(stages: Sequence[Stage]) -> list[tuple[Stage, tuple[int, ...]]]:
    """The pipeline's stages in order, each with the ranks that hold it: consecutive ranks with one range."""
    groups: list[tuple[Stage, tuple[int, ...]]] = []
    for rank, stage in enumerate(stages):
        if groups and groups[-1][0] == stage:
            groups[-1] = (stage, (*groups[-1][1], rank))
        else:
            groups.append((stage, (rank,)))
    return groups


def layer_ranges(spec: str) -> list[Stage]:
    """`"0,15-30"` (comma-separated layer numbers and inclusive ranges) -> [(0, 1), (15, 31)]; the one parser
    of layer lists (--stages, --taps)."""
    ranges: list[Stage] = []
    for part in spec.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            ranges.append((int(first), int(last if sep else first) + 1))
        except ValueError:
            raise PlanError(f"{part.strip()!r} is not a layer range like 0-9") from None
    return ranges


def parse_stages(spec: str, num_layers: int, world: int) -> list[Stage]:
    """`"0-9,10-19,20-29"` (inclusive layer numbers, one range per peer in rank order) -> [(0,10), ...].
    A range repeated by the next peer makes both one stage's data-parallel group: `"0-19,0-19,20-29"`."""
    try:
        stages = layer_ranges(spec)
    except PlanError as e:
        raise PlanError(f"--stages: {e}") from None
    if len(stages) != world:
        raise PlanError(f"--stages gives {len(stages)} ranges for {world} peers: give one range per peer")
    expected = 0
    for i, (a, b) in enumerate(stages):
        if i and (a, b) == stages[i - 1]:
            continue  # another member of the previous stage's group
        if a != expected or b <= a:
            raise PlanError(
                f"--stages {spec!r}: ranges must be contiguous, non-empty and start at 0 "
                f"(the range after layer {expected - 1} must start at {expected}, or repeat the previous "
                "range to share its stage)"
            )
        expected = b
    if expected != num_layers:
        raise PlanError(f"--stages {spec!r} ends at layer {expected - 1}; the model has layers 0-{num_layers - 1}")
    return stages


def split_proportional(num_layers: int, weights: Sequence[float]) -> list[Stage]:
    """Contiguous ranges with layer counts proportional to `weights` (e.g. memory), each at least one layer."""
    world = len(weights)
    if world == 0 or any(w <= 0 for w in weights):
        raise PlanError("every peer needs a positive weight (memory) to be given layers")
    if num_layers < world:
        raise PlanError(f"{world} pipeline stages for {num_layers} layers: use at most {num_layers} peers")
    total = sum(weights)
    # Largest-remainder rounding of the ideal shares, then at least one layer per stage.
    ideal = [num_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    by_remainder = sorted(range(world), key=lambda i: ideal[i] - int(ideal[i]), reverse=True)
    i = 0
    while sum(counts) < num_layers:
        counts[by_remainder[i % world]] += 1
        i += 1
    while sum(counts) > num_layers:  # only when the one-layer minimum pushed it over
        largest = max(range(world), key=lambda k: counts[k])
        counts[largest] -= 1
    stages, start = [], 0
    for count in counts:
        stages.append((start, start + count))
        start += count
    return stages


def check_schedule(mode: str | None, schedule: str, micro_batches: int) -> None:
    """The phase-2 pipelines' settings, checked before any peer is waited for (mode None: the planner picks it)."""
    if mode == PIPELINE and schedule != "gpipe":
        raise PlanError("--mode pipeline runs forward passes only: drop --schedule (it takes --micro-batches)")
    if mode not in (None, "side-pipeline", PIPELINE) and (schedule, micro_batches) != ("gpipe", 2):
        raise PlanError("--schedule and --micro-batches apply to --mode side-pipeline (its phase 2 is a pipeline)")
    if schedule not in TRAINING_SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {schedule!r}: use one of {', '.join(TRAINING_SCHEDULES)}")
    if micro_batches < 1:
        raise PlanError(f"--micro-batches {micro_batches}: a batch splits into at least one micro-batch")


def make_plan(
    mode: str,
    num_layers: int,
    memories: Sequence[float],
    stages_spec: str | None = None,
    schedule: str = "gpipe",
    micro_batches: int = 2,
    shares: Sequence[int] | None = None,
) -> Plan:
    if mode not in (*MODES, PIPELINE):
        raise PlanError(f"unknown placement mode {mode!r}: use one of {', '.join((*MODES, PIPELINE))}")
    check_schedule(mode, schedule, micro_batches)
    world = len(memories)
    if shares is not None:
        if len(shares) != world:
            raise PlanError(f"--shares gives {len(shares)} weights for {world} peers: give one per peer")
        if mode in ("side-pipeline", PIPELINE):
            raise PlanError(f"--shares applies to shuffle and replicated: in {mode} every stage has every sample")
        shares = tuple(shares)
        check_shares(mode, shares)
    if mode == "replicated":
        if stages_spec:
            raise PlanError(f"--stages applies to the pipelined modes ({', '.join(PIPELINED)}), not replicated")
        return Plan(mode, tuple((0, num_layers) for _ in range(world)), schedule, micro_batches, shares)
    stages = parse_stages(stages_spec, num_layers, world) if stages_spec else split_proportional(num_layers, memories)
    check_groups(mode, stages)
    return Plan(mode, tuple(stages), schedule, micro_batches, shares)


def check_groups(mode: str, stages: Sequence[Stage]) -> None:
    """Stage groups serve shuffle mode only: a side-pipeline or pipeline stage trains its own part alone."""
    if mode in ("side-pipeline", PIPELINE) and len(stage_groups(stages)) < len(stages):
        raise PlanError(
            "a range given to two peers makes a data-parallel group inside a stage, which --mode shuffle runs; "
            f"{mode} needs one peer per stage: give each peer its own range"
        )


def stage_taps(stage: Stage, taps: Sequence[int]) -> list[int]:
    """The wanted taps this stage produces."""
    start, end = stage
    produced = set(range(start + 1, end + 1)) | ({0} if start == 0 else set())
    return [t for t in taps if t in produced]


def owner(position: int, world: int, shares: Sequence[int] | None = None, inherited: Inheritance | None = None) -> int:
    """The rank that trains the sample at `position`: round-robin, or with `shares` a weighted round-robin
    (interleaved, so every rank's share keeps the classes and lengths balanced as plain round-robin does); after a
    re-plan (`inherited`), a sample stays with its earlier owner if that peer stayed, unless the round-robin gives
    it to a newcomer."""
    if shares is None:
        fresh = position % world
    else:
        pattern = _cycle(tuple(shares))
        fresh = pattern[position % len(pattern)]
    if inherited is None or fresh in inherited.newcomers:
        return fresh
    now = inherited.ranks_now[owner(position, inherited.world, inherited.shares, inherited.earlier)]
    return fresh if now is None or (shares is not None and shares[now] == 0) else now


def owned_positions(
    num_samples: int,
    rank: int,
    world: int,
    shares: Sequence[int] | None = None,
    inherited: Inheritance | None = None,
) -> list[int]:
    if shares is None and inherited is None:
        return list(range(rank, num_samples, world))
    return [p for p in range(num_samples) if owner(p, world, shares, inherited) == rank]


def phase1_only_left_out(mode: str) -> str:
    """Why a phase-1-only peer has no place in `mode` (every mode but shuffle), for the peer and the user."""
    return f"it runs phase 1 only (--phase1-only), which only shuffle mode has a place for, not {mode}"


def check_shares(mode: str, shares: Sequence[int]) -> None:
    """A share of 0 (a phase-1-only rank) only in shuffle mode, where phase 1 needs no owner; never on rank 0,
    which writes the adapter."""
    share_pattern(tuple(shares))
    idle = [r for r, s in enumerate(shares) if s == 0]
    if idle and mode != "shuffle":
        raise PlanError(
            f"ranks {idle} own no samples (share 0): only --mode shuffle runs a peer in phase 1 alone; "
            "give every peer a share of at least 1, or use shuffle"
        )
    if 0 in idle:
        raise PlanError(
            "rank 0 writes the adapter, so it must train: give it a share of at least 1 (list a training peer first)"
        )


def share_pattern(shares: tuple[int, ...]) -> list[int]:
    """One cycle of owners for whole-number `shares`, spread out by smooth weighted round-robin: (2, 1) gives
    [0, 1, 0], never [0, 0, 1]. A rank of share 0 is never picked: after the shares are added the largest
    running total is above 0, and such a rank's stays at 0."""
    if not shares or any(s < 0 for s in shares) or not any(shares):
        raise PlanError(f"shares must be whole numbers of at least 0 per rank, some above 0, not {list(shares)}")
    current = [0] * len(shares)
    pattern = []
    for _ in range(sum(shares)):
        current = [c + s for c, s in zip(current, shares, strict=True)]
        pick = max(range(len(shares)), key=lambda r: current[r])
        current[pick] -= sum(shares)
        pattern.append(pick)
    return pattern


@functools.cache  # owner() asks for every sample
def _cycle(shares: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(share_pattern(shares))
