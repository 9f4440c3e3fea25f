"""Messages between the stages of a phase-2 pipeline (pac.runtime.side_pipeline, pac.runtime.zo_pipeline), named
by (kind, pass, micro-batch) on the data plane.

A pass is one training step's or one evaluation's micro-batches (`tag`, e.g. ["train", 12]). A message that
arrives ahead of the one awaited (under 1F1B a gradient from the next stage can overtake a state from the previous
one) waits in a stash; one from a rank that should not send that kind, or one seen twice, means the stages are out
of step, and says so.
"""

from __future__ import annotations

from typing import Any

import torch

from pac.net.dataplane import DataPlane, QueuedSends


class StageMessages:
    """One stage's end of the exchange: `sources` says which ranks send each kind of message to it."""

    def __init__(self, plane: DataPlane, sources: dict[str, set[int]], what: str):
        self.plane, self.sources, self.what = plane, sources, what
        self._stash: dict[tuple, dict[str, torch.Tensor]] = {}

    def send(
        self, sends: QueuedSends, dest: int, kind: str, tag: list, micro: int, tensors: dict[str, torch.Tensor]
    ) -> None:
        sends.send(dest, _header(kind, tag, micro), tensors)

    def recv(self, kind: str, tag: list, micro: int) -> dict[str, torch.Tensor]:
        key = (kind, tuple(tag), micro)
        while key not in self._stash:
            header, tensors = self.plane.recv()
            try:
                got = (header["kind"], tuple(header["pass"]), header["micro"])
            except (KeyError, TypeError):
                raise RuntimeError(f"{self.what}: a message that is not a stage's: {header}") from None
            if header.get("src") not in self.sources.get(got[0], ()) or got in self._stash:
                wanted = _header(kind, tag, micro)
                raise RuntimeError(
                    f"{self.what} out of step: expected {wanted} from rank {sorted(self.sources[kind])}, got {header}"
                )
            self._stash[got] = tensors
        return self._stash.pop(key)


def _header(kind: str, tag: list, micro: int) -> dict[str, Any]:
    return {"kind": kind, "pass": tag, "micro": micro}
