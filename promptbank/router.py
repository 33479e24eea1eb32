"""Route a query embedding to the task whose routing keys it is closest to, or to no task.

Keys are L2-normalised sentence embeddings (several prototypes per task, see :func:`make_prototypes`) held
in a FAISS ``IndexIDMap2(IndexFlatIP(dim))`` with stable int64 ids. A task's score for a query is the mean
of its ``top_keys`` best key similarities (``top_keys=1``: the max). :meth:`Router.decide` returns the best
task when its score reaches that task's threshold (see :func:`calibrate_threshold`), else ``None``
(:data:`NO_TASK`): the plain backbone answers, and the caller may raise a new-task signal.

With ``index="flat"`` (the default) results are exactly those of a brute-force computation over every key:
:meth:`Router.route` searches the index for a few neighbours and widens the search until the top tasks are
provably right. Exact search costs ~20 ms per query at 10^5 keys on 2 cores; for larger banks
``index="hnsw"`` (``IndexIDMap2(IndexHNSWFlat(dim, M, METRIC_INNER_PRODUCT))``) or ``index="ivf"``
(``IndexIVFFlat(IndexFlatIP, dim, nlist, METRIC_INNER_PRODUCT)``, ids stored in the inverted lists) find
candidate keys approximately; the tasks owning those candidates are then scored exactly from their stored
keys, so a routed score is always a task's true score and the only error is a task missed by the candidate
search. :func:`recall_at_1` measures that against exact search. :meth:`Router.scores` is always exact and
needs no index: the index (and the ``faiss`` import) is built on the first search that uses it.

numpy in, numpy out; nothing here knows about models or files (``index_bytes`` / ``from_keys`` let the
storage layer cache the index; the keys are always the source of truth).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import TaskExistsError, TaskNotFoundError

if TYPE_CHECKING:
    import faiss

__all__ = ["INDEX_KINDS", "NO_TASK", "Router", "calibrate_threshold", "make_prototypes", "recall_at_1"]

log = logging.getLogger(__name__)

NO_TASK = None
_NORM_TOL = 1e-3
_MIN_SEARCH_K = 32
_KMEANS_RESTARTS = 3
INDEX_KINDS = ("flat", "hnsw", "ivf")
_IVF_MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below this many training points per centroid
_IVF_RETRAIN_GROWTH = 4  # retrain the IVF coarse quantiser once the bank has grown this many times
_PARALLEL_MIN_VECTORS = 20_000  # FAISS adds of fewer vectors run on one thread
_PARALLEL_MIN_QUERIES = 16  # FAISS searches of fewer queries run on one thread


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _faiss():
    """The ``faiss`` module, imported on first use: a bank routed by the learned router (:mod:`promptbank.lda`,
    the default) never searches an index, so its process neither imports FAISS (~12 MiB resident) nor holds an
    index's copy of the keys."""
    import faiss

    return faiss


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


