"""How many CPUs this process may really use, and how many threads torch should run on them.

`os.cpu_count()` counts the machine's cores, but a process may be pinned to fewer (its affinity)
and a container may get less CPU time than its visible cores (the cgroup quota). Torch sizes its
intra-op pool from the machine's cores, so on a shared or limited host its threads oversubscribe
the CPUs and a batched forward slows down many times over while other work runs beside it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The CPU quota in CPUs (cgroup v2 `cpu.max`, else v1's cfs quota), or None when unlimited."""
    v2 = root / "cpu.max"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if quota_file.is_file() and period_file.is_file():
        quota = int(quota_file.read_text())
        return None if quota <= 0 else quota / int(period_file.read_text())
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup quota (rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root)
    return cpus if quota is None else max(1, min(cpus, math.floor(quota)))


def torch_threads(usable: int, http_processes: int, gpu: bool = False) -> int:
    """Intra-op threads for the model beside `http_processes` HTTP processes (the model process's
    own event loop counts as one): one CPU each for them, the rest for torch, at least one. A CPU
    server starts with this count, which never collapses beside a busy neighbour, and `ThreadFit`
    then moves it to the CPUs other work leaves free.

    On a GPU, one: the forward runs on the device, torch's CPU pool only serves the batch's small
    host-side operations, and its OpenMP workers spin after each one. On a 16-CPU H200 host seven
    such workers held seven cores at 100% in the engine core (top -H, py-spy) while eight frontends
    and the load generator needed them."""
    return 1 if gpu else max(1, usable - http_processes)


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: busy on the CPUs a process may use (anyone's), and the
    process's own (all its threads)."""

    wall: float
    busy: float
    own: float


def sample_cpus(cpus: Collection[int]) -> CpuSample:
    """Now's `CpuSample` over `cpus` (logical CPU numbers, which psutil's per-CPU list follows while
    every CPU is online), from the kernel's counters. Busy is what is not idle or waiting on I/O, as
    psutil's own busy time; steal counts as busy: the hypervisor gave the CPU to someone else."""
    per_cpu = psutil.cpu_times(percpu=True)
    busy = sum(sum(t) - t.idle - t.iowait - t.guest - t.guest_nice  # guest time is inside user on Linux
               for i, t in enumerate(per_cpu) if i in cpus)
    own = psutil.Process().cpu_times()
    return CpuSample(time.monotonic(), busy, own.user + own.system)


class ThreadFit:
    """Torch's intra-op threads fitted, before each CPU batch, to the usable CPUs nothing else is
    using, measured over about the last `interval_s`: other processes (a neighbour, the frontends,
    the load generator) and this process's own work outside its batches (its event loop).

    No fixed count suits every load on a small machine. On this project's 2-core bench the default
    model served 81–85 req/s at 32 clients with two threads and 59–60 with one, but beside two busy
    loops two threads fell to 5.3 req/s (each parallel region waits for its descheduled thread)
    where one kept 37. A cheap model served 0.83x as fast with two, its own event loop needing the
    second core. Fitted, a batch gets every CPU that is idle apart from it, and drops to what is
    left when someone else takes them.

    Free CPUs = min(usable, the affinity's CPUs - others) - outside. Others is all busy time on the
    affinity's CPUs less this process's: under a cgroup quota below them, the quota caps the count
    and busy neighbours only matter once they leave less than it. Outside is this process's CPU
    time less `threads` x each batch's wall time (torch's OpenMP workers spin through a forward).
    The count moves up when free reaches it plus `UP` and down when free falls below it less
    `DOWN`, so a reading near a boundary does not flip it back and forth every interval. After a
    move down it moves up again only `hold_s` later: a second thread slows the event loop beside
    it, which then reads as less busy, and a cheap model's server flipped between one and two
    threads every second or two without it. A reading with no batch in it (the model loading, the
    first batch) only starts the next one.

    The caller runs each batch at `fit()`'s count on its own thread (OpenMP's count is per thread)
    and reports its wall time to `ran`."""

    UP = 0.7  # one more thread once this much of its CPU is free too: two threads at 1.7 CPUs free
    DOWN = 0.6  # one fewer once the batch's own CPUs are that far from free: two threads below 1.4

    def __init__(self, usable: int, start: int, cpus: Collection[int] | None = None, interval_s: float = 1.0,
                 hold_s: float = 30.0, sample: Callable[[Collection[int]], CpuSample] = sample_cpus,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.usable = usable
        self.threads = start
        self.cpus = frozenset(os.sched_getaffinity(0) if cpus is None else cpus)
        self.interval_s = interval_s
        self.hold_s = hold_s
        self._sample = sample
        self._clock = clock
        self._last = sample(self.cpus)
        self._up_after = self._last.wall  # no move up before this time (`hold_s` after a move down)
        self._batch_cpu = 0.0  # threads x wall seconds of the batches since `_last`

    def fit(self) -> int:
        """The threads for the batch about to run."""
        if self._clock() - self._last.wall >= self.interval_s:
            self._refit(self._sample(self.cpus))
        return self.threads

    def ran(self, wall_s: float) -> None:
        """A batch at `fit()`'s count took `wall_s`."""
        self._batch_cpu += self.threads * wall_s

    def free(self, now: CpuSample) -> tuple[float, float, float]:
        """(free, others, outside) in CPUs, since the last reading."""
        span = now.wall - self._last.wall
        own = (now.own - self._last.own) / span
        others = max(0.0, (now.busy - self._last.busy) / span - own)
        outside = max(0.0, own - self._batch_cpu / span)
        return min(self.usable, len(self.cpus) - others) - outside, others, outside

    def _refit(self, now: CpuSample) -> None:
        if self._batch_cpu == 0.0 or now.wall <= self._last.wall:
            self._last = now
            return
        free, others, outside = self.free(now)
        self._last, self._batch_cpu = now, 0.0
        threads = self.threads
        if free >= threads + self.UP and now.wall >= self._up_after:  # one more, and one per further free CPU
            threads = min(self.usable, math.floor(free - self.UP) + 1)
        elif free < threads - self.DOWN:
            threads = max(1, math.floor(free + self.DOWN))
        if threads != self.threads:
            log.info("torch threads %d -> %d: %.1f of %d CPUs free (other processes %.1f, this one outside its "
                     "batches %.1f)", self.threads, threads, free, self.usable, others, outside)
            if threads < self.threads:
                self._up_after = now.wall + self.hold_s
            self.threads = threads


def api_servers_for(usable: int) -> int:
    """HTTP frontends for a machine: none on 1-2 CPUs (a frontend process would take the model's
    second core; one process serves as fast there), then one per 8 CPUs, at least one."""
    return 0 if usable <= 2 else max(1, usable // 8)
