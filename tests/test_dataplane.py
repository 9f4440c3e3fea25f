"""Data plane: real ZeroMQ sockets on loopback, and real gloo processes for the torch.distributed plane."""

from __future__ import annotations

import json
import threading
import time
import zlib
from pathlib import Path

import msgpack
import pytest
import torch
import torch.distributed as dist
import zmq
from conftest import run_ranks

from pac.net.dataplane import CurveConfig, DataPlaneError, QueuedSends, TorchDataPlane, ZmqDataPlane

LOOPBACK = "tcp://127.0.0.1:0"


def sample_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f32 = torch.randn(3, 5, generator=g)
    f32[0, 0] = float("nan")  # bit-exact means NaN payloads too, which torch.equal cannot check
    return {
        "hidden": torch.randn(2, 4, 8, generator=g).to(torch.bfloat16),
        "half": torch.randn(6, generator=g).to(torch.float16),
        "f32": f32,
        "f64_transposed": torch.randn(4, 3, generator=g, dtype=torch.float64).t(),
        "ids": torch.randint(-(2**40), 2**40, (2, 7), generator=g),
        "mask": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(seed, dtype=torch.int32),
        "empty": torch.empty(0, 3, dtype=torch.bfloat16),
        "bytes": torch.randint(0, 256, (70_000,), generator=g, dtype=torch.uint8),  # above zmq's copy threshold
    }


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape, g.device) == (w.dtype, w.shape, w.device), name
        assert bytes(g.contiguous().reshape(-1).view(torch.uint8)) == bytes(
            w.contiguous().reshape(-1).view(torch.uint8)
        )


@pytest.fixture
def planes():
    """A factory of ZeroMQ planes on loopback, each knowing the others, all closed at the end."""
    made: list[ZmqDataPlane] = []

    def make(n: int, **kw) -> list[ZmqDataPlane]:
        new = [ZmqDataPlane(len(made) + i, LOOPBACK, {}, **kw) for i in range(n)]
        made.extend(new)
        for p in made:
            for q in made:
                p.connect(q.rank, q.endpoint)
        return new

    yield make
    for p in made:
        p.close()


def raw_push(endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    return ctx, sock


def test_zmq_round_trip_is_bit_exact(planes):
    a, b = planes(2)
    assert b.endpoint.startswith("tcp://127.0.0.1:") and not b.endpoint.endswith(":0")
    sent = sample_tensors(1)
    a.send(b.rank, {"kind": "hidden", "sample_ids": ["s1", "s2"], "layer": 10}, sent)
    header, got = b.recv(timeout=5)
    assert header == {"kind": "hidden", "sample_ids": ["s1", "s2"], "layer": 10, "src": a.rank}
    assert_bit_exact(got, sent)
    got["f32"].add_(1)  # received tensors are ordinary writable tensors
    b.send(a.rank, {}, {})
    assert a.recv(timeout=5) == ({"src": b.rank}, {})


def test_zmq_keeps_order_and_routes_all_to_all(planes):
    a, b = planes(2)
    for i in range(20):
        a.send(b.rank, {"i": i}, {"x": torch.full((i + 1,), i)})
    for i in range(20):
        header, got = b.recv(timeout=5)
        assert header["i"] == i and torch.equal(got["x"], torch.full((i + 1,), i))

    ranks = planes(3)
    for p in ranks:
        for q in ranks:
            if q is not p:
                p.send(q.rank, {"to": q.rank}, {"v": torch.tensor([p.rank, q.rank])})
    for q in ranks:
        got = [q.recv(timeout=5) for _ in range(2)]
        assert sorted(h["src"] for h, _ in got) == sorted(p.rank for p in ranks if p is not q)
        for header, tensors in got:
            assert header["to"] == q.rank and tensors["v"].tolist() == [header["src"], q.rank]


def test_zmq_sender_blocks_while_receiver_lags(planes):
    a, b = planes(2, hwm=1)
    n, size = 40, 1 << 20  # 40 MiB in all: more than the two high-water marks plus loopback's TCP buffers
    sent: list[int] = []

    def pump() -> None:
        for i in range(n):
            a.send(b.rank, {"i": i}, {"x": torch.full((size,), i % 256, dtype=torch.uint8)})
            sent.append(i)

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    time.sleep(0.5)
    assert sender.is_alive() and len(sent) < n
    for i in range(n):
        header, got = b.recv(timeout=10)
        assert header["i"] == i and got["x"][-1] == i % 256
    sender.join(timeout=10)
    assert not sender.is_alive() and len(sent) == n


def test_queued_sends_return_at_once_keep_order_and_report_a_failed_send(planes):
    a, b = planes(2, hwm=1)
    with QueuedSends(a) as sends:
        started = time.monotonic()
        for i in range(6):  # 6 MiB with a high-water mark of 1: a plain send would wait for the receiver
            sends.send(b.rank, {"i": i}, {"x": torch.full((1 << 20,), i, dtype=torch.uint8)})
        assert time.monotonic() - started < 0.5
        for i in range(6):
            header, got = b.recv(timeout=10)
            assert header["i"] == i and got["x"][0] == i
    with pytest.raises(DataPlaneError, match="knows no data-plane endpoint for rank 9"), QueuedSends(a) as sends:
        sends.send(9, {}, {})
    with pytest.raises(DataPlaneError, match="rank 9"), QueuedSends(a) as sends:
        sends.send(9, {}, {})
        time.sleep(0.2)  # the thread has failed by now: the next send says so, and nothing more is sent
        sends.send(b.rank, {"late": True}, {})
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.3)


