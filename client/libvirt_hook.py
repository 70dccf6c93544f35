"""The libvirt hook's former home: hook scripts installed before the split import main() from here.

The hook lives in the client/libvirt/ package now (xskbroker.client.libvirt.hook); see its __init__.
"""

from __future__ import annotations

import sys

from xskbroker.client.libvirt.hook import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
