"""xskbroker: a privileged, policy-enforcing broker that hands AF_XDP sockets to unprivileged programs.

Subpackages: broker (the daemon), client (the unprivileged side), policy (pure decisions), wire (what both
sides share), common (OS helpers), testbed (demo and test beds).
"""

import os as _os

# In a source checkout the subpackages are the repository's top-level folders (pyproject.toml maps them into
# the wheel the same way): with this, `PYTHONPATH=<checkout>` works without an install.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "broker")):
    __path__.append(_root)
