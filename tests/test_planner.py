"""The planner and its cost model (pac.plan.costs, pac.plan.planner): pure functions over profiles, no network."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from pac.plan.costs import (
    DeviceProfile,
    ModelCosts,
    Workload,
    gradient_wire_bytes,
    limit_seconds,
    peak_bytes,
    predict,
)
from pac.plan.placement import MODES
from pac.plan.planner import NoPlanError, best_for, plan, split_layers, whole_shares

GB = 10**9
LAYERS = 12
MODEL = ModelCosts(
    layer_weight_bytes=(60_000_000,) + (20_000_000,) * (LAYERS - 1),  # the embeddings ride with layer 0
    head_bytes=40_000_000,
    layer_activation_bytes=2_000_000,
    hidden_bytes=128 * 576 * 4,
    tap_bytes=128 * 576 * 2,
    side_state_bytes=128 * 72 * 4,
    side_param_bytes=12_000_000,
    side_sample_bytes=3_000_000,
    runtime_bytes=300_000_000,
)
WORK = Workload(train=400, val=100, epochs=5, batch=8, taps=tuple(range(LAYERS + 1)))


def device(name: str, speed: float = 1.0, memory: float = 8 * GB, bandwidth: float = 12.5e6) -> DeviceProfile:
    """A device `speed` times as fast as the reference (10 ms per sample and layer, 30 ms per side step)."""
    return DeviceProfile(
        name,
        int(memory),
        layer_seconds=(0.01 / speed,) * LAYERS,
        side_train_seconds=0.03 / speed,
        side_eval_seconds=0.01 / speed,
        bandwidth=bandwidth,
    )


def test_equal_devices_get_equal_layer_ranges_and_a_faster_one_gets_more():
    lan = 1e12  # links too fast to matter: compute alone sets the pace
    same = split_layers(
        "shuffle", [device("a", bandwidth=lan), device("b", bandwidth=lan), device("c", bandwidth=lan)], MODEL, WORK
    )
    assert same == [(0, 4), (4, 8), (8, 12)]
    uneven = split_layers(
        "shuffle", [device("fast", speed=2, bandwidth=lan), device("slow", bandwidth=lan)], MODEL, WORK
    )
    assert uneven == [(0, 8), (8, 12)]  # 8 layers at 5 ms against 4 at 10 ms: the same 40 ms per sample
    # At 100 Mbit/s the first stages' links carry the hidden state and a third of their taps' bytes: they get
    # fewer layers, so that what they send per sample takes no longer than the last stage's compute.
    linked = split_layers("shuffle", [device("a"), device("b"), device("c")], MODEL, WORK)
    assert linked[-1][1] - linked[-1][0] > 4


def test_the_layer_split_is_the_best_of_every_split():
    """Dynamic programming against brute force: the least pace over every contiguous split and device order."""
    devices = [device("a", speed=1.0), device("b", speed=1.7), device("c", speed=0.6, bandwidth=2e6)]
    for mode in ("shuffle", "side-pipeline"):
        for order in itertools.permutations(devices):
            found = split_layers(mode, order, MODEL, WORK)
            paces = []
            for cuts in itertools.combinations(range(1, LAYERS), len(order) - 1):
                bounds = (0, *cuts, LAYERS)
                stages = list(itertools.pairwise(bounds))
                paces.append(_pace(mode, order, stages))
            assert _pace(mode, order, found) == pytest.approx(min(paces), rel=1e-4)  # up to the pipeline's fill


def _pace(mode, devices, stages) -> float:
    """Seconds per sample of phase 1's slowest stage, from the prediction itself."""
    work = Workload(train=100_000, val=0, epochs=1, batch=8, taps=WORK.taps)  # the pipeline fill is negligible
    return predict(mode, devices, stages, MODEL, work).phase1_seconds / work.train


