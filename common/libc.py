"""The C library, for the few calls Python's os and socket modules lack or make hold the GIL.

One handle for the whole program: ctypes keeps one function object per name on a handle, so the
prototypes below are declared once here, where every user sees the same ones.
"""

from __future__ import annotations

import ctypes
import errno
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.bind.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)]
MAP_FAILED = ctypes.c_void_p(-1).value

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000


def errno_error(what: str) -> OSError:
    """The OSError for the last failed call through `libc` (EIO should it have set no errno)."""
    err = ctypes.get_errno() or errno.EIO
    return OSError(err, f"{what}: {os.strerror(err)}")
