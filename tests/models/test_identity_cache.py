"""IdentityCache: lookups by identity, entries gone with their object, no confusion on id reuse."""

import gc

import torch

from loraforge.models.identity_cache import IdentityCache


def test_values_by_identity_and_dropped_with_the_object():
    cache = IdentityCache()
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))  # equal values, distinct
    cache[a] = "a"
    assert cache.get(a) == "a" and cache.get(b) is None and len(cache) == 1
    cache[a] = "a2"  # replacing an entry keeps one
    assert cache.get(a) == "a2" and len(cache) == 1
    del a
    gc.collect()
    assert len(cache) == 0


def test_a_new_object_at_a_dead_objects_address_finds_nothing():
    cache = IdentityCache()
    for _ in range(200):  # CPython reuses the freed slot: the same id() comes back
        obj = torch.nn.Parameter(torch.zeros(1))
        assert cache.get(obj) is None
        cache[obj] = object()
        del obj
    assert len(cache) == 0
