"""The serving process freezes its startup heap (server/gc_heap.py): full collections no longer walk the
objects that existed before SERVING, while garbage made afterwards is still collected."""
import gc
import weakref

import pytest

from server.gc_heap import GEN0_THRESHOLD, freeze_startup_heap


class Node:
    def __init__(self):
        self.other = None


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_startup_objects_leave_the_collectors_generations_and_later_cycles_are_still_collected(restore_gc):
    startup = [Node() for _ in range(100)]
    frozen = freeze_startup_heap()
    assert frozen >= 100 and gc.get_freeze_count() == frozen
    tracked = {id(o) for o in gc.get_objects()}  # the permanent generation is not among them
    assert not any(id(o) in tracked for o in startup)
    assert gc.get_threshold()[0] == GEN0_THRESHOLD

    a, b = Node(), Node()  # a cycle made after the freeze: only the collector can free it
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None
