"""The ssh command line with which `pac-launch --ssh` starts a peer agent on a host of the hosts file."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from pac.net.hosts import PeerHost

# BatchMode: fail instead of prompting for a password (stdin carries the join token, not keystrokes).
# ServerAliveInterval: notice within seconds when a peer drops off the network.
_DEFAULT_OPTIONS = ("-o", "BatchMode=yes", "-o", "ServerAliveInterval=5")


def ssh_command(peer: PeerHost, *, ssh: str = "ssh", extra_options: Sequence[str] = ()) -> list[str]:
    """The argv that starts `pac peer` on `peer.host` over ssh, listening on `peer.port`.

    The join token never appears on a command line, where `ps` on either machine would show it: the remote
    command first runs `read -r PAC_JOIN_TOKEN`, so the launcher must write the token plus a newline to the
    ssh process's stdin, then may close it. The remote login shell must be POSIX-like (sh, bash, zsh).

    `peer.port` is the agent's port, not ssh's: give the ssh port, identity file and the like through
    `extra_options` (e.g. `["-p", "2222"]`) or ~/.ssh/config. They come before pac's defaults because ssh keeps
    the first value it is given for an option, so they can override those defaults too.
    """
    target = f"{peer.user}@{peer.host}" if peer.user else peer.host
    # -T: no pseudo-terminal even if ~/.ssh/config asks for one, which would echo the token back.
    # "--" ends the options so the target can never be read as one.
    return [ssh, *extra_options, "-T", *_DEFAULT_OPTIONS, "--", target, _remote_command(peer)]


def describe_ssh(peer: PeerHost, *, ssh: str = "ssh", extra_options: Sequence[str] = ()) -> str:
    """`ssh_command` as one printable, copy-pasteable shell line (for `--dry-run` style output)."""
    return shlex.join(ssh_command(peer, ssh=ssh, extra_options=extra_options))


def _remote_command(peer: PeerHost) -> str:
    """The shell string ssh hands the remote login shell: read the token from stdin, then exec the agent."""
    # An IPv6 peer is reached over IPv6, so its agent must listen on the IPv6 wildcard.
    listen = f"tcp://[::]:{peer.port}" if ":" in peer.host else f"tcp://0.0.0.0:{peer.port}"
    args = ["peer", "--listen", listen, "--name", peer.name, "--once"]
    if peer.max_mem is not None:
        args += ["--max-mem", str(peer.max_mem)]
    if peer.threads is not None:
        args += ["--threads", str(peer.threads)]
    steps = ["read -r PAC_JOIN_TOKEN", "export PAC_JOIN_TOKEN", f"exec {_quote_path(peer.pac)} {shlex.join(args)}"]
    if peer.workdir is not None:
        steps.insert(0, f"cd {_quote_path(peer.workdir)}")
    return " && ".join(steps)


def _quote_path(path: str) -> str:
    """Shell-quote a remote path but leave a leading `~` or `~/` unquoted so the remote shell expands it."""
    if path == "~":
        return path
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