def test_a_device_short_of_memory_gets_fewer_layers_and_replicated_is_ruled_out():
    small = 300_000_000 + 4 * 12_000_000 + 40_000_000 + 8 * 3_000_000  # what phase 2 needs, no more
    devices = [device("desktop"), device("phone", speed=1.0, memory=small)]
    choice = plan(devices, MODEL, WORK)
    assert choice.by_mode["replicated"].devices == ("desktop",)  # the phone cannot hold every layer
    pipeline = choice.by_mode["side-pipeline"]
    phone = pipeline.devices.index("phone")
    start, end = pipeline.stages[phone]
    assert end - start <= 4 and pipeline.peak_bytes["phone"] <= small  # 4 x 20 MB + activations fit phase 2's room
    with pytest.raises(NoPlanError):
        plan([device("phone", memory=small)], MODEL, WORK, modes=["replicated"])


def test_a_device_too_slow_to_help_is_left_out_and_the_plan_says_why():
    choice = plan(
        [device("desktop", speed=1.0), device("laptop", speed=0.8), device("toaster", speed=0.01)], MODEL, WORK
    )
    assert "toaster" not in choice.best.devices and set(choice.best.devices) == {"desktop", "laptop"}
    why = choice.left_out["toaster"]
    assert why.startswith("with every device the run takes") and "without it" in why
    assert "toaster left out: with every device" in choice.describe()


def test_a_slow_link_favours_the_mode_that_sends_least_and_may_not_be_worth_using():
    lan = [device("a"), device("b")]
    slow = [device("a", bandwidth=125e3), device("b", bandwidth=125e3)]  # 1 Mbit/s
    # Side-pipeline moves only narrow side states; shuffle streams every sample's taps; the data-parallel
    # modes all-reduce 12 MB of gradients every step.
    times = {mode: best_for(mode, slow, MODEL, WORK).total_seconds for mode in MODES}
    assert times["side-pipeline"] < times["shuffle"] and times["side-pipeline"] < times["replicated"]
    assert best_for("replicated", lan, MODEL, WORK).total_seconds < times["replicated"]
    choice = plan(slow, MODEL, WORK)
    assert len(choice.best.devices) == 1 and "left out: with every device the run takes" in choice.describe()
    assert plan(lan, MODEL, WORK).best.devices in {("a", "b"), ("b", "a")}


def test_when_nothing_fits_the_error_names_each_device_and_its_shortfall():
    tiny = [device("phone", memory=200e6), device("watch", memory=100e6)]
    with pytest.raises(NoPlanError, match=r"phone needs .* more for layers 0-\d+ .*watch needs .* more") as err:
        plan(tiny, MODEL, WORK)
    assert "raise max_mem, add a device" in str(err.value)


def test_the_data_parallel_epoch_is_the_batches_share_plus_a_ring_all_reduce():
    a, b = device("a"), device("b", bandwidth=1e6)
    got = predict("replicated", [a, b], [(0, LAYERS)] * 2, MODEL, WORK)
    steps = 400 // 8
    compute = 4 * 0.03  # 8 samples round-robin over 2 devices
    ring = 2 * (2 - 1) / 2 * 12_000_000 / 1e6 + 2 * 0.001  # over the slower link, plus a round trip each way
    evaluation = 50 * 0.01
    assert got.epoch_seconds == pytest.approx(steps * (compute + ring) + evaluation)
    assert got.phase1_seconds == pytest.approx(250 * LAYERS * 0.01)  # each runs all layers on half of 500
    assert got.sent_bytes["a"] == steps * 5 * 12_000_000 + 12_000_000  # and the starting weights, once
    assert got.peak_bytes["a"] == peak_bytes("replicated", a, (0, LAYERS), MODEL, WORK)
    weights = 12_000_000 / 1e6 + 0.001  # the starting weights to b, once
    assert got.total_seconds == pytest.approx(got.phase1_seconds + weights + 5 * got.epoch_seconds)


def test_uneven_devices_own_samples_in_proportion_to_their_speed():
    devices = [device("desktop", speed=4), device("laptop", speed=2), device("phone", speed=1)]
    fast_lan = [DeviceProfile(**{**d.__dict__, "bandwidth": 1e12}) for d in devices]
    found = best_for("replicated", fast_lan, MODEL, WORK)
    assert found.shares == (4, 2, 1)
    equal = predict("replicated", fast_lan, [(0, LAYERS)] * 3, MODEL, WORK)
    assert found.total_seconds < 0.6 * equal.total_seconds  # the phone no longer sets the pace
    # Planned, the phone still costs more than it brings: with 8-sample steps it computes 2 of them (1/7 of a
    # batch, rounded up) at a quarter of the desktop's speed. The other two share the work 2:1.
    choice = plan(fast_lan, MODEL, WORK, ["replicated"])
    assert choice.best.shares == (2, 1) and "samples owned, of every 3: desktop 2, laptop 1" in choice.describe()
    assert whole_shares([1.0, 1.0]) is None and whole_shares([3.0, 1.0]) == (3, 1)


