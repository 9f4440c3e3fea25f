"""Phase 2 across peers: data-parallel training of the side network with all-reduce.

Every rank holds the same model and optimizer and draws the same global batches (the epoch order is a
pure function of seed and epoch, over the positions of the whole training set's list of sample ids). Each rank computes
the loss of the samples of that batch it owns (their taps are in its local cache), and one
all-reduce sums the gradients of the loss *sums* and the sample/token counts. Dividing by the global
count gives exactly the gradient of the global batch's mean loss, so, up to float summation order,
N peers take the same steps as one device with the same global batch and seed. The all-reduce is torch's
DistributedDataParallel, with its communication hooks to compress gradients over a slow link, and to send them
over the encrypted data plane (pac.net.collective) where nothing derived from the data may cross in clear.
Weights on a device gloo cannot reduce (MPS) have their gradient buckets copied to CPU and back around the
all-reduce; every path counts the bytes it hands to all-reduces (`DataParallelStep.allreduce_bytes`).

The synchronisation is part of the training step (`DataParallelStep`, a pac.runtime.step.BackpropStep whose
gradients are summed over the ranks): the loop is the plain Trainer's; only its evaluation sums over ranks too.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from pac.errors import PacError
from pac.methods.base import MethodModel, loss_count, predicts_class, summarize
from pac.net.addresses import interface_of, local_address_towards
from pac.net.collective import PlaneCollectives
from pac.plan.costs import GRADIENT_COMPRESSIONS
from pac.runtime.step import BackpropStep, autocast
from pac.runtime.trainer import BatchSource, TrainConfig, Trainer, evaluation_totals

log = logging.getLogger(__name__)


class ShardedSource:
    """The whole split, its samples named by id in the split's order (the trainer draws positions in that list);
    only the samples of `local`, this rank's share, have data here. Samples are matched by id, never by position,
    so the local share may list them in any order."""

    def __init__(self, local: BatchSource, split_ids: Sequence[str]):
        self.local, self.split_ids = local, list(split_ids)
        self.local_index = {sid: i for i, sid in enumerate(local.sample_ids)}
        unknown = set(self.local_index) - set(self.split_ids)
        if unknown:
            raise ValueError(f"{len(unknown)} local samples are not in the split, e.g. {sorted(unknown)[:3]}")

    def __len__(self) -> int:
        return len(self.split_ids)

    @property
    def sample_ids(self) -> list[str]:
        return self.split_ids

    def owned(self, indices: Sequence[int]) -> list[int]:
        """Local indices of the owned samples among split positions `indices`."""
        ids = (self.split_ids[i] for i in indices)
        return [self.local_index[sid] for sid in ids if sid in self.local_index]


class _SummedLoss(torch.nn.Module):
    """What DistributedDataParallel wraps: the model's loss *sum* over this rank's part of a batch, so that the
    ranks' parts add up to the global batch's. A rank without a sample in the batch returns a zero that still
    reaches every trainable parameter, so its (zero) gradients join the all-reduce the others wait for."""

    def __init__(self, model: MethodModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if batch is None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            return sum((p.sum() * 0.0 for p in trainable), torch.zeros((), device=trainable[0].device))
        return self.model.loss_batch(batch) * loss_count(self.task, batch["labels"])


def all_reduces_on_cpu(device: torch.device, backend: str | None) -> bool:
    """Whether gradients on `device` are copied to CPU for their all-reduce over `backend` ("gloo", "nccl", or None
    for the encrypted data plane): gloo reduces CPU and CUDA tensors but never MPS ones (Apple silicon), and the
    data plane sends CPU tensors only."""
    if device.type == "cpu":
        return False
    return backend is None or (backend == "gloo" and device.type != "cuda")


class _BucketReduce:
    """A DDP communication hook's state: the hook that all-reduces a bucket (torch's default, its fp16 cast, or
    either over the encrypted plane) with its own state, whether it runs on a CPU copy of the bucket, and the
    payload it has handed to all-reduces so far (`bytes`: each bucket's size as sent, fp16 or not, once per
    all-reduce; not what crosses the links, which a ring makes 2 (n - 1) / n of it per rank)."""

    def __init__(
        self,
        hook: Callable[[Any, Any], torch.futures.Future[torch.Tensor]],
        state: Any,
        wire: torch.dtype | None,
        on_cpu: bool,
    ):
        self.hook, self.state, self.wire, self.on_cpu = hook, state, wire, on_cpu
        self.bytes = 0


class _CpuBucket:
    """A bucket's CPU copy, as the hooks see a bucket (they only read `buffer()`)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def buffer(self) -> torch.Tensor:
        return self.tensor


