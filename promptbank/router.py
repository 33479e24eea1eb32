"""Route a query embedding to the task whose routing keys it is closest to, or to no task.

Keys are L2-normalised sentence embeddings (several prototypes per task, see :func:`make_prototypes`) held
in a FAISS ``IndexIDMap2(IndexFlatIP(dim))`` with stable int64 ids. A task's score for a query is the mean
of its ``top_keys`` best key similarities (``top_keys=1``: the max). :meth:`Router.decide` returns the best
task when its score reaches that task's threshold (see :func:`calibrate_threshold`), else ``None``
(:data:`NO_TASK`): the plain backbone answers, and the caller may raise a new-task signal.

Results are exactly those of a brute-force computation over every key: :meth:`Router.route` searches the
index for a few neighbours and widens the search until the top tasks are provably right.

numpy in, numpy out; nothing here knows about models or files (``index_bytes`` / ``from_keys`` let the
storage layer cache the index; the keys are always the source of truth).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import faiss
import numpy as np

from .errors import TaskExistsError, TaskNotFoundError

__all__ = ["NO_TASK", "Router", "calibrate_threshold", "make_prototypes"]

log = logging.getLogger(__name__)

NO_TASK = None
_NORM_TOL = 1e-3
_MIN_SEARCH_K = 32
_KMEANS_RESTARTS = 3


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _as_matrix(x: np.ndarray, what: str, dim: int | None = None, *, allow_1d: bool = False) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists etc.
        raise ValueError(f"{what} must be a numeric array: {e}") from e
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what} must be a real-valued array, got dtype {a.dtype}")
    if allow_1d and a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, dim), got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{what} has dimension {a.shape[1]}, expected {dim}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_real(x: float, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a real number, got {x!r}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    return v


def _check_pos_int(x: int, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{what} must be a positive int, got {x!r}")
    return int(x)


def _l2_normalise(a: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)
    if np.any(norms == 0):
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{what} row {bad} is the zero vector")
    return np.ascontiguousarray(a / norms, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# prototypes and thresholds
# --------------------------------------------------------------------------------------------------


def _kmeanspp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding for unit vectors (squared distance 2 - 2 cos); deterministic for a seed.

    faiss.Kmeans seeds with k random points, which on small few-shot sets often puts two centroids in
    one cluster and none in another; k-means++ spreads them out.
    """
    n = x.shape[0]
    n_trials = 2 + int(np.log(k))  # greedy k-means++ (as in scikit-learn)
    chosen = [int(rng.integers(n))]
    d2 = np.maximum(2.0 - 2.0 * (x @ x[chosen[0]]).astype(np.float64), 0.0)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point coincides with a chosen one: any unchosen row
            rest = np.setdiff1d(np.arange(n), chosen)
            i = int(rest[rng.integers(rest.size)])
            chosen.append(i)
            continue
        cands = rng.choice(n, size=n_trials, p=d2 / total)
        cand_d2 = np.maximum(2.0 - 2.0 * (x[cands] @ x.T).astype(np.float64), 0.0)
        cand_d2 = np.minimum(cand_d2, d2[None, :])
        best = int(np.argmin(cand_d2.sum(axis=1)))
        chosen.append(int(cands[best]))
        d2 = cand_d2[best]
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def make_prototypes(embeddings: np.ndarray, n_prototypes: int = 16, *, seed: int = 0) -> np.ndarray:
    """Summarise a task's input embeddings as ``k = min(n_prototypes, n)`` L2-normalised keys.

    With ``n <= n_prototypes`` the (renormalised) rows themselves are the keys; otherwise the centroids of
    spherical k-means (``faiss.Kmeans(spherical=True, seed=seed)``), renormalised. Deterministic for a
    given input and seed.
    """
    n_prototypes = _check_pos_int(n_prototypes, "n_prototypes")
    x = _as_matrix(embeddings, "embeddings")
    n, d = x.shape
    if n == 0:
        raise ValueError("embeddings is empty: need at least one row to make prototypes")
    if d == 0:
        raise ValueError("embeddings has dimension 0")
    x = _l2_normalise(x, "embeddings")
    if n <= n_prototypes:
        return x
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    # a few k-means++ restarts, keeping the best (highest total cosine to the nearest centroid)
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
    best_obj, centroids = -np.inf, None
    for _ in range(_KMEANS_RESTARTS):
        km = faiss.Kmeans(
            d,
            n_prototypes,
            niter=25,
            seed=int(rng.integers(1 << 31)),
            spherical=True,
            verbose=False,
            min_points_per_centroid=1,  # few-shot tasks: no "please provide at least" warning
        )
        km.train(x, init_centroids=_kmeanspp_init(x, n_prototypes, rng))
        c = _l2_normalise(np.asarray(km.centroids, dtype=np.float32).reshape(n_prototypes, d), "centroids")
        obj = float((x @ c.T).max(axis=1).sum())
        if obj > best_obj:
            best_obj, centroids = obj, c
    return _l2_normalise(centroids, "centroids")


