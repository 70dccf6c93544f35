"""Small helpers both sides use (safe file creation, /proc parsing, records in place of dataclasses); nothing of
the broker or the client."""
