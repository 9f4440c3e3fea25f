"""What one peer computes for its assignment: phase 1 (its part of the cache), then phase 2 (its shard of
every global batch), then, on rank 0, the adapter. The agent (`pac.runtime.peer`) runs this on a worker
thread and relays its progress; the coordinator (`pac.runtime.coordinator`) hands out assignments.

Placement modes (docs/architecture.md, "Placement modes"):
  shuffle     phase 1 is a pipeline over the peers' layer ranges; each stage streams a sample's taps
              to the peer that trains that sample (pac.runtime.pipeline).
  replicated  every peer holds the whole backbone and caches its own samples; no phase-1 traffic.
  side-pipeline  phase 1 as in shuffle, but taps stay where they were computed; phase 2 runs the side
              network itself as a pipeline (pac.runtime.side_pipeline).
  pipeline    no phase 1: the model itself runs as a forward-only pipeline over the peers' layer ranges, for
              methods that train without backward (zeroth-order, pac.runtime.zo_pipeline).
In shuffle and replicated mode every peer ends phase 1 holding the complete taps of the samples it
owns, so phase 2 is data-parallel training (pac.runtime.distributed). A shuffle rank that owns no samples (share
0: `pac peer --phase1-only`) leaves after phase 1, and the others train in a process group of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pac.cache import CacheReader
from pac.cache.fingerprint import model_fingerprint
from pac.data.tokenize import TokenizedSet
from pac.errors import PacError
from pac.methods.registry import BuildContext, Method, get_method
from pac.models.loading import cache_root, resolve_model
from pac.net.collective import PlaneCollectives
from pac.net.dataplane import DataPlane, TorchDataPlane
from pac.plan.costs import CACHE_MICRO_BATCH
from pac.plan.placement import PIPELINE, Inheritance, Plan
from pac.runconfig import TrainOptions, run_config_from_wire, run_config_to_wire
from pac.runtime.cache_build import build_cache
from pac.runtime.device import cpu_only, move, on_device, resolve_device
from pac.runtime.distributed import DataParallelTrainer, ShardedSource, init_process_group
from pac.runtime.heap import peak_rss_mb
from pac.runtime.pipeline import PhaseOne, run_pipeline_stage
from pac.runtime.prepare import PreparedData, adapter_meta_of, run_identity, train_config
from pac.runtime.progress import Stopwatch
from pac.runtime.run_dir import claim, run_fingerprint
from pac.runtime.side_pipeline import SidePipelineTrainer
from pac.runtime.sources import CachedTaps, Tokens
from pac.runtime.storage import disk_full_message, is_disk_full
from pac.runtime.trainer import Trainer

log = logging.getLogger(__name__)
# How long a peer waits for an earlier process of the same run to leave its run directory: a peer whose
# coordinator vanished notices within its coordinator timeout (60 s by default) and then stops.
RUN_DIRECTORY_WAIT_S = 120.0

# (phase, done, total, metrics): metrics are a training step's loss, or (phase "epoch") the epoch's record
Progress = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class Assignment:
    rank: int
    plan: Plan
    taps: list[int]
    options: TrainOptions  # defaults already filled in by the coordinator
    model_fingerprint: str
    store: tuple[str, int]  # the coordinator's TCPStore: rendezvous of the process group
    backend: str = "gloo"
    data_plane: str = "zmq"  # zmq | torch
    data_endpoints: dict[int, str] | None = None  # rank -> ZeroMQ data endpoint
    data_keys: dict[int, bytes] | None = None  # rank -> CURVE public key of that endpoint
    threads: int | None = None  # the hosts file's threads= for this peer
    grad_compression: str = "none"  # data-parallel phase 2 (pac.plan.costs.GRADIENT_COMPRESSIONS)
    # Data-parallel phase 2's all-reduces (gradients, losses, starting weights) over the encrypted data plane.
    encrypted_gradients: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "mode": self.plan.mode,
            "stages": [list(s) for s in self.plan.stages],
            "schedule": self.plan.schedule,
            "micro_batches": self.plan.micro_batches,
            "shares": list(self.plan.shares) if self.plan.shares is not None else None,
            "phase1_micro_batch": self.plan.phase1_micro_batch,
            "inherited": self.plan.inherited.to_wire() if self.plan.inherited is not None else None,
            "taps": self.taps,
            "run": run_config_to_wire(self.options),
            "model_fingerprint": self.model_fingerprint,
            "store": list(self.store),
            "backend": self.backend,
            "data_plane": self.data_plane,
            "data_endpoints": {str(k): v for k, v in (self.data_endpoints or {}).items()},
            "data_keys": {str(k): v for k, v in (self.data_keys or {}).items()},
            "threads": self.threads,
            "grad_compression": self.grad_compression,
            "encrypted_gradients": self.encrypted_gradients,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Assignment:
        try:
            return cls(
                rank=int(raw["rank"]),
                plan=Plan(
                    str(raw["mode"]),
                    tuple((int(a), int(b)) for a, b in raw["stages"]),
                    str(raw["schedule"]),
                    int(raw["micro_batches"]),
                    None if raw["shares"] is None else tuple(int(s) for s in raw["shares"]),
                    None if raw["phase1_micro_batch"] is None else int(raw["phase1_micro_batch"]),
                    Inheritance.from_wire(raw["inherited"]),
                ),
                taps=[int(t) for t in raw["taps"]],
                options=run_config_from_wire(raw["run"]),
                model_fingerprint=str(raw["model_fingerprint"]),
                store=(str(raw["store"][0]), int(raw["store"][1])),
                backend=str(raw["backend"]),
                data_plane=str(raw["data_plane"]),
                data_endpoints={int(k): str(v) for k, v in raw["data_endpoints"].items()},
                data_keys={int(k): bytes(v) for k, v in raw["data_keys"].items()},
                threads=None if raw.get("threads") is None else int(raw["threads"]),
                grad_compression=str(raw["grad_compression"]),
                encrypted_gradients=bool(raw["encrypted_gradients"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PacError(f"malformed assignment from the coordinator ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def run_directory(
    job: Assignment,
    splits: dict[str, TokenizedSet],
    label_names: list[str] | None,
    root: Path,
    wait: float = RUN_DIRECTORY_WAIT_S,
) -> Iterator[Path]:
    """Where this peer keeps a run's checkpoints and adapter, held for the assignment: a directory under `root`
    per run identity (model, data, method and options), so an agent serving run after run resumes only the run
    that wrote a checkpoint. Data-parallel checkpoints are the same on every rank and the global batches do not
    depend on the ranks, so in those modes a run resumed on other peers or another plan finds its own; a
    side-pipeline or pipeline stage's checkpoint holds its part, so there the identity includes the stages and the
    rank.
    A peer process of the same run still working there (its coordinator gone, it has not noticed yet) is
    waited for, up to `wait` seconds: two trainers never write one directory."""
    prepared = PreparedData(resolve_model(job.options.model), None, splits["train"], splits["val"], label_names)
    identity = run_identity(job.options, prepared)
    if job.plan.mode in ("side-pipeline", PIPELINE):
        identity["placement"] = {"stages": [list(s) for s in job.plan.stages], "rank": job.rank}
    path = root / run_fingerprint(identity)[:16]
    claim(path, identity, overwrite=job.options.overwrite)
    with (path / ".lock").open("a+") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PacError(
                        f"{path} is still in use by another process of this run on this device after {wait:.0f} s: "
                        "stop it (an earlier `pac peer` of this run), then resume"
                    ) from None
                log.info("waiting for an earlier process of this run to leave %s", path)
                time.sleep(1.0)
        yield path


class Laps:
    """Where a peer's assignment spent its time, step by step, for summary.json (and the cost model's check)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._watch = Stopwatch()

    def lap(self, step: str) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + self._watch.lap()


