"""Tests for promptbank.router and promptbank.embed (fast; one real-model test marked real_model)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from promptbank import embed as embed_module
from promptbank.embed import (
    DEFAULT_EMBEDDER,
    Embedder,
    HashingEmbedder,
    SentenceEmbedder,
    load_embedder,
)
from promptbank.errors import TaskExistsError, TaskNotFoundError
from promptbank.router import NO_TASK, Router, calibrate_threshold, make_prototypes, recall_at_1

DIM = 32


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_scores(keys: dict[str, np.ndarray], q: np.ndarray, top_keys: int) -> np.ndarray:
    cols = []
    for k in keys.values():
        sims = q.astype(np.float64) @ k.astype(np.float64).T
        a = min(top_keys, k.shape[0])
        cols.append(np.sort(sims, axis=1)[:, ::-1][:, :a].mean(axis=1))
    return np.stack(cols, axis=1) if cols else np.zeros((q.shape[0], 0))


def brute_route(keys: dict[str, np.ndarray], q: np.ndarray, top_keys: int, top_k: int):
    s = brute_scores(keys, q, top_keys)
    names = list(keys)
    out = []
    for row in s:
        order = np.argsort(-row, kind="stable")[:top_k]
        out.append([(names[j], float(row[j])) for j in order])
    return out


def assert_routes_equal(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=atol)


def make_router(rng, n_tasks=12, top_keys=1, clustered=False):
    router = Router(DIM, top_keys=top_keys)
    keys = {}
    for i in range(n_tasks):
        m = int(rng.integers(1, 20))
        if clustered:  # each task's keys around its own centre
            centre = unit(rng, 1)
            k = centre + 0.3 * rng.standard_normal((m, DIM)).astype(np.float32) / np.sqrt(DIM)
            k = (k / np.linalg.norm(k, axis=1, keepdims=True)).astype(np.float32)
        else:
            k = unit(rng, m)
        keys[f"task{i}"] = k
        router.add(f"task{i}", k, threshold=0.5)
    return router, keys


# ---------------------------------------------------------------------------------------------
# Router: exactness against brute force
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_keys", [1, 3])
@pytest.mark.parametrize("clustered", [False, True])
def test_scores_and_route_equal_brute_force(top_keys, clustered):
    rng = np.random.default_rng(top_keys + 10 * clustered)
    router, keys = make_router(rng, top_keys=top_keys, clustered=clustered)
    assert router.ntotal == sum(k.shape[0] for k in keys.values())
    q = unit(rng, 40)
    if clustered:  # queries near stored keys as well as random ones
        near = np.concatenate(list(keys.values()))[rng.integers(0, router.ntotal, 40)]
        q = np.concatenate([q, near + 0.05 * unit(rng, 40)])
        q /= np.linalg.norm(q, axis=1, keepdims=True)

    s = router.scores(q)
    assert s.shape == (q.shape[0], len(keys)) and s.dtype == np.float32
    np.testing.assert_allclose(s, brute_scores(keys, q, top_keys), atol=1e-5)

    for top_k in (1, 3, len(keys), len(keys) + 5):
        assert_routes_equal(router.route(q, top_k=top_k), brute_route(keys, q, top_keys, top_k))


def test_route_uses_faiss_partial_search_when_it_suffices():
    rng = np.random.default_rng(5)
    router, keys = make_router(rng, n_tasks=20, clustered=True)
    q = keys["task7"][:1] + 0.01 * unit(rng, 1)
    q /= np.linalg.norm(q)

    def no_exhaustive(_q):
        raise AssertionError("fell back to exhaustive scoring")

    router._exact_scores = no_exhaustive  # the index search must be enough here
    got = router.route(q, top_k=1)
    assert got[0][0][0] == "task7"
    del router._exact_scores
    assert_routes_equal(got, brute_route(keys, q, 1, 1))


def test_index_is_built_only_when_a_search_needs_it():
    rng = np.random.default_rng(6)
    router, keys = make_router(rng, n_tasks=20, clustered=True)
    q = keys["task3"][:2] + 0.01 * unit(rng, 2)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    router.remove("task5")
    router.add("task5", keys["task5"], 0.5)
    exact = router.scores(q)  # exact scores, thresholds, keys: no index
    assert router._index is None and router.ntotal == sum(len(k) for k in keys.values())
    got = router.route(q, top_k=2)  # a partial search: builds the index now
    assert router._index is not None and router._index.ntotal == router.ntotal
    assert_routes_equal(got, brute_route({n: router.keys(n) for n in router.tasks}, q, router.top_keys, 2))
    assert np.array_equal(router.scores(q), exact)
    state = {
        "keys": {n: router.keys(n) for n in router.tasks},
        "thresholds": router.thresholds,
        "top_keys": router.top_keys,
        "ids": {n: router.ids(n) for n in router.tasks},
        "next_id": router.next_id,
    }
    eager = Router.from_keys(**state)
    eager.rebuild_index()  # built now, as before indexes were lazy: the same index
    assert eager.index_bytes() == router.index_bytes()
    restored = Router.from_keys(**state, index_bytes=router.index_bytes())
    assert restored._index is None  # adopted on first use
    assert restored.route(q, top_k=2) == got and restored._index is not None


def test_copy_shares_the_read_only_keys_and_nothing_else():
    rng = np.random.default_rng(9)
    router, keys = make_router(rng, n_tasks=5, top_keys=2)
    dup = router.copy()
    assert dup.tasks == router.tasks and dup.next_id == router.next_id and dup.index_config == router.index_config
    for n in router.tasks:  # the same arrays, not copies
        assert dup.keys(n, copy=False) is router.keys(n, copy=False)
        assert np.array_equal(dup.ids(n), router.ids(n))
    with pytest.raises(ValueError):
        dup.keys("task0", copy=False)[0, 0] = 1.0  # read-only
    assert router.keys("task0") is not router.keys("task0", copy=False)  # the default is a copy
    dup.set_threshold("task1", 0.9)
    dup.remove("task2")
    dup.add("new", unit(rng, 3), 0.1)
    assert router.threshold("task1") == 0.5 and "task2" in router and "new" not in router
    q = unit(rng, 4)
    assert_routes_equal(router.route(q, top_k=3), brute_route(keys, q, 2, 3))
    hnsw = router.copy(index="hnsw", ef_search=64)
    assert hnsw.index_kind == "hnsw" and hnsw.index_config["ef_search"] == 64 and router.index_kind == "flat"


def test_concurrent_first_searches_build_the_index_once():
    import threading
    import time

    rng = np.random.default_rng(8)
    router, keys = make_router(rng, n_tasks=30, clustered=True)
    q = keys["task4"][:1] + 0.01 * unit(rng, 1)
    q /= np.linalg.norm(q)
    builds, build = [], router.rebuild_index

    def counting_rebuild():  # slow enough that every thread reaches the check while the first one builds
        builds.append(1)
        time.sleep(0.05)
        build()

    router.rebuild_index = counting_rebuild
    barrier, results = threading.Barrier(6), []

    def search():
        barrier.wait()
        results.append(router.route(q, top_k=2))

    threads = [threading.Thread(target=search) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 6 and all(r == results[0] for r in results)
    assert_routes_equal(results[0], brute_route(keys, q, router.top_keys, 2))


def test_a_bank_keeps_one_copy_of_its_keys(tiny_bank, tmp_path):
    """The task table and the router hold the same read-only key arrays, after learning, after later tasks and after
    loading (a bank's keys dominate its memory: 256 keys x 768 floats per task by default)."""
    from conftest import fast_options

    from promptbank import PromptBank

    for name, word in (("weather", "rain"), ("sport", "match")):
        rows = [{"text": f"{word} report number {i}", "label": "a" if i % 2 else "b"} for i in range(10)]
        tiny_bank.learn_task(name, rows, **fast_options())
    for n in tiny_bank.tasks:
        assert tiny_bank._tasks[n].keys is tiny_bank.router.keys(n, copy=False)
    tiny_bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b", backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)
    for n in loaded.tasks:
        assert loaded._tasks[n].keys is loaded.router.keys(n, copy=False)
        assert np.array_equal(loaded._tasks[n].keys, tiny_bank._tasks[n].keys)


def test_a_knn_bank_with_an_approximate_index_extends_it_task_by_task(tiny_backbone, hashing_embedder, monkeypatch):
    """A bank routed by the knn scorer searches its router in every learn_task (warm start); with HNSW that search
    used to rebuild the whole graph of the freshly published router each time. Now only the first one builds."""
    from conftest import fast_options

    from promptbank import PromptBank

    bank = PromptBank(tiny_backbone, hashing_embedder, routing="knn")
    bank.set_index("hnsw")
    rebuilds = _count_rebuilds(monkeypatch)
    for name, word in (("weather", "rain"), ("sport", "match"), ("food", "soup"), ("music", "song")):
        rows = [{"text": f"{word} report number {i}", "label": "a" if i % 2 else "b"} for i in range(40)]
        bank.learn_task(name, rows, **fast_options(max_steps=1))
    assert bank.router.ntotal > 100  # past the size that routes by exact scores alone (32 keys)
    assert bank.route("soup report number 3").task == "food"
    assert len(rebuilds) == 1  # the warm-start search of the second task; the later ones extend that index
    assert bank.router.index_kind == "hnsw" and bank.router.ntotal == sum(len(bank.router.ids(t)) for t in bank.tasks)


def test_a_learned_router_bank_never_imports_faiss(tmp_path):
    """Training classification tasks, routing, predicting and loading a bank with the learned router need no FAISS
    index; only saving (the index is cached on disk) imports it, and generation tasks' k-means keys at training.
    In fresh processes: this one has imported faiss already."""
    tests = os.path.dirname(os.path.abspath(__file__))
    common = f"""
import sys
sys.path.insert(0, {tests!r})
from conftest import make_tiny_model, make_tiny_tokenizer, fast_options
from promptbank import PromptBank
from promptbank.backbone import from_model
from promptbank.embed import HashingEmbedder
tok = make_tiny_tokenizer()
bb = from_model(make_tiny_model(len(tok)), tok, name="tiny-llama-gqa")
"""
    learn = (
        common
        + f"""
bank = PromptBank(bb, HashingEmbedder(dim=64))
bank.learn_task("weather", [{{"text": f"rain and wind on day {{i}}", "label": "yes" if i % 2 else "no"}}
                            for i in range(12)], **fast_options())
bank.learn_task("sport", [{{"text": f"the match ended {{i}} to {{i + 1}}", "label": "home" if i % 2 else "away"}}
                          for i in range(12)], **fast_options())
assert bank.routing == "lda"
assert bank.route("rain and wind on day 40").ranked[0][0] == "weather"
bank.predict(["the match ended 3 to 4", "rain today"])
assert "faiss" not in sys.modules, "faiss imported before saving"
bank.save({str(tmp_path / "b")!r})
assert "faiss" in sys.modules
"""
    )
    load = (
        common
        + f"""
bank = PromptBank.load({str(tmp_path / "b")!r}, backbone=bb, embedder=HashingEmbedder(dim=64), trust_index=True)
assert bank.route("the match ended 9 to 10").ranked[0][0] == "sport"
bank.predict(["rain and wind on day 7"])
assert "faiss" not in sys.modules, "faiss imported by loading or routing"
"""
    )
    for code in (learn, load):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]


