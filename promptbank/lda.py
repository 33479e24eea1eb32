"""The learned router: a Gaussian classifier over routing keys (linear discriminant analysis, shared covariance).

Each task's keys are the routing embeddings of its training inputs, grouped by label (classification) or by
k-means cluster (generation). Every group ``g`` is a Gaussian with its own mean ``mu_g`` and one covariance
``S`` shared by all groups of all tasks, estimated from the keys' within-group scatter with Ledoit-Wolf shrinkage
towards a scaled identity. A query ``x`` goes to the task owning the group at the smallest Mahalanobis
distance ``(x - mu_g)' S^-1 (x - mu_g)``, which is the LDA decision rule; the routing score of a task is minus
that distance over the embedding dimension (higher is better, about -1 for a typical in-task query).

Why not cosine to the nearest key: the shared covariance learns which directions of the embedding vary within
tasks (topic inside a news stream) and which separate them (the source's genre and format), so the same keys
route far better (CL-4, 16 examples per class: 96 % vs 82 % top-1) and the distance is a calibrated
out-of-scope score (Lee et al. 2018; CLINC150 out-of-scope AUROC ~0.95). Nothing is forgotten: a new task adds
its group means and its scatter; no old data is needed, only the stored keys.

Which task, and whether any: two discriminants on the same keys. Thresholds and scores (:meth:`scores`, what
"no task" and out-of-scope detection use) are always the per-group model's above. The ranking of tasks may instead
use one Gaussian per task, its covariance from each key's deviation from its task's mean: it treats the spread
between a task's labels as within-task variation, which helps when tasks differ in genre and format more than in
content (CL-4 and the 16-task long stream, held-out train-pool queries, 3 seeds: top-1 97.6 vs 96.3 and 90.6 vs
89.4) and hurts when the labels are what sets tasks apart (CLINC150's domains, its validation queries: 93.1 vs 97.0). So it is chosen per
fit, on the keys alone: the discriminant with the higher cross-fitted top-1 over the keys (same folds as the
thresholds; ties keep the per-group one) ranks the tasks (:attr:`discriminant`, :attr:`cv_top1`). A bank whose
tasks have one group each has nothing to choose. When the per-group one ranks, the per-task one still guards: a
query is answered only if it also passes the threshold of the task the per-task Gaussians rank first
(:meth:`GaussianRouter.route_guarded`), so that out-of-scope rejection does not hinge on which discriminant won a
near tie.

"No task" threshold: per task, the ``1 - threshold_quantile`` quantile of its own keys' cross-fitted distances
(5 folds: each key measured against means and a covariance fitted without it). Since ``S`` changes as tasks are
added, thresholds are recomputed with it, from the keys.

Pure numpy; refitted from the keys whenever the task set changes: six Ledoit-Wolf fits and ``d x d``
eigendecompositions (twelve when some task has several groups: the per-task model too), O(min(N, 20,000) d^2 +
d^3 + N d g) for N keys in d dimensions with g groups per task (1.5 s for 2,560 keys of dimension 768 on one
thread, 2.9 s with both candidates); the covariance is estimated from at most 20,000 keys.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

__all__ = ["ROUTING_SCORERS", "GaussianRouter", "ledoit_wolf_covariance", "precision_of", "task_folds"]

# How a bank scores tasks for a query: "lda" (this module; the default for new banks) or "knn" (mean cosine of
# the task's top keys, promptbank.router.Router; banks saved before the learned router keep it).
ROUTING_SCORERS = ("lda", "knn")

# Held-out distances are computed for this many (row, group) pairs at a time while calibrating: bounds the
# (rows, groups) matrices to ~16 MiB each however many tasks a bank holds
_DISTANCE_ELEMENTS = 1 << 22
_MIN_HELD_OUT = 5  # a task with fewer held-out distances uses the pooled distances of all tasks
_FOLDS = 5  # cross-fitting folds for the thresholds
# The shared covariance is estimated from at most this many within-group deviations (a fixed random subset):
# 20,000 samples pin down a 768 x 768 covariance well, and it bounds each fit at O(20,000 d^2) however many keys
# a bank holds (1,000 tasks x 256 keys). Group means always use every key.
_MAX_COV_ROWS = 20_000


def ledoit_wolf_covariance(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of rows that are already centred (``(n, d)``) -> (covariance, shrinkage).

    ``(1 - s) C + s (tr(C) / d) I`` with the shrinkage ``s`` of Ledoit & Wolf (2004), as in scikit-learn.
    """
    x = np.asarray(centered, dtype=np.float64)
    n, d = x.shape
    emp = x.T @ x / n
    mu = np.trace(emp) / d
    # scikit-learn's sum((x**2).T @ (x**2)) is the sum over rows of their squared norm, squared: the same number
    # without an (n, d) copy and a (d, d) product
    beta_ = float(np.sum(np.einsum("ij,ij->i", x, x) ** 2))
    delta_ = float(np.sum(emp**2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * np.trace(emp) + d * mu**2) / d
    beta = min(beta, delta)
    s = 0.0 if beta == 0 or delta == 0 else float(beta / delta)
    cov = (1 - s) * emp
    cov[np.diag_indices(d)] += s * mu
    return cov, s


def _fit(items: list[tuple[int, np.ndarray, np.ndarray]], dim: int, *, per_task: bool = False):
    """Group means and the shared shrunk precision from ``(task index, keys, groups)`` -> (owner, means, precision,
    shrinkage); ``owner[g]`` is the task index of group ``g``. ``per_task``: one Gaussian per task (its groups
    ignored), the covariance from each key's deviation from its task's mean."""
    means, owner, centered = [], [], []
    for t, keys, groups in items:
        for g in [None] if per_task else np.unique(groups):
            rows = keys if g is None else keys[groups == g]
            if not len(rows):
                continue
            mu = rows.mean(0)
            means.append(mu)
            owner.append(t)
            centered.append(rows - mu)
    mus = np.stack(means) if means else np.zeros((0, dim))
    if centered:
        dev = np.concatenate(centered)
        if len(dev) > _MAX_COV_ROWS:
            dev = dev[np.sort(np.random.default_rng(0).choice(len(dev), _MAX_COV_ROWS, replace=False))]
        cov, shrinkage = ledoit_wolf_covariance(dev)
    else:
        cov, shrinkage = np.eye(dim), 1.0
    return np.asarray(owner, dtype=np.int64), mus, precision_of(cov), shrinkage


def precision_of(cov: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive (semi)definite ``cov``, through its eigendecomposition (stable for a
    near-singular one: eigenvalues are floored at 1e-8 of the largest)."""
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 1e-8 * max(float(evals.max(initial=0.0)), 1e-12))
    return (evecs / evals) @ evecs.T


def task_folds(name: str, n: int) -> np.ndarray:
    """Cross-fitting fold (0 .. _FOLDS - 1) of each of a task's ``n`` keys, drawn from the task's name, so that
    thresholds do not depend on the order tasks were added in."""
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    folds = np.empty(n, dtype=np.int64)
    folds[rng.permutation(n)] = np.arange(n) % _FOLDS
    return folds


class _Params:
    """Linear form of the fitted Gaussians: distance(x, g) = x'Px - 2 (w_g . x + b_g)."""

    def __init__(self, owner: np.ndarray, mus: np.ndarray, precision: np.ndarray):
        self.owner = owner
        self.precision = precision.astype(np.float32)
        projected = mus @ precision  # (G, d)
        self.w = projected.astype(np.float32)
        self.b = (-0.5 * np.einsum("gd,gd->g", mus, projected)).astype(np.float32)

    def distances(self, x: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """(n, G) squared Mahalanobis distances of rows ``x`` to every group mean (or (n, len(cols)) to groups
        ``cols`` only)."""
        x = np.asarray(x, dtype=np.float32)
        quad = np.einsum("nd,nd->n", x @ self.precision, x)
        w, b = (self.w, self.b) if cols is None else (self.w[cols], self.b[cols])
        return np.maximum(quad[:, None] - 2.0 * (x @ w.T + b), 0.0)


class GaussianRouter:
    """LDA over the keys of every task.

    ``tasks``: ``{name: (keys (k, d), groups (k,) ints, threshold_quantile[, added])}``; ``groups=None`` puts all
    of a task's keys in one group; ``added`` (default 0): the number of its last keys that are routing examples
    (:meth:`promptbank.PromptBank.add_routing_examples`), fitted like the others but not calibrated on, so that
    a few examples far from the training inputs cannot loosen the task's threshold. :meth:`route` ranks tasks
    for a batch of query embeddings; :meth:`threshold` is a task's "no task" threshold on the same score scale.
    """

    def __init__(self, tasks: Mapping[str, tuple], dim: int):
        self.dim = int(dim)
        self.names = list(tasks)
        items = []
        self._added = [int(spec[3]) if len(spec) > 3 else 0 for spec in tasks.values()]
        for t, (keys, groups, *_) in enumerate(tasks.values()):
            keys = np.asarray(keys, dtype=np.float64)
            groups = np.zeros(len(keys), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
            items.append((t, keys, groups))
        owner, mus, precision, self.shrinkage = _fit(items, self.dim)
        self._params = _Params(owner, mus, precision)
        assert np.all(np.diff(owner) >= 0), "groups must be ordered by task"
        # tasks that have groups, and each one's first group column (a task's groups are contiguous)
        self._nonempty, self._starts = np.unique(owner, return_index=True)
        # the per-task discriminant is a candidate for ranking when some task has several groups (else it is the
        # same model) and there are tasks to tell apart
        candidate = len(self._nonempty) >= 2 and any(len(np.unique(g)) > 1 for _, _, g in items)
        self._thresholds, self.cv_top1 = self._calibrate(items, [spec[2] for spec in tasks.values()], candidate)
        self._ranker: _Params | None = None  # ranks the tasks when not the per-group model
        self._guard: _Params | None = None  # the per-task model, when it is not the ranker: its first task is checked
        self.discriminant = "group"
        if self.cv_top1 is not None:
            per_task = _Params(*_fit(items, self.dim, per_task=True)[:3])
            if self.cv_top1["task"] > self.cv_top1["group"]:
                self._ranker, self.discriminant = per_task, "task"
            else:
                self._guard = per_task

    def __len__(self) -> int:
        return len(self.names)

    def task_distances(self, x: np.ndarray) -> np.ndarray:
        """(n, T) distance of each query to each task (its nearest group), tasks in :attr:`names` order."""
        d = self._params.distances(x)
        out = np.full((len(x), len(self.names)), np.inf, dtype=np.float32)
        if d.shape[1]:  # a task's groups are contiguous columns: one vectorised min per task
            out[:, self._nonempty] = np.minimum.reduceat(d, self._starts, axis=1)
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(n, T) routing scores: minus the task distance over the embedding dimension (higher is closer)."""
        return -self.task_distances(x) / self.dim

    def rank_scores(self, x: np.ndarray) -> np.ndarray:
        """(n, T) the scores tasks are ranked by: :meth:`scores`, or with :attr:`discriminant` ``"task"`` minus
        the distance to each task's own Gaussian (one per task, the covariance of keys around their task's mean)
        over the embedding dimension."""
        if self._ranker is None:
            return self.scores(x)
        out = np.full((len(x), len(self.names)), -np.inf, dtype=np.float32)
        out[:, self._ranker.owner] = -self._ranker.distances(x) / self.dim
        return out

    def route(self, x: np.ndarray, *, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """Per query, the ``top_k`` tasks by :meth:`rank_scores`, each with its :meth:`scores` value (the score
        its "no task" threshold applies to; with the per-task discriminant these need not be in ranked order)."""
        return self.route_guarded(x, top_k=top_k)[0]

    def route_guarded(
        self, x: np.ndarray, *, top_k: int = 3
    ) -> tuple[list[list[tuple[str, float]]], list[tuple[str, float] | None]]:
        """:meth:`route`, and per query the guard: ``(task, score)`` of the task the per-task Gaussians rank
        first when the tasks are ranked by label groups and it is not the first-ranked task, else ``None``.

        A query is answered by its first-ranked task only if it passes that task's threshold and the guard's
        (:meth:`decide`). Why: ranked by label groups, a query far from every task can come nearest to one label
        group of a broad task (a question-type or forum-topic task, whose groups are wide and threshold loose) and
        pass; the per-task Gaussians rank the tasks by their whole spread, and their first task's threshold is the
        one such a query fails (CLINC150's out-of-scope requests in banks of topic, review and intent tasks ranked by
        label groups: 46-48 % rejected without the guard, 94-95 % with it; on CLINC150's domains alone 62 -> 68 %
        for 0.6 points of hit@1; "Routing examples" in benchmarks/RESULTS.md). With the per-task ranking, the
        first-ranked task already is that task."""
        n = len(x)
        if not self.names:
            return [[] for _ in range(n)], [None] * n
        s = self.scores(x)
        rank = s if self._ranker is None else self.rank_scores(x)
        k = min(top_k, s.shape[1])
        top = np.argsort(-rank, axis=1, kind="stable")[:, :k]
        ranked = [[(self.names[j], float(s[i, j])) for j in row] for i, row in enumerate(top)]
        guards: list[tuple[str, float] | None] = [None] * n
        if self._guard is not None and n:
            first = self._guard.owner[self._guard.distances(x).argmin(1)]
            for i in np.flatnonzero(first != top[:, 0]):
                guards[i] = (self.names[first[i]], float(s[i, first[i]]))
        return ranked, guards

    def decide(self, x: np.ndarray) -> list[str | None]:
        """Per query, the task that answers it: the first-ranked one if the query passes its threshold and the
        guard's (:meth:`route_guarded`), else ``None`` ("no task")."""
        ranked, guards = self.route_guarded(x, top_k=1)
        out: list[str | None] = []
        for r, g in zip(ranked, guards):
            ok = bool(r) and r[0][1] >= self._thresholds[r[0][0]] and (g is None or g[1] >= self._thresholds[g[0]])
            out.append(r[0][0] if ok else None)
        return out

    def threshold(self, name: str) -> float:
        return self._thresholds[name]

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self._thresholds)

    def _calibrate(self, items, quantiles: list[float], candidate: bool = False):
        """Per task: the (1 - q) quantile of its keys' held-out distances, as a score threshold; and, when the
        per-task discriminant is a ``candidate``, the cross-fitted top-1 of both discriminants over the keys
        (``{"group": share, "task": share}``, else ``None``).

        Cross-fitted: the keys are split into ``_FOLDS`` folds (within each task); each fold's keys are measured
        against means and a covariance fitted without them. In-sample distances would be far too small (the
        covariance is fitted to the very points, in hundreds of dimensions), so the threshold would reject most
        new in-task queries.
        """
        # training keys' folds as without examples (thresholds come back exactly when they are removed); the
        # examples' folds drawn apart
        folds = [
            np.concatenate([task_folds(name, len(keys) - a), task_folds(name + "\0examples", a)])
            for name, (_, keys, _), a in zip(self.names, items, self._added)
        ]
        held: list[list[np.ndarray]] = [[] for _ in items]
        hits = {"group": 0, "task": 0, "n": 0}
        for k in range(_FOLDS):
            train = [(t, keys[f != k], groups[f != k]) for (t, keys, groups), f in zip(items, folds) if np.any(f != k)]
            if not train:
                continue
            owner, mus, precision, _ = _fit(train, self.dim)
            params = _Params(owner, mus, precision)
            task_model = _Params(*_fit(train, self.dim, per_task=True)[:3]) if candidate else None
            starts = np.flatnonzero(np.r_[True, np.diff(owner) != 0])  # each task's first group column
            column = np.full(len(items), -1, dtype=np.int64)  # each task's column of per-task minima, if it has one
            column[owner[starts]] = np.arange(len(starts))
            # every task's held-out keys of this fold, measured together in chunks (one matrix product each)
            held_rows = [(t, keys[f == k]) for (t, keys, _), f in zip(items, folds)]
            x = np.concatenate([rows for _, rows in held_rows])
            row_task = np.concatenate([np.full(len(rows), t, dtype=np.int64) for t, rows in held_rows])
            # which held-out rows calibrate their task's threshold: its training keys, not its routing examples
            row_calib = np.concatenate(
                [
                    (np.arange(len(keys)) < len(keys) - a)[f == k]
                    for (_, keys, _), f, a in zip(items, folds, self._added)
                ]
            )
            chunk = max(1, _DISTANCE_ELEMENTS // max(len(owner), 1))
            for a in range(0, len(x), chunk):
                xs, ts, cs = x[a : a + chunk], row_task[a : a + chunk], row_calib[a : a + chunk]
                nearest = np.minimum.reduceat(params.distances(xs), starts, axis=1)  # (rows, tasks with groups)
                for t in np.unique(ts):  # each row's distance to its own task (its nearest group), if it has groups
                    if column[t] >= 0:
                        held[t].append(nearest[(ts == t) & cs, column[t]])
                if task_model is not None:  # top-1 of each discriminant over the held-out keys
                    hits["group"] += int(np.sum(owner[starts][nearest.argmin(1)] == ts))
                    hits["task"] += int(np.sum(task_model.owner[task_model.distances(xs).argmin(1)] == ts))
                    hits["n"] += len(xs)
        per_task = [np.concatenate(h) if h else np.zeros(0, dtype=np.float32) for h in held]
        pooled = np.concatenate(per_task) if per_task else np.zeros(0)
        out = {}
        for t, name in enumerate(self.names):
            d = per_task[t] if len(per_task[t]) >= _MIN_HELD_OUT else pooled
            if len(d) == 0:
                out[name] = -np.inf  # nothing to calibrate on: accept the best task
                continue
            out[name] = float(-np.quantile(d, 1.0 - quantiles[t]) / self.dim)
        cv = {m: hits[m] / hits["n"] for m in ("group", "task")} if candidate and hits["n"] else None
        return out, cv
