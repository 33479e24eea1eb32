"""benchmarks/routing_alternatives.py's measures on synthetic embeddings (its full run needs the real data)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing_alternatives as ra  # noqa: E402


def _tasks(rng, n_tasks=3, labels=2, per_label=30, dim=16, spread=4.0):
    centres = rng.normal(0, spread, (n_tasks, labels, dim))
    x, task, group = [], [], []
    for t in range(n_tasks):
        for g in range(labels):
            x.append(centres[t, g] + rng.normal(0, 1, (per_label, dim)))
            task += [f"t{t}"] * per_label
            group += [g] * per_label
    return np.concatenate(x).astype(np.float32), np.asarray(task), np.asarray(group)


def test_auroc_counts_pairs_and_ties():
    assert ra.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert ra.auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert ra.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_rejection_and_rankers_on_separated_tasks():
    rng = np.random.default_rng(0)
    keys, ktask, kgroup = _tasks(rng)
    queries, qtask, _ = _tasks(np.random.default_rng(0), per_label=10)  # same centres: in-task queries
    queries = queries + np.random.default_rng(1).normal(0, 1, queries.shape).astype(np.float32) * 0.5
    oos = np.random.default_rng(2).normal(0, 1, (40, keys.shape[1])).astype(np.float32) + 30.0  # far away
    rej = ra.rejection(keys, ktask, kgroup, queries, qtask, oos)
    assert set(rej) == {"default (Mahalanobis)"} | {f"relative, alpha={a:g}" for a in ra.ALPHAS}
    base = rej["default (Mahalanobis)"]
    assert base["top1"] == 1.0 and base["auroc"] > 0.99 and base["oos_rejected"] == 1.0
    assert base["in_task_rejected"] < 0.2 and base["hit@1"] == 1.0 - base["in_task_rejected"]
    for r in rej.values():
        assert 0.0 <= r["auroc"] <= 1.0 and r["top1"] == base["top1"]  # the ranking is the router's either way
    top1 = ra.rankers(keys, ktask, kgroup, queries, qtask)
    assert top1["LDA (default)"] == 1.0 and all(0.9 <= v <= 1.0 for v in top1.values())


def test_char_ngrams_are_stable_unit_rows_that_see_case_and_format():
    texts = ["Hello World!", "hello world", "<p>Hello World!</p>", ""]
    a = ra.char_ngrams(texts)
    assert a.shape == (4, ra.SURFACE_DIM) and np.array_equal(a, ra.char_ngrams(texts))  # deterministic
    assert np.allclose(np.linalg.norm(a[:3], axis=1), 1.0)
    assert not a[3].any()  # "" is padded to 2 bytes: no 3-gram
    assert a[0] @ a[1] < 0.99 and a[0] @ a[2] < 0.99  # case and markup change the features
    assert ra.char_ngrams(["abc"], (2, 3)).shape == (1, ra.SURFACE_DIM)
    both = ra.with_surface(np.eye(4, 8), a, 0.5)
    assert both.shape == (4, 8 + ra.SURFACE_DIM) and np.allclose(np.linalg.norm(both, axis=1), 1.0)


def test_surface_blocks_measured_beside_the_embedding():
    rng = np.random.default_rng(0)
    keys, ktask, kgroup = _tasks(rng)
    queries, qtask, _ = _tasks(np.random.default_rng(0), per_label=10)
    oos = np.random.default_rng(2).normal(0, 1, (20, keys.shape[1])).astype(np.float32) + 30.0
    words = {"t0": "alpha", "t1": "BETA!", "t2": "gamma?"}  # each task's texts in its own format
    ktexts = [f"{words[t]} {i}" for i, t in enumerate(ktask)]
    qtexts = [f"{words[t]} {i}" for i, t in enumerate(qtask)]
    got = ra.surface((keys, queries, oos), (ktexts, qtexts, ["zzz"] * 20), ktask, kgroup, qtask)
    assert list(got) == ["default (no surface block)", *ra.SURFACE]
    assert got["default (no surface block)"]["top1"] == 1.0
    for r in got.values():
        assert set(r) == {"top1", "hit@1", "auroc"} and 0.0 <= r["hit@1"] <= r["top1"] <= 1.0 and 0 <= r["auroc"] <= 1
