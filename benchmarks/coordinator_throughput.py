"""How many control messages the coordinator handles per second, alone and under a flood of garbage (issue "A home
cluster that survives its devices", point 6).

A real `Coordinator` (pac.runtime.coordinator) joins one authenticated peer, played here by a CURVE server that
holds the join token and proves it, and then waits in its own control loop (`Coordinator._wait`: heartbeats, the
live view, loss detection, latecomers) while that peer sends `progress` messages as fast as ZeroMQ takes them.
The figure is messages handled per second, from the first sent to the last seen. "Under fuzz", a second "peer" of
the hosts file, also holding the token, floods the coordinator at the same time with random and mutated frames
of what peers send (every 1,000th over the size limit), each answered with an error and a log line.

    python benchmarks/coordinator_throughput.py [--messages 20000] [--repeats 3]
Writes benchmarks/results/coordinator_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import statistics
import threading
import time
from pathlib import Path

import msgpack
import zmq

from pac.net import auth, protocol
from pac.net.hosts import PeerHost
from pac.runconfig import ClusterOptions, TrainOptions
from pac.runtime.coordinator import Coordinator

RESULTS = Path(__file__).resolve().parent / "results"


def _server(ctx: zmq.Context, token: str, name: str) -> tuple[zmq.Socket, PeerHost]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    auth.serve_encrypted(sock, token)
    return sock, PeerHost("127.0.0.1", sock.bind_to_random_port("tcp://127.0.0.1"), name)


def _garbage(rng: random.Random) -> bytes:
    valid = [
        protocol.encode("progress", phase="train", done=1, total=2, rate=1.0),
        protocol.encode("finished", summary={}),
        protocol.encode("file", name="x", offset=0, chunk=b"x", last=True),
    ]
    pick = rng.randrange(4)
    if pick == 0:
        return rng.randbytes(rng.randint(0, 300))
    raw = bytearray(rng.choice(valid))
    if pick == 1:
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if pick == 2:
        return bytes(raw[: rng.randrange(len(raw))])
    return msgpack.packb({"type": f"kind-{rng.randrange(1000)}", "version": protocol.PROTOCOL_VERSION})


def measure(messages: int, fuzz: bool) -> dict:
    token = auth.new_token()
    ctx = zmq.Context()
    meter, meter_host = _server(ctx, token, "meter")
    hosts = [meter_host]
    flooding, sent_garbage = threading.Event(), [0]
    if fuzz:
        fuzzer, fuzz_host = _server(ctx, token, "fuzz")
        hosts.append(fuzz_host)
    options = TrainOptions()
    cluster = ClusterOptions(join_timeout=5, min_peers=1)
    coordinator = Coordinator(hosts, token, options, cluster, display=io.StringIO())

    def flood() -> None:
        coordinator_id = fuzzer.recv_multipart()[0]  # its hello
        rng = random.Random(0)
        while not flooding.is_set():
            for i in range(1000):
                frame = b"\x00" * (protocol.MAX_CONTROL_BYTES + 1) if i == 999 else _garbage(rng)
                try:
                    fuzzer.send_multipart([coordinator_id, frame], zmq.NOBLOCK)
                    sent_garbage[0] += 1
                except zmq.ZMQError:
                    pass
            while fuzzer.poll(0):
                fuzzer.recv_multipart()

    def answer_hello() -> None:
        coordinator_id, frame = meter.recv_multipart()
        hello = protocol.decode(frame)
        join = protocol.encode(
            "join",
            name="meter",
            profile={"max_mem": 10**9},
            nonce=auth.new_nonce(),
            proof=auth.proof(token, "peer", hello["nonce"]),
            data_endpoint="tcp://127.0.0.1:1",
            data_key=b"k" * 40,
        )
        meter.send_multipart([coordinator_id, join])
        answered.append(coordinator_id)

    answered: list[bytes] = []
    helper = threading.Thread(target=answer_hello)
    helper.start()
    flooder = threading.Thread(target=flood) if fuzz else None
    if flooder is not None:
        flooder.start()
    (member,) = coordinator._join(list(coordinator.peers.values()))[:1]
    helper.join()
    if flooder is not None:
        time.sleep(1.0)  # the flood under way
    started = time.perf_counter()
    for i in range(1, messages + 1):
        progress = protocol.encode("progress", phase="train", done=i, total=messages, rate=0.0)
        meter.send_multipart([answered[0], progress])
    coordinator._wait([member], lambda: member.progress[1] == messages)
    seconds = time.perf_counter() - started
    flooding.set()
    if flooder is not None:
        flooder.join()
    coordinator.close()
    meter.close(0)
    if fuzz:
        fuzzer.close(0)
    ctx.term()
    return {"messages": messages, "seconds": seconds, "per_second": messages / seconds, "garbage": sent_garbage[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the flood's log lines are the coordinator's work, not the figure's
    rows = {}
    for name, fuzz in (("alone", False), ("under fuzz", True)):
        runs = [measure(args.messages, fuzz) for _ in range(args.repeats)]
        rows[name] = {
            "per_second": statistics.median(r["per_second"] for r in runs),
            "runs": runs,
        }
        print(name, json.dumps(rows[name]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "coordinator_throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "Control messages the coordinator handles per second from an authenticated peer, in its own control loop "
        f"(`progress` messages, {args.messages:,} per run, median of {args.repeats}); under fuzz a second peer of the "
        "hosts file floods it at the same time with random and mutated frames (every 1,000th over the size limit). "
        "Regenerate: `python benchmarks/coordinator_throughput.py`.",
        "",
        "| load | messages/s | garbage frames sent during the runs |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        garbage = sum(r["garbage"] for r in row["runs"])
        lines.append(f"| {name} | {row['per_second']:,.0f} | {garbage:,} |")
    ratio = rows["under fuzz"]["per_second"] / rows["alone"]["per_second"]
    lines += ["", f"Under fuzz the coordinator keeps {ratio:.0%} of its throughput."]
    (RESULTS / "coordinator_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
