"""The planner: from measured profiles, the placement with the least predicted end-to-end time that fits every
device's memory. Pure functions; pac.plan.costs predicts, this module searches (docs/architecture.md, "Planning").

For each placement mode and each set of devices worth using (the fastest k, k = 1..n: a device too slow to help
is left out, and the plan says what it would have cost), the layer ranges of a pipeline come from dynamic
programming over layers x devices, as PipeDream's planner does: best[l][k] is the least possible pace (the
slowest stage's seconds per sample) of layers 0..l-1 on the first k devices, each stage one device and within
its memory. Device orders are tried in full for up to five devices, by speed beyond. In the data-parallel
modes samples are owned equally or in proportion to the devices' speed (`whole_shares`). The cheapest prediction
wins; the others are kept for the report, so a user sees why the chosen mode beats the other two.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

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
from pac.plan.placement import MODES, Stage, split_proportional, stage_taps

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
        for rank, (name, stage) in enumerate(zip(b.devices, b.stages, strict=True)):
            layers = f"layers {stage[0]}-{stage[1] - 1}"
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
    by_speed = sorted(devices, key=lambda d: d.forward_seconds((0, model.num_layers)) + d.side_train_seconds)
    by_mode: dict[str, Prediction] = {}
    with_all: dict[str, Prediction] = {}
    for mode in modes:
        for k in range(1, len(by_speed) + 1):
            candidate = best_for(mode, by_speed[:k], model, work, compressions)
            if candidate is None:
                continue
            if k == len(by_speed):
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
            if everyone is None:
                left_out[d.name] = f"no {best.mode} plan with every device fits in memory"
            else:
                left_out[d.name] = (
                    f"with every device the run takes {everyone.total_seconds:.1f} s, without it "
                    f"{best.total_seconds:.1f} s"
                )
    return PlanChoice(best, by_mode, left_out, limit_seconds(devices, model, work))


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
    if len(devices) > num_layers:
        return None
    orders = itertools.permutations(devices) if len(devices) <= ALL_ORDERS_UP_TO else [tuple(devices)]
    best: Prediction | None = None
    for order in orders:
        stages = split_layers(mode, order, model, work)
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
    phase 2, each with every allowed gradient compression: whichever predicts the least time."""
    candidates: list[tuple[int, ...] | None] = [None]
    if mode != "side-pipeline" and len(devices) > 1:
        whole = (0, model.num_layers)
        for seconds in ([d.forward_seconds(whole) for d in devices], [d.side_train_seconds for d in devices]):
            candidates.append(whole_shares([1 / max(s, 1e-12) for s in seconds]))
    # Compression changes nothing alone or in side-pipeline mode (no gradient all-reduce there).
    ways = dict.fromkeys(compressions) if mode != "side-pipeline" and len(devices) > 1 else {"none": None}
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


def split_layers(mode: str, devices: Sequence[DeviceProfile], model: ModelCosts, work: Workload) -> list[Stage] | None:
    """Contiguous layer ranges, one per device in this order, with the least pace that fits (None: none fits).
    In side-pipeline mode every stage must produce a tap, since it runs the side blocks of its taps."""
    num_layers, n = model.num_layers, len(devices)
    inf = math.inf
    # best[k][l]: least pace of layers 0..l-1 on devices 0..k-1; cut[k][l]: where device k-1's range starts.
    best = [[inf] * (num_layers + 1) for _ in range(n + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        device = devices[k - 1]
        for end in range(k, num_layers + 1):
            for start in range(k - 1, end):
                if best[k - 1][start] == inf:
                    continue
                stage = (start, end)
                if mode == "side-pipeline" and not stage_taps(stage, work.taps):
                    continue
                if peak_bytes(mode, device, stage, model, work) > device.memory:
                    continue
                pace = max(best[k - 1][start], _stage_pace(mode, k - 1, devices, stage, model, work))
                if pace < best[k][end]:
                    best[k][end], cut[k][end] = pace, start
    if best[n][num_layers] == inf:
        return None
    stages, end = [], num_layers
    for k in range(n, 0, -1):
        start = cut[k][end]
        stages.append((start, end))
        end = start
    return stages[::-1]


def _stage_pace(
    mode: str, k: int, devices: Sequence[DeviceProfile], stage: Stage, model: ModelCosts, work: Workload
) -> float:
    """One stage's seconds per sample in phase 1: its compute, or what its link carries, whichever is slower."""
    device, n = devices[k], len(devices)
    out = model.hidden_bytes / min(device.bandwidth, devices[k + 1].bandwidth) if k < n - 1 else 0.0
    if mode == "shuffle":
        out += len(stage_taps(stage, work.taps)) * model.tap_bytes * (n - 1) / n / device.bandwidth
    return max(device.forward_seconds(stage), out)


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
