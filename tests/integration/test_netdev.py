"""Queue counts as the broker reads them: struct ethtool_channels from the real device, sysfs otherwise."""

from __future__ import annotations

import ctypes

from tests.integration.conftest import ns_name
from xskbroker.broker import netdev
from xskbroker.testbed.sandbox import in_netns, ip


def test_ethtool_channels_is_the_kernels_struct() -> None:
    assert ctypes.sizeof(netdev.EthtoolChannels) == 36  # nine __u32
    assert netdev.EthtoolChannels.rx_count.offset == 20 and netdev.EthtoolChannels.combined_count.offset == 32


def test_the_rx_queues_are_counted_not_the_tx_queues() -> None:
    name = ns_name()
    ip("netns", "add", name)
    try:
        # veth answers ETHTOOL_GCHANNELS with rx_count and tx_count (no combined channels)
        ip("link", "add", "xskq0", "numrxqueues", "3", "numtxqueues", "5", "type", "veth", "peer", "name", "xskq0p",
           netns=name)
        with in_netns(name):
            assert netdev.queue_count("xskq0") == 3
            assert netdev.queue_count("lo") == 1  # no get_channels: counted in sysfs
    finally:
        ip("netns", "del", name)
