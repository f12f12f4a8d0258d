"""The CPU allocator policy: freed memory stays in the process (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit.train.allocator import _glibc

PROBE = """
import sys
from lorakit.train.allocator import keep_freed_memory

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
import torch
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
held = rss_mib()
del block
print(held - rss_mib())
"""


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_freed_memory_stays_in_the_process_only_with_the_policy() -> None:
    def released_mib(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    assert released_mib("default") > 200  # glibc unmaps a 256 MiB block when it is freed ...
    assert released_mib("keep") < 16  # ... and keeps it for reuse under keep_freed_memory()
