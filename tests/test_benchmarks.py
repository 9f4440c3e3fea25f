"""The quality harness's bookkeeping (aggregation, table, plot, which files a report writes) on synthetic runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    """A benchmark script, imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return _benchmark("quality")


def _run(ppls, seconds=10.0, rss=900.0):
    epochs = [{"epoch": i + 1, "val_perplexity": p, "epoch_seconds": seconds} for i, p in enumerate(ppls)]
    return {"epochs": epochs, "peak_rss_mb": rss, "trainable_params": 10}


def test_report_relates_every_configuration_to_lora(quality, tmp_path):
    runs = {
        "zero-shot": {
            "0": {"epochs": [{"epoch": 0, "val_perplexity": 40.0}], "peak_rss_mb": 800, "trainable_params": 0}
        },
        "lora": {"0": _run([30, 26, 25], seconds=400, rss=4000)},
        "side": {"0": _run([35, 33, 31]), "1": _run([35, 33, 33])},
        "lora-bf16": {"0": _run([30, 26, 25], seconds=200, rss=3000)},
        "side-bf16": {"0": _run([35, 33, 32], seconds=8, rss=1200)},
        # the first seed builds the shortlists beside the cache, the next reuses them
        "side-shortlist256": {
            "0": {**_run([35, 33, 32], seconds=5), "shortlist": {"seconds": 40.0, "built_files": 13}},
            "1": {**_run([35, 33, 32], seconds=5), "shortlist": {"seconds": 0.01, "built_files": 0}},
        },
    }
    rows = quality.aggregate("lm", runs)
    assert rows["side"]["final_mean"] == 32 and rows["side"]["final_std"] == pytest.approx(2**0.5)
    table = quality.report("lm", runs)
    share = __import__("math").log(40 / 32) / __import__("math").log(40 / 25)
    assert f"{share:.0%} of LoRA's log-ppl reduction" in table
    assert "side: epoch 40.0x faster than LoRA's, peak RSS 22% of LoRA's" in table
    # bf16 rows are compared with LoRA in bf16: like against like
    assert "side-bf16: epoch 25.0x faster than LoRA bf16's, peak RSS 40% of LoRA bf16's" in table
    shortlisted = "side-shortlist256: epoch 80.0x faster than LoRA's, peak RSS 22% of LoRA's; shortlist adds 40 s once"
    assert shortlisted in table
    compact = quality.compact("lm", runs)  # the README's table
    assert "| side | 32.000 ± 1.414 | 47% | 2 | 10 | 0.88 GB |" in compact and "zero-shot" not in compact
    # a learning-curve size where only some configurations ran: no zero-shot, so no share of LoRA's gain
    assert "| side | 32.000 ± 1.414 | — | 2 | 10 | 0.88 GB |" in quality.compact("lm", {"side": runs["side"]})
    quality.plot("lm", runs, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_every_configuration_is_known_to_the_cli(quality):
    from pac.cli import build_parser

    parser = build_parser()
    for task in ("classify", "lm"):
        for name in quality.configs_for(task):
            args = parser.parse_args(["train", "--out", "x", *quality.train_args(task, name, _Args())])
            assert args.task == task


def test_baselines_start_from_the_naive_side_network_and_only_pac_default_takes_the_shipped_defaults(quality):
    from pac.cli import build_parser

    parser = build_parser()

    def parsed(name):
        return parser.parse_args(["train", "--out", "x", *quality.train_args("lm", name, _Args())])

    head_norm = parsed("head+norm")  # head + final norm only: no memory, no shortlists, its own LR
    assert (head_norm.retrieval, head_norm.shortlist, head_norm.lr) == (False, 0, 3e-3)
    assert (parsed("pac-default").retrieval, parsed("pac-default").shortlist) == (None, None)
    assert parsed("lora").method == "lora" and parsed("lora").retrieval is None


def test_a_learning_curve_point_leaves_the_main_tables_alone(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    store = {
        "train400-val400-epochs3": {"side": {"0": _run([35, 33, 31])}},
        "train100-val400-epochs3": {"side": {"0": _run([40, 38, 37])}},
    }
    (tmp_path / "quality_lm.json").write_text(json.dumps(store))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--task", "lm", "--train-size", "100", "--report"])
    quality.main()
    assert not (tmp_path / "quality_lm.md").exists() and not (tmp_path / "quality_lm_compact.md").exists()
    assert "| side | 100 | 37.0000" in (tmp_path / "quality_lm_learning_curve.md").read_text()
    monkeypatch.setattr(sys, "argv", ["quality.py", "--task", "lm", "--report"])
    quality.main()
    assert (tmp_path / "quality_lm.md").read_text().startswith("Setting: train400-val400-epochs3")
    assert "| side | 31.000 |" in (tmp_path / "quality_lm_compact.md").read_text()


class _Args:
    train_size, val_size, epochs = 400, 400, 3


def test_early_stopped_runs_report_the_kept_epoch_and_sizes_make_a_learning_curve(quality, tmp_path):
    kept = {**_run([35, 30, 33]), "best_epoch": 2}
    assert quality.aggregate("lm", {"side": {"0": kept}})["side"]["final_mean"] == 30
    store = {
        "train100-val400-epochs3": {"side": {"0": _run([40, 38, 37])}, "lora": {"0": _run([35, 33, 32])}},
        "train400-val400-epochs3": {"side": {"0": _run([35, 33, 31])}},
        "train400-val200-epochs3": {"lora": {"0": _run([30, 26, 25])}},  # another validation set: not a point
    }
    curves = quality.learning_curve("lm", store, val_size=400, epochs=3)
    assert list(curves) == ["side"] and [r["final_mean"] for r in curves["side"].values()] == [37, 31]
    quality.write_learning_curve("lm", curves, tmp_path / "curve")
    assert "| side | 100 | 37.0000" in (tmp_path / "curve.md").read_text() and (tmp_path / "curve.png").exists()


def test_a_run_with_retrieval_reports_the_mixture_and_its_one_off_cost(quality):
    mixed = {**_run([35, 33, 31]), "retrieval": {"val_perplexity": 28.0, "seconds": 42.0}}
    runs = {"lora": {"0": _run([30, 26, 25], seconds=400, rss=4000)}, "side-retrieval": {"0": mixed}}
    assert quality.aggregate("lm", runs)["side-retrieval"]["final_mean"] == 28
    assert "side-retrieval: epoch 40.0x faster than LoRA's, peak RSS 22% of LoRA's; retrieval adds 42 s once" in (
        quality.report("lm", runs)
    )
    # The naive base every side-* lever is measured against pins the LM default's extras off.
    naive = quality.train_args("lm", "side", _Args())
    assert "--no-retrieval" in naive and naive[naive.index("--readout-hidden") + 1] == "0"


@pytest.fixture(scope="module")
def end_to_end():
    return _benchmark("end_to_end")


def _e2e_row(config, epochs_run, wall, epoch_seconds, **extra):
    row = {
        "config": config,
        "task": "classify",
        "shape": "8+4 articles x 16 tokens",
        "epochs_run": epochs_run,
        "wall_seconds": wall,
        "epoch_seconds": epoch_seconds,
        "profiling_seconds": None,
        "final": {"val_accuracy": 0.5, "val_loss": 1.0},
        "peak_rss_mb": {"desktop": 1000.0},
        "wire_bytes": 0,
        "mode": "one device",
        "plan": None,
        "planned": None,
        "grad_compression": None,
    }
    return {**row, **extra}


def test_end_to_end_timing_measures_one_off_costs_and_extrapolates_only_epochs(end_to_end, tmp_path):
    """A 1-epoch baseline: its one-off part (wall less its epoch) is kept, the missing epochs cost its mean; a
    5-epoch run asked for 3 is cut at the end of its third epoch; the table marks what is extrapolated."""
    lora = _e2e_row("lora-dp", 1, 100.0, [30.0])
    assert end_to_end.timing(lora, 5) == (pytest.approx(70 + 5 * 30), True)
    alone = _e2e_row("lora-desktop", 5, 60.0, [10.0, 9.0, 8.0, 7.0, 6.0])
    assert end_to_end.timing(alone, 3) == (pytest.approx(20 + 27), False)
    planned = {
        "predicted_total_seconds": 20.0,
        "measured_phase1_seconds": 10.0,
        "measured_phase2_seconds": 12.0,
        "limit_seconds": 10.0,
        "left_out": ["phone"],
    }
    states = {"joining": 2.0, "planning": 1.0, "cache build": 10.0, "training": 12.0}
    pac = _e2e_row(
        "pac",
        5,
        25.0,
        [1.0] * 5,
        mode="side-pipeline",
        plan=[[0, 19], [19, 30]],
        planned=planned,
        seconds_by_state=states,
    )
    rows = {"classify/lora-dp/1": lora, "classify/lora-desktop/5": alone, "classify/pac/5": pac}
    table = end_to_end.report(rows)
    assert "| lora-dp | 5 | 220 | 1.0x |" in table and "extrapolated from 1 measured epoch(s)" in table
    assert "| pac | 5 | 25 | 8.8x |" in table and "2.50x the 10 s limit" in table and "left out: phone" in table
    # the prediction is made after joining and planning: the run's own end-to-end prediction includes them
    assert "export and exit 0 s; end to end predicted 23 s / measured 25 s (1.09x)" in table
    assert "| lora-desktop | 3 | 47 |" in table and "(after 5)" in table
    end_to_end.plot(rows, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 0
