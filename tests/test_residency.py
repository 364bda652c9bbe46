"""Model residency: hot reuse, LRU eviction under a budget, releasing by kind."""

from __future__ import annotations

from fluxkiln.engine.residency import Residency


def test_hot_model_is_reused_and_lru_evicted_under_budget():
    released = []
    res = Residency(budget=100)
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            return name.upper()
        return load

    assert res.get("a", loader("a"), size=40, release=released.append) == "A"
    assert res.get("b", loader("b"), size=40, release=released.append) == "B"
    assert res.get("a", loader("a"), size=40) == "A"  # hot: not loaded again, now most recent
    assert loads == ["a", "b"]
    res.get("c", loader("c"), size=40, release=released.append)  # over budget: b is least recently used
    assert released == ["B"] and res.keys() == ["a", "c"] and res.used == 80


def test_make_room_prefers_inference_models_and_release_kind():
    res = Residency(budget=100)
    res.put("captioner", "C", size=30, kind="captioner")
    res.put("pipe", "P", size=50, kind="inference")
    res.make_room(40)
    assert res.keys() == ["captioner"]
    res.put("pipe", "P", size=50)
    assert res.release_kind("captioner") == ["captioner"] and res.keys() == ["pipe"]


def test_unlimited_budget_never_evicts(monkeypatch):
    monkeypatch.delenv("FLUXKILN_MODEL_BUDGET_GB", raising=False)
    res = Residency()
    for i in range(5):
        res.put(str(i), i, size=10**12)
    assert len(res.keys()) == 5 and res.evictions == []
    monkeypatch.setenv("FLUXKILN_MODEL_BUDGET_GB", "1")
    assert Residency().budget == 2**30