def test_ties_break_by_insertion_order():
    rng = np.random.default_rng(1)
    shared = unit(rng, 3)
    router = Router(DIM, top_keys=2)
    router.add("b", shared, 0.0)
    router.add("a", shared.copy(), 0.0)
    router.add("c", unit(rng, 40), 0.0)
    q = shared[:1]
    ranked = router.route(q, top_k=2)[0]
    assert [t for t, _ in ranked] == ["b", "a"]
    assert ranked[0][1] == pytest.approx(ranked[1][1], abs=1e-6)


def test_single_query_vector_and_empty_inputs():
    rng = np.random.default_rng(2)
    router, keys = make_router(rng, n_tasks=3)
    q = unit(rng, 1)
    assert router.scores(q[0]).shape == (1, 3)
    assert router.route(q[0]) == router.route(q)
    assert router.scores(np.zeros((0, DIM), np.float32)).shape == (0, 3)
    assert router.route(np.zeros((0, DIM), np.float32)) == []

    empty = Router(DIM)
    assert empty.scores(q).shape == (1, 0)
    assert empty.route(q) == [[]]
    assert empty.decide(q) == [NO_TASK]


# ---------------------------------------------------------------------------------------------
# Router: add / remove / ids / thresholds
# ---------------------------------------------------------------------------------------------


