"""``FairQueue``: one bounded FIFO per source, read round-robin, for multi-camera streams.

A stream with several sources (cameras) feeds one inference pipeline. Each source has its own
bounded lane, so a fast camera can never fill the room a slow one needs (and in line-speed mode a
full lane drops *its own* oldest frame, never another camera's). The reader takes frames
round-robin over the lanes that have one, starting after the lane it served last, so every
camera gets an equal share of the engine when the engine is the bottleneck (fair scheduling).

``get_batch(n, wait_s)`` gathers up to ``n`` frames across lanes for one batched engine call: it
blocks for the first frame, then waits at most ``wait_s`` seconds for more (bounded extra
latency), and returns what it has. Torch-free, standard library only.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["CLOSED", "FairQueue"]

_POLL_S = 0.05  # blocking waits wake this often so close() / Ctrl-C are noticed


class _Closed:
    """Sentinel: every lane was closed and is empty."""

    def __repr__(self) -> str:
        return "CLOSED"


CLOSED = _Closed()


class FairQueue:
    """``lanes`` FIFOs of at most ``maxsize`` items each, read round-robin; records each lane's deepest fill.

    ``put(lane, item, drop_oldest=True)`` never blocks: a full lane gives up its oldest item (returned
    to the caller to count). ``drop_oldest=False`` blocks until the lane has room or is closed.
    """

    def __init__(self, lanes: int, maxsize: int) -> None:
        if lanes < 1 or maxsize < 1:
            raise ValueError(f"FairQueue needs lanes >= 1 and maxsize >= 1, got {lanes}, {maxsize}")
        self.maxsize = maxsize
        self._items: list[collections.deque] = [collections.deque() for _ in range(lanes)]
        self._lane_closed = [False] * lanes
        self.max_depth = [0] * lanes
        self._next = 0  # lane to look at first on the next get (round-robin)
        self._cond = threading.Condition()

    @property
    def lanes(self) -> int:
        return len(self._items)

    def put(self, lane: int, item: Any, *, drop_oldest: bool) -> tuple[bool, Any]:
        """-> (accepted, dropped item or None). Not accepted only when the lane was closed."""
        q = self._items[lane]
        with self._cond:
            dropped = None
            while len(q) >= self.maxsize and not self._lane_closed[lane]:
                if drop_oldest:
                    dropped = q.popleft()
                    break
                self._cond.wait(_POLL_S)
            if self._lane_closed[lane]:
                return False, dropped
            q.append(item)
            self.max_depth[lane] = max(self.max_depth[lane], len(q))
            self._cond.notify_all()
            return True, dropped

    def _take(self, n: int, out: list, key: Callable[[Any], Hashable] | None) -> None:
        """Move up to ``n - len(out)`` items into ``out``, one per lane per pass, round-robin (lock held)."""
        want = key(out[0]) if key is not None and out else None
        lanes = len(self._items)
        progress = True
        while len(out) < n and progress:
            progress = False
            first = self._next
            for k in range(lanes):
                if len(out) >= n:
                    break
                lane = (first + k) % lanes
                q = self._items[lane]
                if not q:
                    continue
                if key is not None:
                    if want is None:
                        want = key(q[0])
                    elif key(q[0]) != want:
                        continue  # not batchable with the others (e.g. another colour order): next call
                out.append(q.popleft())
                progress = True
                self._next = (lane + 1) % lanes
        if out:
            self._cond.notify_all()

    def get_batch(self, n: int = 1, wait_s: float = 0.0,
                  key: Callable[[Any], Hashable] | None = None) -> list | _Closed:
        """Up to ``n`` items, round-robin over the lanes; blocks for the first; :data:`CLOSED` at the end.

        Args:
            n: most items to return (the engine's batch).
            wait_s: after the first item, wait at most this many seconds for the batch to fill.
            key: items of one batch share ``key(item)`` (others stay queued for a later call).
        """
        out: list = []
        with self._cond:
            while True:
                self._take(n, out, key)
                if out:
                    break
                if all(self._lane_closed):
                    return CLOSED
                self._cond.wait(_POLL_S)  # timed, so Ctrl-C reaches a thread blocked here
            deadline = time.monotonic() + wait_s
            while len(out) < n and not all(self._lane_closed):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                self._take(n, out, key)
        return out

    def get(self) -> Any:
        """One item (round-robin); blocks; :data:`CLOSED` once every lane is closed and empty."""
        got = self.get_batch(1)
        return got if got is CLOSED else got[0]

    def close_lane(self, lane: int) -> None:
        """Refuse new items on ``lane``; what it holds is still read."""
        with self._cond:
            self._lane_closed[lane] = True
            self._cond.notify_all()

    def close(self) -> None:
        """Close every lane; ``get`` drains what is left, then returns :data:`CLOSED`."""
        with self._cond:
            self._lane_closed = [True] * len(self._items)
            self._cond.notify_all()

    def drain(self) -> list[tuple[int, Any]]:
        """Remove and return every queued item as ``(lane, item)``."""
        with self._cond:
            items = [(lane, it) for lane, q in enumerate(self._items) for it in q]
            for q in self._items:
                q.clear()
            self._cond.notify_all()
            return items
