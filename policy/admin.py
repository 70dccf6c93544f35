"""Who is an admin: the policy's [admin] table judged against a peer (pure).

Admins may revoke leases, see every lease in status, name a holder process of another user, and keep a
connection when the table is full. Entries are exact: "*" in [admin] is a user or group named "*", never a
wildcard (an admin table that matched everyone by accident would hand out revocation).
"""

from __future__ import annotations

from .decide import Peer, in_groups, names_user
from .model import Admin


def is_admin(admin: Admin, peer: Peer) -> bool:
    """True when the peer's uid or user name, or one of its groups (by name or gid), is listed in [admin]."""
    return names_user(admin.users, peer) or in_groups(admin.groups, peer)