def run_assignment(
    job: Assignment,
    splits: dict[str, TokenizedSet],
    label_names: list[str] | None,
    out: Path,
    zmq_plane: DataPlane | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Phase 1 and phase 2 of this peer; rank 0 also writes the adapter into `out`. Returns a summary.
    `device`: where data-parallel phase 2 computes (pac.runtime.device); everything else runs on the CPU."""
    opts, plan, rank = job.options, job.plan, job.rank
    model_dir = resolve_model(opts.model)
    if model_fingerprint(model_dir) != job.model_fingerprint:
        raise PacError(
            f"this device's copy of {opts.model or 'the bundled model'} ({model_dir}) differs from the "
            "coordinator's (fingerprint mismatch): give every device the same model files"
        )
    laps = Laps()
    init_process_group(job.backend, *job.store, rank=rank, world=plan.world)
    laps.lap("process group")
    try:
        return _both_phases(job, model_dir, splits, label_names, out, zmq_plane, progress, stop, laps, device)
    except Exception as exc:
        if is_disk_full(exc):
            prepared = PreparedData(model_dir, None, splits["train"], splits["val"], label_names)
            again = "resume the run (`pac-launch --resume` with its --out)"
            raise PacError(disk_full_message(exc, opts, prepared, out, again)) from exc
        raise
    finally:
        dist.destroy_process_group()


def _both_phases(
    job: Assignment,
    model_dir: Path,
    splits: dict[str, TokenizedSet],
    label_names: list[str] | None,
    out: Path,
    zmq_plane: DataPlane | None,
    progress: Progress | None,
    stop: threading.Event | None,
    laps: Laps,
    device: str,
) -> dict[str, Any]:
    """run_assignment's work, inside the run's process group."""
    plane = _data_plane(job, zmq_plane)
    built = _phase_one(job, model_dir, splits, plane, progress, stop)
    laps.lap("phase 1")
    phase1 = {
        "phase1_seconds": laps.seconds["phase 1"],
        "phase1_bytes_sent": _sent(plane),
        "phase1_forwarded_samples": built.forwarded_samples,  # 0: every cache was there already
    }
    dist.barrier()  # every owner's cache is complete before anyone trains
    laps.lap("waiting for the other caches")
    if job.rank not in job.plan.trainers:  # phase 1 only: nothing of this run's training happens here
        summary: dict[str, Any] = {"rank": job.rank, "phase1_only": True}
    else:
        if len(job.plan.trainers) < job.plan.world:
            _training_group(job)
            laps.lap("process group")
        if progress:  # phase 2 starts here, with its one-off costs (the model's build, shortlists), as planned
            progress("train", 0, 0, {})
        summary = _phase_two(job, model_dir, splits, label_names, built.caches, out, plane, progress, laps, device)
        summary["phase2_bytes_sent"] = _sent(plane) - phase1["phase1_bytes_sent"]
    return {**summary, **phase1, "peak_rss_mb": peak_rss_mb(), "seconds_by_step": laps.seconds}


def _training_group(job: Assignment) -> None:
    """Phase 2's process group, of the training ranks alone, in rank order: the phase-1-only ranks have left.
    Rank 0 trains (pac.plan.placement.check_shares), so it stays rank 0 and writes the adapter."""
    dist.destroy_process_group()
    trainers = job.plan.trainers
    init_process_group(job.backend, *job.store, rank=trainers.index(job.rank), world=len(trainers), prefix="phase2/")


def _same_checkpoint_everywhere(trainer: Trainer) -> bool:
    """Resume only when every rank holds a checkpoint of the same step (a crash may land between saves);
    otherwise ranks would start at different steps and their collectives would not pair up."""
    latest = trainer.latest_checkpoint()
    step = int(latest.name.split("-")[1]) if latest is not None else -1
    steps = torch.tensor([step, -step], dtype=torch.int64)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    same = int(steps[0]) == -int(steps[1])
    if not same:
        log.warning("ranks hold checkpoints of different steps: training starts over")
    return same


def _same_starting_weights(model: torch.nn.Module, collectives: PlaneCollectives | None) -> None:
    """Rank 0's trainable weights on every rank (pruned init reads each rank's own samples), in one broadcast:
    one per tensor pays a round trip each."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        flat = torch.cat([p.detach().view(-1) for p in trainable])
        if collectives is not None:
            collectives.broadcast(flat)
        else:
            dist.broadcast(flat, src=0)
        for p, whole in zip(trainable, flat.split([p.numel() for p in trainable]), strict=True):
            p.copy_(whole.view_as(p))


