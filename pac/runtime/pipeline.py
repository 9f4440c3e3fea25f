"""Phase 1 across peers: the frozen backbone's forward pass, pipelined over stages (`shuffle` mode).

Each peer runs one stage, a contiguous layer range; peers that share a range take turns at its micro-batches (a
stage's data-parallel group, `Plan.processor`). Micro-batches of token ids enter stage 0; every stage sends its
output hidden state to the next stage's member that runs that micro-batch and the taps it produced to the peers
that own those samples (`pac.plan.placement.owner`). Each owner writes what it receives into its own activation
cache, one shard per (group of samples, stage's tap block): the cache format stores tap blocks separately, so an
owner never holds more than a shard of one stage's taps. The owner's cache is the same one `pac train` would
build for its samples, so phase 2 reads it unchanged.

The stage (`_BackboneStage`) runs its micro-batches in the order of pac.plan.schedule's forward-only
schedule. Threads: the stage computes on the calling thread; a receiver thread drains the data plane,
hands hidden states to the compute loop and writes taps into the cache. Draining never waits on
another peer, so the cycle "stage A sends taps to B while B sends taps to A" cannot deadlock;
the planes' high-water marks still bound how far a stage can run ahead of a slow receiver.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pac.cache import CacheSpec, CacheWriter
from pac.cache.writer import FP16_MAX
from pac.data.tokenize import TokenizedSet
from pac.errors import PacError
from pac.models.backbone import load_backbone
from pac.net.dataplane import DataPlane
from pac.plan.placement import Plan, stage_taps
from pac.plan.schedule import FORWARD, forward_only, run
from pac.runtime.cache_build import cache_spec

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (samples done, total)
RECEIVER_THREAD = "pac-data-plane"  # the thread that drains the data plane (pac.runtime.peer waits for it)
WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}  # int8 quantises at the owner


@dataclass
class _OwnedSplit:
    """One split's cache on its owner: which (shard, tap block) pairs are still missing, and their buffers."""

    writer: CacheWriter
    data: TokenizedSet  # the owned samples only
    pending: dict[tuple[int, ...], list[list[str]]]  # tap block -> groups of sample ids still to write
    buffers: dict[tuple[tuple[int, ...], int], dict[str, torch.Tensor]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the compute and receiver threads both deliver

    @property
    def done(self) -> bool:
        return not any(group for groups in self.pending.values() for group in groups)

    def receive(self, block: tuple[int, ...], sample_ids: list[str], taps: torch.Tensor) -> None:
        with self.lock:
            self._receive(block, sample_ids, taps)

    def _receive(self, block: tuple[int, ...], sample_ids: list[str], taps: torch.Tensor) -> None:
        groups = self.pending.get(block, [])
        for sid, sample_taps in zip(sample_ids, taps, strict=True):
            g = next((i for i, group in enumerate(groups) if sid in group), None)
            if g is None:  # already in the cache from an earlier, interrupted run
                continue
            buffer = self.buffers.setdefault((block, g), {})
            buffer[sid] = sample_taps
            if len(buffer) == len(groups[g]):
                self._write(block, groups[g], buffer)
                del self.buffers[(block, g)]
                groups[g] = []  # keep indices stable for the other buffers

    def _write(self, block: tuple[int, ...], group: list[str], buffer: dict[str, torch.Tensor]) -> None:
        row_of = {sid: i for i, sid in enumerate(self.data.sample_ids)}
        rows = torch.tensor([row_of[s] for s in group])
        stacked = torch.stack([buffer[s] for s in group]).float()
        self.writer.write(group, stacked, self.data.attention_mask[rows], self.data.labels[rows], tap_block=block)


def owned_cache(
    model_dir: Path, data: TokenizedSet, plan: Plan, rank: int, taps: list[int], dtype: str
) -> tuple[TokenizedSet, CacheSpec]:
    """What a rank caches: in `shuffle` and `replicated` mode every tap of the samples it owns (the cache
    `pac train` would build for them), in `side-pipeline` mode its own layers' taps of every sample."""
    if plan.mode == "side-pipeline":
        return data, cache_spec(model_dir, data, stage_taps(plan.stages[rank], taps), dtype)
    mine = data.subset(plan.owned_positions(len(data), rank))
    return mine, cache_spec(model_dir, mine, taps, dtype)


@dataclass(frozen=True)
class _Micro:
    """One micro-batch of phase 1: a run of consecutive rows of one split."""

    split: str
    number: int  # within its split
    positions: list[int]


def run_pipeline_stage(
    plane: DataPlane,
    plan: Plan,
    rank: int,
    model_dir: Path,
    splits: dict[str, TokenizedSet],
    taps: list[int],
    cache_root: Path,
    dtype: str = "fp16",
    micro_batch: int = 8,
    shard_size: int = 32,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> PhaseOne:
    """Run this rank's stage over every micro-batch some owner still lacks, and build this rank's caches. The
    ranks agree on what is missing through the process group: a rerun over complete caches forwards nothing,
    and one shard lost forwards only its micro-batches."""
    my_taps = stage_taps(plan.stages[rank], taps)
    local = plan.mode == "side-pipeline"  # taps stay where they were computed
    blocks = [tuple(my_taps)] if local else [tuple(stage_taps(s, taps)) for s, _ in plan.groups]
    owned: dict[str, _OwnedSplit] = {}
    for name, data in splits.items():
        mine, spec = owned_cache(model_dir, data, plan, rank, taps, dtype)
        writer = CacheWriter(cache_root, spec, mine.sample_ids, shard_size, mine.sample_digests())
        writer.adopt()  # what this rank cached before its share changed (a re-plan) is kept
        owned[name] = _OwnedSplit(writer, mine, {b: writer.pending(b) for b in blocks if b})
    lacking = _lacking_anywhere(owned, splits)
    # Only the samples some owner lacks go through the backbone: after a re-plan, the lost peer's share.
    micros = [
        _Micro(name, number, positions)
        for name in splits
        for number, positions in enumerate(micro_batches(sorted(lacking[name]), micro_batch))
    ]
    if micros:
        group = _group_of(plan, rank)
        schedule = forward_only(len(plan.groups), len(micros))[group]
        actions = [a for a in schedule if plan.processor(group, a.micro) == rank]
        receiver = _Receiver(plane, owned, expected_messages(plan, rank, [m.positions for m in micros], taps), stop)
        mine = sum(len(micros[a.micro].positions) for a in actions if a.op == FORWARD)
        stage = _BackboneStage(
            plane, plan, rank, model_dir, splits, micros, my_taps, dtype, owned, receiver, (progress, mine), stop
        )
        with torch.inference_mode():
            run(actions, stage)
        del stage
        receiver.finish()
    forwarded = sum(len(m.positions) for m in micros)
    log.info("phase 1: %d of %d samples forwarded (the rest were cached)", forwarded, sum(map(len, splits.values())))
    return PhaseOne({name: o.writer.finalize() for name, o in owned.items()}, forwarded)


@dataclass(frozen=True)
class PhaseOne:
    caches: dict[str, Path]  # split -> this rank's cache
    forwarded_samples: int  # samples that went through the backbone (0 when every cache was complete)


def micro_batches(positions: list[int], micro_batch: int) -> list[list[int]]:
    """`positions` of a split, micro-batch by micro-batch."""
    return [positions[start : start + micro_batch] for start in range(0, len(positions), micro_batch)]


def _lacking_anywhere(owned: dict[str, _OwnedSplit], splits: dict[str, TokenizedSet]) -> dict[str, set[int]]:
    """Split -> positions of the samples whose owner still lacks some of their taps, on any rank."""
    mine = {}
    for name, split in owned.items():
        position = {sid: i for i, sid in enumerate(splits[name].sample_ids)}
        missing = {sid for groups in split.pending.values() for group in groups for sid in group}
        mine[name] = sorted(position[sid] for sid in missing)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {name: {p for theirs in everyone for p in theirs[name]} for name in splits}


class _Receiver:
    """A thread that drains the data plane: hidden states to the compute loop, taps into the owner's caches.

    It takes exactly the expected messages, so that no sender is left waiting (torch send/recv pair up)."""

    def __init__(
        self, plane: DataPlane, owned: dict[str, _OwnedSplit], expected: dict[str, int], stop: threading.Event | None
    ):
        self.plane, self.owned, self.expected, self.stop = plane, owned, expected, stop
        self.hidden: queue.Queue = queue.Queue()
        self.early: dict[tuple[str, int], tuple[dict, torch.Tensor]] = {}  # arrived before their turn
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._receive, name=RECEIVER_THREAD, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        counts = {"hidden": 0, "taps": 0}
        try:
            while counts != self.expected:
                if self.stop is not None and self.stop.is_set():
                    return
                try:
                    header, tensors = self.plane.recv(timeout=0.2)
                except TimeoutError:
                    continue
                kind = header.get("kind")
                if kind not in counts:
                    raise PacError(f"unexpected data-plane message {kind!r} from rank {header.get('src')}")
                counts[kind] += 1
                if kind == "hidden":
                    self.hidden.put((header, tensors["hidden"]))
                else:
                    self.owned[header["split"]].receive(tuple(header["block"]), header["sample_ids"], tensors["taps"])
        except BaseException as exc:  # surfaced on the compute thread
            self.failure.append(exc)
            self.hidden.put(None)

    def hidden_for(self, split: str, batch: int) -> tuple[dict, torch.Tensor]:
        """The hidden state of micro-batch `batch` of `split`. Members of the previous stage's group send
        in their own order, so one that arrives before its turn waits here."""
        while (split, batch) not in self.early:
            try:
                item = self.hidden.get(timeout=0.2)
            except queue.Empty:
                _check_stop(self.stop)
                continue
            if item is None:
                raise self.failure[0]
            header = item[0]
            self.early[(header["split"], header["batch"])] = item
        return self.early.pop((split, batch))

    def finish(self) -> None:
        """Wait until every expected message has arrived (the taps other stages send this rank's samples)."""
        while self.thread.is_alive():
            self.thread.join(timeout=0.2)
            _check_stop(self.stop)
        if self.failure:
            raise self.failure[0]


class _BackboneStage:
    """This rank's layers of the frozen backbone, run micro-batch by micro-batch (a pac.plan.schedule.ForwardStage):
    hidden states come from the previous stage and go to the next, taps go to their samples' owners."""

    def __init__(
        self,
        plane: DataPlane,
        plan: Plan,
        rank: int,
        model_dir: Path,
        splits: dict[str, TokenizedSet],
        micros: list[_Micro],
        my_taps: list[int],
        dtype: str,
        owned: dict[str, _OwnedSplit],
        receiver: _Receiver,
        progress: tuple[Progress | None, int],  # the callback, and how many samples this rank forwards
        stop: threading.Event | None,
    ):
        self.plane, self.plan, self.rank, self.splits, self.my_taps = plane, plan, rank, splits, my_taps
        self.micros = micros
        self.owned, self.receiver, self.stop = owned, receiver, stop
        self.stage = plan.stages[rank]
        self.group = _group_of(plan, rank)
        self.wire = WIRE_DTYPES[dtype]
        self.backbone = load_backbone(model_dir, *self.stage, with_head=False)
        (self.progress, self.total), self.done = progress, 0
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def recv_forward(self, m: int) -> None:
        micro = self.micros[m]
        self.inputs[m] = self.receiver.hidden_for(micro.split, micro.number)[1]

    def forward(self, m: int) -> None:
        _check_stop(self.stop)
        micro = self.micros[m]
        data = self.splits[micro.split]
        inputs = data.input_ids[micro.positions] if self.stage[0] == 0 else self.inputs.pop(m)
        out = self.backbone(inputs, data.attention_mask[micro.positions], taps=self.my_taps)
        if self.group < len(self.plan.groups) - 1:
            self.outputs[m] = out.hidden
        if self.my_taps:
            stacked = _on_the_wire(torch.stack([out.taps[t] for t in self.my_taps], 1), self.wire, self.my_taps)
            local = self.plan.mode == "side-pipeline"
            owners = [self.rank] * len(micro.positions) if local else [self.plan.owner(p) for p in micro.positions]
            _send_taps(
                self.plane,
                self.rank,
                owners,
                micro.split,
                data,
                micro.positions,
                tuple(self.my_taps),
                stacked,
                self.owned,
            )
        self.done += len(micro.positions)
        if self.progress is not None:
            self.progress(self.done, self.total)

    def send_forward(self, m: int) -> None:
        micro = self.micros[m]
        header = {"kind": "hidden", "split": micro.split, "batch": micro.number}
        self.plane.send(self.plan.processor(self.group + 1, m), header, {"hidden": self.outputs.pop(m)})


def _on_the_wire(taps: torch.Tensor, wire: torch.dtype, layers: list[int]) -> torch.Tensor:
    """The taps in the wire's dtype; fp16 cannot carry what some models' activations reach."""
    if wire is torch.float16 and (peak := float(taps.abs().max())) > FP16_MAX:
        raise PacError(
            f"activations of layers {layers[0]}-{layers[-1]} reach {peak:.0f}, beyond fp16: "
            "run again with --cache-dtype bf16"
        )
    return taps.to(wire)


def _group_of(plan: Plan, rank: int) -> int:
    return next(g for g, (_, ranks) in enumerate(plan.groups) if rank in ranks)


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise PacError("phase 1 stopped: the run was cancelled")


def expected_messages(plan: Plan, rank: int, micros: list[list[int]], taps: list[int]) -> dict[str, int]:
    """How many hidden-state and taps messages `rank` receives in phase 1 (the senders' loop, counted), for the
    micro-batches (positions within their split) that run, numbered in order."""
    group = _group_of(plan, rank)
    hidden = taps_msgs = 0
    producing = [g for g, (stage, _) in enumerate(plan.groups) if stage_taps(stage, taps)]
    if plan.mode == "side-pipeline":  # taps stay where they were computed
        producing = []
    for m, positions in enumerate(micros):
        hidden += group > 0 and plan.processor(group, m) == rank
        if any(plan.owner(p) == rank for p in positions):
            taps_msgs += sum(plan.processor(g, m) != rank for g in producing)
    return {"hidden": hidden, "taps": taps_msgs}


def _send_taps(
    plane: DataPlane,
    rank: int,
    owners: list[int],
    split: str,
    data: TokenizedSet,
    positions: list[int],
    block: tuple[int, ...],
    taps: torch.Tensor,
    owned: dict[str, _OwnedSplit],
) -> None:
    """Each sample's taps go to its owner; this rank's own samples go straight into its cache."""
    for dest in sorted(set(owners)):
        rows = [i for i, o in enumerate(owners) if o == dest]
        ids = [data.sample_ids[positions[i]] for i in rows]
        part = taps[rows]
        if dest == rank:
            owned[split].receive(block, ids, part)
        else:
            header = {"kind": "taps", "split": split, "block": list(block), "sample_ids": ids}
            plane.send(dest, header, {"taps": part})
