"""ShardSafety: what an engine does when a checkpoint shard changes under its maps (issue #15).

Owns the engine's checkpoint.guard.ShardGuard (read leases), why the model became unusable, and the
release of everything that reads the shards (the expert backend's threads, the leases, the maps).
The rules: leases taken and sizes checked before a request reads the maps; a change found while a
generation is live ends it at its next safe point and makes the model unusable; one found while idle
gives the leases back at once and the next request checks again. It never computes; the engine calls
it under its lock (turns.Turns), and it never holds the engine (whose finalizer must run when dropped).
"""
from __future__ import annotations

import logging

from hybrid.checkpoint.guard import ShardGuard
from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.experts.backend import ExpertBackend
from hybrid.runtime.turns import Turns

log = logging.getLogger(__name__)

RELOAD = "load it again (hybrid.load, or restart the server)"


class ShardSafety:
    def __init__(self, ckpt: Checkpoint, experts: ExpertBackend, turns: Turns):
        self.ckpt, self.experts, self.turns = ckpt, experts, turns
        self.unusable: str | None = None  # why the model cannot serve any more (a shard changed under a request)
        self.released = False
        self.guard = ShardGuard(ckpt.file_ends(), on_change=self._changed)

    def open_shards(self) -> None:
        """Under the lock, before a request reads the maps: lease the shards (again, if the leases were
        given back while idle), then check their sizes; one missing or too short is this request's error."""
        self.guard.take()
        try:
            self.ckpt.check_files()
        except CheckpointError:
            self.guard.release()  # a writer restoring it must not wait for us
            raise

    def safe_point(self) -> None:
        """Under the lock, nothing reading the maps: stop here if a shard changes under them."""
        reason = self.guard.check()
        if reason is not None:
            self.fail(reason)
            raise CheckpointError(f"{reason}: this request stopped before reading it again, and the model is "
                                  f"unusable; {RELOAD}")

    def check_usable(self) -> None:
        if self.unusable is not None:
            raise CheckpointError(f"the model is unusable: {self.unusable}; {RELOAD}")

    def fail(self, reason: str) -> None:
        """Under the lock, at a safe point: a shard changed under a request. The model is unusable; the
        expert threads stop and the leases are given back (a waiting writer proceeds)."""
        if self.unusable is None:
            self.unusable = reason
            log.error("the model is unusable: %s", reason)
        self.release()
        self.turns.wake()

    def _changed(self) -> None:
        """From the guard's watcher: a writer waits on a lease. Handled once the step in progress ends."""
        with self.turns.lock:
            reason = self.guard.changed
            if reason is None or self.released or self.unusable is not None:
                return
            if self.turns.live:
                self.fail(reason)
            else:  # idle: nothing read the shard across the change; the next request checks it again
                self.guard.release()
                log.warning("%s: leases given back; the next request checks the shards again", reason)

    def health(self) -> str | None:
        """None, or why requests fail now: unusable, a writer waiting on a lease, a shard missing or short."""
        if self.unusable is not None:
            return f"the model is unusable: {self.unusable}; {RELOAD}"
        if self.guard.held and self.guard.changed is not None:  # let go at the next safe point
            return self.guard.changed
        try:
            self.ckpt.check_files()
        except CheckpointError as e:
            return f"{e}; requests fail until the shard is restored or the model loaded again"
        return None

    def release(self) -> None:
        """Stop the expert threads, give the leases back, release the maps; once (the engine's finalizer)."""
        if not self.released:
            self.released = True
            self.experts.close()  # first: its threads may read the maps
            self.guard.release()
            self.ckpt.close()
