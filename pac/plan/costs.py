"""Predicted time, memory and traffic of a run on given devices: pure functions over measured profiles.

A device's profile (measured by pac.runtime.profiler on the device itself) gives the seconds one sample takes
through each backbone layer, through a phase-2 training step of the side network and through its evaluation,
the memory the run may use there, and its link (bandwidth, round-trip time to the home's switch). The model's
costs (bytes of each layer's weights, of a hidden state and of a tap, of the side network) come from its config.
From those, `predict` gives each phase's time, every device's peak memory and the bytes each device sends, for
one placement mode and one assignment of layer ranges to devices (docs/architecture.md, "Planning").

What the prediction follows is what the runtime does (pac.runtime.collaborative):
* phase 1 pipelined (shuffle, side-pipeline): a sample passes the stages in turn (a stage's group, shuffle only:
  its members take turns and share the pace of the slowest); the slowest stage, by compute
  or by what its link must carry per sample, sets the pace; the first micro-batch fills the pipeline.
* phase 1 replicated: every device runs every layer on its round-robin share of the samples.
* phase 2 data-parallel (shuffle, replicated): every step, each device computes its round-robin share of the
  batch, then a ring all-reduce of the gradients (2 (n-1)/n of their bytes over each link) ends it; a gradient
  compression (torch's DDP hook: fp16) halves those bytes (`gradient_wire_bytes`).
* phase 2 side-pipeline: a step's micro-batches pass the stages' side blocks (GPipe: micro-batches + stages - 1
  slots of the slowest stage), the last stage also running the read-out and its loss; only side states and their
  gradients cross the links.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pac.plan.placement import Stage, stage_groups, stage_taps


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory: int  # bytes the run may use on this device (the hosts file's max_mem, or what it has)
    layer_seconds: tuple[float, ...]  # one sample's forward through each backbone layer (embeddings in layer 0)
    side_train_seconds: float  # one sample's share of a phase-2 training step over every tap
    side_eval_seconds: float  # one sample's phase-2 evaluation over every tap
    bandwidth: float = 12.5e6  # bytes per second of its link (100 Mbit/s)
    rtt: float = 0.001  # seconds, to the coordinator
    layer_load_seconds: tuple[float, ...] = ()  # reading each layer's weights from disk (empty: not measured)
    build_seconds: float = 0.0  # building the method's model for phase 2 (its frozen head, its side network)
    # Per training sample owned, before data-parallel phase 2's first epoch: the method's digest of its cache
    # (language modelling: each position's shortlist, pac.models.shortlist), and one sample's share of a step
    # on the digest, which the data-parallel modes train on (0: the method digests nothing). A side pipeline's
    # stages read the cache as it is (side_train_seconds).
    digest_seconds: float = 0.0
    digested_train_seconds: float = 0.0
    # Runs its layers in phase 1 and trains nothing (`pac peer --phase1-only`: a phone): it owns no samples, so only
    # shuffle mode uses it, and its phase-2 figures above are not measured.
    phase1_only: bool = False

    @property
    def data_parallel_train_seconds(self) -> float:
        return self.digested_train_seconds or self.side_train_seconds

    # Phase 1's time per sample at other micro-batch sizes, relative to layer_seconds' (measured at the run's
    # batch size): ((16, 0.93),) says micro-batches of 16 take 7% less per sample. Empty: not measured.
    micro_batch_factors: tuple[tuple[int, float], ...] = ()

    def forward_seconds(self, stage: Stage, micro_batch: int | None = None) -> float:
        """One sample's forward through `stage`, in micro-batches of `micro_batch` (None: as profiled)."""
        factor = dict(self.micro_batch_factors).get(micro_batch, 1.0) if micro_batch is not None else 1.0
        return factor * sum(self.layer_seconds[stage[0] : stage[1]])

    def load_seconds(self, stage: Stage) -> float:
        return sum(self.layer_load_seconds[stage[0] : stage[1]])


