"""Bandwidth probes for `bench` and `plan`: RAM read GB/s with all threads, sequential disk read GB/s;
and the CPU time a VM's host took from its CPUs (host_steal_s), which `bench` reports beside decode.

Owns measuring only; nothing here decides anything from the figures (placement.py does). The RAM probe
is kernels_cpu.membw.read_gbps (the best of several load shapes: why, there), as kernel_bench's and the
cluster's figures are, so `bench --kernels`, `bench`, `plan`, `doctor` and the cluster report the same
ceiling. GB = 10^9 bytes.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kernels_cpu.membw import read_gbps

GB = 1e9


def probe_buffer(nbytes: int = 1 << 30) -> np.ndarray:
    """The RAM probe's buffer: nbytes (at least 1 MB) of uint64, every page written.

    A caller that probes between measured runs keeps one for all its probes (bench, compare_llamacpp):
    on a VM whose balloon device takes free page reports (virtio-balloon), a freed buffer is handed to
    the host about 2 s later, and the host's work on it took this VM's CPUs during the next run. k2-slice
    on a 2-core Xeon VM, `bench --runs 3`, three interleaved pairs: with a buffer freed after each probe,
    10-150 ms of steal in each of 4-5 tokens a run, about 1 s into its decode (4.0-7.0 ms a token in all);
    with one held, 0.0-0.2 ms, and bf16w 11.63-11.95 -> 12.26-12.73 tok/s, int8w 16.55-17.46 -> 17.50-17.96.

    Where the buffer lands moves the figure: on that VM three 512 MB buffers allocated one after another
    read 38.9 / 30.2 / 26.2 GB/s (4 KB pages) and three on huge pages 38.8 / 30.5 / 20.8, each the same on a
    second pass: the guest's memory is not all equally fast, whatever the page size. Ten bench runs in one
    sitting probed 29.6-41.6 GB/s while their decode read 29.2-32.6; the model's own non-expert weights, read
    in place by the probe's loops, 36.1-37.0 beside a probe of 40.9 (k2-slice int8w). A later sitting, 24-40
    buffers of 256 MB: each read at one of three rates (21 / 29-30 / 37-42 GB/s), the same rate when read
    again in either order, whether filled with ones or random words, and whatever its pages' guest-physical
    addresses (contiguous ranges read 21, scattered ones 29 or 40): the host's backing of the guest's memory,
    not anything the guest controls. How many buffers fall in each tier moved within the hour (most at 29,
    then most at 21); the probe buffer measured 40.3 once and 22 an hour later. So `bench` also reads a
    token's own bytes in place (bench/in_place.py) and gives the decode's share of that."""
    return np.ones(max(nbytes, 1 << 20) // 8, np.uint64)


def mem_read_gbps(nbytes: int = 1 << 30, reps: int = 5, threads: int | None = None,
                  buf: np.ndarray | None = None) -> float:
    """Best-of-`reps` read bandwidth over an `nbytes` buffer (well past the caches), all threads, the
    best of membw.read_gbps's load shapes; over `buf` (probe_buffer's) instead where given."""
    return read_gbps(probe_buffer(nbytes) if buf is None else buf, reps, threads)


_STAT = "/proc/stat"
_stat_fd: int | None = None  # host_steal_s' descriptor of _STAT, open for the process


def host_steal_s(stat: str | os.PathLike = _STAT) -> float | None:
    """CPU time the hypervisor gave to something else while this VM's CPUs had work (Linux's "steal"),
    summed over the CPUs since boot, in seconds at the kernel's clock-tick resolution (10 ms on most
    systems); None where `stat` is missing or has no steal column (not Linux, or a kernel before 2.6.11).
    On a VM a token that the host interrupts takes the stolen time on top of its own: k2-slice bf16w on a
    2-core Xeon VM, the bench's slowest tokens (98-144 ms against a median of 78) came with 40-120 ms of
    steal each (summed over the two CPUs)."""
    global _stat_fd
    try:
        # /proc/stat through one descriptor, read at offset 0 (procfs writes the file anew for each read): bench
        # asks once a token, with the caches cold after a decode step's stream, and an open, read and close took
        # ~0.15 ms there against ~0.05 (k2-slice, 2-core Xeon VM)
        if stat == _STAT:
            if _stat_fd is None:
                _stat_fd = os.open(stat, os.O_RDONLY)
            fields = os.pread(_stat_fd, 512, 0).split(b"\n", 1)[0].split()
        else:
            with open(stat, "rb") as f:
                fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def disk_read_gbps(directory: str | os.PathLike, nbytes: int = 256 << 20, chunk: int = 8 << 20) -> float:
    """Sequential read GB/s of the filesystem holding `directory`: write a scratch file, flush it and
    drop it from the page cache, read it back in `chunk`-sized reads, delete it. Raises OSError when
    the directory is not writable."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    block = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()  # incompressible
    with tempfile.NamedTemporaryFile(dir=d, prefix=".kimi-hybrid-probe-") as f:
        for _ in range(max(1, nbytes // chunk)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())  # on the disk, so that dropping it from the page cache makes the read go there
        return file_read_gbps(f.name, chunk=chunk)


def file_read_gbps(file: str | os.PathLike, nbytes: int | None = None, chunk: int = 8 << 20) -> float:
    """Sequential read GB/s of `file` from its disk (its first `nbytes`; all of it when None): dropped
    from the page cache first, then read in `chunk`-sized reads."""
    buf = bytearray(chunk)
    limit = os.path.getsize(file) if nbytes is None else nbytes
    done = 0
    with open(file, "rb", buffering=0) as r:
        if hasattr(os, "posix_fadvise"):  # without it the read comes from the page cache
            os.posix_fadvise(r.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        while done < limit and (n := r.readinto(buf)):
            done += n
        dt = time.perf_counter() - t0
    return done / dt / GB


def gpu_read_gbps(index: int = 0, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best-of-`reps` read bandwidth of CUDA device `index`: an fp32 sum over `nbytes`."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=f"cuda:{index}")
    x.sum()
    torch.cuda.synchronize(index)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize(index)
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / GB
