"""Measured facts about the machine: RAM, cores, NUMA nodes, CPU flags, CUDA devices, disks.

Owns reading psutil, /proc, /sys and torch.cuda into a frozen `Hardware`, and building hypothetical
machines for planning. It must not decide anything (that is placement.py) and must never crash on a
missing or unreadable /sys or /proc file: a fact it cannot read falls back to a safe default.
Bytes are bytes; "GB" in this project means 10^9 bytes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil

log = logging.getLogger(__name__)

GB = 1e9
MAX_THREADS = 4096  # far past any CPU; keeps a typo from reaching the thread pools
MAX_IO_THREADS = 64  # expert-cache readers: a few saturate an NVMe drive; more only cost memory
# flags the kernels care about; 'amx' stands for any of amx_tile / amx_bf16 / amx_int8
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx")
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number

# ---- typical figures, for a machine not at hand (kimi-hybrid plan; README "Plan" shows this table) -----
# RAM: a streaming read sustains about 75% of the DDR peak of 8 bytes per transfer per channel
RAM_TYPES = {"ddr4-3200": 3200, "ddr5-4800": 4800, "ddr5-5600": 5600, "ddr5-6400": 6400}  # MT/s
RAM_READ_EFFICIENCY = 0.75
DESKTOP_MAX_RAM_GB = 256  # up to this a 2-channel desktop board holds it; past it: an 8-channel workstation
# disks: sequential reads (one 25 MB pread per K2 expert is close to sequential), GB/s
DISK_TYPES = {"hdd": 0.2, "sata-ssd": 0.55, "nvme-gen3": 3.5, "nvme-gen4": 7.0, "nvme-gen5": 12.0}


def typical_channels(ram_gb: float) -> int:
    """Memory channels a machine with this much RAM typically has: 2 (desktop) or 8 (workstation)."""
    return 2 if ram_gb <= DESKTOP_MAX_RAM_GB else 8


def typical_mem_gbps(channels: int, ram_type: str) -> float:
    """Sustained RAM read GB/s of `channels` channels of `ram_type` (a key of RAM_TYPES)."""
    return channels * 8 * RAM_TYPES[ram_type] / 1000 * RAM_READ_EFFICIENCY


class GPU(NamedTuple):
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Disk:
    path: str
    free_bytes: int
    total_bytes: int
    fs_type: str | None = None  # 'ext4', 'xfs', 'tmpfs', ...
    device: str | None = None  # block device name in /sys/block ('nvme0n1', 'vda'), when found
    rotational: bool | None = None  # None when the device could not be identified


@dataclass(frozen=True)
class Hardware:
    ram_total: int
    ram_available: int
    physical_cores: int
    logical_cores: int
    numa_nodes: int = 1
    cpu_flags: frozenset[str] = frozenset()
    gpus: tuple[GPU, ...] = ()
    usable_cores: int | None = None  # CPUs this process may run on (affinity); None = logical_cores
    disk: Disk | None = None  # fixed answer for disk_for(); set on hypothetical machines
    root: str = field(default="/", repr=False)  # where /proc and /sys are read from (tests move it)

    def __post_init__(self) -> None:
        if self.ram_total <= 0 or self.ram_available < 0 or self.ram_available > self.ram_total:
            raise ValueError(f"need 0 <= ram_available ({self.ram_available}) <= ram_total ({self.ram_total}), ram_total > 0")
        if self.physical_cores < 1 or self.logical_cores < self.physical_cores:
            raise ValueError(f"need 1 <= physical_cores ({self.physical_cores}) <= logical_cores ({self.logical_cores})")

    @property
    def has_cuda(self) -> bool:
        return bool(self.gpus)

    @property
    def threads(self) -> int:
        """Default worker threads: one per physical core this process may use."""
        return max(1, min(self.physical_cores, self.usable_cores or self.logical_cores))

    def disk_for(self, path: str | os.PathLike) -> Disk:
        """Free space, filesystem type and device of the filesystem holding `path` (or its nearest
        existing parent). Hypothetical machines answer with their fixed `disk`."""
        if self.disk is not None:
            return self.disk
        return probe_disk(path, root=Path(self.root))

    @classmethod
    def hypothetical(cls, ram_gb: float, gpus_gb: tuple[float, ...] | list[float] = (), cores: int = 16, *,
                     ram_available_gb: float | None = None, gpu_free_gb: list[float] | None = None,
                     numa_nodes: int = 1, cpu_flags: tuple[str, ...] = ("avx2", "fma"),
                     disk_free_gb: float = 2000.0, disk_rotational: bool = False) -> "Hardware":
        """A machine to plan for: GB = 10^9 bytes (a "24 GB" card is planned as 24e9 bytes, a little
        less than a real 24 GiB one). RAM and VRAM are all free unless said otherwise; cores are
        physical cores with SMT2."""
        free = gpu_free_gb if gpu_free_gb is not None else list(gpus_gb)
        if len(free) != len(gpus_gb):
            raise ValueError("gpu_free_gb needs one entry per GPU in gpus_gb")
        gpus = tuple(GPU(f"hypothetical {g:g} GB", int(g * GB), int(f * GB)) for g, f in zip(gpus_gb, free))
        avail = ram_gb if ram_available_gb is None else ram_available_gb
        disk = Disk("(hypothetical)", int(disk_free_gb * GB), int(disk_free_gb * GB), "ext4",
                    "nvme0n1" if not disk_rotational else "sda", disk_rotational)
        return cls(ram_total=int(ram_gb * GB), ram_available=int(avail * GB), physical_cores=cores,
                   logical_cores=2 * cores, numa_nodes=numa_nodes, cpu_flags=frozenset(cpu_flags),
                   gpus=gpus, usable_cores=2 * cores, disk=disk)

    def describe(self) -> str:
        gpus = ", ".join(f"{g.name} {g.free_bytes / GB:.1f}/{g.total_bytes / GB:.1f} GB free" for g in self.gpus) or "none"
        return (f"RAM {self.ram_available / GB:.1f}/{self.ram_total / GB:.1f} GB available, "
                f"{self.physical_cores} cores ({self.logical_cores} threads), {self.numa_nodes} NUMA node(s), "
                f"flags {' '.join(sorted(self.cpu_flags)) or '-'}, GPUs: {gpus}")


# ---- detection --------------------------------------------------------------------------------

def detect(root: str | os.PathLike = "/") -> Hardware:
    """Measure this machine. `root` relocates /proc and /sys reads (for tests); psutil and torch
    still describe the real machine."""
    root = Path(root)
    vm = psutil.virtual_memory()
    total, avail = int(vm.total), int(vm.available)
    limit = _cgroup_limit(root)
    if limit is not None and limit < total:  # a container sees the host's RAM but may use only this
        log.info("cgroup memory limit %.1f GB below physical RAM %.1f GB", limit / GB, total / GB)
        used = _read_int(root / "sys/fs/cgroup/memory.current") or _read_int(
            root / "sys/fs/cgroup/memory/memory.usage_in_bytes") or 0
        total, avail = limit, max(0, min(avail, limit - used))
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or _cores_from_cpuinfo(root) or logical
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    return Hardware(ram_total=total, ram_available=min(avail, total), physical_cores=min(physical, logical),
                    logical_cores=logical, numa_nodes=_numa_nodes(root), cpu_flags=_cpu_flags(root),
                    gpus=_cuda_gpus(), usable_cores=usable, root=str(root))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:  # 'max' in cgroup v2 means no limit
        return None


def _cgroup_limit(root: Path) -> int | None:
    for p in (root / "sys/fs/cgroup/memory.max", root / "sys/fs/cgroup/memory/memory.limit_in_bytes"):
        v = _read_int(p)
        if v is not None and 0 < v < _UNLIMITED:
            return v
    return None


def _numa_nodes(root: Path) -> int:
    try:
        nodes = [p for p in (root / "sys/devices/system/node").iterdir()
                 if p.name.startswith("node") and p.name[4:].isdigit()]
    except OSError:
        return 1
    return max(1, len(nodes))


def _cpu_flags(root: Path) -> frozenset[str]:
    text = _read(root / "proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            found = {f for f in FLAGS_OF_INTEREST if f in have}
            if have & {"amx_tile", "amx_bf16", "amx_int8"}:
                found.add("amx")
            return frozenset(found)
    return frozenset()


def _cores_from_cpuinfo(root: Path) -> int | None:
    """Distinct (physical id, core id) pairs: the fallback when psutil cannot count physical cores."""
    text = _read(root / "proc/cpuinfo")
    if not text:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = val.strip()
        elif key == "core id":
            cores.add((phys, val.strip()))
    return len(cores) or None


def _cuda_gpus() -> tuple[GPU, ...]:
    try:
        import torch
        if not torch.cuda.is_available():
            return ()
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(GPU(torch.cuda.get_device_name(i), int(total), int(free)))
        return tuple(out)
    except (ImportError, RuntimeError, AssertionError) as e:  # a broken driver reads as no GPU
        log.warning("CUDA present but unusable (%s); planning without a GPU", e)
        return ()


# ---- disks ------------------------------------------------------------------------------------

def probe_disk(path: str | os.PathLike, root: Path = Path("/")) -> Disk:
    """statvfs for space, the mount table for the filesystem, /sys/dev/block for the device."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:
        free = total = 0
    device, rotational = _block_device(p, root)
    return Disk(str(p), int(free), int(total), _fs_type(p, root), device, rotational)


def _fs_type(p: Path, root: Path) -> str | None:
    best, fs = "", None
    for line in (_read(root / "proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fs = mnt, parts[2]
    return fs


def _block_device(p: Path, root: Path) -> tuple[str | None, bool | None]:
    """Whole-disk name and rotational flag; partitions and device-mapper resolve to their disk."""
    try:
        dev = os.stat(p).st_dev
    except OSError:
        return None, None
    sysdev = root / f"sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    try:
        node = sysdev.resolve(strict=True)
    except OSError:
        return None, None  # tmpfs, overlay and other virtual filesystems have no block device
    for _ in range(4):  # dm-crypt on LVM on a partition: follow slaves to a real disk
        if (node / "partition").exists():
            node = node.parent
        try:
            slaves = sorted((node / "slaves").iterdir())
        except OSError:
            slaves = []
        if not slaves:
            break
        node = slaves[0].resolve()
    rot = _read_int(node / "queue/rotational")
    return node.name, (None if rot is None else bool(rot))
