"""The hosts file of `pac-launch --peers hosts.txt`: one peer per line.

    # comment lines, blank lines and trailing comments are ignored
    192.168.1.20                     name=desktop threads=8
    laptop.local:29601               name=laptop max_mem=6g user=me pac=/home/me/.venv/bin/pac
    [fe80::2]:29600                  workdir=/srv/pac
    ::1                              # bare IPv6 takes no port: write [::1]:29601 for one

Each line is `host[:port]` followed by `key=value` fields separated by whitespace; values cannot contain
whitespace or `#`. Every malformed line raises HostsFileError naming `file:line` and saying what to write.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from pac.errors import PacError

DEFAULT_PEER_PORT = 29600
KNOWN_KEYS = ("name", "max_mem", "threads", "user", "pac", "workdir")
_EXAMPLE = "`192.168.1.20:29600 name=desktop max_mem=4g`"
# Hostnames, IPv4 addresses, peer names and ssh users; no leading '-' so none can be read as a command-line option.
_WORD_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_DIGITS_RE = re.compile(r"[0-9]+")
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:(?P<unit>[kmgt])(?:i?b)?|b)?", re.IGNORECASE)
# Units are binary (like `docker --memory`): a memory cap is compared with RAM, which comes in powers of two.
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class HostsFileError(PacError):
    """A hosts file is missing, empty or has a malformed line; the message names the file and line."""


# Builds the error for the line being parsed from (what is wrong, what to write instead).
_Fail = Callable[[str, str], HostsFileError]


@dataclass(frozen=True)
class PeerHost:
    """One peer of the cluster: where its agent listens, and the limits and ssh details for starting it."""

    host: str
    port: int
    name: str
    max_mem: int | None = None
    threads: int | None = None
    user: str | None = None
    pac: str = "pac"
    workdir: str | None = None

    @property
    def address(self) -> str:
        """`host:port`, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint of the peer's agent, e.g. `tcp://192.168.1.20:29600` or `tcp://[::1]:29600`."""
        return f"tcp://{self.address}"

    def describe(self) -> str:
        """The peer as one hosts-file line, every field spelled out (parse_hosts reads it back unchanged)."""
        fields = [self.address, f"name={self.name}"]
        if self.max_mem is not None:
            fields.append(f"max_mem={format_size(self.max_mem)}")
        if self.threads is not None:
            fields.append(f"threads={self.threads}")
        if self.user is not None:
            fields.append(f"user={self.user}")
        if self.pac != "pac":
            fields.append(f"pac={self.pac}")
        if self.workdir is not None:
            fields.append(f"workdir={self.workdir}")
        return " ".join(fields)


