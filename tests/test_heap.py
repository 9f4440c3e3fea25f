"""pac.runtime.heap against the process's real heap: freed pages go back to the kernel, measured in /proc."""

import multiprocessing

import pytest
import torch

from pac.runtime.heap import _glibc, one_off_step, peak_rss_mb


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(_glibc() is None, reason="malloc_trim and mallopt are glibc's")
def test_a_one_off_step_starts_by_handing_freed_heap_pages_back():
    # 128,000-byte blocks come from the heap (under glibc's mmap threshold); freeing every other one leaves
    # ~128 MB of holes that the heap keeps resident, since live blocks sit above them.
    blocks = [torch.ones(32_000) for _ in range(2_000)]
    del blocks[::2]
    before = resident_mb()
    with one_off_step():
        inside = resident_mb()
    assert before - inside > 64
    with one_off_step():  # and it can be entered again
        pass
    del blocks


def test_a_one_off_step_runs_its_block_where_there_is_no_glibc(monkeypatch):
    monkeypatch.setattr("pac.runtime.heap._glibc", lambda: None)
    with one_off_step():
        ran = True
    assert ran


def _child_peak() -> float:
    return peak_rss_mb()


def test_a_process_started_by_a_larger_one_reports_its_own_peak_not_its_parents():
    # Linux carries getrusage's ru_maxrss over the exec of a spawned child: a peer or a profiling process would
    # report its parent's size as its own peak.
    held = bytearray(600 << 20)
    held[:: 1 << 12] = b"\1" * len(held[:: 1 << 12])  # touch every page: resident
    assert peak_rss_mb() > 600
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(_child_peak)
    assert child < 400, child  # a bare interpreter that imported pac.runtime.heap
    del held
