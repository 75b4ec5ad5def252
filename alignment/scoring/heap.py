"""Giving freed memory back to the operating system (glibc).

Freeing a Python object returns its memory to the C allocator, not necessarily to the system:
glibc keeps freed blocks of its heaps (one per thread that allocated, "arenas") for reuse, unless
they were big enough to be mapped on their own. :func:`release` asks glibc (``malloc_trim``) to hand
every free page of every arena back; the service calls it after a big request's intermediates
are gone. What made the scorer keep 3.6 GB after one 47.7 MB request was the intermediates
themselves (whole texts tokenised, then thrown away); with those bounded, glibc returned nearly
everything by itself in our measurements (RSS a few seconds after a 45-48 MB body: +18 to +47 MB
with this trim and the same without it, within a few MB), so this is insurance for heaps
fragmented by many mid-size requests, not the fix. Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

logger = logging.getLogger(__name__)

_libc = None
_lock = threading.Lock()  # one trim at a time: a second one finds nothing more to return


def _malloc_trim():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    return _libc.malloc_trim if _libc else None


def release() -> bool:
    """Return free heap memory to the system; whether the C library could be asked to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    if not _lock.acquire(blocking=False):
        return True  # a trim is running now
    try:
        trim(0)
    finally:
        _lock.release()
    return True