@dataclass(frozen=True)
class ModelCosts:
    layer_weight_bytes: tuple[int, ...]  # each backbone layer (embeddings in layer 0)
    head_bytes: int  # final norm and output head: the side model keeps them for its loss
    layer_activation_bytes: int  # one sample's working memory in one layer's forward
    hidden_bytes: int  # one sample's hidden state between stages (float32 on the wire)
    tap_bytes: int  # one sample's one tap in the cache's dtype
    side_state_bytes: int  # one sample's side state between side-pipeline stages (float32)
    side_param_bytes: int  # trainable parameters (float32)
    side_sample_bytes: int  # one sample's working memory in a phase-2 step (its taps, activations)
    runtime_bytes: int  # the process itself: interpreter, torch, tokenizer
    # Of a phase-2 step's work, the share in the side blocks, which side-pipeline stages split by their taps; the
    # rest (the read-out and its loss: for language modelling, the products with the whole vocabulary) runs on
    # the last stage. Measured by FLOPs (pac.runtime.profiler).
    side_blocks_share: float = 1.0

    @property
    def num_layers(self) -> int:
        return len(self.layer_weight_bytes)


# Samples per forward of phase 1 where nothing plans it (`pac train`, a mode given by hand): 16 runs 4-8% faster
# than 8 with the same cache (benchmarks/results/phase1_speed.md). The planner weighs each size a device has
# measured (`DeviceProfile.micro_batch_factors`) against a pipeline's fill, which grows with it.
CACHE_MICRO_BATCH = 16


@dataclass(frozen=True)
class Workload:
    train: int  # training samples
    val: int  # validation samples
    epochs: int
    batch: int  # samples per step
    taps: tuple[int, ...]  # the layers whose outputs the side network reads
    micro_batch: int = 8  # phase 1's samples per forward
    micro_batches: int = 2  # side-pipeline: micro-batches per step


@dataclass(frozen=True)
class Prediction:
    mode: str
    devices: tuple[str, ...]  # rank order
    stages: tuple[Stage, ...]  # per rank
    phase1_seconds: float
    epoch_seconds: float
    epochs: int
    peak_bytes: dict[str, int]
    sent_bytes: dict[str, int]  # what each device sends over its link in the whole run
    shortfall: dict[str, int] = field(default_factory=dict)  # bytes a device lacks; empty: it fits
    shares: tuple[int, ...] | None = None  # samples each device owns (pac.plan.placement.Plan.shares)
    # Phase 2's one-off costs: the slowest device's model build, the starting weights' broadcast, the digest of
    # the cache (data-parallel) or the adapter's gathering from the stages (side-pipeline).
    build_seconds: float = 0.0
    compression: str = "none"  # data-parallel phase 2's gradients on the wire (`gradient_wire_bytes`)
    micro_batch: int = 8  # phase 1's samples per forward

    @property
    def phase2_seconds(self) -> float:
        return self.build_seconds + self.epochs * self.epoch_seconds

    @property
    def total_seconds(self) -> float:
        return self.phase1_seconds + self.phase2_seconds

    @property
    def fits(self) -> bool:
        return not self.shortfall


def predict(
    mode: str,
    devices: Sequence[DeviceProfile],
    stages: Sequence[Stage],
    model: ModelCosts,
    work: Workload,
    shares: Sequence[int] | None = None,
    compression: str = "none",
) -> Prediction:
    """One placement's time, memory and traffic. `stages[k]` is the layer range of `devices[k]` (every device
    holds every layer in `replicated` mode); `shares` are the samples each owns (None: equal); `compression` is
    how data-parallel phase 2 sends its gradients."""
    n = len(devices)
    samples = work.train + work.val
    owned = [s / sum(shares) for s in shares] if shares is not None else [1 / n] * n
    # Phase 2 runs on the devices that own samples; a phase-1-only one has left by then.
    trainers = [(d, f) for d, f in zip(devices, owned, strict=True) if f > 0]
    sent = dict.fromkeys((d.name for d in devices), 0.0)
    if mode == "replicated":
        whole = (0, model.num_layers)
        phase1 = max(
            math.ceil(samples * f) * d.forward_seconds(whole, work.micro_batch)
            for d, f in zip(devices, owned, strict=True)
        )
    else:
        phase1 = _pipeline_phase_one(mode, devices, stages, model, work, sent, owned)
    # One-off: every device first reads its layers, and builds the method's model before phase 2.
    phase1 += max(d.load_seconds(s) for d, s in zip(devices, stages, strict=True))
    training = [d for d, _ in trainers]
    build = max(d.build_seconds for d in training) + _weight_sync_seconds(mode, training, model, sent)
    if mode != "side-pipeline":  # each device digests the training samples it owns
        build += max(math.ceil(work.train * f) * d.digest_seconds for d, f in trainers)
    if mode == "side-pipeline":
        epoch = _side_pipeline_epoch(devices, stages, model, work, sent)
    else:
        epoch = _data_parallel_epoch(trainers, model, work, sent, compression)
    peak = {d.name: peak_bytes(mode, d, stage, model, work) for d, stage in zip(devices, stages, strict=True)}
    return Prediction(
        mode,
        tuple(d.name for d in devices),
        tuple(stages),
        phase1,
        epoch,
        work.epochs,
        peak,
        {name: int(b) for name, b in sent.items()},
        {d.name: peak[d.name] - d.memory for d in devices if peak[d.name] > d.memory},
        tuple(shares) if shares is not None else None,
        build,
        compression if mode != "side-pipeline" else "none",
        work.micro_batch,
    )


