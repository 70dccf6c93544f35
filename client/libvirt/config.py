"""The hook's configuration: /etc/xskbroker/libvirt.conf (TOML, every key optional), and the rule that a file
naming programs the hook runs as root must be root's own."""

from __future__ import annotations

import os
import stat
import tomllib
from typing import Any

from xskbroker.common.records import record
from xskbroker.policy import trust

DEFAULT_CONFIG = "/etc/xskbroker/libvirt.conf"
CONFIG_ENV = "XSKBROKER_LIBVIRT_CONF"  # for manual runs and tests: libvirt passes hooks no environment of ours


class ConfigError(ValueError):
    """The hook's configuration file cannot be used."""


@record(frozen=True)
class Config:
    socket: str = "/run/xskbroker/broker.sock"  # the broker
    state_dir: str = "/run/xskbroker-libvirt"  # DOMAIN.log and DOMAIN.json
    monitor: str = "virsh"  # or "qmp:PATH" (PATH may contain {domain}): a QMP socket of QEMU's own
    virsh: str = "virsh"
    uri: str = "qemu:///system"
    pid_dir: str = "/run/libvirt/qemu"  # where libvirt keeps DOMAIN.pid
    timeout: float = 30.0  # seconds for each broker call and monitor command


CONFIG_TYPES: dict[str, type] = {"socket": str, "state_dir": str, "monitor": str, "virsh": str, "uri": str,
                                 "pid_dir": str, "timeout": float}


def parse_config(text: str, source: str = "<config>") -> Config:
    """The hook's configuration: TOML, every key optional (see Config for the defaults)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = CONFIG_TYPES.get(key)
        if kind is None:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(CONFIG_TYPES)})")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a {'number' if kind is float else 'string'}, "
                              f"not {value!r}")
        values[key] = value
    cfg = Config(**values)
    if not 0 < cfg.timeout <= 3600:
        raise ConfigError(f"{source}: timeout must be more than 0 and at most 3600 seconds")
    if cfg.monitor != "virsh" and not (cfg.monitor.startswith("qmp:") and len(cfg.monitor) > 4):
        raise ConfigError(f"{source}: monitor must be \"virsh\" or \"qmp:PATH\", not {cfg.monitor!r}")
    for key in ("socket", "state_dir", "pid_dir"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{source}: {key} must be an absolute path")
    return cfg


def load_config(path: str | None = None) -> Config:
    """The file at `path` (or $XSKBROKER_LIBVIRT_CONF, or /etc/xskbroker/libvirt.conf); the defaults when
    the default file does not exist. A file named explicitly must exist."""
    explicit = path or os.environ.get(CONFIG_ENV)
    chosen = explicit or DEFAULT_CONFIG
    try:
        text = read_trusted(chosen)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{chosen}: no such file") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"{chosen}: {e.strerror or e}") from None
    return parse_config(text, chosen)


def read_trusted(path: str) -> str:
    """The file's text, if only root (or we) could have written it: it names programs run as root."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        unsafe = trust.problem(path, st) or next(iter(trust.dir_chain_problems(path)), None)
        if unsafe:
            raise ConfigError(unsafe)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        return f.read().decode()
