"""Collectives over a data plane: what torch.distributed's gloo would send in clear, sent over the peers'
CURVE-encrypted ZeroMQ data plane instead (README, "What is encrypted").

`ring_all_reduce` is the ring of Baidu's and NCCL's all-reduce: the tensor is cut into one chunk per rank; in
n - 1 reduce-scatter steps each rank adds the chunk its left neighbour sends into its own copy and passes it on,
so each chunk ends summed on one rank; n - 1 all-gather steps then pass the summed chunks round. Every rank sends
2 (n - 1) / n of the tensor, as gloo's ring does, and every rank ends with bit-identical sums (each chunk is
added up once, on the ring, in one order), which data-parallel replicas need to stay the same.

A rank receives only from its left neighbour during a collective, and a plane delivers one sender's messages in
order, so a message's header only has to name the collective's step to catch a plane that is shared wrongly.
"""

from __future__ import annotations

import torch

from pac.net.dataplane import DataPlane, DataPlaneError

# How long a rank waits for its neighbour's chunk: a peer that is gone is noticed by the coordinator's heartbeats
# long before this (pac.runtime.coordinator), so this only ends a collective nobody will ever complete.
RECEIVE_TIMEOUT_S = 600.0


class PlaneCollectives:
    """All-reduce and broadcast among `world` ranks, rank r being `plane.rank`, over `plane`."""

    def __init__(self, plane: DataPlane, world: int, timeout: float = RECEIVE_TIMEOUT_S):
        self.plane, self.world, self.timeout = plane, world, timeout
        self.rank = plane.rank
        self.calls = 0  # collectives so far: every rank makes the same calls in the same order

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (a contiguous CPU tensor); returns it."""
        self.calls += 1
        n, rank = self.world, self.rank
        if n == 1:
            return tensor
        chunks = list(tensor.view(-1).tensor_split(n))
        right, left = (rank + 1) % n, (rank - 1) % n
        for step in range(n - 1):  # reduce-scatter: chunk (rank - step) travels right, gathering sums
            self._send(right, step, chunks[(rank - step) % n])
            chunks[(rank - step - 1) % n].add_(self._recv(left, step))
        for step in range(n - 1):  # all-gather: the summed chunk (rank + 1 - step) travels right
            self._send(right, n - 1 + step, chunks[(rank + 1 - step) % n])
            chunks[(rank - step) % n].copy_(self._recv(left, n - 1 + step))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s `tensor` on every rank, in place; returns it."""
        self.calls += 1
        if self.rank == src:
            for dest in range(self.world):
                if dest != src:
                    self._send(dest, 0, tensor)
        else:
            tensor.view(-1).copy_(self._recv(src, 0))
        return tensor

    def _send(self, dest: int, step: int, chunk: torch.Tensor) -> None:
        # A copy: the plane sends zero-copy, and this rank goes on changing its chunks while the bytes travel.
        self.plane.send(dest, {"collective": self.calls, "step": step}, {"chunk": chunk.detach().clone()})

    def _recv(self, src: int, step: int) -> torch.Tensor:
        header, tensors = self.plane.recv(timeout=self.timeout)
        expected = {"collective": self.calls, "step": step, "src": src}
        got = {k: header.get(k) for k in expected}
        if got != expected or "chunk" not in tensors:
            raise DataPlaneError(
                f"rank {self.rank} expected chunk {expected} of a collective, got {got}: the data plane carries "
                "something else at the same time, or the ranks disagree on the collectives they make"
            )
        return tensors["chunk"]
