"""bench/unit_start.py's probe units: the sandboxed probe carries every [Service] setting of the shipped unit
except what makes it a notify service of the socket, so the sandbox's measured cost is the shipped one's."""

from __future__ import annotations

from pathlib import Path

from bench.unit_start import NOT_SANDBOX, probe_unit

SHIPPED = (Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "xskbroker.service").read_text()


def _settings(text: str) -> list[str]:
    section, out = "", []
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            out.append(line)
    return out


def test_the_sandboxed_probe_has_every_hardening_setting() -> None:
    probe = _settings(probe_unit(SHIPPED, "/bin/true", sandboxed=True))
    kept = [line for line in _settings(SHIPPED) if not NOT_SANDBOX.match(line)]
    assert probe[:3] == ["Type=oneshot", "RemainAfterExit=yes", "ExecStart=/bin/true"]
    assert probe[3:] == kept
    for setting in ("ProtectSystem=strict", "DynamicUser=yes", "SystemCallFilter=@system-service",
                    "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_XDP", "PrivateDevices=yes"):
        assert setting in probe


def test_the_bare_probe_has_none() -> None:
    assert _settings(probe_unit(SHIPPED, "/bin/true", sandboxed=False)) == [
        "Type=oneshot", "RemainAfterExit=yes", "ExecStart=/bin/true"]