def parse_size(text: str) -> int:
    """Bytes in a size like `512m`, `4g`, `4GiB`, `4096MB`, `1.5g` or `1073741824`; units are powers of 1024."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: write a number of bytes or a number with a unit k, m, g or t "
            "(e.g. 512m, 4g, 4GiB, 4096MB; units are powers of 1024)"
        )
    num, unit = match["num"], (match["unit"] or "").lower()
    if not unit and "." in num:
        raise ValueError(f"invalid size {text!r}: a size in bytes must be a whole number; add a unit, e.g. 1.5g")
    size = int(Fraction(num) * _UNITS[unit])  # exact where float would round (1.1g, long digit strings)
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: the size must be above zero")
    return size


def format_size(size: int) -> str:
    """The shortest exact spelling of `size` bytes that parse_size reads back, e.g. 4294967296 -> `4GiB`."""
    for unit, label in (("t", "TiB"), ("g", "GiB"), ("m", "MiB"), ("k", "KiB")):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{label}"
    return str(size)


def read_hosts(path: str | os.PathLike[str]) -> list[PeerHost]:
    """Parse the hosts file at `path` (see the module docstring for the format)."""
    p = Path(path)
    if not p.exists():
        raise HostsFileError(
            f"{p}: no such hosts file; check the path, or create it with one peer per line, e.g. {_EXAMPLE}."
        )
    if p.is_dir():
        raise HostsFileError(f"{p} is a directory; pass the hosts file itself.")
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError as e:
        raise HostsFileError(f"{p}: not valid UTF-8 ({e.reason}); re-save the file as UTF-8.") from e
    return check_distinct_peers(parse_hosts(text, source=str(p)), source=str(p))


def check_distinct_peers(peers: list[PeerHost], source: str = "<hosts>") -> list[PeerHost]:
    """Refuse two lines that reach one agent under two spellings (`localhost:29600`, `127.0.0.1:29600`): the
    coordinator would wait for a second peer that never answers. Hosts that do not resolve here are left to the
    join, which reports them."""
    seen: dict[tuple[str, int], PeerHost] = {}
    for peer in peers:
        try:
            found = socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            continue
        for address in sorted({info[4][0] for info in found}):
            key = (address, peer.port)
            other = seen.setdefault(key, peer)
            if other is not peer:
                raise HostsFileError(
                    f"{source}: {other.address} (name={other.name}) and {peer.address} (name={peer.name}) are "
                    f"the same peer ({address} port {peer.port}); list it once"
                )
    return peers


def parse_hosts(text: str, source: str = "<hosts>") -> list[PeerHost]:
    """Parse hosts-file text into peers, in file order; `source` names the file in error messages."""
    peers: list[PeerHost] = []
    seen_addresses: dict[tuple[str, int], int] = {}
    seen_names: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue

        fail = functools.partial(_line_error, source, lineno, raw)
        host, port = _parse_address(tokens[0], fail)
        fields = _parse_fields(tokens[1:], fail)
        name = fields.pop("name", None) or _default_name(host, port)
        peer = PeerHost(host=host, port=port, name=name, **fields)

        key = (host.lower(), port)
        if key in seen_addresses:
            raise fail(
                f"peer {peer.address} is already listed on line {seen_addresses[key]}",
                "list each peer once (run several agents on one host by giving each its own port)",
            )
        if name in seen_names:
            raise fail(
                f"name {name!r} is already used by line {seen_names[name]}",
                "give each peer a distinct name=",
            )
        seen_addresses[key] = seen_names[name] = lineno
        peers.append(peer)
    if not peers:
        raise HostsFileError(f"{source}: no peers listed; add one line per peer, e.g. {_EXAMPLE}.")
    return peers


def _line_error(source: str, lineno: int, line: str, problem: str, fix: str) -> HostsFileError:
    return HostsFileError(f"{source}:{lineno}: {line.strip()!r}: {problem}; {fix}.")


def _parse_address(token: str, fail: _Fail) -> tuple[str, int]:
    """`host`, `host:port`, `[ipv6]`, `[ipv6]:port` or bare `ipv6` -> (host, port)."""
    if "=" in token:
        raise fail("the line must start with the peer's host[:port]", f"write the host first, e.g. {_EXAMPLE}")
    if "://" in token:
        raise fail(f"{token!r} is a URL", "write host[:port] without the scheme, e.g. 192.168.1.20:29600")
    if token.startswith("["):
        inside, bracket, rest = token[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise fail(f"malformed bracketed address {token!r}", "write an IPv6 address as [addr] or [addr]:port")
        return _ipv6(inside, fail), (_parse_port(rest[1:], fail) if rest else DEFAULT_PEER_PORT)
    if token.count(":") > 1:
        return _ipv6(token, fail), DEFAULT_PEER_PORT
    host, colon, port_text = token.partition(":")
    if "@" in host:
        user, _, bare = host.rpartition("@")
        raise fail(f"{host!r} mixes a user into the host", f"write the host alone and add user={user}, e.g. {bare}")
    if not _WORD_RE.fullmatch(host):
        raise fail(f"{host!r} is not a hostname or IP address", "write a host like laptop.local or 192.168.1.20")
    return host, (_parse_port(port_text, fail) if colon else DEFAULT_PEER_PORT)


def _ipv6(text: str, fail: _Fail) -> str:
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise fail(
            f"{text!r} is not a valid IPv6 address",
            "write IPv6 as a bare address (default port) or as [addr]:port, e.g. [fe80::2]:29600",
        ) from None


def _parse_port(text: str, fail: _Fail) -> int:
    if not _DIGITS_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise fail(f"bad port {text!r}", f"write a port number from 1 to 65535, or omit it for {DEFAULT_PEER_PORT}")
    return int(text)


def _parse_fields(tokens: list[str], fail: _Fail) -> dict[str, str | int]:
    """`key=value` tokens -> PeerHost keyword arguments, each value checked."""
    fields: dict[str, str | int] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq:
            raise fail(f"field {token!r} has no '='", "write fields as key=value (e.g. threads=4), one peer per line")
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key.lower().replace("-", "_"), KNOWN_KEYS, n=1)
            hint = f"did you mean {close[0]}=? " if close else ""
            raise fail(f"unknown key {key!r}", f"{hint}known keys are {', '.join(KNOWN_KEYS)}")
        if not value:
            raise fail(f"{key}= has no value", f"write {key}=VALUE, or drop the field to use the default")
        if key in fields:
            raise fail(f"{key}= is given twice", f"keep one {key}= per line")
        fields[key] = _parse_value(key, value, fail)
    return fields


def _parse_value(key: str, value: str, fail: _Fail) -> str | int:
    if key == "max_mem":
        try:
            return parse_size(value)
        except ValueError:
            raise fail(
                f"max_mem={value} is not a size above zero",
                "write bytes or a number with a unit k, m, g or t (powers of 1024), e.g. max_mem=4g or max_mem=512m",
            ) from None
    if key == "threads":
        if not _DIGITS_RE.fullmatch(value) or int(value) < 1:
            raise fail(f"threads={value} is not a positive whole number", "write e.g. threads=4")
        return int(value)
    if key == "name" and not _WORD_RE.fullmatch(value):
        raise fail(
            f"name {value!r} is not a plain word", "use letters, digits, '.', '_' and '-' (not first), e.g. name=laptop"
        )
    if key == "user" and not _WORD_RE.fullmatch(value):
        raise fail(f"user {value!r} is not a valid ssh user name", "write the login name alone, e.g. user=me")
    return value


def _default_name(host: str, port: int) -> str:
    """`host-port` with anything but letters, digits, '.', '_' and '-' collapsed to '-' (`::1` -> `1-29600`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{host}-{port}").strip("-")
