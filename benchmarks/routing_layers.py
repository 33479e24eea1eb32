"""Which encoder layers to route with: routing accuracy and one-query latency of the routing embedders.

The default routing embedder, ``all-MiniLM-L6-v2+mid``, concatenates MiniLM's sentence embedding (layer 6) with
its mean-pooled middle layer (3). ``+layers=a,b`` embedders run only the first ``max(a, b)`` layers, so
``+layers=3,2`` costs half the forward of the default. This measures what that costs in routing accuracy and
gains in latency, without touching any test split:

- accuracy: per task, 16 keys per label and up to 30 queries per label drawn disjointly from the TRAIN pools
  (the same pools ``forgetting.py`` draws its training examples from); the learned router (LDA, as banks route
  by default) fitted on the keys of all tasks of a task set; top-1 and hit@1 (with the "no task" threshold) of
  the queries. Task sets: CL-4 (AG News, Amazon, DBpedia, Yahoo) and the 16 tasks of the long stream.
  Every layer combination comes from one forward pass per text (the model's hidden states); tests check that a
  ``+layers=`` embedder gives the same vectors from its truncated model.
- latency: one query at a time (real CLINC150 out-of-scope queries), median / p99 ms of ``encode`` for the
  default and the fast embedders, interleaved in one loop (same load for all).

    python benchmarks/routing_layers.py            # ~6 min on 2 cores at 1 thread
    python benchmarks/routing_layers.py --quick    # 2 tasks sets cut to 4 tasks, 4 queries per label
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import auroc, default_data_dir, versions, write_result  # noqa: E402

VARIANTS = {  # name -> hidden-state indices (1 = first transformer layer); L = the model's number of layers
    "default (+mid: L, L/2)": "mid",
    "+layers=3,2": [3, 2],
    "+layers=3": [3],
    "+layers=4,2": [4, 2],
    "+layers=2,1": [2, 1],
    "+layers=2": [2],
    "+layers=1": [1],
    "last layer only (sentence embedding)": "last",
}


def _layers(spec, n_layers: int) -> list[int]:
    return {"mid": [n_layers, n_layers // 2], "last": [n_layers]}.get(spec, spec) if isinstance(spec, str) else spec


def sample(data_dir: Path, names: list[str], keys_per_label: int, queries_per_label: int, seed: int):
    """Keys and queries from each task's TRAIN pool (disjoint): (key texts, key tasks, key groups, query texts,
    query tasks)."""
    import forgetting

    kt, ktask, kgroup, qt, qtask = [], [], [], [], []
    for name in names:
        labels, pool, _ = forgetting._dataset_rows(data_dir, name)
        by: dict[str, list[str]] = {}
        for r in pool:
            by.setdefault(r["label"], []).append(r["text"])
        rng = random.Random(f"{seed}:{name}")
        for g, lab in enumerate(labels):
            rows = by.get(lab, [])
            xs = rng.sample(rows, min(keys_per_label + queries_per_label, len(rows)))
            keys = xs[:keys_per_label]
            kt += keys
            ktask += [name] * len(keys)
            kgroup += [g] * len(keys)
            qt += xs[keys_per_label:]
            qtask += [name] * len(xs[keys_per_label:])
    return kt, ktask, kgroup, qt, qtask


def layer_means(encoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(n, L + 1, d): every hidden state of the (full) model, mean-pooled and L2-normalised, per text."""
    import torch

    from promptbank.embed import _mean_pool

    out = [None] * len(texts)
    for idx, res, mask in encoder.forward_batches(texts, batch_size, hidden_states=True):
        pooled = torch.stack([_mean_pool(h, mask) for h in res.hidden_states], 1)
        for j, i in enumerate(idx):
            out[i] = pooled[j].numpy()
    return np.stack(out)


def combine(means: np.ndarray, layers: list[int]) -> np.ndarray:
    x = np.concatenate([means[:, x] for x in layers], 1) / np.sqrt(len(layers))
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def routing_accuracy(keys, ktask, kgroup, queries, qtask, names, quantile: float = 0.05, oos=None) -> dict:
    """Top-1 and hit@1 of the learned router on ``queries``; with out-of-scope queries ``oos``, also the AUROC of
    its "no task" score (the first-ranked task's score) between in-task and out-of-scope queries."""
    from promptbank.lda import GaussianRouter

    ktask, kgroup = np.asarray(ktask), np.asarray(kgroup)
    spec = {n: (keys[ktask == n].astype(np.float64), kgroup[ktask == n], quantile) for n in names}
    router = GaussianRouter(spec, keys.shape[1])
    routes = router.route(queries, top_k=1)
    top1 = [r[0][0] == g for r, g in zip(routes, qtask)]
    hit = [d == g for d, g in zip(router.decide(queries), qtask)]
    out = {"top1": float(np.mean(top1)), "hit@1": float(np.mean(hit)), "queries": len(qtask)}
    if oos is not None:
        out["auroc"] = auroc([r[0][1] for r in routes], [r[0][1] for r in router.route(oos, top_k=1)])
    return out


