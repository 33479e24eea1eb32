"""Routing examples: what ``bank.add_routing_examples`` does for queries that do not look like a task's training
inputs, and what it costs the other tasks and out-of-scope rejection.

Two cases, each on real public data, held-out rows only (no test split is read):

- **new source** — a bank of 10 tasks (AG News, Amazon, DBpedia, Yahoo, TREC, Medical Abstracts, CFPB,
  UNFAIR-ToS, CLINC150 banking and travel), keys as ``learn_task`` files them (16 training rows per label from
  each train pool); the queries are Yelp reviews (its dev split), which belong to the Amazon task (the same five
  star ratings, another source). Routing examples: ``k`` Yelp rows from its train split, added to Amazon.
- **preprocessed training text** — the same bank, but the AG News task learned from its rows lower-cased,
  stripped of punctuation and of English stop words (as the CFPB narratives of ../shared/data are); the queries
  are natural AG News rows (held out from its train pool). Routing examples: ``k`` other natural AG News rows.

For ``k`` in 0, 4, 16, 64: the share of those queries routed to their task (accepted), the hit@1 of the other
tasks' held-out queries (30 per label from their train pools, disjoint from the keys), and the share of 300
CLINC150 out-of-scope queries (its test file) sent to "no task". Default routing embedder and learned router,
each query routed alone, seeds 0-2.

    python benchmarks/routing_examples.py            # ~10 min at 1 thread
    python benchmarks/routing_examples.py --quick    # one seed, k in 0, 4; a few tasks
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import (  # noqa: E402
    default_data_dir,
    file_routing_keys_only,
    mean,
    read_rows,
    routing_discriminant,
    versions,
    write_result,
)

TASKS = ["ag", "amazon", "dbpedia", "yahoo", "trec", "medical", "cfpb", "unfair_tos", "clinc_banking", "clinc_travel"]
QUICK_TASKS = ["ag", "amazon", "dbpedia", "clinc_banking"]
KS = [0, 4, 16, 64]
CASES = {"new_source": "amazon", "preprocessed": "ag"}  # case -> the task its queries belong to


def preprocess(text: str) -> str:
    """Lower-cased, punctuation removed, English stop words dropped (the CFPB narratives' preprocessing)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower().replace("'", "")).split()
    return " ".join(w for w in words if w not in ENGLISH_STOP_WORDS)


def sample(data_dir: Path, names: list[str], seed: int, keys_per_label: int = 16, queries_per_label: int = 30):
    """Per task: (labels, key rows, held-out query rows), disjoint draws from its train pool (as
    ``routing_layers.sample``), plus the rest of AG News's pool for the preprocessed case."""
    import forgetting

    out, rest = {}, {}
    for name in names:
        labels, pool, _ = forgetting._dataset_rows(data_dir, name)
        by: dict[str, list[dict]] = {}
        for r in pool:
            by.setdefault(r["label"], []).append(r)
        rng = random.Random(f"{seed}:{name}")
        keys, queries, left = [], [], []
        for lab in labels:
            rows = list(by.get(lab, []))
            rng.shuffle(rows)
            keys += rows[:keys_per_label]
            queries += rows[keys_per_label : keys_per_label + queries_per_label]
            left += rows[keys_per_label + queries_per_label :]
        out[name] = (labels, keys, queries)
        rest[name] = left
    return out, rest


def run_seed(data_dir: Path, names: list[str], ks: list[int], seed: int, backbone, embedder) -> dict:
    from promptbank import PromptBank
    from promptbank.config import TrainConfig
    from promptbank.tasks import load_task_data

    tasks, rest = sample(data_dir, names, seed)
    yelp_pool = read_rows(data_dir / "yelp_reviews" / "train.jsonl")
    yelp_queries = [r["text"] for r in read_rows(data_dir / "yelp_reviews" / "dev.jsonl")]
    oos = [r["text"] for r in read_rows(data_dir / "clinc150" / "oos_test.jsonl")]
    oos = random.Random(f"{seed}:oos").sample(oos, min(300, len(oos)))
    rng = random.Random(f"{seed}:examples")
    pools = {  # routing examples, drawn once per seed: the k = 4 ones are the first 4 of the k = 16 ones, ...
        "new_source": [r["text"] for r in rng.sample(yelp_pool, min(max(ks), len(yelp_pool)))],
        "preprocessed": [r["text"] for r in rng.sample(rest["ag"], min(max(ks), len(rest["ag"])))],
    }
    queries = {"new_source": yelp_queries, "preprocessed": [r["text"] for r in tasks["ag"][2]]}
    tconf = TrainConfig(seed=0)
    res: dict = {"seed": seed, "n_queries": {c: len(q) for c, q in queries.items()}, "n_oos": len(oos)}
    for case, target in CASES.items():
        bank = PromptBank(backbone, embedder)
        for name in names:
            labels, keys, _ = tasks[name]
            rows = keys
            if case == "preprocessed" and name == target:
                rows = [{"text": preprocess(r["text"]), "label": r["label"]} for r in keys]
            file_routing_keys_only(bank, name, load_task_data(rows, labels=labels), tconf)
        others = [(r["text"], n) for n in names if n != target for r in tasks[n][2]]
        if case == "new_source":  # Amazon's own held-out rows (in the preprocessed case they are the queries)
            others += [(r["text"], target) for r in tasks[target][2]]
        per_k = []
        for k in ks:
            if k:
                bank.remove_routing_examples(target)
                bank.add_routing_examples(target, pools[case][:k])
            t0 = time.perf_counter()
            got = [r.task for r in bank.route_many(queries[case])]
            in_task = [r.task for r in bank.route_many([t for t, _ in others])]
            oos_routes = [r.task for r in bank.route_many(oos)]
            row = {
                "k": k,
                "queries_to_task": float(np.mean([g == target for g in got])),
                "queries_rejected": float(np.mean([g is None for g in got])),
                "queries_elsewhere": {n: int(sum(g == n for g in got)) for n in names if n != target},
                "other_queries_hit1": float(np.mean([g == n for g, (_, n) in zip(in_task, others)])),
                "oos_rejected": float(np.mean([g is None for g in oos_routes])),
                "oos_to_task": float(np.mean([g == target for g in oos_routes])),
                "oos_accepted_by": {n: int(sum(g == n for g in oos_routes)) for n in names if n in oos_routes},
                "discriminant": routing_discriminant(bank),  # which one ranked the tasks (promptbank.lda)
                "route_seconds": time.perf_counter() - t0,
            }
            per_k.append(row)
            print(
                f"seed {seed} {case:12s} k={k:3d}: to {target} {row['queries_to_task']:.3f} "
                f"(rejected {row['queries_rejected']:.3f}), other tasks hit@1 {row['other_queries_hit1']:.3f}, "
                f"OOS rejected {row['oos_rejected']:.3f} ({row['discriminant']} discriminant)",
                flush=True,
            )
        res[case] = per_k
    return res


def summarize(runs: list[dict], ks: list[int]) -> dict:
    out = {}
    for case in CASES:
        out[case] = []
        for i, k in enumerate(ks):
            rows = [r[case][i] for r in runs]
            out[case].append(
                {"k": k, **{m: mean([x[m] for x in rows]) for m in (
                    "queries_to_task", "queries_rejected", "other_queries_hit1", "oos_rejected", "oos_to_task")}}
            )  # fmt: skip
    return out


def table(summary: dict) -> str:
    lines = [
        "| case (task) | routing examples added | queries routed to the task | rejected | other tasks' hit@1 "
        "| out-of-scope rejected |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, target in CASES.items():
        for row in summary[case]:
            lines.append(
                f"| {case} ({target}) | {row['k']} | {100 * row['queries_to_task']:.1f} | "
                f"{100 * row['queries_rejected']:.1f} | {100 * row['other_queries_hit1']:.1f} | "
                f"{100 * row['oos_rejected']:.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one seed, 4 tasks, k in 0, 4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    from promptbank.backbone import load_backbone
    from promptbank.embed import ROUTING_EMBEDDER, load_embedder

    torch.set_num_threads(args.threads)
    names, ks, seeds = (QUICK_TASKS, KS[:2], 1) if args.quick else (TASKS, KS, args.seeds)
    t0 = time.time()
    from forgetting import _Memo

    embedder = _Memo(load_embedder(ROUTING_EMBEDDER))  # every text embedded once per process
    backbone = load_backbone("all-minilm-l6-v2")  # the bank's backbone; routing never runs it
    runs = [run_seed(args.data, names, ks, s, backbone, embedder) for s in range(seeds)]
    summary = summarize(runs, ks)
    result = {
        "config": {"data": str(args.data), "tasks": names, "ks": ks, "seeds": seeds, "quick": args.quick,
                   "embedder": ROUTING_EMBEDDER, "routing": "lda", "threads": args.threads},
        "versions": versions(),
        "wall_seconds": time.time() - t0,
        "summary": summary,
        "runs": runs,
    }  # fmt: skip
    print(table(summary))
    write_result(result, args.out, "routing_examples", quick=args.quick)
    return result


if __name__ == "__main__":
    main()
