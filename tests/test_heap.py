"""pac.runtime.heap against the process's real heap: freed pages go back to the kernel, measured in /proc."""

import pytest
import torch

from pac.runtime.heap import _glibc, one_off_step


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
