"""Random and mutated control frames at a run's processes, from a process of their own (so that what it holds is
not counted as theirs when their memory is measured). Used by test_collaborative.

    python control_fuzzer.py peers COUNT SEED ENDPOINT...   prints "ready", then sends COUNT frames at each peer
    python control_fuzzer.py coordinator COUNT SEED         a "peer" the coordinator reaches: prints its port,
                                                            answers the coordinator's hello with COUNT frames
The join token comes from $PAC_JOIN_TOKEN. Every 1,000th frame is over the size limit. When done it prints how
many frames it sent, then waits for its standard input to close.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time

import msgpack
import zmq

from pac.net import auth, protocol

PEER_BOUND = [  # what a coordinator sends
    protocol.encode("heartbeat", usage={}),
    protocol.encode("hello", nonce=auth.new_nonce()),
    protocol.encode("welcome", proof=b"\x00" * 32, rank=0),
    protocol.encode("assign", assignment={"rank": 0}),
    protocol.encode("shutdown", reason="go away"),
    protocol.encode("probe", seq=1, payload=b"x"),
]
COORDINATOR_BOUND = [  # what peers send; the join's proof is wrong
    protocol.encode(
        "join",
        name="fuzz",
        profile={"max_mem": 1},
        nonce=b"n" * 16,
        proof=b"\x00" * 32,
        data_endpoint="tcp://127.0.0.1:1",
        data_key=b"k" * 40,
    ),  # fmt: skip
    protocol.encode("progress", phase="train", done=1, total=2, rate=1.0, metrics={"loss": 1.5}),
    protocol.encode("progress", phase="epoch", done=1, total=2, rate=0.0, metrics={"val_loss": "low", "x": [1]}),
    protocol.encode("heartbeat", usage={"rss": "lots", "sent": -1, "other": {"a": 1}}),
    protocol.encode("file", name="adapter_model.safetensors", offset=0, chunk=b"x", last=True),
    protocol.encode("finished", summary={"epochs": []}),
    protocol.encode("failed", reason="Connection reset by peer"),
    protocol.encode("profiled", profile={}),
]


def fuzz_frames(count: int, seed: int, valid: list[bytes] = PEER_BOUND) -> list[bytes]:
    """Random bytes, mutated and truncated `valid` messages, unknown kinds, wrong field types, replays."""
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            frames.append(rng.randbytes(rng.randint(0, 300)))
        elif kind == 1:  # one valid message with a few bytes flipped
            raw = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            frames.append(bytes(raw))
        elif kind == 2:
            raw = rng.choice(valid)
            frames.append(raw[: rng.randrange(len(raw))])
        elif kind == 3:
            frames.append(msgpack.packb({"type": f"kind-{rng.randrange(1000)}", "version": protocol.PROTOCOL_VERSION}))
        elif kind == 4:
            fields = {"type": "hello", "version": protocol.PROTOCOL_VERSION, "nonce": rng.choice([7, "x", None, [1]])}
            frames.append(msgpack.packb(fields))
        else:
            frames.append(rng.choice(valid))  # replayed, from a sender that never joined
    return frames


def _oversized(i: int, frame: bytes) -> bytes:
    return b"\x00" * (protocol.MAX_CONTROL_BYTES + 1) if i % 1000 == 999 else frame


def at_peers(count: int, seed: int, endpoints: list[str], token: str) -> int:
    ctx = zmq.Context()
    sockets = []
    for endpoint in endpoints:
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.SNDHWM, 100_000)
        auth.connect_encrypted(rogue, token)
        rogue.connect(endpoint)
        sockets.append(rogue)
    print("ready", flush=True)
    sent = 0
    for i, frame in enumerate(fuzz_frames(count, seed)):
        for rogue in sockets:
            rogue.send(_oversized(i, frame))
            sent += 1
        time.sleep(0.0005)
    _until_released(sent)  # the sockets stay open meanwhile: what they queue still goes out
    return sent


def at_coordinator(count: int, seed: int, token: str) -> int:
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    auth.serve_encrypted(server, token)
    print(server.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    coordinator = server.recv_multipart()[0]  # its first hello
    sent = 0
    for i, frame in enumerate(fuzz_frames(count, seed, COORDINATOR_BOUND)):
        with contextlib.suppress(zmq.ZMQError):  # its connection dropped for an oversized frame, not back yet
            server.send_multipart([coordinator, _oversized(i, frame)], zmq.NOBLOCK)
        sent += 1
        while server.poll(0):  # its error replies
            server.recv_multipart()
        time.sleep(0.0005)
    _until_released(sent)
    return sent


def _until_released(sent: int) -> None:
    print(sent, flush=True)
    sys.stdin.read()  # until the test is done with the run


def main() -> None:
    mode, count, seed, *endpoints = sys.argv[1:]
    token = auth.token_from_env()
    if mode == "peers":
        at_peers(int(count), int(seed), endpoints, token)
    else:
        at_coordinator(int(count), int(seed), token)


if __name__ == "__main__":
    main()