def test_reading_the_layers_and_building_the_model_count_once():
    slow_disk = DeviceProfile(**{**device("a").__dict__, "layer_load_seconds": (0.5,) * LAYERS, "build_seconds": 3.0})
    fast = device("b")
    without = predict("shuffle", [device("a"), fast], [(0, 6), (6, LAYERS)], MODEL, WORK)
    got = predict("shuffle", [slow_disk, fast], [(0, 6), (6, LAYERS)], MODEL, WORK)
    assert got.phase1_seconds == pytest.approx(without.phase1_seconds + 6 * 0.5)  # its 6 layers, read once
    assert got.phase2_seconds == pytest.approx(3.0 + without.build_seconds + 5 * got.epoch_seconds)
    assert got.total_seconds == pytest.approx(without.total_seconds + 3.0 + 3.0)


def test_phase_two_starts_with_one_broadcast_of_the_weights_and_a_side_pipeline_ends_with_one_gathering():
    """Rank 0 sends its starting weights to each other rank over its own link; side-pipeline stages then sum their
    parts into the adapter by a ring all-reduce (2 (n-1)/n of the bytes over the slowest link)."""
    a, b, c = device("a"), device("b"), device("c", bandwidth=1e6)
    rtt = 0.001
    alone = predict("replicated", [a], [(0, LAYERS)], MODEL, WORK)
    assert alone.build_seconds == 0.0
    data_parallel = predict("replicated", [a, b, c], [(0, LAYERS)] * 3, MODEL, WORK)
    assert data_parallel.build_seconds == pytest.approx(12_000_000 / 12.5e6 + 12_000_000 / 1e6 + rtt)
    stages = [(0, 4), (4, 8), (8, LAYERS)]
    pipelined = predict("side-pipeline", [a, b, c], stages, MODEL, WORK)
    gathering = 2 * 2 / 3 * 12_000_000 / 1e6 + 4 * rtt
    assert pipelined.build_seconds == pytest.approx(data_parallel.build_seconds + gathering)


def test_the_cache_s_digest_costs_each_device_its_own_samples_once_before_data_parallel_training():
    digesting = [DeviceProfile(**{**device(n).__dict__, "digest_seconds": 0.1}) for n in "ab"]
    plain = [device("a"), device("b")]
    for mode, stages in (("replicated", [(0, LAYERS)] * 2), ("shuffle", [(0, 6), (6, LAYERS)])):
        got = predict(mode, digesting, stages, MODEL, WORK, shares=(3, 1))
        without = predict(mode, plain, stages, MODEL, WORK, shares=(3, 1))
        assert got.build_seconds - without.build_seconds == pytest.approx(300 * 0.1)  # a owns 3/4 of 400
        assert got.epoch_seconds == without.epoch_seconds
    faster = [DeviceProfile(**{**d.__dict__, "digested_train_seconds": 0.01}) for d in digesting]
    got = predict("replicated", faster, [(0, LAYERS)] * 2, MODEL, WORK)
    slower = predict("replicated", digesting, [(0, LAYERS)] * 2, MODEL, WORK)
    assert slower.epoch_seconds - got.epoch_seconds == pytest.approx(50 * 4 * (0.03 - 0.01))  # its step, 50 a epoch
    pipelined = [(0, 6), (6, LAYERS)]  # a side pipeline reads its taps as they are: neither digest nor its step
    assert predict("side-pipeline", faster, pipelined, MODEL, WORK) == predict(
        "side-pipeline", plain, pipelined, MODEL, WORK
    )


