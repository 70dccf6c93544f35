"""Bad input on the command line is one clear line and a usage exit, never a traceback or a silent misreading: huge
and negative counts, non-finite seconds, ids past what the broker accepts, and the fix doctor gives for a socket this
user may not connect to. No broker runs: a socket nobody listens on would say connection-error instead."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from xskbroker.broker import doctor
from xskbroker.broker.cli import build_parser, main


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of a command line argparse refuses (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", [
    ["request", "-i", "eth1"],
    ["exec", "-i", "eth1"],
    ["qmp-attach", "--qmp", "/nonexistent/q.sock", "--id", "n0", "-i", "eth1"],
])
def test_a_queue_count_past_a_grant_s_most_is_a_usage_error(command: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`request -q 999999999999999` built a range of that many queue ids before the codec could refuse it, and ended
    in a MemoryError traceback."""
    err = usage_error([*command, "--queues", "999999999999999"], capsys)
    assert "argument --queues/-q: must be at most 126 (the most one grant holds), not 999999999999999" in err
    assert build_parser().parse_args([*command, "--queues", "126"]).queues == 126


@pytest.mark.parametrize("value, error", [
    ("-1", "must be 0 seconds or more, not -1"),
    ("nan", "must be a finite number of seconds, not nan"),
    ("inf", "must be a finite number of seconds, not inf"),
    ("1e999", "must be a finite number of seconds, not 1e999"),
    ("soon", "'soon' is not a number of seconds"),
])
def test_request_hold_is_a_finite_number_of_seconds(value: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--hold inf` got a grant and then raised OverflowError out of time.sleep; -1 and nan were taken as 0."""
    assert f"argument --hold: {error}" in usage_error(["request", "-i", "eth1", "--hold", value], capsys)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
@pytest.mark.parametrize("command", [
    ["qmp-attach", "--qmp", "/nonexistent/q.sock", "--id", "n0", "-i", "eth1", "-q", "1"],
    ["qmp-detach", "--qmp", "/nonexistent/q.sock", "--id", "n0"],
])
def test_qmp_timeouts_are_positive_and_finite(command: list[str], value: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A negative or nan --timeout ended in socket.settimeout's ValueError traceback."""
    assert "argument --timeout: must be" in usage_error([*command, "--timeout", value], capsys)


def test_explain_refuses_a_queue_id_the_broker_refuses_at_decode(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A rule with no `queues` made explain ALLOW queue 70000, which the broker refuses as bad-request."""
    err = usage_error(["policy", "explain", "--policy", str(tmp_path / "p.toml"), "--user", "0",
                       "--interface", "eth1", "--queue", "70000"], capsys)
    assert "argument --queue: queue ids are 0 to 65535 (the broker refuses others), not 70000" in err


@pytest.mark.parametrize("argv, error", [
    (["--user", "99999999999999999999"], "uid 99999999999999999999 is out of range: uids are 0 to 4294967294"),
    (["--user", "0", "--group", "4294967295"], "gid 4294967295 is out of range: gids are 0 to 4294967294"),
])
def test_explain_refuses_ids_no_peer_can_have(argv: list[str], error: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[[allow]]\nname = "any"\nusers = ["*"]\ngroups = ["*"]\ninterfaces = ["eth1"]\n')
    policy.chmod(0o644)
    assert main(["policy", "explain", "--policy", str(policy), *argv, "-i", "eth1", "--queue", "0"]) == 2
    assert f"xskbroker policy explain: {error}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, error", [
    (["--packets", "-5"], "argument --packets: must be between 1 and 4294967294, not -5"),
    (["--packets", "0"], "argument --packets: must be between 1 and 4294967294, not 0"),
    (["--uid", "-1"], "argument --uid: must be between 0 and 4294967294, not -1"),
    (["--umem", "-1"], "argument --umem: bad size '-1'"),
])
def test_demo_options_are_checked_before_anything_is_made(argv: list[str], error: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --packets -5` made a namespace and a broker, then waited 10 s for a consumer that never answered."""
    assert error in usage_error(["demo", *argv], capsys)


@pytest.mark.parametrize("umem, message", [
    ("1", "umem.size must be between 4096 and 4294967296, not 1"),
    ("5000", "umem.size must be a multiple of 4096 (the page size)"),
])
def test_demo_refuses_a_umem_the_broker_would_refuse(umem: str, message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --umem 1` ended in the consumer's BrokerError traceback, after a namespace and a broker were made."""
    assert main(["demo", "--umem", umem]) == 2
    err = capsys.readouterr().err
    assert err == f"xskbroker demo: --umem {umem}: {message}\n"


def test_doctor_does_not_send_a_user_to_a_group_the_socket_s_mode_shuts_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0600 socket was met with "add the user to group root": joining the group gets a user nowhere when the mode
    gives the group no write permission (connect(2) needs it)."""
    path = str(tmp_path / "b.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(path)
        s.listen()
        os.chmod(path, 0o600)

        def refused(_path: str) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(doctor, "_hello", refused)
        closed, _ = doctor.check_socket(path)
        assert closed.status == doctor.DEGRADED and "may not connect" in closed.found
        assert "add the user to group" not in closed.fix.split(": ", 1)[0]
        assert "--socket-mode 0660" in closed.fix and "SocketMode=0660" in closed.fix
        os.chmod(path, 0o660)
        monkeypatch.setattr(os, "getgroups", lambda: [])
        monkeypatch.setattr(os, "getegid", lambda: os.stat(path).st_gid + 1)
        group_may, _ = doctor.check_socket(path)
        assert group_may.fix.startswith("add the user to group ")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_every_command_s_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["serve"], ["request"], ["exec"], ["revoke"], ["status"], ["qmp-attach"], ["qmp-detach"],
                    ["policy"], ["policy", "check"], ["policy", "explain"], ["doctor"], ["demo"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        out = capsys.readouterr().out
        assert "example" in out and f"xskbroker {command[0]}" in out.split("example", 1)[1], command


def test_doctor_knows_the_broker_s_per_queue_program_for_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once an interface had a map grant, the broker's per-queue program (queue_prog) is attached there; doctor
    called it "another XDP program", `unusable`, and told the admin to detach it (which the broker's bpf_link refuses,
    and which would stop every lease on the interface)."""
    from types import SimpleNamespace

    from xskbroker.broker import bpf, doctor_probes, queue_prog, xdp_prog

    def not_libxdp(*_args: object) -> None:
        raise xdp_prog.ForeignProgram(17, "rv8v0 already has XDP program 'xskb_queues' (id 68, native mode)")

    programs = {68: (queue_prog.PROG_NAME, [7, 8]), 69: ("someone_elses", [9])}
    maps = {7: queue_prog.SHARED_NAME, 8: queue_prog.OUTER_NAME, 9: queue_prog.OUTER_NAME}
    opened: list[int] = []

    def fd_of(table: dict[int, object]) -> object:
        def open_(obj_id: int) -> int:
            assert obj_id in table
            fd = os.open(os.devnull, os.O_RDONLY)
            opened.append(fd)
            ids[fd] = obj_id
            return fd
        return open_

    ids: dict[int, int] = {}
    monkeypatch.setattr(xdp_prog, "attached", lambda ifindex: ({3: 68, 4: 69}[ifindex], "native"))
    monkeypatch.setattr(xdp_prog, "adopt", not_libxdp)
    monkeypatch.setattr(bpf, "prog_fd_by_id", fd_of(programs))
    monkeypatch.setattr(bpf, "map_fd_by_id", fd_of(maps))
    monkeypatch.setattr(bpf, "prog_info", lambda fd: (SimpleNamespace(name=programs[ids[fd]][0].encode()),
                                                      programs[ids[fd]][1]))
    monkeypatch.setattr(bpf, "map_info", lambda fd: SimpleNamespace(name=maps[ids[fd]].encode(), max_entries=2))

    ours = doctor_probes.attached(3, "rv8v0")
    assert ours.owner == "ours" and ours.prog_id == 68 and "per-queue" in ours.program
    check = doctor._program_check(3, "rv8v0", named=True)
    assert check.status == doctor.OK and "per-queue" in check.found and not check.fix
    other = doctor_probes.attached(4, "rv8v1")  # another program, even with a map of that name, stays foreign
    assert other.owner == "foreign"
    assert doctor._program_check(4, "rv8v1", named=True).status == doctor.UNUSABLE
    for fd in opened:  # every fd the probe opened, it closed
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("name", ["", "eth0:1", "a" * 16, "a b"])
def test_doctor_refuses_a_name_no_interface_can_have(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`doctor --interface ''` ran every check and reported a check named `iface.` with "no interface named ''"."""
    assert f"argument --interface/-i: {name!r} is not a valid interface name" in usage_error(
        ["doctor", "--interface", name], capsys)
