"""Network-device facts the broker needs: ifindex, name and the real queue count."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GCHANNELS = 0x3C


class EthtoolChannels(ctypes.Structure):
    """struct ethtool_channels (linux/ethtool.h)."""

    _fields_ = [(name, ctypes.c_uint32) for name in (
        "cmd", "max_rx", "max_tx", "max_other", "max_combined",
        "rx_count", "tx_count", "other_count", "combined_count")]


class NoSuchInterface(LookupError):
    pass


def ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError as e:
        raise NoSuchInterface(f"no interface named {name!r} in the broker's network namespace") from e


class NotCanonical(NoSuchInterface):
    """The name reaches an interface whose own name differs (an altname): the policy judged another name."""

    def __init__(self, name: str, canonical: str, index: int) -> None:
        super().__init__(f"{name!r} is not the name of interface {index}: its name is {canonical!r} (an "
                         f"alternative name is never resolved: ask for {canonical!r}, which the policy judges)")
        self.canonical = canonical


def resolve(name: str) -> int:
    """The ifindex of the interface whose own name is exactly `name`.

    if_nametoindex also finds altnames (`ip link property add ... altname`) and cuts at ':' (old alias
    syntax): either would let a policy judge one name while the kernel acts on another interface.
    """
    index = ifindex(name)
    canonical = ifname(index)
    if canonical != name:
        raise NotCanonical(name, canonical, index)
    return index


def ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError as e:
        raise NoSuchInterface(f"no interface with index {index}") from e


def queue_count(name: str) -> int:
    """Queues the device really uses (ethtool channels), not the ones merely allocated.

    Falls back to counting sysfs rx-* directories for drivers without get_channels.
    """
    channels = EthtoolChannels(cmd=ETHTOOL_GCHANNELS)
    ifreq = struct.pack("16sP16x", name.encode()[:15], ctypes.addressof(channels))
    # Any socket carries SIOCETHTOOL to the device; AF_UNIX lets the unit forbid AF_INET altogether.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        else:
            # the RX queues an AF_XDP socket can bind to
            rx_queues: int = channels.rx_count + channels.combined_count
            if rx_queues > 0:
                return rx_queues
    try:
        return max(1, sum(1 for d in os.listdir(f"/sys/class/net/{name}/queues") if d.startswith("rx-")))
    except FileNotFoundError:
        return 1
