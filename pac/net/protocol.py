"""The control-plane protocol between the coordinator (`pac-launch`) and the peer agents (`pac peer`).

Every message is one msgpack map with a `type`, the protocol `version` and the fields its schema
lists. A receiver calls :func:`decode`, which checks all of that before any code looks at a field:
a message that is not msgpack, too large, of another version, of an unknown type or with a missing
or mistyped field raises :class:`ProtocolError`, which the receiver answers with an ``error``
reply and a log line. Nothing a remote sends can crash the receiver.

The conversation of one run (C = coordinator, P = peer)::

    C -> P  hello      {nonce}                         C connects to P's endpoint and says hello
    P -> C  join       {name, profile, nonce, proof,   proof = HMAC(token, "peer" | C's nonce)
                        data_endpoint, data_key}
    C -> P  welcome    {proof, rank}                    proof = HMAC(token, "coordinator" | P's nonce)
         or refused    {proof, reason}                  proof = HMAC(token, "refusal" | P's nonce)
    C -> P  profile    {run, refresh}                   when planning: measure this device for the run
    P -> C  profiled   {profile}                        (pac.runtime.profiler; cached per device and model)
    C -> P  probe      {seq, payload}                   when planning: P echoes it, so C times the link
    P -> C  probe      {seq, payload}
    C -> P  data       {split, sample_ids, tensors,     the tokenised data (a few bytes per token) as the
                        frames, label_names, task}       header entries and frames of pac.net.codec
    C -> P  assign     {assignment}                     role, layers, peers' data endpoints, rendezvous
    P -> C  progress   {phase, done, total, rate,       while phase 1 and phase 2 run; metrics: a training
                        metrics}                        step's loss, or (phase "epoch") the epoch's record
    P <-> C heartbeat  {usage}                          both ways; silence means the other side is gone;
                                                        a peer's usage: {rss, sent} (memory, data-plane bytes)
    P -> C  file       {name, offset, chunk, last}      rank 0 returns the adapter and metrics
    P -> C  finished   {summary}  or  failed {reason}
    C -> P  shutdown   {reason}
    either  error      {reason}                         the reply to a message that was rejected
"""

from __future__ import annotations

from typing import Any

import msgpack

from pac.errors import PacError

# 2: `data` carries its tensors as pac.net.codec entries and frames (1: bare int64 bytes and shapes).
# 3: `assign` carries the side pipeline's schedule and micro-batch count.
# 4: `profile`, `profiled` and `probe`, for the planner.
# 5: `assign` carries the gradient compression of data-parallel phase 2.
# 6: `assign` carries phase 1's planned micro-batch size; `join` profiles say whether the peer stays.
# 7: `refused` carries a proof of the join token (a client that only said hello cannot end an agent);
#    `assign` says whether phase 2 all-reduces over the encrypted data plane, and the ownership a re-plan inherits.
# 8: `progress` carries the training metrics, `heartbeat` the peer's memory and traffic (the live views).
PROTOCOL_VERSION = 8
# Control messages are small except `data` and `file`, which are sent in chunks of at most CHUNK_BYTES.
CHUNK_BYTES = 4 << 20
MAX_CONTROL_BYTES = 16 << 20  # also set as zmq.MAXMSGSIZE on every control socket
# The TokenizedSet tensors a `data` message carries, each with one row per sample id.
DATA_TENSORS = ("input_ids", "attention_mask", "labels")


class ProtocolError(PacError):
    """A message that does not follow the protocol (it is answered with an `error` reply)."""


_NUM = (int, float)
# type -> {field: accepted python types after msgpack decoding}
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"nonce": (bytes,)},
    "join": {
        "name": (str,),
        "profile": (dict,),
        "nonce": (bytes,),
        "proof": (bytes,),
        "data_endpoint": (str,),
        "data_key": (bytes,),  # the CURVE public key of the peer's data plane
    },
    "welcome": {"proof": (bytes,), "rank": (int,)},
    "refused": {"proof": (bytes,), "reason": (str,)},
    "data": {
        "split": (str,),
        "sample_ids": (list,),
        "tensors": (list,),  # input_ids, attention_mask, labels; pac.net.codec validates these two fields
        "frames": (list,),
        "label_names": (list, type(None)),
        "task": (str,),
    },
    "profile": {"run": (dict,), "refresh": (bool,)},
    "profiled": {"profile": (dict,)},
    "probe": {"seq": (int,), "payload": (bytes,)},
    "assign": {"assignment": (dict,)},
    "progress": {"phase": (str,), "done": (int,), "total": (int,), "rate": _NUM, "metrics": (dict,)},
    "heartbeat": {"usage": (dict,)},
    "file": {"name": (str,), "offset": (int,), "chunk": (bytes,), "last": (bool,)},
    "finished": {"summary": (dict,)},
    "failed": {"reason": (str,)},
    "shutdown": {"reason": (str,)},
    "error": {"reason": (str,)},
}


def encode(kind: str, **fields: Any) -> bytes:
    """One message, checked against its schema before it leaves (a bug here is ours, not the peer's)."""
    message = {"type": kind, "version": PROTOCOL_VERSION, **fields}
    validate(message)
    raw = msgpack.packb(message, use_bin_type=True)
    if len(raw) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"{kind} message of {len(raw)} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit")
    return raw


def decode(raw: bytes) -> dict[str, Any]:
    """Parse and validate a received message; raise ProtocolError saying what is wrong with it."""
    if len(raw) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit")
    try:
        # msgpack's defaults keep map keys to str/bytes; the length limits bound what a message can allocate.
        message = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_CONTROL_BYTES, max_str_len=1 << 20)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    validate(message)
    return message


def validate(message: Any) -> None:
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, not {type(message).__name__}")
    kind = message.get("type")
    if kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}; known: {', '.join(SCHEMAS)}")
    version = message.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{kind} message of protocol version {version!r}, this side speaks {PROTOCOL_VERSION}: "
            "run the same pac version on every device"
        )
    for field, types in SCHEMAS[kind].items():
        if field not in message:
            raise ProtocolError(f"{kind} message without its {field!r} field")
        value = message[field]
        # bool is an int in Python: an int field must not accept True/False silently.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"{kind} message: field {field!r} must be {names}, not {type(value).__name__}")
