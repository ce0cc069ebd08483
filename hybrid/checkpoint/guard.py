"""ShardGuard: notices a shard being truncated or rewritten under the checkpoint's maps before any
byte of it is read again, so its owner can stop cleanly instead of dying of SIGBUS.

Owns Linux read leases on the shard files (fcntl F_SETLEASE): while one is held, a process that
truncates the shard or opens it for writing is made to wait (up to /proc/sys/fs/lease-break-time s,
default 45) until the lease is given back. A watcher thread polls F_GETLEASE (no signals: Python runs
handlers in the main thread only, and a lease's default SIGIO ends the process) and reports a pending
break. Where no lease can be had (another filesystem, a writer already has the file open, not the
file's owner), check() compares the shard's size by fstat instead. It never reads tensor data and never
decides what a change means: the owner (hybrid.runtime.engine) stops at a safe point and release()s.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the watcher asks whether a lease is being broken (a writer waits about this long)
LEASES = sys.platform.startswith("linux")  # F_SETLEASE is Linux's; elsewhere every shard gets size checks
QUIET_SIGNAL = signal.SIGURG  # ignored by default: a break just before F_SETOWN 0 must not end the process


class ShardGuard:
    """Read leases on `ends`' files (shard -> the bytes it must hold), or size checks where leases fail.

    take() leases them and starts the watcher; on_change() is then called from the watcher once a
    break is pending (a writer waits): the owner must stop reading the maps, at a safe point, and
    release(), which lets the writer go on. take() again leases the shards anew (after a size check
    of its own, the owner may read them again)."""

    def __init__(self, ends: Mapping[Path, int], on_change: Callable[[], None] | None = None, poll_s: float = POLL_S):
        self.ends = {Path(f): n for f, n in ends.items()}
        self.on_change, self.poll_s = on_change, poll_s
        self.changed: str | None = None  # the change noticed since take() (sticky until the next take)
        self.leased: dict[Path, int] = {}  # shard -> fd holding its read lease
        self.sized: dict[Path, tuple[int, int]] = {}  # shard -> (fd, bytes it must hold): fstat checks instead
        self.refused: dict[Path, str] = {}  # shard -> why it has no lease
        self._lock = threading.Lock()  # fds are never polled while release() closes them
        self._stop = threading.Event()
        self._stop.set()

    @property
    def held(self) -> bool:
        return not self._stop.is_set()

    def take(self) -> None:
        """Open and lease every shard (size checks where a lease is refused); start the watcher.
        Nothing to do while held."""
        if self.held:
            return
        with self._lock:
            self.changed, self.refused = None, {}
            for f, need in self.ends.items():
                self._take(f, need)
            self._stop = threading.Event()
        if self.refused:
            log.info("no read lease on %d of %d shards (%s: %s): a truncation is noticed by a size check "
                     "between steps only", len(self.refused), len(self.ends), *next(iter(self.refused.items())))
        if self.leased and self.on_change is not None:
            threading.Thread(target=self._watch, args=(self._stop,), name="shard-lease", daemon=True).start()

    def _take(self, f: Path, need: int) -> None:
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:  # the owner's size check reports it
            self.refused[f] = e.strerror
            return
        try:
            if not LEASES:
                raise OSError(errno.ENOTSUP, "no read leases on this system")
            fcntl.fcntl(fd, fcntl.F_SETSIG, QUIET_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            fcntl.fcntl(fd, fcntl.F_SETOWN, 0)  # no owner: a break sends no signal; the watcher polls instead
            self.leased[f] = fd
        except OSError as e:  # EAGAIN: a writer has it open; EACCES: not ours; EINVAL: no leases there
            self.refused[f] = "a writer has it open" if e.errno == errno.EAGAIN else e.strerror
            self.sized[f] = (fd, need)

    def check(self) -> str | None:
        """At a safe point (nothing reads the maps): the change noticed so far, else one that a size
        check shows now on a shard without a lease (one fstat each), else None."""
        if self.changed is None:
            for f, (fd, need) in self.sized.items():
                size = os.fstat(fd).st_size
                if size < need:
                    self.changed = f"{f}: shard shrank to {size} bytes while the model had it mapped (it needs {need})"
                    break
        return self.changed

    def poll_leases(self) -> str | None:
        """One F_GETLEASE per leased shard: the reason if a break is pending (or the lease is gone)."""
        with self._lock:
            for f, fd in self.leased.items():
                if self.changed is None and fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                    self.changed = f"{f}: the shard is being truncated or opened for writing while the model " \
                                   "has it mapped"
            return self.changed

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            if self.poll_leases() is not None:
                self.on_change()
                return

    def release(self) -> None:
        """Give the leases back (a waiting writer proceeds) and close the files: from here on nobody
        may read the maps until take() and a size check. Idempotent."""
        with self._lock:
            self._stop.set()  # the watcher is not joined: it may be waiting for the owner's lock, held by this caller
            for fd in self.leased.values():
                try:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                except OSError:  # the kernel broke it already (lease-break-time passed)
                    pass
                os.close(fd)
            for fd, _ in self.sized.values():
                os.close(fd)
            self.leased.clear()
            self.sized.clear()
