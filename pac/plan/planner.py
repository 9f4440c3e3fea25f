"""The planner: from measured profiles, the placement with the least predicted end-to-end time that fits every
device's memory. Pure functions; pac.plan.costs predicts, this module searches (docs/architecture.md, "Planning").

For each placement mode and each set of devices worth using (the fastest k, k = 1..n: a device too slow to help
is left out, and the plan says what it would have cost), the layer ranges of a pipeline come from dynamic
programming over layers x devices, as PipeDream's and Asteroid's planners do: best[l][k] is the least possible
pace (the slowest stage's seconds per sample) of layers 0..l-1 on the first k devices, each stage one device or
(shuffle mode) a data-parallel group of consecutive devices, every one within its memory. Device orders are
tried in full for up to five devices, by speed beyond. In the data-parallel modes samples are owned equally or
in proportion to the devices' speed (`whole_shares`). The cheapest prediction wins; the others are kept for the
report, so a user sees why the chosen mode beats the other two.

A phase-1-only device (`DeviceProfile.phase1_only`: a phone) takes part in shuffle mode alone, owning no
samples (share 0), and never as rank 0, which trains and writes the adapter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pac.errors import PacError
from pac.plan.costs import (
    GRADIENT_COMPRESSIONS,
    DeviceProfile,
    ModelCosts,
    Prediction,
    Workload,
    limit_seconds,
    peak_bytes,
    predict,
)
from pac.plan.placement import MODES, Stage, phase1_only_left_out, split_proportional, stage_groups, stage_taps

ALL_ORDERS_UP_TO = 5  # devices; 5! = 120 orders of a 30-layer DP take well under a second
MOST_SHARE = 8  # the fastest device's weight when shares follow speed: a cycle of at most 8 x devices samples
# fp16 gradients round every update a little: the planner takes them only for at least this much less time.
COMPRESSION_MIN_GAIN = 0.05


class NoPlanError(PacError):
    pass


@dataclass(frozen=True)
class PlanChoice:
    best: Prediction
    by_mode: dict[str, Prediction]  # the best prediction of each mode that fits
    left_out: dict[str, str]  # device -> why it is not used
    limit_seconds: float  # every device's speed combined, nothing sent, loaded or built (costs.limit_seconds)

    def describe(self) -> str:
        """The plan for people: stages, devices, each phase's time, memory and traffic, and the alternatives."""
        b = self.best
        lines = [f"mode {b.mode} on {len(b.devices)} device(s)"]
        if b.shares is not None:
            owned = ", ".join(f"{name} {share}" for name, share in zip(b.devices, b.shares, strict=True))
            lines.append(f"  samples owned, of every {sum(b.shares)}: {owned}")
        if b.compression != "none":
            lines.append(f"  gradients all-reduced as {b.compression}")
        lines.append(f"  phase 1 in micro-batches of {b.micro_batch}")
        sharing = {r: ranks for _, ranks in stage_groups(b.stages) if b.mode != "replicated" for r in ranks}
        for rank, (name, stage) in enumerate(zip(b.devices, b.stages, strict=True)):
            layers = f"layers {stage[0]}-{stage[1] - 1}"
            if b.shares is not None and b.shares[rank] == 0:
                layers += ", phase 1 only"
            if len(sharing.get(rank, ())) > 1:
                others = ", ".join(b.devices[r] for r in sharing[rank] if r != rank)
                layers += f" (taking turns with {others} at phase 1's micro-batches)"
            lines.append(
                f"  rank {rank} {name}: {layers}, peak {_size(b.peak_bytes[name])}, sends {_size(b.sent_bytes[name])}"
            )
        lines.append(
            f"predicted: phase 1 {b.phase1_seconds:.1f} s, {b.epochs} epoch(s) of {b.epoch_seconds:.1f} s after "
            f"{b.build_seconds:.1f} s of set-up, total {b.total_seconds:.1f} s "
            f"({b.total_seconds / self.limit_seconds:.2f}x the {self.limit_seconds:.1f} s limit of every device's "
            "speed combined)"
        )
        for mode, other in self.by_mode.items():
            if other is not b:
                lines.append(
                    f"  {mode} instead: {other.total_seconds:.1f} s ({other.total_seconds / b.total_seconds:.2f}x) "
                    f"on {', '.join(other.devices)}"
                )
        for mode in MODES:
            if mode not in self.by_mode:
                lines.append(f"  {mode}: fits on no set of the devices")
        for name, why in self.left_out.items():
            lines.append(f"  {name} left out: {why}")
        return "\n".join(lines)


