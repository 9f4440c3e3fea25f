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

from collections.abc import Sequence

import torch

from pac.net.dataplane import DataPlane, DataPlaneError

# How long a rank waits for its neighbour's chunk: a peer that is gone is noticed by the coordinator's heartbeats
# long before this (pac.runtime.coordinator), so this only ends a collective nobody will ever complete.
RECEIVE_TIMEOUT_S = 600.0


class PlaneCollectives:
    """All-reduce and broadcast among `members`, the plane ranks taking part (all of 0..n-1 for an int n), this
    one being `plane.rank`, over `plane`."""

    def __init__(self, plane: DataPlane, members: int | Sequence[int], timeout: float = RECEIVE_TIMEOUT_S):
        self.plane, self.timeout = plane, timeout
        self.members = list(range(members)) if isinstance(members, int) else list(members)
        self.rank = plane.rank
        self.position = self.members.index(self.rank)  # on the ring
        self.calls = 0  # collectives so far: every rank makes the same calls in the same order

    @property
    def world(self) -> int:
        return len(self.members)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the members, in place (a contiguous CPU tensor); returns it."""
        self.calls += 1
        n, at = len(self.members), self.position
        if n == 1:
            return tensor
        chunks = list(tensor.view(-1).tensor_split(n))
        right, left = self.members[(at + 1) % n], self.members[(at - 1) % n]
        for step in range(n - 1):  # reduce-scatter: chunk (at - step) travels right, gathering sums
            self._send(right, step, chunks[(at - step) % n])
            chunks[(at - step - 1) % n].add_(self._recv(left, step))
        for step in range(n - 1):  # all-gather: the summed chunk (at + 1 - step) travels right
            self._send(right, n - 1 + step, chunks[(at + 1 - step) % n])
            chunks[(at - step) % n].copy_(self._recv(left, n - 1 + step))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s `tensor` on every member, in place; returns it."""
        self.calls += 1
        if self.rank == src:
            for dest in self.members:
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
