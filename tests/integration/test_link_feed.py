"""The broker's link-event feed (linkwatch.LinkFeed) on a real rtnetlink socket, in a namespace of the test's own:
events reach the service, sync() delivers what is queued before a grant trusts its cache, and a feed whose
buffer overran says so (the server then forgets every cached program: what the lost events changed is unknown)."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from tests.integration.conftest import ns_name
from xskbroker.broker.linkwatch import LinkEvent, LinkFeed
from xskbroker.testbed import links


@pytest.fixture
def netns() -> Iterator[str]:
    name = ns_name()
    links.create_netns(name)
    try:
        yield name
    finally:
        links.remove_netns(name)


def _feed(netns: str) -> tuple[LinkFeed, selectors.DefaultSelector, list[LinkEvent], list[OSError]]:
    events: list[LinkEvent] = []
    overruns: list[OSError] = []
    sel = selectors.DefaultSelector()
    with links.in_netns(netns):
        feed = LinkFeed(sel, events.append, overruns.append)
    return feed, sel, events, overruns


def test_events_come_through_the_selector_and_sync(netns: str) -> None:
    feed, sel, events, overruns = _feed(netns)
    try:
        links.add_veth(netns, "lfa", "lfb")
        # through the loop's selector, as the server reads it
        ready = sel.select(2.0)
        assert ready, "no link event reached the selector"
        for key, _ in ready:
            key.data(key.fileobj)
        assert {"lfa", "lfb"} <= {e.name for e in events}
        # queued but not yet read: sync() delivers it (a grant about to trust the cache)
        before = len(events)
        links.delete_link(netns, "lfa")
        feed.sync()
        assert any(e.removed for e in events[before:]), events[before:]
        feed.sync()  # nothing queued: nothing delivered, no error
        assert not overruns
    finally:
        feed.close()
        sel.close()


def test_an_overrun_feed_says_so_and_goes_on(netns: str) -> None:
    feed, sel, events, overruns = _feed(netns)
    try:
        feed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum: a few messages
        for i in range(40):
            links.add_veth(netns, f"lo{i}a", f"lo{i}b", up=False)
        feed.sync()
        assert overruns and "No buffer space" in str(overruns[0]), overruns
        # the feed still works after the loss (with room again: a new veth's messages fill the minimum buffer)
        feed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        feed.read()  # whatever the buffer still held
        events.clear()
        links.add_veth(netns, "lzza", "lzzb", up=False)
        feed.sync()
        assert "lzza" in {e.name for e in events}, events
    finally:
        feed.close()
        sel.close()