def test_add_remove_readd_keeps_ids_stable_and_results_exact():
    rng = np.random.default_rng(3)
    router, keys = make_router(rng, n_tasks=5, top_keys=3)
    ids_before = {t: router.ids(t) for t in router.tasks}
    first_next = router.next_id

    router.remove("task2")
    del keys["task2"]
    assert router.tasks == list(keys)
    assert "task2" not in router
    assert router.ntotal == sum(k.shape[0] for k in keys.values())
    for t in router.tasks:  # other tasks keep their ids
        np.testing.assert_array_equal(router.ids(t), ids_before[t])

    new = unit(rng, 4)
    router.add("task2", new, 0.1)
    keys["task2"] = new
    assert router.tasks[-1] == "task2"
    assert router.ids("task2").min() >= first_next  # ids are never reused
    q = unit(rng, 30)
    for top_k in (1, 3, 10):
        assert_routes_equal(router.route(q, top_k=top_k), brute_route(keys, q, 3, top_k))
    np.testing.assert_allclose(router.scores(q), brute_scores(keys, q, 3), atol=1e-5)

    for t in list(router.tasks):
        router.remove(t)
    assert router.ntotal == 0 and router.tasks == []
    assert router.route(q[:1]) == [[]]


def test_missing_and_duplicate_tasks():
    rng = np.random.default_rng(4)
    router = Router(DIM)
    router.add("a", unit(rng, 2), 0.3)
    with pytest.raises(TaskExistsError):
        router.add("a", unit(rng, 2), 0.3)
    with pytest.raises(ValueError):  # TaskExistsError is a ValueError
        router.add("a", unit(rng, 2), 0.3)
    for call in (
        lambda: router.remove("zzz"),
        lambda: router.keys("zzz"),
        lambda: router.threshold("zzz"),
        lambda: router.set_threshold("zzz", 0.1),
    ):
        with pytest.raises(TaskNotFoundError) as ei:
            call()
        assert isinstance(ei.value, KeyError)
        assert "zzz" in str(ei.value)


def test_keys_are_copies():
    rng = np.random.default_rng(6)
    k = unit(rng, 3)
    router = Router(DIM)
    router.add("a", k, 0.2)
    k[:] = 0  # the caller's array is not held
    got = router.keys("a")
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)
    got[:] = 0
    assert np.allclose(np.linalg.norm(router.keys("a"), axis=1), 1.0)