def _bucket_reduce(
    compression: str, group: dist.ProcessGroup | None, plane: PlaneCollectives | None, on_cpu: bool
) -> _BucketReduce:
    if compression not in GRADIENT_COMPRESSIONS:
        raise PacError(f"unknown gradient compression {compression!r}: use one of {', '.join(GRADIENT_COMPRESSIONS)}")
    wire = torch.float16 if compression == "fp16" else None
    if plane is not None:
        return _BucketReduce(_hook_over_plane if wire is None else _fp16_hook_over_plane, plane, wire, on_cpu)
    # Without compression, torch's default hook: it reduces as DDP does without one, and lets the bytes be counted.
    hook = default_hooks.allreduce_hook if wire is None else default_hooks.fp16_compress_hook
    return _BucketReduce(hook, group, wire, on_cpu)


# The hooks' `bucket` goes unannotated, and so does what they return: DDP checks those annotations against
# dist.GradBucket and Future[Tensor] itself, and this module's postponed annotations would hand it strings.
def _reduce_bucket(reduce: _BucketReduce, bucket):
    """The bucket all-reduced by `reduce.hook`, through a CPU copy where the group cannot take its device."""
    buffer = bucket.buffer()
    reduce.bytes += buffer.numel() * (reduce.wire or buffer.dtype).itemsize
    if not reduce.on_cpu:
        return reduce.hook(reduce.state, bucket)
    # copy=True: a real copy even of a CPU bucket, so the CPU stand-in in the tests runs this path as MPS would.
    staged = reduce.hook(reduce.state, _CpuBucket(buffer.to("cpu", copy=True)))
    return staged.then(lambda done: buffer.copy_(done.value().to(buffer.device)))


def _hook_over_plane(plane: PlaneCollectives, bucket):
    """DDP's default all-reduce (a mean over the ranks), made over the encrypted data plane instead of gloo."""
    buffer = bucket.buffer()
    return _done(plane.all_reduce(buffer.div_(plane.world)))


def _fp16_hook_over_plane(plane: PlaneCollectives, bucket):
    """torch's fp16_compress_hook (scaled, then cast, then summed), made over the encrypted data plane."""
    buffer = bucket.buffer()
    return _done(buffer.copy_(plane.all_reduce(buffer.div(plane.world).to(torch.float16))))


