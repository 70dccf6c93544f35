"""`xskbroker request`, `exec` and `revoke` refuse a malformed request themselves, before any broker is asked: a
count or queue id as a usage error naming the option, and what the broker's codec would refuse (ring sizes, UMEM
size, interface names) in the codec's words, with exit status 2 and nothing connected. The socket named is one
nobody listens on, so an answer that needed the broker would say connection-error instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xskbroker.broker.cli import build_parser, main


@pytest.mark.parametrize("argv, error", [
    (["--queues", "0"], "argument --queues/-q: must be at least 1"),
    (["--queues", "-3"], "argument --queues/-q: must be at least 1"),
    (["--queues", "two"], "argument --queues/-q: 'two' is not an integer"),
    (["--start-queue", "-1"], "argument --start-queue: must be 0 or more"),
])
@pytest.mark.parametrize("command", ["request", "exec"])
def test_counts_and_queue_ids_are_usage_errors(command: str, argv: list[str], error: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tail = ["--", "true"] if command == "exec" else []
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "-i", "eth1", *argv, *tail])
    assert exc.value.code == 2 and error in capsys.readouterr().err


def test_a_ring_size_that_is_not_a_power_of_two_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["request", "-i", "eth1", "--ring-size", "1000"])
    assert exc.value.code == 2
    assert "argument --ring-size: must be a power of two (e.g. 2048), not 1000" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ring-size", "1048576"], "rings.fill must be between 1 and 65536, not 1048576"),
    (["--umem", "5000"], "umem.size must be a multiple of 4096 (the page size)"),
    (["--queues", "2", "--start-queue", "65535"], "queue ids must be integers between 0 and 65535"),
    (["-i", "eth0:1"], "'eth0:1' is not a valid interface name"),
])
def test_a_request_the_broker_would_refuse_is_refused_without_it(argv: list[str], message: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    nobody = str(tmp_path / "no-broker.sock")
    assert main(["request", "-i", "eth1", "--socket", nobody, *argv]) == 2
    assert f"xskbroker: bad-request: {message}" in capsys.readouterr().err
    assert main(["request", "-i", "eth1", "--socket", nobody, "--json", *argv]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["error"]["code"] == "bad-request" and message in out["error"]["message"]


def test_exec_refuses_a_malformed_grant_without_the_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nobody = str(tmp_path / "no-broker.sock")
    assert main(["exec", "-i", "eth1", "--umem", "3", "--socket", nobody, "--", "true"]) == 2
    assert "xskbroker: bad-request: umem.size must be between 4096" in capsys.readouterr().err


def test_revoke_refuses_a_bad_queue_or_interface_without_the_broker(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    nobody = str(tmp_path / "no-broker.sock")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["revoke", "-i", "eth1", "--queue", "-1"])
    assert exc.value.code == 2 and "argument --queue: must be 0 or more" in capsys.readouterr().err
    assert main(["revoke", "-i", "eth0:1", "--socket", nobody]) == 2
    assert "xskbroker: bad-request: 'eth0:1' is not a valid interface name" in capsys.readouterr().err
    assert main(["revoke", "-i", "eth1", "--queue", "70000", "--socket", nobody, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["message"] == "queue must be between 0 and 65535, not 70000"
    assert main(["revoke", "--lease", "L1", "--socket", nobody]) == 1  # well formed: sent, to nobody
    assert "connection-error" in capsys.readouterr().err


def test_request_on_a_weakly_ordered_cpu_says_why_and_asks_for_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The rings need x86's memory order: on another CPU the command refuses before any grant (it used to end in a
    traceback, after a grant it could not map)."""
    nobody = str(tmp_path / "no-broker.sock")  # asked, it would say connection-error
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert main(["request", "-i", "eth1", "--socket", nobody]) == 1
    err = capsys.readouterr().err
    assert "xskbroker: unsupported-machine: the AF_XDP rings" in err and "aarch64" in err
    assert main(["request", "-i", "eth1", "--socket", nobody, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "unsupported-machine"


def test_a_well_formed_request_goes_to_the_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The check refuses only what the codec does: a good request is sent, here to no broker at all."""
    nobody = str(tmp_path / "no-broker.sock")
    assert main(["request", "-i", "eth1", "--queues", "2", "--start-queue", "65534", "--socket", nobody]) == 1
    assert "connection-error: cannot reach the broker" in capsys.readouterr().err
    assert main(["exec", "-i", "eth1", "--kind", "map", "--socket", nobody, "--", "true"]) == 1
    assert "connection-error" in capsys.readouterr().err