def test_decide_applies_per_task_thresholds():
    rng = np.random.default_rng(7)
    ka, kb = unit(rng, 4), unit(rng, 4)
    router = Router(DIM)
    router.add("a", ka, threshold=0.9)
    router.add("b", kb, threshold=0.9)
    near_a = ka[0] + 0.02 * unit(rng, 1)[0]
    near_a /= np.linalg.norm(near_a)
    far = unit(rng, 1)[0]
    q = np.stack([near_a, far])
    assert router.decide(q) == ["a", NO_TASK]
    best_far = router.route(far, top_k=1)[0][0]
    router.set_threshold(best_far[0], best_far[1])  # score >= threshold -> accepted
    assert router.decide(q) == ["a", best_far[0]]
    router.set_threshold("a", 1.5)
    assert router.decide(near_a)[0] in (NO_TASK, "b")
    assert router.threshold("a") == 1.5
    assert router.thresholds == {"a": 1.5, "b": router.threshold("b")}


# ---------------------------------------------------------------------------------------------
# Router: validation
# ---------------------------------------------------------------------------------------------


def test_add_validates_keys_and_threshold():
    rng = np.random.default_rng(8)
    router = Router(DIM)
    good = unit(rng, 3)
    bad_inputs = {
        "wrong dim": unit(rng, 3, DIM + 1),
        "1-D": good[0],
        "3-D": good[None],
        "empty": np.zeros((0, DIM), np.float32),
        "nan": np.where(np.arange(DIM) == 0, np.nan, good),
        "inf": np.where(np.arange(DIM) == 0, np.inf, good),
        "not normalised": good * 1.01,
        "zero": np.zeros((2, DIM), np.float32),
        "strings": np.array([["x"] * DIM]),
    }
    for why, k in bad_inputs.items():
        with pytest.raises(ValueError):
            router.add(f"t-{why}", k, 0.5)
    with pytest.raises(ValueError, match="row 1"):
        router.add("t", np.stack([good[0], good[1] * 2]), 0.5)
    router.add("within tolerance", good * (1 + 5e-4), 0.5)  # tolerance 1e-3
    assert router.tasks == ["within tolerance"]  # nothing half-added by the failures
    with pytest.raises(ValueError):
        router.add("nan threshold", good, float("nan"))
    with pytest.raises(TypeError):
        router.add("str threshold", good, "high")
    with pytest.raises(ValueError):
        router.add("", good, 0.5)
    with pytest.raises(ValueError):
        router.set_threshold("within tolerance", float("inf"))
    assert router.ntotal == 3


def test_query_and_constructor_validation():
    rng = np.random.default_rng(9)
    router, _ = make_router(rng, n_tasks=3)
    with pytest.raises(ValueError):
        router.scores(unit(rng, 2, DIM + 1))
    with pytest.raises(ValueError):
        router.route(np.full((1, DIM), np.nan))
    with pytest.raises(ValueError):
        router.route(unit(rng, 1), top_k=0)
    with pytest.raises(ValueError):
        router.decide(np.zeros((1, 2, DIM)))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            Router(bad)
        with pytest.raises(ValueError):
            Router(DIM, top_keys=bad)


# ---------------------------------------------------------------------------------------------
# Router: index rebuild and persistence
# ---------------------------------------------------------------------------------------------


def test_rebuild_index_is_deterministic():
    rng = np.random.default_rng(10)
    r1, keys = make_router(rng, n_tasks=6)
    r1.remove("task1")
    before = r1.index_bytes()
    r1.rebuild_index()
    assert r1.index_bytes() == before

    r2 = Router(DIM)
    for t, k in keys.items():
        r2.add(t, k, 0.5)
    r2.remove("task1")
    assert r2.index_bytes() == before


