"""The serving process freezes its startup heap (server/interpreter.py): full collections no longer walk the
objects that existed before SERVING, while garbage made afterwards is still collected."""
import gc
import weakref

import pytest

from server.interpreter import freeze_startup_heap


class Node:
    def __init__(self):
        self.other = None


@pytest.fixture
def restore_gc():
    yield
    gc.unfreeze()
    gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "__module__", "") != "server.interpreter"]


def test_startup_objects_leave_the_collectors_generations_and_later_cycles_are_still_collected(restore_gc):
    startup = [Node() for _ in range(100)]
    frozen = freeze_startup_heap()
    assert frozen >= 100 and gc.get_freeze_count() == frozen
    tracked = {id(o) for o in gc.get_objects()}  # the permanent generation is not among them
    assert not any(id(o) in tracked for o in startup)
    assert any(getattr(c, "__module__", "") == "server.interpreter" for c in gc.callbacks)  # slow ones are logged

    a, b = Node(), Node()  # a cycle made after the freeze: only the collector can free it
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None
