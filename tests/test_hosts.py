"""Hosts files for `pac-launch --peers` and the ssh command line that starts a peer agent."""

from __future__ import annotations

import shlex

import pytest

from launcher.ssh import describe_ssh, ssh_command
from pac.errors import PacError
from pac.net.hosts import DEFAULT_PEER_PORT, HostsFileError, PeerHost, parse_hosts, parse_size, read_hosts

PAC = "/home/me/.venv/bin/pac"
GOOD = f"""\
# the home cluster
192.168.1.20  name=desktop threads=8      # the big box

laptop.local:29601 max_mem=6g user=me pac={PAC} workdir=/srv/pac
   [fe80::2]:29700
::1
"""


def test_good_file_with_comments_blank_lines_ipv6_and_defaults():
    desktop, laptop, v6, loopback = parse_hosts(GOOD)
    assert desktop == PeerHost("192.168.1.20", DEFAULT_PEER_PORT, "desktop", threads=8)
    assert laptop == PeerHost(
        "laptop.local", 29601, "laptop.local-29601", max_mem=6 << 30, user="me", pac=PAC, workdir="/srv/pac"
    )
    assert (v6.host, v6.port, v6.name) == ("fe80::2", 29700, "fe80-2-29700")
    assert (loopback.host, loopback.port, loopback.name) == ("::1", 29600, "1-29600")
    assert loopback.pac == "pac" and loopback.max_mem is None and loopback.user is None and loopback.workdir is None


def test_endpoint_brackets_ipv6_and_describe_reads_back():
    peers = parse_hosts(GOOD)
    assert [p.endpoint for p in peers] == [
        "tcp://192.168.1.20:29600",
        "tcp://laptop.local:29601",
        "tcp://[fe80::2]:29700",
        "tcp://[::1]:29600",
    ]
    assert peers[1].describe() == (
        f"laptop.local:29601 name=laptop.local-29601 max_mem=6GiB user=me pac={PAC} workdir=/srv/pac"
    )
    assert parse_hosts("\n".join(p.describe() for p in peers)) == peers


def test_read_hosts_reads_a_file_with_a_bom(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text("\ufeffpi.local name=pi max_mem=512m\r\n", encoding="utf-8")
    assert read_hosts(path) == [PeerHost("pi.local", 29600, "pi", max_mem=512 << 20)]


def test_read_hosts_missing_file_says_so(tmp_path):
    with pytest.raises(HostsFileError, match="no such hosts file") as info:
        read_hosts(tmp_path / "nope.txt")
    assert isinstance(info.value, PacError) and "one peer per line" in str(info.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512m", 512 << 20),
        ("4g", 4 << 30),
        ("4GiB", 4 << 30),
        ("4096MB", 4 << 30),
        ("1.5g", 3 << 29),
        ("64k", 64 << 10),
        ("1t", 1 << 40),
        ("123456", 123456),
        ("100b", 100),
        (" 2 GB ", 2 << 30),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "unit"), ("4q", "unit"), ("g", "unit"), ("-1g", "unit"), ("1.5", "whole"), ("0", "above"), ("0g", "above")],
)
def test_parse_size_rejects(text, why):
    with pytest.raises(ValueError, match=why):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "lineno", "problem", "hint"),
    [
        ("a\nhost:http", 2, "bad port 'http'", "from 1 to 65535"),
        ("host:0", 1, "bad port '0'", "from 1 to 65535"),
        ("host:65536", 1, "bad port '65536'", "or omit it for 29600"),
        ("host:", 1, "bad port ''", "from 1 to 65535"),
        ("host colour=red", 1, "unknown key 'colour'", "known keys are name, max_mem, threads, user, pac, workdir"),
        ("host max-mem=4g", 1, "unknown key 'max-mem'", "did you mean max_mem="),
        ("# peers\n\nhost name=", 3, "name= has no value", "write name=VALUE"),
        ("host threads=2 threads=4", 1, "threads= is given twice", "keep one threads= per line"),
        ("host max_mem=lots", 1, "max_mem=lots is not a size", "e.g. max_mem=4g"),
        ("host threads=0", 1, "threads=0 is not a positive whole number", "e.g. threads=4"),
        ("host threads=two", 1, "threads=two is not a positive whole number", "e.g. threads=4"),
        ("a\n\nb\na:29600  # again", 4, "peer a:29600 is already listed on line 1", "list each peer once"),
        ("[::1]:29600\n0:0::1", 2, "peer [::1]:29600 is already listed on line 1", "list each peer once"),
        ("a name=pi\nb name=pi", 2, "name 'pi' is already used by line 1", "distinct name="),
        ("a:1 name=b-1\nb:1", 2, "name 'b-1' is already used by line 1", "distinct name="),
        ("host threads", 1, "field 'threads' has no '='", "key=value"),
        ("host other-host", 1, "field 'other-host' has no '='", "one peer per line"),
        ("name=pi", 1, "must start with the peer's host", "write the host first"),
        ("tcp://host:29600", 1, "is a URL", "without the scheme"),
        ("me@host", 1, "mixes a user into the host", "add user=me"),
        ("[::1", 1, "malformed bracketed address", "[addr]:port"),
        ("::1:29600", 1, "not a valid IPv6 address", "[addr]:port"),
        ("-oProxyCommand=x", 1, "must start with the peer's host", "write the host first"),
        ("-host", 1, "not a hostname or IP address", "laptop.local"),
        ("host name=-x", 1, "not a plain word", "name=laptop"),
        ("host user=a@b", 1, "not a valid ssh user name", "user=me"),
    ],
)
def test_bad_lines_name_the_line_and_say_what_to_write(text, lineno, problem, hint):
    with pytest.raises(HostsFileError) as info:
        parse_hosts(text, source="hosts.txt")
    message = str(info.value)
    bad_line = text.splitlines()[lineno - 1].strip()
    assert message.startswith(f"hosts.txt:{lineno}: {bad_line!r}: ")
    assert problem in message and hint in message