def test_from_keys_adopts_matching_index_and_rebuilds_otherwise():
    rng = np.random.default_rng(11)
    router, _ = make_router(rng, n_tasks=6, top_keys=3)
    router.remove("task3")
    state = dict(
        keys={t: router.keys(t) for t in router.tasks},
        thresholds=router.thresholds,
        top_keys=3,
        ids={t: router.ids(t) for t in router.tasks},
        next_id=router.next_id,
    )
    blob = router.index_bytes()
    q = unit(rng, 20)
    want = router.route(q, top_k=4)

    same = Router.from_keys(**state, index_bytes=blob)
    assert same.index_bytes() == blob
    assert same.tasks == router.tasks and same.next_id == router.next_id
    assert same.route(q, top_k=4) == want

    other, _ = make_router(np.random.default_rng(99), n_tasks=6, top_keys=3)
    for bad_blob in (b"not an index", blob[: len(blob) // 2], other.index_bytes()):
        restored = Router.from_keys(**state, index_bytes=bad_blob)
        assert restored.index_bytes() == blob  # rebuilt from the keys, same ids
        assert restored.route(q, top_k=4) == want

    # a different key set under the same ids: vectors differ -> rebuild
    tampered = dict(state, keys={t: k[::-1].copy() for t, k in state["keys"].items()})
    restored = Router.from_keys(**tampered, index_bytes=blob)
    assert restored.index_bytes() != blob
    np.testing.assert_allclose(restored.scores(q), router.scores(q), atol=1e-6)

    # without ids, ids are assigned 0.. in task order: the stale blob (it has a gap) is not used
    fresh = Router.from_keys(state["keys"], state["thresholds"], top_keys=3, index_bytes=blob)
    assert fresh.ids(fresh.tasks[0])[0] == 0
    assert fresh.next_id == fresh.ntotal
    assert fresh.route(q, top_k=4) == want

    with pytest.raises(ValueError):
        Router.from_keys(state["keys"], {"only": 0.1})
    with pytest.raises(ValueError):
        Router.from_keys({}, {})
    assert Router.from_keys({}, {}, dim=DIM).ntotal == 0
    with pytest.raises(ValueError):
        Router.from_keys(**dict(state, next_id=0))


# ---------------------------------------------------------------------------------------------
# make_prototypes / calibrate_threshold
# ---------------------------------------------------------------------------------------------


def test_make_prototypes_few_rows_returns_rows():
    rng = np.random.default_rng(12)
    x = unit(rng, 5) * 3.0
    p = make_prototypes(x, 16)
    assert p.shape == (5, DIM) and p.dtype == np.float32
    np.testing.assert_allclose(p, x / 3.0, atol=1e-6)


def test_make_prototypes_kmeans_shape_norm_determinism():
    rng = np.random.default_rng(13)
    centres = unit(rng, 4)
    x = np.repeat(centres, 50, axis=0) + 0.05 * rng.standard_normal((200, DIM)).astype(np.float32)
    p1 = make_prototypes(x, 4, seed=0)
    p2 = make_prototypes(x, 4, seed=0)
    assert p1.shape == (4, DIM) and p1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(p1, p2)
    # each true centre has a prototype close to it
    assert (centres @ p1.T).max(axis=1).min() > 0.95


def test_make_prototypes_validation():
    rng = np.random.default_rng(14)
    with pytest.raises(ValueError):
        make_prototypes(np.zeros((0, DIM), np.float32))
    with pytest.raises(ValueError):
        make_prototypes(np.full((3, DIM), np.nan))
    with pytest.raises(ValueError):
        make_prototypes(np.zeros((3, DIM), np.float32))
    with pytest.raises(ValueError):
        make_prototypes(unit(rng, 3), 0)
    with pytest.raises(ValueError):
        make_prototypes(unit(rng, 3)[0])


def test_calibrate_threshold():
    s = np.linspace(0.0, 1.0, 101)
    assert calibrate_threshold(s, 0.05) == pytest.approx(0.05)
    assert calibrate_threshold(s, 0.5) == pytest.approx(0.5)
    assert calibrate_threshold(s - 2.0, 0.05) == 0.0  # floor
    assert calibrate_threshold(s - 2.0, 0.05, floor=-5.0) == pytest.approx(-1.95)
    assert isinstance(calibrate_threshold(s), float)
    for bad in ([], [0.1, np.nan]):
        with pytest.raises(ValueError):
            calibrate_threshold(np.asarray(bad))
    with pytest.raises(ValueError):
        calibrate_threshold(s, 1.5)


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


def test_hashing_embedder_basics():
    e = HashingEmbedder()
    assert e.name == "hashing-256" and e.dim == 256
    assert isinstance(e, Embedder)
    texts = ["how do I reset my password", "", "!!!", "Hello, World"]
    v = e.encode(texts)
    assert v.shape == (4, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(v, HashingEmbedder(256).encode(texts, batch_size=1))
    np.testing.assert_array_equal(e.encode(["hello world"]), e.encode(["HELLO   world!"]))
    assert e.encode([]).shape == (0, 256)
    assert HashingEmbedder(64).encode(["x"]).shape == (1, 64)


def test_hashing_embedder_similarity():
    e = HashingEmbedder()
    a, b, c = e.encode(
        [
            "how do I reset my password",
            "I forgot my password, how do I reset it",
            "the stock market fell today",
        ]
    )
    assert a @ b > a @ c + 0.2


def test_hashing_embedder_is_stable_across_processes():
    # load embed.py by path so the child does not pay for importing the whole package
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('pb_embed', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.HashingEmbedder(32).encode(['stable hash please']).tobytes().hex())\n"
    )
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        cmd = [sys.executable, "-c", code, embed_module.__file__]
        outs.add(subprocess.check_output(cmd, env=env, text=True).strip())
    assert len(outs) == 1
    assert outs.pop() == HashingEmbedder(32).encode(["stable hash please"]).tobytes().hex()


def test_embedder_input_validation():
    e = HashingEmbedder()
    with pytest.raises(ValueError, match=r"texts\[2\]"):
        e.encode(["a", "b", 3])
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        e.encode([None])
    with pytest.raises(TypeError):
        e.encode("a bare string")
    with pytest.raises(ValueError):
        e.encode(["a"], batch_size=0)
    with pytest.raises(ValueError):
        HashingEmbedder(1)
    s = SentenceEmbedder()  # validation happens before the model would load
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        s.encode(["ok", b"bytes"])
    assert not s.loaded


def test_load_embedder_specs(tmp_path):
    default = load_embedder(None)
    assert isinstance(default, SentenceEmbedder)
    assert default.name == DEFAULT_EMBEDDER and default.dim == 384
    assert not default.loaded  # lazy: nothing loaded just to know the name and dim
    assert load_embedder("all-MiniLM-L6-v2").name == DEFAULT_EMBEDDER
    assert load_embedder("sentence-transformers/all-MiniLM-L6-v2").name == DEFAULT_EMBEDDER
    assert load_embedder("all-minilm-l6-v2").name == DEFAULT_EMBEDDER  # names are case-insensitive, as on the hub
    assert load_embedder("ALL-MiniLM-L6-v2+mid").name == DEFAULT_EMBEDDER + "+mid"

    h = load_embedder("hashing")
    assert isinstance(h, HashingEmbedder) and h.dim == 256
    assert load_embedder("hashing-64").dim == 64
    assert load_embedder(h.name).name == h.name  # names round-trip
    assert load_embedder(h) is h
    with pytest.raises(ValueError):
        load_embedder("hashing-abc")
    with pytest.raises(ValueError):
        load_embedder("")
    with pytest.raises(TypeError):
        load_embedder(42)

    folder = load_embedder(str(tmp_path))
    assert isinstance(folder, SentenceEmbedder) and not folder.loaded
    assert folder.name == str(tmp_path.resolve())

    class Custom:
        name = "custom"
        dim = 3

        def encode(self, texts, *, batch_size=64):
            return np.ones((len(texts), 3), np.float32) / np.sqrt(3)

    c = Custom()
    assert load_embedder(c) is c


def test_hashing_embedder_with_router_end_to_end():
    e = HashingEmbedder(128)
    router = Router(e.dim)
    router.add("auth", e.encode(["reset my password", "forgot login password"]), 0.2)
    router.add("finance", e.encode(["stock market news", "share prices fell"]), 0.2)
    q = e.encode(["how do I reset my password", "recipe for banana bread"])
    assert router.decide(q) == ["auth", NO_TASK]


@pytest.mark.real_model
def test_sentence_embedder_real_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = SentenceEmbedder()
    assert e.dim == 384
    v = e.encode(["how do I reset my password", "I forgot my login password", "the stock market fell today"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert e.encode([]).shape == (0, 384)
    router = Router(e.dim)
    router.add("auth", v[1:2], 0.3)
    router.add("finance", v[2:3], 0.3)
    assert router.decide(v[0]) == ["auth"]


# ---------------------------------------------------------------------------------------------
# Router: approximate indexes (HNSW, IVF) and recall against exact search
# ---------------------------------------------------------------------------------------------

APPROX = ["hnsw", "ivf"]


def clustered_keys(rng, n_tasks: int, m: int = 16, spread: float = 0.3) -> dict[str, np.ndarray]:
    keys = {}
    for i in range(n_tasks):
        centre = unit(rng, 1)
        k = centre + spread * rng.standard_normal((m, DIM)).astype(np.float32) / np.sqrt(DIM)
        keys[f"task{i}"] = (k / np.linalg.norm(k, axis=1, keepdims=True)).astype(np.float32)
    return keys


def near_queries(rng, keys: dict[str, np.ndarray], n: int, noise: float = 0.05) -> np.ndarray:
    all_keys = np.concatenate(list(keys.values()))
    q = all_keys[rng.integers(0, all_keys.shape[0], n)] + noise * unit(rng, n)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def assert_scores_are_exact(router, keys, q, routes, top_keys):
    """Whatever tasks an approximate router returns, their scores are the tasks' true scores, best first."""
    brute = brute_scores(keys, q, top_keys)
    names = list(keys)
    for row, ranked in enumerate(routes):
        assert ranked, "an approximate router must still return a task"
        got = [s for _, s in ranked]
        assert got == sorted(got, reverse=True)
        for task, score in ranked:
            assert score == pytest.approx(brute[row, names.index(task)], abs=1e-5)


@pytest.mark.parametrize("kind", APPROX)
@pytest.mark.parametrize("top_keys", [1, 3])
def test_approximate_index_routes_with_exact_scores_and_high_recall(kind, top_keys):
    rng = np.random.default_rng(20 + top_keys)
    keys = clustered_keys(rng, 150)  # 2,400 keys: large enough that the index, not the fallback, answers
    router = Router(DIM, top_keys=top_keys, index=kind)
    for name, k in keys.items():
        router.add(name, k, 0.5)
    assert router.index_kind == kind and router.ntotal == 2400
    q = near_queries(rng, keys, 200)
    routes = router.route(q, top_k=3)
    assert all(len(r) == 3 for r in routes)
    assert_scores_are_exact(router, keys, q, routes, top_keys)
    np.testing.assert_allclose(router.scores(q), brute_scores(keys, q, top_keys), atol=1e-5)  # always exact
    assert recall_at_1(router, q) >= 0.95
    assert recall_at_1(router, q, level="key") >= 0.9
    assert recall_at_1(Router.from_keys(keys, router.thresholds, top_keys=top_keys), q) == 1.0  # flat


@pytest.mark.parametrize("kind", APPROX)
def test_approximate_index_small_bank_is_exact(kind):
    rng = np.random.default_rng(30)
    router, keys = make_router(rng, n_tasks=3, top_keys=3)  # flat reference
    approx = Router.from_keys(keys, router.thresholds, top_keys=3, index=kind)
    q = unit(rng, 20)
    assert_routes_equal(approx.route(q, top_k=3), brute_route(keys, q, 3, 3))
    assert approx.decide(q) == router.decide(q)


@pytest.mark.parametrize("kind", APPROX)
def test_approximate_index_add_remove_keeps_ids_and_never_returns_removed(kind):
    rng = np.random.default_rng(31)
    keys = clustered_keys(rng, 80)
    router = Router(DIM, top_keys=3, index=kind)
    for name, k in keys.items():
        router.add(name, k, 0.5)
    ids_before = {t: router.ids(t) for t in router.tasks}
    q_removed = near_queries(rng, {"task5": keys["task5"]}, 10, noise=0.01)
    assert all(r[0][0] == "task5" for r in router.route(q_removed, top_k=1))

    router.remove("task5")
    del keys["task5"]
    assert router.ntotal == sum(k.shape[0] for k in keys.values())
    for t in router.tasks:
        np.testing.assert_array_equal(router.ids(t), ids_before[t])
    routes = router.route(q_removed, top_k=3)
    assert all("task5" not in [t for t, _ in r] for r in routes)
    assert_scores_are_exact(router, keys, q_removed, routes, 3)

    new = clustered_keys(rng, 1)["task0"]
    router.add("task5", new, 0.5)
    keys["task5"] = new
    assert router.ids("task5").min() >= max(int(i.max()) for i in ids_before.values()) + 1  # ids never reused
    q_new = near_queries(rng, {"task5": new}, 10, noise=0.01)
    assert all(r[0][0] == "task5" for r in router.route(q_new, top_k=1))
    q = near_queries(rng, keys, 100)
    assert recall_at_1(router, q) >= 0.95


def test_ivf_retrains_as_the_bank_grows():
    rng = np.random.default_rng(32)
    keys = clustered_keys(rng, 300)
    router = Router(DIM, top_keys=3, index="ivf")
    nlists = []
    for name, k in keys.items():
        router.add(name, k, 0.5)
        router._index_cols()  # force any pending rebuild, as a search would
        nlists.append(router._index.nlist)
    assert nlists[0] == 1 and nlists[-1] > 8  # 4 800 keys: ~4 sqrt(n) lists after retraining
    assert nlists == sorted(nlists)
    q = near_queries(rng, keys, 200)
    assert recall_at_1(router, q) >= 0.95


@pytest.mark.parametrize("kind", APPROX)
def test_approximate_index_persistence(kind):
    rng = np.random.default_rng(33)
    keys = clustered_keys(rng, 60)
    router = Router(DIM, top_keys=3, index=kind, nprobe=4)
    for name, k in keys.items():
        router.add(name, k, 0.5)
    router.remove("task7")
    state = dict(
        keys={t: router.keys(t) for t in router.tasks},
        thresholds=router.thresholds,
        ids={t: router.ids(t) for t in router.tasks},
        next_id=router.next_id,
    )
    cfg = router.index_config
    blob = router.index_bytes()
    q = near_queries(rng, state["keys"], 50)
    want = router.route(q, top_k=3)

    same = Router.from_keys(**state, **cfg, index_bytes=blob)
    assert same.index_config == cfg
    assert same.index_bytes() == blob  # adopted, not rebuilt
    assert same.route(q, top_k=3) == want

    flat_blob = Router.from_keys(**state, top_keys=3).index_bytes()
    for bad in (b"junk", blob[: len(blob) // 2], flat_blob):
        restored = Router.from_keys(**state, **cfg, index_bytes=bad)
        assert restored.index_kind == kind
        assert_scores_are_exact(restored, state["keys"], q, restored.route(q, top_k=3), 3)
    # a flat router never adopts an approximate index
    assert Router.from_keys(**state, top_keys=3, index_bytes=blob).index_bytes() == flat_blob


def test_index_option_validation():
    with pytest.raises(ValueError, match="index"):
        Router(DIM, index="annoy")
    for opt in ("hnsw_m", "ef_search", "ef_construction", "nlist", "nprobe"):
        with pytest.raises(ValueError, match=opt):
            Router(DIM, index="ivf", **{opt: 0})
    rng = np.random.default_rng(34)
    router = Router(DIM, index="hnsw")
    router.add("a", unit(rng, 2), 0.1)
    with pytest.raises(ValueError, match="level"):
        recall_at_1(router, unit(rng, 1), level="tasks")
    with pytest.raises(ValueError):
        recall_at_1(Router(DIM), unit(rng, 1))  # empty router
    assert "hnsw" in repr(router)


def test_exact_scores_with_very_uneven_key_counts():
    rng = np.random.default_rng(35)
    keys = {"big": unit(rng, 300), **{f"small{i}": unit(rng, 1 + i % 3) for i in range(10)}}  # loop path
    router = Router.from_keys(keys, {t: 0.0 for t in keys}, top_keys=3)
    q = unit(rng, 25)
    np.testing.assert_allclose(router.scores(q), brute_scores(keys, q, 3), atol=1e-5)
    assert_routes_equal(router.route(q, top_k=4), brute_route(keys, q, 3, 4))


def _count_rebuilds(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = Router.rebuild_index

    def counted(self):
        calls.append(self.ntotal)
        real(self)

    monkeypatch.setattr(Router, "rebuild_index", counted)
    return calls


@pytest.mark.parametrize("kind", APPROX)
def test_copy_then_add_extends_the_base_index_instead_of_rebuilding(kind, monkeypatch):
    """What learn_task does (copy the published router, add a task, publish the copy): the copy's index is the
    base's plus the new keys, built without a rebuild, and the base's index is left as it was."""
    rng = np.random.default_rng(40)
    keys = clustered_keys(rng, 120)
    base = Router(DIM, top_keys=3, index=kind)
    for name, k in list(keys.items())[:100]:
        base.add(name, k, 0.5)
    q = near_queries(rng, keys, 200)
    base.route(q[:1])  # built
    base_bytes, base_n = base.index_bytes(), base.ntotal
    rebuilds = _count_rebuilds(monkeypatch)

    router = base
    for name, k in list(keys.items())[100:110]:  # ten learn_task-like steps, searched once in between
        router = router.copy()
        router.add(name, k, 0.5)
        assert router._base is not None
        router.route(q[:1])
    for name, k in list(keys.items())[110:]:  # ten more with no search in between: one build at the end
        router = router.copy()
        router.add(name, k, 0.5)
    routes = router.route(q, top_k=3)
    assert rebuilds == []
    assert router.ntotal == sum(k.shape[0] for k in keys.values()) and router._base is None
    for t in router.tasks:
        np.testing.assert_array_equal(np.sort(router.ids(t)), router.ids(t))
    assert_scores_are_exact(router, keys, q, routes, 3)
    assert recall_at_1(router, q) >= 0.95
    assert base.index_bytes() == base_bytes and base.ntotal == base_n  # the published base is untouched
    state = dict(
        keys={t: router.keys(t) for t in router.tasks},
        thresholds=router.thresholds,
        ids={t: router.ids(t) for t in router.tasks},
        next_id=router.next_id,
    )
    blob = router.index_bytes()
    saved = Router.from_keys(**state, **router.index_config, index_bytes=blob)  # a bank saved and loaded
    assert saved.index_bytes() == blob and saved.route(q, top_k=3) == routes  # adopted as it is


@pytest.mark.parametrize("kind", APPROX)
def test_copy_rebuilds_when_the_base_cannot_be_extended(kind, monkeypatch):
    rng = np.random.default_rng(41)
    keys = clustered_keys(rng, 40)
    base = Router(DIM, top_keys=3, index=kind)
    for name, k in keys.items():
        base.add(name, k, 0.5)
    q = near_queries(rng, keys, 50)
    base.route(q[:1])
    rebuilds = _count_rebuilds(monkeypatch)

    removed = base.copy()  # a removal: HNSW cannot delete, so never extended
    removed.remove("task3")
    removed.route(q[:1])
    assert len(rebuilds) == 1
    assert all("task3" not in [t for t, _ in r] for r in removed.route(q, top_k=3))

    other = base.copy(ef_search=99, nprobe=7)  # other index options: its own index
    assert other._base is None
    other.route(q[:1])
    assert len(rebuilds) == 2

    unbuilt = Router.from_keys(keys, base.thresholds, top_keys=3, index=kind)  # no built ancestor
    child = unbuilt.copy()
    assert child._base is None
    child.route(q[:1])
    assert len(rebuilds) == 3

    flat = Router.from_keys(keys, base.thresholds, top_keys=3)  # flat: a rebuild is as cheap as a copy
    flat.route(q[:1])
    assert flat.copy()._base is None


def test_ivf_copy_retrains_once_grown_past_its_retraining_point(monkeypatch):
    rng = np.random.default_rng(42)
    keys = clustered_keys(rng, 60)  # 960 keys
    router = Router(DIM, top_keys=3, index="ivf")
    for name, k in list(keys.items())[:5]:
        router.add(name, k, 0.5)
    router.route(unit(rng, 1))
    trained = router._ivf_trained_on
    rebuilds = _count_rebuilds(monkeypatch)
    for name, k in list(keys.items())[5:]:
        router = router.copy()
        router.add(name, k, 0.5)
        router.route(unit(rng, 1))
    assert trained == 80  # grew 12x: retrained once, on passing 4x (320 keys); then 4x that is never reached
    assert len(rebuilds) == 1 and 320 < rebuilds[0] <= 336
    assert router._ivf_trained_on == rebuilds[0]
    assert router._index.nlist > 1
