"""The Python heap around start-up (jserve/gc_heap.py): frozen after a build, thawed and
collected before the next, so that a dropped engine's cyclic garbage is freed then."""

from __future__ import annotations

import gc
import weakref


class _Node:
    def __init__(self) -> None:
        self.me = self   # a reference cycle: only the cyclic collector frees it


def test_freeze_keeps_cycles_out_of_collections_until_thaw():
    from jserve import gc_heap

    node = _Node()
    alive = weakref.ref(node)
    try:
        gc_heap.freeze()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None          # frozen: no collection looks at it
        gc_heap.thaw()
        assert alive() is None             # thawed and collected
    finally:
        gc.unfreeze()


def test_build_engine_freezes_the_heap_it_leaves(make_engine):
    try:
        make_engine("llama", max_num_batched_tokens=16, max_num_seqs=4)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