@pytest.mark.parametrize("text", ["", "\n  \n", "# only comments\n   # here\n"])
def test_a_file_without_peers_is_an_error(text):
    with pytest.raises(HostsFileError, match="hosts.txt: no peers listed; add one line per peer"):
        parse_hosts(text, source="hosts.txt")


def test_ssh_command_targets_user_at_host_and_starts_the_agent():
    peer = PeerHost("laptop.local", 29601, "laptop", max_mem=6 << 30, threads=4, user="me")
    argv = ssh_command(peer, extra_options=["-p", "2222"])
    assert argv[:3] == ["ssh", "-p", "2222"]  # first, so they win over pac's own -o defaults
    assert "BatchMode=yes" in argv and "-T" in argv
    assert argv[-3:-1] == ["--", "me@laptop.local"]
    assert "29601" not in argv[:-1]  # the peer's port is the agent's, never ssh's
    remote = shlex.split(argv[-1])
    assert remote[:4] == ["read", "-r", "PAC_JOIN_TOKEN", "&&"]
    agent = remote[remote.index("exec") + 1 :]
    assert (
        shlex.join(agent)
        == "pac peer --listen tcp://0.0.0.0:29601 --name laptop --once --max-mem 6442450944 --threads 4"
    )


def test_ssh_command_quotes_workdir_and_executable_and_keeps_the_token_off_argv():
    token = "s3cret-join-token"
    peer = PeerHost("::1", 29600, "me; rm -rf ~", pac="~/venv with space/bin/pac", workdir="/srv/my pac dir")
    argv = ssh_command(peer, ssh="/usr/bin/ssh")
    assert argv[0] == "/usr/bin/ssh" and argv[-2] == "::1"
    assert all(token not in arg for arg in argv)
    remote = argv[-1]
    assert "read -r PAC_JOIN_TOKEN && export PAC_JOIN_TOKEN && exec " in remote
    words = shlex.split(remote)
    assert words[:3] == ["cd", "/srv/my pac dir", "&&"]
    # `~/` stays unquoted so the remote shell expands it; the rest of the path is one word.
    assert "~/'venv with space/bin/pac' peer" in remote and "~/venv with space/bin/pac" in words
    assert words[-5:] == ["--listen", "tcp://[::]:29600", "--name", "me; rm -rf ~", "--once"]


def test_describe_ssh_is_the_command_as_one_shell_line():
    peer = PeerHost("pi.local", 29600, "pi", workdir="~/pac")
    line = describe_ssh(peer, extra_options=["-i", "/keys/my key"])
    assert shlex.split(line) == ssh_command(peer, extra_options=["-i", "/keys/my key"])
    assert shlex.split(line)[-1].startswith("cd ~/pac && read -r PAC_JOIN_TOKEN")


def test_one_peer_under_two_spellings_is_refused_when_the_file_is_read(tmp_path):
    """`127.0.0.1:29802` and `localhost:29802` reach one agent: the coordinator would wait for a peer that
    never answers, so the file is refused, naming both lines; distinct ports on one host stay fine."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("127.0.0.1:29802 name=a\nlocalhost:29802 name=b\n")
    with pytest.raises(
        HostsFileError, match=r"127\.0\.0\.1:29802 \(name=a\) and localhost:29802 \(name=b\) are the same"
    ):
        read_hosts(hosts)
    hosts.write_text("127.0.0.1:29802 name=a\nlocalhost:29803 name=b\nno-such-host.invalid name=c\n")
    assert [p.name for p in read_hosts(hosts)] == ["a", "b", "c"]