def test_gradient_compression_halves_the_all_reduce():
    """fp16 sends half the bytes of every step's all-reduce, and the epoch saves their time on the slow link."""
    assert gradient_wire_bytes(MODEL, "none") == 12_000_000
    assert gradient_wire_bytes(MODEL, "fp16") == 6_000_000
    a, b = device("a"), device("b", bandwidth=1e6)
    plain, half = (
        predict("replicated", [a, b], [(0, LAYERS)] * 2, MODEL, WORK, compression=c) for c in ("none", "fp16")
    )
    steps = 400 // 8
    assert plain.epoch_seconds - half.epoch_seconds == pytest.approx(steps * 6_000_000 / 1e6)
    weights = 12_000_000  # rank 0's starting weights, in float32 either way
    assert half.sent_bytes["a"] - weights == (plain.sent_bytes["a"] - weights) / 2 and half.compression == "fp16"


def test_the_planner_compresses_gradients_only_where_the_plan_all_reduces_them():
    slow = [device("a", bandwidth=1e8), device("b", bandwidth=1e8)]  # worth using both, all-reducing 12 MB a step
    choice = plan(slow, MODEL, WORK, modes=("replicated",))
    assert choice.best.devices in {("a", "b"), ("b", "a")}
    assert choice.best.compression == "fp16" and "gradients all-reduced as fp16" in choice.describe()
    assert plan(slow, MODEL, WORK, modes=("replicated",), compressions=("none",)).best.compression == "none"
    assert plan(slow, MODEL, WORK, modes=("side-pipeline",)).best.compression == "none"
    alone = plan([device("a")], MODEL, WORK, modes=("replicated",))
    assert alone.best.compression == "none"  # one device all-reduces nothing


def test_the_limit_is_every_device_speed_combined_and_no_plan_beats_it():
    devices = [device("slow"), device("fast", speed=3)]
    # Forward: 0.12 s and 0.04 s per sample, so 33.3 samples/s together over 500; side epochs likewise.
    expected = 500 / (1 / 0.12 + 1 / 0.04) + 5 * (400 / (1 / 0.03 + 1 / 0.01) + 100 / (1 / 0.01 + 1 / 0.01 * 3))
    assert limit_seconds(devices, MODEL, WORK) == pytest.approx(expected)
    choice = plan(devices, MODEL, WORK)
    assert choice.limit_seconds == pytest.approx(expected) and choice.best.total_seconds > expected
    assert "the 31.2 s limit of every device's speed combined" in choice.describe()


def test_fp16_gradients_are_planned_only_where_they_save_time():
    """Over a fast link the all-reduce costs little: the planner keeps exact fp32 gradients there."""
    lan = [device("a", bandwidth=1e12), device("b", bandwidth=1e12)]
    assert plan(lan, MODEL, WORK, modes=("replicated",)).best.compression == "none"


def test_a_stage_group_lets_more_devices_help_than_the_layers_split_evenly():
    """Five devices that cannot hold the whole model, 12 layers: one device per stage leaves a stage of 3 layers
    (30 ms per sample); groups of two at 5 layers each (25 ms shared by two) and a last stage of 2 go faster. The
    planner finds the groups and says who takes turns with whom."""
    memory = peak_bytes("shuffle", device("x"), (0, 7), MODEL, WORK) + 1  # room for about 7 of the 12 layers
    devices = [device(f"d{i}", memory=memory, bandwidth=1e9) for i in range(5)]
    plain = split_layers("shuffle", devices, MODEL, WORK)
    grouped = split_layers("shuffle", devices, MODEL, WORK, grouped=True)
    assert len(set(plain)) == 5 and len(set(grouped)) < 5
    assert _pace("shuffle", devices, grouped) < _pace("shuffle", devices, plain)
    choice = plan(devices, MODEL, WORK)
    assert choice.best.mode == "shuffle" and len(set(choice.best.stages)) < 5
    assert "replicated: fits on no set" in choice.describe()
    assert "taking turns with" in choice.describe()
    with pytest.raises(NoPlanError, match="only shuffle"):
        split_layers("side-pipeline", devices, MODEL, WORK, grouped=True)


