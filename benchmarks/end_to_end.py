"""PAC's headline, end to end on a simulated home of uneven devices (issue "A planner for uneven home devices"):
from start to a saved adapter, every one-off cost included, pac planned across the devices against what a user
of this cluster would run instead.

The home is deploy/home.toml (desktop 1.0 CPU / 8 GB, laptop 0.5 / 4 GB, phone 0.25 / 2 GB; 100 Mbit 5 ms, the
phone 20 Mbit 20 ms; deploy/home.py), all on this 2-core machine. Configurations:

  pac            `pac-launch`, planned (the peers' profiles measured beforehand by `pac plan --refresh-profiles`,
                 a first-run cost reported on its own row)
  lora-dp        LoRA data-parallel over the same three devices: `pac-launch --method lora --mode replicated`,
                 torch DDP on gloo, samples owned 4:2:1 as the CPU shares are (the baseline at its best split)
  lora-desktop   LoRA on the fastest device alone (`pac train --method lora` in the desktop's namespace and cgroups)
  full-desktop   full fine-tuning on the desktop alone (`pac train --method full`)
  pac-no-cache   the side network on the desktop alone with a backbone forward every step (no activation cache)

With --compression, the gradient all-reduce over the home's links (issue 21, point 7), 3 epochs: pac replicated
on all three devices (4:2:1) and LoRA data-parallel, each uncompressed and as fp16 (--grad-compression).

Every row is a real run; its wall time is the command's, from start to exit. Rows that ran fewer epochs than a
column asks for are extrapolated from their own measured epochs (one-off costs measured, never extrapolated:
the run's wall time less its epochs) and marked so. Bytes on the wire are the devices' link counters; peak memory
is each process's peak RSS. Resumable: finished rows are kept (`--only` runs named rows again).

    python benchmarks/end_to_end.py [--task classify] [--train-size 64] [--val-size 32] [--max-length 64]
    python benchmarks/end_to_end.py --task classify --compression
    python benchmarks/end_to_end.py --report
Writes benchmarks/results/end_to_end.{json,md,png}. Needs root (namespaces, cgroups).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "end_to_end"
EPOCHS = (3, 5)
LORA_DP = ["--method", "lora", "--mode", "replicated", "--shares", "4,2,1"]
REPLICATED = ["--mode", "replicated", "--shares", "4,2,1"]
# pac-launch's options of each configuration run on the whole home.
HOME_ARGS = {
    "pac": [],
    "lora-dp": LORA_DP,
    # Gradient compression where a run all-reduces gradients over the home's links (issue 21, point 7).
    "pac-replicated": REPLICATED,
    "pac-replicated-fp16": [*REPLICATED, "--grad-compression", "fp16"],
    # its own uncompressed row: the compression rows ran after torch threads began to follow the CPU quota
    "lora-dp-none": [*LORA_DP, "--grad-compression", "none"],
    "lora-dp-fp16": [*LORA_DP, "--grad-compression", "fp16"],
}
DESKTOP_CONFIGS = ("lora-desktop", "full-desktop", "pac-no-cache")
MAIN = ("pac", "lora-dp", *DESKTOP_CONFIGS)
COMPRESSION = ("pac-replicated", "pac-replicated-fp16", "lora-dp-none", "lora-dp-fp16")
# Epochs actually run: pac's are cheap and run in full; a baseline's epochs cost the same each, so one is timed
# and the rest extrapolated (the sizing rule), except LoRA alone, whose 5 epochs give its quality; the
# compression rows run 3 epochs.
EPOCHS_RUN = {
    "lora-dp": 1,
    "lora-dp-none": 1,
    "lora-dp-fp16": 1,
    "full-desktop": 1,
    "pac-no-cache": 1,
}
EPOCHS_RUN |= {"lora-desktop": 5, "pac-replicated": 3, "pac-replicated-fp16": 3}


def _home():
    sys.path.insert(0, str(HERE.parent / "deploy"))
    import home

    return home


def _common(args: argparse.Namespace, epochs: int, out: Path) -> list[str]:
    argv = ["--task", args.task, "--epochs", str(epochs), "--train-size", str(args.train_size)]
    argv += ["--val-size", str(args.val_size), "--max-length", str(args.max_length), "--out", str(out)]
    return argv + ["--overwrite"]


def _link_bytes(home: Any) -> int:
    """What the devices have sent over their links so far (the bridge side of each device's TAP receives it)."""
    total = 0
    for d in range(len(home.devices)):
        total += int(Path(f"/sys/class/net/{home.tag}h{d}/statistics/rx_bytes").read_text())
    return total


def _epochs_of(summary: dict[str, Any]) -> list[float]:
    return [e["epoch_seconds"] + e.get("eval_seconds", 0.0) for e in summary["epochs"]]


def run_home(config: str, args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    home_mod = _home()
    devices = home_mod.read_home(args.home)
    work = WORK / f"{args.task}-{config}-{epochs}"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PAC_JOIN_TOKEN": secrets.token_hex(16), "TQDM_DISABLE": "1"}
    launch = str(Path(sys.executable).with_name("pac-launch"))
    cmd = [launch, *_common(args, epochs, work / "out"), "--cache-dir", str(work / "cache"), "--join-timeout", "300"]
    cmd += HOME_ARGS[config]
    with home_mod.SimulatedHome(devices) as home:
        hosts = home.start_peers(work / "peers", env)
        profiling = None
        if config == "pac" and epochs == EPOCHS[0]:  # the profiles later planned runs read: once per run shape
            plan = [str(Path(sys.executable).with_name("pac")), "plan", "--peers", str(hosts), "--refresh-profiles"]
            plan += _common(args, epochs, work / "plan")[:-1] + ["--join-timeout", "300"]
            started = time.perf_counter()
            subprocess.run(plan, check=True, env=env)
            profiling = time.perf_counter() - started  # the agents stay for the run that follows
        sent_before = _link_bytes(home)
        started = time.perf_counter()
        print("$", " ".join(cmd), flush=True)
        subprocess.run([*cmd, "--peers", str(hosts)], check=True, env=env)
        wall = time.perf_counter() - started
        sent = _link_bytes(home) - sent_before
    summary = json.loads((work / "out" / "summary.json").read_text())
    return {
        **_measured(config, epochs, wall, summary),
        "profiling_seconds": profiling,
        "peak_rss_mb": {name: p["summary"].get("peak_rss_mb") for name, p in summary["peers"].items()},
        "wire_bytes": sent,
        "mode": summary["mode"],
        "plan": summary["plan"],
        "planned": summary.get("planned"),
        "grad_compression": summary.get("grad_compression"),
        "seconds_by_state": summary.get("seconds_by_state"),
    }


def _measured(config: str, epochs: int, wall: float, summary: dict[str, Any]) -> dict[str, Any]:
    """What every row keeps of its run: the wall time, each epoch's seconds and the final validation."""
    return {
        "config": config,
        "epochs_run": epochs,
        "wall_seconds": wall,
        "epoch_seconds": _epochs_of(summary),
        "final": summary["epochs"][-1],
    }


def run_desktop(config: str, args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """A single-device run inside the desktop's namespace and cgroups."""
    home_mod = _home()
    devices = home_mod.read_home(args.home)
    work = WORK / f"{args.task}-{config}-{epochs}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if config == "pac-no-cache":
        cmd = [sys.executable, __file__, "--no-cache-worker", *_common(args, epochs, work / "out")]
    else:
        method = {"lora-desktop": "lora", "full-desktop": "full"}[config]
        pac = str(Path(sys.executable).with_name("pac"))
        cmd = [pac, "train", "--method", method, *_common(args, epochs, work / "out"), "--cache-dir", str(work)]
    with home_mod.SimulatedHome(devices[:1]) as home:
        started = time.perf_counter()
        print("$", " ".join(cmd), flush=True)
        proc = home.run(0, cmd, work / "run.log", env)
        if proc.wait() != 0:
            raise SystemExit(f"{config} failed: see {work / 'run.log'}")
        wall = time.perf_counter() - started
    summary = json.loads((work / "out" / "summary.json").read_text())
    return {
        **_measured(config, epochs, wall, summary),
        "profiling_seconds": None,
        "peak_rss_mb": {"desktop": summary.get("peak_rss_mb")},
        "wire_bytes": 0,
        "mode": "one device",
        "plan": None,
        "planned": None,
        "grad_compression": None,
    }


def no_cache_worker(argv: list[str]) -> None:
    """pac's side network trained without the activation cache: the frozen backbone runs on every batch of
    every epoch (pac.runtime.sources.LiveTaps), as a side-tuning method without phase 1 would. The options are
    the collaborative run's (no token memory, no shortlists: both are built from the cache)."""
    from dataclasses import replace

    import torch

    from pac.methods.registry import BuildContext, get_method
    from pac.models.backbone import load_backbone
    from pac.runconfig import DataOptions, OptimOptions, TrainOptions, with_defaults
    from pac.runtime.heap import peak_rss_mb
    from pac.runtime.prepare import prepare_data, train_config
    from pac.runtime.sources import LiveTaps
    from pac.runtime.trainer import Trainer

    parser = argparse.ArgumentParser()
    for flag in ("--task", "--out"):
        parser.add_argument(flag)
    for flag in ("--epochs", "--train-size", "--val-size", "--max-length"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    data = DataOptions(task=args.task, train_size=args.train_size, val_size=args.val_size, max_length=args.max_length)
    opts = with_defaults(TrainOptions(data=data, optim=OptimOptions(epochs=args.epochs), out=args.out))
    method = get_method(opts.method)
    opts = replace(opts, method_options=replace(opts.options, retrieval=False, shortlist=0))
    torch.manual_seed(opts.optim.seed)
    prepared = prepare_data(opts.model, opts.data)
    backbone = load_backbone(prepared.model_dir)
    taps = method.taps(opts.options, args.task, backbone.config.num_hidden_layers)
    train, val = (LiveTaps(split, backbone, taps) for split in (prepared.train, prepared.val))
    ctx = BuildContext(prepared.model_dir, args.task, prepared.label_names, 0, args.max_length, train)
    model = method.build(opts.options, ctx)
    out = Path(args.out)
    epochs = Trainer(model, args.task, train, train_config(opts), out, val=val).fit(resume=False)
    (out / "summary.json").write_text(json.dumps({"epochs": epochs, "peak_rss_mb": peak_rss_mb()}, indent=1))


def _row(rows: dict[str, Any], task: str, config: str, epochs: int) -> dict[str, Any] | None:
    """The run that stands for `config` at `epochs`: its own, or the one its epochs are extrapolated from."""
    return rows.get(f"{task}/{config}/{epochs}") or rows.get(f"{task}/{config}/{EPOCHS_RUN.get(config, epochs)}")


def _configs(rows: dict[str, Any], task: str, configs: tuple[str, ...]) -> list[str]:
    return [c for c in configs if any(_row(rows, task, c, e) for e in EPOCHS)]


def timing(row: dict[str, Any], epochs: int) -> tuple[float, bool]:
    """(wall seconds of an `epochs`-epoch run, whether extrapolated): the measured one-off part plus the mean
    epoch for epochs the run did not do; a run with more epochs than asked is cut at the end of that epoch."""
    measured = row["epoch_seconds"]
    one_off = row["wall_seconds"] - sum(measured)
    mean = sum(measured) / len(measured)
    if epochs <= len(measured):
        return one_off + sum(measured[:epochs]), False
    return one_off + sum(measured) + (epochs - len(measured)) * mean, True


def wire_megabytes(row: dict[str, Any], epochs: int) -> float:
    """MB on the links for `epochs`: a run of other length is scaled in proportion (its one-off traffic, the
    data and the adapter, is small beside an epoch's all-reduce, so this errs a little high)."""
    return row["wire_bytes"] / 1e6 * epochs / row["epochs_run"]


def _quality(task: str, final: dict[str, Any]) -> str:
    if task == "classify":
        return f"acc {final['val_accuracy']:.3f}, loss {final['val_loss']:.3f}"
    return f"ppl {math.exp(final['val_loss']):.2f}"


def _planned_note(row: dict[str, Any], wall: float) -> str:
    """The plan, predicted against measured, where the run's time went, and how far it is from the limit."""
    p = row["planned"]
    predicted = p["predicted_total_seconds"]
    measured = p["measured_phase1_seconds"] + p["measured_phase2_seconds"]
    note = (
        f"{row['mode']} {row['plan']}, phases 1+2 predicted {predicted:.0f} s / measured {measured:.0f} s "
        f"({measured / predicted:.2f}x)"
    )
    states = row.get("seconds_by_state")
    if states and wall == row["wall_seconds"]:  # a whole run as measured (not cut at an earlier epoch)
        # The plan is made after start-up, joining and planning, so the run's own prediction includes them as
        # measured; what the plan leaves out is the export and the process's exit.
        before = states.get("starting", 0.0) + states["joining"] + states["planning"]
        rest = wall - before - measured
        starting = f"starting {states['starting']:.0f} s, " if "starting" in states else ""
        if "export" in states:
            ending = f"export {states['export']:.0f} s and exit {rest - states['export']:.0f} s"
        else:
            ending = f"export and exit {rest:.0f} s"
        note += (
            f"; {starting}joining {states['joining']:.0f} s, planning {states['planning']:.0f} s, {ending}"
            f"; end to end predicted {before + predicted:.0f} s / measured {wall:.0f} s "
            f"({wall / (before + predicted):.2f}x)"
        )
    return note + f"; {wall / p['limit_seconds']:.2f}x the {p['limit_seconds']:.0f} s limit"


def report(rows: dict[str, Any]) -> str:
    lines = []
    for task in ("classify", "lm"):
        mine = {k: r for k, r in rows.items() if r["task"] == task}
        if not mine:
            continue
        shape = next(iter(mine.values()))["shape"]
        lines += [f"\n### {task}, {shape}\n"]
        lines += [
            "| configuration | epochs | wall (s) | vs lora-dp | peak RSS per device (MB) | on the wire (MB) "
            "| validation | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for epochs in EPOCHS:
            base = _row(mine, task, "lora-dp", epochs)
            base_wall = timing(base, epochs)[0] if base else None
            for config in _configs(mine, task, MAIN):
                row = _row(mine, task, config, epochs)
                if row is None:
                    continue
                wall, extrapolated = timing(row, epochs)
                ratio = f"{base_wall / wall:.1f}x" if base_wall else ""
                peaks = ", ".join(f"{n} {v:.0f}" for n, v in sorted(row["peak_rss_mb"].items()) if v)
                notes = []
                if extrapolated:
                    notes.append(f"extrapolated from {row['epochs_run']} measured epoch(s)")
                if row["profiling_seconds"]:
                    notes.append(f"first run also profiles the devices: {row['profiling_seconds']:.0f} s")
                if row["planned"]:
                    notes.append(_planned_note(row, wall))
                    if row["planned"]["left_out"]:
                        notes.append(f"left out: {', '.join(row['planned']['left_out'])}")
                ran = row["epochs_run"]
                quality = _quality(task, row["final"]) + (f" (after {ran})" if ran != epochs else "")
                lines.append(
                    f"| {config} | {epochs} | {wall:.0f} | {ratio} | {peaks} | {wire_megabytes(row, epochs):.1f} "
                    f"| {quality} | {'; '.join(notes)} |"
                )
    return "\n".join(lines) + compression_report(rows)


def compression_report(rows: dict[str, Any]) -> str:
    """What each gradient compression does to the data-parallel epochs over the home's links."""
    lines = []
    for task in ("classify", "lm"):
        configs = _configs(rows, task, COMPRESSION)
        if not configs:
            continue
        lines += [
            f"\n### Gradient compression over the home's links: {task}, 3 epochs\n",
            "| configuration | compression | wall (s) | training s/epoch | on the wire (MB) | validation | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for config in configs:
            row = _row(rows, task, config, 3)
            wall, extrapolated = timing(row, 3)
            epoch = sum(row["epoch_seconds"]) / len(row["epoch_seconds"])
            ran = row["epochs_run"]
            quality = _quality(task, row["final"]) + (f" (after {ran})" if ran != 3 else "")
            note = f"extrapolated from {ran} measured epoch(s)" if extrapolated else ""
            lines.append(
                f"| {config} | {row['grad_compression']} | {wall:.0f} | {epoch:.1f} | {wire_megabytes(row, 3):.1f} "
                f"| {quality} | {note} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, Any], path: Path) -> None:
    from pac.report import bars, pyplot, save

    tasks = sorted({r["task"] for r in rows.values()})
    fig, axes = pyplot().subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        configs = _configs(rows, task, MAIN)
        walls = {
            f"{epochs} epochs": [
                timing(row, epochs)[0] if (row := _row(rows, task, config, epochs)) else 0 for config in configs
            ]
            for epochs in EPOCHS
        }
        bars(ax, configs, walls, ylabel="wall time to a saved adapter (s)")
        ax.set_title(f"{task}: simulated home (desktop, laptop, phone)")
    save(fig, path)


def main() -> None:
    if "--no-cache-worker" in sys.argv:
        sys.argv.remove("--no-cache-worker")
        no_cache_worker(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=str(HERE.parent / "deploy" / "home.toml"))
    parser.add_argument("--task", choices=["classify", "lm"], default="classify")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="configurations to run (again); default: those not yet done")
    parser.add_argument("--compression", action="store_true", help="run the gradient-compression rows instead")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "end_to_end.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    shape = f"{args.train_size}+{args.val_size} articles x {args.max_length} tokens"
    if not args.report:
        for config in COMPRESSION if args.compression else MAIN:
            for epochs in sorted({EPOCHS_RUN.get(config, e) for e in EPOCHS}):
                key = f"{args.task}/{config}/{epochs}"
                if key in rows and rows[key]["shape"] == shape and not (args.only and config in args.only):
                    continue
                if args.only and config not in args.only:
                    continue
                runner = run_home if config in HOME_ARGS else run_desktop
                rows[key] = {**runner(config, args, epochs), "task": args.task, "shape": shape}
                path.write_text(json.dumps(rows, indent=2) + "\n")
    table = report(rows)
    note = (
        "End to end on a simulated home (deploy/home.toml: desktop 1.0 CPU / 8 GB, laptop 0.5 / 4 GB, phone 0.25 "
        "/ 2 GB; 100 Mbit 5 ms, the phone 20 Mbit 20 ms), all on one 2-core machine, SmolLM2-135M-Instruct on "
        "BBC News. Wall time from start to a saved adapter, every one-off cost included; `vs lora-dp` is LoRA "
        "data-parallel's wall time over this row's. Regenerate: `python benchmarks/end_to_end.py --task classify` "
        "and `--task lm` (root), `--compression` for the compression rows, `--report` for the tables alone. The "
        "compression rows ran after torch threads began to follow each device's CPU quota "
        "(threads_under_quota.md), the main tables before it with 2 threads on every device: compare rows within "
        "a table, not across tables.\n"
    )
    (RESULTS / "end_to_end.md").write_text(note + table)
    plot(rows, RESULTS / "end_to_end.png")
    print(table)


if __name__ == "__main__":
    main()
