"""`pac-launch`: start or reach the peers of a home cluster and run the coordinator.

The collaborative runtime (peers over ZeroMQ, phase 1 pipelined across devices, phase 2
data-parallel) is the next milestone; until it lands this command says so plainly and points at
the single-device `pac train`, which runs the same two phases on this machine.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pac-launch",
        description="Run pac across the devices of a home cluster (coming with the collaborative runtime). "
        "Today, train on one device with `pac train` (see `pac train --help`).",
    )
    parser.add_argument("--peers", help="hosts file: one peer per line, host[:port] [key=value ...]")
    parser.add_argument("--local", type=int, metavar="N", help="start N peer processes on this machine")
    parser.parse_known_args(argv)
    print(
        "pac-launch: multi-device runs are not available in this version of pac yet.\n"
        "Train on this device with:  pac train   (the bundled demo), or see  pac train --help",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