def _junk_header(**changes) -> dict:
    header = {"v": 1, "src": 7, "h": {}, "t": [["x", "float32", [2], 8, zlib.crc32(b"\0" * 8)]]}
    return {**header, **changes}


@pytest.mark.parametrize(
    ("frames", "complaint"),
    [
        ([b"\xc1junk"], "header does not decode"),
        ([msgpack.packb([1, 2])], "header is not a map"),
        ([msgpack.packb(_junk_header(v=99)), b"\0" * 8], "wire version 99"),
        ([msgpack.packb(_junk_header()), b"\0" * 8, b"extra"], "2 tensor frames for 1 tensors"),
        ([msgpack.packb(_junk_header())], "0 tensor frames for 1 tensors"),
        ([msgpack.packb(_junk_header()), b"\0" * 7], "has 7 bytes, its header says 8"),
        ([msgpack.packb(_junk_header()), b"\0" * 7 + b"\1"], "fails its CRC32 check"),
        ([msgpack.packb(_junk_header(t=[["x", "object", [2], 8, 0]])), b"\0" * 8], "dtype 'object'"),
        ([msgpack.packb(_junk_header(t=[["x", "float32", [3], 8, 0]])), b"\0" * 8], "declares 8 bytes"),
        ([msgpack.packb(_junk_header(t=[["x", "float32", [2], 8, None]])), b"\0" * 8], "fails its CRC32"),
    ],
)
def test_zmq_garbage_is_refused_and_the_plane_goes_on(planes, frames, complaint):
    a, b = planes(2)
    ctx, junk = raw_push(b.endpoint)
    try:
        junk.send_multipart(frames)
        with pytest.raises(DataPlaneError, match="garbage or truncated data-plane message from") as err:
            b.recv(timeout=5)
        assert complaint in str(err.value) and "127.0.0.1" in str(err.value)
        a.send(b.rank, {"ok": True}, {"x": torch.ones(2)})
        assert b.recv(timeout=5)[0] == {"ok": True, "src": a.rank}
    finally:
        junk.close()
        ctx.term()


def test_zmq_oversized_message_is_dropped(planes):
    (small,) = planes(1, max_message_bytes=4096)
    (big,) = planes(1)
    big.send(small.rank, {}, {"x": torch.zeros(8192, dtype=torch.uint8)})
    with pytest.raises(TimeoutError):
        small.recv(timeout=0.5)
    big.send(small.rank, {"after": 1}, {"x": torch.zeros(16, dtype=torch.uint8)})  # the sender reconnects
    assert small.recv(timeout=5)[0]["after"] == 1
    with pytest.raises(DataPlaneError, match="above max_message_bytes=4096"):
        small.send(big.rank, {}, {"x": torch.zeros(8192, dtype=torch.uint8)})