def _phase_two_device(name: str, method: Method, task: str, mode: str) -> torch.device:
    """Where this peer's phase 2 computes: its --device where the method trains there data-parallel; the CPU for
    the pipelined modes' stages (and phase 1), as for the methods and tasks that train on the CPU only."""
    device = resolve_device(name)
    pipelined = f"--mode {mode} trains on the CPU only" if mode in (PIPELINE, "side-pipeline") else None
    if device.type != "cpu" and (why := cpu_only(method, task) or pipelined):
        log.warning("%s: this peer's phase 2 runs on its CPU, not on %s", why, device)
        return torch.device("cpu")
    return device


def _sent(plane: DataPlane | None) -> int:
    return plane.bytes_sent if plane is not None else 0


def _data_plane(job: Assignment, zmq_plane: DataPlane | None) -> DataPlane | None:
    """The plane between the stages (and for encrypted all-reduces): the peer's ZeroMQ sockets or the process
    group's send/recv."""
    if job.plan.mode == "replicated" and not job.encrypted_gradients:
        return None
    if job.data_plane == "torch":
        return TorchDataPlane(job.rank)
    if zmq_plane is None:
        raise PacError("the ZeroMQ data plane was not opened")
    keys = job.data_keys or {}
    for peer_rank, endpoint in (job.data_endpoints or {}).items():
        if peer_rank != job.rank:
            zmq_plane.connect(peer_rank, endpoint, public_key=keys.get(peer_rank))
    return zmq_plane