def test_the_planner_weighs_phase_one_micro_batches_against_the_pipeline_fill():
    """Devices that run 10% faster per sample in micro-batches of 16: where each runs the whole model there is
    no fill to pay, so 16 wins; in a pipeline over few samples the first micro-batch's trip through every
    stage costs more than the 10% saves, so 8 stays."""
    from dataclasses import replace

    faster = [replace(device(name), micro_batch_factors=((16, 0.9),)) for name in ("a", "b")]
    plenty = plan(faster, MODEL, WORK, modes=("replicated",))
    assert plenty.best.micro_batch == 16 and "phase 1 in micro-batches of 16" in plenty.describe()
    few = Workload(train=16, val=0, epochs=1, batch=8, taps=WORK.taps)
    assert plan(faster, MODEL, few, modes=("side-pipeline",)).best.micro_batch == 8
    # A size one device has not measured is not weighed.
    assert plan([faster[0], device("c")], MODEL, WORK, modes=("replicated",)).best.micro_batch == 8


def test_the_read_out_of_a_side_pipeline_runs_on_its_last_stage():
    """A language model's step spends most of its work in the head (the products with the whole vocabulary),
    which a side pipeline's last stage runs alone: with 10% of the step in the side blocks, two equal stages
    take the step at the last stage's pace (55% of it), not at half of it."""
    from dataclasses import replace

    devices = [device("a"), device("b")]
    stages = [(0, 6), (6, 12)]
    spread = predict("side-pipeline", devices, stages, MODEL, WORK).epoch_seconds
    headed = predict("side-pipeline", devices, stages, replace(MODEL, side_blocks_share=0.1), WORK).epoch_seconds
    assert headed > 1.5 * spread
    # The data-parallel modes split whole steps between devices: the share changes nothing there.
    for mode in ("replicated", "shuffle"):
        plain = predict(mode, devices, stages, MODEL, WORK).epoch_seconds
        assert predict(mode, devices, stages, replace(MODEL, side_blocks_share=0.1), WORK).epoch_seconds == plain


def test_a_phase_1_only_device_takes_layers_in_shuffle_mode_and_owns_no_samples():
    """A phone (`pac peer --phase1-only`) beside a slow laptop: it runs some of phase 1's layers, owns no samples,
    adds nothing to phase 2's memory or time, and is never rank 0; where the phone is alone, no plan."""
    laptop = device("laptop", speed=0.5)
    phone = DeviceProfile(
        "phone", 4 * GB, layer_seconds=(0.01,) * LAYERS, side_train_seconds=0.0, side_eval_seconds=0.0, phase1_only=True
    )
    choice = plan([laptop, phone], MODEL, WORK)
    best = choice.best
    assert best.mode == "shuffle" and best.devices == ("laptop", "phone") and best.shares == (1, 0)
    assert best.stages[1][1] - best.stages[1][0] >= LAYERS // 2  # the faster forward takes more of the layers
    assert "rank 1 phone: layers" in choice.describe() and "phase 1 only" in choice.describe()
    alone = predict("shuffle", [laptop], [(0, LAYERS)], MODEL, WORK)
    assert best.epoch_seconds == pytest.approx(alone.epoch_seconds)  # phase 2 is the laptop's alone
    assert best.phase1_seconds < alone.phase1_seconds
    start, end = best.stages[1]  # its peak is its layers' forward, never training's
    layers = sum(MODEL.layer_weight_bytes[start:end]) + best.micro_batch * MODEL.layer_activation_bytes
    assert best.peak_bytes["phone"] == MODEL.runtime_bytes + layers
    # The other modes have no place for it: they plan on the laptop alone and say why.
    replicated = plan([laptop, phone], MODEL, WORK, modes=["replicated"])
    assert replicated.best.devices == ("laptop",) and "runs phase 1 only" in replicated.left_out["phone"]
    with pytest.raises(NoPlanError, match="every device runs phase 1 only"):
        plan([phone], MODEL, WORK)
    # With two trainers, the phone's share stays 0 whichever shares the others get.
    lan = 1e12  # links too fast to matter: the second laptop's help in phase 2 outweighs its all-reduces
    trio = [replace(laptop, bandwidth=lan), replace(phone, bandwidth=lan), device("other laptop", 0.4, bandwidth=lan)]
    three = plan(trio, MODEL, WORK, modes=["shuffle"]).best
    assert len(three.devices) == 3 and three.shares[three.devices.index("phone")] == 0
    assert three.devices[0] != "phone" and all(
        three.shares[three.devices.index(n)] > 0 for n in ("laptop", "other laptop")
    )
