"""CPU threads per process when several lorakit processes share one machine.

PyTorch starts one intra-op thread per core in every process. With ``k`` processes on one machine
(torchrun ranks: ``LOCAL_WORLD_SIZE = k``) that is ``k x cores`` busy threads on ``cores`` cores, and the
oversubscribed threads spend their time waiting for each other. :func:`pin_threads` gives each process
``max(1, cores // k)`` threads instead, where ``cores`` is the number of CPUs this process may run on.

An explicit ``OMP_NUM_THREADS`` always wins and nothing is changed. Note that ``torchrun`` itself sets
``OMP_NUM_THREADS=1`` for its workers when it is unset and ``--nproc_per_node > 1`` (with a warning), so
under torchrun that value applies unless you export your own, e.g. ``OMP_NUM_THREADS=$((cores / k))``.
The thread count is only ever lowered, never raised above what torch already uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which respects taskset / cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(cores: int, local_world_size: int) -> int:
    """``max(1, cores // local_world_size)``: the machine's cores shared evenly by its processes."""
    return max(1, cores // max(1, local_world_size))


def planned_threads(environ: Mapping[str, str], cores: int) -> int | None:
    """The thread count to set, or None when the user chose one (``OMP_NUM_THREADS``) or runs alone."""
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    try:
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return None
    if local_world_size <= 1:
        return None
    return threads_per_process(cores, local_world_size)


def pin_threads(environ: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """Lower ``torch.set_num_threads`` to this process's share of the cores; returns the count in use."""
    import torch

    planned = planned_threads(os.environ if environ is None else environ, cores or available_cores())
    if planned is not None and planned < torch.get_num_threads():
        torch.set_num_threads(planned)
    return torch.get_num_threads()
