"""The CPUs a process may use and torch's share of them (anchor_cache/cpus.py), on written cgroup files."""

from __future__ import annotations

import os

import pytest

from anchor_cache.cpus import api_servers_for, cgroup_quota, torch_threads, usable_cpus

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