def test_zmq_send_errors_say_what_to_fix(planes):
    (a,) = planes(1)
    with pytest.raises(DataPlaneError, match="no data-plane endpoint for rank 5"):
        a.send(5, {}, {})
    with pytest.raises(DataPlaneError, match="does not carry"):
        a.send(a.rank, {}, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(DataPlaneError, match="cannot be packed"):
        a.send(a.rank, {"bad": object()}, {})
    a.close()
    with pytest.raises(DataPlaneError, match="closed"):
        a.recv(timeout=0)


def curve_planes(n: int) -> tuple[list[tuple[bytes, bytes]], list[ZmqDataPlane]]:
    keys = [CurveConfig.generate() for _ in range(n)]
    publics = {r: pub for r, (pub, _) in enumerate(keys)}
    ps = [
        ZmqDataPlane(r, LOOPBACK, {}, curve=CurveConfig(pub, sec, {q: k for q, k in publics.items() if q != r}))
        for r, (pub, sec) in enumerate(keys)
    ]
    for p in ps:
        for q in ps:
            p.connect(q.rank, q.endpoint)
    return keys, ps


def test_zmq_curve_encrypted_round_trip():
    _, (a, b) = curve_planes(2)
    with a, b:
        sent = sample_tensors(2)
        a.send(b.rank, {"kind": "hidden"}, sent)
        header, got = b.recv(timeout=5)
        assert header == {"kind": "hidden", "src": a.rank}
        assert_bit_exact(got, sent)
        b.send(a.rank, {"back": 1}, {})
        assert a.recv(timeout=5)[0] == {"back": 1, "src": b.rank}


@pytest.mark.parametrize("who", ["wrong server key", "unknown client key", "no encryption"])
def test_zmq_curve_refuses_outsiders(who):
    ((server_pub, _),), (server,) = curve_planes(1)
    pub, sec = CurveConfig.generate()
    other_pub, _ = CurveConfig.generate()
    if who == "wrong server key":  # a client the server knows, holding the wrong key for it
        server.connect(1, "tcp://127.0.0.1:1", public_key=pub)
        curve = CurveConfig(pub, sec, {0: other_pub})
    elif who == "unknown client key":
        curve = CurveConfig(pub, sec, {0: server_pub})
    else:
        curve = None
    with server, ZmqDataPlane(1, LOOPBACK, {0: server.endpoint}, curve=curve, linger=0.1) as outsider:
        outsider.send(0, {}, {"x": torch.ones(2)})
        with pytest.raises(TimeoutError):
            server.recv(timeout=0.5)


def test_zmq_curve_peer_cannot_pose_as_another_rank():
    keys, (a, b, c) = curve_planes(3)
    with a, b, c:
        c_pub, c_sec = keys[c.rank]
        # A known peer (rank 2's key) claiming to be rank 0.
        impostor = ZmqDataPlane(
            a.rank, LOOPBACK, {b.rank: b.endpoint}, curve=CurveConfig(c_pub, c_sec, {1: keys[1][0]})
        )
        with impostor:
            impostor.send(b.rank, {}, {})
            with pytest.raises(DataPlaneError, match="another rank's CURVE key"):
                b.recv(timeout=5)


# ---------------------------------------------------------------- torch.distributed, real gloo processes

TORCH_CHILD = """
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from pac.net.dataplane import TorchDataPlane
sys.path.insert(0, sys.argv[4])
from test_dataplane import sample_tensors

torch.set_num_threads(1)
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timedelta(seconds=30))
plane = TorchDataPlane(rank)
if rank in (0, 2):
    for i in range(2):
        plane.send(1, {"kind": "hidden", "i": i, "sample_ids": [f"r{rank}-{i}"]}, sample_tensors(10 * rank + i))
    plane.send(1, {"kind": "done"}, {})
else:
    seen, done = {0: 0, 2: 0}, 0
    while done < 2:
        header, tensors = plane.recv(timeout=5)
        if header["kind"] == "done":
            done += 1
            continue
        src, i = header["src"], header["i"]
        assert i == seen[src] and header["sample_ids"] == [f"r{src}-{i}"], header
        want = sample_tensors(10 * src + i)
        assert list(tensors) == list(want)
        for name, w in want.items():
            g = tensors[name]
            assert (g.dtype, g.shape) == (w.dtype, w.shape), name
            assert bytes(g.reshape(-1).view(torch.uint8)) == bytes(w.contiguous().reshape(-1).view(torch.uint8)), name
        seen[src] += 1
    with open(out, "w") as f:
        json.dump(seen, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_torch_plane_over_gloo_processes(tmp_path: Path):
    out = tmp_path / "result.json"
    run_ranks(TORCH_CHILD, 3, out, timeout=60, env={"MASTER_ADDR": "127.0.0.1"})
    assert json.loads(out.read_text()) == {"0": 2, "2": 2}


def test_torch_plane_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("another test left a process group initialised in this process")
    with pytest.raises(DataPlaneError, match="init_process_group"):
        TorchDataPlane(0)


@pytest.mark.parametrize("world, members", [(2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 3])])
def test_ring_all_reduce_over_encrypted_planes_gives_every_rank_the_same_sums(world, members):
    """The collectives that stand in for gloo's where nothing may cross in clear: each rank ends with bit-identical
    sums (data-parallel replicas must stay the same), of float32, float16 and a tensor shorter than the ring. With
    a rank left out of `members` (a phase-1-only peer), the ring goes round the others and never touches it."""
    from pac.net.collective import PlaneCollectives

    _, all_planes = curve_planes(world)
    planes = [all_planes[m] for m in members]
    world = len(members)
    inputs = [
        [torch.randn(1001, generator=torch.Generator().manual_seed(r)), torch.full((2,), float(r + 1))]
        for r in range(world)
    ]
    inputs = [[*xs, xs[0][:77].half()] for xs in inputs]
    results: list[list[torch.Tensor] | None] = [None] * world
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            ring = PlaneCollectives(planes[r], members, timeout=10)
            mine = [x.clone() for x in inputs[r]]
            broadcast = ring.broadcast(torch.full((3,), float(members[r])), src=members[1])
            results[r] = [ring.all_reduce(x) for x in mine] + [broadcast]
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        for p in all_planes:
            p.close()
    assert not errors, errors
    for k in range(3):
        expected = sum(x[k].double() for x in inputs)
        for r in range(world):
            assert torch.equal(results[r][k], results[0][k])  # bit-identical on every rank
            tolerance = 1e-2 if inputs[0][k].dtype == torch.float16 else 1e-5
            torch.testing.assert_close(results[r][k].double(), expected, atol=tolerance, rtol=tolerance)
    assert all(torch.equal(results[r][3], torch.full((3,), float(members[1]))) for r in range(world))
    assert all(p.bytes_sent > 0 for p in planes)
    assert all(p.bytes_sent == 0 for p in all_planes if p not in planes)
