"""Data-parallel phase 2's all-reduce (pac.runtime.distributed) in real 2-process gloo groups: the CPU copy that
weights on Apple silicon (MPS) need under gloo, run here on CPU weights as their stand-in, and the payload bytes
every hook path counts."""

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_ranks

from pac.methods.base import MethodModel, task_loss
from pac.runtime.distributed import all_reduces_on_cpu

SAMPLES, BATCH, STEPS = 12, 4, 3  # one epoch of three global batches
TRAINABLE = 6 * 5 + 5 + 5 * 3 + 3  # the two trainable layers' weights and biases


class TwoLayers(MethodModel):
    """A frozen projection, then two trainable layers: a side network's shape, small."""

    task = "classify"

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(6, 6).requires_grad_(False)
        self.hidden, self.out = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.frozen(batch["x"]))))


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, 6, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g)


class Rows:
    """A batch source over some of `rows()`, named r0..r11 by their position there."""

    def __init__(self, positions: list[int]):
        self.positions = positions
        self.sample_ids = [f"r{i}" for i in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        x, y = rows()
        chosen = [self.positions[i] for i in indices]
        return {"x": x[chosen], "labels": y[chosen]}


VARIANTS = [
    (plane, compression, on_cpu)
    for plane in (False, True)
    for compression in ("none", "fp16")
    for on_cpu in (False, True)
]


def run_rank(rank: int, port: int, out: Path) -> None:
    """One rank: each variant's first-step gradients, weights after the epoch, and all-reduced bytes."""
    from pac.net.collective import PlaneCollectives
    from pac.net.dataplane import ZmqDataPlane
    from pac.runtime.distributed import DataParallelStep, ShardedSource
    from pac.runtime.trainer import TrainConfig

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    # The data plane the encrypted all-reduce runs over, here without its CURVE keys (tests/test_dataplane.py).
    plane = ZmqDataPlane(rank, "tcp://127.0.0.1:0", {})
    store.set(f"endpoint{rank}", plane.endpoint)
    plane.connect(1 - rank, store.get(f"endpoint{1 - rank}").decode())
    # The ranks own alternate rows, and the first batch's rows unevenly (rank 0: r0, r2; rank 1: r1, r3).
    source = ShardedSource(Rows(list(range(rank, SAMPLES, 2))), [f"r{i}" for i in range(SAMPLES)])
    config = TrainConfig(epochs=1, batch_size=BATCH, warmup_ratio=0.0, max_grad_norm=1e9)
    results = {}
    for over_plane, compression, on_cpu in VARIANTS:
        torch.manual_seed(0)
        model = TwoLayers()
        collectives = PlaneCollectives(plane, 2) if over_plane else None
        step = DataParallelStep(
            model, "classify", source, config, compression=compression, plane=collectives, on_cpu=on_cpu
        )
        first = None
        for s in range(STEPS):
            step(list(range(s * BATCH, (s + 1) * BATCH)), s)
            first = first or {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[(over_plane, compression, on_cpu)] = {"grads": first, "weights": weights, "bytes": step.allreduce_bytes}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    plane.close()
    dist.destroy_process_group()


CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from test_distributed import run_rank
run_rank(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(CHILD, 2, out, timeout=120)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_gradients_go_through_cpu_only_where_the_group_cannot_take_the_device():
    mps, cuda, cpu = torch.device("mps"), torch.device("cuda"), torch.device("cpu")
    assert all_reduces_on_cpu(mps, "gloo")  # Apple silicon: gloo has no MPS tensors
    assert not all_reduces_on_cpu(cuda, "gloo") and not all_reduces_on_cpu(cuda, "nccl")
    assert not all_reduces_on_cpu(cpu, "gloo") and not all_reduces_on_cpu(cpu, None)
    assert all_reduces_on_cpu(cuda, None) and all_reduces_on_cpu(mps, None)  # the encrypted plane sends CPU tensors


def _one_device_gradients() -> dict[str, torch.Tensor]:
    """The first global batch's mean-loss gradients on one device: what every variant must reproduce."""
    torch.manual_seed(0)
    model = TwoLayers()
    x, y = rows()
    task_loss("classify", model.forward_batch({"x": x[:BATCH]}), y[:BATCH]).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("plane, compression, on_cpu", VARIANTS)
def test_the_cpu_copy_reduces_as_the_device_would(two_ranks, plane, compression, on_cpu):
    """Copied to CPU and back (as MPS weights under gloo are), the buckets all-reduce to the very bits the group
    gives them in place, with or without the fp16 cast and over gloo or the data plane's ring; both ranks end with
    the same weights, and the first step's gradients are one device's (within fp16's rounding where cast)."""
    ours = [r[(plane, compression, on_cpu)] for r in two_ranks]
    in_place = [r[(plane, compression, False)] for r in two_ranks]
    for rank in range(2):
        for name, grad in ours[rank]["grads"].items():
            assert torch.equal(grad, in_place[rank]["grads"][name]), name
            assert torch.equal(grad, ours[0]["grads"][name]), name
        for name, weight in ours[rank]["weights"].items():
            assert torch.equal(weight, in_place[rank]["weights"][name]), name
            assert torch.equal(weight, ours[0]["weights"][name]), name
    within = {"none": 1e-6, "fp16": 2e-3}[compression]
    for name, expected in _one_device_gradients().items():
        torch.testing.assert_close(ours[0]["grads"][name], expected, atol=within, rtol=within, msg=name)


@pytest.mark.parametrize("plane, compression, on_cpu", VARIANTS)
def test_allreduce_bytes_are_the_trainable_weights_per_step(two_ranks, plane, compression, on_cpu):
    """Every hook path counts each step's bucket as sent: the trainable weights in float32, or half of that under
    fp16; and each step's loss total and count (two float64)."""
    per_value = {"none": 4, "fp16": 2}[compression]
    for rank in range(2):
        assert two_ranks[rank][(plane, compression, on_cpu)]["bytes"] == STEPS * (TRAINABLE * per_value + 16)
