"""`xskbroker doctor`: the verdict from the checks, the two output forms, and the checks that need no root."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from xskbroker.broker import doctor
from xskbroker.broker.doctor import DEGRADED, OK, UNKNOWN, UNUSABLE, Check, verdict
from xskbroker.broker.doctor_cli import as_json, as_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("statuses", "expected"), [
    ([], ("ready", 0)),
    ([OK, OK], ("ready", 0)),
    ([OK, UNKNOWN], ("ready", 0)),  # what this user cannot see is no failure
    ([UNKNOWN], ("ready", 0)),
    ([OK, DEGRADED, UNKNOWN], ("degraded", 1)),
    ([DEGRADED, UNUSABLE, OK], ("unusable", 2)),
    ([UNUSABLE], ("unusable", 2)),
])
def test_the_worst_status_is_the_verdict_and_exit_code(statuses: list[str], expected: tuple[str, int]) -> None:
    assert verdict(Check(f"c{i}", s, "found") for i, s in enumerate(statuses)) == expected


def test_json_is_one_object_with_every_check_and_the_verdict() -> None:
    checks = [Check("a", OK, "fine"), Check("b", DEGRADED, "slow", "make it fast", {"n": 1})]
    out = json.loads(as_json(checks))
    assert out["verdict"] == "degraded" and out["exit"] == 1 and out["uid"] == os.getuid()
    assert out["checks"] == [{"name": "a", "status": "ok", "found": "fine", "fix": "", "facts": {}},
                             {"name": "b", "status": "degraded", "found": "slow", "fix": "make it fast",
                              "facts": {"n": 1}}]


def test_the_table_names_each_limit_with_its_fix_wrapped_to_width() -> None:
    long = "word " * 60
    checks = [Check("kernel.af_xdp", OK, "AF_XDP sockets can be made", "never shown for ok"),
              Check("memlock.consumer", DEGRADED, long.strip(), "give consumers more " + long.strip()),
              Check("bpf", UNKNOWN, "needs CAP_BPF"), Check("policy", UNUSABLE, "broken", "fix it")]
    text = as_table(checks, width=100)
    lines = text.splitlines()
    assert lines[0] == (f"xskbroker doctor: unusable (1 limit(s), 1 problem(s), 1 not visible as uid "
                        f"{os.getuid()})")
    assert all(len(line) <= 100 for line in lines), text
    assert "never shown for ok" not in text
    assert sum(line.strip().startswith("fix: ") for line in lines) == 2
    assert lines[2].split() == ["ok", "kernel.af_xdp", "AF_XDP", "sockets", "can", "be", "made"]
    assert lines[-1].startswith("unknown: this user may not look")


def test_a_ready_host_has_a_short_headline() -> None:
    assert as_table([Check("a", OK, "fine")]).splitlines()[0] == "xskbroker doctor: ready"


def test_sizes_are_read_as_an_operator_writes_them() -> None:
    assert doctor.mib(8 << 20) == "8 MiB"
    assert doctor.mib(None) == "unlimited"
    assert doctor.mib(1000) == "1000 bytes"


def test_a_check_that_breaks_is_reported_and_the_others_go_on() -> None:
    def broken() -> Check:
        raise RuntimeError("boom")

    c = doctor._guard("x", broken)
    assert c.status == UNKNOWN and "boom" in c.found


def test_the_socket_check_tells_missing_from_not_a_socket(tmp_path: Path) -> None:
    missing, broker = doctor.check_socket(str(tmp_path / "none.sock"))
    assert missing.status == DEGRADED and "no socket" in missing.found and missing.fix and broker is None
    plain = tmp_path / "plain"
    plain.write_text("")
    wrong, _ = doctor.check_socket(str(plain))
    assert wrong.status == UNUSABLE and "not a socket" in wrong.found


def test_a_stale_socket_file_is_no_broker(tmp_path: Path) -> None:
    import socket
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    c, broker = doctor.check_socket(path)
    assert c.status == DEGRADED and "nobody listens" in c.found and broker is None
    assert c.facts["mode"] == f"{stat.S_IMODE(os.stat(path).st_mode):04o}"


def test_the_policy_check_loads_the_file_as_the_broker_does(tmp_path: Path) -> None:
    assert doctor.check_policy(str(tmp_path / "absent.toml")).status == UNUSABLE
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1\n[[allow]]\nname = 'x'\nusers = \n")
    bad.chmod(0o644)
    c = doctor.check_policy(str(bad), state_dirs=())
    assert c.status == UNUSABLE and "policy check" in c.fix
    good = ROOT / "deploy" / "policy.example.toml"
    c = doctor.check_policy(str(good))
    assert c.status in (OK, UNUSABLE)  # a checkout others may write to is refused, as the broker would
    if c.status == OK:
        assert c.facts["rules"] >= 1


def test_a_broken_policy_with_a_last_good_copy_is_degraded_not_unusable(tmp_path: Path) -> None:
    from xskbroker.broker import lastgood
    from xskbroker.policy.loader import load_documents

    good = tmp_path / "policy.toml"
    good.write_text("version = 1\n[[allow]]\nname = 'x'\nusers = [65534]\ninterfaces = ['eth1']\n")
    good.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert lastgood.save(str(state), load_documents(str(good))[1])
    good.write_text("version = 1\n[[allow]]\nname = 'x'\nusers = \n")  # broken since the copy was saved
    c = doctor.check_policy(str(good), state_dirs=(str(tmp_path / "none"), str(state)))
    assert c.status == DEGRADED and "last good copy" in c.found and "policy check" in c.fix, c
    assert doctor.check_policy(str(good), state_dirs=(str(tmp_path / "none"),)).status == UNUSABLE


def test_doctor_is_a_subcommand_that_runs_without_root(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "xskbroker.broker.cli", "doctor", "--json", "--interface", "lo",
                           "--socket", str(tmp_path / "none.sock"), "--policy", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    report = json.loads(proc.stdout)
    assert proc.returncode == report["exit"] == 2  # no policy
    names = [c["name"] for c in report["checks"]]
    assert names[:2] == ["kernel.af_xdp", "kernel.bindtodevice"] and names[-2:] == ["socket", "policy"]
    assert "iface.lo.queues" in names


def test_an_unknown_interface_is_a_clear_problem(tmp_path: Path) -> None:
    checks = doctor.run_checks("xsk12d-none", str(tmp_path / "s"), str(tmp_path / "p"))
    c = next(c for c in checks if c.name == "iface.xsk12d-none")
    assert c.status == UNUSABLE and "no interface named" in c.found


def test_the_last_good_copy_of_a_broker_running_as_its_own_user_is_seen(tmp_path: Path) -> None:
    # under xskbroker.service the copy is the dynamic user's, in its 0700 RuntimeDirectory: doctor (root) still
    # sees the broker starts with it
    from xskbroker.broker import lastgood
    from xskbroker.policy.loader import load_documents

    if os.geteuid() != 0:
        pytest.skip("needs root to give the copy to another uid")
    good = tmp_path / "policy.toml"
    good.write_text("version = 1\n[[allow]]\nname = 'x'\nusers = [65534]\ninterfaces = ['eth1']\n")
    good.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    copy = lastgood.save(str(state), load_documents(str(good))[1])
    for p in (str(state), copy):
        os.chown(p, 61234, 61234)
    good.write_text("version = 1\n[[allow]]\nname = 'x'\nusers = \n")
    c = doctor.check_policy(str(good), state_dirs=(str(state),))
    assert c.status == DEGRADED and "last good copy" in c.found, c
    os.chown(copy, 61235, 61235)  # not the broker's (the directory's owner): not believed
    assert doctor.check_policy(str(good), state_dirs=(str(state),)).status == UNUSABLE
