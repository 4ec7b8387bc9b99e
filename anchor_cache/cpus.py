"""How many CPUs this process may really use, and how many threads torch should run on them.

`os.cpu_count()` counts the machine's cores, but a process may be pinned to fewer (its affinity)
and a container may get less CPU time than its visible cores (the cgroup quota). Torch sizes its
intra-op pool from the machine's cores, so on a shared or limited host its threads oversubscribe
the CPUs and a batched forward slows down many times over while other work runs beside it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

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
    own event loop counts as one): one CPU each for them, the rest for torch, at least one. On this
    project's 2-core bench, beside two CPU-bound neighbours, the default model kept 34.1 req/s with
    one torch thread and fell to 6.4 with two (each parallel region waits for its descheduled
    thread); alone, two threads were 1.44× faster. The default takes the rule that never collapses.

    On a GPU, one: the forward runs on the device, torch's CPU pool only serves the batch's small
    host-side operations, and its OpenMP workers spin after each one. On a 16-CPU H200 host seven
    such workers held seven cores at 100% in the engine core (top -H, py-spy) while eight frontends
    and the load generator needed them."""
    return 1 if gpu else max(1, usable - http_processes)


def api_servers_for(usable: int) -> int:
    """HTTP frontends for a machine: none on 1-2 CPUs (a frontend process would take the model's
    second core; one process serves as fast there), then one per 8 CPUs, at least one."""
    return 0 if usable <= 2 else max(1, usable // 8)
