"""Prefix-cache bookkeeping: byte-budgeted LRU/LFU stores and a two-tier (L1/L2) cache.

Torch-free on purpose: the eviction rules are plain data structures that tests check on known
request sequences; the engine injects how a value moves between tiers (GPU <-> CPU memory).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

V = TypeVar("V")
POLICIES = ("lru", "lfu")


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    uses: int = 1  # LFU frequency: inserts and hits
    last_use: int = 0  # logical clock of the last insert/hit; breaks LFU ties (older goes first)


class ByteBudgetStore(Generic[V]):
    """Key -> value with a byte budget; evicts by `policy` when an insert would exceed it.

    lru: the least recently used entry goes first. lfu: the least frequently used entry goes
    first (inserts and hits count), ties broken by least recent use. An entry larger than the
    whole budget is not stored.
    """

    def __init__(self, capacity_bytes: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity_bytes = int(capacity_bytes)
        self.policy = policy
        self.used_bytes = 0
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._tick = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._touch(key, entry)
        return entry.value

    def put(self, key: Hashable, value: V, size: int) -> list[tuple[Hashable, V, int]]:
        """Insert (or replace) `key`; returns the evicted (key, value, size) triples."""
        old = self._entries.pop(key, None)
        uses = 0
        if old is not None:
            self.used_bytes -= old.size
            uses = old.uses
        if size > self.capacity_bytes:
            return [(key, value, size)]
        evicted = []
        while self.used_bytes + size > self.capacity_bytes:
            evicted.append(self._evict_one())
        entry = _Entry(value, int(size), uses)
        self._entries[key] = entry
        self.used_bytes += entry.size
        self._touch(key, entry)
        return evicted

    def pop(self, key: Hashable) -> tuple[V, int] | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.used_bytes -= entry.size
        return entry.value, entry.size

    def _touch(self, key: Hashable, entry: _Entry[V]) -> None:
        self._tick += 1
        entry.uses += 1
        entry.last_use = self._tick
        self._entries.move_to_end(key)

    def _victim(self) -> Hashable:
        if self.policy == "lru":
            return next(iter(self._entries))
        return min(self._entries, key=lambda k: (self._entries[k].uses, self._entries[k].last_use))

    def _evict_one(self) -> tuple[Hashable, V, int]:
        key = self._victim()
        entry = self._entries.pop(key)
        self.used_bytes -= entry.size
        return key, entry.value, entry.size


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits_l1: int = 0
    hits_l2: int = 0
    inserts: int = 0
    evictions_l1: int = 0
    evictions_l2: int = 0
    tokens_reused: int = 0  # prefill tokens actually skipped thanks to a hit
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return (self.hits_l1 + self.hits_l2) / self.lookups if self.lookups else 0.0


class TieredPrefixCache(Generic[V]):
    """L1 (device memory) backed by L2 (host memory), each byte-budgeted with one policy.

    An L1 eviction demotes the entry to L2 (`to_l2` moves it); an L2 hit promotes it back
    (`to_l1`); an L2 eviction drops it.
    """

    def __init__(self, l1_bytes: int, l2_bytes: int, policy: str,
                 to_l1: Callable[[V], V] = lambda v: v, to_l2: Callable[[V], V] = lambda v: v) -> None:
        self.l1: ByteBudgetStore[V] = ByteBudgetStore(l1_bytes, policy)
        self.l2: ByteBudgetStore[V] = ByteBudgetStore(l2_bytes, policy)
        self._to_l1 = to_l1
        self._to_l2 = to_l2
        self.stats = PrefixCacheStats()

    def lookup(self, key: Hashable) -> V | None:
        self.stats.lookups += 1
        value = self.l1.get(key)
        if value is not None:
            self.stats.hits_l1 += 1
            return value
        demoted = self.l2.pop(key)
        if demoted is None:
            return None
        self.stats.hits_l2 += 1
        value, size = demoted
        value = self._to_l1(value)
        self._put_l1(key, value, size)
        return value

    def insert(self, key: Hashable, value: V, size: int) -> None:
        self.stats.inserts += 1
        self._put_l1(key, value, size)

    def _put_l1(self, key: Hashable, value: V, size: int) -> None:
        for old_key, old_value, old_size in self.l1.put(key, value, size):
            self.stats.evictions_l1 += 1
            dropped = self.l2.put(old_key, self._to_l2(old_value), old_size)
            self.stats.evictions_l2 += len(dropped)


PREFIX_L2_FACTOR = 4  # the host-memory tier holds this many times the device budget


def engine_prefix_cache(policy: str, budget_mib: float, device: str) -> TieredPrefixCache[Any] | None:
    """An engine's prefix cache for the `prefix_cache` / `prefix_cache_mib` knobs: `budget_mib`
    of device memory (L1) over `PREFIX_L2_FACTOR` times that of host memory (L2); None when off.
    Entries are a KV tensor or a tuple of them (int8 codes and scales); L1 holds them on
    `device`, L2 in host memory."""
    if policy == "off":
        return None
    l1 = int(float(budget_mib) * 2**20)
    return TieredPrefixCache(l1, PREFIX_L2_FACTOR * l1, policy, to_l1=lambda kv: _moved(kv, device, True),
                             to_l2=lambda kv: _moved(kv, "cpu", False))


def _moved(kv: Any, device: str, non_blocking: bool) -> Any:
    if isinstance(kv, tuple):
        return tuple(t.to(device, non_blocking=non_blocking) for t in kv)
    return kv.to(device, non_blocking=non_blocking)


def prefix_counts(cache: TieredPrefixCache[Any] | None) -> dict[str, float]:
    """An engine's prefix-cache counters (serving takes the window's delta of these); {} when off."""
    if cache is None:
        return {}
    stats = cache.stats
    return {"prefix_lookups": float(stats.lookups), "prefix_hits": float(stats.hits_l1 + stats.hits_l2),
            "prefix_tokens_reused": float(stats.tokens_reused)}
