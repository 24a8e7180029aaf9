"""DevicePool: disjoint cores / GPUs per running trial, TP groups on NVLinked GPUs, waiting when full."""

from __future__ import annotations

import threading

import pytest

from autotune.trial.device_pool import DevicePool
from autotune.trial.devices import Devices, Gpu
from serving.config import DeploymentConfig

GIB = 2**30


def layout(dp: int = 1, tp: int = 1, pp: int = 1, **extra: object) -> DeploymentConfig:
    return DeploymentConfig().replace(**{"parallel.dp": dp, "parallel.tp": tp, "parallel.pp": pp, **extra})


def cpu_machine(cores: int) -> Devices:
    return Devices(cpus=tuple(range(cores)), ram_bytes=16 * GIB)


def gpu_node(links: dict[int, tuple[int, ...]], count: int = 8, cores: int = 32) -> Devices:
    gpus = tuple(Gpu(i, "H100", 80 * GIB, 79 * GIB, links.get(i, ())) for i in range(count))
    return Devices(cpus=tuple(range(cores)), ram_bytes=512 * GIB, gpus=gpus)


def test_two_slots_on_two_cores_get_one_core_each_and_a_third_trial_waits() -> None:
    pool = DevicePool(cpu_machine(2), slots=2)
    first, second = pool.acquire(layout()), pool.acquire(layout())
    assert first is not None and second is not None
    assert {first.cpus, second.cpus} == {(0,), (1,)}
    cancel = threading.Event()
    cancel.set()
    assert pool.acquire(layout(), cancel) is None  # full: would wait, and the wait was cancelled
    pool.release(first)
    third = pool.acquire(layout())
    assert third is not None and third.cpus == first.cpus


def test_a_trial_with_more_ranks_than_its_share_takes_a_core_per_rank() -> None:
    pool = DevicePool(cpu_machine(4), slots=4)
    wide = pool.acquire(layout(tp=2))
    assert wide is not None and wide.cpus == (0, 1)
    narrow = pool.acquire(layout())
    assert narrow is not None and narrow.cpus == (2,)


def test_one_slot_gives_every_core_and_waiting_trials_run_in_turn() -> None:
    pool = DevicePool(cpu_machine(2), slots=1)
    whole = pool.acquire(layout())
    assert whole is not None and whole.cpus == (0, 1) and whole.env() == {}
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(layout())))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive() and not got  # blocked while the first trial runs
    pool.release(whole)
    waiter.join(timeout=5)
    assert got and got[0] is not None


def test_configured_server_cpus_are_the_pool() -> None:
    pool = DevicePool(cpu_machine(8), slots=2, cpus=[4, 5, 6, 7])
    a, b = pool.acquire(layout()), pool.acquire(layout())
    assert a is not None and b is not None and (a.cpus, b.cpus) == ((4, 5), (6, 7))


def test_more_ranks_than_cores_is_refused_unless_oversubscribed() -> None:
    pool = DevicePool(cpu_machine(2), slots=1)
    assert "needs 4 cores" in (pool.fits(layout(dp=4)) or "")
    with pytest.raises(ValueError, match="needs 4 cores"):
        pool.acquire(layout(dp=4))
    squeezed = pool.acquire(layout(dp=4, **{"parallel.oversubscribe": True}))
    assert squeezed is not None and squeezed.cpus == (0, 1)


def test_gpu_trials_get_disjoint_gpus_in_rank_order() -> None:
    pool = DevicePool(gpu_node({}), slots=4)
    a, b = pool.acquire(layout(tp=2)), pool.acquire(layout(dp=2, pp=1, tp=2))
    assert a is not None and b is not None
    assert a.gpus == (0, 1) and b.gpus == (2, 3, 4, 5)
    assert a.env() == {"CUDA_VISIBLE_DEVICES": "0,1"} and b.env() == {"CUDA_VISIBLE_DEVICES": "2,3,4,5"}
    assert not set(a.cpus) & set(b.cpus) and len(a.cpus) == 8  # 32 cores / 4 slots
    assert a.describe() == "GPUs 0,1, cores 0-7"


def test_tensor_parallel_groups_are_placed_on_nvlinked_gpus() -> None:
    # NVLink pairs (0,2), (1,3), (4,5): a TP-2 group must be one of them, never PCIe neighbours 0 and 1
    pairs = {0: (2,), 2: (0,), 1: (3,), 3: (1,), 4: (5,), 5: (4,)}
    pool = DevicePool(gpu_node(pairs, count=6), slots=3)
    first, second = pool.acquire(layout(tp=2)), pool.acquire(layout(tp=2, pp=2))
    assert first is not None and second is not None
    assert first.gpus == (0, 2) and second.gpus == (1, 3, 4, 5)
    assert pool.fits(layout(tp=4)) == "no 4 GPUs are linked to each other for a tensor-parallel group"
    cancel = threading.Event()
    cancel.set()
    assert pool.acquire(layout(tp=2), cancel) is None  # no linked pair left: it would wait


def test_more_gpus_than_the_node_has_is_refused_by_name() -> None:
    pool = DevicePool(gpu_node({}, count=2), slots=1)
    assert pool.fits(layout(tp=4)) == "needs 4 GPUs, the machine has 2"
    cpu_trial = pool.acquire(layout(dp=2, **{"device": "cpu"}))
    assert cpu_trial is not None and cpu_trial.gpus == ()
