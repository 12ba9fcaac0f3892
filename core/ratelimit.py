"""In-process limits on anonymous noise (issue 14): a sliding-window rate limit per source, and an
aggregator that lets one audit row per (event, source) and window through with a count of the ones it
held back. Memory is bounded (the least recently seen keys are dropped first), so a flood of sources
cannot grow it. Each replica counts for itself: N replicas allow N times the rate (SECURITY.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

MAX_KEYS = 10_000


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # seconds until the next attempt is allowed


class RateLimiter:
    """At most ``limit`` hits per ``window`` seconds per key (a sliding window)."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._hits: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, key: Hashable) -> Verdict:
        now = self.clock()
        with self._lock:
            hits = self._hits.pop(key, None) or deque()
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            self._hits[key] = hits
            while len(self._hits) > MAX_KEYS:
                self._hits.popitem(last=False)
            if len(hits) >= self.limit:
                return Verdict(False, max(1, int(hits[0] + self.window - now) + 1))
            hits.append(now)
            return Verdict(True)

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()


class NoiseAggregator:
    """One event per key and window gets through; the rest are counted and reported with the next one.

    ``admit(key)`` returns None to hold the event back, else the number held back since the last
    admitted one (0 the first time)."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.clock = window, clock
        self._state: OrderedDict[Hashable, list[float]] = OrderedDict()  # key → [admitted_at, held back]
        self._lock = threading.Lock()

    def admit(self, key: Hashable) -> int | None:
        now = self.clock()
        with self._lock:
            state = self._state.pop(key, None)
            if state is not None and now - state[0] < self.window:
                state[1] += 1
                self._state[key] = state
                return None
            held = int(state[1]) if state is not None else 0
            self._state[key] = [now, 0]
            while len(self._state) > MAX_KEYS:
                self._state.popitem(last=False)
            return held

    def clear(self) -> None:
        with self._lock:
            self._state.clear()
