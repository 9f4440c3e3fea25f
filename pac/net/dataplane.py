"""Phase-1 data plane: a small header plus named tensors, sent from one pipeline stage to another.

One interface (:class:`DataPlane`), two implementations:

* :class:`ZmqDataPlane`: ZeroMQ PUSH/PULL over TCP, for home devices that share no process group. Each plane
  binds one PULL socket and opens a PUSH socket per peer on first send; optional CURVE encryption.
* :class:`TorchDataPlane`: point-to-point ``torch.distributed`` send/recv over an existing process group
  (gloo on CPU, NCCL between GPUs).

Both put the same msgpack header on the wire, ``{"v": 1, "src": rank, "h": caller header, "t": [[name, dtype,
shape, nbytes, crc32], ...]}``, followed by one frame per tensor holding the raw bytes of ``t.contiguous()``: the
tensor entries and frames of :mod:`pac.net.codec`. The receiver checks the header, the frame count, the sizes,
the dtypes and (ZeroMQ) the CRC32 of every frame before it builds a tensor, so garbage on the wire is a
:class:`DataPlaneError`, never a crash inside torch.
Messages from one sender to one receiver arrive in the order they were sent.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import torch
import torch.distributed as dist
import zmq
from zmq.auth.thread import ThreadAuthenticator

from pac.errors import PacError
from pac.net import codec
from pac.net.codec import CodecError, TensorSpec

WIRE_VERSION = 1
# Headers carry sample ids and a few numbers; a bigger one is garbage or a bug.
MAX_HEADER_BYTES = 1 << 20
# Distinct tags keep any-source receives of the torch plane off data frames and off other users' sends.
_TAG_HEAD = 0x7AC0
_TAG_DATA = 0x7AC1

Message = tuple[dict[str, Any], dict[str, torch.Tensor]]


class DataPlaneError(PacError):
    """A data-plane message could not be sent, or arrived malformed; the message names the peer."""


class DataPlane(Protocol):
    """Sends (header, named tensors) to another rank and receives them from any rank.

    The delivered header is the sender's, plus ``src``: the sender's rank (set by the plane, overriding any
    ``src`` the caller put in). Tensors arrive bit-exact with their dtype and shape, on CPU unless the plane
    says otherwise.
    """

    rank: int
    bytes_sent: int  # everything this plane has sent so far (headers and tensors)

    def send(self, dest: int, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None: ...

    def recv(self, timeout: float | None = None) -> Message: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- wire format, shared by both planes


def _garbage(sender: str, what: str) -> DataPlaneError:
    return DataPlaneError(
        f"garbage or truncated data-plane message from {sender}: {what}. The message was dropped; if this repeats, "
        "check that every device runs the same pac version and that nothing else sends to this port"
    )


def encode_message(
    src: int, header: dict[str, Any], tensors: dict[str, torch.Tensor], *, device: torch.device, crc: bool
) -> tuple[bytes, list[torch.Tensor]]:
    """The header frame and one flat uint8 frame per tensor (moved to ``device``), in ``tensors`` order."""
    if not isinstance(header, dict):
        raise DataPlaneError(f"a data-plane header must be a dict, got {type(header).__name__}")
    try:
        entries, frames = codec.encode(tensors, crc=crc, device=device)
    except CodecError as e:
        raise DataPlaneError(str(e)) from None
    try:
        head = msgpack.packb({"v": WIRE_VERSION, "src": src, "h": header, "t": entries})
    except (TypeError, ValueError, OverflowError) as e:
        raise DataPlaneError(
            f"the data-plane header cannot be packed ({e}): use only str, int, float, bool, None, lists and "
            "dicts with str keys"
        ) from e
    if len(head) > MAX_HEADER_BYTES:
        raise DataPlaneError(
            f"the data-plane header is {len(head)} bytes, above {MAX_HEADER_BYTES}: send bulk data as tensors"
        )
    return head, frames


def decode_header(data: Any, sender: str) -> tuple[int, dict[str, Any], list[TensorSpec]]:
    """(claimed sender rank, caller header, tensor specs) from a header frame, or DataPlaneError."""
    if len(data) > MAX_HEADER_BYTES:
        raise _garbage(sender, f"header of {len(data)} bytes, above {MAX_HEADER_BYTES}")
    try:
        msg = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises a zoo of types on junk; all mean the same here
        raise _garbage(sender, f"header does not decode ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict):
        raise _garbage(sender, "header is not a map")
    if msg.get("v") != WIRE_VERSION:
        raise _garbage(sender, f"wire version {msg.get('v')!r}, this device speaks {WIRE_VERSION}")
    src, header, entries = msg.get("src"), msg.get("h"), msg.get("t")
    if type(src) is not int or src < 0:  # type(), not isinstance(): True is no rank
        raise _garbage(sender, f"sender rank {src!r} is not a rank")
    if not isinstance(header, dict) or not isinstance(entries, list):
        raise _garbage(sender, "header lacks the caller header or the tensor list")
    try:
        return src, header, codec.parse_header(entries)
    except CodecError as e:
        raise _garbage(sender, str(e)) from None


# ---------------------------------------------------------------- ZeroMQ


@dataclass
class CurveConfig:
    """CURVE keys for an encrypted ZeroMQ data plane, z85-encoded (40 bytes) as :meth:`generate` makes them.

    ``public_key``/``secret_key`` are this rank's pair: its PULL socket serves with them and its PUSH sockets
    use them as clients. ``peer_public_keys`` maps the other ranks to their public keys: the server key used
    when sending to that rank, and the only client keys this rank accepts messages from.
    """

    public_key: bytes
    secret_key: bytes
    peer_public_keys: dict[int, bytes]

    def __post_init__(self) -> None:
        _check_key("public_key", self.public_key)
        _check_key("secret_key", self.secret_key)
        for r, k in self.peer_public_keys.items():
            _check_key(f"public key of rank {r}", k)

    @staticmethod
    def generate() -> tuple[bytes, bytes]:
        """A fresh (public, secret) key pair."""
        return zmq.curve_keypair()


def _check_key(what: str, key: Any) -> None:
    if not isinstance(key, bytes) or len(key) != 40:
        raise DataPlaneError(f"CURVE {what} must be 40 z85 bytes, as CurveConfig.generate() returns")


class _KnownClients:
    """ZAP credentials provider: only keys in the CURVE config may connect (read live, so connect() can add)."""

    def __init__(self, curve: CurveConfig):
        self.curve = curve

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.curve.public_key or key in self.curve.peer_public_keys.values()


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "an unknown address"


class ZmqDataPlane:
    """Data plane over ZeroMQ PUSH/PULL sockets on TCP.

    ``bind`` is this rank's endpoint (``tcp://host:port``; port 0 picks a free one, see :attr:`endpoint`);
    ``peers`` maps ranks to their endpoints (more via :meth:`connect`).

    Back-pressure: each PUSH socket queues at most ``hwm`` messages and the PULL socket at most ``hwm`` more
    (plus what the kernel's TCP buffers hold), so :meth:`send` blocks while the receiver lags, and also while
    it is down, until it comes back. ``max_message_bytes`` is the largest frame (one tensor, or the header):
    the receiver drops a connection that sends a bigger one (the message is lost, the sender reconnects), and
    :meth:`send` refuses one up front. :meth:`close` flushes queued messages for at most ``linger`` seconds.
    With ``curve`` all traffic is encrypted, and only ranks whose keys the config lists can deliver, each
    only under its own rank.

    Tensors are sent zero-copy: the plane may still be reading a tensor after :meth:`send` returns, so do not
    modify it in place afterwards (a changed tensor fails the receiver's checksum). Received tensors share
    memory with the message they came in. :meth:`send` and :meth:`recv` may run on two different threads, but
    neither on two threads at once.
    """

    def __init__(
        self,
        rank: int,
        bind: str,
        peers: dict[int, str],
        *,
        hwm: int = 4,
        max_message_bytes: int = 1 << 30,
        curve: CurveConfig | None = None,
        linger: float = 2.0,
    ):
        if hwm < 1 or max_message_bytes < 1:
            raise DataPlaneError(f"hwm and max_message_bytes must be >= 1, got {hwm} and {max_message_bytes}")
        self.rank = rank
        self.bytes_sent = 0  # headers and tensor bytes, for the traffic figures
        self.hwm = hwm
        self.max_message_bytes = max_message_bytes
        self._linger_ms = max(0, int(linger * 1000))
        self._peers = dict(peers)
        # A private copy: connect() adds keys to it, the caller's config stays as given.
        self._curve = dataclasses.replace(curve, peer_public_keys=dict(curve.peer_public_keys)) if curve else None
        self._push: dict[int, zmq.Socket] = {}
        self._closed = False
        # One context per plane: ZAP handlers are per context, and term() bounds close() by the linger.
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._pull = self._ctx.socket(zmq.PULL)
        try:
            if self._curve is not None:
                # The authenticator must be up before the socket binds, or clients are let in unchecked.
                self._auth = ThreadAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve_callback("*", credentials_provider=_KnownClients(self._curve))
            self._pull.setsockopt(zmq.RCVHWM, hwm)
            self._pull.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
            self._pull.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._pull.curve_server = True
                self._pull.curve_secretkey = self._curve.secret_key
                self._pull.curve_publickey = self._curve.public_key
            self._pull.bind(bind)
        except zmq.ZMQError as e:
            self._teardown()
            raise DataPlaneError(f"rank {rank} cannot bind its data plane at {bind!r}: {e}; pick another port") from e
        self.endpoint: str = self._pull.getsockopt(zmq.LAST_ENDPOINT).decode()

    def connect(self, rank: int, endpoint: str, public_key: bytes | None = None) -> None:
        """Set (or change) where ``rank`` listens, and with CURVE its public key; takes effect on the next send."""
        if public_key is not None:
            if self._curve is None:
                raise DataPlaneError(f"a public key was given for rank {rank}, but this data plane is not encrypted")
            _check_key(f"public key of rank {rank}", public_key)
            self._curve.peer_public_keys[rank] = public_key
        self._peers[rank] = endpoint
        old = self._push.pop(rank, None)
        if old is not None:
            old.close()  # what it still queues drains for up to `linger` in the background

    def send(self, dest: int, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Queue a message for ``dest``; blocks while ``hwm`` messages already wait for it (see the class doc)."""
        self._check_open()
        head, frames = encode_message(self.rank, header, tensors, device=torch.device("cpu"), crc=True)
        for name, frame in zip(tensors, frames, strict=True):
            if frame.numel() > self.max_message_bytes:
                raise DataPlaneError(
                    f"tensor {name!r} is {frame.numel()} bytes, above max_message_bytes={self.max_message_bytes}, "
                    "so the receiver would drop it: send a smaller batch or raise max_message_bytes on every rank"
                )
        if len(head) > self.max_message_bytes:
            raise DataPlaneError(f"the header is {len(head)} bytes, above max_message_bytes={self.max_message_bytes}")
        self._socket_for(dest).send_multipart([head, *map(codec.buffer, frames)], copy=False)
        self.bytes_sent += len(head) + sum(f.numel() for f in frames)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message from any peer; TimeoutError after ``timeout`` seconds (None: wait forever)."""
        self._check_open()
        if timeout is not None and not self._pull.poll(max(0, int(timeout * 1000))):
            raise TimeoutError(f"rank {self.rank} received no data-plane message within {timeout:g} s")
        return self._decode(self._pull.recv_multipart(copy=False))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._teardown()

    def __enter__(self) -> ZmqDataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _teardown(self) -> None:
        for sock in self._push.values():
            sock.close()
        self._pull.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()  # returns once queued messages are sent or `linger` has passed

    def _check_open(self) -> None:
        if self._closed:
            raise DataPlaneError(f"the data plane of rank {self.rank} is closed")

    def _socket_for(self, dest: int) -> zmq.Socket:
        sock = self._push.get(dest)
        if sock is not None:
            return sock
        endpoint = self._peers.get(dest)
        if endpoint is None:
            raise DataPlaneError(
                f"rank {self.rank} knows no data-plane endpoint for rank {dest} (it knows {sorted(self._peers)}): "
                "pass it in peers or call connect()"
            )
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        if self._curve is not None:
            server_key = self._curve.public_key if dest == self.rank else self._curve.peer_public_keys.get(dest)
            if server_key is None:
                sock.close(linger=0)
                raise DataPlaneError(f"no CURVE public key for rank {dest}: add it to peer_public_keys or connect()")
            sock.curve_secretkey = self._curve.secret_key
            sock.curve_publickey = self._curve.public_key
            sock.curve_serverkey = server_key
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise DataPlaneError(f"bad data-plane endpoint {endpoint!r} for rank {dest}: {e}") from e
        self._push[dest] = sock
        return sock

    def _decode(self, frames: list[zmq.Frame]) -> Message:
        address = _peer_address(frames[0])
        src, header, specs = decode_header(frames[0].buffer, address)
        sender = f"rank {src} at {address}"
        if self._curve is not None:
            # Authenticated key must be the claimed rank's: any allowed peer could otherwise pose as another.
            user = frames[0].get("User-Id").encode()
            expected = self._curve.public_key if src == self.rank else self._curve.peer_public_keys.get(src)
            if user != expected:
                raise _garbage(sender, "it was sent with another rank's CURVE key")
        try:
            tensors = codec.decode(specs, [f.buffer for f in frames[1:]], require_crc=True)
        except CodecError as e:
            raise _garbage(sender, str(e)) from None
        return {**header, "src": src}, tensors


# ---------------------------------------------------------------- torch.distributed


class TorchDataPlane:
    """Data plane over an initialised ``torch.distributed`` process group; ``rank`` is the global rank.

    Tensors travel on ``device``: the CPU for gloo, the current CUDA device for NCCL; received tensors are
    there too. With gloo, :meth:`send` returns only once the receiver has posted the matching receive, so
    two ranks that send to each other at the same moment deadlock unless they receive on another thread
    (concurrent send and recv on two threads work). NCCL cannot receive from any source: pass ``src`` to
    :meth:`recv` there. A malformed header (only possible between mismatched pac versions) leaves that
    sender's stream unusable.
    """

    def __init__(self, rank: int, group: Any = None, *, device: torch.device | str = "cpu"):
        if not dist.is_available() or not dist.is_initialized():
            raise DataPlaneError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group() first"
            )
        if rank != dist.get_rank():
            raise DataPlaneError(f"TorchDataPlane was given rank {rank}, but this process is rank {dist.get_rank()}")
        self.rank = rank
        self.group = group
        self.device = torch.device(device)
        self.bytes_sent = 0  # headers and tensor bytes, for the traffic figures

    def send(self, dest: int, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if dest == self.rank:
            raise DataPlaneError(f"rank {self.rank} cannot send to itself over torch.distributed")
        head, frames = encode_message(self.rank, header, tensors, device=self.device, crc=False)
        length = torch.tensor([len(head)], dtype=torch.int64, device=self.device)
        head_t = torch.frombuffer(bytearray(head), dtype=torch.uint8).to(self.device)
        try:
            dist.send(length, dest, group=self.group, tag=_TAG_HEAD)
            dist.send(head_t, dest, group=self.group, tag=_TAG_DATA)
            for frame in frames:
                if frame.numel():  # empty tensors travel in the header alone
                    dist.send(frame, dest, group=self.group, tag=_TAG_DATA)
        except RuntimeError as e:
            raise DataPlaneError(f"rank {self.rank} could not send to rank {dest} ({e}): is it still running?") from e
        self.bytes_sent += length.numel() * 8 + len(head) + sum(f.numel() for f in frames)

    def recv(self, timeout: float | None = None, src: int | None = None) -> Message:
        """The next message, from ``src`` or (gloo only) any rank.

        ``timeout`` is accepted for the interface and ignored: torch.distributed has no per-call receive
        timeout, only the process group's (``init_process_group(timeout=...)``), after which this raises.
        """
        if src is None and self.device.type != "cpu":
            raise DataPlaneError(f"receiving on {self.device} (NCCL) cannot wait for any source: pass src=")
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        try:
            sender = dist.recv(length, src=src, group=self.group, tag=_TAG_HEAD)
            n = int(length.item())
            if not 0 < n <= MAX_HEADER_BYTES:
                raise _garbage(f"rank {sender}", f"header length {n}")
            head = torch.empty(n, dtype=torch.uint8, device=self.device)
            dist.recv(head, src=sender, group=self.group, tag=_TAG_DATA)
            claimed, header, specs = decode_header(head.cpu().numpy().tobytes(), f"rank {sender}")
            if claimed != sender:
                raise _garbage(f"rank {sender}", f"its header claims rank {claimed}")
            tensors: dict[str, torch.Tensor] = {}
            for spec in specs:
                raw = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
                if spec.nbytes:
                    dist.recv(raw, src=sender, group=self.group, tag=_TAG_DATA)
                tensors[spec.name] = codec.decode_frame(spec, raw)
        except CodecError as e:
            raise _garbage(f"rank {sender}", str(e)) from None
        except RuntimeError as e:
            raise DataPlaneError(f"rank {self.rank} failed to receive ({e}): did a peer stop or time out?") from e
        return {**header, "src": sender}, tensors

    def close(self) -> None:
        """Nothing to release: the process group belongs to the caller."""


class QueuedSends:
    """Sends that return at once: a thread hands them to ``plane`` in order, so a stage that sends and then
    receives never waits on a receiver that is itself sending (gloo's send waits for the matching receive;
    a 1F1B pipeline schedule needs sends that do not). Use it as a context manager around one exchange:
    leaving it waits until every queued message is sent and raises the first send's error, if any."""

    def __init__(self, plane: DataPlane):
        self.plane = plane
        self._queue: queue.Queue = queue.Queue()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._drain, name="pac-sends", daemon=True)
        self._thread.start()

    def send(self, dest: int, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self._raise()
        self._queue.put((dest, header, tensors))

    def __enter__(self) -> QueuedSends:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._queue.put(None)
        if exc_type is None:  # on an error the queue may wait on a peer that is gone: leave the daemon thread
            self._thread.join()
            self._raise()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if not self._failure:
                try:
                    self.plane.send(*item)
                except BaseException as exc:  # raised on the stage's thread by the next send or at the end
                    self._failure.append(exc)

    def _raise(self) -> None:
        if self._failure:
            raise self._failure[0]