def _done(buffer: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """The bucket's all-reduced gradients, as the future DDP waits on (the ring has already run)."""
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


class DataParallelStep(BackpropStep):
    """The default update, on gradients summed over the ranks of a process group by torch's
    DistributedDataParallel: its gradient buckets are all-reduced while the backward is still running, and its
    communication hook (`compression`: an fp16 cast) halves what crosses a slow link. With `plane`, the hook and
    the loss totals go over the encrypted data plane rather than gloo, which sends them in clear. Weights on a
    device the group cannot reduce (MPS under gloo; anything but CPU on the plane) have their buckets copied to
    CPU and back around the all-reduce (`all_reduces_on_cpu`)."""

    source: ShardedSource

    def __init__(
        self,
        model: MethodModel,
        task: str,
        source: ShardedSource,
        config: TrainConfig,
        group: dist.ProcessGroup | None = None,
        compression: str = "none",
        plane: PlaneCollectives | None = None,
        on_cpu: bool | None = None,
    ):
        super().__init__(model, task, source, config)
        self.group, self.plane = group, plane
        if on_cpu is None:  # from where the weights are; pass True to run the CPU copy on CPU weights (tests)
            device = self.params[0].device if self.params else torch.device("cpu")
            on_cpu = all_reduces_on_cpu(device, None if plane is not None else dist.get_backend(group))
        # The ranks built the same weights (pac.runtime.collaborative broadcasts them): no start-up sync, which
        # would send every frozen buffer too; unused parameters (a head the task does not read) still all-reduce.
        self.ddp = DistributedDataParallel(
            _SummedLoss(model, task),
            process_group=group,
            init_sync=False,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
        self.reduce = _bucket_reduce(compression, group, plane, on_cpu)
        self.ddp.register_comm_hook(self.reduce, _reduce_bucket)
        self.world = dist.get_world_size(group)
        self.totals_bytes = 0  # the loss totals' all-reduces (and the trainer's evaluation sums)

    @property
    def allreduce_bytes(self) -> int:
        """The payload this rank has handed to all-reduces: gradient buckets as sent (fp16 under compression) and
        loss totals; not the starting weights' broadcast, nor what the ring or gloo put on the links."""
        return self.reduce.bytes + self.totals_bytes

    def gradients(self, indices: list[int], step: int) -> tuple[float, float]:
        mine = self.source.owned(indices)
        batch = self.source.local.batch(mine) if mine else None
        with autocast(self.config.precision, self.device):
            loss_sum = self.ddp(batch)
        # The global batch's loss and count travel while the backward runs; DDP averages the gradient sums over
        # the ranks, so world / count turns them into the gradient of the global batch's mean loss.
        count = loss_count(self.task, batch["labels"]) if batch is not None else 0
        # On CPU whatever device trains: gloo and the data plane take CPU tensors.
        totals = torch.tensor([loss_sum.item(), float(count)], dtype=torch.float64)
        self.totals_bytes += totals.nbytes
        if self.plane is not None:
            self.plane.all_reduce(totals)
            loss_sum.backward()
        else:
            pending = dist.all_reduce(totals, group=self.group, async_op=True)
            loss_sum.backward()
            pending.wait()
        total = max(totals[1].item(), 1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(self.world / total)
        return totals[0].item() / total, self.clip()


class DataParallelTrainer(Trainer):
    """A Trainer whose steps (`DataParallelStep`) and evaluations are sums over the ranks of a process group."""

    train_source: ShardedSource
    train_step: DataParallelStep

    def __init__(
        self,
        model: MethodModel,
        task: str,
        train: ShardedSource,
        config: TrainConfig,
        out_dir: Path,
        *,
        group: dist.ProcessGroup | None = None,
        compression: str = "none",
        plane: PlaneCollectives | None = None,
        **kwargs: Any,
    ):
        step = DataParallelStep(model, task, train, config, group, compression, plane)
        super().__init__(model, task, train, config, out_dir, train_step=step, **kwargs)
        self.group, self.plane = group, plane

    def _agreed_seconds(self, seconds: float) -> float:
        return slowest_of_ranks(seconds, self.group)

    def _evaluate(self, source: BatchSource) -> dict[str, float]:
        local = source.local if isinstance(source, ShardedSource) else source
        totals = evaluation_totals(self.model, local) if len(local) else {}
        keys = ("loss_sum", "count", "correct") if predicts_class(self.task) else ("loss_sum", "count")
        summed = torch.tensor([float(totals.get(k, 0.0)) for k in keys], dtype=torch.float64)
        self.train_step.totals_bytes += summed.nbytes
        if self.plane is not None:
            self.plane.all_reduce(summed)
        else:
            dist.all_reduce(summed, group=self.group)
        return summarize(self.task, dict(zip(keys, summed.tolist(), strict=True)))


def slowest_of_ranks(seconds: float, group: dist.ProcessGroup | None = None) -> float:
    """The largest of every rank's value: one number all ranks agree on (the slowest rank's step time)."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value)


def init_process_group(
    backend: str,
    store_host: str,
    store_port: int,
    rank: int,
    world: int,
    timeout_s: float = 300.0,
    prefix: str | None = None,
) -> None:
    """Join the run's process group through the TCPStore the coordinator hosts (it is not a rank). A `prefix`
    keeps a later group's rendezvous keys apart from an earlier one's in the same store: phase 2's group of
    the training ranks alone, after phase 1's of every rank."""
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        # gloo advertises the address the hostname resolves to, which is often 127.0.1.1 on a home
        # machine: bind it to the interface that reaches the coordinator instead.
        interface = interface_of(local_address_towards(store_host))
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    store: dist.Store = dist.TCPStore(
        store_host, store_port, world_size=None, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    if prefix is not None:
        store = dist.PrefixStore(prefix, store)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    log.info("rank %d/%d joined the %s process group (store %s:%d)", rank, world, backend, store_host, store_port)
