"""glibc malloc settings for a long-running inference server: few arenas, and large buffers returned when freed.

    tune_malloc()    # once per server process, before its threads start (service.main.app_from_env calls it)

Without them a server that has answered one 1,000-image batch keeps its peak: glibc raises its mmap threshold
to the largest block freed so far (up to 32 MiB), so a batch's arrays then come from the heap and stay there,
and every thread that allocates gets an arena of its own. The environment variables ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_ARENA_MAX`` still win when set.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: Blocks at least this large get a mapping of their own, unmapped on free (fixing it also stops glibc raising it).
MMAP_THRESHOLD_BYTES = 256 * 1024
#: The event loop and the inference thread; more arenas only hold more freed memory.
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Apply the settings; False where the C library has no ``mallopt`` (not glibc) or it refused them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = True
    for variable, parameter, value in (
        ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
    ):
        if variable not in os.environ:
            applied = mallopt(parameter, value) == 1 and applied
    return applied
