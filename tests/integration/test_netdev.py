"""Queue counts as the broker reads them: struct ethtool_channels from the real device, sysfs otherwise."""

from __future__ import annotations

import ctypes

from tests.integration.conftest import ns_name
from xskbroker.broker import netdev
from xskbroker.testbed import links
from xskbroker.testbed.sandbox import in_netns


def test_ethtool_channels_is_the_kernels_struct() -> None:
    assert ctypes.sizeof(netdev.EthtoolChannels) == 36  # nine __u32
    assert netdev.EthtoolChannels.rx_count.offset == 20 and netdev.EthtoolChannels.combined_count.offset == 32


def test_the_rx_queues_are_counted_not_the_tx_queues() -> None:
    name = ns_name()
    links.create_netns(name)
    try:
        # veth answers ETHTOOL_GCHANNELS with rx_count and tx_count (no combined channels)
        links.add_veth(name, "xskq0", "xskq0p", queues=3, tx_queues=5)
        with in_netns(name):
            assert netdev.queue_count("xskq0") == 3
            assert netdev.queue_count("lo") == 1  # no get_channels: counted in sysfs
    finally:
        links.remove_netns(name)
