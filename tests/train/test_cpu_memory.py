"""The CPU malloc settings: freed memory stays in the process (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit.train.cpu_memory import _glibc_malloc

PROBE = """
import os
import sys
from lorakit.train.cpu_memory import keep_freed_memory, restore_defaults

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
import torch
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
held = rss_mib()
del block
kept = held - rss_mib()
if sys.argv[1] == "keep":  # restore_defaults gives it back
    assert restore_defaults()
print(kept, held - rss_mib())
"""


@pytest.mark.skipif(_glibc_malloc() is None, reason="mallopt is glibc malloc's (none, or another preloaded)")
def test_freed_memory_stays_in_the_process_only_with_the_policy() -> None:
    def released_mib(mode: str) -> tuple[float, float]:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        on_free, after_restore = done.stdout.split()[-2:]
        return float(on_free), float(after_restore)

    assert released_mib("default")[0] > 200  # glibc unmaps a 256 MiB block when it is freed ...
    kept, restored = released_mib("keep")
    assert kept < 16  # ... keeps it for reuse under keep_freed_memory() ...
    assert restored > 200  # ... and gives it back after restore_defaults()
