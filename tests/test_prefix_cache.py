"""Prefix cache: LRU vs LFU eviction under a byte budget, the L1/L2 tiers, and KV reuse in the
fast engine giving the same tokens as computing the prefix again."""

from __future__ import annotations

import pytest

from runners.glm.prefix_cache import ByteBudgetStore, TieredPrefixCache


def _replay(policy: str, sequence: list[str], capacity: int = 3) -> list[str]:
    """Look each key up, inserting it (size 1) on a miss; return the keys left at the end."""
    store: ByteBudgetStore[str] = ByteBudgetStore(capacity, policy)
    for key in sequence:
        if store.get(key) is None:
            store.put(key, key.upper(), 1)
    return sorted(store.keys())


def test_lru_evicts_the_least_recently_used():
    # A is hot but was last used before B and C; D arrives: LRU drops A.
    assert _replay("lru", ["A", "A", "A", "B", "C", "D"]) == ["B", "C", "D"]


def test_lfu_evicts_the_least_frequently_used():
    # Same sequence: LFU keeps the thrice-used A and drops B (B and C used once; B is older).
    assert _replay("lfu", ["A", "A", "A", "B", "C", "D"]) == ["A", "C", "D"]


def test_lfu_ties_break_by_recency_and_hits_count():
    # After D: uses A1 B2 C1 D1 (full). E evicts the least used, and of those the oldest: A.
    assert _replay("lfu", ["A", "B", "C", "B", "D", "E"], capacity=4) == ["B", "C", "D", "E"]
    # LRU on the same sequence also drops A (least recent) — but with one more hit on A first,
    # LRU drops C while LFU keeps A (2 uses) and still drops C (1 use, older than D).
    assert _replay("lru", ["A", "B", "C", "B", "A", "D", "E"], capacity=4) == ["A", "B", "D", "E"]
    assert _replay("lfu", ["A", "B", "C", "B", "A", "D", "E"], capacity=4) == ["A", "B", "D", "E"]


def test_byte_budget_counts_sizes_and_refuses_oversized_entries():
    store: ByteBudgetStore[int] = ByteBudgetStore(100, "lru")
    assert store.put("a", 1, 60) == []
    evicted = store.put("b", 2, 50)  # 110 > 100: "a" must go
    assert [k for k, _, _ in evicted] == ["a"] and store.used_bytes == 50
    assert store.put("huge", 3, 101) == [("huge", 3, 101)]  # never stored
    assert "huge" not in store and store.used_bytes == 50
    store.put("b", 4, 70)  # replacing a key re-counts its size
    assert store.used_bytes == 70 and store.get("b") == 4


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        ByteBudgetStore(10, "fifo")


def test_tiers_demote_to_l2_and_promote_back_on_a_hit():
    moves: list[str] = []
    cache: TieredPrefixCache[str] = TieredPrefixCache(
        2, 2, "lru", to_l1=lambda v: moves.append(f"up:{v}") or v, to_l2=lambda v: moves.append(f"down:{v}") or v)
    cache.insert("p1", "kv1", 1)
    cache.insert("p2", "kv2", 1)
    cache.insert("p3", "kv3", 1)  # L1 full: p1 goes down to L2
    assert cache.l1.keys() == ["p2", "p3"] and cache.l2.keys() == ["p1"]
    assert cache.lookup("p1") == "kv1"  # L2 hit: promoted, p2 demoted
    assert cache.l1.keys() == ["p3", "p1"] and cache.l2.keys() == ["p2"]
    assert cache.lookup("nope") is None
    assert moves == ["down:kv1", "up:kv1", "down:kv2"]
    stats = cache.stats
    assert (stats.lookups, stats.hits_l1, stats.hits_l2, stats.hit_rate) == (2, 0, 1, 0.5)
    cache.insert("p4", "kv4", 1)
    cache.insert("p5", "kv5", 1)  # p3, p1 demoted; L2 (2 bytes) then drops p2
    assert cache.l2.keys() == ["p3", "p1"] and stats.evictions_l2 == 1


def test_fast_engine_reuses_prefix_kv_with_identical_tokens():
    import torch

    from runners.glm.engines.fast import FastEngine
    from runners.glm.fast_model import FastGlm
    from runners.glm.model import build_model

    model = FastGlm(build_model({"preset": "glm-tiny"}, torch.float32, "cpu", seed=0))
    engine = FastEngine(model, "cpu", compile_step=False)
    prefix = [11, 12, 13, 14, 15, 16]
    prompts = [prefix + [20, 21], prefix + [30, 31, 32]]
    plain = [torch.cat(list(engine.decode([p], 6)), dim=1) for p in prompts]

    engine.begin_trial(lambda r: [], None, "lfu", 1.0)
    cached = [torch.cat(list(engine.decode([p], 6, prefix_lens=[len(prefix)])), dim=1) for p in prompts]
    for a, b in zip(plain, cached, strict=True):
        assert a.tolist() == b.tolist()
    stats = engine.prefix_cache.stats
    assert (stats.lookups, stats.hits_l1, stats.tokens_reused) == (2, 1, len(prefix))
