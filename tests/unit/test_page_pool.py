"""PagePool: the host-side KV page allocator (null page, FIFO empty list, LRU of cached pages, refcounts)."""

import random

import pytest

from jserve.page_pool import NULL_PAGE, OutOfPagesError, PagePool


def test_sizes_and_null_page_never_handed_out():
    pool = PagePool(num_pages=5, page_size=4)
    assert (pool.num_total, pool.num_free, pool.num_used) == (4, 4, 0)
    assert pool.capacity_tokens == 16
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
    assert (pool.num_free, pool.num_used) == (0, 4)
    assert pool.refcounts.dtype.name == "int32"
    assert pool.refcounts.tolist() == [0, 1, 1, 1, 1]
    pool.check_invariants()


def test_shortage_raises_and_allocates_nothing():
    pool = PagePool(num_pages=4, page_size=2)
    pool.allocate(2)
    with pytest.raises(OutOfPagesError, match="asked for 2 pages, only 1 of 3 free"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(0) == []
    with pytest.raises(ValueError, match="negative"):
        pool.allocate(-1)
    pool.check_invariants()


def test_free_list_is_fifo():
    pool = PagePool(num_pages=6, page_size=1)
    a = pool.allocate(3)
    assert a == [1, 2, 3]
    pool.free([2])
    pool.free([1])
    # The untouched pages 4, 5 come first, then the ones freed, oldest free first.
    assert pool.allocate(4) == [4, 5, 2, 1]
    pool.check_invariants()


def test_refcounts_share_and_release():
    pool = PagePool(num_pages=4, page_size=8)
    p = pool.allocate(2)
    pool.incref(p[:1])
    assert pool.refcounts[p[0]] == 2
    pool.free(p)
    assert pool.num_used == 1 and pool.refcounts[p[0]] == 1  # still owned once
    pool.free(p[:1])
    assert pool.num_free == pool.num_total
    pool.check_invariants()


@pytest.mark.parametrize("bad, msg", [([0], "null page"), ([7], "out of range"), ([-1], "out of range")])
def test_bad_ids_rejected(bad, msg):
    pool = PagePool(num_pages=4, page_size=8)
    pool.allocate(3)
    with pytest.raises(ValueError, match=msg):
        pool.free(bad)
    with pytest.raises(ValueError, match=msg):
        pool.incref(bad)
    pool.check_invariants()


def test_double_free_and_incref_of_free_page_are_errors_and_atomic():
    pool = PagePool(num_pages=5, page_size=8)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match=f"page {a} 1 time\\(s\\), but it is a free page"):
        pool.free([a])
    with pytest.raises(ValueError, match="free"):
        pool.incref([a])
    # [b, b] drops two owners of a page that has one: rejected before anything changes.
    with pytest.raises(ValueError, match=f"page {b} 2 time"):
        pool.free([b, b])
    assert pool.refcounts[b] == 1
    # A mixed list with one bad id changes nothing either.
    with pytest.raises(ValueError):
        pool.free([b, a])
    assert pool.refcounts[b] == 1 and pool.num_free == 3
    pool.check_invariants()


