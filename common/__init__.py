"""Small OS helpers both sides use (safe file creation, /proc parsing); nothing of the broker or the client."""