def _phase_one(
    job: Assignment,
    model_dir: Path,
    splits: dict[str, TokenizedSet],
    plane: DataPlane | None,
    progress: Progress | None,
    stop: threading.Event | None,
) -> PhaseOne:
    opts, plan, rank = job.options, job.plan, job.rank
    if not get_method(opts.method).cached:
        return PhaseOne({}, 0)  # it trains on token ids: every peer has the data already, and runs the backbone
    root = cache_root(opts.cache.dir)
    report = (lambda done, total: progress("cache", done, total, {})) if progress else None
    if plan.mode == "replicated":
        caches, done, total, forwarded = {}, 0, sum(len(d) for d in splits.values()), 0
        for name, data in splits.items():
            mine = data.subset(plan.owned_positions(len(data), rank))
            built = build_cache(
                model_dir,
                mine,
                root,
                job.taps,
                opts.cache.dtype,
                batch_size=plan.phase1_micro_batch or CACHE_MICRO_BATCH,
                desc=f"cache ({name})",
            )
            caches[name] = built.cache_dir
            forwarded += built.computed_samples
            done += len(data)
            if report:
                report(done, total)
        return PhaseOne(caches, forwarded)
    if plan.mode not in ("shuffle", "side-pipeline"):
        raise PacError(f"unknown placement mode {plan.mode!r}: use shuffle, side-pipeline or replicated")
    return run_pipeline_stage(
        plane,
        plan,
        rank,
        model_dir,
        splits,
        job.taps,
        root,
        opts.cache.dtype,
        micro_batch=plan.phase1_micro_batch or opts.optim.batch_size,
        progress=report,
        stop=stop,
    )