def test_pages_needed():
    pool = PagePool(num_pages=8, page_size=16)
    assert [pool.pages_needed(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        pool.pages_needed(-1)


@pytest.mark.parametrize("num_pages, page_size", [(1, 16), (0, 16), (4, 0), (2.5, 4)])
def test_constructor_validation(num_pages, page_size):
    with pytest.raises(ValueError):
        PagePool(num_pages, page_size)


def test_check_invariants_catches_corruption():
    pool = PagePool(num_pages=6, page_size=4)
    pool.allocate(2)
    pool.check_invariants()
    pool._empty.append(pool._empty[0])  # a duplicate in the free list
    with pytest.raises(AssertionError, match="more than once"):
        pool.check_invariants()

    pool = PagePool(num_pages=6, page_size=4)
    p = pool.allocate(1)[0]
    pool.refcounts[p] = 0  # used page lost its count: leaked
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_invariants()

    pool = PagePool(num_pages=6, page_size=4)
    pool.refcounts[pool._empty[0]] = 1  # free page with an owner
    with pytest.raises(AssertionError, match="refcount != 0"):
        pool.check_invariants()

    pool = PagePool(num_pages=6, page_size=4)
    pool._empty.append(NULL_PAGE)
    with pytest.raises(AssertionError, match="null page"):
        pool.check_invariants()


def test_random_alloc_free_incref_keeps_invariants():
    rng = random.Random(0)
    pool = PagePool(num_pages=33, page_size=4)
    owned: list[int] = []  # one entry per reference held
    for _ in range(3000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 5)
            if n <= pool.num_free:
                owned += pool.allocate(n)
            else:
                with pytest.raises(OutOfPagesError):
                    pool.allocate(n)
        elif op < 0.55 and owned:
            p = rng.choice(owned)
            pool.incref([p])
            owned.append(p)
        elif owned:
            rng.shuffle(owned)
            k = rng.randint(1, len(owned))
            pool.free(owned[:k])
            owned = owned[k:]
        pool.check_invariants()
        assert pool.num_used == len(set(owned))
        for p in set(owned):
            assert pool.refcounts[p] == owned.count(p)
    pool.free(owned)
    assert pool.num_free == pool.num_total
    pool.check_invariants()


# ------------------------------------------------------------------ cached pages


def test_cached_pages_become_evictable_and_are_evicted_lru_after_empty_ones():
    pool = PagePool(num_pages=7, page_size=4)  # 6 usable
    evicted = []
    pool.on_evict = evicted.append
    a = pool.allocate(4)  # [1, 2, 3, 4]; 5, 6 stay empty
    for p in a[:3]:
        pool.mark_cached(p)
    pool.free([a[1]])
    pool.free([a[0]])
    pool.free([a[3]])  # not cached: back to the empty list
    assert (pool.num_empty, pool.num_evictable, pool.num_used) == (3, 2, 1)
    assert pool.num_free == pool.num_empty + pool.num_evictable == 5
    assert pool.num_empty + pool.num_evictable + pool.num_used == pool.num_total
    pool.check_invariants()
    # Empty pages first (FIFO), then the least recently freed cached page.
    assert pool.allocate(4) == [5, 6, a[3], a[1]] and evicted == [a[1]]
    assert not pool.cached[a[1]] and pool.num_evictions == 1
    pool.check_invariants()


def test_incref_takes_an_evictable_page_back_and_refreshes_nothing_else():
    pool = PagePool(num_pages=4, page_size=4)
    pool.on_evict = lambda p: None
    p, q, r = pool.allocate(3)
    for x in (p, q):
        pool.mark_cached(x)
    pool.free([p, q])
    pool.incref([p])  # a prefix-cache hit: evictable -> used, still cached
    assert pool.refcounts[p] == 1 and pool.cached[p] and not pool.is_evictable(p)
    assert pool.num_evictable == 1 and pool.num_free == 1
    pool.free([p])  # now the most recently used: q goes first
    pool.free([r])
    assert pool.allocate(2) == [r, q]
    pool.check_invariants()
    pool.free([r])  # not cached: empty, nothing to take back
    with pytest.raises(ValueError, match="free and holds no cached"):
        pool.incref([r])


def test_mark_cached_needs_a_used_page_and_drop_cached_empties_evictables():
    pool = PagePool(num_pages=5, page_size=2)
    with pytest.raises(ValueError, match="not in use"):
        pool.mark_cached(1)
    pages = pool.allocate(3)
    for p in pages:
        pool.mark_cached(p)
    pool.free(pages[:2])
    assert sorted(pool.drop_cached()) == sorted(pages[:2])
    assert pool.num_evictable == 0 and pool.num_empty == 3 and pool.cached[pages[2]]
    pool.check_invariants()


def test_check_invariants_catches_cached_flag_corruption():
    pool = PagePool(num_pages=5, page_size=2)
    p = pool.allocate(1)[0]
    pool.free([p])
    pool.cached[p] = True  # an empty page that claims cached K/V
    with pytest.raises(AssertionError, match="empty pages flagged cached"):
        pool.check_invariants()
    pool = PagePool(num_pages=5, page_size=2)
    p = pool.allocate(1)[0]
    pool.mark_cached(p)
    pool.free([p])
    pool.cached[p] = False
    with pytest.raises(AssertionError, match="evictable pages not flagged"):
        pool.check_invariants()