@contextmanager
def _one_thread_if(small: bool) -> Iterator[None]:
    """Run FAISS on one thread for small operations.

    FAISS parallelises adds and searches with OpenMP; for a task's few keys or a single query, thread start-up
    and spin-waiting cost far more than the work on a busy machine (measured on 2 shared cores: adding 16 keys
    to an HNSW graph 17 ms with 2 threads, 0.3 ms with one). ``omp_set_num_threads`` applies to the calling
    thread only; the previous value is restored.
    """
    faiss = _faiss()
    prev = faiss.omp_get_max_threads()
    if not small or prev == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


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
    faiss = _faiss()
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

    ``index`` chooses the candidate search of :meth:`route`: ``"flat"`` (exact), ``"hnsw"`` (graph; ``hnsw_m``
    links per node, ``ef_construction``, ``ef_search``) or ``"ivf"`` (``nlist`` inverted lists, default
    ``~4 sqrt(n)`` capped at ``n / 39``, searching ``nprobe`` of them). Approximate indexes are rebuilt lazily
    (on the next search) after removals (HNSW cannot delete) and IVF is retrained when the bank has grown 4x.
    Adding tasks does not rebuild them: a router copied from one whose index is built, with the same index
    options, builds its own index as a copy of that one plus the new tasks' keys (what :meth:`copy` then
    :meth:`add` does on every ``learn_task``; HNSW at 20,000 synthetic keys, one thread: 0.13 s instead of an
    8.6 s rebuild, ``benchmarks/index_growth.py``).
    Defaults measured on 100,000 MiniLM-like keys (6,250 tasks x 16), 1 CPU thread: HNSW builds in ~13 s and
    routes a query in ~0.7 ms with task recall@1 1.00 (ef_search 64: 0.4 ms, recall 0.64-0.89 on hard
    near-tie queries); IVF builds in ~11 s, ~0.8 ms, recall@1 0.99 (nprobe 16: 0.97). Exact flat search: 12-16 ms.

    The index is built lazily, on the first call that searches it (:meth:`route`, :meth:`decide`,
    :func:`recall_at_1`) or serialises it (:meth:`index_bytes`); :meth:`scores` and the key accessors never need
    it. A serialised index given to :meth:`from_keys` is checked and adopted at that point, or rebuilt.
    """

    def __init__(
        self,
        dim: int,
        *,
        top_keys: int = 1,
        index: str = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 256,
        nlist: int | None = None,
        nprobe: int = 32,
    ):
        self._dim = _check_pos_int(dim, "dim")
        self._top_keys = _check_pos_int(top_keys, "top_keys")
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        self._kind = index
        self._hnsw_m = _check_pos_int(hnsw_m, "hnsw_m")
        self._ef_construction = _check_pos_int(ef_construction, "ef_construction")
        self._ef_search = _check_pos_int(ef_search, "ef_search")
        self._nlist = None if nlist is None else _check_pos_int(nlist, "nlist")
        self._nprobe = _check_pos_int(nprobe, "nprobe")
        self._tasks: dict[str, _Task] = {}
        self._next_id = 0
        self._cache: tuple | None = None  # key layout (from the keys alone)
        self._pos_cols: np.ndarray | None = None  # task column of each index storage position (needs the index)
        self._index = self._inner = self._flat = None
        self._dirty = True  # no index yet, or it must be rebuilt from the keys before its next use
        self._pending: bytes | None = None  # a serialised index to check and adopt instead of rebuilding
        # readers share a published router: the lazy build runs once, not once per concurrent first search
        self._build_lock = threading.RLock()
        self._ivf_trained_on = 0  # number of keys the IVF coarse quantiser was trained on
        # the router this one was copied from, while it holds a built index that this one's can start from
        # (_extend_base); an ancestor, never a chain: a copy of an unbuilt copy takes over its base
        self._base: Router | None = None

    # ---- basic accessors ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"Router(dim={self._dim}, top_keys={self._top_keys}, index={self._kind!r}, tasks={len(self._tasks)}, "
            f"keys={self.ntotal})"
        )

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
    def index_kind(self) -> str:
        """``"flat"`` (exact), ``"hnsw"`` or ``"ivf"`` (approximate candidate search)."""
        return self._kind

    @property
    def index_config(self) -> dict:
        """Constructor options of the index, JSON-serialisable (``Router(dim, **index_config)`` rebuilds it)."""
        return {
            "top_keys": self._top_keys,
            "index": self._kind,
            "hnsw_m": self._hnsw_m,
            "ef_construction": self._ef_construction,
            "ef_search": self._ef_search,
            "nlist": self._nlist,
            "nprobe": self._nprobe,
        }

    @property
    def ntotal(self) -> int:
        """Number of stored keys."""
        if not self._dirty:
            return int(self._index.ntotal)
        return int(sum(t.ids.size for t in self._tasks.values()))

    @property
    def next_id(self) -> int:
        """The id the next key will get (persist it to keep ids unique across save/load)."""
        return self._next_id

    def _get(self, task: str) -> _Task:
        try:
            return self._tasks[task]
        except (KeyError, TypeError):
            raise TaskNotFoundError(f"no task named {task!r} in the router") from None

    def keys(self, task: str, *, copy: bool = True) -> np.ndarray:
        """The task's keys, ``(m, dim)`` float32: a copy, or with ``copy=False`` the stored read-only array (shared
        by every copy of this router; never changed in place)."""
        keys = self._get(task).keys
        return keys.copy() if copy else keys

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

    def copy(self, **index_options) -> Router:
        """An independent router with the same tasks, keys, ids, thresholds and next id, and the same index options
        unless overridden. The read-only key and id arrays are shared, not copied (O(tasks), whatever the number
        of keys); its index is built when first needed."""
        new = Router(self._dim, **{**self.index_config, **index_options})
        new._tasks = {name: _Task(t.keys, t.ids, t.threshold) for name, t in self._tasks.items()}
        new._next_id = self._next_id
        if new.index_config == self.index_config and self._kind != "flat":  # flat: a rebuild is as cheap
            new._base = self if not self._dirty else self._base
        return new

    # ---- mutation -------------------------------------------------------------------------------

    def _empty_index(self) -> faiss.Index:
        """An empty index of this router's kind (IVF: trained on ``self``'s keys, see :meth:`_ivf_index`)."""
        # the faiss wrapper keeps a reference to the inner index
        faiss = _faiss()
        if self._kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self._dim))
        if self._kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self._dim, self._hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self._ef_construction
            hnsw.hnsw.efSearch = self._ef_search
            return faiss.IndexIDMap2(hnsw)
        return self._ivf_index()

    def _ivf_nlist(self, n: int) -> int:
        cap = max(1, n // _IVF_MIN_POINTS_PER_LIST)
        want = self._nlist if self._nlist is not None else max(1, int(round(4 * math.sqrt(max(n, 1)))))
        return max(1, min(want, cap))

    def _ivf_index(self) -> faiss.IndexIVFFlat:
        """An empty IVF index whose coarse quantiser is trained on the stored keys (deterministic)."""
        keys = [t.keys for t in self._tasks.values()]
        x = np.concatenate(keys) if keys else np.zeros((0, self._dim), np.float32)
        nlist = self._ivf_nlist(x.shape[0])
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(self._dim)
        index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference
        if nlist == 1:  # one list: no clustering needed (and FAISS would warn on tiny training sets)
            centre = x.mean(0, keepdims=True) if x.shape[0] else np.zeros((1, self._dim), np.float32)
            quantizer.add(np.ascontiguousarray(centre, dtype=np.float32))
            index.is_trained = True
        else:
            index.cp.seed = 1234
            index.train(x)
        self._ivf_trained_on = x.shape[0]
        return index

    def _set_index(self, index: faiss.Index) -> None:
        faiss = _faiss()
        self._index = index
        # the searchable inner index: its labels are storage positions (IDMap2) or ids (IVF); a view that
        # lives as long as self._index
        self._inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        if self._kind == "flat":
            self._flat = self._inner
        self._cache = None
        self._pos_cols = None
        self._dirty = False
        self._pending = None
        self._base = None

    def _ensure_index(self) -> None:
        """Build the index if there is none or it is stale (adopting a matching serialised one if given)."""
        if not self._dirty:
            return
        with self._build_lock:
            if not self._dirty:  # another thread built it meanwhile
                return
            data, self._pending = self._pending, None
            if data is not None:
                if self._adopt_index(data):
                    return
                log.info("stored router index does not match the keys; rebuilding it")
            if not self._extend_base():
                self.rebuild_index()

    def _extend_base(self) -> bool:
        """Build the index as a copy of the base router's (the one this was copied from) plus the keys of the tasks
        added since, if that is all that changed: the base still has its index, its tasks are this router's first
        tasks with the same ids, and an IVF index has not grown past its retraining point. Else False (rebuild)."""
        base, self._base = self._base, None
        if base is None:
            return False
        faiss = _faiss()
        with base._build_lock:  # the base is a published router: readers may search it, nobody changes it
            if base._dirty or len(base._tasks) > len(self._tasks):  # not dirty: its index is built
                return False
            names = list(self._tasks)
            if list(base._tasks) != names[: len(base._tasks)]:
                return False
            if any(self._tasks[n].ids is not t.ids for n, t in base._tasks.items()):
                return False
            added = [self._tasks[n] for n in names[len(base._tasks) :]]
            n_keys = int(base._index.ntotal) + sum(t.ids.size for t in added)
            trained_on = base._ivf_trained_on
            if self._kind == "ivf" and n_keys > _IVF_RETRAIN_GROWTH * max(trained_on, _IVF_MIN_POINTS_PER_LIST):
                return False
            index = faiss.clone_index(base._index)
        if added:
            keys = np.concatenate([t.keys for t in added])
            with _one_thread_if(keys.shape[0] < _PARALLEL_MIN_VECTORS):
                index.add_with_ids(keys, np.concatenate([t.ids for t in added]))
        self._set_index(index)
        self._ivf_trained_on = trained_on
        return True

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
        grown = self.ntotal + k.shape[0] > _IVF_RETRAIN_GROWTH * max(self._ivf_trained_on, _IVF_MIN_POINTS_PER_LIST)
        if self._kind == "ivf" and grown:
            self._dirty = True  # retrain the coarse quantiser on the next search
        elif not self._dirty:
            with _one_thread_if(k.shape[0] < _PARALLEL_MIN_VECTORS):
                self._index.add_with_ids(k, ids)
        self._next_id += k.shape[0]
        self._tasks[task] = _Task(_readonly(k), _readonly(ids), thr)
        self._cache = self._pos_cols = self._pending = None

    def extend(self, task: str, keys: np.ndarray) -> None:
        """Append ``keys`` (``(m, dim)``, L2-normalised) to stored task ``task``, with new ids; its threshold and
        its place among the tasks are kept. The index is rebuilt on its next use."""
        entry = self._get(task)
        k = self._check_keys(keys)
        ids = np.arange(self._next_id, self._next_id + k.shape[0], dtype=np.int64)
        self._next_id += k.shape[0]
        self._replace_entry(task, np.concatenate([entry.keys, k]), np.concatenate([entry.ids, ids]))

    def truncate(self, task: str, n: int) -> None:
        """Keep only the first ``n`` (>= 1) keys of stored task ``task`` (and their ids); its threshold and its
        place among the tasks are kept. The index is rebuilt on its next use."""
        entry = self._get(task)
        n = _check_pos_int(n, "n")
        if n > entry.keys.shape[0]:
            raise ValueError(f"task {task!r} has {entry.keys.shape[0]} keys, cannot keep {n}")
        self._replace_entry(task, entry.keys[:n].copy(), entry.ids[:n].copy())

    def _replace_entry(self, task: str, keys: np.ndarray, ids: np.ndarray) -> None:
        """Stored task ``task`` with these keys and ids (its threshold kept)."""
        self._tasks[task] = _Task(_readonly(keys), _readonly(ids), self._tasks[task].threshold)
        self._cache = self._pos_cols = self._pending = None
        self._dirty = True  # an index without these keys (or with removed ones): rebuilt from the keys when used
        self._base = None

    def remove(self, task: str) -> None:
        """Remove a task and its ids from the index. :class:`TaskNotFoundError` (a ``KeyError``) if absent."""
        entry = self._get(task)
        ids = np.ascontiguousarray(entry.ids, dtype=np.int64)
        if self._kind == "hnsw" or self._dirty:  # HNSW cannot delete: rebuild lazily, once for many removals
            del self._tasks[task]
            self._cache = self._pos_cols = self._pending = None
            self._dirty = True
            return
        faiss = _faiss()
        removed = self._index.remove_ids(faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)))
        del self._tasks[task]
        self._cache = self._pos_cols = None
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

        Deterministic for ``"flat"`` and ``"ivf"``: the same router state always gives the same index (and the
        same ``index_bytes``). HNSW graphs built with several threads may differ in their links.
        """
        n_keys = sum(t.ids.size for t in self._tasks.values())
        with _one_thread_if(n_keys < _PARALLEL_MIN_VECTORS):
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
        self._ensure_index()
        return _faiss().serialize_index(self._index).tobytes()

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
        index: str = "flat",
        **index_options,
    ) -> Router:
        """Restore a router from its keys (the source of truth), thresholds and optionally its ids and index.

        Task order is ``keys``' order. Without ``ids`` the ids are assigned 0, 1, ... in that order (what a
        router built by ``add`` calls with no removals has). ``index_bytes`` is used only if it is an index of
        kind ``index`` (flat: ``IndexIDMap2(IndexFlatIP)``) whose ntotal, ids and vectors match the keys
        exactly; otherwise (stale, corrupt or foreign) the index is rebuilt from the keys. Either happens when the
        index is first needed (see :class:`Router`), not here. ``index_options``
        are the other :class:`Router` index options (``hnsw_m``, ``ef_search``, ``nlist``, ``nprobe`` ...).
        """
        if set(keys) != set(thresholds):
            raise ValueError(f"keys and thresholds name different tasks: {sorted(set(keys) ^ set(thresholds))}")
        if dim is None:
            if not keys:
                raise ValueError("dim is required to restore a router with no tasks")
            dim = int(np.asarray(next(iter(keys.values()))).shape[-1])
        router = cls(dim, top_keys=top_keys, index=index, **index_options)
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

        router._pending = None if index_bytes is None else bytes(index_bytes)
        return router

    def _adopt_index(self, data: bytes) -> bool:
        """Use a serialised index if it matches the stored keys and ids exactly; return whether it did."""
        faiss = _faiss()
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        except (RuntimeError, ValueError):  # corrupt bytes: rebuild
            return False
        if index.d != self._dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            return False
        expected_n = self.ntotal
        if index.ntotal != expected_n:
            return False
        want_ids = np.concatenate([t.ids for t in self._tasks.values()]) if expected_n else None
        want_vecs = np.concatenate([t.keys for t in self._tasks.values()]) if expected_n else None
        if self._kind == "ivf":
            if not isinstance(index, faiss.IndexIVFFlat):
                return False
            if expected_n:
                got_ids, got_vecs = _ivf_contents(index, self._dim)
                order, want = np.argsort(got_ids, kind="stable"), np.argsort(want_ids, kind="stable")
                if not (
                    np.array_equal(got_ids[order], want_ids[want]) and np.array_equal(got_vecs[order], want_vecs[want])
                ):
                    return False
            self._set_index(index)
            self._ivf_trained_on = expected_n
            return True
        if not isinstance(index, faiss.IndexIDMap2):
            return False
        inner = faiss.downcast_index(index.index)
        inner_type = faiss.IndexFlatIP if self._kind == "flat" else faiss.IndexHNSWFlat
        if not isinstance(inner, inner_type) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
            return False
        if inner.ntotal != expected_n:
            return False
        if expected_n:
            got_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            got_vecs = inner.reconstruct_n(0, expected_n)
            if not (np.array_equal(got_ids, want_ids) and np.array_equal(got_vecs, want_vecs)):
                return False
        if self._kind == "hnsw":
            inner.hnsw.efSearch = self._ef_search
        self._set_index(index)
        return True

    # ---- scoring --------------------------------------------------------------------------------

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(all keys in task order, task start offsets, per-task aggregation size ``min(top_keys, n_keys)``), from
        the keys alone (no index needed)."""
        if self._cache is None:
            entries = list(self._tasks.values())
            sizes = [t.ids.size for t in entries]
            if entries:
                all_keys = np.concatenate([t.keys for t in entries])
            else:
                all_keys = np.zeros((0, self._dim), dtype=np.float32)
            starts = np.cumsum([0, *sizes])
            agg = np.array([min(self._top_keys, n) for n in sizes], dtype=np.int64)
            self._cache = (all_keys, starts, agg)
        return self._cache

    def _index_cols(self) -> np.ndarray:
        """Build the index if needed; the task column of each index storage position (flat, HNSW: the inner
        index's labels) or, for IVF, of each id (``self._id_table`` maps ids to columns)."""
        self._ensure_index()
        if self._pos_cols is not None:
            return self._pos_cols
        with self._build_lock:
            return self._pos_cols if self._pos_cols is not None else self._compute_index_cols()

    def _compute_index_cols(self) -> np.ndarray:
        """:meth:`_index_cols` for a built index (under the build lock)."""
        entries = list(self._tasks.values())
        sizes = [t.ids.size for t in entries]
        all_ids = np.concatenate([t.ids for t in entries]) if entries else np.zeros(0, dtype=np.int64)
        cols = np.repeat(np.arange(len(entries), dtype=np.int64), sizes)
        order = np.argsort(all_ids, kind="stable")
        sorted_ids, sorted_cols = all_ids[order], cols[order]
        if self._kind == "ivf":  # IVF search returns ids: map them through the sorted id table
            self._id_table = (sorted_ids, sorted_cols)
            self._pos_cols = sorted_cols
            return self._pos_cols
        # the index's own id of each stored vector, in storage order (= the flat index's labels)
        index_ids = _faiss().vector_to_array(self._index.id_map).astype(np.int64)
        where = np.searchsorted(sorted_ids, index_ids)
        if index_ids.size != all_ids.size or (
            index_ids.size and not np.array_equal(sorted_ids[np.minimum(where, sorted_ids.size - 1)], index_ids)
        ):
            log.warning("router index out of sync with its keys; rebuilding it")
            self.rebuild_index()
            return self._compute_index_cols()
        self._pos_cols = sorted_cols[where] if index_ids.size else cols
        return self._pos_cols

    def _queries(self, query_emb: np.ndarray) -> np.ndarray:
        return _as_matrix(query_emb, "query_emb", self._dim, allow_1d=True)

    def _exact_scores(self, q: np.ndarray) -> np.ndarray:
        all_keys, starts, agg = self._layout()
        n_tasks = len(self._tasks)
        out = np.empty((q.shape[0], n_tasks), dtype=np.float32)
        if n_tasks == 0 or q.shape[0] == 0:
            return out[:, :n_tasks]
        if self._top_keys == 1:
            sims = q @ all_keys.T  # what a flat inner-product index computes, for every key
            return np.maximum.reduceat(sims, starts[:-1], axis=1).astype(np.float32, copy=False)
        sizes = np.diff(starts)
        width = max(int(sizes.max()), self._top_keys)
        if n_tasks * width <= 4 * all_keys.shape[0]:  # keys per task fairly even: one padded, vectorised pass
            return self._exact_scores_padded(q, all_keys, starts, agg, width)
        sims = q @ all_keys.T
        for j in range(n_tasks):
            block = sims[:, starts[j] : starts[j + 1]]
            a = int(agg[j])
            if a == 1:
                out[:, j] = block.max(axis=1)
            else:
                top = -np.sort(-block, axis=1)[:, :a]
                out[:, j] = top.mean(axis=1)
        return out

    def _exact_scores_padded(
        self, q: np.ndarray, all_keys: np.ndarray, starts: np.ndarray, agg: np.ndarray, width: int
    ) -> np.ndarray:
        """Exact top-``top_keys`` mean per task without a Python loop over tasks: similarities gathered into a
        ``(n_q, n_tasks, width)`` block padded with -inf, the ``top_keys`` largest taken by ``np.partition``."""
        n_keys, n_tasks = all_keys.shape[0], starts.size - 1
        cols = np.repeat(np.arange(n_tasks), np.diff(starts))
        slot = np.full((n_tasks, width), n_keys, dtype=np.int64)  # index n_keys = the -inf padding column
        slot[cols, np.arange(n_keys) - starts[cols]] = np.arange(n_keys)
        a = self._top_keys
        out = np.empty((q.shape[0], n_tasks), dtype=np.float32)
        chunk = max(1, (1 << 24) // max(1, n_tasks * width))  # bound the gathered block to ~64 MB
        for s in range(0, q.shape[0], chunk):
            sims = q[s : s + chunk] @ all_keys.T  # (c, n_keys)
            sims = np.concatenate([sims, np.full((sims.shape[0], 1), -np.inf, np.float32)], axis=1)
            block = sims[:, slot]  # (c, n_tasks, width)
            top = -np.partition(-block, a - 1, axis=2)[:, :, :a]  # the a largest, unordered; -inf = padding
            out[s : s + chunk] = np.where(np.isfinite(top), top, 0.0).sum(axis=2) / agg
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

        Flat index: searches for a few neighbours; when they do not make the top tasks and their scores certain,
        scores every key exactly, so the result equals the brute-force ranking. HNSW / IVF: the tasks owning the
        approximate nearest keys, each scored exactly (see :func:`recall_at_1`).
        """
        top_k = _check_pos_int(top_k, "top_k")
        q = self._queries(query_emb)
        n_q, n_tasks = q.shape[0], len(self._tasks)
        if n_tasks == 0 or n_q == 0:
            return [[] for _ in range(n_q)]
        names = list(self._tasks)
        want = min(top_k, n_tasks)
        if self._kind != "flat":
            return self._route_approximate(q, names, want)
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
            self._index_cols()
            with _one_thread_if(pending.size < _PARALLEL_MIN_QUERIES):
                dist, lab = self._flat.search(q[pending], k)
            ok = self._aggregate_partial(dist, lab, want)
            still = []
            for row, qi in enumerate(pending):
                if ok[row] is None:
                    still.append(qi)
                else:
                    results[qi] = [(names[j], float(sc)) for j, sc in ok[row]]
            pending = np.asarray(still, dtype=np.int64)
            # a wider flat search scans every key again: one exact pass (a matmul) is cheaper
            k = ntotal
        return [r if r is not None else [] for r in results]

    def _candidates(self, q: np.ndarray, k: int) -> np.ndarray:
        """Approximate search: the task column of each query's ``k`` candidate keys, ``(n_q, k)``, -1 = none."""
        pos_cols, faiss = self._index_cols(), _faiss()
        if self._kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self._ef_search, k))
            with _one_thread_if(q.shape[0] < _PARALLEL_MIN_QUERIES):
                _, lab = self._inner.search(q, k, params=params)  # labels: storage positions
            return np.where(lab >= 0, pos_cols[np.maximum(lab, 0)], -1)
        params = faiss.SearchParametersIVF(nprobe=min(self._nprobe, self._index.nlist))
        with _one_thread_if(q.shape[0] < _PARALLEL_MIN_QUERIES):
            _, lab = self._index.search(q, k, params=params)  # labels: ids
        sorted_ids, sorted_cols = self._id_table
        where = np.minimum(np.searchsorted(sorted_ids, lab), sorted_ids.size - 1)
        return np.where((lab >= 0) & (sorted_ids[where] == lab), sorted_cols[where], -1)

    def _task_scores(self, qv: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact scores of one query ``(dim,)`` for the tasks in ``cols`` (from their stored keys)."""
        all_keys, starts, agg = self._layout()
        lo, hi = starts[cols], starts[cols + 1]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        sims = all_keys[rows] @ qv  # (n_rows,)
        seg = np.cumsum(np.concatenate([[0], hi - lo]))[:-1]
        if self._top_keys == 1:
            return np.maximum.reduceat(sims, seg)
        out = np.empty(cols.size, dtype=np.float32)
        for i, (s, n, a) in enumerate(zip(seg, hi - lo, agg[cols])):
            block = sims[s : s + n]
            out[i] = block.max() if a == 1 else -np.sort(-block)[:a].mean()
        return out

    def _route_approximate(self, q: np.ndarray, names: list[str], want: int) -> list[list[tuple[str, float]]]:
        """HNSW / IVF: tasks owning the approximate nearest keys, each scored exactly; widened until ``want``
        distinct tasks are found (up to exact scoring of every task)."""
        n_q, ntotal = q.shape[0], self.ntotal
        results: list[list[tuple[str, float]] | None] = [None] * n_q
        pending = np.arange(n_q)
        k = min(ntotal, max(_MIN_SEARCH_K, 2 * self._top_keys * want))
        while pending.size:
            if k >= ntotal:  # the whole bank: exact
                s = self._exact_scores(q[pending])
                for row, qi in enumerate(pending):
                    results[qi] = self._rank(s[row], names, want)
                break
            cols = self._candidates(q[pending], k)
            still = []
            for row, qi in enumerate(pending):
                cand = np.unique(cols[row][cols[row] >= 0])  # ascending = insertion order (ties)
                if cand.size < want:
                    still.append(qi)
                    continue
                sc = self._task_scores(q[qi], cand)
                order = np.argsort(-sc, kind="stable")[:want]
                results[qi] = [(names[cand[j]], float(sc[j])) for j in order]
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
        pos_cols, (_, _, agg) = self._index_cols(), self._layout()
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


def _ivf_contents(index: faiss.IndexIVFFlat, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) stored in an IVF-Flat index, list by list."""
    faiss = _faiss()
    invlists = index.invlists
    ids, vecs = [], []
    for lst in range(index.nlist):
        n = invlists.list_size(lst)
        if n == 0:
            continue
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * index.code_size).copy()
        vecs.append(codes.view(np.float32).reshape(n, dim))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(vecs)


