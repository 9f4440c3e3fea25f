"""Placement, protocol and address helpers: pure functions."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from pac.net import auth, protocol
from pac.net.addresses import interface_of, local_address_towards
from pac.plan.placement import (
    PIPELINE,
    Inheritance,
    PlanError,
    make_plan,
    owned_positions,
    owner,
    parse_stages,
    share_pattern,
    split_proportional,
    stage_taps,
)
from pac.plan.schedule import split_batch
from pac.runtime.pipeline import expected_messages, micro_batches


def test_stages_by_hand():
    assert parse_stages("0-9,10-19,20-29", 30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert parse_stages("0-28, 29", 30, 2) == [(0, 29), (29, 30)]
    for bad, hint in [("0-9,10-19", "one range per peer"), ("0-9,11-19,20-29", "must start at 10"),
                      ("0-9,10-19,20-28", "ends at layer 28"), ("a-b,1,2", "not a layer range")]:  # fmt: skip
        with pytest.raises(PlanError, match=hint):
            parse_stages(bad, 30, 3)


def test_split_in_proportion_to_memory():
    assert split_proportional(30, [1, 1, 1]) == [(0, 10), (10, 20), (20, 30)]
    assert split_proportional(30, [8, 4, 2]) == [(0, 17), (17, 26), (26, 30)]
    assert split_proportional(4, [100, 1, 1]) == [(0, 2), (2, 3), (3, 4)]  # at least one layer each
    with pytest.raises(PlanError, match="at most 4 peers"):
        split_proportional(4, [1] * 5)


def test_plans_and_ownership():
    assert make_plan("replicated", 30, [1, 2]).stages == ((0, 30), (0, 30))
    assert (
        make_plan("side-pipeline", 30, [1, 1], "0-14,15-29").describe() == "rank 0: layers 0-14, rank 1: layers 15-29"
    )
    with pytest.raises(PlanError, match="unknown placement mode"):
        make_plan("ring", 30, [1])
    # A range repeated by the next peer: one stage, run by a data-parallel group (shuffle mode only).
    hybrid = make_plan("shuffle", 30, [1, 1, 1], "0-19,0-19,20-29")
    assert hybrid.groups == [((0, 20), (0, 1)), ((20, 30), (2,))]
    assert [hybrid.processor(0, m) for m in range(4)] == [0, 1, 0, 1]
    assert [hybrid.processor(1, m) for m in range(2)] == [2, 2]
    with pytest.raises(PlanError, match="one peer per stage"):
        make_plan("side-pipeline", 30, [1, 1, 1], "0-19,0-19,20-29")
    with pytest.raises(PlanError, match="repeat the previous range"):
        parse_stages("0-19,20-29,0-19", 30, 3)
    assert stage_taps((0, 10), list(range(31))) == list(range(11))
    assert stage_taps((10, 20), [0, 15, 30]) == [15]
    assert [owner(p, 3) for p in range(5)] == [0, 1, 2, 0, 1]
    assert owned_positions(7, 1, 3) == [1, 4]


def test_a_forward_only_pipeline_plan():
    """`pipeline` (zeroth-order): layer ranges in proportion to memory or by hand, one peer per range, every stage
    sees every sample, micro-batches but no training schedule (forward passes only)."""
    assert make_plan(PIPELINE, 30, [2, 1], micro_batches=3).stages == ((0, 20), (20, 30))
    assert make_plan(PIPELINE, 30, [1, 1], "0-9,10-29").describe() == "rank 0: layers 0-9, rank 1: layers 10-29"
    for bad, hint in [
        ({"stages_spec": "0-19,0-19,20-29"}, "pipeline needs one peer per stage"),
        ({"shares": (2, 1, 1)}, "in pipeline every stage has every sample"),
        ({"schedule": "1f1b"}, "forward passes only: drop --schedule"),
    ]:
        with pytest.raises(PlanError, match=hint):
            make_plan(PIPELINE, 30, [1, 1, 1], **bad)


def test_a_batch_splits_into_near_equal_micro_batches():
    assert split_batch([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_batch([1, 2], 3) == [[1], [2]]  # fewer than asked when the batch is smaller
    assert split_batch([7], 1) == [[7]]


def test_expected_messages_count_what_the_senders_send():
    plan = make_plan("shuffle", 4, [1, 1, 1], "0-1,2-2,3-3")
    taps = [0, 1, 2, 3, 4]
    # 10 samples in micro-batches of 4 -> 3 batches. Rank 1 owns samples 1, 4, 7 (none in the last batch),
    # so it hears from the 2 other stages for 2 batches; as a later stage it gets one hidden state per batch.
    train = micro_batches(list(range(10)), 4)
    assert train == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert expected_messages(plan, 1, train, taps) == {"hidden": 3, "taps": 4}
    assert expected_messages(plan, 0, train, taps) == {"hidden": 0, "taps": 6}
    # Only the micro-batches that some owner still lacks run (a rerun over a cache missing one shard).
    assert expected_messages(plan, 1, train[1:2], taps) == {"hidden": 1, "taps": 2}
    side = make_plan("side-pipeline", 4, [1, 1, 1], "0-1,2-2,3-3")
    assert expected_messages(side, 2, train, taps) == {"hidden": 3, "taps": 0}
    # Ranks 0 and 1 take turns at layers 0-1 (micro-batches 0, 2 | 1 | ...); rank 2 runs layers 2-3 on all.
    # Over two splits of 10 and 6 samples the micro-batches are numbered 0-2 and 3-4.
    hybrid = make_plan("shuffle", 4, [1, 1, 1], "0-1,0-1,2-3")
    both = micro_batches(list(range(10)), 4) + micro_batches(list(range(6)), 4)
    # Rank 2 gets every hidden state (5), and the group's taps for every micro-batch holding a sample it owns
    # (samples 2, 5, 8 of train: batches 0, 1, 2; sample 2, 5 of val: batches 3, 4).
    assert expected_messages(hybrid, 2, both, taps) == {"hidden": 5, "taps": 5}
    # Rank 0 runs micro-batches 0, 2, 4 itself and owns samples in batches 0-3 (train 0, 3, 6, 9; val 0, 3):
    # it hears rank 2's taps 4 times and its group-mate's for batches 1 and 3.
    assert expected_messages(hybrid, 0, both, taps) == {"hidden": 0, "taps": 6}


def test_protocol_validates_every_field():
    raw = protocol.encode("progress", phase="cache", done=3, total=10, rate=1.5, metrics={})
    assert protocol.decode(raw)["done"] == 3
    version = protocol.PROTOCOL_VERSION  # the messages below are of this side's version, but for the one marked
    cases = [
        (b"\xc1", "not a msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"type": "launch_missiles", "version": version}), "unknown message type"),
        (msgpack.packb({"type": "heartbeat", "version": 99}), "protocol version 99"),
        (msgpack.packb({"type": "progress", "version": version, "phase": "x", "done": 1, "total": 2}), "'rate'"),
        (
            msgpack.packb({"type": "progress", "version": version, "phase": "x", "done": True, "total": 2, "rate": 1}),
            "int",
        ),
    ]
    for message, complaint in cases:
        with pytest.raises(protocol.ProtocolError, match=complaint):
            protocol.decode(message)
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(b"\x00" * (protocol.MAX_CONTROL_BYTES + 1))


def test_join_proofs_are_role_bound():
    token, nonce = auth.new_token(), auth.new_nonce()
    proof = auth.proof(token, "peer", nonce)
    assert auth.verify(token, "peer", nonce, proof)
    assert not auth.verify(token, "coordinator", nonce, proof)  # cannot be replayed the other way
    assert not auth.verify("other", "peer", nonce, proof)


def test_the_interface_towards_loopback_is_lo():
    assert local_address_towards("127.0.0.1") == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo"


def test_shares_interleave_owners_in_proportion():
    from pac.plan.placement import owned_positions, owner, share_pattern

    assert share_pattern((2, 1)) == [0, 1, 0]
    assert share_pattern((1, 1, 1)) == [0, 1, 2]
    pattern = share_pattern((4, 2, 1))
    assert [pattern.count(r) for r in range(3)] == [4, 2, 1] and pattern[:2] != [0, 0]
    assert [owner(p, 2, (2, 1)) for p in range(6)] == [0, 1, 0, 0, 1, 0]
    assert owned_positions(70, 0, 3, (4, 2, 1)) == [p for p in range(70) if pattern[p % 7] == 0]
    assert len(owned_positions(70, 2, 3, (4, 2, 1))) == 10
    plan = make_plan("replicated", 30, [1, 1], shares=(3, 1))
    assert (
        plan.owned_positions(8, 1) == [p for p in range(8) if plan.owner(p) == 1]
        and len(plan.owned_positions(8, 1)) == 2
    )
    with pytest.raises(PlanError, match="--shares gives 3 weights for 2 peers"):
        make_plan("replicated", 30, [1, 1], shares=(1, 1, 1))
    with pytest.raises(PlanError, match="in side-pipeline every stage has every sample"):
        make_plan("side-pipeline", 30, [1, 1], shares=(2, 1))
    with pytest.raises(PlanError, match="some above 0"):
        share_pattern((0, 0))
    with pytest.raises(PlanError, match="at least 0"):
        share_pattern((2, -1))


def test_a_rank_of_share_0_owns_nothing_and_runs_phase_1_only():
    """Share 0: a phase-1-only rank (a phone): it owns no sample, whatever the other shares, and phase 2 trains
    on the others; only shuffle mode has such a rank, and never as rank 0 (it writes the adapter)."""
    from pac.plan.placement import owned_positions, share_pattern

    assert share_pattern((1, 0, 1)) == [0, 2] and share_pattern((2, 0, 1, 0)) == [0, 2, 0]
    plan = make_plan("shuffle", 4, [1, 1, 1], shares=(1, 0, 1))
    assert plan.trainers == (0, 2) and plan.owned_positions(40, 1) == []
    # The samples fall to the trainers as two peers' plain round-robin gives them.
    assert plan.owned_positions(40, 0) == owned_positions(40, 0, 2)
    assert plan.owned_positions(40, 2) == owned_positions(40, 1, 2)
    assert make_plan("shuffle", 4, [1, 1]).trainers == (0, 1)
    with pytest.raises(PlanError, match="only --mode shuffle runs a peer in phase 1 alone"):
        make_plan("replicated", 4, [1, 1], shares=(1, 0))
    with pytest.raises(PlanError, match="rank 0 writes the adapter"):
        make_plan("shuffle", 4, [1, 1], shares=(0, 1))
    # After a re-plan a sample never goes back to a rank that now owns nothing.
    replanned = replace(plan, inherited=Inheritance(2, None, (0, 1), newcomers=(2,)))
    assert all(replanned.owner(p) != 1 for p in range(40))


def test_a_re_plan_keeps_every_sample_with_its_owner_if_it_stayed():
    """Three peers, rank 1 leaves: ranks 0 and 2 (now 0 and 1) keep every sample they owned, and rank 1's are
    dealt out by the new plan's round-robin. Then a newcomer joins at rank 0 of a third plan: it takes what
    the round-robin gives it, the others keep theirs. Ownership is a pure function of the membership history, and
    travels in the assignment."""
    first = make_plan("replicated", 4, [1, 1, 1])
    second = replace(make_plan("shuffle", 4, [1, 1]), inherited=Inheritance(3, None, (0, None, 1)))
    for p in range(30):
        before = first.owner(p)
        assert second.owner(p) == {0: 0, 2: 1}.get(before, p % 2)
    assert sorted(second.owned_positions(30, 0) + second.owned_positions(30, 1)) == list(range(30))
    third = replace(
        make_plan("replicated", 4, [1, 1, 1], shares=(1, 1, 2)),
        inherited=Inheritance(2, None, (1, 2), second.inherited, newcomers=(0,)),
    )
    pattern = share_pattern((1, 1, 2))  # [2, 0, 1, 2]: the newcomer takes every fourth sample
    for p in range(30):
        assert third.owner(p) == (0 if pattern[p % 4] == 0 else second.owner(p) + 1)
    assert third.owned_positions(30, 0) == [p for p in range(30) if p % 4 == 1]
    wire = msgpack.unpackb(msgpack.packb(third.inherited.to_wire()))
    assert Inheritance.from_wire(wire) == third.inherited
