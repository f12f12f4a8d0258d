"""CPU memory for training: glibc malloc settings that keep freed memory in the process for the next step.

A training step allocates and frees the same few hundred MB of activations, logits and gradients every
step. With glibc's defaults a block above the mmap threshold (32 MiB at most) is ``mmap``-ed and unmapped
again when freed, and the top of the heap is trimmed back to the OS above 128 KiB, so every step the kernel
hands the same memory back zero-filled, one 4 KiB page fault at a time: on the benchmarks' medium Llama
(batch 4 x 256, fp32) about 140,000-220,000 page faults and 0.3-0.8 s of system time in a 3 s LoRA step.

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (every block comes from the heap) and
``M_TRIM_THRESHOLD = 2 GiB`` (freed memory stays for reuse): the LoRA step above then runs about 10-15%
faster. Resident memory stays at the step's peak between steps, which a training process reaches every
step anyway. :func:`restore_defaults` sets glibc's default limits again and returns the freed memory to the
OS (``malloc_trim``); the trainer calls it when the run ends. Only glibc's allocator has ``mallopt``: with
another allocator (musl, macOS, Windows, or jemalloc / tcmalloc preloaded) both are no-ops that return False.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
DEFAULT_TRIM_THRESHOLD_BYTES = 128 * 1024  # glibc's defaults
DEFAULT_MMAP_MAX = 65536


def _glibc_malloc() -> ctypes.CDLL | None:
    """This process's C library when glibc's ``malloc`` is the one in use, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = ctypes.CDLL(None)  # the symbols the process resolves (a preloaded allocator wins)
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    address = ctypes.cast(process.malloc, ctypes.c_void_p).value
    return libc if address == ctypes.cast(libc.malloc, ctypes.c_void_p).value else None


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never trim it; True when the policy took effect."""
    libc = _glibc_malloc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def restore_defaults() -> bool:
    """glibc's default ``M_MMAP_MAX`` and ``M_TRIM_THRESHOLD`` again, and the freed memory back to the OS."""
    libc = _glibc_malloc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX))
    done = bool(libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD_BYTES)) and done
    libc.malloc_trim(0)
    return done
