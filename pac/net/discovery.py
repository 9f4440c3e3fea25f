"""Finding pac peers on the home network without typing addresses (`pac-launch --discover`).

`pac peer` advertises itself over mDNS / DNS-SD (service `_pac._tcp.local.`, through the zeroconf package) with its
name, port, pac's protocol version and a summary of its device, never the join token. Whether an advertised peer
belongs to this run is settled by the encrypted handshake (pac.net.auth): `check_peer` says hello as a coordinator
would and accepts only a join that proves the same token, so a neighbour's pac, or anything else that advertises
the service, is listed as refused and never used.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field

import psutil
import zmq

from pac.net import auth, protocol

SERVICE_TYPE = "_pac._tcp.local."
CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Found:
    """A peer that answered, as it advertised itself."""

    name: str
    host: str
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    def hosts_line(self) -> str:
        """This peer as a line of a hosts file (pac.net.hosts)."""
        return f"{self.host}:{self.port} name={self.name}"

    def summary(self) -> str:
        p = self.properties
        parts = [f"pac {p.get('pac', '?')}", *(f"{p[k]} {k}" for k in ("cores", "threads") if k in p)]
        parts += [f"{p['memory_gb']} GB"] if "memory_gb" in p else []
        parts += [p["device"]] if "device" in p else []
        parts += [p["role"]] if "role" in p else []  # "phase 1 only" (`pac peer --phase1-only`)
        return f"{self.name} at {self.host}:{self.port} ({', '.join(parts)})"


def local_addresses(include_loopback: bool) -> list[str]:
    """This machine's IPv4 addresses (its loopback too if asked)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET:
                loopback = ipaddress.ip_address(address.address).is_loopback
                if include_loopback or not loopback:
                    found.append(address.address)
    return sorted(set(found))


def _zeroconf(addresses: list[str]):
    from zeroconf import IPVersion, Zeroconf

    return Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)


class Advertisement:
    """This peer on the network's mDNS until `close()`: on the address it listens on, or on every address of the
    machine where it listens on all (0.0.0.0)."""

    def __init__(self, name: str, listen_host: str, port: int, properties: dict[str, str]):
        from zeroconf import ServiceInfo

        every = listen_host in ("0.0.0.0", "::", "*", "")
        addresses = local_addresses(include_loopback=False) if every else [listen_host]
        self.zeroconf = _zeroconf(addresses or ["127.0.0.1"])
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{_label(name)}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses or ["127.0.0.1"]],
            port=port,
            properties={"name": name, **properties},
            server=f"{_label(name)}.local.",
        )
        self.zeroconf.register_service(self.info, allow_name_change=True)

    def close(self) -> None:
        self.zeroconf.unregister_service(self.info)
        self.zeroconf.close()


def discover(wait: float) -> list[Found]:
    """Every pac peer that answers within `wait` seconds on any of this machine's addresses, loopback included."""
    from zeroconf import ServiceBrowser, ServiceListener

    names: list[str] = []

    class Listener(ServiceListener):
        def add_service(self, zc, type_, name):  # noqa: D102 (zeroconf's API)
            names.append(name)

        def update_service(self, zc, type_, name):  # noqa: D102
            pass

        def remove_service(self, zc, type_, name):  # noqa: D102
            pass

    zeroconf = _zeroconf(local_addresses(include_loopback=True))
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, Listener())
        time.sleep(wait)
        browser.cancel()
        found = []
        for name in dict.fromkeys(names):
            info = zeroconf.get_service_info(SERVICE_TYPE, name, timeout=1000)
            if info is None or not info.parsed_addresses():
                continue
            properties = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            peer = properties.get("name") or name.removesuffix(f".{SERVICE_TYPE}")
            found.append(Found(peer, info.parsed_addresses()[0], info.port, properties))
        return sorted(found, key=lambda f: (f.name, f.host, f.port))
    finally:
        zeroconf.close()


def check_peer(found: Found, token: str, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """None where the peer answers hello with a join that proves `token`; else why it cannot be used."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_CONTROL_BYTES)
    auth.connect_encrypted(sock, token)
    try:
        sock.connect(f"tcp://{found.host}:{found.port}")
        nonce = auth.new_nonce()
        sock.send(protocol.encode("hello", nonce=nonce))
        if not sock.poll(int(timeout * 1000)):
            return "no answer to the encrypted handshake: another PAC_JOIN_TOKEN, or not a pac peer"
        try:
            message = protocol.decode(sock.recv())
        except protocol.ProtocolError as exc:
            return f"answered with something pac cannot read: {exc}"
        if message["type"] == "error":
            return f"busy: {message['reason']}"
        if message["type"] != "join" or not auth.verify(token, "peer", nonce, message["proof"]):
            return "its answer does not prove the join token"
        return None
    finally:
        sock.close(0)


def _label(name: str) -> str:
    """A DNS label of the peer's name (letters, digits and dashes, at most 63 characters)."""
    label = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    return (label or "pac-peer")[:63]
