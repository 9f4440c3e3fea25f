"""Delay for one simulated device's link, in user space (this kernel has no `tc netem`).

    python deploy/tap_relay.py HOST_TAP NAMESPACE DEVICE_TAP DELAY_MS

Opens HOST_TAP (in this namespace, a port of the home's bridge), enters NAMESPACE and opens DEVICE_TAP (the
device's network card there), then forwards every Ethernet frame between the two, each held DELAY_MS before it
is passed on: one way in each direction, so a round trip through this link takes 2 x DELAY_MS longer. The
rate limit is tc tbf on the two taps, as on any interface. Started and stopped by deploy/home.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def enter_namespace(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ns = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    if libc.setns(ns, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"cannot enter network namespace {name}")
    os.close(ns)


def relay(host: int, device: int, delay: float) -> None:
    pending: list[tuple[float, int, int, bytes]] = []  # (when to pass it on, order, to, frame)
    order = 0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select([host, device], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            to = device if fd == host else host
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                heapq.heappush(pending, (now + delay, order, to, frame))
                order += 1
        while pending and pending[0][0] <= now:
            _, _, to, frame = heapq.heappop(pending)
            with contextlib.suppress(OSError):  # a full queue drops the frame, as a congested link would
                os.write(to, frame)


def main() -> None:
    host_tap, namespace, device_tap, delay_ms = sys.argv[1:5]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host = open_tap(host_tap)
    enter_namespace(namespace)
    device = open_tap(device_tap)
    print("ready", flush=True)
    relay(host, device, float(delay_ms) / 1000)


if __name__ == "__main__":
    main()