def plan(
    devices: Sequence[DeviceProfile],
    model: ModelCosts,
    work: Workload,
    modes: Sequence[str] = MODES,
    compressions: Sequence[str] = GRADIENT_COMPRESSIONS,
) -> PlanChoice:
    """The fastest placement that fits; NoPlanError, naming each device's shortfall, when none does.
    `compressions`: how data-parallel phase 2 may send its gradients (the cheapest prediction is chosen)."""
    if not devices:
        raise NoPlanError("no devices to plan for")
    if all(d.phase1_only for d in devices):
        raise NoPlanError(
            "every device runs phase 1 only (`pac peer --phase1-only`): at least one must train; start one "
            "without --phase1-only"
        )
    by_speed = sorted(devices, key=lambda d: d.forward_seconds((0, model.num_layers)) + d.side_train_seconds)
    by_mode: dict[str, Prediction] = {}
    with_all: dict[str, Prediction] = {}
    for mode in modes:
        usable = [d for d in by_speed if mode == "shuffle" or not d.phase1_only]
        for k, size in itertools.product(range(1, len(usable) + 1), micro_batch_sizes(devices, work)):
            candidate = best_for(mode, usable[:k], model, replace(work, micro_batch=size), compressions)
            if candidate is None:
                continue
            if k == len(usable) == len(by_speed):
                with_all[mode] = candidate
            if mode not in by_mode or candidate.total_seconds < by_mode[mode].total_seconds:
                by_mode[mode] = candidate
    if not by_mode:
        raise NoPlanError(_shortfall_message(devices, model, work))
    best = min(by_mode.values(), key=lambda p: p.total_seconds)
    left_out = {}
    for d in devices:
        if d.name not in best.devices:
            everyone = with_all.get(best.mode)
            if d.phase1_only and best.mode != "shuffle":
                left_out[d.name] = phase1_only_left_out(best.mode)
            elif everyone is None:
                left_out[d.name] = f"no {best.mode} plan with every device fits in memory"
            else:
                left_out[d.name] = (
                    f"with every device the run takes {everyone.total_seconds:.1f} s, without it "
                    f"{best.total_seconds:.1f} s"
                )
    return PlanChoice(best, by_mode, left_out, limit_seconds(devices, model, work))


def micro_batch_sizes(devices: Sequence[DeviceProfile], work: Workload) -> list[int]:
    """Phase 1's micro-batch sizes to weigh: the workload's, and every other size all devices have measured."""
    measured = [set(dict(d.micro_batch_factors)) for d in devices]
    return sorted({work.micro_batch} | set.intersection(*measured))


def best_for(
    mode: str,
    devices: Sequence[DeviceProfile],
    model: ModelCosts,
    work: Workload,
    compressions: Sequence[str] = ("none",),
) -> Prediction | None:
    """The best prediction of `mode` on exactly these devices, or None if none fits."""
    num_layers = model.num_layers
    if mode == "replicated":
        return _best_shares(mode, devices, [(0, num_layers)] * len(devices), model, work, compressions)
    if mode == "side-pipeline" and len(devices) > num_layers:
        return None
    orders = itertools.permutations(devices) if len(devices) <= ALL_ORDERS_UP_TO else [tuple(devices)]
    best: Prediction | None = None
    # Stage groups only where the prediction says they beat one device per stage: the split's dynamic
    # programming sees a group's next stage only by its first device.
    splits = [(order, grouped) for order in orders for grouped in ((False, True) if mode == "shuffle" else (False,))]
    for order, grouped in splits:
        if order[0].phase1_only:  # rank 0 trains: it writes the adapter
            continue
        stages = split_layers(mode, order, model, work, grouped)
        if stages is None:
            continue
        found = _best_shares(mode, order, stages, model, work, compressions)
        if found is not None and (best is None or found.total_seconds < best.total_seconds):
            best = found
    return best