def _phase_two(
    job: Assignment,
    model_dir: Path,
    splits: dict[str, TokenizedSet],
    label_names: list[str] | None,
    caches: dict[str, Path],
    out: Path,
    plane: DataPlane | None,
    progress: Progress | None,
    laps: Laps,
    device_name: str,
) -> dict[str, Any]:
    # Here, not at the top: the zeroth-order pipeline brings transformers' model classes, which a peer that
    # caches (phase 1) and trains in the other modes never loads (deploy/android-termux.md: a lighter peer).
    from pac.runtime.zo_pipeline import ZerothOrderPipelineTrainer

    opts, plan, rank = job.options, job.plan, job.rank
    method = get_method(opts.method)
    local: dict[str, Any] = {}
    for name, data in splits.items():  # each cache was built (and verified) by this run's phase 1
        if method.cached:
            local[name] = CachedTaps(CacheReader(caches[name]))
        elif plan.mode == PIPELINE:  # every stage runs its layers over every sample
            local[name] = Tokens(data)
        else:  # its own share of the token ids
            local[name] = Tokens(data.subset(plan.owned_positions(len(data), rank)))
    ctx = BuildContext(model_dir, opts.data.task, label_names, opts.optim.seed, opts.data.max_length, local["train"])
    if not method.cached:  # every peer holds the token ids: a method may calibrate on the whole set, as one device
        ctx.whole_train = Tokens(splits["train"])
    if plan.mode == PIPELINE:
        ctx.stage = plan.stages[rank]
    torch.manual_seed(opts.optim.seed)  # as `pac train` seeds: a method that draws its weights draws the same
    model = method.build(opts.method_options, ctx)
    encrypted = job.encrypted_gradients and plane is not None
    collectives = PlaneCollectives(plane, plan.trainers) if encrypted else None
    if plan.mode != PIPELINE:  # a stage draws its own part from the run seed (pac.methods.zo.model)
        _same_starting_weights(model, collectives)
    laps.lap("building the model")
    config = train_config(opts)
    watched: dict[str, Any] = {}
    if progress:
        watched = {
            "on_step": lambda step, total, loss: progress("train", step, total, {"loss": loss}),
            "on_epoch_end": lambda epoch, record: progress("epoch", epoch, opts.optim.epochs, record),
            "on_checkpoint": lambda step: progress("checkpoint", step, 0, {}),
        }
    staged: dict[str, Any] = {"val": local["val"], **watched, "plane": plane, "plan": plan, "rank": rank}
    device = _phase_two_device(device_name, method, opts.data.task, plan.mode)
    trainer: DataParallelTrainer | SidePipelineTrainer | ZerothOrderPipelineTrainer
    if plan.mode == PIPELINE:
        zo = opts.method_options
        trainer = ZerothOrderPipelineTrainer(
            model, opts.data.task, local["train"], config, out, perturbations=zo.perturbations, eps=zo.eps, **staged
        )
    elif plan.mode == "side-pipeline":
        trainer = SidePipelineTrainer(model, opts.data.task, local["train"], config, out, **staged)
    else:
        if method.training_source is not None:  # each rank digests its own share (pac.models.shortlist)
            local["train"] = method.training_source(opts.method_options, model, local["train"])[0]
            laps.lap("digesting the cache")
        move(model, device)  # after the weights' broadcast and the digest, which run on the CPU
        sources = {
            name: ShardedSource(on_device(local[name], device), data.sample_ids) for name, data in splits.items()
        }
        trainer = DataParallelTrainer(
            model,
            opts.data.task,
            sources["train"],
            config,
            out,
            val=sources["val"],
            **watched,
            compression=job.grad_compression,
            plane=collectives,
        )
    epochs = trainer.fit(resume=opts.resume and _same_checkpoint_everywhere(trainer))
    laps.lap("training")
    move(model, "cpu")  # saved from the CPU
    if isinstance(trainer, SidePipelineTrainer | ZerothOrderPipelineTrainer):
        trainer.gather_adapter()
    summary: dict[str, Any] = {
        "rank": rank,
        "device": str(device),
        "cached_samples": {k: len(s) for k, s in local.items()},
        "split_sizes": {k: len(d) for k, d in splits.items()},
    }
    if isinstance(trainer, DataParallelTrainer):  # gloo's or the ring's input, beside the data plane's bytes
        summary["phase2_allreduce_bytes"] = trainer.train_step.allreduce_bytes
    if isinstance(trainer, ZerothOrderPipelineTrainer):  # what its training steps alone sent (no evaluation)
        summary.update(steps_taken=trainer.train_step.taken, step_bytes_sent=trainer.train_step.sent_bytes)
    if rank == 0:
        prepared = PreparedData(model_dir, None, splits["train"], splits["val"], label_names)
        summary.update(epochs=epochs, **method.save(opts.method_options, model, out, adapter_meta_of(opts, prepared)))
    laps.lap("saving the adapter")
    return summary
