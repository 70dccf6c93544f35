"""Where the broker and its clients meet unless told otherwise: one definition for both sides (the broker's
`serve` and `doctor`, and every client command). Read from the environment once, at import."""

from __future__ import annotations

import os

DEFAULT_SOCKET = os.environ.get("XSKBROKER_SOCKET", "/run/xskbroker/broker.sock")
