"""Turns: one engine, one KV cache, one live generation at a time, whatever threads call it.

Owns the engine's lock (held while anything computes with the model or reads the checkpoint's maps: a
step, a prefill, a logits call, close; never across a generator's yield) and whose turn it is: a
request from another thread than the live generation's waits until that one ends (run to its end,
closed, failed or dropped); one from the same thread supersedes it (waiting would wait on itself).
It never touches the cache: the engine keeps its bookkeeping under the lock.
"""
from __future__ import annotations

import threading
from typing import Callable


class Turns:
    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entrant: a step calls engine methods that take it too
        self._ended = threading.Condition(self.lock)
        self.epoch = 0  # counts generations; only the newest may touch the cache
        self._live: tuple[int, int] | None = None  # (thread ident, epoch) of the live generation

    @property
    def live(self) -> bool:
        """A generation has begun and not ended (it may be waiting for its consumer between steps)."""
        return self._live is not None

    def begin(self, check: Callable[[], None]) -> int:
        """Under the lock: wait for this thread's turn, then make a new generation the live one (the
        one this thread had, if any, is superseded); -> its epoch. check() runs before each wait and
        raises when the engine can no longer serve (closed, unusable)."""
        me = threading.get_ident()
        check()
        while self._live is not None and self._live[0] != me:
            self._ended.wait()
            check()
        self.epoch += 1
        self._live = (me, self.epoch)
        return self.epoch

    def current(self, epoch: int) -> bool:
        return epoch == self.epoch

    def end(self, epoch: int) -> bool:
        """Under the lock: generation `epoch` ended; -> True if it was still the newest (the cache is its)."""
        if self._live is not None and self._live[1] == epoch:
            self._live = None
            self._ended.notify_all()
        return epoch == self.epoch

    def wake(self) -> None:
        """Under the lock: the engine closed or failed; waiting requests check again (and raise)."""
        self._ended.notify_all()