def latency(variants: dict[str, str], queries: list[str], rounds: int) -> dict:
    """Median / p99 ms of one-query ``encode`` per embedder spec, interleaved."""
    from promptbank.embed import SentenceEmbedder

    embedders = {k: SentenceEmbedder(spec) for k, spec in variants.items()}
    for e in embedders.values():
        e.encode(queries[:4])  # load + warm up
    times: dict[str, list[float]] = {k: [] for k in embedders}
    for _ in range(rounds):
        for q in queries:
            for k, e in embedders.items():
                t = time.perf_counter()
                e.encode([q])
                times[k].append(1e3 * (time.perf_counter() - t))
    return {
        k: {"p50_ms": statistics.median(v), "p99_ms": float(np.percentile(v, 99)), "n": len(v)}
        for k, v in times.items()
    }


def main(argv=None) -> dict:
    import forgetting
    import torch

    from promptbank.embed import DEFAULT_EMBEDDER, SentenceEmbedder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--model", default=DEFAULT_EMBEDDER, help="sentence-embedding model (plain mean pooling)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency-queries", type=int, default=100)
    ap.add_argument(
        "--query-dtype",
        default=None,
        choices=["bfloat16", "float16"],
        help="also route the queries embedded with the weights in this dtype (keys stay float32, as in a bank learned "
        "with a float32 embedder and served with a low-precision one): accuracy_<dtype>_queries",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    sets = {"cl4": list(forgetting.TASKS), "long": list(forgetting.STREAMS["long"]["L1"])}
    keys_per_label, queries_per_label = 16, 30
    if args.quick:
        sets = {k: v[:4] for k, v in sets.items()}
        keys_per_label, queries_per_label = 4, 4
    encoder = SentenceEmbedder(args.model)._load()
    low = SentenceEmbedder(args.model, dtype=args.query_dtype)._load() if args.query_dtype else None
    n_layers = encoder.n_layers
    result: dict = {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "keys_per_label": keys_per_label},
        "versions": versions(),
        "n_layers": n_layers,
        "accuracy": {},
    }
    for set_name, names in sets.items():
        kt, ktask, kgroup, qt, qtask = sample(args.data, names, keys_per_label, queries_per_label, args.seed)
        km, qm = layer_means(encoder, kt), layer_means(encoder, qt)
        queries = {"accuracy": qm}
        if low is not None:
            queries[f"accuracy_{args.query_dtype}_queries"] = layer_means(low, qt)
        for key, q in queries.items():
            result.setdefault(key, {})[set_name] = {}
            for label, spec in VARIANTS.items():
                layers = _layers(spec, n_layers)
                if max(layers) > n_layers:
                    continue
                acc = routing_accuracy(combine(km, layers), ktask, kgroup, combine(q, layers), qtask, names)
                result[key][set_name][label] = {"layers": layers, **acc}
                print(
                    f"{set_name:5s} {label:38s} top-1 {100 * acc['top1']:5.1f}  hit@1 {100 * acc['hit@1']:5.1f}"
                    + ("" if key == "accuracy" else f"  ({args.query_dtype} queries)")
                )
    oos = args.data / "clinc150" / "oos_test.jsonl"
    lines = oos.read_text().splitlines() if oos.is_file() else []
    queries = [json.loads(line)["text"] for line in lines[: args.latency_queries]]
    if queries and n_layers >= 3:
        base = args.model
        lat = latency(
            {
                "default (+mid)": f"{base}+mid",
                "+layers=3,2": f"{base}+layers=3,2",
            },
            queries,
            rounds=1 if args.quick else 3,
        )
        lat["ratio_p50_fast_vs_default"] = lat["+layers=3,2"]["p50_ms"] / lat["default (+mid)"]["p50_ms"]
        result["latency"] = lat
        print(
            f"one-query encode p50: default {lat['default (+mid)']['p50_ms']:.1f} ms, +layers=3,2 "
            f"{lat['+layers=3,2']['p50_ms']:.1f} ms (ratio {lat['ratio_p50_fast_vs_default']:.2f})"
        )
    result["wall_seconds"] = time.perf_counter() - t_start
    write_result(result, args.out, "routing_layers", quick=args.quick)
    return result


if __name__ == "__main__":
    main()
