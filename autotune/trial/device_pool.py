"""DevicePool: hands each running trial its own disjoint devices, so `study.parallel_trials` trials can
run at once without sharing a GPU or a core.

A trial needs dp x tp x pp GPUs (on a GPU machine) and a share of the CPU cores (its server threads,
tokenizer and, on the CPU, its ranks). GPUs of one tensor-parallel group are chosen among GPUs linked
to each other over NVLink when the machine has NVLink at all, because TP all-reduces every layer. A
trial that needs more than is free waits; nothing is ever oversubscribed beyond what the devices allow.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from autotune.trial.devices import Devices
from serving.backends.engine_support import id_ranges
from serving.config import DeploymentConfig


@dataclass(frozen=True)
class Allocation:
    """What one trial runs on."""

    cpus: tuple[int, ...]
    gpus: tuple[int, ...] = ()
    """GPU indices in rank order (each TP group contiguous), as CUDA_VISIBLE_DEVICES lists them."""

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if self.gpus else {}

    def describe(self) -> str:
        cores = f"cores {id_ranges(self.cpus)}"
        return f"GPUs {','.join(map(str, self.gpus))}, {cores}" if self.gpus else cores


class DevicePool:
    """Disjoint device sets for up to `slots` trials at once (thread-safe; acquire blocks)."""

    def __init__(self, devices: Devices, slots: int = 1, cpus: Sequence[int] | None = None) -> None:
        if slots < 1:
            raise ValueError(f"study.parallel_trials={slots} is invalid: use 1 or more")
        self.devices = devices
        self.slots = slots
        self.cpus = tuple(sorted(cpus or devices.cpus))
        self.cpu_share = max(1, len(self.cpus) // slots)
        """Cores a trial gets when its ranks need no more: an equal share per parallel trial."""
        self._free_cpus = set(self.cpus)
        self._free_gpus = {g.index for g in devices.gpus}
        self._running = 0
        self._changed = threading.Condition()

    def uses_gpus(self, config: DeploymentConfig) -> bool:
        return bool(self.devices.gpus) and config.device != "cpu"

    def cores_needed(self, config: DeploymentConfig) -> int:
        """CPU trials: a core per rank (unless oversubscribed), at least a share; GPU trials: the share."""
        ranks = config.parallel.world_size
        if self.uses_gpus(config) or config.parallel.oversubscribe:
            return min(self.cpu_share, len(self.cpus))
        return min(max(ranks, self.cpu_share), len(self.cpus))

    def fits(self, config: DeploymentConfig) -> str | None:
        """Why this config can never be placed on the pool's devices (None when it can)."""
        ranks = config.parallel.world_size
        if self.uses_gpus(config) and ranks > len(self.devices.gpus):
            return f"needs {ranks} GPUs, the machine has {len(self.devices.gpus)}"
        if self.uses_gpus(config) and self._tp_groups(config, set(self._all_gpus())) is None:
            return f"no {config.parallel.tp} GPUs are linked to each other for a tensor-parallel group"
        if not self.uses_gpus(config) and not config.parallel.oversubscribe and ranks > len(self.cpus):
            return f"needs {ranks} cores, the study may use {len(self.cpus)}"
        return None

    def acquire(self, config: DeploymentConfig, cancel: threading.Event | None = None) -> Allocation | None:
        """Block until the devices are free and take them; None when `cancel` is set while waiting."""
        reason = self.fits(config)
        if reason:
            raise ValueError(f"cannot place {config.parallel.world_size} rank(s): {reason}")
        with self._changed:
            while True:
                if cancel is not None and cancel.is_set():
                    return None
                allocation = self._take(config)
                if allocation is not None:
                    return allocation
                self._changed.wait(timeout=0.5)

    def release(self, allocation: Allocation) -> None:
        with self._changed:
            self._free_cpus.update(allocation.cpus)
            self._free_gpus.update(allocation.gpus)
            self._running -= 1
            self._changed.notify_all()

    # --- choosing --------------------------------------------------------------------------------

    def _take(self, config: DeploymentConfig) -> Allocation | None:
        if self._running >= self.slots:
            return None
        cores = self._pick_cpus(self.cores_needed(config))
        if cores is None:
            return None
        gpus: tuple[int, ...] = ()
        if self.uses_gpus(config):
            groups = self._tp_groups(config, self._free_gpus)
            if groups is None:
                return None
            gpus = tuple(index for group in groups for index in group)
        self._free_cpus.difference_update(cores)
        self._free_gpus.difference_update(gpus)
        self._running += 1
        return Allocation(cpus=cores, gpus=gpus)

    def _pick_cpus(self, count: int) -> tuple[int, ...] | None:
        """The lowest free cores, a contiguous run when there is one (neighbours share caches)."""
        free = sorted(self._free_cpus)
        if len(free) < count:
            return None
        for start in range(len(free) - count + 1):
            run = free[start : start + count]
            if run[-1] - run[0] == count - 1:
                return tuple(run)
        return tuple(free[:count])

    def _all_gpus(self) -> list[int]:
        return [g.index for g in self.devices.gpus]

    def _tp_groups(self, config: DeploymentConfig, free: set[int]) -> list[list[int]] | None:
        """dp x pp groups of tp GPUs each from `free`; with NVLink on the machine, each group linked."""
        tp, groups_needed = config.parallel.tp, config.parallel.dp * config.parallel.pp
        linked = {g.index: set(g.nvlink_peers) for g in self.devices.gpus}
        needs_links = tp > 1 and any(linked.values())
        available = sorted(free)
        groups: list[list[int]] = []
        for _ in range(groups_needed):
            group = _linked_group(available, tp, linked) if needs_links else available[:tp]
            if group is None or len(group) < tp:
                return None
            groups.append(group)
            available = [i for i in available if i not in group]
        return groups


def _linked_group(candidates: list[int], size: int, linked: dict[int, set[int]]) -> list[int] | None:
    """`size` GPUs from `candidates` that are pairwise NVLink peers (greedy from the lowest index)."""
    for first in candidates:
        group = [first]
        for other in candidates:
            if other not in group and all(other in linked[member] for member in group):
                group.append(other)
            if len(group) == size:
                return group
    return None