def calibrate_threshold(in_task_scores: np.ndarray, quantile: float = 0.05, *, floor: float = 0.0) -> float:
    """Threshold that accepts ``1 - quantile`` of held-out in-task queries: ``max(floor, quantile(scores))``.

    ``in_task_scores`` are the task's scores (as :meth:`Router.scores` gives them) on held-out queries that
    belong to the task.
    """
    s = np.asarray(in_task_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("in_task_scores is empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("in_task_scores contains NaN or infinite values")
    q = _check_real(quantile, "quantile")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    fl = _check_real(floor, "floor")
    return float(max(fl, float(np.quantile(s, q))))


# --------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    keys: np.ndarray  # (m, d) float32, read-only
    ids: np.ndarray  # (m,) int64, read-only
    threshold: float


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class Router:
    """Per-task routing keys in a FAISS inner-product index; scores, ranking and open-set decisions.

    Tasks keep their insertion order (``tasks``, the columns of :meth:`scores`, ties in :meth:`route`).
    Each key gets an int64 id from a counter that only grows: ids are never reused in a router's lifetime.
    """

    def __init__(self, dim: int, *, top_keys: int = 1):
        self._dim = _check_pos_int(dim, "dim")
        self._top_keys = _check_pos_int(top_keys, "top_keys")
        self._tasks: dict[str, _Task] = {}
        self._next_id = 0
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._set_index(self._empty_index())

    # ---- basic accessors ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Router(dim={self._dim}, top_keys={self._top_keys}, tasks={len(self._tasks)}, keys={self.ntotal})"

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def top_keys(self) -> int:
        return self._top_keys

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def next_id(self) -> int:
        """The id the next key will get (persist it to keep ids unique across save/load)."""
        return self._next_id

    def _get(self, task: str) -> _Task:
        try:
            return self._tasks[task]
        except (KeyError, TypeError):
            raise TaskNotFoundError(f"no task named {task!r} in the router") from None

    def keys(self, task: str) -> np.ndarray:
        """A copy of the task's keys, ``(m, dim)`` float32."""
        return self._get(task).keys.copy()

    def ids(self, task: str) -> np.ndarray:
        """A copy of the task's key ids, ``(m,)`` int64."""
        return self._get(task).ids.copy()

    def threshold(self, task: str) -> float:
        return self._get(task).threshold

    def set_threshold(self, task: str, threshold: float) -> None:
        entry = self._get(task)
        entry.threshold = _check_real(threshold, "threshold")

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: t.threshold for name, t in self._tasks.items()}

    # ---- mutation -------------------------------------------------------------------------------

    def _empty_index(self) -> faiss.IndexIDMap2:
        # the faiss wrapper keeps a reference to the inner flat index
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self._dim))

    def _set_index(self, index: faiss.IndexIDMap2) -> None:
        self._index = index
        self._flat = faiss.downcast_index(index.index)  # a view; lives as long as self._index
        self._cache = None

    def _check_keys(self, keys: np.ndarray) -> np.ndarray:
        k = _as_matrix(keys, "keys", self._dim)
        if k.shape[0] == 0:
            raise ValueError("keys is empty: a task needs at least one key")
        norms = np.linalg.norm(k.astype(np.float64), axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOL)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"keys must be L2-normalised (tolerance {_NORM_TOL}); row {i} has norm {norms[i]:.6f}")
        return k.copy()

    @staticmethod
    def _check_name(task: str) -> str:
        if not isinstance(task, str) or not task:
            raise ValueError(f"task name must be a non-empty str, got {task!r}")
        return task

    def add(self, task: str, keys: np.ndarray, threshold: float) -> None:
        """Add a task's keys (``(m, dim)``, L2-normalised) with its routing threshold.

        Raises :class:`~promptbank.errors.TaskExistsError` (a ``ValueError``) for a duplicate name and
        ``ValueError`` for a bad shape, dimension, non-finite values or non-normalised rows.
        """
        self._check_name(task)
        if task in self._tasks:
            raise TaskExistsError(f"task {task!r} is already in the router")
        k = self._check_keys(keys)
        thr = _check_real(threshold, "threshold")
        ids = np.arange(self._next_id, self._next_id + k.shape[0], dtype=np.int64)
        self._index.add_with_ids(k, ids)
        self._next_id += k.shape[0]
        self._tasks[task] = _Task(_readonly(k), _readonly(ids), thr)
        self._cache = None

    def remove(self, task: str) -> None:
        """Remove a task and its ids from the index. :class:`TaskNotFoundError` (a ``KeyError``) if absent."""
        entry = self._get(task)
        ids = np.ascontiguousarray(entry.ids, dtype=np.int64)
        removed = self._index.remove_ids(faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)))
        del self._tasks[task]
        self._cache = None
        if removed != ids.size or self._index.ntotal != sum(t.ids.size for t in self._tasks.values()):
            log.warning(
                "FAISS removed %d of %d ids for task %r; rebuilding the index",
                removed,
                ids.size,
                task,
            )
            self.rebuild_index()

    def rebuild_index(self) -> None:
        """Rebuild the index from the stored keys: tasks in insertion order, each with its own ids.

        Deterministic: the same router state always gives the same index (and the same ``index_bytes``).
        """
        index = self._empty_index()
        if self._tasks:
            index.add_with_ids(
                np.concatenate([t.keys for t in self._tasks.values()]),
                np.concatenate([t.ids for t in self._tasks.values()]),
            )
        self._set_index(index)

    # ---- persistence ----------------------------------------------------------------------------

    def index_bytes(self) -> bytes:
        """The FAISS index serialised (``faiss.serialize_index``); a cache, rebuildable from the keys."""
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_keys(
        cls,
        keys: Mapping[str, np.ndarray],
        thresholds: Mapping[str, float],
        *,
        dim: int | None = None,
        top_keys: int = 1,
        ids: Mapping[str, np.ndarray] | None = None,
        next_id: int | None = None,
        index_bytes: bytes | None = None,
    ) -> Router:
        """Restore a router from its keys (the source of truth), thresholds and optionally its ids and index.

        Task order is ``keys``' order. Without ``ids`` the ids are assigned 0, 1, ... in that order (what a
        router built by ``add`` calls with no removals has). ``index_bytes`` is used only if it is an
        ``IndexIDMap2(IndexFlatIP)`` whose ntotal, ids and vectors match the keys exactly; otherwise (stale,
        corrupt or foreign) the index is rebuilt from the keys.
        """
        if set(keys) != set(thresholds):
            raise ValueError(f"keys and thresholds name different tasks: {sorted(set(keys) ^ set(thresholds))}")
        if dim is None:
            if not keys:
                raise ValueError("dim is required to restore a router with no tasks")
            dim = int(np.asarray(next(iter(keys.values()))).shape[-1])
        router = cls(dim, top_keys=top_keys)
        seen: set[int] = set()
        for name, k in keys.items():
            router._check_name(name)
            kk = router._check_keys(k)
            if ids is None:
                tid = np.arange(router._next_id, router._next_id + kk.shape[0], dtype=np.int64)
            else:
                if name not in ids:
                    raise ValueError(f"ids has no entry for task {name!r}")
                tid = np.asarray(ids[name])
                if tid.shape != (kk.shape[0],) or not np.issubdtype(tid.dtype, np.integer):
                    raise ValueError(f"ids for task {name!r} must be {kk.shape[0]} ints, got {tid.shape} {tid.dtype}")
                tid = tid.astype(np.int64)
                if np.any(tid < 0) or len(set(tid.tolist()) | seen) != len(seen) + tid.size:
                    raise ValueError(f"ids for task {name!r} are negative or not unique")
            seen.update(tid.tolist())
            router._tasks[name] = _Task(
                _readonly(kk),
                _readonly(tid.copy()),
                _check_real(thresholds[name], "threshold"),
            )
            router._next_id = max(router._next_id, int(tid.max()) + 1)
        if next_id is not None:
            if isinstance(next_id, bool) or not isinstance(next_id, (int, np.integer)) or next_id < router._next_id:
                raise ValueError(f"next_id {next_id!r} is below an id in use ({router._next_id - 1})")
            router._next_id = int(next_id)

        restored = index_bytes is not None and router._adopt_index(index_bytes)
        if not restored:
            if index_bytes is not None:
                log.info("stored router index does not match the keys; rebuilding it")
            router.rebuild_index()
        return router

    def _adopt_index(self, data: bytes) -> bool:
        """Use a serialised index if it matches the stored keys and ids exactly; return whether it did."""
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        except (RuntimeError, ValueError):  # corrupt bytes: rebuild
            return False
        if not isinstance(index, faiss.IndexIDMap2) or index.d != self._dim:
            return False
        flat = faiss.downcast_index(index.index)
        if not isinstance(flat, faiss.IndexFlatIP) or flat.metric_type != faiss.METRIC_INNER_PRODUCT:
            return False
        expected_n = sum(t.ids.size for t in self._tasks.values())
        if index.ntotal != expected_n or flat.ntotal != expected_n:
            return False
        if expected_n:
            got_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            got_vecs = flat.reconstruct_n(0, expected_n)
            want_ids = np.concatenate([t.ids for t in self._tasks.values()])
            want_vecs = np.concatenate([t.keys for t in self._tasks.values()])
            if not (np.array_equal(got_ids, want_ids) and np.array_equal(got_vecs, want_vecs)):
                return False
        self._set_index(index)
        return True

    # ---- scoring --------------------------------------------------------------------------------

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(all keys in task order, task column of each index storage position, task start offsets,
        per-task aggregation size ``min(top_keys, n_keys)``)."""
        if self._cache is None:
            entries = list(self._tasks.values())
            sizes = [t.ids.size for t in entries]
            if entries:
                all_keys = np.concatenate([t.keys for t in entries])
                all_ids = np.concatenate([t.ids for t in entries])
            else:
                all_keys = np.zeros((0, self._dim), dtype=np.float32)
                all_ids = np.zeros(0, dtype=np.int64)
            cols = np.repeat(np.arange(len(entries), dtype=np.int64), sizes)
            order = np.argsort(all_ids, kind="stable")
            sorted_ids, sorted_cols = all_ids[order], cols[order]
            # the index's own id of each stored vector, in storage order (= the flat index's labels)
            index_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            where = np.searchsorted(sorted_ids, index_ids)
            if index_ids.size != all_ids.size or (
                index_ids.size and not np.array_equal(sorted_ids[np.minimum(where, sorted_ids.size - 1)], index_ids)
            ):
                log.warning("router index out of sync with its keys; rebuilding it")
                self.rebuild_index()
                return self._layout()
            pos_cols = sorted_cols[where] if index_ids.size else cols
            starts = np.cumsum([0, *sizes])
            agg = np.array([min(self._top_keys, n) for n in sizes], dtype=np.int64)
            self._cache = (all_keys, pos_cols, starts, agg)
        return self._cache

    def _queries(self, query_emb: np.ndarray) -> np.ndarray:
        return _as_matrix(query_emb, "query_emb", self._dim, allow_1d=True)

    def _exact_scores(self, q: np.ndarray) -> np.ndarray:
        all_keys, _, starts, agg = self._layout()
        n_tasks = len(self._tasks)
        out = np.empty((q.shape[0], n_tasks), dtype=np.float32)
        if n_tasks == 0 or q.shape[0] == 0:
            return out[:, :n_tasks]
        sims = q @ all_keys.T  # what a flat inner-product index computes, for every key
        if self._top_keys == 1:
            return np.maximum.reduceat(sims, starts[:-1], axis=1).astype(np.float32, copy=False)
        for j in range(n_tasks):
            block = sims[:, starts[j] : starts[j + 1]]
            a = int(agg[j])
            if a == 1:
                out[:, j] = block.max(axis=1)
            else:
                top = -np.sort(-block, axis=1)[:, :a]
                out[:, j] = top.mean(axis=1)
        return out

    def scores(self, query_emb: np.ndarray) -> np.ndarray:
        """``(n_queries, n_tasks)`` float32: each task's score (mean of its ``top_keys`` best key
        similarities) for each query; columns in ``self.tasks`` order. Exact: every key is compared.

        ``query_emb`` is ``(n, dim)`` or a single ``(dim,)`` vector; it is used as given (embedders return
        unit vectors, so scores are cosine similarities).
        """
        return self._exact_scores(self._queries(query_emb))

    def route(self, query_emb: np.ndarray, *, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """Per query, the ``top_k`` best tasks as ``(task, score)``, best first (ties: insertion order).

        Searches the FAISS index for a few neighbours and widens the search (up to every key) until the top
        tasks and their scores are certain, so the result equals the brute-force ranking.
        """
        top_k = _check_pos_int(top_k, "top_k")
        q = self._queries(query_emb)
        n_q, n_tasks = q.shape[0], len(self._tasks)
        if n_tasks == 0 or n_q == 0:
            return [[] for _ in range(n_q)]
        names = list(self._tasks)
        want = min(top_k, n_tasks)
        ntotal = self.ntotal
        results: list[list[tuple[str, float]] | None] = [None] * n_q

        pending = np.arange(n_q)
        k = min(ntotal, max(_MIN_SEARCH_K, 2 * self._top_keys * want))
        while pending.size:
            if k >= ntotal:  # exhaustive: exact scores for the remaining queries
                s = self._exact_scores(q[pending])
                for row, qi in enumerate(pending):
                    results[qi] = self._rank(s[row], names, want)
                break
            # search the wrapped flat index: its labels are storage positions, mapped to tasks through the
            # IDMap2's id_map (IndexIDMap2.search translates ids in an OpenMP loop that costs milliseconds
            # per single-query call on a busy machine)
            self._layout()
            dist, lab = self._flat.search(q[pending], k)
            ok = self._aggregate_partial(dist, lab, want)
            still = []
            for row, qi in enumerate(pending):
                if ok[row] is None:
                    still.append(qi)
                else:
                    results[qi] = [(names[j], float(sc)) for j, sc in ok[row]]
            pending = np.asarray(still, dtype=np.int64)
            k = min(ntotal, k * 4)
        return [r if r is not None else [] for r in results]

    @staticmethod
    def _rank(row_scores: np.ndarray, names: list[str], want: int) -> list[tuple[str, float]]:
        order = np.argsort(-row_scores, kind="stable")[:want]
        return [(names[j], float(row_scores[j])) for j in order]

    def _aggregate_partial(self, dist: np.ndarray, lab: np.ndarray, want: int) -> list[list[tuple[int, float]] | None]:
        """From the k best keys of each query, the ``want`` best tasks if they are certain, else None.

        A task with all of its ``top_keys`` best keys among the k results has an exact score; any other
        task's score is at most (found sims + missing * k-th sim) / top_keys. The top tasks are certain
        when ``want`` exact scores beat every such upper bound strictly.
        """
        _, pos_cols, _, agg = self._layout()
        n_tasks = agg.size
        n_q, k = lab.shape
        if np.any(lab < 0):  # cannot happen with k <= ntotal; be safe
            return [None] * n_q
        cols = pos_cols[lab]  # (n_q, k) task column of each hit
        out: list[list[tuple[int, float]] | None] = []
        for r in range(n_q):
            c, d = cols[r], dist[r].astype(np.float64)
            # rank of each hit within its task (hits are sorted by similarity, best first)
            order = np.argsort(c, kind="stable")
            cs = c[order]
            first = np.searchsorted(cs, cs, side="left")
            rank = np.empty(k, dtype=np.int64)
            rank[order] = np.arange(k) - first
            use = rank < agg[c]
            sums = np.bincount(c[use], weights=d[use], minlength=n_tasks)
            counts = np.bincount(c[use], minlength=n_tasks)
            complete = counts == agg
            exact = np.where(complete, sums / agg, -np.inf)
            kth = d[-1]
            bound = np.where(complete, -np.inf, (sums + (agg - counts) * kth) / agg)
            if complete.sum() < want:
                out.append(None)
                continue
            order_t = np.argsort(-exact, kind="stable")[:want]
            if exact[order_t[-1]] <= bound.max():
                out.append(None)
                continue
            out.append([(int(j), float(exact[j])) for j in order_t])
        return out

    def decide(self, query_emb: np.ndarray) -> list[str | None]:
        """Per query, the best task if its score reaches that task's threshold, else ``None`` (NO_TASK)."""
        out: list[str | None] = []
        for ranked in self.route(query_emb, top_k=1):
            if ranked and ranked[0][1] >= self._tasks[ranked[0][0]].threshold:
                out.append(ranked[0][0])
            else:
                out.append(NO_TASK)
        return out
