"""`pac-launch`: start or reach the peers of a home cluster and run the coordinator."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from pac.runtime.run_view import RunView

from pac.errors import PacError
from pac.plan.costs import GRADIENT_COMPRESSIONS

DESCRIPTION = """\
Train parallel adapters across the devices you own: phase 1 (the model's forward pass over your
data) is pipelined across the devices, each holding only its layers; phase 2 trains the side network
data-parallel. Your data stays on this machine and your home network.

where the peers come from:
  pac-launch                          the bundled demo on 3 local peer processes (same as --local 3)
  pac-launch --local N [options]      N peer processes on this machine, over loopback
  pac-launch --peers hosts.txt        peers already running `pac peer` on the hosts listed
  pac-launch --peers hosts.txt --ssh  start `pac peer` on each host over ssh first
  pac-launch --discover               the peers running `pac peer` on this network, found over mDNS

hosts file: one peer per line, `host[:port] [key=value ...]` (port 29600 by default), keys
  name= (shown in the logs), max_mem= (e.g. 4g: layers are split in proportion), threads=,
  and for --ssh: user=, pac= (path of the pac executable there), workdir=.  # starts a comment.

join token: every peer must be given the same secret in $PAC_JOIN_TOKEN; peers without it are
  refused. --local makes one up for its own peers.

All `pac train` options apply (--model, --data, --task, --epochs, ...); the adapter, metrics and
each peer's log end up in --out.

examples:
  pac-launch --local 3 --epochs 2 --out runs/cluster
  pac-launch --peers hosts.txt --mode replicated --data notes.jsonl --task lm
  pac-launch --peers hosts.txt --stages 0-9,10-19,20-29
  pac plan --peers hosts.txt --data notes.jsonl --task lm     the plan alone
