"""What both sides of the socket share: the wire codec (sans-IO) and the kernel's AF_XDP ABI constants.

Neither the broker nor the client owns this package; each imports it, and it imports nothing of theirs.
"""