def _weight_sync_seconds(
    mode: str, devices: Sequence[DeviceProfile], model: ModelCosts, sent: dict[str, float]
) -> float:
    """Phase 2's one-off traffic: rank 0's starting weights sent to each other rank in turn, and in side-pipeline
    mode the stages' trained parts summed into the adapter at the end (a ring all-reduce)."""
    n = len(devices)
    if n == 1:
        return 0.0
    slowest = min(d.bandwidth for d in devices)
    sent[devices[0].name] += (n - 1) * model.side_param_bytes
    seconds = sum(_link_seconds(model.side_param_bytes, devices[0], d) for d in devices[1:])
    seconds += max(d.rtt for d in devices)
    if mode == "side-pipeline":
        ring = 2 * (n - 1) / n * model.side_param_bytes
        for d in devices:
            sent[d.name] += ring
        seconds += ring / slowest + 2 * (n - 1) * max(d.rtt for d in devices)
    return seconds


def _link_seconds(nbytes: float, sender: DeviceProfile, receiver: DeviceProfile) -> float:
    """Through the home's switch: the slower of the two links carries it."""
    return nbytes / min(sender.bandwidth, receiver.bandwidth)


def _pipeline_phase_one(
    mode: str,
    devices: Sequence[DeviceProfile],
    stages: Sequence[Stage],
    model: ModelCosts,
    work: Workload,
    sent: dict[str, float],
    owned: Sequence[float],
) -> float:
    samples = work.train + work.val
    groups = stage_groups(stages)
    paces, fills = [], []
    for g, (stage, ranks) in enumerate(groups):
        receivers = groups[g + 1][1] if g < len(groups) - 1 else ()
        out = model.hidden_bytes if receivers else 0
        taps = len(stage_taps(stage, work.taps)) * model.tap_bytes
        member_paces = []
        for k in ranks:
            device = devices[k]
            link = max(_link_seconds(out, device, devices[j]) for j in receivers) if out else 0.0
            # shuffle: each sample's taps go to its owner, another device unless this one owns it.
            away = taps * (1 - owned[k]) if mode == "shuffle" else 0.0
            link += away / device.bandwidth
            sent[device.name] += samples / len(ranks) * (out + away)
            member_paces.append(max(device.forward_seconds(stage, work.micro_batch), link))
        # A group's members take turns micro-batch by micro-batch: it goes at its slowest member's pace, shared.
        paces.append(max(member_paces) / len(ranks))
        fills.append(max(devices[k].forward_seconds(stage, work.micro_batch) for k in ranks))
    fill = sum(fills) * work.micro_batch + sum(d.rtt for d in devices)
    return samples * max(paces) + fill


# torch's DDP communication hooks, by name. Its bf16 hook needs NCCL (pac's groups are gloo); its PowerSGD hook
# hung at its first compressed step over gloo once the gradients filled two buckets (benchmarks/results/end_to_end.md).
GRADIENT_BYTES = {"none": 4, "fp16": 2}  # per float32 gradient value on the wire
GRADIENT_COMPRESSIONS = tuple(GRADIENT_BYTES)


def gradient_wire_bytes(model: ModelCosts, compression: str) -> float:
    """Bytes of one step's gradient all-reduce input under a compression."""
    return model.side_param_bytes * GRADIENT_BYTES[compression] / 4