"""


def build_parser() -> argparse.ArgumentParser:
    from pac.cli import add_train_arguments, number

    parser = argparse.ArgumentParser(
        prog="pac-launch", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_argument_group("peers")
    source = where.add_mutually_exclusive_group()
    source.add_argument("--peers", metavar="HOSTS", help="hosts file: one peer per line, host[:port] [key=value ...]")
    source.add_argument(
        "--local", type=number(int, minimum=1), metavar="N", help="start N peer processes on this machine"
    )
    source.add_argument(
        "--discover",
        action="store_true",
        help="find the peers running `pac peer` on this network (mDNS) instead of listing them in a hosts file; "
        "those that fail the encrypted handshake (another join token) are listed as refused",
    )
    where.add_argument(
        "--wait", type=number(float, above=0), default=3.0, metavar="S", help="with --discover: listen S seconds (3)"
    )
    where.add_argument(
        "--take",
        metavar="NAMES",
        help="with --discover: use only these peers (comma-separated names; default: ask on a terminal, else all)",
    )
    where.add_argument("--write-hosts", metavar="FILE", help="with --discover: write the hosts file of the peers used")
    where.add_argument("--ssh", action="store_true", help="with --peers: start `pac peer` on every host over ssh")
    where.add_argument("--ssh-option", action="append", default=[], help="extra ssh option, e.g. -p2222 (repeatable)")
    where.add_argument("--dry-run", action="store_true", help="with --ssh: print the ssh commands and stop")
    plan = parser.add_argument_group("placement")
    plan.add_argument(
        "--mode",
        choices=["shuffle", "side-pipeline", "replicated", "pipeline"],
        help="shuffle: phase 1 pipelined over the peers' layer ranges, taps streamed to the peer training each "
        "sample, phase 2 data-parallel; side-pipeline: taps stay where computed and phase 2 runs the side network "
        "as a pipeline too (no cache traffic); replicated: every peer runs the whole model on its own samples (no "
        "phase-1 traffic, but every peer holds all layers; LoRA, DoRA, TaskEdge and full fine-tuning run so); "
        "pipeline: the model itself pipelined over the peers' layer ranges, forward passes only, and only hidden "
        "states and 2q losses on the wire (--method zo, its default). Default: planned — every peer measures itself "
        "for this run, the links are timed, and the mode, layer ranges and peers with the least predicted time are "
        "chosen (shuffle when --stages is given)",
    )
    plan.add_argument(
        "--stages",
        help="layers per peer in rank order, e.g. 0-9,10-19,20-29; a range repeated by the next peer is one stage "
        "that both run, taking turns at its micro-batches (shuffle mode): 0-19,0-19,20-29 (default: planned)",
    )
    plan.add_argument(
        "--shares",
        type=_shares,
        help="samples each peer caches and trains, as whole-number weights in rank order, e.g. 4,2,1 (shuffle and "
        "replicated; default: planned, or equal). A share of 0 (shuffle) runs that peer's layers in phase 1 only: "
        "it trains nothing, and phase 2 goes on without it, as for a `pac peer --phase1-only`",
    )
    plan.add_argument(
        "--plan-only",
        action="store_true",
        help="print the plan (and why it beats the other modes) and stop; same as `pac plan`",
    )
    plan.add_argument(
        "--refresh-profiles",
        action="store_true",
        help="measure every peer again instead of reading the profile it keeps for this model and run",
    )
    plan.add_argument(
        "--schedule",
        choices=["gpipe", "1f1b"],
        default="gpipe",
        help="side-pipeline's phase 2: gpipe runs every micro-batch's forward, then the backwards; 1f1b starts "
        "each micro-batch's backward as early as it can, so a stage holds fewer micro-batches' activations "
        "(default gpipe)",
    )
    plan.add_argument(
        "--micro-batches",
        type=number(int, minimum=1),
        default=2,
        metavar="N",
        help="side-pipeline and pipeline: micro-batches each batch is cut into, so that stages work at once "
        "(default 2)",
    )
    plan.add_argument(
        "--grad-compression",
        choices=GRADIENT_COMPRESSIONS,
        help="how the data-parallel modes send gradients: fp16 (torch's DDP hook, scaled before the cast) "
        "halves the bytes of every all-reduce. Default: planned (fp16 where it is predicted at least 5%% faster), "
        "else none",
    )
    plan.add_argument(
        "--encrypt-gradients",
        action="store_true",
        help="send phase 2's gradients, losses and starting weights over the CURVE-encrypted data plane instead "
        "of torch.distributed's gloo, which sends them in clear (README: What is encrypted); the shuffle and "
        "replicated modes only. Costs little per epoch: benchmarks/results/encrypted_allreduce.md",
    )
    plan.add_argument(
        "--data-plane",
        choices=["zmq", "torch"],
        default="zmq",
        help="phase-1 transport: ZeroMQ (default) or torch.distributed send/recv",
    )
    plan.add_argument(
        "--min-peers",
        type=number(int, minimum=1),
        metavar="N",
        help="start once N peers have joined when --join-timeout passes, rather than fail; the others, and a lost "
        "peer that comes back, are planned in when they answer, at the start of training or at its next "
        "checkpoint (default: wait for every peer)",
    )
    plan.add_argument(
        "--join-timeout", type=number(float, above=0), default=120.0, help="seconds to wait for peers (default 120)"
    )
    plan.add_argument(
        "--peer-timeout",
        type=number(float, above=0),
        default=60.0,
        help="seconds of silence before a peer counts as lost (default 60)",
    )
    view = parser.add_argument_group("watching the run")
    view.add_argument(
        "--dashboard",
        metavar="[HOST:]PORT",
        help="serve a live page of the run at http://HOST:PORT/ (127.0.0.1 unless a host is given; port 0 takes a "
        "free one): the peers' table, the loss curves as they grow, the plan and the log; no internet needed",
    )
    view.add_argument(
        "--plain",
        action="store_true",
        help="log lines even on a terminal, instead of the live table redrawn in place (output that is not a "
        "terminal, such as a file or CI, always gets lines)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the coordinator is doing")
    add_train_arguments(parser, launch=True)
    parser.set_defaults(out="runs/cluster")
    return parser


def _shares(text: str) -> tuple[int, ...]:
    try:
        shares = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not whole numbers separated by commas, like 4,2,1") from None
    if any(s < 0 for s in shares) or not any(shares):
        raise argparse.ArgumentTypeError(f"{text!r}: shares are 0 or more, and some peer's is at least 1")
    return shares


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except PacError as exc:  # a plug-in method ($PAC_METHODS) that cannot load
        print(f"pac-launch: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.resume is None:
            return _launch(args, argv)
        return _resume(Path(args.resume), [a for a in argv if a not in ("-v", "--verbose")])
    except PacError as exc:
        print(f"pac-launch: error: {exc}", file=sys.stderr)
        return 2


def _resume(run_dir: Path, given: list[str]) -> int:
    """`--resume RUN_DIR`: the recorded command again, told how the earlier attempt ended."""
    from pac.runtime.launch_record import how_it_ended, read_launch_record

    if given not in (["--resume", str(run_dir)], [f"--resume={run_dir}"]):
        raise PacError("--resume takes the run's options from RUN_DIR/launch.json: give no other options (-v aside)")
    record = read_launch_record(run_dir)
    print(f"[pac-launch] {how_it_ended(record)}", flush=True)
    if record["state"] == "done":
        print(f"[pac-launch] nothing to resume: the adapter is in {run_dir}")
        return 0
    print("[pac-launch] resuming: finished cache shards and the last checkpoint are reused", flush=True)
    args = build_parser().parse_args(record["argv"])
    args.out = str(run_dir)  # where the record was found, even if the directory moved
    return _launch(args, record["argv"], record)


def _launch(args: argparse.Namespace, argv: list[str], earlier: dict | None = None) -> int:
    """The run `args` describe (`argv`, as recorded in launch.json; `earlier`: the record of a run resumed)."""
    view = _views(args)
    try:
        return _launch_with(args, argv, earlier, view)
    finally:
        view.close()


def _launch_with(args: argparse.Namespace, argv: list[str], earlier: dict | None, view: RunView) -> int:
    from launcher.local import LocalPeers
    from launcher.ssh import describe_ssh
    from pac.cli import print_epochs, train_options
    from pac.net.auth import TOKEN_ENV, new_token, token_from_env
    from pac.net.hosts import parse_hosts, read_hosts
    from pac.runconfig import ClusterOptions
    from pac.runtime.coordinator import Coordinator, RunFailed
    from pac.runtime.launch_record import LaunchRecord

    if args.ssh and not args.peers:
        raise PacError("--ssh starts the peers listed in a hosts file: add --peers hosts.txt")
    settings = ClusterOptions(
        mode=args.mode,
        stages=args.stages,
        data_plane=args.data_plane,
        schedule=args.schedule,
        micro_batches=args.micro_batches,
        shares=args.shares,
        grad_compression=args.grad_compression,
        encrypt_gradients=args.encrypt_gradients,
        refresh_profiles=args.refresh_profiles,
        join_timeout=args.join_timeout,
        min_peers=args.min_peers,
        peer_timeout=args.peer_timeout,
    )
    options = train_options(args)
    local = None
    ssh_procs: list[subprocess.Popen] = []
    if args.discover:
        token = token_from_env()
        hosts = parse_hosts(_discovered_hosts(args, token), "<discovered>")
    elif args.peers:
        hosts = read_hosts(args.peers)
        token = token_from_env()
        if args.ssh:
            if args.dry_run:
                for host in hosts:
                    print(describe_ssh(host, extra_options=args.ssh_option))
                return 0
            ssh_procs = _start_over_ssh(hosts, token, args.ssh_option)
    else:
        count = args.local if args.local is not None else 3
        token = os.environ.get(TOKEN_ENV) or new_token()
        local = LocalPeers(count, token, Path(options.out) / "peers", once=False)  # agents: a run may re-plan
        hosts = local.start()
    grace = 15.0  # for the peers to exit after the coordinator's shutdown
    record = None if args.plan_only else LaunchRecord(Path(options.out), argv, earlier)
    try:
        started_at = psutil.Process().create_time()  # this process's start-up counts in the run's timings
        coordinator = Coordinator(hosts, token, options, settings, record=record, started_at=started_at, view=view)
        summary = coordinator.run(plan_only=args.plan_only)
        if not args.plan_only:
            print_epochs(summary["epochs"])
        return 0
    except RunFailed as exc:
        print(f"pac-launch: the run failed: {exc}", file=sys.stderr)
        return 1
    except PacError:
        # Refused before or while planning (bad data, model or --stages): peers that had not joined yet were
        # told nothing and would wait on; stop them now rather than after the grace.
        grace = 2.0
        raise
    finally:
        if local is not None:
            local.stop(grace)
        for proc in ssh_procs:
            proc.terminate()


def _views(args: argparse.Namespace) -> RunView:
    """Lines, or on a terminal the live table; and the browser page where --dashboard asks for it."""
    from launcher.dashboard import Dashboard
    from launcher.live import LiveTable
    from pac.runtime.run_view import PlainView, Views

    terminal = LiveTable() if sys.stdout.isatty() and not args.plain else PlainView(sys.stdout)
    if not args.dashboard:
        return terminal
    dashboard = Dashboard(args.dashboard)
    print(f"[pac-launch] dashboard: {dashboard.url}", flush=True)
    return Views([terminal, dashboard])


def _discovered_hosts(args: argparse.Namespace, token: str) -> str:
    """The hosts file of the peers that answer on mDNS and prove the join token, as the user picks them."""
    from pac.net.discovery import check_peer, discover

    if args.ssh:
        raise PacError("--ssh starts the peers listed in a hosts file; discovered peers already run `pac peer`")
    print(f"[pac-launch] looking for peers on this network for {args.wait:g} s (mDNS)", flush=True)
    usable, refused = [], []
    for peer in discover(args.wait):
        why = check_peer(peer, token)
        (usable if why is None else refused).append((peer, why))
    for number, (peer, _) in enumerate(usable, start=1):
        print(f"  {number}. {peer.summary()}")
    for peer, why in refused:
        print(f"  refused: {peer.summary()}: {why}")
    if not usable:
        raise PacError(
            "no peer answered with this join token: start `pac peer` on each device with the same $PAC_JOIN_TOKEN "
            "(and without --no-advertise), wait longer with --wait, or list them with --peers hosts.txt"
        )
    chosen = _choose([peer for peer, _ in usable], args.take)
    text = "".join(peer.hosts_line() + "\n" for peer in chosen)
    if args.write_hosts:
        Path(args.write_hosts).write_text(f"# found by pac-launch --discover\n{text}")
        print(f"[pac-launch] wrote {args.write_hosts}: `--peers {args.write_hosts}` uses the same peers", flush=True)
    print(f"[pac-launch] using {', '.join(peer.name for peer in chosen)}", flush=True)
    return text


def _choose(usable: list, take: str | None) -> list:
    """The peers named by --take; without it, those the user picks on a terminal, or every one."""
    if take is None and sys.stdin.isatty():
        take = input("peers to use (numbers or names, comma-separated; Enter: all): ").strip() or None
    if take is None:
        return usable
    by_key = {str(n): p for n, p in enumerate(usable, start=1)} | {p.name: p for p in usable}
    wanted = [t.strip() for t in take.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in by_key]
    if unknown:
        raise PacError(f"no discovered peer is {', '.join(unknown)}: choose among {', '.join(p.name for p in usable)}")
    chosen = []
    for key in wanted:  # in the order given, each once
        if by_key[key] not in chosen:
            chosen.append(by_key[key])
    return chosen


def _start_over_ssh(hosts, token: str, options: list[str]) -> list[subprocess.Popen]:
    """One ssh process per host, the token written to its stdin (never on a command line)."""
    from launcher.ssh import ssh_command

    procs = []
    for host in hosts:
        proc = subprocess.Popen(ssh_command(host, extra_options=options), stdin=subprocess.PIPE, text=True)
        proc.stdin.write(token + "\n")
        proc.stdin.close()
        procs.append(proc)
    return procs


if __name__ == "__main__":
    sys.exit(main())
