"""PagePool: the host-side KV page allocator (null page, FIFO free list, refcounts)."""

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
    pool._free.append(pool._free[0])  # a duplicate in the free list
    with pytest.raises(AssertionError, match="more than once"):
        pool.check_invariants()

    pool = PagePool(num_pages=6, page_size=4)
    p = pool.allocate(1)[0]
    pool.refcounts[p] = 0  # used page lost its count: leaked
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_invariants()

    pool = PagePool(num_pages=6, page_size=4)
    pool.refcounts[pool._free[0]] = 1  # free page with an owner
    with pytest.raises(AssertionError, match="refcount != 0"):
        pool.check_invariants()

    pool = PagePool(num_pages=6, page_size=4)
    pool._free.append(NULL_PAGE)
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
