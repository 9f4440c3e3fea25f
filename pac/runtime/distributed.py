"""Phase 2 across peers: data-parallel training of the side network with all-reduce.

Every rank holds the same model and optimizer and draws the same global batches (the epoch order is a
pure function of seed and epoch, over the positions of the whole training set's list of sample ids). Each rank computes
the loss of the samples of that batch it owns (their taps are in its local cache), and one
all-reduce sums the gradients of the loss *sums* and the sample/token counts. Dividing by the global
count gives exactly the gradient of the global batch's mean loss, so, up to float summation order,
N peers take the same steps as one device with the same global batch and seed.

The synchronisation is part of the training step (`DataParallelStep`, a pac.runtime.step.BackpropStep whose
gradients are summed over the ranks): the loop is the plain Trainer's; only its evaluation sums over ranks too.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pac.methods.base import MethodModel, loss_count, summarize
from pac.net.addresses import interface_of, local_address_towards
from pac.runtime.step import BackpropStep
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


class DataParallelStep(BackpropStep):
    """The default update, on gradients summed over the ranks of a process group."""

    source: ShardedSource

    def __init__(
        self,
        model: MethodModel,
        task: str,
        source: ShardedSource,
        config: TrainConfig,
        group: dist.ProcessGroup | None = None,
    ):
        super().__init__(model, task, source, config)
        self.group = group

    def gradients(self, indices: list[int], step: int) -> tuple[float, float]:
        for p in self.params:  # ranks without a sample in this batch still join the all-reduce with zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        mine = self.source.owned(indices)
        loss_sum, count = 0.0, 0
        if mine:
            batch = self.source.local.batch(mine)
            count = loss_count(self.task, batch["labels"])
            loss = self.loss(batch) * count  # the sum, so ranks' parts add up to the global batch
            loss.backward()
            loss_sum = loss.item()
        flat = torch.cat([p.grad.reshape(-1) for p in self.params] + [torch.tensor([loss_sum, float(count)])])
        dist.all_reduce(flat, group=self.group)
        total = max(flat[-1].item(), 1.0)
        offset = 0
        for p in self.params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p)).div_(total)
            offset += p.numel()
        return flat[-2].item() / total, self.clip()


class DataParallelTrainer(Trainer):
    """A Trainer whose steps (`DataParallelStep`) and evaluations are sums over the ranks of a process group."""

    train_source: ShardedSource

    def __init__(
        self,
        model: MethodModel,
        task: str,
        train: ShardedSource,
        config: TrainConfig,
        out_dir: Path,
        *,
        group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ):
        step = DataParallelStep(model, task, train, config, group)
        super().__init__(model, task, train, config, out_dir, train_step=step, **kwargs)
        self.group = group

    def _evaluate(self, source: BatchSource) -> dict[str, float]:
        local = source.local if isinstance(source, ShardedSource) else source
        totals = evaluation_totals(self.model, local) if len(local) else {}
        keys = ("loss_sum", "count", "correct") if self.task == "classify" else ("loss_sum", "count")
        summed = torch.tensor([float(totals.get(k, 0.0)) for k in keys], dtype=torch.float64)
        dist.all_reduce(summed, group=self.group)
        return summarize(self.task, dict(zip(keys, summed.tolist(), strict=True)))


def init_process_group(
    backend: str, store_host: str, store_port: int, rank: int, world: int, timeout_s: float = 300.0
) -> None:
    """Join the run's process group through the TCPStore the coordinator hosts (it is not a rank)."""
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        # gloo advertises the address the hostname resolves to, which is often 127.0.1.1 on a home
        # machine: bind it to the interface that reaches the coordinator instead.
        interface = interface_of(local_address_towards(store_host))
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    store = dist.TCPStore(
        store_host, store_port, world_size=None, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    log.info("rank %d/%d joined the %s process group (store %s:%d)", rank, world, backend, store_host, store_port)
