"""The learned router (promptbank.lda): Ledoit-Wolf covariance, LDA decisions, calibrated "no task" thresholds,
and its place in a bank (default scorer, keys grouped by label, saved and loaded, old banks keep cosine routing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptbank import PromptBank
from promptbank.lda import GaussianRouter, ledoit_wolf_covariance
from promptbank.storage import MANIFEST, manifest_digest
from tests.conftest import fast_options
from tests.test_bank import FRUIT, WEATHER


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ledoit_wolf_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(0)
    for n, d in ((10, 40), (200, 16), (50, 50)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        x -= x.mean(0)
        cov, s = ledoit_wolf_covariance(x)
        ref = sk.LedoitWolf(assume_centered=True).fit(x)
        assert s == pytest.approx(ref.shrinkage_, rel=1e-6)
        np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-6, atol=1e-9)


def _two_sources(rng, n):
    """Two tasks that share their content direction but differ along one 'style' direction, which a cosine
    nearest-key rule half ignores and LDA picks up (the within-task spread is large along the content axes)."""
    d = 16
    x = rng.normal(size=(2 * n, d)) * np.r_[np.full(d - 1, 1.0), 0.2]
    x[:, -1] += np.r_[np.zeros(n), np.ones(n)]  # the style: 5 within-task standard deviations apart
    x[:, 0] += 3.0  # both sources share an offset, which dominates their cosine similarity
    return x.astype(np.float32), np.r_[np.zeros(n, int), np.ones(n, int)]


def test_lda_separates_what_cosine_cannot():
    rng = np.random.default_rng(1)
    x, y = _two_sources(rng, 200)
    q, qy = _two_sources(rng, 200)
    router = GaussianRouter({"a": (x[y == 0], None, 0.05), "b": (x[y == 1], None, 0.05)}, x.shape[1])
    lda_acc = np.mean([r[0][0] == "ab"[t] for r, t in zip(router.route(q, top_k=1), qy)])
    # cosine to the 3 nearest keys (the "knn" scorer's rule) on the same keys
    sims = _unit(q) @ _unit(x).T
    knn = np.stack([np.sort(sims[:, y == t], 1)[:, -3:].mean(1) for t in (0, 1)], 1).argmax(1)
    knn_acc = np.mean(knn == qy)
    assert lda_acc > 0.95 and knn_acc < 0.8


def test_groups_give_one_gaussian_per_label():
    """A task made of two far-apart labels: one Gaussian per label covers both; one per task sits in between."""
    rng = np.random.default_rng(2)
    d = 8
    centers = np.eye(d)[:3] * 3
    a = _unit(
        np.concatenate([centers[0] + 0.1 * rng.normal(size=(30, d)), centers[1] + 0.1 * rng.normal(size=(30, d))])
    )
    b = _unit(centers[2] + 0.1 * rng.normal(size=(30, d)))
    groups = np.r_[np.zeros(30, int), np.ones(30, int)]
    between = _unit((centers[0] + centers[1])[None] / 2 + 0.05 * rng.normal(size=(20, d)))
    grouped = GaussianRouter({"a": (a, groups, 0.05), "b": (b, None, 0.05)}, d)
    lumped = GaussianRouter({"a": (a, None, 0.05), "b": (b, None, 0.05)}, d)
    # the midpoint is typical for the lumped Gaussian, far from both labels of the grouped one
    assert np.all(grouped.task_distances(between)[:, 0] > lumped.task_distances(between)[:, 0])
    held = _unit(centers[0] + 0.1 * rng.normal(size=(50, d)))
    assert all(r[0][0] == "a" for r in grouped.route(held, top_k=1))


def test_thresholds_accept_in_task_queries_and_reject_far_ones():
    rng = np.random.default_rng(3)
    d, n = 12, 300
    mus = np.eye(d)[:3] * 4
    tasks = {f"t{i}": (_unit(mus[i] + rng.normal(size=(n, d))), None, 0.05) for i in range(3)}
    router = GaussianRouter(tasks, d)
    fresh = _unit(mus[0] + rng.normal(size=(2000, d)))
    s = router.scores(fresh)[:, 0]
    accepted = np.mean(s >= router.threshold("t0"))
    assert 0.88 <= accepted <= 0.99  # calibrated to reject ~5 % of new in-task queries
    far = _unit(-mus[0] - mus[1] + rng.normal(size=(500, d)))
    best = router.scores(far).max(1)
    assert np.mean(best >= min(router.thresholds.values())) < 0.05


def test_empty_and_single_key_tasks():
    router = GaussianRouter({}, 4)
    assert router.route(np.eye(4, dtype=np.float32)[:2]) == [[], []]
    router = GaussianRouter({"one": (np.eye(4, dtype=np.float32)[:1], None, 0.05)}, 4)
    assert router.route(np.eye(4, dtype=np.float32)[:1], top_k=3)[0][0][0] == "one"
    assert router.threshold("one") == -np.inf  # nothing to calibrate on: the best task is accepted


def test_covariance_from_a_capped_subset_of_keys_still_routes_and_calibrates(monkeypatch):
    """Large banks: the shared covariance comes from at most _MAX_COV_ROWS keys; group means use every key."""
    from promptbank import lda

    rng = np.random.default_rng(4)
    d, n = 12, 400
    mus = np.eye(d)[:3] * 4
    tasks = {f"t{i}": (_unit(mus[i] + rng.normal(size=(n, d))), None, 0.05) for i in range(3)}
    full = GaussianRouter(tasks, d)
    monkeypatch.setattr(lda, "_MAX_COV_ROWS", 300)  # of 1,200 keys
    capped = GaussianRouter(tasks, d)
    fresh = np.concatenate([_unit(mus[i] + rng.normal(size=(300, d))) for i in range(3)])
    gold = np.repeat(np.arange(3), 300)
    for router in (full, capped):
        assert np.mean(router.scores(fresh).argmax(1) == gold) > 0.97
        assert 0.85 <= np.mean(router.scores(fresh[:300])[:, 0] >= router.threshold("t0")) <= 0.99
    # same means, a covariance from a quarter of the keys: the distances barely move
    np.testing.assert_allclose(capped.task_distances(fresh), full.task_distances(fresh), rtol=0.2)
    assert capped.task_distances(fresh).tolist() != full.task_distances(fresh).tolist()  # the cap did apply


# ----------------------------------------------------------------------------------------------- in a bank


def test_bank_routes_with_the_learned_router_by_default(tiny_bank, tmp_path):
    assert tiny_bank.routing == "lda"
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options())
    t = tiny_bank._tasks["weather"]
    labels = tiny_bank.tasks["weather"].labels
    assert t.key_groups is not None and len(t.key_groups) == len(t.keys)
    assert set(t.key_groups.tolist()) == set(range(len(labels)))  # one group per label
    r = tiny_bank.route("the weather is rainy today")
    assert r.task == "weather" and r.score <= 0 and r.ranked[0][0] == "weather"
    tiny_bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b", tiny_bank.backbone, embedder=tiny_bank.embedder)
    assert loaded.routing == "lda"
    np.testing.assert_array_equal(loaded._tasks["weather"].key_groups, t.key_groups)
    assert loaded.route("the weather is rainy today") == r


def test_banks_saved_before_the_learned_router_keep_cosine_routing(tiny_bank, tmp_path):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.save(tmp_path / "b")
    mpath = tmp_path / "b" / MANIFEST
    m = json.loads(mpath.read_text())
    del m["index"]["scorer"]  # what older versions wrote
    m["manifest_sha256"] = manifest_digest(m)
    mpath.write_text(json.dumps(m))
    old = PromptBank.load(tmp_path / "b", tiny_bank.backbone, embedder=tiny_bank.embedder)
    assert old.routing == "knn"
    r = old.route("the weather is rainy today")
    assert 0 < r.score <= 1 + 1e-5  # a cosine similarity


def test_bad_scorer_and_bad_groups_are_refused(tiny_bank, tmp_path):
    from safetensors.numpy import load_file, save_file

    from promptbank.errors import BankFormatError

    with pytest.raises(ValueError, match="routing must be one of"):
        PromptBank(tiny_bank.backbone, tiny_bank.embedder, routing="magic")
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.save(tmp_path / "b")
    mpath = tmp_path / "b" / MANIFEST
    m = json.loads(mpath.read_text())
    m["index"]["scorer"] = "magic"
    m["manifest_sha256"] = manifest_digest(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(BankFormatError, match="scorer"):
        PromptBank.load(tmp_path / "b", tiny_bank.backbone, embedder=tiny_bank.embedder)

    tiny_bank.save(tmp_path / "c")
    kpath = tmp_path / "c" / "tasks" / "weather" / "keys.safetensors"
    tensors = load_file(kpath)
    tensors["groups"] = np.full_like(tensors["groups"], 10_000)
    save_file(tensors, kpath)
    with pytest.raises(BankFormatError, match="keys.safetensors"):  # checksum, then the range check
        PromptBank.load(tmp_path / "c", tiny_bank.backbone, embedder=tiny_bank.embedder)


def test_index_kind_and_options_are_saved_with_the_bank(tiny_bank, tmp_path):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options())
    tiny_bank.routing = "knn"
    before = tiny_bank.route_many(["the weather is rainy today", "i would like to eat a lemon"])
    tiny_bank.set_index("hnsw", hnsw_m=16, ef_search=64)
    assert tiny_bank.router.index_kind == "hnsw" and tiny_bank.router.index_config["ef_search"] == 64
    assert tiny_bank.route_many(["the weather is rainy today", "i would like to eat a lemon"]) == before
    tiny_bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b", tiny_bank.backbone, embedder=tiny_bank.embedder)
    assert loaded.router.index_config == tiny_bank.router.index_config
    assert loaded.routing == "knn"

    mpath = tmp_path / "b" / MANIFEST
    m = json.loads(mpath.read_text())
    m["index"]["options"]["ef_search"] = -3
    m["manifest_sha256"] = manifest_digest(m)
    mpath.write_text(json.dumps(m))
    from promptbank.errors import BankFormatError

    with pytest.raises(BankFormatError, match="ef_search"):
        PromptBank.load(tmp_path / "b", tiny_bank.backbone, embedder=tiny_bank.embedder)


def test_routing_does_not_depend_on_the_order_tasks_were_added_in():
    rng = np.random.default_rng(5)
    d = 10
    tasks = {f"t{i}": (_unit(np.eye(d)[i] * 3 + rng.normal(size=(60, d))), None, 0.05) for i in range(4)}
    forward = GaussianRouter(tasks, d)
    backward = GaussianRouter(dict(reversed(list(tasks.items()))), d)
    for name in tasks:
        assert forward.threshold(name) == pytest.approx(backward.threshold(name), rel=1e-5)
    q = _unit(rng.normal(size=(200, d)) + np.eye(d)[rng.integers(0, 4, 200)] * 3)
    assert [r[0][0] for r in forward.route(q, top_k=1)] == [r[0][0] for r in backward.route(q, top_k=1)]


def _random_label_tasks(rng, n_keys: int, n_queries: int, d: int = 24, labels: int = 8):
    """Two tasks apart along one direction, each with labels that carry nothing about the task (random label
    per key): the per-label means are noisy copies of the task mean, so one Gaussian per task routes better."""
    offset = np.zeros(d)
    offset[0] = 0.9
    keys = {n: rng.normal(size=(n_keys, d)) + (offset if n == "b" else 0) for n in "ab"}
    groups = {n: rng.integers(0, labels, n_keys) for n in "ab"}
    q = np.concatenate([rng.normal(size=(n_queries, d)) + (offset if n == "b" else 0) for n in "ab"])
    return {n: (keys[n], groups[n], 0.05) for n in "ab"}, q, np.repeat(np.array(list("ab")), n_queries)


def test_the_per_task_discriminant_is_chosen_when_it_routes_the_keys_better():
    rng = np.random.default_rng(11)
    tasks, q, truth = _random_label_tasks(rng, 48, 400)
    router = GaussianRouter(tasks, q.shape[1])
    assert router.discriminant == "task" and router.cv_top1["task"] > router.cv_top1["group"]
    routes = router.route(q, top_k=2)
    chosen = np.array([r[0][0] for r in routes])
    by_group = np.array(router.names)[router.scores(q).argmax(1)]  # what the group discriminant alone would pick
    assert np.mean(chosen == truth) > np.mean(by_group == truth) + 0.03
    np.testing.assert_array_equal(chosen, np.array(router.names)[router.rank_scores(q).argmax(1)])
    # each task comes with its group-level score, the one its threshold applies to
    s = router.scores(q)
    for i, r in enumerate(routes[:50]):
        for name, score in r:
            assert score == pytest.approx(float(s[i, router.names.index(name)]))


def test_the_group_discriminant_stays_when_labels_make_the_tasks():
    """Tasks made of interleaved label clusters (CLINC-like domains): one Gaussian per task would blur them."""
    rng = np.random.default_rng(12)
    d = 6
    centre = [np.eye(d)[0] * 3 * k for k in range(4)]  # labels 0..3 along one line: task a has 0, 2; b has 1, 3
    tasks = {}
    for name, labs in (("a", (0, 2)), ("b", (1, 3))):
        keys = np.concatenate([centre[k] + 0.3 * rng.normal(size=(20, d)) for k in labs])
        tasks[name] = (keys, np.repeat([0, 1], 20), 0.05)
    router = GaussianRouter(tasks, d)
    assert router.discriminant == "group" and router.cv_top1["group"] >= router.cv_top1["task"]
    q = centre[0] + 0.3 * rng.normal(size=(100, d))
    assert all(r[0][0] == "a" for r in router.route(q, top_k=1))
    np.testing.assert_array_equal(router.rank_scores(q), router.scores(q))


def test_one_group_per_task_needs_no_choice():
    rng = np.random.default_rng(13)
    tasks = {n: (rng.normal(size=(30, 5)) + i, None, 0.05) for i, n in enumerate("abc")}
    router = GaussianRouter(tasks, 5)
    assert router.cv_top1 is None and router.discriminant == "group"


def test_calibration_does_not_depend_on_the_distance_chunks(monkeypatch):
    """The cross-fitting measures held-out keys in chunks of rows; one row per chunk gives the same thresholds and
    cross-fitted top-1 as the whole fold at once (tasks with several labels, one task with fewer keys than folds)."""
    from promptbank import lda

    rng = np.random.default_rng(3)
    spec = {}
    for i in range(6):
        n = 3 if i == 5 else 20
        keys = rng.normal(size=(n, 12)) + rng.normal(size=12) * 2
        spec[f"t{i}"] = (keys, np.arange(n) % 3, 0.05)
    whole = GaussianRouter(spec, 12)
    monkeypatch.setattr(lda, "_DISTANCE_ELEMENTS", 1)
    rowwise = GaussianRouter(spec, 12)
    assert whole.cv_top1 is not None and rowwise.cv_top1 == whole.cv_top1
    for name in spec:
        assert rowwise.threshold(name) == pytest.approx(whole.threshold(name), rel=1e-5)


def _broad_and_narrow_tasks(seed: int = 0):
    """A broad task (two label groups far apart, wide spread: a loose threshold) and a narrow one (two tight
    groups), in 8 dimensions. Every key is routed right by either discriminant, so the per-group one ranks."""
    rng = np.random.default_rng(seed)
    d = 8

    def at(*v):
        x = np.zeros(d)
        x[: len(v)] = v
        return x

    def task(centres, sd):
        keys = np.concatenate([c + sd * rng.standard_normal((20, d)) for c in centres])
        return keys, np.repeat(np.arange(len(centres)), 20), 0.05

    tasks = {"broad": task([at(10, 0, 5), at(10, 0, -5)], 2.5), "narrow": task([at(0, 0, 0.3), at(0, 0, -0.3)], 0.3)}
    return GaussianRouter(tasks, d), at


def test_the_guard_rejects_a_query_near_a_broad_label_group_but_nearest_another_task_as_a_whole():
    router, at = _broad_and_narrow_tasks()
    assert router.discriminant == "group"
    q = at(4.5, 0, 5)[None]  # near the broad task's first label group, nearer the narrow task's mean
    (ranked,), (guard,) = router.route_guarded(q, top_k=2)
    assert ranked[0][0] == "broad" and ranked[0][1] >= router.threshold("broad")  # the ranking alone would accept
    assert guard is not None and guard[0] == "narrow" and guard[1] < router.threshold("narrow")
    assert guard[1] == pytest.approx(dict(ranked)["narrow"])  # the guard's score is the per-group score
    assert router.decide(q) == [None]
    # in-task queries of both tasks have no guard or pass it
    inside = np.stack([at(10, 0, 5), at(10, 0, -5), at(0, 0, 0.3), at(0, 0, -0.3)])
    assert router.decide(inside) == ["broad", "broad", "narrow", "narrow"]


def test_no_guard_when_the_tasks_are_ranked_by_the_per_task_gaussians():
    rng = np.random.default_rng(11)
    tasks, q, _ = _random_label_tasks(rng, 48, 400)
    router = GaussianRouter(tasks, q.shape[1])
    assert router.discriminant == "task"
    ranked, guards = router.route_guarded(q, top_k=1)
    assert guards == [None] * len(q)
    thr = router.thresholds
    assert router.decide(q) == [r[0][0] if r[0][1] >= thr[r[0][0]] else None for r in ranked]


def test_bank_routing_reports_the_guard_and_rejects_on_it(tiny_bank, monkeypatch, capsys):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options())
    text = "the weather is rainy today"
    plain = tiny_bank.route(text)
    assert plain.task == "weather" and plain.guard is None
    scorer = tiny_bank._learned_router(tiny_bank.router)
    thr, unguarded = scorer.threshold("fruit"), scorer.route_guarded

    def guarded(x, top_k=3, score=thr - 1.0):  # the same ranking, with fruit as the guard
        return unguarded(x, top_k=top_k)[0], [("fruit", score)] * len(x)

    monkeypatch.setattr(scorer, "route_guarded", guarded)
    r = tiny_bank.route(text)
    assert r.task is None and r.guard == ("fruit", thr - 1.0, thr)
    assert (r.score, r.threshold, r.ranked) == (plain.score, plain.threshold, plain.ranked)
    assert tiny_bank.predict([text])[0].task is None
    monkeypatch.setattr(scorer, "route_guarded", lambda x, top_k=3: guarded(x, top_k, thr))  # passes: at it
    assert tiny_bank.route(text).task == "weather"