def recall_at_1(router: Router, query_emb: np.ndarray, *, level: str = "task") -> float:
    """Fraction of queries whose approximate result equals exact search (1.0 for a flat router).

    ``level="task"``: the task :meth:`Router.route` ranks first has the exact best task score (ties count as
    hits); ``level="key"``: the index's nearest key is an exact nearest key (the usual ANN recall@1).
    """
    if level not in ("task", "key"):
        raise ValueError(f"level must be 'task' or 'key', got {level!r}")
    q = router._queries(query_emb)
    if q.shape[0] == 0 or router.ntotal == 0:
        raise ValueError("recall_at_1 needs at least one query and one stored key")
    tol = 1e-5
    if level == "task":
        best = router.scores(q).max(axis=1)
        got = np.array([ranked[0][1] for ranked in router.route(q, top_k=1)])
        return float(np.mean(got >= best - tol))
    all_keys, _, _ = router._layout()
    best = (q @ all_keys.T).max(axis=1)
    if router.index_kind == "flat":
        return 1.0
    router._ensure_index()
    faiss = _faiss()
    if router.index_kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=router._ef_search)
        dist, lab = router._inner.search(q, 1, params=params)
    else:
        params = faiss.SearchParametersIVF(nprobe=min(router._nprobe, router._index.nlist))
        dist, lab = router._index.search(q, 1, params=params)
    return float(np.mean((lab[:, 0] >= 0) & (dist[:, 0] >= best - tol)))
