"""The shard's replay cache: a resent request gets its first reply again, never a second execution.

One cache per coordinator session (docs/PROTOCOL.md §8): only admitted links reach it, and it is
emptied when a new session starts or the generation changes. It holds the replies of the most
recent requests (at least REPLAY_ENTRIES, within REPLAY_BYTES; the newest reply is always
kept) and remembers the keys of evicted ones, so a late duplicate is refused, not re-executed.
"""

from __future__ import annotations

from collections import OrderedDict

REPLAY_ENTRIES = 64
REPLAY_BYTES = 64 << 20


class ReplayCache:
    """Replies by replay key for the current generation; evicted keys are remembered by seq."""

    def __init__(self, gen: int = 0, entries: int = REPLAY_ENTRIES, budget: int = REPLAY_BYTES) -> None:
        self.entries, self.budget = entries, budget
        self.clear(gen)

    def clear(self, gen: int) -> None:
        """Forget everything: a new generation starts (its seq numbers are checked afresh)."""
        self.gen = gen
        self.replies: OrderedDict[tuple, tuple[list, int]] = OrderedDict()
        self.by_seq: dict[int, tuple] = {}
        self.bytes = 0
        self.evicted_seq = 0  # every seq <= this one was evicted (or never cached)

    def get(self, key: tuple) -> list | None:
        hit = self.replies.get(key)
        return None if hit is None else hit[0]

    def conflict(self, key: tuple) -> str | None:
        """Why a new request with this key may not run, or None."""
        seq = key[4]
        if key[1] != self.gen:
            return None  # a 'load' moving to a newer generation: the old cache does not apply
        if seq in self.by_seq and self.by_seq[seq] != key:
            return f"seq {seq} was already used for another request ({self.by_seq[seq][5]!r})"
        if seq <= self.evicted_seq:
            return f"seq {seq} is at or below the evicted replies (<= {self.evicted_seq}): reply evicted"
        return None

    def put(self, key: tuple, frames: list) -> None:
        size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
        self.replies[key] = (frames, size)
        self.by_seq[key[4]] = key
        self.bytes += size
        while len(self.replies) > self.entries or (self.bytes > self.budget and len(self.replies) > 1):
            old, (_, n) = self.replies.popitem(last=False)
            self.bytes -= n
            self.by_seq.pop(old[4], None)
            self.evicted_seq = max(self.evicted_seq, old[4])
