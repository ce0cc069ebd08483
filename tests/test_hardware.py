"""hardware.detect on this machine, on a relocated (empty or fake) /proc + /sys, and hypothetical machines."""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import torch

from hybrid.runtime.hardware import FLAGS_OF_INTEREST, GB, Disk, Hardware, detect


def test_detect_this_machine_is_sane():
    hw = detect()
    vm = psutil.virtual_memory()
    assert 0.5 * vm.total <= hw.ram_total <= vm.total  # a cgroup limit may lower it, never raise it
    assert 0 < hw.ram_available <= hw.ram_total
    assert 1 <= hw.physical_cores <= hw.logical_cores
    assert 1 <= hw.threads <= hw.physical_cores
    assert hw.numa_nodes >= 1
    assert hw.cpu_flags <= set(FLAGS_OF_INTEREST)
    if not torch.cuda.is_available():
        assert hw.gpus == () and not hw.has_cuda
    assert "RAM" in hw.describe()


def test_flags_agree_with_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    if line is None:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    have = set(line.split(":", 1)[1].split())
    hw = detect()
    for f in ("avx2", "fma", "avx512f", "avx512_bf16"):
        assert (f in hw.cpu_flags) == (f in have), f


def test_empty_root_falls_back_without_crashing(tmp_path):
    hw = detect(tmp_path)  # no /proc, no /sys under it
    assert hw.numa_nodes == 1
    assert hw.cpu_flags == frozenset()
    assert hw.ram_total > 0 and hw.physical_cores >= 1
    d = hw.disk_for(tmp_path / "not" / "there")
    assert d.path == str(tmp_path.resolve())  # nearest existing parent
    assert d.free_bytes > 0 and d.fs_type is None and d.device is None and d.rotational is None


def test_unreadable_entries_are_tolerated(tmp_path):
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)  # a directory where a file should be
    (tmp_path / "sys" / "fs" / "cgroup" / "memory.max").mkdir(parents=True)
    (tmp_path / "sys" / "devices" / "system").mkdir(parents=True)
    (tmp_path / "sys" / "devices" / "system" / "node").write_text("")  # a file where a folder should be
    hw = detect(tmp_path)
    assert hw.cpu_flags == frozenset() and hw.numa_nodes == 1


def test_fake_root_numa_flags_and_cgroup(tmp_path):
    for n in (0, 1):
        (tmp_path / f"sys/devices/system/node/node{n}").mkdir(parents=True)
    (tmp_path / "sys/devices/system/node/possible").write_text("0-1\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f amx_tile amx_int8\n")
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(f"{8 * 2**30}\n")
    (cg / "memory.current").write_text(f"{2**30}\n")
    hw = detect(tmp_path)
    assert hw.numa_nodes == 2
    assert hw.cpu_flags == {"avx2", "fma", "avx512f", "amx"}
    if psutil.virtual_memory().total > 8 * 2**30:
        assert hw.ram_total == 8 * 2**30
        assert hw.ram_available <= 7 * 2**30


def test_cgroup_max_means_unlimited(tmp_path):
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text("max\n")
    assert detect(tmp_path).ram_total == psutil.virtual_memory().total


def test_disk_for_real_path(tmp_path):
    d = detect().disk_for(tmp_path)
    st = os.statvfs(tmp_path)
    assert abs(d.free_bytes - st.f_bavail * st.f_frsize) < 1 * GB  # other writers may move it a little
    assert d.total_bytes >= d.free_bytes > 0
    assert d.fs_type  # the mount table of a Linux machine names it


def test_rotational_from_partition_in_fake_sys(tmp_path):
    """A partition resolves to its whole disk, whose queue/rotational answers."""
    dev = os.stat(tmp_path).st_dev
    fake = tmp_path / "fake"
    part = fake / "sys/devices/pci0/host0/block/sdz/sdz2"
    part.mkdir(parents=True)
    (part / "partition").write_text("2\n")
    (part.parent / "queue").mkdir()
    (part.parent / "queue/rotational").write_text("1\n")
    (fake / "sys/dev/block").mkdir(parents=True)
    (fake / f"sys/dev/block/{os.major(dev)}:{os.minor(dev)}").symlink_to(part)
    d = detect(fake).disk_for(tmp_path)
    assert d.device == "sdz" and d.rotational is True


def test_hypothetical_machine():
    hw = Hardware.hypothetical(ram_gb=128, gpus_gb=[24], cores=16, disk_free_gb=700)
    assert hw.ram_total == hw.ram_available == 128 * 10**9
    assert hw.gpus[0].total_bytes == hw.gpus[0].free_bytes == 24 * 10**9
    name, total, free = hw.gpus[0]  # a GPU unpacks as (name, total_bytes, free_bytes)
    assert total == 24 * 10**9
    assert hw.physical_cores == 16 and hw.threads == 16
    assert hw.disk_for("/anywhere") == Disk("(hypothetical)", 700 * 10**9, 700 * 10**9, "ext4", "nvme0n1", False)
    cpu = Hardware.hypothetical(ram_gb=24, cores=2)
    assert cpu.gpus == () and not cpu.has_cuda
    with pytest.raises(ValueError):
        Hardware(ram_total=10, ram_available=20, physical_cores=1, logical_cores=1)
    with pytest.raises(ValueError):
        Hardware.hypothetical(ram_gb=64, gpus_gb=[24], gpu_free_gb=[])


def test_cuda_devices_are_read_through_torch(monkeypatch):
    """No GPU here: stand in for torch.cuda to check what detect() makes of two devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((20 + i) * 10**9, 24 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    hw = detect()
    assert hw.gpus == (("Fake GPU 0", 24 * 10**9, 20 * 10**9), ("Fake GPU 1", 24 * 10**9, 21 * 10**9))
    assert hw.gpus[1].free_bytes == 21 * 10**9 and hw.has_cuda


def test_broken_cuda_reads_as_no_gpu(monkeypatch):
    def boom(i):
        raise RuntimeError("CUDA driver version is insufficient")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)
    assert detect().gpus == ()
