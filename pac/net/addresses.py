"""Which local address and interface lead to another machine (for rendezvous and gloo)."""

from __future__ import annotations

import socket

import psutil


def local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (connecting a UDP socket sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def interface_of(address: str) -> str | None:
    """The network interface holding `address` (e.g. "eth0", "lo"), or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None
