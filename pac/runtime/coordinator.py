"""The coordinator of a collaborative run (`pac-launch`): it reaches the peers, plans, hands out the
work, watches heartbeats and progress, and gathers the results.

Run states (an explicit machine; every change is logged and shown)::

    joining -> planning -> cache build -> training -> export -> done
        \\________\\____________\\_____________\\__________\\-> failed (with a reason)

The coordinator is not a rank of the process group: it hosts the group's rendezvous (a TCPStore)
and talks to the peers over a ZeroMQ ROUTER socket; it never computes. A message that fails
validation gets an `error` reply and a log line; it never stops the coordinator.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch.distributed as dist
import zmq
from zmq.utils.monitor import recv_monitor_message

from pac.cache.fingerprint import model_fingerprint
from pac.data.tasks import IMAGE_TASK
from pac.data.tokenize import TokenizedSet
from pac.errors import PacError
from pac.methods.base import ADAPTER_WEIGHTS
from pac.methods.registry import get_method
from pac.model_card import write_model_card
from pac.models.backbone import load_config
from pac.net import auth, codec, protocol
from pac.net.addresses import local_address_towards
from pac.net.hosts import PeerHost
from pac.plan.costs import GRADIENT_COMPRESSIONS, DeviceProfile, Workload
from pac.plan.placement import (
    MODES,
    PIPELINE,
    Inheritance,
    Plan,
    check_groups,
    check_schedule,
    make_plan,
    parse_stages,
    phase1_only_left_out,
    stage_taps,
)
from pac.plan.planner import PlanChoice
from pac.plan.planner import plan as plan_run
from pac.plan.schedule import format_schedule, training_schedule
from pac.runconfig import ClusterOptions, TrainOptions, run_config_to_wire, summary_options, with_defaults
from pac.runtime.collaborative import Assignment
from pac.runtime.launch_record import LaunchRecord
from pac.runtime.prepare import SUMMARY, PreparedData, prepare_data
from pac.runtime.profiler import device_profile_of, model_costs_of
from pac.runtime.run_view import PlainView, RunView
from pac.runtime.timeline import TIMELINE, Timeline

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# A failure that says a connection was lost (gloo's "Connection reset by peer", a closed pair) names the
# survivor that noticed, not the peer that is gone: for this long the coordinator looks for that peer first.
LOST_CONNECTION = re.compile(r"connection (reset|closed|refused)|read error|broken pipe|end of file", re.IGNORECASE)
BLAME_WAIT_S = 3 * HEARTBEAT_S
LATECOMER_HELLO_S = 2.0  # how often a peer missing from the run is greeted while it goes on
REJOIN_S = 60.0  # the least a re-plan waits for its agents to start afresh and join again
UNREACHABLE_GRACE_S = 5.0  # agents started with the run (pac-launch --local) take a few seconds to listen
SNAPSHOT_EVERY_S = 0.5  # how often the views get the run's state
CURVE_POINTS = 500  # the most training steps a snapshot's loss curve carries (evenly thinned)
DATA_CHUNK_SAMPLES = 256
LINK_PROBE_BYTES = 1 << 20  # a link probe's payload: large enough that bandwidth, not latency, dominates
HANDSHAKE_ATTEMPTS = 3  # failed encrypted handshakes before a peer counts as holding another token


class RunState(enum.Enum):
    JOINING = "joining"
    PLANNING = "planning"
    CACHE_BUILD = "cache build"
    TRAINING = "training"
    EXPORT = "export"
    DONE = "done"
    FAILED = "failed"


NEXT_STATE = {  # and from cache build or training back to joining, when a lost peer is re-planned around
    RunState.JOINING: RunState.PLANNING,
    RunState.PLANNING: RunState.CACHE_BUILD,
    RunState.CACHE_BUILD: RunState.TRAINING,
    RunState.TRAINING: RunState.EXPORT,
    RunState.EXPORT: RunState.DONE,
}


class RunFailed(PacError):
    pass


class PeerLost(Exception):
    """A member of the run is gone (its process died, its device left): the run re-plans without it."""

    def __init__(self, peer: PeerState, reason: str):
        super().__init__(reason)
        self.peer, self.reason = peer, reason


class PeersArrived(Exception):
    """Peers joined while the run was going, and a checkpoint holds the work so far: the run re-plans with them."""

    def __init__(self, peers: list[PeerState]):
        super().__init__(", ".join(p.host.name for p in peers))
        self.peers = peers


@dataclass
class PeerState:
    host: PeerHost
    rank: int = -1
    status: str = "connecting"  # connecting | joined | refused | <phase> | finished | failed
    profile: dict[str, Any] = field(default_factory=dict)
    nonce: bytes = b""  # ours, which the peer signs
    join_nonce: bytes = b""  # the peer's, which we sign
    data_endpoint: str = ""
    data_key: bytes = b""
    last_heard: float = field(default_factory=time.monotonic)
    progress: tuple[str, int, int, float] = ("", 0, 0, 0.0)
    summary: dict[str, Any] | None = None
    files: dict[str, bytearray] = field(default_factory=dict)
    failed_handshakes: int = 0
    unreachable: bool = False  # a connection attempt was refused or unroutable (said once)
    disconnected_at: float | None = None  # when its connection closed during the run
    run_profile: dict[str, Any] | None = None  # pac.runtime.profiler's, for this run
    echoes: dict[int, float] = field(default_factory=dict)  # link probe number -> when its echo arrived
    checkpoint_at: float = 0.0  # when it last reported a phase-2 checkpoint
    arrived_at: float | None = None  # when it joined
    usage: dict[str, int] = field(default_factory=dict)  # its memory (rss) and data-plane bytes (sent), as heard

    @property
    def routing_id(self) -> bytes:
        return self.host.name.encode()


class Coordinator:
    def __init__(
        self,
        hosts: list[PeerHost],
        token: str,
        options: TrainOptions,
        cluster: ClusterOptions,
        display: TextIO | None = None,
        record: LaunchRecord | None = None,
        started_at: float | None = None,
        view: RunView | None = None,
    ):
        """`record`: the run's launch.json (pac.runtime.launch_record), rewritten at every change of state.
        `started_at`: when the process running this coordinator started (time.time()), so that its start-up
        counts in summary.json's seconds_by_state (pac-launch passes its own).
        `view`: what the run looks like while it goes (pac.runtime.run_view); lines on `display` by default."""
        self.starting = time.time() - started_at if started_at is not None else None
        self.began = time.monotonic() - (self.starting or 0.0)  # the process's start, where known
        method = get_method(options.method)
        if method.collaborative is None:
            raise PacError(f"--method {options.method} does not run across devices yet: use `pac train`")
        check_schedule(cluster.mode, cluster.schedule, cluster.micro_batches)
        if cluster.encrypt_gradients and cluster.data_plane != "zmq":
            raise PacError("--encrypt-gradients sends over the ZeroMQ data plane: drop --data-plane torch")
        if cluster.grad_compression not in (None, "none") and cluster.mode in ("side-pipeline", PIPELINE):
            raise PacError(
                f"{cluster.mode} mode all-reduces no gradients: drop --grad-compression or pick another mode"
            )
        if options.data.holdout or options.optim.early_stopping:
            raise PacError("--holdout and --early-stopping are single-device options for now: use `pac train`")
        if options.data.task == IMAGE_TASK:
            raise PacError(
                "pac-launch trains language models; an edge CNN trains on one device: "
                "pac train --task image-classify ..."
            )
        # The method's options for each mode it may run in: the one given, or (planned) every mode that can.
        modes = [cluster.mode or "shuffle"] if cluster.mode or cluster.stages or cluster.shares else list(MODES)
        if not method.cached:  # token ids: the whole model on every peer, or pipelined forward-only (zo)
            modes = [cluster.mode] if cluster.mode else [PIPELINE, "replicated"]
        self.mode_options: dict[str, Any] = {}
        refusals = []
        for mode in modes:
            try:
                if options.optim.precision != "fp32" and mode == "side-pipeline":
                    # Its stages would send bf16 states to each other; only the data-parallel modes take it.
                    raise PacError(
                        "--precision bf16 runs in the shuffle and replicated modes, not side-pipeline: drop one"
                    )
                if cluster.encrypt_gradients and mode == "side-pipeline":
                    # Its stages' losses, norms and gathered weights are gloo all-reduces beside the data plane.
                    raise PacError(
                        "--encrypt-gradients runs in the shuffle and replicated modes, not side-pipeline: drop one"
                    )
                if not method.cached and mode not in ("replicated", PIPELINE):
                    raise PacError(
                        f"--method {options.method} trains on token ids, so every peer runs the whole model: "
                        "use --mode replicated"
                    )
                if method.cached and mode == PIPELINE:
                    raise PacError(
                        f"--mode pipeline runs forward-only methods (--method zo); --method {options.method} trains "
                        "from phase 1's cache: use --mode shuffle, side-pipeline or replicated"
                    )
                self.mode_options[mode] = method.collaborative(options.options, options.data.task, mode)
            except PacError as exc:
                refusals.append(f"{mode}: {exc}" if len(modes) > 1 else str(exc))
        if not self.mode_options:
            raise PacError("; ".join(refusals))
        self.options = with_defaults(replace(options, method_options=next(iter(self.mode_options.values()))))
        self.cluster, self.token, self.record = cluster, token, record
        self.view = view or PlainView(display or sys.stdout)
        self.timeline = Timeline()  # written to --out once the run is more than a plan (run)
        self._last_snapshot = 0.0
        self._seen_status: dict[str, str] = {}  # each peer's status as the timeline has it
        self.peers = {h.name: PeerState(h) for h in hosts}
        self.state = RunState.JOINING
        self.planned: PlanChoice | None = None
        self.symptom: tuple[str, float] | None = None  # a peer's lost-connection failure, and when it came
        self.lost: list[dict[str, Any]] = []  # the peers lost and re-planned around, in order
        self.assigned: tuple[Plan, list[str]] | None = None  # the last plan handed out, and its peers by rank
        self.arrivals: list[dict[str, Any]] = []  # the peers planned in while the run was going, in order
        self._next_latecomer_hello = 0.0
        self._probe_seq = 0
        self.reason = ""
        self.out = Path(options.out)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_CONTROL_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a peer not connected yet raises, not vanishes
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.ROUTING_ID, b"coordinator-" + auth.new_nonce()[:6].hex().encode())
        auth.connect_encrypted(self.sock, token)
        # A peer with another token has other CURVE keys: the handshake fails before any message.
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECTED
        )
        for peer in self.peers.values():
            if ":" in peer.host.host:
                self.sock.setsockopt(zmq.IPV6, 1)
            self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, peer.routing_id)
            self.sock.connect(peer.host.endpoint)
        self.store: dist.TCPStore | None = None
        self.store_listener: socket.socket | None = None
        self.entered: dict[RunState, float] = {RunState.JOINING: time.monotonic()}
        self.timeline.add("state", state=self.state.value)

    # ------------------------------------------------------------------ state machine
    def _advance(self, target: RunState) -> None:
        replanning = target is RunState.JOINING and self.state in (RunState.CACHE_BUILD, RunState.TRAINING)
        if target is not RunState.FAILED and NEXT_STATE.get(self.state) is not target and not replanning:
            raise RuntimeError(f"run state {self.state.value} cannot go to {target.value}")
        log.info("run state: %s -> %s", self.state.value, target.value)
        self._observe()  # what led here (a peer's last status) goes first
        self.state = target
        self.entered[target] = time.monotonic()
        self.timeline.add("state", state=target.value, **({"reason": self.reason} if self.reason else {}))
        self._observe(snapshot=True)
        if self.record is not None:
            self.record.update(state=target.value, **({"reason": self.reason} if target is RunState.FAILED else {}))
        self._print(f"[pac-launch] {target.value}" + (f": {self.reason}" if self.reason else ""))

    def _fail(self, reason: str) -> None:
        self.reason = reason
        self._advance(RunState.FAILED)
        raise RunFailed(reason)

    def _print(self, line: str) -> None:
        self.view.line(line)

    # ------------------------------------------------------------------ messaging
    def _send(self, peer: PeerState, kind: str, block: bool = False, **fields: Any) -> bool:
        try:
            self.sock.send_multipart(
                [peer.routing_id, protocol.encode(kind, **fields)], flags=0 if block else zmq.NOBLOCK
            )
            return True
        except zmq.ZMQError:  # not connected yet (EHOSTUNREACH) or congested (EAGAIN)
            return False

    def _poll(self, timeout_ms: int) -> None:
        self._observe()
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] == zmq.EVENT_CONNECT_RETRIED:
                self._on_unreachable(event["endpoint"].decode())
            elif event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECTED):
                self._on_connection(event["endpoint"].decode(), closed=event["event"] == zmq.EVENT_DISCONNECTED)
            else:
                self._on_failed_handshake(event["endpoint"].decode())
        if not self.sock.poll(timeout_ms):
            return
        frames = self.sock.recv_multipart()
        by_id = {p.routing_id: p for p in self.peers.values()}
        peer = by_id.get(frames[0])
        if peer is None or len(frames) != 2:
            log.warning("ignored a message from an unknown connection %r", frames[0][:32])
            return
        try:
            message = protocol.decode(frames[1])
        except protocol.ProtocolError as exc:
            log.warning("rejected a message from %s: %s", peer.host.name, exc)
            self._send(peer, "error", reason=str(exc))
            return
        peer.last_heard = time.monotonic()
        self._on_message(peer, message)

    def _on_message(self, peer: PeerState, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "join":
            self._on_join(peer, message)
        elif kind == "error":  # never answered, so two sides cannot bounce errors forever
            log.warning("peer %s rejected a message: %s", peer.host.name, message["reason"])
        elif peer.status in ("connecting", "refused"):
            self._send(peer, "error", reason=f"{kind}: join first")
        elif kind == "progress" and message["phase"] == "checkpoint":
            peer.checkpoint_at = time.monotonic()
        elif kind == "progress" and message["phase"] == "epoch":
            if peer.rank == 0:  # every rank's epoch record is the same sums over the ranks
                self.timeline.add("epoch", peer=peer.host.name, **_numbers(message["metrics"]))
        elif kind == "progress":
            peer.status = message["phase"]
            peer.progress = (message["phase"], message["done"], message["total"], message["rate"])
            loss = _numbers(message["metrics"]).get("loss")
            if message["phase"] == "train" and loss is not None and peer.rank == 0:  # every rank has the batch's loss
                self.timeline.add("step", peer=peer.host.name, step=message["done"], total=message["total"], loss=loss)
        elif kind == "heartbeat":
            peer.usage = {k: int(v) for k, v in _numbers(message["usage"]).items() if k in ("rss", "sent") and v >= 0}
            if peer.usage:
                self.timeline.add("usage", peer=peer.host.name, **peer.usage)
        elif kind == "file" and not _plain_file_name(message["name"]):  # written into --out: a path leaves it
            self._send(peer, "error", reason=f"file {message['name']!r}: not a plain file name")
        elif kind == "file":
            buffer = peer.files.setdefault(message["name"], bytearray())
            if message["offset"] != len(buffer):
                self._send(peer, "error", reason=f"file {message['name']}: chunk at {message['offset']} out of order")
            else:
                buffer.extend(message["chunk"])
        elif kind == "profiled":
            peer.run_profile = message["profile"]
        elif kind == "probe":
            peer.echoes[message["seq"]] = time.monotonic()
        elif kind == "finished":
            peer.status, peer.summary = "finished", message["summary"]
        elif kind == "failed":
            peer.status = "failed"
            reason = f"peer {peer.host.name} (rank {peer.rank}) failed: {message['reason']}"
            if not LOST_CONNECTION.search(message["reason"]):
                self._fail(reason)
            # A collective that lost a connection is usually the symptom of another peer's death, and the
            # survivor reports first: the wait loop gives the gone peer a few heartbeats to show itself.
            self.symptom = self.symptom or (reason, time.monotonic())
        elif kind != "heartbeat":
            self._send(peer, "error", reason=f"a coordinator does not accept {kind} messages")

    def _on_connection(self, endpoint: str, closed: bool) -> None:
        """A peer's connection closed, or came back: a process that died (SIGKILL, a crash, a reboot) closes it
        at once, so a run need not wait out --peer-timeout to know; ZeroMQ reconnects to a peer still there."""
        peer = next((p for p in self.peers.values() if p.host.endpoint == endpoint), None)
        if peer is None or peer.rank is None or peer.status in ("finished", "failed", "left out"):
            return
        peer.disconnected_at = time.monotonic() if closed else None
        if closed:
            log.warning("the connection to peer %s (rank %d) closed", peer.host.name, peer.rank)

    def _gone(self, members: list[PeerState], now: float) -> tuple[PeerState, float] | None:
        """A member whose connection closed or that went silent, with its seconds of silence: a closed
        connection and two missed heartbeats, or --peer-timeout of silence."""
        for p in members:
            silent = now - p.last_heard
            if p.status in ("finished", "failed"):
                continue
            if (p.disconnected_at is not None and silent > 2 * HEARTBEAT_S) or silent > self.cluster.peer_timeout:
                return p, silent
        return None

    def _on_unreachable(self, endpoint: str) -> None:
        """A connection attempt was refused or found no route: said once it has gone on for a few seconds
        (ZeroMQ retries quietly until the join timeout), since the peer may still be starting."""
        peer = next((p for p in self.peers.values() if p.host.endpoint == endpoint), None)
        if peer is None or peer.status != "connecting" or peer.unreachable or self.state is not RunState.JOINING:
            return
        if peer.profile:  # a member starting afresh for a re-plan: its agent is on its way back
            return
        if time.monotonic() - self.entered[RunState.JOINING] < UNREACHABLE_GRACE_S:
            return  # ZeroMQ retries every 100 ms: a later refusal is reported
        peer.unreachable = True
        self._print(
            f"[pac-launch] {peer.host.name} ({peer.host.address}) refuses the connection or cannot be reached: "
            f"retrying for up to {self.cluster.join_timeout:.0f} s; is `pac peer` running there, on that port?"
        )

    def _on_failed_handshake(self, endpoint: str) -> None:
        peer = next((p for p in self.peers.values() if p.host.endpoint == endpoint), None)
        if peer is None or peer.status != "connecting":
            return
        # One failure is not proof of a wrong token: a connect to a loopback port in the ephemeral range
        # that the peer has not bound yet can connect the socket to itself (TCP simultaneous open), and
        # that handshake fails once. ZeroMQ reconnects; a peer holding another token fails every time.
        peer.failed_handshakes += 1
        if peer.failed_handshakes < HANDSHAKE_ATTEMPTS:
            log.info(
                "handshake with %s at %s failed (%d of %d); retrying",
                peer.host.name,
                endpoint,
                peer.failed_handshakes,
                HANDSHAKE_ATTEMPTS,
            )
            return
        peer.status = "refused"
        self.sock.disconnect(endpoint)  # no retries against a peer that holds another token
        log.warning(
            "refused peer %s at %s: wrong join token (the encrypted handshake failed)", peer.host.name, endpoint
        )
        self._print(f"[pac-launch] refused {peer.host.name} ({endpoint}): wrong join token")

    def _on_join(self, peer: PeerState, message: dict[str, Any]) -> None:
        if peer.status != "connecting":  # the answer to a repeated hello: the first one counted
            return
        if not auth.verify(self.token, "peer", peer.nonce, message["proof"]):
            peer.status = "refused"
            log.warning("refused peer %s at %s: wrong join token", peer.host.name, peer.host.endpoint)
            self._print(f"[pac-launch] refused {peer.host.name} ({peer.host.endpoint}): wrong join token")
            proof = auth.proof(self.token, "refusal", message["nonce"])
            reason = "wrong proof of the join token: set PAC_JOIN_TOKEN to the run's token"
            self._send(peer, "refused", proof=proof, reason=reason)
            return
        memory = message["profile"].get("max_mem")
        if not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0:
            self._send(peer, "error", reason="join: profile.max_mem must be a positive number of bytes")
            return
        peer.status, peer.profile, peer.join_nonce = "joined", message["profile"], message["nonce"]
        # The peer reports the port of its data socket; reach it at the host this coordinator reached it at.
        port = message["data_endpoint"].rsplit(":", 1)[-1]
        host = f"[{peer.host.host}]" if ":" in peer.host.host else peer.host.host
        peer.data_endpoint, peer.data_key = f"tcp://{host}:{port}", message["data_key"]
        self._print(f"[pac-launch] {peer.host.name} joined: {_describe_profile(peer.profile)}")
        peer.arrived_at = time.monotonic()
        if self.state in (RunState.CACHE_BUILD, RunState.TRAINING):
            self._print(
                f"[pac-launch] {peer.host.name} arrived while the run was going: it is planned in at the next "
                "checkpoint (the start of training, or a checkpoint of it)"
            )

    # ------------------------------------------------------------------ phases
    def run(self, plan_only: bool = False) -> dict[str, Any]:
        """The whole run, or with `plan_only` the peers' profiles and the plan (then the peers are let go)."""
        try:
            return self._run(plan_only)
        except RunFailed:
            self._shutdown(f"run failed: {self.reason}")
            raise
        except BaseException as exc:
            self.reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PacError) else str(exc)
            if self.state is not RunState.FAILED:
                self._advance(RunState.FAILED)
            self._shutdown(f"run failed: {self.reason}")
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Release the sockets (the monitor first: ZeroMQ aborts the process on a monitor left behind)."""
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close()
        self.ctx.term()
        if self.store_listener is not None:
            self.store_listener.close()

    def _run(self, plan_only: bool) -> dict[str, Any]:
        if not plan_only:
            self.timeline.attach(self.out / TIMELINE)
        self._print(f"[pac-launch] {self.state.value}: {len(self.peers)} peer(s)")
        # Before anyone joins, so that bad data, an unknown model or bad --stages fail in seconds.
        prepared = prepare_data(self.options.model, self.options.data)
        num_layers = load_config(prepared.model_dir).num_hidden_layers
        if self.cluster.stages:
            check_groups(self.cluster.mode or "shuffle", parse_stages(self.cluster.stages, num_layers, len(self.peers)))
        members = self._join(list(self.peers.values()))
        while True:
            try:
                return self._attempt(members, prepared, num_layers, plan_only)
            except PeerLost as lost:
                members = self._without(lost, members)
            except PeersArrived as arrived:
                members = self._with(arrived.peers, members)

    def _attempt(
        self, members: list[PeerState], prepared: PreparedData, num_layers: int, plan_only: bool
    ) -> dict[str, Any]:
        """Plan over `members`, assign, wait for both phases and export; PeerLost when a member is lost."""
        self._advance(RunState.PLANNING)
        cluster = self.cluster
        unplanned = cluster.mode or cluster.stages or cluster.shares or not get_method(self.options.method).cached
        if not unplanned:
            plan, members = self._planned(members, prepared)
        else:  # the planner models cached methods only: an uncached one runs replicated on every peer
            mode = next(iter(self.mode_options))
            members, shares = self._by_hand(members, mode)
            memories = [_memory(p) for p in members]
            plan = make_plan(
                mode, num_layers, memories, cluster.stages, cluster.schedule, cluster.micro_batches, shares
            )
        plan = self._inheriting(plan, members)
        self.options = with_defaults(replace(self.options, method_options=self.mode_options[plan.mode]))
        self._print(f"[pac-launch] plan ({plan.mode}): {plan.describe()}")
        if self.record is not None:
            names = [p.host.name for p in members]
            self.record.update(mode=plan.mode, plan=[list(s) for s in plan.stages], peers=names)
        if plan.mode == "side-pipeline":
            self._print(f"[pac-launch] phase 2 pipelined {plan.schedule}, {plan.micro_batches} micro-batches per batch")
            schedule = training_schedule(plan.schedule, plan.world, plan.micro_batches)
            log.info("phase 2 schedule per full batch:\n%s", format_schedule(schedule))
        if plan.mode == PIPELINE:
            self._print(f"[pac-launch] the model pipelined forward-only, {plan.micro_batches} micro-batches per batch")
        if plan_only:
            self._shutdown("only planning")
            return {"mode": plan.mode, "plan": [list(s) for s in plan.stages], "planned": self._planned_summary()}
        method, task = get_method(self.options.method), self.options.data.task
        taps = method.taps(self.options.method_options, task, num_layers) if method.cached else []
        idle = [r for r, stage in enumerate(plan.stages) if not stage_taps(stage, taps)]
        if plan.mode == "side-pipeline" and idle:
            self._fail(
                f"in side-pipeline mode every stage needs a tapped layer; ranks {idle} have none: tap more layers"
            )
        store_port = self._start_store(members)
        fingerprint = model_fingerprint(prepared.model_dir)
        endpoints = {p.rank: p.data_endpoint for p in members}
        keys = {p.rank: p.data_key for p in members}
        for peer in members:
            for split, data in (("train", prepared.train), ("val", prepared.val)):
                self._send_data(peer, split, data)
            job = Assignment(
                rank=peer.rank,
                plan=plan,
                taps=taps,
                options=self.options,
                model_fingerprint=fingerprint,
                store=(self._store_host(peer), store_port),
                data_plane=self.cluster.data_plane,
                grad_compression=self._grad_compression(),
                encrypted_gradients=self.cluster.encrypt_gradients,
                data_endpoints=endpoints,
                data_keys=keys,
                threads=peer.host.threads,
            )
            self._must_send(peer, "assign", assignment=job.to_wire())
        self.assigned = (plan, [p.host.name for p in members])
        self._advance(RunState.CACHE_BUILD)
        self._wait(members, lambda: all(p.status in ("train", "finished") for p in members), RunState.TRAINING)
        self._wait(members, lambda: all(p.status == "finished" for p in members), RunState.EXPORT)
        summary = self._export(members, plan)
        self._advance(RunState.DONE)
        self._shutdown("run complete")
        return summary

    def _inheriting(self, plan: Plan, members: list[PeerState]) -> Plan:
        """A re-plan's ownership: every sample whose owner stayed stays with it, where its taps are cached
        (pac.plan.placement.Inheritance); in side-pipeline mode a stage caches its layers of every sample."""
        if self.assigned is None:
            return plan
        before, names = self.assigned
        owning = ("shuffle", "replicated")
        if before.mode not in owning or plan.mode not in owning:
            return plan
        now = {p.host.name: p.rank for p in members}
        ranks_now = tuple(now.get(name) for name in names)
        newcomers = tuple(p.rank for p in members if p.host.name not in names)
        inherited = Inheritance(before.world, before.shares, ranks_now, before.inherited, newcomers)
        return replace(plan, inherited=inherited)

    def _join(self, candidates: list[PeerState], timeout: float | None = None) -> list[PeerState]:
        """Greet `candidates` until all have joined, or `timeout` (--join-timeout) passes: then fail, or with
        --min-peers start with those that joined. Returns the members, in rank order, welcomed."""
        timeout = timeout or self.cluster.join_timeout
        deadline = time.monotonic() + timeout
        next_hello = 0.0
        while any(p.status == "connecting" for p in candidates):
            now = time.monotonic()
            if now > deadline:
                missing = [f"{p.host.name} ({p.host.endpoint})" for p in candidates if p.status == "connecting"]
                joined = sum(p.status == "joined" for p in candidates)
                if self.cluster.min_peers and joined >= self.cluster.min_peers:
                    self._print(
                        f"[pac-launch] starting with {joined} of {len(candidates)} peers; {', '.join(missing)} "
                        "will be planned in when they answer"
                    )
                    break
                self._fail(
                    f"no answer within {timeout:.0f} s from {', '.join(missing)}: "
                    "is `pac peer` running there, with that port reachable?"
                )
            if now >= next_hello:  # ROUTER_MANDATORY makes a hello to a peer not yet reachable fail; retry
                for p in candidates:
                    if p.status == "connecting":
                        p.nonce = p.nonce or auth.new_nonce()
                        self._send(p, "hello", nonce=p.nonce)
                next_hello = now + 0.5
            self._poll(100)
        members = [p for p in candidates if p.status == "joined"]
        if not members:
            self._fail("no peer joined (every peer was refused)")
        for rank, peer in enumerate(members):
            peer.rank = rank
            self._must_send(peer, "welcome", proof=auth.proof(self.token, "coordinator", peer.join_nonce), rank=rank)
        return members

    def _without(self, lost: PeerLost, members: list[PeerState]) -> list[PeerState]:
        """After a member is lost: the others abandon the attempt (each agent starts afresh, so no thread stays
        stuck in the broken process group), join again, and the next attempt is planned over them. Their finished
        cache shards and checkpoints are reused (pac.runtime.pipeline, pac.runtime.collaborative.run_directory).
        A layout fixed by hand is not re-planned: the run fails as before, naming the lost peer."""
        survivors = [p for p in members if p is not lost.peer]
        if not survivors:
            self._fail(f"{lost.reason} (no peer is left)")
        if why := self._fixed_layout(survivors):
            self._fail(f"{lost.reason}; {why}")
        names = [p.host.name for p in survivors]
        self._print(f"[pac-launch] {lost.reason}. Re-planning over {', '.join(names)}")
        self.lost.append(
            {"peer": lost.peer.host.name, "state": self.state.value, "at": time.time(), "remaining": names}
        )
        self.timeline.add("peer", peer=lost.peer.host.name, status="lost")
        self._seen_status[lost.peer.host.name] = "lost"
        if self.record is not None:
            self.record.update(lost=self.lost)
        # It may come back (its agent restarted, its device back on the network): then it is planned in again.
        self.peers[lost.peer.host.name] = PeerState(lost.peer.host)
        return self._rejoin(survivors, f"re-planning without {lost.peer.host.name}")

    def _with(self, arrived: list[PeerState], members: list[PeerState]) -> list[PeerState]:
        """Peers that joined while the run was going, at a checkpoint: every member abandons the attempt as after
        a loss, and the next attempt is planned over them all (the planner may still leave a newcomer out)."""
        names = [p.host.name for p in arrived]
        self._print(f"[pac-launch] re-planning with {', '.join(names)}, which arrived while the run was going")
        for peer in arrived:
            self.arrivals.append({"peer": peer.host.name, "state": self.state.value, "at": time.time()})
        if self.record is not None:
            self.record.update(arrived=self.arrivals)
        return self._rejoin([*members, *arrived], f"re-planning with {', '.join(names)}")

    def _rejoin(self, peers: list[PeerState], reason: str) -> list[PeerState]:
        """`peers` abandon the attempt (each agent starts afresh, so no thread stays stuck in a broken or outgrown
        process group) and join again, as new: their agents come back as fresh processes on the same ports."""
        for peer in peers:
            self._send(peer, "shutdown", reason=reason)
        self.symptom = None
        for peer in peers:
            self.peers[peer.host.name] = PeerState(peer.host, profile=peer.profile)
        self._advance(RunState.JOINING)
        # An agent takes a few seconds to start afresh (an interpreter, torch): wait for it however short
        # --join-timeout is, which was meant for the devices a run starts with.
        return self._join([self.peers[p.host.name] for p in peers], max(self.cluster.join_timeout, REJOIN_S))

    def _fixed_layout(self, members: list[PeerState]) -> str | None:
        """Why the run cannot be re-planned over other peers than `members` and itself, or None."""
        if self.cluster.stages or self.cluster.shares:
            return "--stages and --shares fix the layout for every peer: drop them to re-plan"
        if once := [p.host.name for p in members if not p.profile.get("stays")]:
            return (
                f"{', '.join(once)} serve(s) one run only (pac peer --once), so the run cannot re-plan over them: "
                "run the peers as agents, and `pac-launch --resume` this run"
            )
        return None

    def _outside(self, members: list[PeerState], status: str) -> list[PeerState]:
        """The peers of the hosts file in `status` that are not members of the run's attempt."""
        return [p for p in self.peers.values() if p.status == status and all(p is not m for m in members)]

    def _admit_arrivals(self, members: list[PeerState], now: float) -> None:
        """Latecomers are greeted every few seconds; one that has joined is planned in (PeersArrived) once the run's
        work is held: at the start of training, or once every member has checkpointed since it arrived."""
        if now >= self._next_latecomer_hello:
            self._next_latecomer_hello = now + LATECOMER_HELLO_S
            for p in self._outside(members, "connecting"):
                p.nonce = p.nonce or auth.new_nonce()
                self._send(p, "hello", nonce=p.nonce)
        arrived = self._outside(members, "joined")
        if not arrived or self.state is not RunState.TRAINING:
            return
        if why := self._fixed_layout(members):
            for p in arrived:
                self._print(f"[pac-launch] {p.host.name} is not planned in: {why}")
                self._send(p, "shutdown", reason=f"not planned in: {why}")
                p.status = "left out"
            return
        if any(0 < total <= done for _, done, total, _ in (p.progress for p in members)):
            return  # the last step is done: the run ends before a newcomer could help
        starting = all(p.progress[0] == "train" and p.progress[1] == 0 for p in members)
        since = max(p.arrived_at or 0.0 for p in arrived)
        if starting or all(p.checkpoint_at > since for p in members):
            raise PeersArrived(arrived)

    # ------------------------------------------------------------------ planning
    def _planned(self, members: list[PeerState], prepared: PreparedData) -> tuple[Plan, list[PeerState]]:
        """Profiles from every peer, each link timed, then the planner's choice (pac.plan.planner): the plan, and
        the peers it uses in rank order; a peer it leaves out is told why and let go."""
        profiles = self.profile_peers(members)
        method, task = get_method(self.options.method), self.options.data.task
        num_layers = load_config(prepared.model_dir).num_hidden_layers
        work = Workload(
            train=len(prepared.train),
            val=len(prepared.val),
            epochs=self.options.optim.epochs,
            batch=self.options.optim.batch_size,
            taps=tuple(method.taps(self.options.method_options, task, num_layers)),
            micro_batch=self.options.optim.batch_size,
            micro_batches=self.cluster.micro_batches,
        )
        # The model's sizes, the same from every peer that trains (a phase-1-only one never builds the method's model).
        sizer = next((p for p in members if not p.profile.get("phase1_only")), members[0])
        costs = model_costs_of(sizer.run_profile)
        given = self.cluster.grad_compression
        compressions = (given,) if given else GRADIENT_COMPRESSIONS
        choice = plan_run(list(profiles.values()), costs, work, list(self.mode_options), compressions)
        self.planned = choice
        for line in choice.describe().splitlines():
            self._print(f"[pac-launch]   {line}")
        by_name = {p.host.name: p for p in members}
        chosen = [by_name[name] for name in choice.best.devices]
        for name, why in choice.left_out.items():
            self._send(by_name[name], "shutdown", reason=f"left out by the plan: {why}")
            by_name[name].status = "left out"
        for rank, peer in enumerate(chosen):
            peer.rank = rank
        best = choice.best
        plan = Plan(
            best.mode, best.stages, self.cluster.schedule, self.cluster.micro_batches, best.shares, best.micro_batch
        )
        return plan, chosen

    def _by_hand(self, members: list[PeerState], mode: str) -> tuple[list[PeerState], tuple[int, ...] | None]:
        """The members and shares of a plan made by hand (a mode or layout given, or a method without phase 1).
        Phase-1-only peers take share 0 in shuffle mode, and rank 0 goes to a peer that trains (it writes the
        adapter); the other modes have no place for them, so they are let go."""
        only = [p for p in members if p.profile.get("phase1_only")]
        if not only:
            return members, self.cluster.shares
        if len(only) == len(members):
            self._fail("every peer runs phase 1 only (`pac peer --phase1-only`): start one that trains")
        cached = get_method(self.options.method).cached
        shares = self.cluster.shares
        if mode != "shuffle" or not cached:
            why = (
                phase1_only_left_out(mode)
                if cached
                else f"it runs phase 1 only (--phase1-only), and {self.options.method} has no phase 1 (it trains on "
                "token ids)"
            )
            for peer in only:
                self._print(f"[pac-launch] {peer.host.name} left out: {why}")
                self._send(peer, "shutdown", reason=f"left out: {why}")
                peer.status = "left out"
            members = [p for p in members if p not in only]
        else:
            if members[0] in only:
                if self.cluster.stages or self.cluster.shares:
                    self._fail(
                        f"{members[0].host.name} runs phase 1 only, but the first peer of the hosts file is rank 0, "
                        "which writes the adapter: list a peer that trains first (--stages and --shares follow that "
                        "order)"
                    )
                first = next(p for p in members if p not in only)
                members = [first, *(p for p in members if p is not first)]
            shares = shares or tuple(0 if p in only else 1 for p in members)
            wrong = [p.host.name for p, share in zip(members, shares, strict=False) if p in only and share > 0]
            if wrong:
                self._fail(f"--shares gives {', '.join(wrong)} samples, but they run phase 1 only: give them 0")
        for rank, peer in enumerate(members):
            peer.rank = rank
        return members, shares

    def _grad_compression(self) -> str:
        """How data-parallel phase 2 sends its gradients: as asked, else as planned, else uncompressed."""
        if self.cluster.grad_compression:
            return self.cluster.grad_compression
        return self.planned.best.compression if self.planned is not None else "none"

    def _planned_summary(self) -> dict[str, Any] | None:
        if self.planned is None:
            return None
        best = self.planned.best
        return {
            "predicted_phase1_seconds": best.phase1_seconds,
            "predicted_phase2_seconds": best.phase2_seconds,
            "predicted_total_seconds": best.total_seconds,
            "predicted_peak_bytes": best.peak_bytes,
            "predicted_sent_bytes": best.sent_bytes,
            "grad_compression": best.compression,
            "phase1_micro_batch": best.micro_batch,
            "other_modes_seconds": {m: p.total_seconds for m, p in self.planned.by_mode.items()},
            "limit_seconds": self.planned.limit_seconds,
            "left_out": self.planned.left_out,
        }

    def _compare_with_plan(self) -> dict[str, Any] | None:
        """Predicted against measured time of each phase (printed), for summary.json; None if nothing was planned."""
        planned = self._planned_summary()
        if planned is None:
            return None
        measured = {
            "phase1_seconds": self.entered[RunState.TRAINING] - self.entered[RunState.CACHE_BUILD],
            "phase2_seconds": self.entered[RunState.EXPORT] - self.entered[RunState.TRAINING],
        }
        for phase, took in measured.items():
            predicted = planned[f"predicted_{phase}"]
            self._print(f"[pac-launch] {phase.split('_')[0]}: predicted {predicted:.1f} s, measured {took:.1f} s")
        return {**planned, **{f"measured_{k}": v for k, v in measured.items()}}

    def profile_peers(self, members: list[PeerState]) -> dict[str, DeviceProfile]:
        """Each peer measures itself for this run (or reads its cached profile); each link is timed from here."""
        run = run_config_to_wire(self.options)
        for peer in members:
            self._must_send(peer, "profile", run=run, refresh=self.cluster.refresh_profiles)
        self._print(f"[pac-launch] profiling {len(members)} peer(s) for this model and run")
        self._wait(members, lambda: all(p.run_profile is not None for p in members))
        devices = {}
        for peer in members:
            bandwidth, rtt = self._measure_link(peer)
            # The planner names devices as this coordinator does (the hosts file), whatever a peer calls itself.
            device = {**peer.run_profile["device"], "name": peer.host.name, "memory": int(_memory(peer))}
            profile = {**peer.run_profile, "device": device}
            device = devices[peer.host.name] = device_profile_of(profile, bandwidth, rtt)
            self._print(
                f"[pac-launch]   {peer.host.name}: {sum(device.layer_seconds) * 1e3:.1f} ms per sample through the "
                f"model, link {bandwidth * 8 / 1e6:.0f} Mbit/s, round trip {rtt * 1e3:.1f} ms"
            )
        return devices

    def _measure_link(self, peer: PeerState) -> tuple[float, float]:
        """(bytes per second, round-trip seconds) to `peer`: the fastest of a few empty echoes, then of a few
        echoes of LINK_PROBE_BYTES, which cross the link twice."""
        rtt = min(self._echo(peer, b"") for _ in range(3))
        payload = os.urandom(LINK_PROBE_BYTES)
        loaded = min(self._echo(peer, payload) for _ in range(2))
        return 2 * LINK_PROBE_BYTES / max(loaded - rtt, 1e-6), rtt

    def _echo(self, peer: PeerState, payload: bytes) -> float:
        self._probe_seq += 1
        seq, started = self._probe_seq, time.monotonic()
        self._must_send(peer, "probe", seq=seq, payload=payload)
        while seq not in peer.echoes:
            if time.monotonic() - started > self.cluster.peer_timeout:
                self._fail(
                    f"peer {peer.host.name} did not answer a link probe within {self.cluster.peer_timeout:.0f} s"
                )
            self._poll(20)
        return peer.echoes.pop(seq) - started

    def _must_send(self, peer: PeerState, kind: str, **fields: Any) -> None:
        if not self._send(peer, kind, block=True, **fields):
            self._fail(f"lost the connection to {peer.host.name} while sending {kind}")

    def _send_data(self, peer: PeerState, split: str, data: TokenizedSet) -> None:
        """The tokenised split in chunks: a few bytes per token, far below the activations it produces. An
        empty split still goes as one empty chunk: the peer must know that it exists (and its shape)."""
        for start in range(0, max(len(data), 1), DATA_CHUNK_SAMPLES):
            part = data.subset(slice(start, start + DATA_CHUNK_SAMPLES))
            tensors = {name: getattr(part, name) for name in protocol.DATA_TENSORS}
            entries, frames = codec.encode(tensors)
            self._must_send(
                peer,
                "data",
                split=split,
                sample_ids=part.sample_ids,
                tensors=entries,
                frames=[codec.buffer(f) for f in frames],
                label_names=part.label_names,
                task=self.options.data.task,
            )

    def _store_host(self, peer: PeerState) -> str:
        return self.cluster.store_host or local_address_towards(peer.host.host)

    def _start_store(self, members: list[PeerState]) -> int:
        """The process group's rendezvous, hosted here; peers connect to it with their rank. It listens on the
        one address the peers reach this machine at (torch's TCPStore would take every interface, and it
        authenticates nobody); peers reaching it at several addresses leave it on every interface."""
        if self.store_listener is not None:  # an earlier attempt's (a run that re-planned): a fresh group each time
            self.store_listener.close()
            self.store = None
        addresses = {self._store_host(p) for p in members}
        address = addresses.pop() if len(addresses) == 1 else ("::" if any(":" in a for a in addresses) else "")
        if not address or address == "::":
            log.warning("the peers reach this machine at several addresses: the rendezvous listens on all of them")
        listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, 0))
        listener.listen(128)
        self.store_listener = listener
        port = listener.getsockname()[1]
        self.store = dist.TCPStore(
            address or "0.0.0.0", port, None, True, wait_for_workers=False, master_listen_fd=listener.fileno()
        )
        return port

    def _wait(self, members: list[PeerState], condition, then: RunState | None = None) -> None:
        next_beat = 0.0
        while not condition():
            now = time.monotonic()
            if now >= next_beat:
                for p in members:
                    self._send(p, "heartbeat", usage={})
                next_beat = now + HEARTBEAT_S
            self._admit_arrivals(members, now)
            gone = self._gone(members, now)
            if gone is not None:
                peer, silent = gone
                how = "its connection closed and it has" if peer.disconnected_at is not None else "it has"
                lost = f"peer {peer.host.name} (rank {peer.rank}) is lost: {how} been silent for {silent:.1f} s"
                raise PeerLost(peer, lost + (f"; {self.symptom[0]}" if self.symptom else ""))
            if self.symptom and now - self.symptom[1] > BLAME_WAIT_S:
                self._fail(self.symptom[0])
            self._poll(100)
        if then is not None:
            self._advance(then)

    def _observe(self, snapshot: bool = False) -> None:
        """The timeline's peer events (who changed status), and, every SNAPSHOT_EVERY_S (now: `snapshot`), the
        views' snapshot."""
        for name, peer in self.peers.items():
            if self._seen_status.get(name) != peer.status:
                self._seen_status[name] = peer.status
                self.timeline.add("peer", peer=name, status=peer.status)
        now = time.monotonic()
        if snapshot or now - self._last_snapshot >= SNAPSHOT_EVERY_S:
            self._last_snapshot = now
            self.view.update(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The run as it is now, as plain data for the views (pac.runtime.run_view describes its fields)."""
        now = time.monotonic()
        plan, ranks = self.assigned if self.assigned is not None else (None, [])
        going = self.state in (RunState.CACHE_BUILD, RunState.TRAINING)
        rows = []
        for name, peer in self.peers.items():
            rank = ranks.index(name) if name in ranks and self.state is not RunState.JOINING else -1
            phase, done, total, rate = peer.progress
            status = "arrived" if going and rank < 0 and peer.status == "joined" else peer.status
            rows.append(
                {
                    "name": name,
                    "rank": rank,
                    "status": status,
                    "layers": f"{plan.stages[rank][0]}-{plan.stages[rank][1] - 1}" if plan and rank >= 0 else "",
                    "done": done if phase == peer.status else 0,
                    "total": total if phase == peer.status else 0,
                    "unit": {"cache": "samples", "train": "steps"}.get(phase, ""),
                    "rate": rate if phase == peer.status else 0.0,
                    "rss": peer.usage.get("rss"),
                    "sent": peer.usage.get("sent"),
                    "heard": None if peer.status in ("connecting", "refused") else now - peer.last_heard,
                }
            )
        steps = self.timeline.of("step")
        thinned = [[e["step"], e["loss"]] for e in steps[:: -(-len(steps) // CURVE_POINTS)]] if steps else []
        return {
            "state": self.state.value,
            "reason": self.reason,
            "elapsed": now - self.began,
            "eta": self._eta(rows),
            "mode": plan.mode if plan else None,
            "plan": self.planned.describe().splitlines() if self.planned else ([plan.describe()] if plan else []),
            "peers": rows,
            "curves": {
                "steps": thinned,
                "total_steps": steps[-1]["total"] if steps else 0,
                "epochs_planned": self.options.optim.epochs,
                "epochs": self.timeline.of("epoch"),
            },
        }

    def _eta(self, rows: list[dict[str, Any]]) -> float | None:
        """Seconds left, from the slowest peer's rate in the phase it is in; while the cache is built, the planned
        training time after it (None before that, or where no rate is known yet)."""
        if self.state not in (RunState.CACHE_BUILD, RunState.TRAINING):
            return None
        left = [(r["total"] - r["done"]) / r["rate"] for r in rows if r["rank"] >= 0 and r["rate"] > 0 and r["total"]]
        if not left:
            return None
        after = self.planned.best.phase2_seconds if self.state is RunState.CACHE_BUILD and self.planned else 0.0
        return max(left) + after

    def _export(self, members: list[PeerState], plan: Plan) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        for peer in members:
            for name, content in peer.files.items():
                shared = peer.rank == 0 and name != "peer.log"  # rank 0 holds the adapter and global metrics
                target = self.out / name if shared else self.out / "peers" / peer.host.name / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(bytes(content))
        if not (self.out / ADAPTER_WEIGHTS).exists():
            self._fail("rank 0 finished without sending the adapter")
        lead = members[0].summary or {}
        summary = {
            **lead,
            "method": self.options.method,
            "task": self.options.data.task,
            "options": summary_options(self.options),
            "mode": plan.mode,
            "grad_compression": self._grad_compression() if plan.mode not in ("side-pipeline", PIPELINE) else None,
            "plan": [list(s) for s in plan.stages],
            "peers": {p.host.name: {"rank": p.rank, "profile": p.profile, "summary": p.summary} for p in members},
            "seconds_by_state": self._seconds_by_state(),  # of the last attempt, where a lost peer was re-planned
            "lost_peers": self.lost,
            "arrived_peers": self.arrivals,
        }
        planned = self._compare_with_plan()
        if planned is not None:
            summary["planned"] = planned
        summary["seconds_by_state"]["export"] = time.monotonic() - self.entered[RunState.EXPORT]
        (self.out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        write_model_card(self.out, summary)
        self._print(f"[pac-launch] adapter, metrics and logs in {self.out}")
        return summary

    def _seconds_by_state(self) -> dict[str, float]:
        """How long the run has spent in each state it left (joining, planning, cache build, training), after
        the process's start-up (starting) where it is known."""
        passed = list(self.entered.items())
        states = {state.value: after - since for (state, since), (_, after) in itertools.pairwise(passed)}
        return {"starting": self.starting, **states} if self.starting is not None else states

    def _shutdown(self, reason: str) -> None:
        for p in self.peers.values():
            if p.status not in ("connecting", "refused"):
                self._send(p, "shutdown", reason=reason)


def _numbers(fields: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a peer's metrics or usage (anything else a message carries is dropped)."""
    return {
        k: float(v)
        for k, v in fields.items()
        if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _memory(peer: PeerState) -> float:
    """The hosts file's max_mem= wins over what a peer reports (a cap the user chose for that device)."""
    return float(peer.host.max_mem or peer.profile.get("max_mem", 1))


def _describe_profile(profile: dict[str, Any]) -> str:
    share, limit = profile.get("cpu_share"), profile.get("memory_limit")
    cores = f"{profile.get('cores', '?')} cores" + (f" ({share:g} by its CPU quota)" if share else "")
    memory = f"{profile.get('max_mem', 0) / 2**30:.1f} GiB" + (
        f" ({limit / 2**30:.1f} by its memory limit)" if limit else ""
    )
    role = ", phase 1 only" if profile.get("phase1_only") else ""
    if profile.get("device", "cpu") != "cpu":  # `pac peer --device`
        role += f", phase 2 on {profile['device']}"
    return f"{cores}, {memory}, {profile.get('accelerator', '?')}, pac {profile.get('pac')}{role}"
