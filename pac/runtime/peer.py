"""`pac peer`: the agent on each device of a home cluster.

It listens on a ZeroMQ endpoint and waits for a coordinator (`pac-launch`). After both sides have
proved they know the run's join token (pac.net.auth), it reports this device's profile, receives the
tokenised data and its assignment, runs its part of phase 1 and phase 2 on a worker thread
(pac.runtime.collaborative), reports progress and heartbeats, sends its results back and exits.
It also exits when the coordinator falls silent for longer than `coordinator_timeout`.

The control socket is a ROUTER, not a DEALER: a bound DEALER would spread its replies round-robin
over everyone who connects, while a ROUTER answers exactly the coordinator that authenticated and
only rejects (with an `error` reply) what anybody else sends.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from pac import __version__
from pac.data.tokenize import TokenizedSet
from pac.errors import PacError
from pac.models.loading import resolve_model
from pac.net import auth, codec, protocol
from pac.net.codec import CodecError
from pac.net.dataplane import CurveConfig, ZmqDataPlane
from pac.net.discovery import Advertisement
from pac.runconfig import run_config_from_wire
from pac.runtime.cgroup import cpu_share, memory_limit
from pac.runtime.collaborative import Assignment, run_assignment, run_directory
from pac.runtime.pipeline import RECEIVER_THREAD
from pac.runtime.profiler import profile_device
from pac.runtime.run_dir import RUN_FILE

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
LOG_TAIL_BYTES = 1 << 20  # of this peer's log, what goes into the run's --out (the whole log stays here)
HANDSHAKE_LOG_EVERY_S = 60.0


def result_files(out: Path) -> list[Path]:
    """What the run left in this peer's run directory for --out: on rank 0 the adapter as its method saved it
    (weights, pac's and peft's configs, a head), and the metrics; every plain file but the directory's own
    bookkeeping (its lock, its identity); nothing where the run left no directory."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != RUN_FILE)


@dataclass
class PeerSettings:
    listen: str  # e.g. tcp://0.0.0.0:29600
    name: str
    token: str
    work_dir: Path
    max_mem: int | None = None
    threads: int | None = None
    coordinator_timeout: float = 60.0  # seconds of silence after which the run is considered gone
    stays: bool = False  # an agent that serves the next run (not --once): a run can re-plan and come back to it
    advertise: bool = True  # on the network's mDNS, for `pac-launch --discover` (pac.net.discovery)
    phase1_only: bool = False  # runs its layers in phase 1, trains nothing (deploy/android-termux.md)
    device: str = "cpu"  # where data-parallel phase 2 computes (`pac peer --device`; pac.runtime.device)


def device_profile(settings: PeerSettings) -> dict[str, Any]:
    """What the planner needs to know about this device."""
    memory = psutil.virtual_memory().total
    limit = memory_limit(memory)  # a container's --memory: what the machine's total says nothing of
    return {
        "cores": os.cpu_count() or 1,
        "cpu_share": cpu_share(),  # the cores a CPU quota leaves it (a container's --cpus), or None
        "threads": settings.threads or torch.get_num_threads(),
        "memory": memory,
        "memory_limit": limit,
        "max_mem": settings.max_mem or limit or memory,
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "pac": __version__,
        "platform": platform.platform(),
        "stays": settings.stays,
        "phase1_only": settings.phase1_only,
        "device": settings.device,
    }


def _data_from_chunks(split: str, chunks: list[dict[str, Any]]) -> TokenizedSet:
    """Rebuild a TokenizedSet from its `data` messages (the coordinator's tokenisation, sent once); data that
    does not make one is a PacError saying what is wrong, not an error from inside torch."""
    parts = [_data_chunk(f"data chunk {i} of split {split!r}", c) for i, c in enumerate(chunks)]
    rows = [{name: list(t.shape[1:]) for name, t in part.items()} for part in parts]
    odd = next((r for r in rows if r != rows[0]), None)
    if odd is not None:
        raise PacError(f"the data chunks of split {split!r} disagree on the shape of a row: {rows[0]} and {odd}")
    return TokenizedSet(
        sample_ids=[sid for c in chunks for sid in c["sample_ids"]],
        **{name: torch.cat([part[name] for part in parts]) for name in protocol.DATA_TENSORS},
        label_names=chunks[0]["label_names"],
    )


