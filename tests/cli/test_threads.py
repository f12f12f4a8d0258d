"""Thread pinning for several processes on one machine: cores // LOCAL_WORLD_SIZE unless OMP_NUM_THREADS."""

from __future__ import annotations

import pytest
import torch

from lorakit.cli.threads import available_cores, pin_threads, planned_threads, threads_per_process


@pytest.mark.parametrize(
    ("cores", "local_world_size", "expected"),
    [(16, 1, 16), (16, 4, 4), (16, 3, 5), (2, 4, 1), (7, 2, 3), (8, 0, 8)],
)
def test_threads_per_process(cores: int, local_world_size: int, expected: int) -> None:
    assert threads_per_process(cores, local_world_size) == expected


def test_planned_threads_respects_omp_num_threads_and_single_processes() -> None:
    assert planned_threads({"LOCAL_WORLD_SIZE": "4"}, cores=16) == 4
    assert planned_threads({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "6"}, cores=16) is None
    assert planned_threads({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": " "}, cores=16) == 4
    assert planned_threads({}, cores=16) is None
    assert planned_threads({"LOCAL_WORLD_SIZE": "1"}, cores=16) is None
    assert planned_threads({"LOCAL_WORLD_SIZE": "many"}, cores=16) is None


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_pin_threads_only_lowers_the_thread_count(restore_threads) -> None:
    torch.set_num_threads(4)
    assert pin_threads({"LOCAL_WORLD_SIZE": "2"}, cores=4) == 2
    assert torch.get_num_threads() == 2
    assert pin_threads({"LOCAL_WORLD_SIZE": "2"}, cores=16) == 2  # 8 would be more than in use: unchanged
    assert pin_threads({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "2"}, cores=1) == 2
    assert pin_threads({}, cores=1) == 2


def test_available_cores_is_positive() -> None:
    assert 1 <= available_cores()