def _best_shares(
    mode: str,
    devices: Sequence[DeviceProfile],
    stages: Sequence[Stage],
    model: ModelCosts,
    work: Workload,
    compressions: Sequence[str],
) -> Prediction | None:
    """Equal ownership, or (data-parallel modes) shares in proportion to each device's speed in phase 1 or in
    phase 2, each with every allowed gradient compression: whichever predicts the least time. A phase-1-only
    device's share is 0 in each."""
    training = [d for d in devices if not d.phase1_only]

    def spread(shares: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """Shares of the training devices -> shares of every device (0 for phase-1-only ones)."""
        if len(training) == len(devices):
            return shares
        given = iter(shares or [1] * len(training))
        return tuple(0 if d.phase1_only else next(given) for d in devices)

    candidates: list[tuple[int, ...] | None] = [spread(None)]
    if mode != "side-pipeline" and len(training) > 1:
        whole = (0, model.num_layers)
        trains = [d.data_parallel_train_seconds for d in training]
        for seconds in ([d.forward_seconds(whole) for d in training], trains):
            candidates.append(spread(whole_shares([1 / max(s, 1e-12) for s in seconds])))
    # Compression changes nothing alone or in side-pipeline mode (no gradient all-reduce there).
    ways = dict.fromkeys(compressions) if mode != "side-pipeline" and len(training) > 1 else {"none": None}
    found = [
        predict(mode, devices, stages, model, work, shares, compression)
        for shares in dict.fromkeys(candidates)
        for compression in ways
    ]
    fitting = [p for p in found if p.fits]
    if not fitting:
        return None
    best = min(fitting, key=lambda p: p.total_seconds)
    plain = next((p for p in fitting if p.shares == best.shares and p.compression == "none"), best)
    return plain if plain.total_seconds <= best.total_seconds * (1 + COMPRESSION_MIN_GAIN) else best


def whole_shares(speeds: Sequence[float], most: int = MOST_SHARE) -> tuple[int, ...] | None:
    """The smallest whole-number weights within 10% of `speeds`' proportions (the fastest device's weight at
    most `most`, so the ownership cycle stays short); None when they come out equal."""
    top = max(speeds)
    target = [s / sum(speeds) for s in speeds]
    for fastest in range(1, most + 1):
        shares = [max(1, round(fastest * s / top)) for s in speeds]
        if all(abs(w / sum(shares) - t) <= 0.1 * t for w, t in zip(shares, target, strict=True)):
            break
    return None if len(set(shares)) == 1 else tuple(shares)


def split_layers(
    mode: str, devices: Sequence[DeviceProfile], model: ModelCosts, work: Workload, grouped: bool = False
) -> list[Stage] | None:
    """Contiguous layer ranges, one per device in this order, with the least pace that fits (None: none fits).
    With `grouped` (shuffle mode), consecutive devices may share a range: a stage's data-parallel group. In
    side-pipeline mode every stage must produce a tap, since it runs the side blocks of its taps."""
    if grouped and mode != "shuffle":
        raise NoPlanError("only shuffle mode runs a stage on a group of devices")
    num_layers, n = model.num_layers, len(devices)
    inf = math.inf
    largest_group = n if grouped else 1
    # best[k][l]: least pace of layers 0..l-1 on devices 0..k-1; cut[k][l]: where the last group's devices and
    # layers start.
    best = [[inf] * (num_layers + 1) for _ in range(n + 1)]
    cut = [[(0, 0)] * (num_layers + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        following = devices[k] if k < n else None
        # Single devices first, and a group only where strictly faster: it holds more layers on each member.
        for first in range(k - 1, max(0, k - largest_group) - 1, -1):
            group = devices[first:k]
            for end in range(1, num_layers + 1):
                for start in range(end):
                    if best[first][start] == inf:
                        continue
                    stage = (start, end)
                    if mode == "side-pipeline" and not stage_taps(stage, work.taps):
                        continue
                    if any(peak_bytes(mode, d, stage, model, work) > d.memory for d in group):
                        continue
                    pace = max(best[first][start], _group_pace(mode, group, following, n, stage, model, work))
                    if pace < best[k][end] * (1 - 1e-9):
                        best[k][end], cut[k][end] = pace, (first, start)
    if best[n][num_layers] == inf:
        return None
    stages: list[Stage] = []
    k, end = n, num_layers
    while k:
        first, start = cut[k][end]
        stages[:0] = [(start, end)] * (k - first)
        k, end = first, start
    return stages


def _group_pace(
    mode: str,
    group: Sequence[DeviceProfile],
    following: DeviceProfile | None,
    n: int,
    stage: Stage,
    model: ModelCosts,
    work: Workload,
) -> float:
    """One stage's seconds per sample in phase 1: its members' compute, or what their links carry, whichever is
    slower, at the slowest member's pace shared by the group (its members take turns)."""
    paces = []
    for device in group:
        out = model.hidden_bytes / min(device.bandwidth, following.bandwidth) if following is not None else 0.0
        if mode == "shuffle":
            out += len(stage_taps(stage, work.taps)) * model.tap_bytes * (n - 1) / n / device.bandwidth
        paces.append(max(device.forward_seconds(stage, work.micro_batch), out))
    return max(paces) / len(group)


def _shortfall_message(devices: Sequence[DeviceProfile], model: ModelCosts, work: Workload) -> str:
    """Where memory runs short in the most frugal arrangement: every device, layers in proportion to memory."""
    if model.num_layers < len(devices):
        devices = sorted(devices, key=lambda d: d.memory, reverse=True)[: model.num_layers]
    stages = split_proportional(model.num_layers, [d.memory for d in devices])
    needs = {d.name: peak_bytes("shuffle", d, s, model, work) for d, s in zip(devices, stages, strict=True)}
    short = [
        f"{d.name} needs {_size(needs[d.name] - d.memory)} more for layers {s[0]}-{s[1] - 1} "
        f"({_size(needs[d.name])} of {_size(d.memory)})"
        for d, s in zip(devices, stages, strict=True)
        if needs[d.name] > d.memory
    ]
    where = "; ".join(short) if short else "each device fits alone, but no pipeline order does"
    return (
        f"the run fits on no placement of these devices; with the layers split in proportion to memory, {where}: "
        "raise max_mem, add a device, or shorten --max-length / --batch-size"
    )


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"