def _data_parallel_epoch(
    pairs: Sequence[tuple[DeviceProfile, float]],
    model: ModelCosts,
    work: Workload,
    sent: dict[str, float],
    compression: str,
) -> float:
    """The training devices, each with the fraction of the samples it owns."""
    devices = [d for d, _ in pairs]
    n = len(devices)
    steps = math.ceil(work.train / work.batch)
    # Owners interleave through the data: every device computes its share of every batch.
    compute = max(math.ceil(work.batch * f) * d.data_parallel_train_seconds for d, f in pairs)
    ring = 2 * (n - 1) / n * gradient_wire_bytes(model, compression) if n > 1 else 0.0
    slowest = min(d.bandwidth for d in devices)
    reduce = ring / slowest + 2 * (n - 1) * max(d.rtt for d in devices) if n > 1 else 0.0
    for d in devices:
        sent[d.name] += work.epochs * steps * ring
    evaluation = max(math.ceil(work.val * f) * d.side_eval_seconds for d, f in pairs)
    return steps * (compute + reduce) + evaluation


def _side_pipeline_epoch(
    devices: Sequence[DeviceProfile],
    stages: Sequence[Stage],
    model: ModelCosts,
    work: Workload,
    sent: dict[str, float],
) -> float:
    n = len(devices)
    blocks = max(1, len(work.taps) - 1)
    steps = math.ceil(work.train / work.batch)
    micro = math.ceil(work.batch / work.micro_batches)
    train_slots, eval_slots = [], []
    for k, (device, stage) in enumerate(zip(devices, stages, strict=True)):
        taps = len(stage_taps(stage, work.taps))
        own_blocks = (taps - 1 if k == 0 else taps) / blocks  # block j reads tap j + 1: tap 0 has none
        share = model.side_blocks_share * own_blocks + (1 - model.side_blocks_share) * (k == n - 1)
        state = model.side_state_bytes * micro
        forward = _link_seconds(state, device, devices[k + 1]) if k < n - 1 else 0.0
        backward = _link_seconds(state, device, devices[k - 1]) if k > 0 else 0.0
        sent[device.name] += work.epochs * steps * work.micro_batches * state * ((k < n - 1) + (k > 0))
        train_slots.append(micro * share * device.side_train_seconds + forward + backward)
        eval_send = _link_seconds(model.side_state_bytes, device, devices[k + 1]) if k < n - 1 else 0.0
        eval_slots.append(share * device.side_eval_seconds + eval_send)
        sent[device.name] += work.epochs * work.val * model.side_state_bytes * (k < n - 1)
    step = (work.micro_batches + n - 1) * max(train_slots)
    evaluation = work.val * max(eval_slots) + sum(d.rtt for d in devices)
    return steps * step + evaluation


def limit_seconds(devices: Sequence[DeviceProfile], model: ModelCosts, work: Workload) -> float:
    """The floor no placement beats: one backbone forward over the data and the side epochs, each spread over
    every device at its measured speed with nothing sent, loaded or built (issue 21's "limit")."""
    whole = (0, model.num_layers)

    def spread(samples: int, seconds: Sequence[float]) -> float:
        return samples / sum(1 / max(s, 1e-12) for s in seconds)

    fastest = [min(d.forward_seconds(whole, m) for m in (None, *dict(d.micro_batch_factors))) for d in devices]
    forward = spread(work.train + work.val, fastest)
    training = [d for d in devices if not d.phase1_only]
    epoch = spread(work.train, [min(d.side_train_seconds, d.data_parallel_train_seconds) for d in training])
    epoch += spread(work.val, [d.side_eval_seconds for d in training])
    return forward + work.epochs * epoch


def peak_bytes(mode: str, device: DeviceProfile, stage: Stage, model: ModelCosts, work: Workload) -> int:
    """The larger of phase 1 (the stage's weights and a micro-batch's activations) and phase 2 (the side model
    with its gradients and AdamW's two moments, the head it reads out through, a batch's taps and activations;
    nothing on a phase-1-only device)."""
    layers = (0, model.num_layers) if mode == "replicated" else stage
    weights = sum(model.layer_weight_bytes[layers[0] : layers[1]])
    phase1 = weights + work.micro_batch * model.layer_activation_bytes
    phase2 = 4 * model.side_param_bytes + model.head_bytes + work.batch * model.side_sample_bytes
    if device.phase1_only:
        phase2 = 0
    return model.runtime_bytes + max(phase1, phase2)
