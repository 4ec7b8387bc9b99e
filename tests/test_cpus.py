"""The CPUs a process may use and torch's share of them (anchor_cache/cpus.py): on written cgroup
files, on scripted CPU counters, and on the kernel's own beside a real busy process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Collection

import psutil
import pytest
import torch
from fastapi.testclient import TestClient

from anchor_cache.cpus import (
    CpuSample,
    ThreadFit,
    api_servers_for,
    cgroup_quota,
    sample_cpus,
    torch_threads,
    usable_cpus,
)
from server.app import build_app
from server.inprocess import fit_threads
from tests.conftest import settings, wait_ready

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "quota"), [("max 100000", None), ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_cgroup_v2_quota(tmp_path, cpu_max, quota):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert cgroup_quota(tmp_path) == quota


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    assert cgroup_quota(tmp_path) == 2.5


def test_usable_cpus_follow_the_quota_below_the_affinity(tmp_path):
    assert usable_cpus(tmp_path) == AFFINITY  # no cgroup files: the affinity alone
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a CPU still runs one thread
    (tmp_path / "cpu.max").write_text(f"{(AFFINITY + 4) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == AFFINITY  # a quota above the pinned CPUs does not add any


def test_torch_leaves_a_cpu_to_each_http_process():
    assert [torch_threads(16, 4), torch_threads(2, 1), torch_threads(2, 2), torch_threads(1, 1)] == [12, 1, 1, 1]
    assert torch_threads(16, 8, gpu=True) == 1  # host-side work only; spinning workers would take the frontends' CPUs


def test_frontends_follow_the_machine():
    assert [api_servers_for(n) for n in (1, 2, 4, 8, 16, 64)] == [0, 0, 1, 1, 2, 8]


class Counters:
    """CPU counters and a clock advanced second by second as a scenario says: what others burn on
    the CPUs, and what this process burns inside and outside its batches."""

    def __init__(self) -> None:
        self.now = CpuSample(wall=0.0, busy=0.0, own=0.0)
        self.reads = 0

    def __call__(self, cpus: Collection[int]) -> CpuSample:
        self.reads += 1
        return self.now

    def advance(self, others: float, own: float) -> None:
        self.now = CpuSample(self.now.wall + 1, self.now.busy + own + others, self.now.own + own)

    def second(self, fit: ThreadFit, others: float, outside: float, batch_s: float = 1.0) -> int:
        """One second in which batches ran `batch_s` at the fitted count; then the next fit."""
        self.advance(others, fit.threads * batch_s + outside)
        fit.ran(batch_s)
        return fit.fit()


@pytest.fixture()
def counters():
    return Counters()


def fitted(counters: Counters, usable: int = 2, start: int = 1, hold_s: float = 30.0, cpus: int | None = None
           ) -> ThreadFit:
    return ThreadFit(usable, start, cpus=range(cpus or usable), hold_s=hold_s, sample=counters,
                     clock=lambda: counters.now.wall)


def test_a_quiet_machine_gives_the_batch_every_cpu(counters):
    fit = fitted(counters)
    assert [counters.second(fit, others=0.0, outside=0.05) for _ in range(4)] == [2, 2, 2, 2]


def test_a_busy_neighbour_takes_the_batch_down_to_what_is_left(counters):
    fit = fitted(counters, start=2)
    # Two busy loops beside two spinning threads: each of the four gets half a CPU.
    assert counters.second(fit, others=1.0, outside=0.0, batch_s=0.5) == 1
    # Beside one thread the loops take a whole CPU: still one.
    assert counters.second(fit, others=1.0, outside=0.05) == 1


def test_the_count_comes_back_only_after_its_hold(counters):
    fit = fitted(counters, start=2, hold_s=5.0)
    assert counters.second(fit, others=1.2, outside=0.0) == 1
    quiet = [counters.second(fit, others=0.0, outside=0.05) for _ in range(6)]
    assert quiet == [1, 1, 1, 1, 2, 2]  # the neighbour left one second in; up five seconds after the move down


def test_the_event_loop_keeps_its_cpu(counters):
    # A cheap model's server: its own event loop is busy answering while the batch runs.
    fit = fitted(counters)
    assert [counters.second(fit, others=0.0, outside=0.8) for _ in range(3)] == [1, 1, 1]


def test_a_reading_near_the_boundary_keeps_the_count(counters):
    fit = fitted(counters, start=2)
    assert counters.second(fit, others=0.45, outside=0.1) == 2  # 1.45 free: not below 1.4
    fit = fitted(counters, start=1)
    assert counters.second(fit, others=0.3, outside=0.05) == 1  # 1.65 free: not yet 1.7


def test_a_large_machine_moves_by_the_cpus_freed_or_taken(counters):
    fit = fitted(counters, usable=16, start=14)
    assert counters.second(fit, others=4.3, outside=0.2) == 12  # 11.5 CPUs free
    assert counters.second(fit, others=0.0, outside=0.2, batch_s=0.9) == 12  # held: no move up yet
    fit = fitted(counters, usable=16, start=4)
    assert counters.second(fit, others=0.5, outside=0.4) == 15  # 15.1 free


def test_a_quota_caps_the_count_and_others_count_only_past_it(counters):
    # Two CPUs of quota on eight CPUs of affinity: others on the rest of them leave the quota whole.
    fit = fitted(counters, usable=2, start=1, cpus=8)
    assert counters.second(fit, others=5.0, outside=0.05) == 2
    assert counters.second(fit, others=7.0, outside=0.0, batch_s=0.5) == 1  # one CPU left of eight


def test_it_reads_the_counters_once_an_interval(counters):
    fit = fitted(counters)
    reads = counters.reads
    fit.ran(0.1)
    assert [fit.fit(), fit.fit()] == [1, 1] and counters.reads == reads  # the same second: no reading
    assert counters.second(fit, others=0.0, outside=0.05) == 2 and counters.reads == reads + 1


def test_a_reading_with_no_batch_only_starts_the_next(counters):
    fit = fitted(counters, start=2)
    counters.advance(others=0.0, own=1.0)  # a second of loading the model: its own work, no batch
    assert fit.fit() == 2
    assert counters.second(fit, others=0.0, outside=0.05) == 2


def test_a_busy_process_reads_as_another_process():
    cpus = os.sched_getaffinity(0)
    before = sample_cpus(cpus)
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{min(cpus)}}})\n"
                             "while True: pass"])
    try:
        child = psutil.Process(busy.pid)
        deadline = time.monotonic() + 30
        while sum(child.cpu_times()[:2]) < 0.5:  # its own counter says it has run half a second
            assert time.monotonic() < deadline, "the busy process never ran"
            time.sleep(0.05)
        after = sample_cpus(cpus)
        ran = sum(child.cpu_times()[:2])
    finally:
        busy.kill()
        busy.wait()
    others = (after.busy - before.busy) - (after.own - before.own)
    assert others >= 0.8 * ran, (before, after, ran)
    assert after.own - before.own < 0.5 * ran  # the child is not this process


def test_only_a_cpu_server_without_a_fixed_count_refits():
    threads = torch.get_num_threads()
    try:
        assert isinstance(fit_threads(settings("m", "s")), ThreadFit)
        assert fit_threads(settings("m", "s", torch_threads=2)) is None
        assert torch.get_num_threads() == 2
        assert fit_threads(settings("m", "s", device="cuda")) is None
    finally:
        torch.set_num_threads(threads)


def test_the_engine_refits_before_each_batch(model_dir, tmp_path, counters):
    fit = ThreadFit(2, 1, cpus=range(2), interval_s=0.0, sample=counters)
    body = {"task": "sentiment", "input": "a fine film"}
    with TestClient(build_app(settings(model_dir, tmp_path / "state"), thread_fit=fit)) as client:
        wait_ready(client)
        assert client.post("/v1/classify", json=body).status_code == 200  # its first reading starts the next
        counters.advance(others=0.0, own=0.05)  # a quiet second: both CPUs nearly idle
        assert client.post("/v1/classify", json=body).status_code == 200
        assert fit.threads == 2
        metrics = client.get("/metrics").text
    assert "anchorserve_torch_threads 2.0" in metrics