def _data_chunk(where: str, message: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        tensors = codec.decode(codec.parse_header(message["tensors"]), message["frames"])
    except CodecError as exc:
        raise PacError(f"{where} is garbage or truncated: {exc}") from None
    n = len(message["sample_ids"])
    if set(tensors) != set(protocol.DATA_TENSORS) or any(
        t.dtype != torch.int64 or t.dim() == 0 or len(t) != n for t in tensors.values()
    ):
        got = ", ".join(f"{name} {t.dtype} {list(t.shape)}" for name, t in tensors.items()) or "no tensors"
        raise PacError(
            f"{where} holds {got} for {n} samples; expected int64 {', '.join(protocol.DATA_TENSORS)} "
            "with one row per sample"
        )
    return tensors


class PeerAgent:
    def __init__(self, settings: PeerSettings):
        self.settings = settings
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_CONTROL_BYTES)
        self.control.setsockopt(zmq.LINGER, 2000)
        if "[" in settings.listen:
            self.control.setsockopt(zmq.IPV6, 1)
        auth.serve_encrypted(self.control, settings.token)
        # A coordinator with another token fails the CURVE handshake before any message: log it.
        self.monitor = self.control.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        try:
            self.control.bind(settings.listen)
        except zmq.ZMQError as exc:
            self.control.close(0)
            self.ctx.term()
            raise PacError(
                f"cannot listen on {settings.listen}: {exc}; pick another address or port with --listen"
            ) from None
        self.endpoint = self.control.getsockopt(zmq.LAST_ENDPOINT).decode()
        host = settings.listen.split("://", 1)[1].rsplit(":", 1)[0]
        # The data plane is always CURVE-encrypted: taps are derived from private data. The coordinator
        # hands every peer the others' public keys with the assignment; only those may deliver.
        public, secret = CurveConfig.generate()
        self.plane = ZmqDataPlane(-1, f"tcp://{host}:0", {}, curve=CurveConfig(public, secret, {}))
        self.data_key = public
        self.coordinator: bytes | None = None  # routing id of the authenticated coordinator
        self.pending_nonce: dict[bytes, bytes] = {}  # routing id -> the nonce we asked it to sign
        self.last_heard = time.monotonic()
        self.chunks: dict[str, list[dict[str, Any]]] = {}
        self.events: queue.Queue = queue.Queue()  # from the worker thread: ("progress"|"done"|"failed", ...)
        self.stop = threading.Event()
        self.worker: threading.Thread | None = None
        self.profiler: threading.Thread | None = None
        self.exit_code: int | None = None
        self.work_failed = False
        self.label_names: list[str] | None = None
        self.phase_start: dict[str, tuple[float, int]] = {}  # phase -> (when, done) at its first report
        self.failed_handshakes, self.handshake_logged = 0, -HANDSHAKE_LOG_EVERY_S
        self.advertisement = self._advertise(host) if settings.advertise else None
        self.process = psutil.Process()

    def _advertise(self, host: str) -> Advertisement | None:
        """This peer on the network's mDNS: its name, port, protocol and device summary (never the token)."""
        profile = device_profile(self.settings)
        properties = {
            "pac": __version__,
            "protocol": str(protocol.PROTOCOL_VERSION),
            "cores": str(profile["cores"]),
            "threads": str(profile["threads"]),
            "memory_gb": f"{profile['max_mem'] / 2**30:.1f}",  # what it may use: --max-mem, or its memory limit
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }
        if self.settings.phase1_only:
            properties["role"] = "phase 1 only"
        port = int(self.endpoint.rsplit(":", 1)[1])
        try:
            return Advertisement(self.settings.name, host.strip("[]"), port, properties)
        except Exception as exc:  # a machine without multicast: the peer still serves a hosts file's coordinator
            log.warning(
                "not advertised on the network (%s: %s): list this peer in a hosts file", type(exc).__name__, exc
            )
            return None

    # ------------------------------------------------------------------ sending
    def _usage(self) -> dict[str, int]:
        """What the live views show of this device: its resident memory and what its data plane has sent."""
        return {"rss": self.process.memory_info().rss, "sent": self.plane.bytes_sent}

    def _send(self, to: bytes, kind: str, **fields: Any) -> None:
        try:
            self.control.send_multipart([to, protocol.encode(kind, **fields)], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not send %s: the coordinator's connection is congested", kind)

    def _reject(self, to: bytes, reason: str) -> None:
        log.warning("rejected a message from %r: %s", to[:32], reason)
        self._send(to, "error", reason=reason)

    # ------------------------------------------------------------------ main loop
    def serve(self) -> int:
        """Serve one run; returns the process exit code (0 done, 2 refused, 3 coordinator lost, 1 failed)."""
        log.info("peer %s listening on %s", self.settings.name, self.endpoint)
        print(f"pac peer {self.settings.name}: listening on {self.endpoint}", flush=True)
        next_beat = time.monotonic()
        try:
            while self.exit_code is None:
                if self.control.poll(200):
                    self._on_frames(self.control.recv_multipart())
                while self.monitor.poll(0):
                    self._on_failed_handshake(zmq.Event(recv_monitor_message(self.monitor)["event"]).name)
                self._drain_events()
                now = time.monotonic()
                if self.coordinator is not None:
                    if now >= next_beat:
                        self._send(self.coordinator, "heartbeat", usage=self._usage())
                        next_beat = now + HEARTBEAT_S
                    if now - self.last_heard > self.settings.coordinator_timeout:
                        log.error("the coordinator has been silent for %.0f s: stopping", now - self.last_heard)
                        print(f"pac peer {self.settings.name}: coordinator lost, stopping", flush=True)
                        self.exit_code = 3
            return self.exit_code
        finally:
            self.stop.set()
            if self.advertisement is not None:  # the run is over: no coordinator should pick this process now
                self.advertisement.close()
                self.advertisement = None
            if self.worker is not None:
                self.worker.join(timeout=10)
            # libzmq aborts the process when a socket is closed under another thread's call: the data plane's
            # receiver sees `stop` within a poll; work still stuck (a collective of a broken group) keeps its
            # sockets, which the process's end (exit, or an agent's exec afresh) closes.
            users = [t for t in threading.enumerate() if t.name == RECEIVER_THREAD]
            for thread in users:
                thread.join(timeout=2)
            if any(t.is_alive() for t in [*users, *([self.worker] if self.worker else [])]):
                log.warning("the run's work did not stop in time: its sockets close as this process ends")
            else:
                self.close()

    def close(self) -> None:
        """Release the sockets (the monitor first: ZeroMQ aborts the process on a monitor left behind)."""
        self.plane.close()
        self.control.disable_monitor()
        self.monitor.close(0)
        self.control.close()
        self.ctx.term()

    def _on_failed_handshake(self, event: str) -> None:
        """Logged at most once a minute, with how many failed since: a misconfigured client retries several
        times a second, and the log would fill with the same line."""
        self.failed_handshakes += 1
        now = time.monotonic()
        if now - self.handshake_logged < HANDSHAKE_LOG_EVERY_S:
            return
        log.warning(
            "%d connection(s) failed the encrypted handshake (%s) since the last such line: a coordinator with "
            "another PAC_JOIN_TOKEN, or not a pac coordinator",
            self.failed_handshakes,
            event,
        )
        self.failed_handshakes, self.handshake_logged = 0, now

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            if frames:
                self._reject(frames[0], f"expected one message frame, got {len(frames) - 1}")
            return
        sender, raw = frames
        try:
            message = protocol.decode(raw)
        except protocol.ProtocolError as exc:
            self._reject(sender, str(exc))
            return
        kind = message["type"]
        if kind == "error":  # never answered, so two sides cannot bounce errors forever
            log.warning("%r rejected a message: %s", sender[:32], message["reason"])
        elif kind == "hello":
            self._on_hello(sender, message)
        elif kind == "welcome":
            self._on_welcome(sender, message)
        elif kind == "refused":
            self._on_refused(sender, message)
        elif sender != self.coordinator:
            self._reject(sender, f"{kind}: not authenticated; send hello first")
        else:
            self.last_heard = time.monotonic()
            self._on_coordinator(message)

    def _on_hello(self, sender: bytes, message: dict[str, Any]) -> None:
        if self.coordinator is not None and sender != self.coordinator:
            self._reject(sender, "this peer is already in a run with another coordinator")
            return
        # A coordinator repeats hello until it hears back; answering each with the same nonce keeps
        # whichever join it reads first valid.
        nonce = self.pending_nonce.setdefault(sender, auth.new_nonce())
        self._send(
            sender,
            "join",
            name=self.settings.name,
            profile=device_profile(self.settings),
            nonce=nonce,
            proof=auth.proof(self.settings.token, "peer", message["nonce"]),
            data_endpoint=self.plane.endpoint,
            data_key=self.data_key,
        )

    def _on_refused(self, sender: bytes, message: dict[str, Any]) -> None:
        """A coordinator that read our join and found its proof wrong: it ends this peer only if it proves that it
        holds the token itself, as `welcome` must (a client that has only said hello cannot stop an agent)."""
        nonce = self.pending_nonce.get(sender)
        proven = nonce is not None and auth.verify(self.settings.token, "refusal", nonce, message["proof"])
        if self.coordinator is not None or not proven:
            self._reject(sender, "refused without a valid proof of the join token: ignored")
            return
        log.error("the coordinator refused this peer: %s", message["reason"])
        print(f"pac peer {self.settings.name}: refused: {message['reason']}", flush=True)
        self.exit_code = 2

    def _on_welcome(self, sender: bytes, message: dict[str, Any]) -> None:
        nonce = self.pending_nonce.get(sender)
        if nonce is None or not auth.verify(self.settings.token, "coordinator", nonce, message["proof"]):
            self._reject(sender, "welcome without a valid proof of the join token")
            return
        self.coordinator, self.last_heard = sender, time.monotonic()
        self.plane.rank = message["rank"]
        log.info("joined the run as rank %d", message["rank"])
        print(f"pac peer {self.settings.name}: joined as rank {message['rank']}", flush=True)

    def _on_coordinator(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "data":
            self.chunks.setdefault(message["split"], []).append(message)
            self.label_names = message["label_names"]
        elif kind == "probe":  # the coordinator times the link: answer at once, with the same bytes
            self._send(self.coordinator, "probe", seq=message["seq"], payload=message["payload"])
        elif kind == "profile":
            if self.profiler is not None:
                self._reject(self.coordinator, "profile: this peer is already measuring itself")
                return
            self.profiler = threading.Thread(
                target=self._profile, args=(message["run"], message["refresh"]), name="pac-profile", daemon=True
            )
            self.profiler.start()
        elif kind == "assign":
            if self.worker is not None:
                self._reject(self.coordinator, "assign: this peer is already running an assignment")
                return
            try:
                job = Assignment.from_wire(message["assignment"])
                splits = {name: _data_from_chunks(name, chunks) for name, chunks in self.chunks.items()}
                if self.settings.phase1_only and job.rank in job.plan.trainers:
                    raise PacError(
                        f"this peer runs phase 1 only (--phase1-only), but the plan has it train (rank {job.rank}, "
                        f"{job.plan.mode} mode): give it share 0 in shuffle mode, or restart it without --phase1-only"
                    )
            except (PacError, KeyError, ValueError, RuntimeError) as exc:
                self._send(self.coordinator, "failed", reason=f"bad assignment or data: {exc}")
                self.exit_code = 1
                return
            self.worker = threading.Thread(target=self._work, args=(job, splits), name="pac-work", daemon=True)
            self.worker.start()
        elif kind == "shutdown":
            log.info("shutdown: %s", message["reason"])
            self.exit_code = 1 if self.work_failed else 0
        # heartbeats only refresh last_heard

    # ------------------------------------------------------------------ work
    def _profile(self, run: dict[str, Any], refresh: bool) -> None:
        """This device's profile for the run the coordinator is planning (pac.runtime.profiler)."""
        try:
            opts = run_config_from_wire(run)
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            memory = device_profile(self.settings)["max_mem"]
            model = resolve_model(opts.model)
            only = self.settings.phase1_only
            profile = profile_device(model, opts, self.settings.name, memory, refresh=refresh, phase1_only=only)
            self.events.put(("profiled", profile))
        except Exception as exc:
            log.error("profiling failed:\n%s", traceback.format_exc())
            self.events.put(("failed", f"profiling this device failed: {type(exc).__name__}: {exc}"))

    def _work(self, job: Assignment, splits: dict[str, TokenizedSet]) -> None:
        self.phase_start["cache"] = (time.monotonic(), 0)
        try:
            self.plane.rank = job.rank  # the plan may order the peers otherwise than they joined
            threads = job.threads or self.settings.threads  # the hosts file's threads= wins
            if threads:
                torch.set_num_threads(threads)
            with run_directory(job, splits, self.label_names, self.settings.work_dir / "runs") as out:
                summary = run_assignment(
                    job,
                    splits,
                    self.label_names,
                    out,
                    zmq_plane=self.plane,
                    progress=lambda *report: self.events.put(("progress", *report)),
                    stop=self.stop,
                    device=self.settings.device,
                )
            steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in summary["seconds_by_step"].items())
            log.info("the assignment's time: %s", steps)
            self.events.put(("done", summary, out))
        except Exception as exc:  # reported to the coordinator, which fails the run with this reason
            log.error("assignment failed:\n%s", traceback.format_exc())
            self.events.put(("failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, PacError) else str(exc)))

    def _drain_events(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if self.coordinator is None:
                continue
            if event[0] == "progress":
                _, phase, done, total, metrics = event
                now = time.monotonic()
                t0, d0 = self.phase_start.setdefault(phase, (now, done))
                rate = (done - d0) / (now - t0) if now > t0 else 0.0
                metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
                self._send(
                    self.coordinator, "progress", phase=phase, done=done, total=total, rate=float(rate), metrics=metrics
                )
            elif event[0] == "profiled":
                self._send(self.coordinator, "profiled", profile=event[1])
            elif event[0] == "done":
                _, summary, out = event
                self._send_results(out)
                self._send(self.coordinator, "heartbeat", usage=self._usage())  # the run's last memory and traffic
                self._send(self.coordinator, "finished", summary=summary)
            else:
                self.work_failed = True
                self._send(self.coordinator, "failed", reason=event[1])

    def _send_results(self, out: Path) -> None:
        """The adapter files (rank 0), the metrics and this peer's log, in chunks under the control-message limit."""
        files = result_files(out)
        log_file = self.settings.work_dir / "peer.log"
        if log_file.exists():
            files.append(log_file)
        for path in files:
            data = path.read_bytes()
            if path == log_file and len(data) > LOG_TAIL_BYTES:
                skipped = len(data) - LOG_TAIL_BYTES
                note = (
                    f"[the first {skipped} bytes are left out here: the whole log is {path} on {self.settings.name}]\n"
                )
                data = note.encode() + data[skipped:]
            offsets = range(0, max(len(data), 1), protocol.CHUNK_BYTES)
            for offset in offsets:
                chunk = data[offset : offset + protocol.CHUNK_BYTES]
                last = offset + protocol.CHUNK_BYTES >= len(data)
                # Blocking send: results must not be dropped under the high-water mark.
                raw = protocol.encode("file", name=path.name, offset=offset, chunk=chunk, last=last)
                self.control.send_multipart([self.coordinator, raw])
