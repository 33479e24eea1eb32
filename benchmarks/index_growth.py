"""What adding a task costs a bank with an approximate router index (HNSW / IVF): extending the index vs rebuilding it.

Every ``learn_task`` (and ``add_task``) copies the published router, adds the new task's keys to the copy and
publishes it. The copy's index is built lazily, on its first search (a bank routed by the ``knn`` scorer searches
it in every ``learn_task``, for warm start). Before, that build was a rebuild from all the keys (HNSW: the whole
graph again; IVF: k-means retraining); now it is a copy of the published router's index plus the new keys
(``Router._extend_base``). This measures both on the same router, interleaved: the time from ``copy()`` to the
first search's answer, with 16 new keys per task, keys of dimension 768 (the default routing embedding's), tasks
of 16 keys drawn around their own centres (MiniLM-like clustered unit vectors; no data files needed).

    python benchmarks/index_growth.py            # 5,000 and 20,000 keys, 3 repeats (~3 min at 1 thread)
    python benchmarks/index_growth.py --quick    # 2,000 keys, 1 repeat (seconds)

Also checked: the extended index answers with exact task scores (the router always rescores its candidates) and
its task recall@1 against exact search on queries near the stored keys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import versions, write_result  # noqa: E402

DIM = 768
KEYS_PER_TASK = 16


def task_keys(rng: np.random.Generator, n_tasks: int, dim: int = DIM, spread: float = 0.5) -> list[np.ndarray]:
    """``n_tasks`` arrays of 16 unit keys, each task's keys around its own random centre."""
    out = []
    for _ in range(n_tasks):
        centre = rng.standard_normal(dim)
        x = centre + spread * rng.standard_normal((KEYS_PER_TASK, dim))
        out.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return out


def measure(kind: str, n_keys: int, repeats: int, seed: int = 0) -> dict:
    from promptbank.router import Router, recall_at_1

    rng = np.random.default_rng(seed)
    n_tasks = n_keys // KEYS_PER_TASK
    keys = task_keys(rng, n_tasks + repeats)
    base = Router(DIM, top_keys=3, index=kind)
    for i in range(n_tasks):
        base.add(f"task{i}", keys[i], 0.5)
    t = time.perf_counter()
    base.route(keys[0][:1])  # the published router, built (as after a search)
    first_build = time.perf_counter() - t
    seconds: dict[str, list[float]] = {"extend": [], "rebuild": []}
    recall: list[float] = []
    for r in range(repeats):
        new_keys = keys[n_tasks + r]
        for mode in ("extend", "rebuild") if r % 2 == 0 else ("rebuild", "extend"):
            t = time.perf_counter()
            router = base.copy()
            if mode == "rebuild":
                router._base = None  # the behaviour before: the copy's index is rebuilt from all the keys
            router.add("new", new_keys, 0.5)
            router.route(new_keys[:1])
            seconds[mode].append(time.perf_counter() - t)
            if mode == "extend":
                noise = 0.05 * rng.standard_normal((64, DIM))
                pick = rng.integers(0, n_tasks, 63)
                q = np.concatenate([np.stack([keys[i][0] for i in pick]), new_keys[:1]]) + noise
                q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
                recall.append(recall_at_1(router, q))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "kind": kind,
        "keys": n_tasks * KEYS_PER_TASK,
        "tasks": n_tasks,
        "first_build_s": first_build,
        "seconds": seconds,
        "median_s": med,
        "ratio_extend_vs_rebuild": med["extend"] / med["rebuild"],
        "task_recall_at_1_extended": min(recall),
    }


def main(argv=None) -> dict:
    import faiss
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="5000,20000", help="comma-separated numbers of stored keys")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [2000] if args.quick else [int(x) for x in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for kind in ("hnsw", "ivf"):
            rows.append(measure(kind, n, repeats))
            r = rows[-1]
            print(
                f"{kind:4s} {r['keys']:7d} keys: add a task + first search {1000 * r['median_s']['extend']:8.1f} ms "
                f"extended vs {1000 * r['median_s']['rebuild']:8.1f} ms rebuilt ({r['ratio_extend_vs_rebuild']:.3f}x)"
                f"; recall@1 {r['task_recall_at_1_extended']:.2f}",
                flush=True,
            )
    result = {
        "config": {"sizes": sizes, "repeats": repeats, "threads": args.threads, "dim": DIM},
        "versions": versions(),
        "results": rows,
        "wall_seconds": time.perf_counter() - t0,
    }
    print("\n| index | keys | add a task + first search, extended | rebuilt (before) | ratio | task recall@1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['keys']:,} | {1000 * r['median_s']['extend']:.0f} ms | "
            f"{1000 * r['median_s']['rebuild']:.0f} ms | {r['ratio_extend_vs_rebuild']:.3f} | "
            f"{r['task_recall_at_1_extended']:.2f} |"
        )
    write_result(result, args.out, "index_growth", quick=args.quick)
    return result


if __name__ == "__main__":
    main()
