"""The collaborative runtime end to end: `pac-launch` with real `pac peer` processes on loopback, real
ZeroMQ sockets, a real gloo process group; every placement mode against a single-device run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
import zmq
from safetensors.torch import load_file

from launcher.local import LocalPeers, ephemeral_port_floor, free_port
from launcher.main import main as launch
from pac.cache.format import MANIFEST
from pac.methods.parallel_adapters import ParallelAdapterOptions
from pac.methods.registry import BuildContext, get_method
from pac.net import auth, protocol
from pac.net.hosts import PeerHost
from pac.plan.placement import owned_positions, stage_taps
from pac.runconfig import ClusterOptions
from pac.runtime.cache_build import build_cache
from pac.runtime.coordinator import Coordinator, RunFailed
from pac.runtime.launch_record import LaunchRecord
from pac.runtime.sources import CachedTaps
from pac.workflow import (
    CacheOptions,
    DataOptions,
    OptimOptions,
    TrainOptions,
    load_for_inference,
    prepare_data,
    train,
    with_defaults,
)

COMMON = ["--epochs", "2", "--val-size", "12", "--reduction", "4", "--batch-size", "8"]


def _options(model, data, out, cache) -> TrainOptions:
    return TrainOptions(
        model=str(model),
        data=DataOptions(data=str(data), val_size=12),
        out=str(out),
        optim=OptimOptions(epochs=2),
        method_options=ParallelAdapterOptions(reduction=4),
        cache=CacheOptions(str(cache)),
    )


@pytest.fixture(scope="module")
def single_device(tiny_llama, topic_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    summary = train(_options(tiny_llama, topic_jsonl, root / "out", root / "cache"))
    return load_file(root / "out" / "adapter_model.safetensors"), summary


def _launch(tiny_llama, topic_jsonl, out, cache, *extra, common: list[str] = COMMON) -> int:
    argv = ["--local", "3", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out)]
    return launch([*argv, "--cache-dir", str(cache), "--join-timeout", "90", *common, *extra])


LORA_COMMON = [a for a in COMMON if a not in ("--reduction", "4")]  # LoRA has no --reduction


@pytest.mark.parametrize(
    "mode, plane, schedule",
    [
        ("shuffle", "zmq", []),
        ("shuffle", "torch", []),
        ("side-pipeline", "zmq", []),
        ("side-pipeline", "torch", []),
        # 1F1B sends while its neighbour sends too: over gloo that needs the stage's queued sends.
        ("side-pipeline", "torch", ["--schedule", "1f1b", "--micro-batches", "3"]),
        ("replicated", "zmq", []),
        # A hybrid: ranks 0 and 1 take turns at layers 0-1 (a stage's data-parallel group), rank 2 runs 2-3.
        ("shuffle", "zmq", ["--stages", "0-1,0-1,2-3"]),
        ("shuffle", "torch", ["--stages", "0-1,0-1,2-3"]),
    ],
)
def test_three_peers_train_the_same_adapter_as_one_device(
    mode, plane, schedule, single_device, tiny_llama, topic_jsonl, tmp_path, capsys
):
    out = tmp_path / "out"
    extra = ["--mode", mode, "--data-plane", plane, *schedule]
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", *extra) == 0
    shown = capsys.readouterr().out
    if "--schedule" in schedule:
        assert "[pac-launch] phase 2 pipelined 1f1b, 3 micro-batches per batch" in shown
    if "--stages" in schedule:
        assert "rank 0: layers 0-1, rank 1: layers 0-1, rank 2: layers 2-3" in shown
    for state in ("joining", "planning", "cache build", "training", "export", "done"):
        assert f"[pac-launch] {state}" in shown
    expected, single_summary = single_device
    got = load_file(out / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == mode and len(summary["peers"]) == 3
    timeline = summary["seconds_by_state"]  # where the run's time went, state by state
    states = ["starting", "joining", "planning", "cache build", "training", "export"]  # starting: pac-launch's own
    assert list(timeline) == states and min(timeline.values()) > 0
    # Each peer trained only its own third of the samples, yet the metrics are those of the whole set.
    cached = [p["summary"]["cached_samples"]["train"] for p in summary["peers"].values()]
    if mode == "side-pipeline":  # every stage holds its layers of every sample
        assert cached == [single_summary["train_samples"]] * 3
    else:  # each peer trained only its own third of the samples, yet the metrics are those of the whole set
        assert sum(cached) == single_summary["train_samples"] and max(cached) - min(cached) <= 1
    for ours, theirs in zip(summary["epochs"], single_summary["epochs"], strict=True):
        assert ours["val_accuracy"] == pytest.approx(theirs["val_accuracy"])
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    assert (out / "metrics.jsonl").exists() and (out / "pac_adapter_config.json").exists()
    card = (out / "README.md").read_text()  # the model card, with the run's split sizes
    assert f"{single_summary['train_samples']} rows trained on, {single_summary['val_samples']} rows validated" in card
    for name in ("local-0", "local-1", "local-2"):
        assert (out / "peers" / name / "peer.log").read_text()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[int, Path]:
    """Files smaller than the cluster: 20 rows, 4 of each of 5 topics (10% validation: 2 rows for 3 peers),
    and 3 of those rows (10% validation: none)."""
    topics = ["market shares rose", "team won the cup", "new phone chip", "film star award", "minister vote party"]
    rows = [json.dumps({"text": topics[i % 5] + " the" * (i // 5), "label": f"t{i % 5}"}) for i in range(20)]
    root = tmp_path_factory.mktemp("small")
    for count in (20, 3):
        (root / f"{count}.jsonl").write_text("\n".join(rows[:count]) + "\n")
    return {count: root / f"{count}.jsonl" for count in (20, 3)}


@pytest.mark.parametrize(
    "mode, rows, val_size",
    [
        *[(mode, 20, "0.1") for mode in ("shuffle", "side-pipeline", "replicated")],  # rank 2 validates on none
        *[(mode, 3, "0.1") for mode in ("shuffle", "side-pipeline", "replicated")],  # nobody validates
        ("shuffle", 3, "1"),  # 2 training rows: rank 2 trains on none, yet joins every all-reduce with zeros
    ],
)
def test_splits_smaller_than_the_cluster_train_the_single_device_adapter(
    mode, rows, val_size, small_data, tiny_llama, tmp_path, caplog
):
    """A peer whose share of a split is empty caches no samples of it and the run goes on; the adapter and
    the metrics are those of one device on the same rows, and an empty validation split reports none."""
    data, cache = small_data[rows], tmp_path / "cache"
    options = _options(tiny_llama, data, tmp_path / "single", cache)
    options.data.val_size = float(val_size) if "." in val_size else int(val_size)
    single = train(options)
    out = tmp_path / "out"
    assert _launch(tiny_llama, data, out, cache, "--mode", mode, "--val-size", val_size) == 0
    expected = load_file(tmp_path / "single" / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split_sizes"] == {"train": single["train_samples"], "val": single["val_samples"]}
    cached = {s: [p["summary"]["cached_samples"][s] for p in summary["peers"].values()] for s in ("train", "val")}
    if mode != "side-pipeline":  # shares of every split, round-robin: the last rank's share is the empty one
        assert cached["val"][-1] == 0 and (cached["train"][-1] == 0) == (single["train_samples"] < 3)
    for ours, theirs in zip(summary["epochs"], single["epochs"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ("val_accuracy" in ours) == ("val_accuracy" in theirs) == (single["val_samples"] > 0)
        if single["val_samples"]:
            assert ours["val_accuracy"] == pytest.approx(theirs["val_accuracy"])
    if not single["val_samples"]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records and not [k for r in records for k in r if k.startswith("val_")]
        assert "nothing to validate on" in caplog.text


def test_a_split_that_leaves_nothing_to_train_on_is_refused_before_any_peer_joins(
    small_data, tiny_llama, tmp_path, capsys
):
    one_row = tmp_path / "one.jsonl"
    one_row.write_text(small_data[3].read_text().splitlines()[0] + "\n")
    assert _launch(tiny_llama, one_row, tmp_path / "out", tmp_path / "cache", "--val-size", "1") == 2
    shown = capsys.readouterr()
    assert "leaves none to train on" in shown.err and "joined" not in shown.out


def test_pruned_init_on_a_peer_without_training_rows(small_data, tiny_llama, tmp_path):
    """Its own share of the training cache is empty: it builds the model anyway (rank 0's pruned weights
    then reach it by broadcast) instead of failing on statistics of no samples."""
    options = with_defaults(_options(tiny_llama, small_data[3], tmp_path / "out", tmp_path / "cache"))
    options.method_options.side_init, options.data.val_size = "pruned", 0.1
    prepared = prepare_data(options.model, options.data)
    method = get_method(options.method)
    taps = method.taps(options.method_options, "classify", 4)
    share = build_cache(prepared.model_dir, prepared.train.subset([]), tmp_path / "cache", taps).open()
    context = BuildContext(prepared.model_dir, "classify", prepared.label_names, 0, 128, CachedTaps(share))
    model = method.build(options.method_options, context)
    assert model.side is not None and len(share) == 0


def test_stages_by_hand_and_bad_stage_specs(tiny_llama, topic_jsonl, tmp_path, capsys):
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache", "--stages", "0-0,1-2,3-3") == 0
    assert "rank 0: layers 0-0, rank 1: layers 1-2, rank 2: layers 3-3" in capsys.readouterr().out
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "bad", tmp_path / "cache", "--stages", "0-1,3-3,2-2") == 2
    shown = capsys.readouterr()
    assert "contiguous" in shown.err and "joined" not in shown.out  # refused before any peer is asked
    pipelined = ["--task", "lm", "--mode", "side-pipeline", "--shortlist", "8"]
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "bad", tmp_path / "cache", *pipelined) == 2
    assert "--shortlist runs in the shuffle and replicated modes" in capsys.readouterr().err


def test_local_ports_are_below_the_ephemeral_range_and_free():
    """So a connect to a local peer that has not bound yet can never meet itself (see free_port)."""
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < ephemeral_port_floor()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_bad_hosts_file_names_the_line(tmp_path, capsys):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# home\nlaptop:29600 name=laptop\ndesktop:notaport\n")
    assert launch(["--peers", str(hosts)]) == 2
    err = capsys.readouterr().err
    assert "hosts.txt:3" in err and "port" in err


def _peer_process(tmp_path, name: str, token: str, *extra: str) -> tuple[subprocess.Popen, PeerHost]:
    port = free_port()
    cmd = [sys.executable, "-m", "pac.cli", "peer", "--listen", f"tcp://127.0.0.1:{port}", "--name", name]
    cmd += ["--work-dir", str(tmp_path / name), "--coordinator-timeout", "20", "--once", *extra]
    env = {**os.environ, auth.TOKEN_ENV: token}
    return subprocess.Popen(cmd, env=env), PeerHost("127.0.0.1", port, name)


def test_a_peer_with_a_wrong_token_is_refused_and_the_others_train(tiny_llama, topic_jsonl, tmp_path, caplog):
    token = auth.new_token()
    good, good_host = _peer_process(tmp_path, "good", token)
    bad, bad_host = _peer_process(tmp_path, "intruder", "not-the-token")
    try:
        settings = ClusterOptions(join_timeout=60)
        out = tmp_path / "out"
        options = _options(tiny_llama, topic_jsonl, out, tmp_path / "c")
        summary = Coordinator([good_host, bad_host], token, options, settings).run()
        assert list(summary["peers"]) == ["good"]
        assert "refused peer intruder" in caplog.text and "wrong join token" in caplog.text
        assert good.wait(timeout=30) == 0
        # The intruder never got to talk: its control socket's keys come from its own token, so the
        # coordinator's encrypted handshake failed. It logged that and waits for a coordinator of its run.
        assert bad.poll() is None
        assert "failed the encrypted handshake" in (tmp_path / "intruder" / "peer.log").read_text()
        assert (out / "adapter_model.safetensors").exists()
    finally:
        for proc in (good, bad):
            proc.kill()


def test_one_failed_handshake_is_retried_not_refused(tiny_llama, topic_jsonl, tmp_path, caplog):
    """A single failed encrypted handshake (on loopback, a connect to a port nobody bound yet can meet
    itself) is not proof of a wrong token: the coordinator retries, and the real peer that binds the port
    next joins and trains."""
    caplog.set_level(logging.INFO, logger="pac.runtime.coordinator")
    token = auth.new_token()
    port = free_port()
    ctx = zmq.Context()
    impostor = ctx.socket(zmq.ROUTER)  # another run's keys: the coordinator's handshake with it fails
    impostor.setsockopt(zmq.LINGER, 0)
    auth.serve_encrypted(impostor, "another-run's-token")
    events = impostor.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    impostor.bind(f"tcp://127.0.0.1:{port}")
    started: list[subprocess.Popen] = []

    def hand_the_port_to_the_real_peer() -> None:
        assert events.poll(30_000), "the coordinator never tried the impostor's port"
        impostor.close(0)  # before ZeroMQ's reconnect (100 ms): exactly one failed handshake
        cmd = [sys.executable, "-m", "pac.cli", "peer", "--listen", f"tcp://127.0.0.1:{port}", "--name", "late"]
        cmd += ["--work-dir", str(tmp_path / "late"), "--coordinator-timeout", "20", "--once"]
        started.append(subprocess.Popen(cmd, env={**os.environ, auth.TOKEN_ENV: token}))

    switch = threading.Thread(target=hand_the_port_to_the_real_peer)
    switch.start()
    try:
        options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "c")
        hosts = [PeerHost("127.0.0.1", port, "late")]
        summary = Coordinator(hosts, token, options, ClusterOptions(join_timeout=60)).run()
        switch.join()
        assert list(summary["peers"]) == ["late"]
        assert "handshake with late" in caplog.text and "retrying" in caplog.text
        assert "refused" not in caplog.text
        assert started[0].wait(timeout=30) == 0
    finally:
        switch.join()
        events.close(0)
        for proc in started:
            proc.kill()
        ctx.term()


def test_garbage_gets_an_error_reply_and_crashes_nobody(tiny_llama, topic_jsonl, tmp_path, caplog):
    """A peer answered by garbage, by an oversized and a mistyped message, keeps serving; so does the coordinator."""
    token = auth.new_token()
    peer, host = _peer_process(tmp_path, "target", token)
    ctx = zmq.Context()
    outsider = ctx.socket(zmq.DEALER)  # does not know the token: cannot even complete the handshake
    outsider.setsockopt(zmq.RCVTIMEO, 2000)
    outsider.setsockopt(zmq.LINGER, 0)
    auth.connect_encrypted(outsider, "not-the-token")
    outsider.connect(host.endpoint)
    rogue = ctx.socket(zmq.DEALER)  # knows the token (a buggy device of the run), sends garbage
    rogue.setsockopt(zmq.RCVTIMEO, 60000)  # the first reply waits for the peer process to start (slow under load)
    rogue.setsockopt(zmq.LINGER, 0)
    auth.connect_encrypted(rogue, token)
    rogue.connect(host.endpoint)
    try:
        outsider.send(protocol.encode("hello", nonce=auth.new_nonce()))
        with pytest.raises(zmq.Again):
            outsider.recv()
        replies = []
        for junk in (b"\xc1garbage", protocol.encode("heartbeat", usage={})[:-1] + b"\x00", b"\x93\x01\x02\x03"):
            rogue.send(junk)
            replies.append(protocol.decode(rogue.recv()))
        rogue.send(msgpack.packb({"type": "hello", "version": protocol.PROTOCOL_VERSION, "nonce": 7}))
        replies.append(protocol.decode(rogue.recv()))
        rogue.send(protocol.encode("assign", assignment={}))  # not authenticated
        replies.append(protocol.decode(rogue.recv()))
        assert [r["type"] for r in replies] == ["error"] * 5
        assert "msgpack" in replies[0]["reason"] and "nonce" in replies[3]["reason"]
        assert "not authenticated" in replies[4]["reason"]
        # A token holder that says hello and then `refused` (the message that ends a peer) must prove it holds
        # the token, as a welcome must: a proof over another nonce is rejected, and the peer serves on.
        rogue.send(protocol.encode("hello", nonce=auth.new_nonce()))
        joined = protocol.decode(rogue.recv())
        assert joined["type"] == "join"
        forged = auth.proof(token, "refusal", auth.new_nonce())
        rogue.send(protocol.encode("refused", proof=forged, reason="go away"))
        rejected = protocol.decode(rogue.recv())
        assert rejected["type"] == "error" and "without a valid proof" in rejected["reason"]
        rogue.send(b"x" * (protocol.MAX_CONTROL_BYTES + 1))  # beyond MAXMSGSIZE: zmq drops the connection
        time.sleep(0.5)
        assert peer.poll() is None  # still serving
        # The coordinator survives garbage too: it answers with an error, logs it and goes on waiting.
        fake = ctx.socket(zmq.ROUTER)
        fake.setsockopt(zmq.RCVTIMEO, 15000)
        auth.serve_encrypted(fake, token)
        fake_host = PeerHost("127.0.0.1", fake.bind_to_random_port("tcp://127.0.0.1"), "fake")

        def answer_with_garbage() -> None:
            hello = fake.recv_multipart()
            fake.send_multipart([hello[0], b"\xc1 not msgpack"])
            replies.append(protocol.decode(fake.recv_multipart()[1]))

        worker = threading.Thread(target=answer_with_garbage)
        worker.start()
        options = _options(tiny_llama, topic_jsonl, tmp_path / "o", tmp_path / "c")
        with pytest.raises(RunFailed, match="no answer within 5 s from fake"):
            Coordinator([fake_host], token, options, ClusterOptions(join_timeout=5)).run()
        worker.join()
        assert replies[-1]["type"] == "error" and "msgpack" in replies[-1]["reason"]
        assert "rejected a message from fake" in caplog.text
        fake.close(0)
        # With the proof over the peer's own nonce, the refusal is honoured: the one-run peer exits. (The
        # oversized frame cost the rogue its connection, so it says hello again and hears a fresh nonce.)
        rogue.send(protocol.encode("hello", nonce=auth.new_nonce()))
        joined = protocol.decode(rogue.recv())
        rogue.send(protocol.encode("refused", proof=auth.proof(token, "refusal", joined["nonce"]), reason="bye"))
        assert peer.wait(timeout=15) == 2
    finally:
        peer.kill()
        rogue.close(0)
        outsider.close(0)
        ctx.term()
    # The outsider's socket retried its handshake every 100 ms throughout: one line a minute, not one each.
    assert (tmp_path / "target" / "peer.log").read_text().count("failed the encrypted handshake") == 1


def test_a_result_file_named_by_a_path_is_refused_and_lands_nowhere(tiny_llama, topic_jsonl, tmp_path):
    """Rank 0's result files are written into --out under the names its peer sends: a joined device that names
    one ../escaped hears an error, and nothing is written outside --out."""
    token = auth.new_token()
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.RCVTIMEO, 15000)
    fake.setsockopt(zmq.LINGER, 0)
    auth.serve_encrypted(fake, token)
    host = PeerHost("127.0.0.1", fake.bind_to_random_port("tcp://127.0.0.1"), "fake")
    errors = []

    def join_then_send_a_path() -> None:
        routing, raw = fake.recv_multipart()
        proof = auth.proof(token, "peer", protocol.decode(raw)["nonce"])
        profile = {"max_mem": 1 << 30}
        join = protocol.encode(
            "join", name="fake", profile=profile, nonce=auth.new_nonce(), proof=proof,
            data_endpoint="tcp://127.0.0.1:1", data_key=b"k" * 40,
        )  # fmt: skip
        fake.send_multipart([routing, join])
        name = "../escaped"
        fake.send_multipart([routing, protocol.encode("file", name=name, offset=0, chunk=b"x", last=True)])
        fake.send_multipart([routing, protocol.encode("finished", summary={})])
        while not errors:
            message = protocol.decode(fake.recv_multipart()[1])
            if message["type"] == "error":
                errors.append(message["reason"])

    worker = threading.Thread(target=join_then_send_a_path)
    worker.start()
    out = tmp_path / "run" / "out"
    options = _options(tiny_llama, topic_jsonl, out, tmp_path / "c")
    cluster = ClusterOptions(mode="replicated", join_timeout=10, peer_timeout=3)
    try:
        with pytest.raises(RunFailed):
            Coordinator([host], token, options, cluster).run()
        worker.join()
    finally:
        fake.close(0)
        ctx.term()
    assert errors == ["file '../escaped': not a plain file name"]
    assert not (tmp_path / "run" / "escaped").exists()


def _join_then_vanish(host: PeerHost, token: str) -> None:
    """A coordinator that joins the peer (hello, its join, a welcome) and then says nothing more."""
    ctx = zmq.Context()
    coordinator = ctx.socket(zmq.ROUTER)
    coordinator.setsockopt(zmq.ROUTER_MANDATORY, 1)
    coordinator.setsockopt(zmq.CONNECT_ROUTING_ID, b"p")
    auth.connect_encrypted(coordinator, token)
    coordinator.connect(host.endpoint)
    try:
        nonce = auth.new_nonce()
        deadline = time.monotonic() + 60
        while True:  # the peer process needs a few seconds to start listening
            try:
                coordinator.send_multipart([b"p", protocol.encode("hello", nonce=nonce)])
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        join = protocol.decode(coordinator.recv_multipart()[1])
        assert auth.verify(token, "peer", nonce, join["proof"])
        proof = auth.proof(token, "coordinator", join["nonce"])
        coordinator.send_multipart([b"p", protocol.encode("welcome", proof=proof, rank=0)])
    finally:
        coordinator.close(0)
        ctx.term()


def test_local_peers_exit_when_the_coordinator_disappears(tmp_path):
    peers = LocalPeers(1, auth.new_token(), tmp_path, coordinator_timeout=3)
    (host,) = peers.start()
    _join_then_vanish(host, peers.token)
    codes = peers.stop(grace=60)  # a kill after the grace would give -9, not 3
    assert codes == [3]


def test_an_agent_stays_for_run_after_run_and_outlives_a_vanished_coordinator(tiny_llama, topic_jsonl, tmp_path):
    """`pac peer` without --once: a coordinator that joins and vanishes is given up after the timeout, then two
    runs (planning, the agent's part of which is real work) are served one after the other by the same
    process, which is still there at the end."""
    token, port = auth.new_token(), free_port()
    cmd = [sys.executable, "-m", "pac.cli", "peer", "--listen", f"tcp://127.0.0.1:{port}", "--name", "home"]
    cmd += ["--work-dir", str(tmp_path / "home"), "--coordinator-timeout", "3"]
    agent = subprocess.Popen(cmd, env={**os.environ, auth.TOKEN_ENV: token}, stdout=subprocess.PIPE, text=True)
    host = PeerHost("127.0.0.1", port, "home")
    try:
        _join_then_vanish(host, token)
        options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "c")
        for _ in range(2):
            summary = Coordinator([host], token, options, ClusterOptions(join_timeout=90)).run(plan_only=True)
            assert summary["planned"]["predicted_peak_bytes"].keys() == {"home"}
        time.sleep(2)
        assert agent.poll() is None  # still serving
    finally:
        agent.terminate()
        said = agent.communicate(timeout=30)[0]
    assert "the run is over (the coordinator was lost); serving the next one" in said
    assert said.count("the run is over (done); serving the next one") == 2


def test_an_agent_keeps_each_runs_checkpoints_apart(tiny_llama, topic_jsonl, tmp_path):
    """One agent, two runs with the same number of steps but another learning rate: the second trains from the
    start (it does not resume the first's last checkpoint), and running the first again resumes its own."""
    token, port = auth.new_token(), free_port()
    cmd = [sys.executable, "-m", "pac.cli", "peer", "--listen", f"tcp://127.0.0.1:{port}", "--name", "home"]
    agent = subprocess.Popen([*cmd, "--work-dir", str(tmp_path / "home")], env={**os.environ, auth.TOKEN_ENV: token})
    host = PeerHost("127.0.0.1", port, "home")
    first = _options(tiny_llama, topic_jsonl, tmp_path / "first", tmp_path / "c")
    second = replace(first, out=str(tmp_path / "second"), optim=replace(first.optim, lr=1e-3))  # default: 3e-3
    try:
        runs = [Coordinator([host], token, o, ClusterOptions(join_timeout=90)).run() for o in (first, second, first)]
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert [len(r["epochs"]) for r in runs[:2]] == [2, 2]  # the second trained its own two epochs
    assert runs[0]["epochs"][-1]["train_loss"] != runs[1]["epochs"][-1]["train_loss"]
    assert len(list((tmp_path / "home" / "runs").iterdir())) == 2
    # The first run again: its own finished checkpoint, nothing retrained, and its epochs still reported.
    assert runs[2]["epochs"] == runs[0]["epochs"]


@pytest.mark.parametrize("mode, shortlist", [("shuffle", 0), ("side-pipeline", 0), ("shuffle", 8)])
def test_language_modelling_across_peers_equals_one_device(mode, shortlist, tiny_llama, topic_jsonl, tmp_path):
    """Token-weighted losses: ranks' shares of a batch differ in token count, the mean must not. With
    shortlists each peer digests its own share of the cache: the same adapter again."""
    options = _options(tiny_llama, topic_jsonl, tmp_path / "single", tmp_path / "cache")
    options.data.task, options.method_options.shortlist = "lm", shortlist
    single = train(options)
    out = tmp_path / "out"
    argv = ["--task", "lm", "--mode", mode, "--shortlist", str(shortlist)]
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", *argv) == 0
    expected = load_file(tmp_path / "single" / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"][-1]["val_perplexity"] == pytest.approx(single["epochs"][-1]["val_perplexity"], rel=1e-4)


def test_ssh_dry_run_prints_commands_without_the_token(tmp_path, capsys, monkeypatch):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("desktop.local name=desktop threads=8\njetson.local:29601 user=me workdir=/data\n")
    monkeypatch.setenv(auth.TOKEN_ENV, "s3cret-token")
    assert launch(["--peers", str(hosts), "--ssh", "--dry-run", "--ssh-option=-p2222"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "s3cret" not in "".join(lines)
    assert lines[0].startswith("ssh -p2222 ") and "pac peer --listen tcp://0.0.0.0:29600 --name desktop" in lines[0]
    assert "me@jetson.local" in lines[1] and "read -r PAC_JOIN_TOKEN" in lines[1]


def test_peers_need_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("desktop.local\n")
    assert launch(["--peers", str(hosts)]) == 2
    assert "PAC_JOIN_TOKEN" in capsys.readouterr().err


def test_a_peer_that_falls_silent_fails_the_run_with_the_reason(tiny_llama, topic_jsonl, tmp_path):
    """A peer that joins properly, takes its assignment and then stops answering (a laptop closed)."""
    token = auth.new_token()
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.RCVTIMEO, 20000)
    auth.serve_encrypted(fake, token)
    host = PeerHost("127.0.0.1", fake.bind_to_random_port("tcp://127.0.0.1"), "laptop")
    seen: list[str] = []

    def behave_then_vanish() -> None:
        nonce = auth.new_nonce()
        while "assign" not in seen:
            sender, raw = fake.recv_multipart()
            message = protocol.decode(raw)
            seen.append(message["type"])
            if message["type"] == "hello" and seen.count("hello") == 1:
                proof = auth.proof(token, "peer", message["nonce"])
                profile = {"max_mem": 2**30}
                join = protocol.encode("join", name="laptop", profile=profile, nonce=nonce, proof=proof,
                                       data_endpoint="tcp://127.0.0.1:1", data_key=b"k" * 40)  # fmt: skip
                fake.send_multipart([sender, join])
        # ... and silence from now on.

    worker = threading.Thread(target=behave_then_vanish)
    worker.start()
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache")
    try:
        with pytest.raises(RunFailed, match=r"peer laptop \(rank 0\) is lost: it has been silent for 2\.\d s"):
            cluster = ClusterOptions(mode="shuffle", join_timeout=20, peer_timeout=2)  # unplanned: no profiling
            Coordinator([host], token, options, cluster).run()
    finally:
        worker.join()
        fake.close(0)
        ctx.term()
    assert seen[-3:] == ["data", "data", "assign"] and "welcome" in seen


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    probe = subprocess.run(["ip", "netns", "add", "pac-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "pac-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root with ip/tc and network namespaces")
def test_peers_in_their_own_network_namespaces_behind_a_rate_limit(single_device, tiny_llama, topic_jsonl, tmp_path):
    """Real interfaces instead of loopback: the peers' data planes, the rendezvous and gloo all go over
    the bridge of a simulated home network (deploy/home.py), and the result is still the single-device one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
    from home import Device, SimulatedHome

    token = auth.new_token()
    env = {**os.environ, auth.TOKEN_ENV: token, "TQDM_DISABLE": "1"}
    devices = [Device(f"dev{d}", rate="100mbit") for d in range(2)]
    with SimulatedHome(devices, tag=f"pt{os.getpid() % 10000}") as net:
        hosts = []
        for d in range(2):
            agent = [sys.executable, "-m", "pac.cli", "peer", "--once", "--listen", f"tcp://{net.address(d)}:29600"]
            net.run(
                d, [*agent, "--name", f"dev{d}", "--work-dir", str(tmp_path / f"dev{d}")], tmp_path / f"{d}.log", env
            )
            hosts.append(PeerHost(net.address(d), 29600, f"dev{d}"))
        options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache")
        Coordinator(hosts, token, options, ClusterOptions(mode="side-pipeline", join_timeout=60)).run()
    expected, _ = single_device
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    assert "gloo" in (tmp_path / "dev1" / "peer.log").read_text()


def test_a_finished_run_resumes_from_its_checkpoints(single_device, tiny_llama, topic_jsonl, tmp_path):
    """Launched again into the same --out, every rank finds the same last checkpoint: nothing is retrained."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert _launch(tiny_llama, topic_jsonl, out, cache, "--mode", "replicated") == 0
    steps_before = len((out / "metrics.jsonl").read_text().splitlines())
    assert _launch(tiny_llama, topic_jsonl, out, cache, "--mode", "replicated") == 0
    expected, _ = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    # rank 0's metrics log came back whole, without a second round of steps
    assert len((out / "metrics.jsonl").read_text().splitlines()) == steps_before


def test_a_rerun_forwards_only_what_some_cache_lacks(single_device, tiny_llama, topic_jsonl, tmp_path):
    """Phase 1 pipelined: a rerun over complete caches sends nothing through the backbone; with one shard of
    one peer's cache deleted, only that shard's samples run again, in micro-batches of their own."""
    out, cache = tmp_path / "out", tmp_path / "cache"

    def forwarded(run_out: Path) -> list[int]:
        peers = json.loads((run_out / "summary.json").read_text())["peers"].values()
        return [p["summary"]["phase1_forwarded_samples"] for p in peers]

    assert _launch(tiny_llama, topic_jsonl, out, cache, "--mode", "shuffle") == 0
    assert forwarded(out) == [60] * 3  # 48 training and 12 validation rows, on every stage
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "again", cache, "--mode", "shuffle") == 0
    assert forwarded(tmp_path / "again") == [0] * 3
    manifests = cache.rglob("manifest.json")
    train_caches = [m.parent for m in manifests if len(json.loads(m.read_text())["sample_ids"]) == 16]
    shards = sorted(train_caches[0].glob("taps*.safetensors"))
    shards[0].unlink()
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "third", cache, "--mode", "shuffle") == 0
    assert forwarded(tmp_path / "third") == [16] * 3  # the owner's 16 training samples, on every stage
    assert len(list(train_caches[0].glob("taps*.safetensors"))) == len(shards)  # rebuilt
    expected, _ = single_device
    got = load_file(tmp_path / "third" / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)


def test_pac_plan_profiles_every_peer_times_the_links_and_prints_the_plan(
    tiny_llama, topic_jsonl, tmp_path, capsys, monkeypatch
):
    from pac.cli import main as pac

    monkeypatch.setenv("PAC_PROFILES", str(tmp_path / "home" / "profiles"))  # the peers keep their profiles there
    out = tmp_path / "out"
    argv = ["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out)]
    assert pac(["plan", *argv, "--join-timeout", "90", *COMMON]) == 0
    shown = capsys.readouterr().out
    assert "[pac-launch] profiling 2 peer(s) for this model and run" in shown
    assert shown.count("ms per sample through the model, link") == 2
    assert "predicted: phase 1" in shown and "instead:" in shown and "[pac-launch] plan (" in shown
    assert not (out / "adapter_model.safetensors").exists()  # planned, not run
    assert len(list((tmp_path / "home" / "profiles").glob("*.json"))) == 1  # one device, one run shape
    assert pac(["peer", "--profile"]) == 0
    assert "ms per sample through each layer" in capsys.readouterr().out


def test_a_planned_run_trains_the_same_adapter_and_reports_predicted_against_measured(
    single_device, tiny_llama, topic_jsonl, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PAC_PROFILES", str(tmp_path / "profiles"))
    out = tmp_path / "out"
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache") == 0  # no --mode, no --stages: planned
    shown = capsys.readouterr().out
    assert "[pac-launch] phase1: predicted" in shown and "[pac-launch] phase2: predicted" in shown
    summary = json.loads((out / "summary.json").read_text())
    planned = summary["planned"]
    # Phase 1's micro-batch, weighed by the planner: the run's 8, or the 16 every peer measured too.
    assert f"phase 1 in micro-batches of {planned['phase1_micro_batch']}" in shown
    assert planned["phase1_micro_batch"] in (8, 16)
    assert planned["predicted_total_seconds"] > 0 and planned["measured_phase2_seconds"] > 0
    assert set(planned["other_modes_seconds"]) == {"shuffle", "side-pipeline", "replicated"}
    assert summary["mode"] in planned["other_modes_seconds"]
    expected, _ = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:  # whatever the plan chose, the same steps as one device
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("mode", ["replicated", "shuffle"])
def test_peers_owning_uneven_shares_train_the_same_adapter(mode, single_device, tiny_llama, topic_jsonl, tmp_path):
    """--shares 2,1,1: rank 0 caches and trains half of the samples, in phase 1 and 2 alike."""
    out = tmp_path / "out"
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--mode", mode, "--shares", "2,1,1") == 0
    expected, single_summary = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    cached = [
        p["summary"]["cached_samples"]["train"] for p in sorted(summary["peers"].values(), key=lambda p: p["rank"])
    ]
    assert sum(cached) == single_summary["train_samples"] and abs(cached[0] - 2 * cached[1]) <= 2


def test_a_peer_of_share_0_runs_phase_1_only_and_the_others_train_the_same_adapter(
    single_device, tiny_llama, topic_jsonl, tmp_path
):
    """--shares 1,0,1: rank 1 runs layers in phase 1 and leaves; ranks 0 and 2 train in a process group of their
    own, and the adapter is one device's. Over the encrypted data plane too: its ring goes round the trainers."""
    out = tmp_path / "out"
    extra = ["--mode", "shuffle", "--shares", "1,0,1", "--stages", "0-1,2,3", "--encrypt-gradients"]
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", *extra) == 0
    expected, single_summary = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    peers = {p["rank"]: p["summary"] for p in summary["peers"].values()}
    assert peers[1]["phase1_only"] and "epochs" not in peers[1] and "cached_samples" not in peers[1]
    assert peers[1]["phase1_bytes_sent"] > 0  # its layer's hidden states and taps went on to the others
    cached = [peers[r]["cached_samples"]["train"] for r in (0, 2)]
    assert sum(cached) == single_summary["train_samples"] and abs(cached[0] - cached[1]) <= 1
    for ours, theirs in zip(summary["epochs"], single_summary["epochs"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)


def test_a_phase1_only_peer_runs_layers_in_phase_1_and_the_others_train(
    single_device, tiny_llama, topic_jsonl, tmp_path, capsys
):
    """`pac peer --phase1-only` (a phone), listed first: it joins saying so, is not rank 0 (which writes the
    adapter), owns no samples, runs its layers in phase 1 and leaves; the two others train one device's adapter.
    LoRA, which has no phase 1, leaves it out and says why."""
    token = auth.new_token()
    started = [_peer_process(tmp_path, "phone", token, "--phase1-only")]
    started += [_peer_process(tmp_path, name, token) for name in ("laptop", "desk")]
    try:
        out = tmp_path / "out"
        options = _options(tiny_llama, topic_jsonl, out, tmp_path / "c")
        cluster = ClusterOptions(join_timeout=60, mode="shuffle")
        summary = Coordinator([host for _, host in started], token, options, cluster).run()
        shown = capsys.readouterr().out
        assert "phone joined:" in shown and "phase 1 only" in shown
        expected, single_summary = single_device
        got = load_file(out / "adapter_model.safetensors")
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
        phone, laptop, desk = (summary["peers"][n] for n in ("phone", "laptop", "desk"))
        assert (laptop["rank"], phone["rank"], desk["rank"]) == (0, 1, 2)
        assert phone["summary"]["phase1_only"] and phone["summary"]["phase1_bytes_sent"] > 0
        trained = [p["summary"]["cached_samples"]["train"] for p in (laptop, desk)]
        assert sum(trained) == single_summary["train_samples"]
        assert all(proc.wait(timeout=30) == 0 for proc, _ in started)
        # A method without phase 1 has no place for it: the plan leaves it out, naming why.
        again = [_peer_process(tmp_path, "phone", token, "--phase1-only"), _peer_process(tmp_path, "laptop", token)]
        started += again
        lora = replace(options, method="lora", method_options=None, out=str(tmp_path / "lora"))
        planned = Coordinator([h for _, h in again], token, lora, ClusterOptions(join_timeout=60)).run(plan_only=True)
        assert planned["mode"] == "replicated" and len(planned["plan"]) == 1
        assert (
            "phone left out: it runs phase 1 only (--phase1-only), and lora has no phase 1" in capsys.readouterr().out
        )
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()


def test_the_plan_names_peers_as_the_hosts_file_does(tiny_llama, topic_jsonl, tmp_path):
    """A peer started with one --name and listed under another: the plan and its report use the hosts file's."""
    token = auth.new_token()
    peer, host = _peer_process(tmp_path, "calls-itself-this", token)
    try:
        listed = PeerHost(host.host, host.port, "desk")
        options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "c")
        summary = Coordinator([listed], token, options, ClusterOptions(join_timeout=60)).run(plan_only=True)
        assert summary["planned"]["predicted_peak_bytes"].keys() == {"desk"}
        assert peer.wait(timeout=30) == 0
    finally:
        if peer.poll() is None:
            peer.kill()


@pytest.fixture(scope="module")
def single_device_lora(tiny_llama, topic_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("single-lora")
    options = replace(_options(tiny_llama, topic_jsonl, root / "out", root / "cache"), method="lora")
    summary = train(replace(options, method_options=None))
    return load_file(root / "out" / "adapter_model.safetensors"), summary


def test_lora_runs_data_parallel_over_the_peers_as_on_one_device(
    single_device_lora, tiny_llama, topic_jsonl, tmp_path, capsys
):
    """LoRA trains on token ids, so `pac-launch --method lora` needs no cache and no plan: every peer runs the
    whole model on its own share (here 2,1,1) and DDP all-reduces the gradients. LoRA's dropout (0.05) draws other
    masks on each peer than on one device, so the run follows one device's closely rather than exactly."""
    out = tmp_path / "out"
    argv = ["--method", "lora", "--shares", "2,1,1"]
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", *argv, common=LORA_COMMON) == 0
    assert "[pac-launch] plan (replicated)" in capsys.readouterr().out
    expected, single_summary = single_device_lora
    got = load_file(out / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "replicated" and summary["grad_compression"] == "none"
    trained = sorted((p["rank"], p["summary"]["cached_samples"]["train"]) for p in summary["peers"].values())
    assert sum(n for _, n in trained) == single_summary["train_samples"] and trained[0][1] > trained[1][1]
    assert not (tmp_path / "cache").exists()  # nothing was cached
    for ours, theirs in zip(summary["epochs"], single_summary["epochs"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.05)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=0.05)
    changed = [name for name in expected if "lora_B" in name and got[name].abs().max() > 0]
    assert changed  # B starts at zero: the peers' steps moved it
    # Every file of the adapter came back, as one device saves it (peft's config, the head): it loads.
    for name in ("adapter_config.json", "head.safetensors", "pac_adapter_config.json"):
        assert (out / name).exists(), name
    assert load_for_inference(out).kind == "lora"


def test_a_method_on_token_ids_is_refused_a_pipelined_mode(tiny_llama, topic_jsonl, tmp_path, capsys):
    argv = ["--method", "lora", "--mode", "shuffle"]
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache", *argv, common=LORA_COMMON) == 2
    assert "trains on token ids, so every peer runs the whole model: use --mode replicated" in capsys.readouterr().err


@pytest.mark.parametrize("compression, within", [("fp16", 0.01)])
def test_gradients_compressed_by_ddp_hooks(compression, within, single_device, tiny_llama, topic_jsonl, tmp_path):
    """fp16 gradients on the wire (torch's DDP hook) change each update a little (AdamW
    normalises away the scale, not the rounding), so the run follows one device's within what each precision
    allows, and learns."""
    out = tmp_path / "out"
    argv = ["--mode", "replicated", "--grad-compression", compression]
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", *argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grad_compression"] == compression
    # Every rank hands the same gradient buckets (and loss totals) to the all-reduces, whatever samples it owns.
    counted = {p["summary"]["phase2_allreduce_bytes"] for p in summary["peers"].values()}
    assert len(counted) == 1 and counted.pop() > 0
    single_summary = single_device[1]
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    for ours, theirs in zip(summary["epochs"], single_summary["epochs"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=within)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=within)


def test_grad_compression_is_refused_where_nothing_is_all_reduced(tiny_llama, topic_jsonl, tmp_path, capsys):
    argv = ["--mode", "side-pipeline", "--grad-compression", "fp16"]
    assert _launch(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache", *argv) == 2
    assert "side-pipeline mode all-reduces no gradients" in capsys.readouterr().err


def test_a_port_nobody_listens_on_is_reported_within_seconds(tiny_llama, topic_jsonl, tmp_path):
    """ZeroMQ retries a refused connection quietly; the coordinator says so once it has gone on for 5 s (agents
    started with the run take about that long to listen), keeps waiting until the join timeout, then fails
    naming the peer."""
    shown = io.StringIO()
    host = PeerHost("127.0.0.1", free_port(), "nobody-home")
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "c")
    coordinator = Coordinator([host], auth.new_token(), options, ClusterOptions(join_timeout=8), display=shown)
    started = time.monotonic()
    with pytest.raises(RunFailed, match="no answer within 8 s from nobody-home"):
        coordinator.run()
    assert time.monotonic() - started < 30
    assert "nobody-home (127.0.0.1:" in shown.getvalue() and "refuses the connection" in shown.getvalue()


def test_the_rendezvous_listens_only_where_the_peers_reach_it(tiny_llama, topic_jsonl, tmp_path):
    """torch's TCPStore authenticates nobody and would listen on every interface: the coordinator hands it a
    socket bound to the address its peers reach (loopback here), so another interface cannot reach it."""
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "c")
    host = PeerHost("127.0.0.1", free_port(), "here")
    coordinator = Coordinator([host], auth.new_token(), options, ClusterOptions())
    try:
        port = coordinator._start_store(list(coordinator.peers.values()))
        listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert [a.ip for a in listening] == ["127.0.0.1"]
        coordinator.store.set("reachable", "yes")
    finally:
        coordinator.close()


def _wait_for_state(shown: io.StringIO, state: str, runner: threading.Thread) -> None:
    """Until the coordinator running in `runner` has printed that it entered `state`."""
    deadline = time.monotonic() + 120
    while f"[pac-launch] {state}" not in shown.getvalue():
        assert time.monotonic() < deadline and runner.is_alive(), shown.getvalue()
        time.sleep(0.05)


@pytest.mark.parametrize("mode, phase", [("replicated", "training"), ("shuffle", "cache build")])
def test_a_killed_peer_is_named_within_seconds(mode, phase, tiny_llama, topic_jsonl, tmp_path):
    """SIGKILL one of three peers in phase 1 or phase 2: its closed connection and missed heartbeats name it
    within seconds, not after --peer-timeout (60 s), even where a survivor's collective fails first with
    "Connection reset by peer"."""
    token = auth.new_token()
    peers = LocalPeers(3, token, tmp_path / "peers")
    hosts = peers.start()
    shown, outcome = io.StringIO(), []
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache")
    options.optim.epochs = 200  # long enough to be killed in it
    coordinator = Coordinator(hosts, token, options, ClusterOptions(mode=mode, join_timeout=90), display=shown)

    def run() -> None:
        try:
            coordinator.run()
        except RunFailed as exc:
            outcome.append((time.monotonic(), str(exc)))

    runner = threading.Thread(target=run)
    runner.start()
    try:
        _wait_for_state(shown, phase, runner)
        peers.procs[1].kill()
        killed = time.monotonic()
        runner.join(timeout=60)
    finally:
        peers.stop()
    assert outcome, shown.getvalue()
    failed_at, reason = outcome[0]
    assert reason.startswith("peer local-1 (rank 1) is lost: its connection closed"), reason
    assert "serve(s) one run only (pac peer --once), so the run cannot re-plan" in reason
    assert failed_at - killed < 10


def test_the_peer_log_sent_into_out_is_its_tail(tmp_path):
    """A peer's log can grow without bound (a client retrying for days): what it sends into the run's --out is
    its last MiB, with a line saying how much was left out and where the whole log is."""
    from pac.runtime.peer import LOG_TAIL_BYTES, PeerAgent, PeerSettings

    token = auth.new_token()
    settings = PeerSettings(f"tcp://127.0.0.1:{free_port()}", "chatty", token, tmp_path)
    (tmp_path / "peer.log").write_text("old line\n" * 300_000 + "the last line\n")  # 2.7 MB
    agent = PeerAgent(settings)
    ctx = zmq.Context()
    coordinator = ctx.socket(zmq.DEALER)
    coordinator.setsockopt(zmq.RCVTIMEO, 10_000)
    auth.connect_encrypted(coordinator, token)
    coordinator.connect(agent.endpoint)
    try:
        coordinator.send(protocol.encode("heartbeat", usage={}))  # the agent learns this connection's routing id
        sender, _ = agent.control.recv_multipart()
        agent.coordinator = sender
        agent._send_results(tmp_path / "no-adapter-here")
        received = bytearray()
        while True:
            chunk = protocol.decode(coordinator.recv())
            assert chunk["name"] == "peer.log" and chunk["offset"] == len(received)
            received.extend(chunk["chunk"])
            if chunk["last"]:
                break
    finally:
        coordinator.close(0)
        ctx.term()
        agent.close()
    original = (tmp_path / "peer.log").read_bytes()
    head, _, tail = bytes(received).partition(b"\n")
    assert head.decode() == (
        f"[the first {len(original) - LOG_TAIL_BYTES} bytes are left out here: the whole log is "
        f"{tmp_path / 'peer.log'} on chatty]"
    )
    assert tail == original[-LOG_TAIL_BYTES:] and tail.endswith(b"the last line\n")


def test_the_coordinator_killed_in_phase_2_then_resume(single_device, tiny_llama, topic_jsonl, tmp_path, capsys):
    """SIGKILL pac-launch itself while its peers train. `pac-launch --resume RUN_DIR` says how the run ended,
    reruns the recorded command, reuses every peer's cache (nothing forwarded) and checkpoints (no step trained
    twice), and leaves the single-device adapter in --out."""
    out = tmp_path / "out"
    argv = ["--local", "3", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--join-timeout", "90", *COMMON, "--mode", "replicated"]
    first = subprocess.Popen(
        [sys.executable, "-m", "launcher.main", *argv], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        for line in first.stdout:
            if line.startswith("[pac-launch] training"):
                break
        first.kill()  # the coordinator alone: its peers train on, unaware for a while
        first.wait(timeout=30)
        assert json.loads((out / "launch.json").read_text())["state"] == "training"
        assert launch(["--resume", str(out)]) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the first attempt's peers, if they are still waiting
    shown = capsys.readouterr().out
    assert "stopped during 'training' without a word from its coordinator" in shown
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["epochs"]) == 2
    assert [p["summary"]["phase1_forwarded_samples"] for p in summary["peers"].values()] == [0, 0, 0]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert steps == list(range(1, 13))  # 48 rows in batches of 8, two epochs, each step once
    expected, _ = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    record = json.loads((out / "launch.json").read_text())
    assert record["state"] == "done" and len(record["resumed_at"]) == 1
    assert launch(["--resume", str(out)]) == 0 and "nothing to resume" in capsys.readouterr().out
    assert launch(["--resume", str(out), "--epochs", "3"]) == 2
    assert "give no other options" in capsys.readouterr().err
    assert launch(["--resume", str(tmp_path)]) == 2
    assert "not the --out of a pac-launch run" in capsys.readouterr().err


def _fuzzer(*argv: str, token: str) -> subprocess.Popen:
    """tests/control_fuzzer.py in a process of its own: what it holds is not the coordinator's memory."""
    cmd = [sys.executable, str(Path(__file__).with_name("control_fuzzer.py")), *argv]
    env = {**os.environ, auth.TOKEN_ENV: token}
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _sent(fuzzer: subprocess.Popen) -> int:
    """The frames a fuzzer sent; then it is let go."""
    sent = int(fuzzer.stdout.readline())
    fuzzer.stdin.close()
    fuzzer.wait(timeout=30)
    return sent


def test_a_run_goes_to_the_end_while_its_peers_are_fuzzed(single_device, tiny_llama, topic_jsonl, tmp_path):
    """12,000 random and mutated frames (some over the size limit) at both peers' control sockets from a client
    that holds the token, and 10,000 at the coordinator from a "peer" of the hosts file that answers its hello
    with them, while a real run trains: the run ends with the single-device adapter, the peers' peak memory stays
    within 50 MB of the same run undisturbed, and the coordinator's process grows no more than in that run, give
    or take 50 MB (the fuzzers are processes of their own)."""
    token = auth.new_token()

    def run(out: Path, fuzz: bool) -> dict:
        peers = LocalPeers(2, token, tmp_path / out.name)
        hosts = peers.start()
        options = _options(tiny_llama, topic_jsonl, out, tmp_path / "cache")
        cluster = ClusterOptions(mode="replicated", join_timeout=90)
        fuzzers = []
        rss_before = psutil.Process().memory_info().rss
        try:
            if fuzz:
                fuzzers.append(_fuzzer("peers", "6000", "1", *(h.endpoint for h in hosts), token=token))
                fuzzers.append(_fuzzer("coordinator", "10000", "2", token=token))
                assert fuzzers[0].stdout.readline() == "ready\n"  # the peers' fuzz goes on as the run starts
                port = int(fuzzers[1].stdout.readline())
                hosts = [*hosts, PeerHost("127.0.0.1", port, "fuzz")]
                # It never joins: its first mutated join is refused, and the run starts without it.
                cluster = replace(cluster, join_timeout=30, min_peers=2)
            summary = Coordinator(hosts, token, options, cluster).run()
            summary["coordinator_growth_mb"] = (psutil.Process().memory_info().rss - rss_before) / 2**20
            summary["fuzzed_frames"] = [_sent(f) for f in fuzzers]
        finally:
            for f in fuzzers:
                f.kill()
            peers.stop()
        return summary

    calm = run(tmp_path / "calm", fuzz=False)
    fuzzed = run(tmp_path / "fuzzed", fuzz=True)
    assert fuzzed["fuzzed_frames"] == [12_000, 10_000]
    expected, _ = single_device
    got = load_file(tmp_path / "fuzzed" / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    for name, peer in fuzzed["peers"].items():
        assert peer["summary"]["peak_rss_mb"] < calm["peers"][name]["summary"]["peak_rss_mb"] + 50, name
    assert list(fuzzed["peers"]) == ["local-0", "local-1"]
    assert fuzzed["coordinator_growth_mb"] < calm["coordinator_growth_mb"] + 50
    assert "rejected a message" in (tmp_path / "fuzzed" / "peers" / "local-0" / "peer.log").read_text()


def _trained_as_alone(tmp_path: Path, summary: dict, alone: dict) -> None:
    """The run in tmp_path/out trained the adapter the single device did in tmp_path/alone, to its accuracy."""
    expected = load_file(tmp_path / "alone" / "adapter_model.safetensors")
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    assert summary["epochs"][-1]["val_accuracy"] == pytest.approx(alone["epochs"][-1]["val_accuracy"])


@pytest.mark.parametrize(
    "mode, phase", [("replicated", "training"), ("shuffle", "cache build"), ("side-pipeline", "training")]
)
def test_a_lost_peer_is_re_planned_around_and_the_run_finishes(mode, phase, tiny_llama, topic_jsonl, tmp_path):
    """SIGKILL one of three peers in phase 1 or phase 2: the coordinator names it within seconds, the two others
    abandon the attempt, join again, are planned over, and finish the run, resuming from their checkpoints in
    phase 2: the adapter a single device trains, and the membership history in summary.json and launch.json."""
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache")
    options.optim.epochs = 6  # long enough to be killed in it
    alone = train(replace(options, out=str(tmp_path / "alone")))
    token = auth.new_token()
    peers = LocalPeers(3, token, tmp_path / "peers", once=False)
    hosts = peers.start()
    shown, outcome = io.StringIO(), []
    record = LaunchRecord(tmp_path / "out", ["--local", "3"])
    coordinator = Coordinator(
        hosts, token, options, ClusterOptions(mode=mode, join_timeout=90), display=shown, record=record
    )
    prepared = prepare_data(options.model, options.data)
    lost_ids = {
        split.sample_ids[p] for split in (prepared.train, prepared.val) for p in owned_positions(len(split), 1, 3)
    }
    runner = threading.Thread(target=lambda: outcome.append(coordinator.run()))
    runner.start()
    try:
        _wait_for_state(shown, phase, runner)
        # In phase 1 at once: the survivors adopt the single device's caches, so theirs can be done in half a second.
        time.sleep(0.5 if phase == "training" else 0.0)
        peers.procs[1].kill()
        # The peers share one cache root here; the lost device's caches leave with it, the others' shards stay.
        # Its caches are those of the samples it owned, or in side-pipeline mode of the layers it ran.
        plan, names = coordinator.assigned
        lost_stage = plan.stages[names.index("local-1")]
        kept = set()
        for manifest in (tmp_path / "cache").glob(f"*/{MANIFEST}"):
            cache = json.loads(manifest.read_text())
            taps = cache["spec"]["taps"]
            ran = stage_taps(lost_stage, taps) == taps
            if ran if mode == "side-pipeline" else lost_ids.intersection(cache["sample_ids"]):
                shutil.rmtree(manifest.parent)
            else:
                kept |= {shard["sha256"] for shard in cache["shards"]}
        runner.join(timeout=240)
    finally:
        peers.stop()
    assert outcome, shown.getvalue()
    summary = outcome[0]
    # Every shard the survivors had finished is in the caches they trained from (adopted, never recomputed):
    # each keeps the samples it owned, and only the lost peer's go through the backbone again.
    final = set()
    for manifest in (tmp_path / "cache").glob(f"*/{MANIFEST}"):
        final |= {shard["sha256"] for shard in json.loads(manifest.read_text())["shards"]}
    assert kept <= final
    forwarded = sum(p["summary"]["phase1_forwarded_samples"] for p in summary["peers"].values())
    if mode == "replicated":  # every cache was complete: exactly the lost peer's samples are forwarded again
        assert forwarded == len(lost_ids)
    assert "peer local-1 (rank 1) is lost" in shown.getvalue()
    assert "Re-planning over local-0, local-2" in shown.getvalue()
    assert list(summary["peers"]) == ["local-0", "local-2"]
    assert [(e["peer"], e["state"]) for e in summary["lost_peers"]] == [("local-1", phase)]
    assert json.loads((tmp_path / "out" / "launch.json").read_text())["lost"][0]["peer"] == "local-1"
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, 7))
    _trained_as_alone(tmp_path, summary, alone)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_peer_whose_disk_fills_up_stops_the_run_with_what_to_do_and_resume_continues(
    single_device, tiny_llama, topic_jsonl, tmp_path, capsys
):
    """The peers' cache on a 64 kB tmpfs: the run fails naming the peer, the disk, how much the cache needs and
    how to continue; with room made, `pac-launch --resume` finishes it with the single-device adapter."""
    small = tmp_path / "small-disk"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode:
        pytest.skip("no tmpfs mount here")
    out = tmp_path / "out"
    argv = ["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out)]
    argv += ["--cache-dir", str(small), "--join-timeout", "90", *COMMON, "--mode", "replicated"]
    try:
        assert launch(argv) == 1
        said = capsys.readouterr().err
        assert "failed: the disk is full" in said and "MB free" in said and str(small) in said, said
        assert "resume the run (`pac-launch --resume` with its --out)" in said and "Traceback" not in said
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)  # room made
        assert launch(["--resume", str(out)]) == 0
    finally:
        subprocess.run(["umount", str(small)], check=True)
    expected, _ = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)


def test_gradients_all_reduced_over_the_encrypted_data_plane(single_device, tiny_llama, topic_jsonl, tmp_path):
    """--encrypt-gradients: phase 2's gradients, losses and starting weights go over the CURVE data plane, not
    gloo; replicated mode sends nothing else there, so its phase-2 bytes are the ring's, and the adapter is one
    device's (the ring adds up each gradient in another order than gloo: float rounding only)."""
    out = tmp_path / "out"
    assert _launch(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--mode", "replicated", "--encrypt-gradients") == 0
    expected, _ = single_device
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    peers = summary["peers"].values()
    assert all(p["summary"]["phase1_bytes_sent"] == 0 for p in peers)
    assert all(p["summary"]["phase2_bytes_sent"] > 0 for p in peers)


def test_encrypted_gradients_are_refused_where_they_would_not_be_encrypted(tiny_llama, topic_jsonl, tmp_path, capsys):
    for argv, complaint in (
        (["--mode", "side-pipeline"], "not side-pipeline"),
        (["--data-plane", "torch"], "drop --data-plane torch"),
    ):
        assert _launch(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "c", "--encrypt-gradients", *argv) == 2
        assert complaint in capsys.readouterr().err


def test_a_peer_that_arrives_while_the_run_goes_is_planned_in_and_takes_work(tiny_llama, topic_jsonl, tmp_path):
    """--min-peers 2: the run starts on the two agents that answer; a third, started while the run goes, is
    greeted, joins, and at the start of training or its next checkpoint the run re-plans over all three, which
    finish it from the checkpoint. The newcomer takes its round-robin share (and caches it); the others keep
    theirs. Its arrival is in the live view, summary.json and launch.json; the adapter is one device's."""
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache")
    # Long enough for a newcomer to start (an interpreter and torch: seconds on a loaded machine), join and be
    # planned in before the last step.
    options.optim.epochs = 24
    alone = train(replace(options, out=str(tmp_path / "alone")))
    token = auth.new_token()
    peers = LocalPeers(2, token, tmp_path / "peers", once=False)
    hosts = peers.start()
    late_host = PeerHost("127.0.0.1", free_port(), "late")
    shown, outcome = io.StringIO(), []
    record = LaunchRecord(tmp_path / "out", ["--local", "2"])
    # Time for the two agents to start (seconds on a loaded machine); then the run starts without the third.
    cluster = ClusterOptions(mode="replicated", join_timeout=20, min_peers=2)
    coordinator = Coordinator([*hosts, late_host], token, options, cluster, display=shown, record=record)
    runner = threading.Thread(target=lambda: outcome.append(coordinator.run()))
    runner.start()
    try:
        _wait_for_state(shown, "starting with 2 of 3 peers", runner)  # the run has begun without it
        peers.launch(late_host)
        runner.join(timeout=240)
    finally:
        peers.stop()
    assert outcome, shown.getvalue()
    summary, said = outcome[0], shown.getvalue()
    assert "starting with 2 of 3 peers" in said and "late arrived while the run was going" in said
    assert "re-planning with late" in said
    assert list(summary["peers"]) == ["local-0", "local-1", "late"]
    assert [e["peer"] for e in summary["arrived_peers"]] == ["late"]
    assert json.loads((tmp_path / "out" / "launch.json").read_text())["arrived"][0]["peer"] == "late"
    taken = summary["peers"]["late"]["summary"]["cached_samples"]["train"]
    assert taken == len(owned_positions(summary["split_sizes"]["train"], 2, 3))  # its round-robin third
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, 25))
    _trained_as_alone(tmp_path, summary, alone)


def test_a_peer_killed_and_started_again_rejoins_and_takes_work(tiny_llama, topic_jsonl, tmp_path):
    """SIGKILL one of three agents in training: the run re-plans over two. Its agent started again on the same
    port is greeted (a lost peer stays a candidate), joins, and is planned in at the next checkpoint; the run
    ends on all three with the single device's adapter, the loss and the return both on record."""
    options = _options(tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache")
    options.optim.epochs = 12
    alone = train(replace(options, out=str(tmp_path / "alone")))
    token = auth.new_token()
    peers = LocalPeers(3, token, tmp_path / "peers", once=False)
    hosts = peers.start()
    shown, outcome = io.StringIO(), []
    coordinator = Coordinator(hosts, token, options, ClusterOptions(mode="replicated", join_timeout=90), display=shown)
    runner = threading.Thread(target=lambda: outcome.append(coordinator.run()))
    runner.start()
    try:
        _wait_for_state(shown, "training", runner)
        peers.procs[2].kill()
        _wait_for_state(shown, "peer local-2 (rank 2) is lost", runner)  # then the re-plan over the two others
        peers.launch(hosts[2])  # on its port, with its work directory
        runner.join(timeout=240)
    finally:
        peers.stop()
    assert outcome, shown.getvalue()
    summary, said = outcome[0], shown.getvalue()
    assert "peer local-2 (rank 2) is lost" in said and "re-planning with local-2" in said
    assert [e["peer"] for e in summary["lost_peers"]] == ["local-2"]
    assert [e["peer"] for e in summary["arrived_peers"]] == ["local-2"]
    assert sorted(summary["peers"]) == ["local-0", "local-1", "local-2"]
    assert summary["peers"]["local-2"]["summary"]["cached_samples"]["train"] > 0  # it took work again
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, 13))
    _trained_as_alone(tmp_path, summary, alone)
