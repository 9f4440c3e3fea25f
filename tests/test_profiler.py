"""The device profiler (pac.runtime.profiler) on a tiny real model, and the planner fed by its profiles."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pac.methods.parallel_adapters import ParallelAdapterOptions
from pac.models.backbone import load_backbone, load_config
from pac.plan.costs import Workload
from pac.plan.planner import plan
from pac.runconfig import DataOptions, OptimOptions, TrainOptions
from pac.runtime import cgroup, profiler
from pac.runtime.profiler import device_profile_of, model_costs_of, profile_device


@pytest.fixture
def pac_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PAC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PAC_PROFILES", str(tmp_path / "home" / "profiles"))
    return tmp_path / "home"


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_a_profile_measures_every_layer_and_the_method_s_step_and_is_cached(tiny_llama, pac_home, task):
    opts = TrainOptions(
        model=str(tiny_llama), data=DataOptions(task=task, max_length=16), optim=OptimOptions(batch_size=4)
    )
    profile = profile_device(tiny_llama, opts, "desk", 2 * 10**9, repeats=1)
    config = load_config(tiny_llama)
    layers = profile["layers"]
    assert [layer["layer"] for layer in layers] == list(range(config.num_hidden_layers))
    assert all(layer["seconds"] > 0 and layer["flops"] > 0 for layer in layers)
    # Identical decoder layers: the same FLOPs (layer 0 also looks up the embeddings, which FLOPs do not count).
    assert len({layer["flops"] for layer in layers}) == 1
    whole = load_backbone(tiny_llama, with_head=False)
    assert sum(profile["model"]["layer_weight_bytes"]) == sum(p.numel() * p.element_size() for p in whole.parameters())
    device = profile["device"]
    assert device["name"] == "desk" and device["memory"] == 2 * 10**9
    assert device["side_train_seconds"] > 0 and device["side_eval_seconds"] > 0
    assert profile["model"]["side_param_bytes"] > 0 and profile["measured"]["micro_batch"] == 4
    # The side blocks' share of a step (a side pipeline spreads them; its last stage also runs the read-out).
    assert 0 < profile["model"]["side_blocks_share"] < 1
    # Phase 1 per sample in micro-batches of 16 against the run's 4, for the planner to weigh.
    ((size, factor),) = device["micro_batch_factors"]
    assert size == 16 and 0 < factor < 10
    # Kept per device, model and run shape: asked again, it is read back (under the name the planner gives it).
    files = list((pac_home / "profiles").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["layers"] == layers
    again = profile_device(tiny_llama, opts, "other-name", 10**9)
    assert again["layers"] == layers and again["device"]["name"] == "other-name"
    longer = TrainOptions(
        model=str(tiny_llama), data=DataOptions(task=task, max_length=32), optim=OptimOptions(batch_size=4)
    )
    profile_device(tiny_llama, longer, "desk", 10**9, repeats=1)
    assert len(list((pac_home / "profiles").glob("*.json"))) == 2


def test_the_step_is_timed_as_phase_2_runs_it_on_shortlists_after_their_one_off_digest(tiny_llama, pac_home):
    """Language modelling with shortlists: the profile times the step on the shortlisted cache, and the one-off
    digest (each position's shortlist) per training sample, which the planner charges phase 2 once."""

    def profile(shortlist: int) -> dict:
        opts = TrainOptions(
            model=str(tiny_llama),
            data=DataOptions(task="lm", max_length=16),
            optim=OptimOptions(batch_size=4),
            method_options=ParallelAdapterOptions(shortlist=shortlist),
        )
        return profile_device(tiny_llama, opts, "desk", 2 * 10**9, repeats=1)["device"]

    listed, whole = profile(8), profile(0)
    # Without shortlists the training source is the cache as it is: nothing to digest but a wrapper's check.
    assert listed["digest_seconds"] > 10 * whole["digest_seconds"]
    assert listed["digested_train_seconds"] > 0 and whole["digested_train_seconds"] == 0
    # A side pipeline's stages train on the cache as it is: that step is timed too.
    assert listed["side_train_seconds"] > 0


def test_profiles_feed_the_planner(tiny_llama, pac_home):
    opts = TrainOptions(model=str(tiny_llama), data=DataOptions(max_length=16), optim=OptimOptions(batch_size=4))
    profile = profile_device(tiny_llama, opts, "a", 2 * 10**9, repeats=1)
    devices = [device_profile_of({**profile, "device": {**profile["device"], "name": n}}, 12.5e6, 0.001) for n in "ab"]
    # Phase 1's micro-batch is the batch the profile was measured at (4), as a run's is; the planner weighs it
    # against the 16 the profile also timed (left at Workload's default 8, the test passed or failed by timing).
    work = Workload(
        train=48,
        val=12,
        epochs=2,
        batch=4,
        taps=tuple(range(load_config(tiny_llama).num_hidden_layers + 1)),
        micro_batch=4,
    )
    choice = plan(devices, model_costs_of(profile), work)
    assert choice.best.total_seconds > 0 and choice.best.mode in choice.describe()
    assert devices[0].micro_batch_factors[0][0] == 16 and choice.best.micro_batch in (4, 16)


def test_under_a_cpu_quota_a_timing_is_what_the_quota_sustains(monkeypatch):
    """A call shorter than a CFS period runs unthrottled, so its wall time flatters a device held to a share of
    a core: the profile takes the CPU time over the share instead, whichever is longer."""

    def spin() -> None:
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass

    monkeypatch.setattr(profiler, "cpu_share", lambda: None)
    free = profiler._timed(spin, repeats=3)
    monkeypatch.setattr(profiler, "cpu_share", lambda: 0.25)
    held = profiler._timed(spin, repeats=3)
    assert free == pytest.approx(0.05, rel=0.5) and held >= 0.2 > free


def test_torch_threads_follow_a_cpu_quota(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for share, threads in ((None, None), (0.25, 1), (1.0, 1), (1.5, 2), (8.0, None), (12.0, None)):
        monkeypatch.setattr(cgroup, "cpu_share", lambda share=share: share)
        assert cgroup.quota_threads() == threads, share
