"""pac.runtime.run_dir: an output directory belongs to one run, named by what changes its result."""

from __future__ import annotations

import json

import pytest

from pac.errors import PacError
from pac.runtime.progress import RunClock, epoch_line, format_seconds
from pac.runtime.run_dir import RUN_FILE, claim, differences, run_fingerprint

RUN = {"model": "m" * 64, "data": {"train": "a" * 64}, "options": {"lr": 0.001, "epochs": 3}}


def other(**options) -> dict:
    return {**RUN, "options": {**RUN["options"], **options}}


def test_fingerprint_is_canonical_and_covers_everything():
    assert run_fingerprint(RUN) == run_fingerprint(json.loads(json.dumps(RUN)))
    assert run_fingerprint(RUN) != run_fingerprint(other(lr=0.003))
    assert run_fingerprint(RUN) != run_fingerprint({**RUN, "data": {"train": "b" * 64}})


def test_differences_name_what_changed():
    changed = differences(RUN, {**other(lr=0.003), "data": {"train": "b" * 64}})
    assert changed == ["data.train: other content", "options.lr: 0.001 -> 0.003"]


def test_a_fresh_directory_is_claimed_and_the_same_run_continues(tmp_path):
    out = tmp_path / "run"
    first = claim(out, RUN)
    assert not first.continuing and (out / RUN_FILE).exists()
    again = claim(out, json.loads(json.dumps(RUN)))
    assert again.continuing and not again.finished
    (out / "summary.json").write_text("{}")
    assert claim(out, RUN).finished


def test_another_run_is_refused_with_what_differs(tmp_path):
    out = tmp_path / "run"
    claim(out, RUN)
    (out / "checkpoints").mkdir()
    with pytest.raises(PacError) as info:
        claim(out, other(lr=0.003))
    message = str(info.value)
    assert "options.lr: 0.001 -> 0.003" in message
    assert "--overwrite" in message and "new --out" in message and "--resume" in message
    with pytest.raises(PacError, match="no checkpoint of this run"):
        claim(out, other(lr=0.003), require_resume=True)
    # --overwrite replaces the earlier run's directory, and the new run owns it.
    fresh = claim(out, other(lr=0.003), overwrite=True)
    assert not fresh.continuing and not (out / "checkpoints").exists()
    assert json.loads((out / RUN_FILE).read_text())["fingerprint"] == run_fingerprint(other(lr=0.003))


def test_outputs_without_a_record_are_not_resumed(tmp_path):
    (tmp_path / "summary.json").write_text("{}")  # an adapter from a pac that kept no run.json
    with pytest.raises(PacError, match="cannot be matched"):
        claim(tmp_path, RUN)


def test_overwrite_never_deletes_a_directory_pac_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(PacError, match="files pac did not write"):
        claim(tmp_path, RUN, overwrite=True)
    assert (tmp_path / "thesis.tex").exists()
    assert not claim(tmp_path / "empty-or-new", RUN, overwrite=True).continuing


def test_run_clock_prices_the_whole_run_from_measured_rates():
    clock = RunClock(cache_samples=100, steps=50, evaluations=2, batch_size=8, eval_steps=10)
    assert clock.left() == ""  # nothing measured yet
    clock.cache_progress(10, 2.0)  # 0.2 s a sample
    # 90 samples left (18 s) + 50 steps priced from phase 1 (0.33 * 8 * 0.2 s each) + 2 evaluations.
    step = 0.33 * 8 * 0.2
    assert clock.seconds_left() == pytest.approx(90 * 0.2 + 50 * step + 2 * 10 * step / 3)
    clock.cache_reused(90)
    clock.step_done(1.0)
    clock.evaluation_done(4.0)
    assert clock.seconds_left() == pytest.approx(49 * 1.0 + 1 * 4.0)
    assert clock.left() == "~53 s left in the run"
    assert (format_seconds(185), format_seconds(4320)) == ("3 min 05 s", "1 h 12 min")


def test_epoch_lines_never_invent_validation_figures():
    record = {"epoch": 2, "train_loss": 0.5, "epoch_seconds": 1.25}
    assert epoch_line(record, 3) == "epoch 2/3: train loss 0.5000  (no validation rows)  (1.2 s)"
    assert "val_accuracy 0.9000" in epoch_line({**record, "val_accuracy": 0.9}, 3)
